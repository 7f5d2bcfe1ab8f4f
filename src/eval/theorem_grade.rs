//! TheoremQA's answers, graded by their type as Eurus grades them (OpenBMB/Eurus
//! `eval/Math/theorem_qa/util.py`, after MINT): the text after the last `=` or `≈`, without
//! `$`, `°` and "approximately", cut at " or "; yes/true and no/false for booleans; `(a)`..`(d)`
//! for options; numbers within 4% of a float answer and equal after rounding to an integer
//! one; lists of the same length compared element-wise after sorting.

use super::math_grade;
use serde_json::Value;

pub const ANSWER_TYPES: [&str; 6] = ["integer", "float", "bool", "option", "list of integer", "list of float"];

/// Whether `predicted` (an extracted final answer) is `reference`, of type `answer_type`.
pub fn is_correct(predicted: &str, reference: &Value, answer_type: &str) -> bool {
    let p = clean(predicted);
    match (answer_type, reference) {
        ("bool", Value::Bool(r)) => as_bool(&p) == Some(*r),
        ("option", Value::String(r)) => as_option(&p).is_some_and(|o| as_option(r) == Some(o)),
        ("integer", r) => r.as_f64().zip(number(&p)).is_some_and(|(r, p)| close(p, r, true)),
        ("float", r) => r.as_f64().zip(number(&p)).is_some_and(|(r, p)| close(p, r, false)),
        ("list of integer" | "list of float", Value::Array(r)) => {
            let integer = answer_type == "list of integer";
            let (Some(mut r), Some(mut p)) = (r.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>(), list(&p)) else {
                return false;
            };
            r.sort_by(f64::total_cmp);
            p.sort_by(f64::total_cmp);
            r.len() == p.len() && p.iter().zip(&r).all(|(&p, &r)| close(p, r, integer))
        }
        _ => false,
    }
}

fn close(p: f64, r: f64, integer: bool) -> bool {
    if integer {
        // Python's round, as Eurus's grader uses: halves go to the even neighbour.
        p.round_ties_even() == r
    } else {
        (p - r).abs() <= 0.04 * r.abs()
    }
}

fn clean(answer: &str) -> String {
    let boxed = math_grade::last_boxed(answer).unwrap_or_else(|| answer.to_string());
    let after = boxed.rsplit(['=', '≈']).next().unwrap_or_default();
    let mut s = after.replace(['$', '`', '°'], "").replace("approximately", "");
    if let Some((first, _)) = s.split_once(" or ") {
        s = first.to_string();
    }
    s.trim().trim_end_matches('.').trim().to_string()
}

fn as_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().trim_matches(|c: char| !c.is_ascii_alphabetic()) {
        "true" | "yes" => Some(true),
        "false" | "no" => Some(false),
        _ => None,
    }
}

/// `(a)`, `a)`, `(A)` or a lone `a` -> 'a'.
fn as_option(s: &str) -> Option<char> {
    let inner = s.trim().trim_start_matches('(').trim_end_matches(')').trim();
    let mut chars = inner.chars();
    let letter = chars.next()?.to_ascii_lowercase();
    (chars.next().is_none() && ('a'..='d').contains(&letter)).then_some(letter)
}

fn number(s: &str) -> Option<f64> {
    // `3 x 10^5` and `3 × 10^5` as Eurus rewrites them.
    let s = s.replace(" x ", " \\times ").replace('×', "\\times ");
    math_grade::numeric_value(&s)
}

/// `[1, 2]`, `(1, 2)` or `1, 2`.
fn list(s: &str) -> Option<Vec<f64>> {
    let inner = s.trim().trim_start_matches(['[', '(']).trim_end_matches([']', ')']);
    inner.split(',').map(|x| number(x.trim())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_by_type() {
        let cases: &[(&str, Value, &str, bool)] = &[
            ("True", json!(true), "bool", true),
            ("yes", json!(true), "bool", true),
            ("False", json!(true), "bool", false),
            ("(c)", json!("(c)"), "option", true),
            ("c", json!("(c)"), "option", true),
            ("(b)", json!("(c)"), "option", false),
            ("11760", json!(11760), "integer", true),
            ("11760.2", json!(11760), "integer", true),
            ("11761", json!(11760), "integer", false),
            ("-0.5", json!(-1), "integer", false),
            ("2.5", json!(2), "integer", true),
            ("x = 5", json!(5), "integer", true),
            ("1.40", json!(1.42), "float", true),
            ("1.5", json!(1.42), "float", false),
            ("\\frac{1}{3}", json!(0.333), "float", true),
            ("3.2e-2", json!(0.032), "float", true),
            ("approximately $0.955$", json!(0.955), "float", true),
            ("[4, 1, 2, 0]", json!([4, 1, 2, 0]), "list of integer", true),
            ("[0, 1, 2, 4]", json!([4, 1, 2, 0]), "list of integer", true),
            ("[4, 1, 2]", json!([4, 1, 2, 0]), "list of integer", false),
            ("(0.33, 0.25)", json!([0.333, 0.25]), "list of float", true),
            ("nonsense", json!(3), "integer", false),
        ];
        for (predicted, reference, kind, expected) in cases {
            assert_eq!(is_correct(predicted, reference, kind), *expected, "{predicted} vs {reference} ({kind})");
        }
    }
}
