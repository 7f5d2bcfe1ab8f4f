//! Tokenizers: rebuilt from GGUF metadata so a single `.gguf` file is enough to score and
//! train, or loaded from Hugging Face `tokenizer.json` files. Either way the result is a plain
//! `tokenizers::Tokenizer`, so encoding (and byte offsets for response masks) behaves exactly
//! like the Hugging Face tokenizer of the same model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::{Error, Result};

/// SentencePiece's word-boundary marker, which stands for a space inside "llama" vocabularies.
const SPIECE_UNDERLINE: &str = "▁";

/// Llama-3's pre-tokenizer regex, verbatim from its `tokenizer.json`.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern differs from Llama-3's only in splitting numbers into single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const SUPPORTED_MODELS: &str = "llama, gpt2";
const SUPPORTED_PRE: &str =
    "smollm, starcoder, refact, codeshell, gpt-2, default, llama-bpe, llama3, qwen2";

/// llama.cpp's `tokenizer.ggml.token_type` values that matter here.
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    /// Whether the model expects BOS in front of raw text; [`Tokenizer::encode`] never adds
    /// it, so callers that feed untemplated text must.
    pub add_bos: bool,
}

impl Tokenizer {
    /// Rebuilds the Hugging Face tokenizer from the GGUF's own vocabulary, so a model file
    /// alone is enough (no hub access, no side files).
    pub fn from_gguf(path: &Path, metadata: &HashMap<String, Value>) -> Result<Self> {
        let meta = Meta { path, metadata };
        let model = meta.string("tokenizer.ggml.model")?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let token_types = match meta.get("tokenizer.ggml.token_type") {
            Some(_) => meta.ints("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if token_types.len() != tokens.len() {
            return Err(Error::mismatch(
                path,
                format!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                    token_types.len(),
                    tokens.len()
                ),
            ));
        }
        let vocab = vocab_map(&tokens);
        let unk = match meta.u32("tokenizer.ggml.unknown_token_id")? {
            Some(id) => Some(meta.token(&tokens, id, "tokenizer.ggml.unknown_token_id")?),
            None => token_types
                .iter()
                .position(|&t| t == TYPE_UNKNOWN)
                .map(|i| tokens[i].to_string()),
        };

        let (mut inner, default_add_bos) = match model {
            "llama" => {
                let scores = meta.floats("tokenizer.ggml.scores")?;
                if scores.len() != tokens.len() {
                    return Err(Error::mismatch(
                        path,
                        format!(
                            "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {}",
                            scores.len(),
                            tokens.len()
                        ),
                    ));
                }
                let add_space_prefix = meta
                    .bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let merges = sentencepiece_merges(&tokens, &scores, &vocab);
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk {
                    builder = builder.unk_token(unk);
                }
                let bpe = builder
                    .build()
                    .map_err(|e| Error::format(path, format!("cannot build the BPE model: {e}")))?;
                (llama_tokenizer(bpe, add_space_prefix)?, true)
            }
            "gpt2" => {
                let merges = meta.strings("tokenizer.ggml.merges")?;
                let merges = split_merges(path, &merges, &vocab)?;
                let pre = meta
                    .optional_string("tokenizer.ggml.pre")?
                    .unwrap_or("default");
                let (pre_tokenizer, ignore_merges) = gpt2_pre_tokenizer(path, pre)?;
                // Llama-3 is the byte-level family that expects BOS; llama.cpp defaults the same.
                let default_add_bos = matches!(pre, "llama-bpe" | "llama3");
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(|e| Error::format(path, format!("cannot build the BPE model: {e}")))?;
                let mut inner = tokenizers::Tokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(pre_tokenizer));
                inner.with_decoder(Some(ByteLevel::default()));
                (inner, default_add_bos)
            }
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "unknown tokenizer.ggml.model `{other}` (supported: {SUPPORTED_MODELS})"
                    ),
                ))
            }
        };

        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter_map(|(token, &kind)| match kind {
                TYPE_UNKNOWN | TYPE_CONTROL => Some(AddedToken::from(*token, true)),
                TYPE_USER_DEFINED => Some(AddedToken::from(*token, false)),
                _ => None,
            })
            .map(|t| t.normalized(false))
            .collect();
        inner.add_tokens(&added);

        Ok(Tokenizer {
            inner,
            bos: meta.special(&tokens, "tokenizer.ggml.bos_token_id")?,
            eos: meta.special(&tokens, "tokenizer.ggml.eos_token_id")?,
            add_bos: meta
                .bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(default_add_bos),
        })
    }

    /// For models that ship `tokenizer.json`; BOS/EOS come from `tokenizer_config.json`
    /// because `tokenizer.json` does not say which of its special tokens play those roles.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
    ) -> Result<Self> {
        let text =
            std::fs::read_to_string(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
            Error::format(tokenizer_json, format!("not a valid tokenizer.json: {e}"))
        })?;
        let config = match tokenizer_config_json {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let json: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
                Some((path, json))
            }
            None => None,
        };
        let special = |key: &str| -> Result<Option<SpecialToken>> {
            let Some((path, json)) = &config else {
                return Ok(None);
            };
            let text = match json.get(key) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s,
                Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                    Some(s) => s,
                    None => {
                        return Err(Error::format(
                            path,
                            format!(
                                "`{key}` should be a string or an object with a string `content`"
                            ),
                        ))
                    }
                },
            };
            let id = inner.token_to_id(text).ok_or_else(|| {
                Error::mismatch(
                    path,
                    format!(
                        "{key} `{text}` is not in the vocabulary of {}",
                        tokenizer_json.display()
                    ),
                )
            })?;
            Ok(Some(SpecialToken {
                id,
                text: text.to_string(),
            }))
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;
        let configured_add_bos = config
            .as_ref()
            .and_then(|(_, json)| json.get("add_bos_token"))
            .and_then(|v| v.as_bool());
        // Without the setting, the tokenizer's own post-processor says whether it inserts BOS.
        let add_bos = match (configured_add_bos, &bos) {
            (Some(add), _) => add,
            (None, Some(bos)) => inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&bos.id))
                .unwrap_or(false),
            (None, None) => false,
        };
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos,
        })
    }

    /// Encodes without adding special tokens: chat templates already place them, and the
    /// special-token strings they emit are still matched as single tokens.
    pub fn encode(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.inner.encode(text, false).map_err(|e| {
            Error::Tokenizer(format!("cannot encode {} bytes of text: {e}", text.len()))
        })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("cannot decode {} ids: {e}", ids.len())))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every token with its id, sorted: two tokenizers with the same vocabulary give the same.
    pub fn vocabulary(&self) -> Vec<(String, u32)> {
        let mut vocab: Vec<(String, u32)> = self.inner.get_vocab(true).into_iter().collect();
        vocab.sort();
        vocab
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// sha256 of the whole tokenizer (vocabulary, merges, normalisation, special tokens):
    /// part of a model's fingerprint, since any of them changes what is scored.
    pub fn digest(&self) -> Result<String> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
        let special = format!("{:?} {:?} {}", self.bos.as_ref().map(|t| t.id), self.eos.as_ref().map(|t| t.id), self.add_bos);
        Ok(crate::util::sha256_bytes(format!("{json}\0{special}").as_bytes()))
    }
}

/// The first occurrence wins when a vocabulary lists a token twice, as in llama.cpp.
fn vocab_map(tokens: &[&str]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(id, token)| (token.to_string(), id as u32))
        .collect()
}

/// The merges Hugging Face's `SentencePieceExtractor` derives for a SentencePiece BPE
/// vocabulary: every split of a piece into two known pieces, ranked by the merged piece's
/// score (highest first), then by the merged, left and right ids. Splitting each piece keeps
/// this linear in the vocabulary size times the piece length.
fn sentencepiece_merges(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // A repeated piece is merged only under its canonical (first) id.
        if vocab.get(*piece) != Some(&(id as u32)) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((scores[id], id as u32, l, r, left, right));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, _, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// GGUF stores merges as "left right"; a byte-level token never contains a raw space, but the
/// split is still chosen so both halves are known tokens.
fn split_merges(path: &Path, merges: &[&str], vocab: &Vocab) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            merge
                .match_indices(' ')
                .map(|(at, _)| (&merge[..at], &merge[at + 1..]))
                .find(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "tokenizer.ggml.merges[{i}] = `{merge}` is not two vocabulary tokens separated by a space"
                        ),
                    )
                })
        })
        .collect()
}

/// Mirrors the normalizer and decoder of Hugging Face's `tokenizer.json` for Llama/Llama-2.
fn llama_tokenizer(bpe: BPE, add_space_prefix: bool) -> Result<tokenizers::Tokenizer> {
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| Error::Tokenizer(format!("replace `{from}`: {e}")))
    };
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPIECE_UNDERLINE.to_string()).into());
    }
    normalizers.push(replace(" ", SPIECE_UNDERLINE)?.into());
    inner.with_normalizer(Some(NormalizerSequence::new(normalizers)));

    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPIECE_UNDERLINE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// The pre-tokenizer Hugging Face uses for the model family that llama.cpp names in
/// `tokenizer.ggml.pre`, and whether its BPE ignores merges for whole-vocabulary words.
fn gpt2_pre_tokenizer(path: &Path, pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex for `{pre}`: {e}")))
    };
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            false,
        ),
        "gpt-2" | "default" => (byte_level(true), false),
        "llama-bpe" | "llama3" => (
            PreTokenizerSequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]).into(),
            true,
        ),
        "qwen2" => (
            PreTokenizerSequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]).into(),
            false,
        ),
        other => {
            return Err(Error::format(
                path,
                format!("unsupported tokenizer.ggml.pre `{other}` (supported: {SUPPORTED_PRE})"),
            ))
        }
    })
}

/// Typed access to GGUF metadata whose errors name the file, the key and the expected type.
struct Meta<'a> {
    path: &'a Path,
    metadata: &'a HashMap<String, Value>,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&'a Value> {
        self.get(key)
            .ok_or_else(|| Error::format(self.path, format!("missing GGUF metadata key `{key}`")))
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::format(
            self.path,
            format!(
                "GGUF metadata `{key}` should be {expected}, found {:?}",
                found.value_type()
            ),
        )
    }

    fn string(&self, key: &str) -> Result<&'a str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.wrong_type(key, "a string", v)),
        }
    }

    fn optional_string(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|_| self.string(key)).transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => integer(v)
                .and_then(|i| u32::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a token id", v)),
        }
    }

    fn array(&self, key: &str) -> Result<&'a [Value]> {
        match self.require(key)? {
            Value::Array(items) => Ok(items),
            v => Err(self.wrong_type(key, "an array", v)),
        }
    }

    fn elements<T>(
        &self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                convert(v).ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), expected, v))
            })
            .collect()
    }

    fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        self.elements(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn floats(&self, key: &str) -> Result<Vec<f32>> {
        self.elements(key, "a float", |v| match v {
            Value::F32(f) => Some(*f),
            Value::F64(f) => Some(*f as f32),
            _ => None,
        })
    }

    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        self.elements(key, "an integer", |v| {
            integer(v).and_then(|i| i32::try_from(i).ok())
        })
    }

    fn token(&self, tokens: &[&str], id: u32, key: &str) -> Result<String> {
        tokens
            .get(id as usize)
            .map(|t| t.to_string())
            .ok_or_else(|| {
                Error::mismatch(
                    self.path,
                    format!(
                        "{key} = {id} is outside the vocabulary of {} tokens",
                        tokens.len()
                    ),
                )
            })
    }

    fn special(&self, tokens: &[&str], key: &str) -> Result<Option<SpecialToken>> {
        self.u32(key)?
            .map(|id| {
                Ok(SpecialToken {
                    id,
                    text: self.token(tokens, id, key)?,
                })
            })
            .transpose()
    }
}

fn integer(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(i) => Some(i.into()),
        Value::I8(i) => Some(i.into()),
        Value::U16(i) => Some(i.into()),
        Value::I16(i) => Some(i.into()),
        Value::U32(i) => Some(i.into()),
        Value::I32(i) => Some(i.into()),
        Value::U64(i) => i64::try_from(i).ok(),
        Value::I64(i) => Some(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use std::path::PathBuf;

    const STORIES: &str = "/work/shared/models/stories260K.gguf";
    const LLAMA2: &str = "/work/shared/models/llama-2-tiny-random.gguf";
    const MIXED: &str = "def f(x):\n    return x**2  # 42 🚀 日本語 Привет";

    fn metadata(path: &Path) -> HashMap<String, Value> {
        let mut file = std::fs::File::open(path).unwrap();
        Content::read(&mut file).unwrap().metadata
    }

    fn load(path: &str) -> Tokenizer {
        let path = Path::new(path);
        Tokenizer::from_gguf(path, &metadata(path)).unwrap()
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text).unwrap().get_ids().to_vec()
    }

    fn round_trip(tok: &Tokenizer, text: &str) {
        let encoding = tok.encode(text).unwrap();
        assert_eq!(tok.decode(encoding.get_ids()).unwrap(), text);
    }

    #[test]
    fn stories260k_round_trips_and_knows_its_specials() {
        let tok = load(STORIES);
        assert_eq!(tok.vocab_size(), 512);
        let bos = tok.bos.clone().unwrap();
        assert_eq!((bos.id, bos.text.as_str()), (1, "<s>"));
        assert_eq!(tok.eos.as_ref().map(|t| t.text.as_str()), Some("</s>"));
        assert!(tok.add_bos);

        let text = "Once upon a time, there was a little girl named Lily.";
        let encoded = ids(&tok, text);
        assert!(
            encoded.len() < text.len(),
            "merges should apply: {encoded:?}"
        );
        round_trip(&tok, text);
        assert_eq!(ids(&tok, "<s>"), vec![1]);
        assert_eq!(ids(&tok, "<s>Once")[0], 1);
    }

    #[test]
    fn llama2_matches_reference_ids() {
        let tok = load(LLAMA2);
        assert_eq!(tok.vocab_size(), 32000);
        assert_eq!(ids(&tok, "Hello world"), vec![15043, 3186]);
        assert_eq!(ids(&tok, "\n"), vec![29871, 13]);
        assert_eq!(tok.id_of("</s>"), Some(2));
        round_trip(&tok, MIXED);

        // Offsets are byte positions in the original text, as response masks need.
        let encoding = tok.encode("Hello world").unwrap();
        assert_eq!(encoding.get_offsets(), &[(0, 5), (5, 11)]);
    }

    #[test]
    fn smollm2_when_available() {
        let Some(path) = std::env::var_os("HARNESS_TEST_SMOLLM2_GGUF").map(PathBuf::from) else {
            eprintln!("skipped: HARNESS_TEST_SMOLLM2_GGUF is not set");
            return;
        };
        if !path.is_file() {
            eprintln!("skipped: {} does not exist", path.display());
            return;
        }
        let tok = Tokenizer::from_gguf(&path, &metadata(&path)).unwrap();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.id_of("<|endoftext|>"), Some(0));
        assert_eq!(tok.id_of("<|im_start|>"), Some(1));
        assert_eq!(tok.id_of("<|im_end|>"), Some(2));
        assert_eq!(tok.eos.as_ref().map(|t| t.id), Some(2));
        assert!(!tok.add_bos);
        round_trip(&tok, MIXED);
        let user = ids(&tok, "<|im_start|>user");
        assert_eq!(user[0], 1);
        assert_eq!(user.len(), 2);
        assert_eq!(ids(&tok, "<|im_end|>\n")[0], 2);
        assert_eq!(ids(&tok, "2024").len(), 4);
    }

    /// A byte-level vocabulary just big enough to exercise the "gpt2" path without a file.
    fn tiny_gpt2(pre: &str) -> HashMap<String, Value> {
        let tokens = ["<|end|>", "a", "b", "ab", "Ġ", "Ġab", "1", "2"];
        let types = [3, 1, 1, 1, 1, 1, 1, 1];
        let strings =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(&tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                strings(&["a b", "Ġ ab"]),
            ),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0)),
        ])
    }

    #[test]
    fn every_supported_pre_tokenizer_builds() {
        for pre in SUPPORTED_PRE.split(", ") {
            let tok = Tokenizer::from_gguf(Path::new("tiny.gguf"), &tiny_gpt2(pre)).unwrap();
            assert_eq!(ids(&tok, "ab ab<|end|>"), vec![3, 5, 0], "pre = {pre}");
            assert_eq!(tok.decode(&[3, 5, 0]).unwrap(), "ab ab<|end|>");
        }
        let digits = Tokenizer::from_gguf(Path::new("tiny.gguf"), &tiny_gpt2("smollm")).unwrap();
        assert_eq!(ids(&digits, "12"), vec![6, 7]);
    }

    #[test]
    fn sentencepiece_merges_follow_scores_then_ids() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = sentencepiece_merges(&tokens, &scores, &vocab_map(&tokens));
        let pair = |l: &str, r: &str| (l.to_string(), r.to_string());
        assert_eq!(
            merges,
            vec![
                pair("b", "c"),
                pair("a", "b"),
                pair("a", "bc"),
                pair("ab", "c")
            ]
        );
    }

    #[test]
    fn hf_files_resolve_bos_and_eos() {
        let tok = load(STORIES);
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        let config = dir.path().join("tokenizer_config.json");
        tok.inner.save(&json, false).unwrap();
        std::fs::write(
            &config,
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}, "add_bos_token": true}"#,
        )
        .unwrap();
        let hf = Tokenizer::from_hf_files(&json, Some(&config)).unwrap();
        assert_eq!(hf.bos, tok.bos);
        assert_eq!(hf.eos, tok.eos);
        assert!(hf.add_bos);
        let text = "Once upon a time";
        assert_eq!(ids(&hf, text), ids(&tok, text));

        std::fs::write(&config, r#"{"eos_token": "<|nope|>"}"#).unwrap();
        let err = Tokenizer::from_hf_files(&json, Some(&config))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("<|nope|>"),
            "{err}"
        );

        let plain = Tokenizer::from_hf_files(&json, None).unwrap();
        assert_eq!((plain.bos, plain.eos), (None, None));
    }

    fn error_for(metadata: &HashMap<String, Value>) -> String {
        Tokenizer::from_gguf(Path::new("bad.gguf"), metadata)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_metadata_gives_clear_errors() {
        let stories = metadata(Path::new(STORIES));

        let mut missing = stories.clone();
        missing.remove("tokenizer.ggml.tokens");
        let err = error_for(&missing);
        assert!(
            err.starts_with("bad.gguf: ") && err.contains("`tokenizer.ggml.tokens`"),
            "{err}"
        );

        let mut unknown = stories.clone();
        unknown.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        let err = error_for(&unknown);
        assert!(
            err.contains("`bert`") && err.contains("llama, gpt2"),
            "{err}"
        );

        let mut short = stories.clone();
        short.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0); 3]),
        );
        let err = error_for(&short);
        assert!(
            err.contains("scores has 3 entries") && err.contains("512"),
            "{err}"
        );

        let mut wrong = stories.clone();
        wrong.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(9999));
        let err = error_for(&wrong);
        assert!(err.contains("bos_token_id = 9999"), "{err}");

        let mut typed = stories;
        typed.insert("tokenizer.ggml.model".into(), Value::U32(1));
        let err = error_for(&typed);
        assert!(
            err.contains("`tokenizer.ggml.model` should be a string"),
            "{err}"
        );

        let err = error_for(&tiny_gpt2("falcon"));
        assert!(err.contains("`falcon`") && err.contains("qwen2"), "{err}");

        let mut merges = tiny_gpt2("gpt-2");
        merges.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("a z".into())]),
        );
        let err = error_for(&merges);
        assert!(err.contains("tokenizer.ggml.merges[0] = `a z`"), "{err}");
    }
}
