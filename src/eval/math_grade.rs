//! Final-answer extraction and equivalence grading for MATH, MATH-500, GSM8K and GSM-Plus.
//!
//! Modelled on Hendrycks' MATH `is_equiv`/`strip_string`, PRM800K's grader and the Qwen / Eurus
//! math-evaluation harnesses: answers are first brought to a canonical LaTeX spelling, then
//! compared as strings, element-wise (tuples, intervals, lists, matrices) and finally by value.
//! Model output is arbitrary text, so nothing here may panic: strings are only sliced at offsets
//! produced by `char_indices`/`find` of ASCII patterns, and recursion is depth-limited.

use std::f64::consts::PI;

/// Nesting limit for brackets and expressions, so adversarial input cannot overflow the stack.
const MAX_DEPTH: usize = 64;
/// Tolerances of the Qwen harness, for decimals that approximate an exact answer.
const REL_TOL: f64 = 1e-4;
const ABS_TOL: f64 = 1e-8;
/// Two exact forms must agree to float precision: 1e-4 would accept 71 for `12\sqrt{35}`.
const EXACT_REL_TOL: f64 = 1e-9;

/// Text-style commands whose content is the answer (`\text{Evelyn}`) unless it is a trailing unit.
#[rustfmt::skip]
const TEXT_COMMANDS: [&str; 8] =
    ["text", "textbf", "textit", "textrm", "textnormal", "mbox", "mathrm", "mathbf"];

/// Commands that only change typesetting: (name, replacement). Spacing commands may be followed
/// by spaces that belong to them, e.g. the thousands group in `11,\! 111`.
#[rustfmt::skip]
const TYPESETTING: [(&str, &str); 17] = [
    ("dfrac", "\\frac"), ("tfrac", "\\frac"), ("cfrac", "\\frac"),
    ("left", ""), ("right", ""), ("displaystyle", ""), ("quad", ""), ("qquad", ""),
    ("!", ""), (",", ""), (";", ""), (":", ""), (" ", ""), ("(", ""), (")", ""), ("[", ""), ("]", ""),
];

/// Literal spellings: units and symbols that never change the value, and Unicode maths.
#[rustfmt::skip]
const LITERALS: [(&str, &str); 13] = [
    ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""),
    ("{,}", ","), ("−", "-"), ("∞", "\\infty "), ("π", "\\pi "), ("√", "\\sqrt "), ("×", "\\times "),
];

/// Ways GSM-Plus "critical thinking" answers say the question is unanswerable, after
/// lowercasing and expanding contractions ("can't" → "cannot", "doesn't" → "does not").
#[rustfmt::skip]
const INSUFFICIENT_PHRASES: &[&str] = &[
    "not enough information", "not enough info", "not enough data", "not enough details",
    "insufficient information", "insufficient data", "insufficient details", "unanswerable",
    "missing information", "information is missing", "missing data", "lack of information",
    "lacks information", "lacks the information", "cannot be determined", "cannot determine",
    "impossible to determine", "not possible to determine", "unable to determine",
    "no way to determine", "no way to know", "cannot be calculated", "cannot calculate",
    "impossible to calculate", "cannot be answered", "cannot answer", "not given", "not provided",
    "not specified", "not stated", "not mentioned", "does not provide", "does not give",
    "does not specify", "does not mention", "does not state", "does not tell", "do not know",
];

/// Whole answers (normalised, lowercase) that mean "no answer exists".
const NONE_ANSWERS: [&str; 6] =
    ["none", "n/a", "unknown", "undetermined", "indeterminate", "insufficient"];

/// Last `\boxed{...}` (or `\fbox{...}`, or `\boxed 5` without braces) content, brace-matched.
pub fn last_boxed(text: &str) -> Option<String> {
    let (pos, len) = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|cmd| text.rfind(cmd).map(|p| (p, cmd.len())))
        .max()?;
    let after = &text[pos + len..];
    if let Some((content, _)) = split_group(after.trim_start()) {
        return Some(content.trim().to_string());
    }
    // Hendrycks reads `\boxed 5$` up to the closing dollar; a `{` here is an unbalanced box.
    let bare = after.trim_start().split(['$', '\n']).next().unwrap_or_default().trim();
    let usable = after.starts_with(char::is_whitespace) && !bare.is_empty() && !bare.starts_with('{');
    usable.then(|| bare.to_string())
}

/// How an answer was found, recorded per item so reports can show unparseable rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extraction {
    Boxed,
    AnswerIs,
    Hashes,
    LastNumber,
    /// A program of thought's printed line.
    Output,
}

/// The model's final answer: last \boxed{}, else "the answer is X" / "final answer: X" (last
/// occurrence), else "#### X", else the last number in the text. None when nothing is found.
pub fn extract_answer(text: &str) -> Option<(String, Extraction)> {
    last_boxed(text)
        .filter(|a| !a.is_empty())
        .map(|a| (a, Extraction::Boxed))
        .or_else(|| answer_cue(text).map(|a| (a, Extraction::AnswerIs)))
        .or_else(|| {
            let (_, rest) = text.rsplit_once("####")?;
            answer_tail(rest).map(|a| (a, Extraction::Hashes))
        })
        .or_else(|| last_number(text).map(|a| (a, Extraction::LastNumber)))
}

/// The answer after the last "answer is" / "answer:" cue that is followed by anything.
fn answer_cue(text: &str) -> Option<String> {
    // ASCII lowercasing keeps every byte offset valid for `text`.
    let lower = text.to_ascii_lowercase();
    let mut ends: Vec<usize> = ["answer is", "answer:"]
        .iter()
        .flat_map(|cue| lower.match_indices(cue).map(|(i, m)| i + m.len()))
        .collect();
    ends.sort_unstable();
    ends.into_iter().rev().find_map(|end| answer_tail(&text[end..]))
}

/// The first sentence of the first non-empty line, without colons, markdown bold or "####".
fn answer_tail(rest: &str) -> Option<String> {
    let rest = rest.trim_start_matches(|c: char| matches!(c, ':' | '*' | '#') || c.is_whitespace());
    let line = rest.lines().next()?;
    let sentence = line.split(". ").next().unwrap_or_default();
    // "is 5, which is ..." ends at the comma; the list "3, 5, 7" does not.
    let clause_end = sentence.match_indices(", ").map(|(i, _)| i).find(|&i| {
        let word = sentence[i + 2..].split(|c: char| !c.is_ascii_alphabetic()).next();
        word.is_some_and(|w| w.len() >= 2 && w != "pi")
    });
    let answer = sentence[..clause_end.unwrap_or(sentence.len())].trim_end_matches(|c: char| matches!(c, '.' | '*') || c.is_whitespace());
    (!answer.is_empty()).then(|| answer.to_string())
}

/// The last number-like token (`-1,234.5`, `3/4`); commas only join well-formed thousands
/// groups, so "2,3" yields "3".
fn last_number(text: &str) -> Option<String> {
    let c: Vec<char> = text.chars().collect();
    let digit_at = |i: usize| c.get(i).is_some_and(char::is_ascii_digit);
    let digits_end = |mut i: usize| {
        while digit_at(i) {
            i += 1;
        }
        i
    };
    let mut last = None;
    let mut i = 0;
    while i < c.len() {
        if !(digit_at(i) || (c[i] == '.' && digit_at(i + 1))) {
            i += 1;
            continue;
        }
        let start = i;
        i = digits_end(i);
        while c.get(i) == Some(&',') && (1..=3).all(|k| digit_at(i + k)) && !digit_at(i + 4) {
            i += 4;
        }
        for sep in ['.', '/'] {
            if c.get(i) == Some(&sep) && digit_at(i + 1) {
                i = digits_end(i + 1);
            }
        }
        // A minus is a sign unless it is a binary operator ("5-3" ends in 3, not -3).
        let negative = start >= 1
            && matches!(c[start - 1], '-' | '−')
            && (start < 2 || !(c[start - 2].is_alphanumeric() || c[start - 2] == ')'));
        last = Some(c[start - usize::from(negative)..i].iter().collect());
    }
    last
}

/// Canonical form for comparison (see below): one spelling per LaTeX variant, without units,
/// money and percent signs, thousands separators, one-letter `x =` prefixes, trailing zeros or
/// whitespace. Matrices and other structures stay strings; `is_equiv` compares them by element.
pub fn normalize(answer: &str) -> String {
    let boxed = last_boxed(answer).unwrap_or_else(|| answer.to_string());
    let mut s = boxed.trim().trim_end_matches('.').replace(['\n', '\r', '\t'], " ");
    for (from, to) in LITERALS {
        s = s.replace(from, to);
    }
    for (name, to) in TYPESETTING {
        s = rewrite_command(&s, name, |rest| {
            let spaces = if to.is_empty() { rest.len() - rest.trim_start().len() } else { 0 };
            Some((to.to_string(), spaces))
        });
    }
    while let Some(value) = strip_unit_group(&s).map(str::to_string) {
        s = value;
    }
    for name in TEXT_COMMANDS {
        s = rewrite_command(&s, name, |rest| {
            let (content, tail) = split_group(rest.trim_start())?;
            Some((content.to_string(), rest.len() - tail.len()))
        });
    }
    for (name, arity) in [("frac", 2), ("sqrt", 1)] {
        s = rewrite_command(&s, name, |rest| {
            brace_args(rest, arity).map(|(args, used)| (format!("\\{name}{args}"), used))
        });
    }
    let s = strip_variable(strip_unit_words(&s));
    // Thousands are read before spaces go, so the list "1, 100" stays a list.
    let s = strip_thousands(s).unwrap_or_else(|| s.to_string());
    let s: String = s.split_whitespace().collect();
    let s = unbrace_scripts(&s.replace("bmatrix", "pmatrix"));
    let s = match s.as_bytes() {
        [b'(', letter, b')'] if letter.is_ascii_uppercase() => char::from(*letter).to_string(),
        _ => s,
    };
    if let Some(number) = canonical_decimal(&s) {
        number
    } else if s.chars().all(char::is_alphabetic) {
        s.to_lowercase()
    } else {
        s
    }
}

/// Content and remainder of the brace group `s` starts with; `None` when unbalanced.
/// Escaped braces (`\{`, `\}`) are content, as in TeX.
fn split_group(s: &str) -> Option<(&str, &str)> {
    if !s.starts_with('{') {
        return None;
    }
    let (mut depth, mut escaped) = (0usize, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some((&s[1..i], &s[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Position of the next `\name` at or after `from`, skipping escaped backslashes (`\\ ` is a
/// line break, not `\ `) and longer control words (`\right` in `\rightarrow`).
fn find_command(s: &str, name: &str, from: usize) -> Option<usize> {
    let pattern = format!("\\{name}");
    let whole_word = name.ends_with(|c: char| c.is_ascii_alphabetic());
    let mut hits = s.get(from..)?.match_indices(&pattern).map(|(i, _)| from + i);
    hits.find(|&pos| {
        let escaped = s[..pos].chars().rev().take_while(|&c| c == '\\').count() % 2 == 1;
        let next = s[pos + pattern.len()..].chars().next();
        !(escaped || whole_word && next.is_some_and(|c| c.is_ascii_alphabetic()))
    })
}

/// Rewrites every `\name` left to right. `edit` sees the text after the command and returns
/// the replacement plus how many bytes of that text it consumed, or `None` to keep it as is.
/// Scanning resumes at the replacement, so nested commands are rewritten too.
fn rewrite_command(s: &str, name: &str, edit: impl Fn(&str) -> Option<(String, usize)>) -> String {
    let mut out = s.to_string();
    let mut from = 0;
    while let Some(pos) = find_command(&out, name, from) {
        let after = pos + 1 + name.len();
        match edit(&out[after..]) {
            Some((replacement, used)) => {
                out.replace_range(pos..after + used, &replacement);
                from = pos;
            }
            None => from = after,
        }
    }
    out
}

/// Braces the first `arity` arguments (`\frac12` → `{1}{2}`), keeping a `\sqrt[3]` index.
/// `None` when they are already in canonical form, which makes `rewrite_command` terminate.
fn brace_args(rest: &str, arity: usize) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut tail = rest;
    if tail.starts_with('[') {
        let close = tail.find(']')? + 1;
        out.push_str(&tail[..close]);
        tail = &tail[close..];
    }
    for _ in 0..arity {
        let (arg, next) = take_arg(tail)?;
        out.push('{');
        out.push_str(arg);
        out.push('}');
        tail = next;
    }
    let used = rest.len() - tail.len();
    (out != rest[..used]).then_some((out, used))
}

/// One TeX argument: a brace group, a control word, or a single character.
fn take_arg(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.starts_with('{') {
        return split_group(s);
    }
    let first = s.chars().next().filter(|&c| c != '}')?;
    let end = if first == '\\' {
        let word = s[1..].find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(s.len() - 1);
        // A control symbol such as `\!` is the backslash plus one character.
        let word = if word == 0 { s[1..].chars().next().map_or(0, char::len_utf8) } else { word };
        1 + word
    } else {
        first.len_utf8()
    };
    Some(s.split_at(end))
}

/// Drops a trailing `\text{ cm}`-style unit (optionally squared) that follows a value.
fn strip_unit_group(s: &str) -> Option<&str> {
    let (pos, len) = TEXT_COMMANDS
        .iter()
        .filter_map(|name| {
            let pattern = format!("\\{name}");
            s.rfind(&pattern).map(|p| (p, pattern.len()))
        })
        .max()?;
    let (value, command) = s.split_at(pos);
    let (unit, tail) = split_group(command[len..].trim_start())?;
    let squared = matches!(tail.trim(), "" | "^2" | "^3" | "^{2}" | "^{3}");
    let wordy = unit.chars().any(char::is_alphabetic)
        && unit.chars().all(|c| c.is_alphabetic() || c == ' ' || c == '.');
    (squared && wordy && value.contains(|c: char| c.is_ascii_digit())).then(|| value.trim_end())
}

/// Drops trailing unit words after a value ("18 dollars", "100 square units", "5 cm^2").
/// "pi" is maths, and one-letter words are variables or `i`, so both stay.
fn strip_unit_words(s: &str) -> &str {
    let s = s.trim();
    let mut head = s;
    while let Some((rest, word)) = head.rsplit_once(char::is_whitespace) {
        let base = word.trim_end_matches(['^', '2', '3']);
        if base.len() < 2 || base == "pi" || !base.chars().all(|c| c.is_ascii_alphabetic()) {
            break;
        }
        head = rest.trim_end();
    }
    let after_value = head.ends_with(|c: char| c.is_ascii_digit() || c == '}');
    if head.len() < s.len() && after_value {
        head
    } else {
        s
    }
}

/// "x = 5", "k=5", "x \in [-2,7]" → the value. Only one-letter left-hand sides are dropped,
/// so equations such as "5x - 7y + 11z + 4 = 0" survive.
fn strip_variable(s: &str) -> &str {
    let mut chars = s.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return s;
    }
    let rest = chars.as_str().trim_start();
    let value = rest.strip_prefix('=').or_else(|| {
        rest.strip_prefix("\\in").filter(|v| !v.starts_with(|c: char| c.is_ascii_alphabetic()))
    });
    match value.map(str::trim) {
        Some(v) if !v.is_empty() && !v.contains('=') => v,
        _ => s,
    }
}

/// "1,234,567.5" → "1234567.5" only for well-formed groups, so lists like "2,3" survive.
fn strip_thousands(s: &str) -> Option<String> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let int_part = body.split('.').next().unwrap_or_default();
    let frac_part = &body[int_part.len()..];
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    let mut groups = int_part.split(',');
    let first = groups.next().unwrap_or_default();
    let well_formed = digits(first)
        && first.len() <= 3
        && int_part.contains(',')
        && groups.all(|g| g.len() == 3 && digits(g))
        && (frac_part.is_empty() || frac_part.strip_prefix('.').is_some_and(digits));
    well_formed.then(|| s.replace(',', ""))
}

/// `x^{2}` and `x^2` (and base subscripts `_{5}`) are the same TeX.
fn unbrace_scripts(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < c.len() {
        out.push(c[i]);
        let single = c.get(i + 2).filter(|x| !matches!(x, '\\' | '{' | '}'));
        if let (true, Some('{'), Some(&x), Some('}')) =
            (matches!(c[i], '^' | '_'), c.get(i + 1), single, c.get(i + 3))
        {
            out.push(x);
            i += 4;
        } else {
            i += 1;
        }
    }
    out
}

/// Canonical decimal spelling: no leading or trailing zeros, "0.5" for ".5", "0" for "-0".
fn canonical_decimal(s: &str) -> Option<String> {
    let (negative, body) = s.strip_prefix('-').map_or((false, s), |b| (true, b));
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let all_digits = int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit());
    if !all_digits || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    let int = match int.trim_start_matches('0') {
        "" => "0",
        trimmed => trimmed,
    };
    let frac = frac.trim_end_matches('0');
    let unsigned = if frac.is_empty() { int.to_string() } else { format!("{int}.{frac}") };
    Some(if negative && unsigned != "0" { format!("-{unsigned}") } else { unsigned })
}

/// Whether a predicted answer equals the reference: normalised string equality, then numeric
/// comparison with relative tolerance 1e-4 (absolute 1e-8 near zero) where both parse as numbers
/// (including fractions a/b, \frac{a}{b}, percentages, mixed like "1,000"), then simple exact
/// evaluation of expressions with fractions, sqrt, pi and + - * / ^ where both sides parse (e.g.
/// "\frac{\sqrt{3}}{2}" vs "\frac{1}{2}\sqrt{3}" vs "0.8660254"), and element-wise for
/// tuples/intervals/comma lists like "(3, \frac{\pi}{2})" with matching brackets.
pub fn is_equiv(predicted: &str, reference: &str) -> bool {
    let (p, r) = (normalize(predicted), normalize(reference));
    let percent = |s: &str| s.contains('%') || s.to_ascii_lowercase().contains("percent");
    !p.is_empty() && equiv(&p, &r, (percent(predicted), percent(reference)), 0)
}

/// Compares normalised answers: as strings, then structurally, then by value.
fn equiv(p: &str, r: &str, percent: (bool, bool), depth: usize) -> bool {
    if p == r {
        return true;
    }
    if depth >= MAX_DEPTH {
        return false;
    }
    match (compound(p), compound(r)) {
        (Some(a), Some(b)) => same_elements(&a, &b, depth + 1),
        (None, None) => numeric_equiv(p, r, percent),
        _ => false,
    }
}

/// An answer compared element-wise; `kind` is what must match exactly (brackets, separator).
struct Compound<'a> {
    kind: String,
    parts: Vec<&'a str>,
    ordered: bool,
}

/// Splits unions, matrices and their rows, sets, tuples/intervals and bare lists. Bare lists
/// and sets are unordered ("-2,1" lists solutions), tuples and intervals are not.
fn compound<'a>(s: &'a str) -> Option<Compound<'a>> {
    let make = |kind: &str, parts: Vec<&'a str>, ordered| {
        (parts.len() > 1).then(|| Compound { kind: kind.to_string(), parts, ordered })
    };
    if let Some(union) = make("cup", split_top(s, "\\cup"), true) {
        return Some(union);
    }
    if let Some(inner) = s.strip_prefix("\\begin{pmatrix}").and_then(|t| t.strip_suffix("\\end{pmatrix}")) {
        return Some(Compound { kind: "pmatrix".into(), parts: split_top(inner, "\\\\"), ordered: true });
    }
    if let Some(row) = make("&", split_top(s, "&"), true) {
        return Some(row);
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|t| t.strip_suffix("\\}")) {
        return Some(Compound { kind: "set".into(), parts: split_top(inner, ","), ordered: false });
    }
    let (first, last) = (s.chars().next()?, s.chars().last()?);
    if matches!(first, '(' | '[') && matches!(last, ')' | ']') && encloses(s) {
        return make(&format!("{first}{last}"), split_top(&s[1..s.len() - 1], ","), true);
    }
    make(",", split_top(s, ","), false)
}

fn same_elements(a: &Compound, b: &Compound, depth: usize) -> bool {
    if a.kind != b.kind || a.ordered != b.ordered || a.parts.len() != b.parts.len() {
        return false;
    }
    let eq = |x: &str, y: &str| equiv(x, y, (false, false), depth);
    if a.ordered {
        return a.parts.iter().zip(&b.parts).all(|(x, y)| eq(x, y));
    }
    let mut unused = b.parts.clone();
    a.parts.iter().all(|x| match unused.iter().position(|y| eq(x, y)) {
        Some(k) => {
            unused.swap_remove(k);
            true
        }
        None => false,
    })
}

/// Bracket nesting change; intervals mix `(` with `]`, so all kinds count alike.
fn nesting(c: char) -> i32 {
    match c {
        '(' | '[' | '{' => 1,
        ')' | ']' | '}' => -1,
        _ => 0,
    }
}

/// Pieces of `s` split at `sep` outside any brackets.
fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        if i < start {
            continue;
        }
        depth += nesting(c);
        if depth == 0 && s[i..].starts_with(sep) {
            parts.push(&s[start..i]);
            start = i + sep.len();
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Whether the opening bracket of `s` closes only at its end: "(1,2)" but not "(a)(b)".
fn encloses(s: &str) -> bool {
    let n = s.chars().count();
    let mut depth = 0;
    s.chars().enumerate().all(|(k, c)| {
        depth += nesting(c);
        depth > 0 || k + 1 == n
    })
}

/// Values compared with `REL_TOL` only when a side is a decimal (an approximation) and the
/// other is not a plain decimal; distinct integers never match, even beyond f64 precision.
fn numeric_equiv(p: &str, r: &str, (p_percent, r_percent): (bool, bool)) -> bool {
    if !(p_percent || r_percent) {
        if let (Some(a), Some(b)) = (canonical_decimal(p), canonical_decimal(r)) {
            return same_decimal(&a, &b);
        }
    }
    let (Some(a), Some(b)) = (value(p), value(r)) else {
        return false;
    };
    let rel_tol = if p.contains('.') || r.contains('.') { REL_TOL } else { EXACT_REL_TOL };
    let close = |x: f64, y: f64| (x - y).abs() <= ABS_TOL.max(rel_tol * x.abs().max(y.abs()));
    // "50%" may be meant as 50 or as 0.5, whichever side wrote it.
    let readings = |v: f64, percent: bool| [Some(v), percent.then_some(v / 100.0)].into_iter().flatten();
    readings(a, p_percent).any(|x| readings(b, r_percent).any(|y| close(x, y)))
}

/// Two canonical decimals: equal, or (when both have fractional digits) the longer rounds to
/// the shorter, as "3.14159" to "3.1416". A relative tolerance would merge 11655.2 and 11656.2.
fn same_decimal(a: &str, b: &str) -> bool {
    let places = |d: &str| d.split_once('.').map_or(0, |(_, f)| f.len());
    if a == b {
        return true;
    }
    let shorter = places(a).min(places(b));
    if shorter == 0 {
        return false;
    }
    let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) else { return false };
    let half_unit = 0.5 * 10f64.powi(-(shorter as i32));
    (x - y).abs() <= half_unit * (1.0 + 1e-9)
}

/// The number an answer states, after [`normalize`]: decimals, scientific notation and the
/// numeric LaTeX [`is_equiv`] evaluates; `None` for anything else.
pub fn numeric_value(answer: &str) -> Option<f64> {
    let s = normalize(answer);
    let s = s.trim_end_matches('%');
    s.parse::<f64>().ok().filter(|v| v.is_finite()).or_else(|| value(s))
}

fn value(s: &str) -> Option<f64> {
    mixed_number(s).or_else(|| Eval::run(s))
}

/// MATH writes mixed numbers as `1\frac{4}{5}` (= 9/5), which is not a product.
fn mixed_number(s: &str) -> Option<f64> {
    let (sign, body) = s.strip_prefix('-').map_or((1.0, s), |b| (-1.0, b));
    let (whole, frac) = body.split_once("\\frac")?;
    let (num, rest) = split_group(frac)?;
    let (den, rest) = split_group(rest)?;
    let parse = |t: &str| -> Option<f64> {
        let ok = !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
        ok.then(|| t.parse().ok()).flatten()
    };
    let (whole, num, den) = (parse(whole)?, parse(num)?, parse(den)?);
    let v = sign * (whole + num / den);
    (rest.is_empty() && num < den && v.is_finite()).then_some(v)
}

/// Recursive-descent evaluator for the numeric LaTeX that answers use: decimals, + - * / ^,
/// `\cdot`, `\times`, `\frac`, `\sqrt`, `\pi`, brackets and implicit products. Anything else
/// (variables, `i`, `\infty`) makes the answer non-numeric.
struct Eval {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Eval {
    fn run(s: &str) -> Option<f64> {
        let mut e = Eval { chars: s.chars().collect(), pos: 0, depth: 0 };
        let v = e.sum()?;
        (e.pos == e.chars.len() && v.is_finite()).then_some(v)
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        let hit = self.peek() == Some(c);
        self.pos += usize::from(hit);
        hit
    }

    /// Length of `\name` at the cursor when it is the whole control word there.
    fn command_len(&self, name: &str) -> Option<usize> {
        let end = self.pos + 1 + name.len();
        let word = self.chars.get(self.pos + 1..end)?;
        let whole = !self.chars.get(end).is_some_and(char::is_ascii_alphabetic);
        let hit = self.peek() == Some('\\') && word.iter().copied().eq(name.chars()) && whole;
        hit.then_some(end - self.pos)
    }

    fn eat_command(&mut self, name: &str) -> bool {
        let len = self.command_len(name);
        self.pos += len.unwrap_or(0);
        len.is_some()
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Option<f64>) -> Option<f64> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        self.depth += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn sum(&mut self) -> Option<f64> {
        let mut v = self.product()?;
        loop {
            if self.eat('+') {
                v += self.product()?;
            } else if self.eat('-') {
                v -= self.product()?;
            } else {
                return Some(v);
            }
        }
    }

    fn product(&mut self) -> Option<f64> {
        let mut v = self.signed()?;
        loop {
            if self.eat('*') || self.eat_command("cdot") || self.eat_command("times") {
                v *= self.signed()?;
            } else if self.eat('/') || self.eat_command("div") {
                v /= self.signed()?;
            } else if self.starts_implicit_factor() {
                v *= self.power()?;
            } else {
                return Some(v);
            }
        }
    }

    /// "2\sqrt{3}", "3\pi", "2(1+x)"; not a bare "." so "1.2.3" is rejected.
    fn starts_implicit_factor(&self) -> bool {
        matches!(self.peek(), Some(c) if c.is_ascii_digit() || c == '(' || c == '{')
            || ["frac", "sqrt", "pi"].iter().any(|n| self.command_len(n).is_some())
    }

    fn signed(&mut self) -> Option<f64> {
        if self.eat('-') {
            self.nested(Self::signed).map(|v| -v)
        } else if self.eat('+') {
            self.nested(Self::signed)
        } else {
            self.power()
        }
    }

    /// Plain-text exponents read whole numbers ("2^10" = 1024), as models mean them.
    fn power(&mut self) -> Option<f64> {
        let base = self.atom()?;
        if self.eat('^') {
            self.nested(Self::atom).map(|exp| base.powf(exp))
        } else {
            Some(base)
        }
    }

    fn group(&mut self, open: char, close: char) -> Option<f64> {
        if !self.eat(open) {
            return None;
        }
        let v = self.nested(Self::sum)?;
        self.eat(close).then_some(v)
    }

    fn atom(&mut self) -> Option<f64> {
        match self.peek()? {
            '(' => self.group('(', ')'),
            '{' => self.group('{', '}'),
            c if c.is_ascii_digit() || c == '.' => self.number(),
            _ if self.eat_command("frac") => Some(self.group('{', '}')? / self.group('{', '}')?),
            _ if self.eat_command("sqrt") => {
                let index = if self.peek() == Some('[') { Some(self.group('[', ']')?) } else { None };
                let radicand = self.group('{', '}')?;
                Some(index.map_or_else(|| radicand.sqrt(), |n| radicand.powf(n.recip())))
            }
            _ if self.eat_command("pi") => Some(PI),
            _ => None,
        }
    }

    fn number(&mut self) -> Option<f64> {
        let start = self.pos;
        let mut seen_point = false;
        while let Some(c) = self.peek() {
            if c == '.' && !seen_point {
                seen_point = true;
            } else if !c.is_ascii_digit() {
                break;
            }
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect::<String>().parse().ok()
    }
}

/// For GSM-Plus "critical thinking" rows (reference answer "None"): whether the generation says the
/// question cannot be answered / lacks information (phrases like "not enough information", "cannot
/// be determined", "insufficient information", "missing information", "is not
/// given/provided/specified", "doesn't provide", "impossible to determine", "None" as the
/// boxed/extracted answer, etc.).
///
/// An explicit final answer with a number in it decides: the model answered anyway, even if it
/// remarked earlier that something "is not given". Otherwise the whole text is searched.
pub fn says_insufficient(text: &str) -> bool {
    match extract_answer(text) {
        Some((answer, how)) if how != Extraction::LastNumber => {
            let none = NONE_ANSWERS.contains(&normalize(&answer).to_lowercase().as_str());
            let numeric = answer.contains(|c: char| c.is_ascii_digit());
            none || mentions_insufficiency(if numeric { &answer } else { text })
        }
        _ => mentions_insufficiency(text),
    }
}

fn mentions_insufficiency(text: &str) -> bool {
    let mut text = text.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ");
    for (from, to) in [("’", "'"), ("can't", "cannot"), ("can not", "cannot"), ("n't", " not")] {
        text = text.replace(from, to);
    }
    INSUFFICIENT_PHRASES.iter().any(|phrase| text.contains(phrase))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (predicted, reference, equivalent?). References are real answers from the eval sets;
    /// predictions are the forms models produce, right and plausibly wrong.
    #[rustfmt::skip]
    const CASES: &[(&str, &str, bool)] = &[
        // MATH-500 `answer`: fractions and mixed numbers.
        ("0.5", r"\frac{1}{2}", true), (r"\dfrac{1}{2}", r"\frac{1}{2}", true),
        (r"\frac12", r"\frac{1}{2}", true), ("0.75", r"\frac 34", true),
        (r"\frac{3}{4}", r"\frac 34", true), (r"\frac{9}{19}", r"\frac9{19}", true),
        ("14/3", r"\frac{14}{3}", true), (r"\frac{3}{14}", r"\frac{14}{3}", false),
        (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}", true), ("0.34", r"\dfrac{17}{50}", true),
        ("0.33", r"\dfrac{33}{100}", true), (r"33\%", r"\dfrac{33}{100}", true),
        (r"\frac{1}{3}", r"\dfrac{33}{100}", false), (r"\frac{9}{5}", r"1\frac{4}{5}", true),
        ("1.8", r"1\frac{4}{5}", true), ("137.5", r"137 \frac{1}{2}", true),
        (r"-\frac{3}{8}", r"-\frac{3}{8}", true), (r"\frac{3}{8}", r"-\frac{3}{8}", false),
        (r"\frac{1}{2}", "2", false),
        // MATH-500: radicals and pi.
        (r"11\sqrt{2}", r"11\sqrt2", true), (r"2\sqrt{5}", r"2 \sqrt{5}", true),
        (r"\sqrt{72}", r"6\sqrt{2}", true), (r"3\sqrt{2}", r"6\sqrt{2}", false),
        (r"2\sqrt{2}", r"\sqrt{2}", false), (r"\sqrt{45}", r"3 \sqrt{5}", true),
        (r"-\sqrt3", r"-\sqrt{3}", true), (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", true),
        (r"\sqrt{21}/5", r"\frac{\sqrt{21}}{5}", true), (r"\sqrt{53}", r"\sqrt{51}", false),
        (r"\frac{3}{4}\sqrt{3}", r"\frac{3\sqrt{3}}{4}", true),
        (r"\frac{1}{2}\sqrt{3}", r"\frac{\sqrt{3}}{2}", true),
        ("0.8660254", r"\frac{\sqrt{3}}{2}", true), ("27.7128", r"16 \sqrt{3}", true),
        ("37.699", r"12\pi", true), ("12", r"12\pi", false), ("3.14", r"\pi", false),
        (r"20000/\pi", r"\frac{20000}{\pi}", true), (r"-\pi/6", r"-\frac{\pi}{6}", true),
        (r"\frac{\pi}{6}", r"-\frac{\pi}{6}", false), (r"2\pi+18", r"18+2\pi", true),
        (r"1+\sqrt{19}", r"1 \pm \sqrt{19}", false), (r"1\pm\sqrt{19}", r"1 \pm \sqrt{19}", true),
        // Distinct MATH test-set references that a plain 1e-4 tolerance would merge.
        ("71", r"12\sqrt{35}", false), ("70.99", r"12\sqrt{35}", true),
        (r"\frac{161}{36}", r"2\sqrt{5}", false), (r"\frac{4036082}{4036081}", "1", false),
        (r"\frac{1005}{1006}", r"\frac{1023}{1024}", false),
        // MATH-500: degrees, money, thousands, units.
        ("90", r"90^\circ", true), ("90°", r"90^\circ", true), (r"90^{\circ}", r"90^\circ", true),
        (r"\frac{\pi}{2}", r"90^\circ", false), ("106 degrees", r"106^\circ", true),
        ("18.9", r"\$18.90", true), ("18.90 dollars", r"\$18.90", true),
        ("32348", r"\$32,\!348", true), (r"\$32,348", r"\$32,\!348", true),
        ("10080", r"10,\!080", true), ("11111111100", r"11,\! 111,\! 111,\! 100", true),
        ("58500", "58,500", true), ("5850", "58,500", false),
        ("15", r"15\mbox{ cm}^2", true), ("864", r"864 \mbox{ inches}^2", true),
        ("5.4", r"5.4 \text{ cents}", true), ("54", r"5.4 \text{ cents}", false),
        ("0.0000672", ".0000672", true), (r"6.72 \times 10^{-5}", ".0000672", true),
        // MATH-500: variables, equations, text, bases, polynomials, complex numbers.
        ("5", "x=5", true), ("x = 5", "x=5", true), ("-5", "x=5", false),
        ("[-2,7]", r"x \in [-2,7]", true), ("[-2, 7)", r"x \in [-2,7]", false),
        ("2x+3", "y = 2x + 3", true), ("y=2x-3", "y = 2x + 3", false),
        ("C", r"\text{(C)}", true), ("(C)", r"\text{(C)}", true),
        (r"\textbf{(B)}", r"\text{(C)}", false), ("Evelyn", r"\text{Evelyn}", true),
        ("Navin", r"\text{Evelyn}", false), ("even", r"\text{even}", true),
        ("odd", r"\text{even}", false), ("204_{5}", "204_5", true), ("204", "204_5", false),
        ("2k + 2", "2k+2", true), ("2k", "2k+2", false), ("3r^2", "3R^2", false),
        ("-2+7i", "-2 + 7i", true), ("-2-7i", "-2 + 7i", false),
        (r"x^{3}+3x-6", "x^3+3x-6", true), ("x^3+3x+6", "x^3+3x-6", false),
        ("3", "-3", false), ("10", "100", false), ("1440", "144", false),
        ("13536", "13535", false), (r"\cot x", r"\cot x", true),
        // MATH-500 answers in the Unicode spellings models emit.
        ("2π", r"2\pi", true), ("−3", "-3", true), ("2√3", r"\sqrt{12}", true), ("3×2", "6", true),
        // MATH-500: tuples, intervals, unions, lists, sets, matrices.
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", true),
        (r"(3, 90^\circ)", r"\left( 3, \frac{\pi}{2} \right)", false),
        (r"[3, \frac{\pi}{2}]", r"\left( 3, \frac{\pi}{2} \right)", false),
        ("(1.5, -13)", r"\left( \frac{3}{2}, -13 \right)", true),
        (r"(-13, \frac{3}{2})", r"\left( \frac{3}{2}, -13 \right)", false),
        ("(1,2)", "(2,1)", false), ("(1, -16, -4, 43)", "(1,-16,-4,43)", true),
        ("(1,-16,-4)", "(1,-16,-4,43)", false),
        (r"(-\infty,2)\cup(3,\infty)", r"(-\infty, 2) \cup (3, \infty)", true),
        (r"(-\infty, 3) \cup (2, \infty)", r"(-\infty, 2) \cup (3, \infty)", false),
        ("(0.6, 8/3]", r"\left(\frac{3}{5},\frac{8}{3}\right]", true),
        (r"(\frac35,\frac83)", r"\left(\frac{3}{5},\frac{8}{3}\right]", false),
        (r"[\pi^2/8, 5\pi^2/4]", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", true),
        ("1, -2", "-2,1", true), ("-21", "-2,1", false),
        ("7, 5, 3", "3, 5, 7", true), ("3, 5", "3, 5, 7", false),
        (r"\{-2, 1\pm\sqrt{5}\}", r"\{1\pm\sqrt{5},-2\}", true),
        (r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", true),
        (r"\begin{bmatrix} -1 & 0 \\ 0 & -1 \end{bmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", true),
        (r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", false),
        (r"\begin{pmatrix} \frac15 \\ -\frac{18}{5} \end{pmatrix}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", true),
        (r"\begin{pmatrix} -18/5 \\ 1/5 \end{pmatrix}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", false),
        // MATH test set (last \boxed{} of `solution`).
        ("17280", r"17,\!280", true), ("14916", "14{,}916", true), ("4000", r"\$4,\!000", true),
        (r"\$115{,}000", r"\$115,000", true), ("0.5", r"\$0.50", true),
        ("81", r"81\text{ teachers}", true), ("45 mph", r"45\text{ mph}", true),
        ("100", r"100\text{ square units}", true), (r"22\frac{2}{3}", r"\frac{68}{3}\text{ pounds}", true),
        (r"\cos 58^{\circ}", r"\cos 58^\circ", true), ("-7, 9", "9,-7", true),
        ("(2,128)", "(128,2)", false), ("2.5, -3", r"\frac{5}{2},-3", true),
        ("-2+3i,-2-3i,4", "4, -2 + 3i, -2 - 3i", true),
        (r"(-\infty,\frac{3}{7}]\cup[\frac{3}{5},\infty)", r"(-\infty, \tfrac37] \cup [\tfrac35, \infty) ", true),
        (r"\frac{7\pi}{6}-\frac{\sqrt3}{2}", r"\frac{7}{6}\pi - \frac{\sqrt{3}}{2}", true),
        (r"(\sqrt{20201}-1)/4", r"\frac{\sqrt{20201} - 1}{4}", true), ("0.5,1,2", r"\frac{1}{2}, 1, 2", true),
        ("(5/3,5/3,5/3)", r"\left( \frac{5}{3}, \frac{5}{3}, \frac{5}{3} \right)", true),
        (r"(3,\infty)", r"[3,\infty)", false), ("Monday", r"\text{Monday}", true),
        ("E", r"(\text{E})", true), ("23", "2,3", false),
        // GSM8K test (text after "#### ").
        ("$18", "18", true), ("18.00", "18", true), ("18 dollars", "18", true),
        ("1450000", "1,450,000", true), ("1,450,000.00", "1,450,000", true),
        ("145000", "1,450,000", false), ("5600", "5,600", true), ("5.6", "5,600", false),
        ("2.125", "2,125", false), (r"\$70{,}000", "70000", true), ("10", "-10", false),
        ("43500.0", "43,500", true),
        // GSM-Plus testmini `answer` (decimals, fractions, "None").
        ("4.33", "4.33", true), ("4.330", "4.33", true), (r"\frac{13}{3}", "4.33", false),
        ("0.25", "1/4", true), (r"\frac{1}{4}", "1/4", true), ("25%", "1/4", true),
        ("4", "1/4", false), ("0.625", "5/8", true), ("0.33", "1/3", false), ("1/3", "0.33", false),
        ("4.2%", "0.042", true), ("11,655.2", "11655.2", true), (r"\$2,183.25", "2183.25", true),
        ("12.50", "12.5", true), (".5", "0.5", true), ("1.5", "1.05", false),
        ("26.67 inches", "26.67", true), ("None", "None", true), ("0", "None", false),
        ("11656.2", "11655.2", false), ("3.14159", "3.1416", true), ("3.1416", "3.1415", false),
        ("18.4", "18", false), ("4.333", "4.33", true), ("-0.5", "0.5", false),
    ];

    #[test]
    fn equivalence_table() {
        assert!(CASES.len() >= 100, "only {} cases", CASES.len());
        let failures: Vec<String> = CASES
            .iter()
            .flat_map(|&(p, r, want)| [(p, r, want), (r, p, want)])
            .filter(|&(p, r, want)| is_equiv(p, r) != want)
            .map(|(p, r, want)| {
                let (np, nr) = (normalize(p), normalize(r));
                format!("is_equiv({p:?}, {r:?}) should be {want}; normalised {np:?} vs {nr:?}")
            })
            .collect();
        assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn normalize_examples() {
        for (raw, want) in [
            (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"\$32,\!348", "32348"),
            ("2,3", "2,3"), ("1, 100", "1,100"), ("k = 5.", "5"), ("-0.0", "0"), ("007.50", "7.5"),
            (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"), (r"\displaystyle\frac12", r"\frac{1}{2}"),
            (r"\sqrt[3]{x} \rightarrow x\in", r"\sqrt[3]{x}\rightarrowx\in"), (r"\text{ East }", "east"),
            (r"\begin{pmatrix} a \\ b \end{pmatrix}", r"\begin{pmatrix}a\\b\end{pmatrix}"),
        ] {
            assert_eq!(normalize(raw), want, "normalize({raw:?})");
        }
    }

    #[test]
    fn extraction() {
        use Extraction::*;
        let cases: &[(&str, Option<(&str, Extraction)>)] = &[
            (r"So $x = \boxed{\frac{1}{\sqrt{2}}}$.", Some((r"\frac{1}{\sqrt{2}}", Boxed))),
            (r"First $\boxed{3}$, but correcting: $\boxed{4}$", Some(("4", Boxed))),
            ("The answer is: 42.", Some(("42", AnswerIs))),
            ("Step 1 ... #### 1,234", Some(("1,234", Hashes))),
            ("Janet makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", Some(("18", Hashes))),
            ("so she has 7 apples left", Some(("7", LastNumber))),
            ("I have no idea how to solve this.", None),
            ("", None),
            (r"Thus \boxed{3", Some(("3", LastNumber))),
            (r"\boxed{", None),
            ("Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.", Some((r"$\frac{2}{3}$", AnswerIs))),
            ("**Final Answer:** 18", Some(("18", AnswerIs))),
            ("The answer is 5. Wait, no: the answer is 6.", Some(("6", AnswerIs))),
            ("The answer is 12, which is even.", Some(("12", AnswerIs))),
            ("The answer is (3, 4), as shown", Some(("(3, 4)", AnswerIs))),
            ("The roots are 2 and −3", Some(("−3", LastNumber))),
            ("The answer is\n\n$-3$", Some(("$-3$", AnswerIs))),
            ("So the answer is:\n#### 14", Some(("14", AnswerIs))),
            (r"\fbox{12} units", Some(("12", Boxed))),
            (r"$\boxed 5$", Some(("5", Boxed))),
            (r"\boxed{} so the answer is 7", Some(("7", AnswerIs))),
            ("The temperature drops to -3 degrees.", Some(("-3", LastNumber))),
            ("Compute 5-3 to get 2", Some(("2", LastNumber))),
            ("She eats 3/4 of it", Some(("3/4", LastNumber))),
            ("Points 2,3 and 1,234,567.5 apart", Some(("1,234,567.5", LastNumber))),
            ("答案是 \\boxed{４２}。", Some(("４２", Boxed))),
            ("{{{{}}}}}}\\boxed{\\boxed{\\left(}", Some((r"\left(", Boxed))),
        ];
        for &(text, want) in cases {
            let got = extract_answer(text);
            let got = got.as_ref().map(|(a, how)| (a.as_str(), *how));
            assert_eq!(got, want, "extract_answer({text:?})");
        }
    }

    #[test]
    fn boxed() {
        for (text, want) in [
            (r"\boxed{\{1,2\}}", Some(r"\{1,2\}")), (r"a \boxed{1} b \fbox{ 2 } c", Some("2")),
            (r"\boxed {x^{2}}", Some("x^{2}")), (r"\boxed{\frac{1}{2}", None),
            ("no box here ✓", None), (r"\boxed", None), (r"\boxed \frac12$ wait", Some(r"\frac12")),
        ] {
            assert_eq!(last_boxed(text).as_deref(), want, "last_boxed({text:?})");
        }
    }

    #[test]
    fn insufficient() {
        for (text, want) in [
            ("We don't know how many grandchildren Martha has.\n#### None", true),
            ("The problem does not provide the price of each computer, so the answer cannot be determined.", true),
            (r"The answer is $\boxed{\text{Not enough information}}$.", true),
            ("The answer is: None", true),
            ("There is insufficient information to compute the total.", true),
            ("Since the number of red cars is not given, it is impossible to determine.", true),
            ("The question doesn’t specify how many cookies Suzanne sold.", true),
            ("Without the price per notebook, the total can't be calculated.", true),
            ("It cannot be determined, since the answer is dependent on the price.", true),
            ("She had 5 apples, but how many she gave away is missing information.", true),
            ("She makes 9 * 2 = $18 every day.\n#### 18", false),
            (r"The average is $\boxed{4.33}$ inches.", false),
            ("so she has 7 apples left", false),
            ("The price is not given directly, but 20 / 4 = 5. The answer is 5.", false),
            ("", false),
        ] {
            assert_eq!(says_insufficient(text), want, "says_insufficient({text:?})");
        }
    }

    #[test]
    fn hostile_input_does_not_panic() {
        let long_nest = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
        let minus = "-".repeat(5000) + "1";
        let huge = "9".repeat(400);
        let odd = [r"\frac", r"\sqrt[", r"\frac{\frac{", r"2^{99999}", "é\\!\\,ü", r"x\in", "(,]", "\\"];
        for text in [long_nest.as_str(), minus.as_str(), huge.as_str()].into_iter().chain(odd) {
            let _ = (normalize(text), extract_answer(text), says_insufficient(text));
            assert!(!is_equiv(text, "7"));
        }
        assert!(is_equiv(&huge, &huge));
    }
}
