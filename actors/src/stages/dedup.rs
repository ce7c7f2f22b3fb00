//! Document deduplication per language lane (`[dedup]`, `docs/DEDUP.md`).
//!
//! EUR-Lex publishes the same text many times: an act in the Official Journal and again in every consolidated
//! version, the same act body as a stand-alone file and inside a combined publication (the real corpus holds the AI
//! Act's English body and annexes twice). Training on both spends tokens on repeats and, when one copy is held out,
//! contaminates the held-out loss. This stage drops such documents before they are tokenized:
//!
//! * `exact`: a 128-bit hash of the document's text;
//! * `near`: also MinHash over lower-cased word n-grams with LSH banding — the arithmetic of `datasketch.MinHash`
//!   (`(a·h + b) mod (2^61 − 1)`, low 32 bits; `h` = low 32 bits of xxh3-64 of the n-gram), so `datasketch` can check
//!   it (`scripts/dedup_ref.py`). Instruction pairs (Q&A `.jsonl`) get the exact check only: pairs of one template
//!   share most of their n-grams without being repeats.
//!
//! **Decision rule** (what makes it deterministic and resumable): a document is a duplicate when one of its keys
//! (the exact hash, or one of the band hashes) was first seen on a *kept* document at an earlier position of the
//! same lane — position = (file index in the lane's sorted list, ordinal in the file) — or on a held-out document
//! (`against_heldout`). The index maps each key to that first position. The decision depends only on the lane's
//! order, never on thread timing; a later epoch (`sampler.on_exhausted = "cycle"`) makes the same decisions as the
//! first (positions are taken modulo the lane length); and a checkpoint stores the entries before its resume point
//! (`dedup.bin`), which is all a resumed or replayed run needs to decide exactly as the uninterrupted run did.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64};

pub use crate::types::Signature;
use crate::types::{Document, LanePosition};

/// The dedup state inside a checkpoint directory.
pub const STATE_FILE: &str = "dedup.bin";
/// One JSON line per dropped document, in `run.dir`.
pub const LOG_FILE: &str = "dedup.jsonl";

const MERSENNE: u64 = (1 << 61) - 1;
const MAX_HASH: u64 = (1 << 32) - 1;
const MAGIC: &[u8; 8] = b"LXDEDUP1";
/// `Pos::file` of held-out documents (`ordinal` = their index in [`DedupIndex::held_paths`]).
const HELD: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// Every document is trained on.
    #[default]
    Off,
    /// Drop documents whose text equals an earlier kept one's.
    Exact,
    /// Also drop near-duplicates (MinHash LSH over word n-grams).
    Near,
}

/// `[dedup]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    #[serde(default)]
    pub mode: DedupMode,
    /// Words per n-gram (shingle).
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// LSH bands × rows per band = MinHash permutations. 14 × 8 flags pairs from a Jaccard similarity of about
    /// (1/14)^(1/8) ≈ 0.72 of their n-gram sets (50% chance there), almost surely above 0.85.
    #[serde(default = "default_bands")]
    pub bands: usize,
    #[serde(default = "default_rows")]
    pub rows: usize,
    /// Near mode: documents sharing an LSH band are duplicates only when their estimated Jaccard similarity (share
    /// of equal MinHash values) is at least this. Parallel acts (the three European Supervisory Authorities'
    /// founding regulations: 0.72–0.84) are different law; copies and successive versions of one act are not.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Seed of the MinHash permutations (not `run.seed`: changing the run's seed must not change what is dropped).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Also drop training documents that duplicate a held-out document (`eval.holdout`, FORMEX `eval.paths`).
    #[serde(default = "default_true")]
    pub against_heldout: bool,
}

fn default_ngram() -> usize {
    5
}
fn default_bands() -> usize {
    14
}
fn default_rows() -> usize {
    8
}
fn default_seed() -> u64 {
    42
}
fn default_threshold() -> f64 {
    0.9
}
fn default_true() -> bool {
    true
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            mode: DedupMode::Off,
            ngram: default_ngram(),
            bands: default_bands(),
            rows: default_rows(),
            threshold: default_threshold(),
            seed: default_seed(),
            against_heldout: true,
        }
    }
}

impl DedupConfig {
    pub fn enabled(&self) -> bool {
        self.mode != DedupMode::Off
    }

    /// Config errors as `(key, message)`.
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut e = Vec::new();
        if self.ngram == 0 || self.ngram > 64 {
            e.push(("dedup.ngram", "must be in [1, 64] words".to_string()));
        }
        if self.bands == 0 || self.rows == 0 || self.bands * self.rows > 1024 {
            e.push((
                "dedup.bands",
                format!(
                    "bands × rows = {} × {} must be between 1 and 1024 permutations",
                    self.bands, self.rows
                ),
            ));
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0 && self.threshold <= 1.0) {
            e.push((
                "dedup.threshold",
                format!(
                    "{} must be in (0, 1] (an estimated Jaccard similarity)",
                    self.threshold
                ),
            ));
        }
        e
    }
}

/// MinHash with `datasketch`'s arithmetic and our own shingling (lower-cased text, split on Unicode white space,
/// `ngram` consecutive words joined by one space; a document with fewer words is one shingle).
#[derive(Debug, Clone)]
pub struct MinHasher {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
    /// Low and high 32 bits of `a`.
    a_lo: Vec<u32>,
    a_hi: Vec<u32>,
    pub ngram: usize,
    pub bands: usize,
    pub rows: usize,
    near: bool,
}

impl MinHasher {
    pub fn new(cfg: &DedupConfig) -> Self {
        let k = cfg.bands * cfg.rows;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut a = Vec::with_capacity(k);
        let mut b = Vec::with_capacity(k);
        for _ in 0..k {
            a.push(rng.gen_range(1..MERSENNE));
            b.push(rng.gen_range(0..MERSENNE));
        }
        MinHasher {
            a_lo: a.iter().map(|a| *a as u32).collect(),
            a_hi: a.iter().map(|a| (*a >> 32) as u32).collect(),
            a,
            b,
            ngram: cfg.ngram,
            bands: cfg.bands,
            rows: cfg.rows,
            near: cfg.mode == DedupMode::Near,
        }
    }

    /// The `bands × rows` MinHash values of `text` (None: no words).
    pub fn minhash(&self, text: &str) -> Option<Vec<u32>> {
        // The words, lower-cased and joined by single spaces into one buffer: every n-gram is then a slice of it.
        let lower = text.to_lowercase();
        let mut joined = String::with_capacity(lower.len());
        let mut bounds: Vec<(usize, usize)> = Vec::new();
        for w in lower.split_whitespace() {
            if !joined.is_empty() {
                joined.push(' ');
            }
            bounds.push((joined.len(), joined.len() + w.len()));
            joined.push_str(w);
        }
        if bounds.is_empty() {
            return None;
        }
        let n = self.ngram.min(bounds.len());
        // MinHash is over the *set* of n-grams: hash each once, drop repeats (legal text repeats many phrases).
        let mut hashes: Vec<u32> = (0..=bounds.len() - n)
            .map(|i| xxh3_64(&joined.as_bytes()[bounds[i].0..bounds[i + n - 1].1]) as u32)
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        let mut mins = vec![MAX_HASH as u32; self.a.len()];
        permute(&mut mins, &self.a_lo, &self.a_hi, &self.b, &hashes);
        Some(mins)
    }

    /// The keys of a document. Near-duplicate bands only for ordinary documents, not instruction pairs.
    pub fn signature(&self, doc: &Document) -> Signature {
        let exact = xxh3_128_with_seed(doc.text.as_bytes(), 0);
        let minhash = match (self.near, doc.answer_start) {
            (true, None) => self.minhash(&doc.text),
            _ => None,
        };
        Signature {
            exact,
            bands: minhash
                .as_deref()
                .map(|m| self.band_keys(m))
                .unwrap_or_default(),
            minhash: minhash.map(Vec::into_boxed_slice),
        }
    }

    fn band_keys(&self, mins: &[u32]) -> Vec<u128> {
        mins.chunks(self.rows)
            .enumerate()
            .map(|(i, band)| {
                let bytes: Vec<u8> = band.iter().flat_map(|v| v.to_le_bytes()).collect();
                xxh3_128_with_seed(&bytes, 1 + i as u64)
            })
            .collect()
    }
}

/// Folds the n-gram hashes into the MinHash values, with AVX2 where the CPU has it (the same arithmetic; the portable
/// build targets SSE2, which has no vector 64-bit compare or 32-bit min).
fn permute(mins: &mut [u32], lo: &[u32], hi: &[u32], b: &[u64], hashes: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { permute_avx2(mins, lo, hi, b, hashes) };
        return;
    }
    permute_portable(mins, lo, hi, b, hashes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn permute_avx2(mins: &mut [u32], lo: &[u32], hi: &[u32], b: &[u64], hashes: &[u32]) {
    permute_portable(mins, lo, hi, b, hashes)
}

#[inline(always)]
fn permute_portable(mins: &mut [u32], lo: &[u32], hi: &[u32], b: &[u64], hashes: &[u32]) {
    let k = mins.len();
    let (lo, hi, b) = (&lo[..k], &hi[..k], &b[..k]);
    for &h in hashes {
        let hv = h as u64;
        for j in 0..k {
            // datasketch: (a·hv + b) mod (2^61 − 1) in wrapping u64 arithmetic, then the low 32 bits. hv < 2^32, so
            // a·hv = lo·hv + (hi·hv << 32): two 32×32→64 products, which vector units multiply.
            let ahv = (lo[j] as u64 * hv).wrapping_add((hi[j] as u64 * hv) << 32);
            let p = (mod_mersenne(ahv.wrapping_add(b[j])) & MAX_HASH) as u32;
            mins[j] = mins[j].min(p);
        }
    }
}

/// `x mod (2^61 − 1)` without a division (branch-free, so the permutation loop vectorizes).
#[inline(always)]
fn mod_mersenne(x: u64) -> u64 {
    let r = (x & MERSENNE) + (x >> 61);
    r - MERSENNE * u64::from(r >= MERSENNE)
}

/// Where a key was first seen: a lane position (first epoch), or a held-out document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub file: u32,
    pub ordinal: u32,
}

impl Pos {
    pub fn held(&self) -> bool {
        self.file == HELD
    }
}

/// What the stage decided for one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Same text as the document at `Pos`.
    Exact(Pos),
    /// Shares an LSH band with the document at `Pos`.
    Near(Pos),
}

impl Verdict {
    /// The metric / report label: `kept`, `exact`, `near`, `heldout` (a duplicate of a held-out document).
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Keep => "kept",
            Verdict::Exact(p) | Verdict::Near(p) if p.held() => "heldout",
            Verdict::Exact(_) => "exact",
            Verdict::Near(_) => "near",
        }
    }
}

/// Counts of one lane (this process's part of the stream).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LaneReport {
    pub documents: u64,
    pub kept: u64,
    pub exact: u64,
    pub near: u64,
    /// Duplicates of held-out documents (exact or near).
    pub heldout: u64,
    pub bytes_dropped: u64,
}

/// `stats.json` → `dedup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DedupReport {
    pub mode: Option<DedupMode>,
    /// Keys in the index per language at the end (memory: ~40 bytes each).
    pub index_keys: std::collections::BTreeMap<String, u64>,
    pub held_out_documents: u64,
    pub per_lang: std::collections::BTreeMap<String, LaneReport>,
}

#[derive(Debug, Default)]
struct LaneIndex {
    /// Key → the first kept (or held-out) document that has it.
    map: HashMap<u128, Pos>,
    /// Band key → the other kept documents that have it (similar below the threshold: rare).
    more: HashMap<u128, Vec<Pos>>,
    /// MinHash values of kept and held-out documents (near mode), for the similarity check.
    minhashes: HashMap<Pos, Box<[u32]>>,
    report: LaneReport,
}

/// A key blocks a document at `at` when it was first seen earlier in the lane, or on a held-out document.
fn blocks(first: Pos, at: Pos) -> bool {
    first.held() || first < at
}

/// Share of equal MinHash values: datasketch's `MinHash.jaccard`.
pub fn similarity(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

impl LaneIndex {
    fn decide(&mut self, at: Pos, sig: &Signature, threshold: f64) -> Verdict {
        if let Some(p) = self.map.get(&sig.exact).copied().filter(|p| blocks(*p, at)) {
            return Verdict::Exact(p);
        }
        if let Some(mine) = &sig.minhash {
            // Every earlier kept (or held-out) document sharing a band, in position order; the first similar enough.
            let mut cands: Vec<Pos> = sig
                .bands
                .iter()
                .flat_map(|k| {
                    self.map
                        .get(k)
                        .into_iter()
                        .chain(self.more.get(k).into_iter().flatten())
                })
                .copied()
                .filter(|p| blocks(*p, at))
                .collect();
            cands.sort_unstable_by_key(|p| (!p.held(), *p));
            cands.dedup();
            for p in cands {
                if self
                    .minhashes
                    .get(&p)
                    .is_some_and(|theirs| similarity(mine, theirs) >= threshold)
                {
                    return Verdict::Near(p);
                }
            }
        }
        self.insert(at, sig);
        Verdict::Keep
    }

    /// Kept: its keys lead here (a later epoch finds itself among them, which does not block).
    fn insert(&mut self, at: Pos, sig: &Signature) {
        self.map.entry(sig.exact).or_insert(at);
        for k in &sig.bands {
            match self.map.entry(*k) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(at);
                }
                std::collections::hash_map::Entry::Occupied(e) if *e.get() != at => {
                    let v = self.more.entry(*k).or_default();
                    if !v.contains(&at) {
                        v.push(at);
                    }
                }
                _ => {}
            }
        }
        if let Some(m) = &sig.minhash {
            self.minhashes.entry(at).or_insert_with(|| m.clone());
        }
    }
}

/// The index of every lane, shared by the lanes' dedup actors and the checkpoint writer.
#[derive(Debug)]
pub struct DedupIndex {
    pub cfg: DedupConfig,
    pub hasher: MinHasher,
    lanes: Vec<Mutex<LaneIndex>>,
    /// Lane lengths (files), for positions modulo an epoch.
    lane_files: Vec<u32>,
    held_paths: Vec<String>,
}

/// One line of `dedup.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DropRecord {
    pub lang: String,
    /// File index in the lane (counting on across epochs) and ordinal of the dropped document.
    pub file: u32,
    pub ordinal: u32,
    pub path: String,
    pub verdict: String,
    /// The kept (or held-out) document it repeats: path and ordinal in that file (absent for a kept document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of_ordinal: Option<u32>,
    pub bytes: u64,
}

impl DedupIndex {
    pub fn new(cfg: &DedupConfig, lane_files: Vec<u32>) -> Self {
        DedupIndex {
            cfg: cfg.clone(),
            hasher: MinHasher::new(cfg),
            lanes: lane_files
                .iter()
                .map(|_| Mutex::new(LaneIndex::default()))
                .collect(),
            lane_files,
            held_paths: Vec::new(),
        }
    }

    /// Registers a held-out document of lane `lane` (before any lane runs).
    pub fn add_held_out(&mut self, lane: usize, doc: &Document) {
        if doc.text.is_empty() {
            return;
        }
        let sig = self.hasher.signature(doc);
        let at = Pos {
            file: HELD,
            ordinal: self.held_paths.len() as u32,
        };
        self.held_paths.push(doc.path.clone());
        self.lanes[lane]
            .lock()
            .expect("dedup lane lock")
            .insert(at, &sig);
    }

    pub fn held_out_documents(&self) -> usize {
        self.held_paths.len()
    }

    /// Decides for the document at (`file`, `ordinal`) of `lane` (`file` counts on across epochs).
    pub fn decide(&self, lane: usize, file: u32, ordinal: u32, sig: &Signature) -> Verdict {
        let n = self.lane_files[lane].max(1);
        let at = Pos {
            file: file % n,
            ordinal,
        };
        let mut l = self.lanes[lane].lock().expect("dedup lane lock");
        let v = l.decide(at, sig, self.cfg.threshold);
        l.report.documents += 1;
        match v.label() {
            "kept" => l.report.kept += 1,
            "exact" => l.report.exact += 1,
            "near" => l.report.near += 1,
            _ => l.report.heldout += 1,
        }
        v
    }

    /// [`Self::decide`] with its bookkeeping, as the `dedup.<lang>` actor and `lexflow dedup` both need it: a dropped
    /// document's bytes are counted, and the record names the document it repeats (`lane_paths`: the lane's sorted
    /// files). For a kept document the record has verdict `kept` and no `of_path`.
    #[allow(clippy::too_many_arguments)]
    pub fn judge(
        &self,
        lane: usize,
        lang: &str,
        file: u32,
        ordinal: u32,
        doc: &Document,
        sig: &Signature,
        lane_paths: &[PathBuf],
    ) -> (Verdict, DropRecord) {
        let v = self.decide(lane, file, ordinal, sig);
        let bytes = doc.text.len() as u64;
        let (of_path, of_ordinal) = match v {
            Verdict::Keep => (None, None),
            Verdict::Exact(p) | Verdict::Near(p) => {
                self.count_dropped_bytes(lane, bytes);
                let (path, ordinal) = self.describe(p, lane_paths);
                (Some(path), Some(ordinal))
            }
        };
        let rec = DropRecord {
            lang: lang.to_string(),
            file,
            ordinal,
            path: doc.path.clone(),
            verdict: v.label().to_string(),
            of_path,
            of_ordinal,
            bytes,
        };
        (v, rec)
    }

    fn count_dropped_bytes(&self, lane: usize, bytes: u64) {
        self.lanes[lane]
            .lock()
            .expect("dedup lane lock")
            .report
            .bytes_dropped += bytes;
    }

    /// Path and ordinal of the document a duplicate repeats (`lane_paths`: the lane's sorted files).
    fn describe(&self, of: Pos, lane_paths: &[PathBuf]) -> (String, u32) {
        if of.held() {
            let p = self
                .held_paths
                .get(of.ordinal as usize)
                .cloned()
                .unwrap_or_default();
            return (p, 0);
        }
        let p = lane_paths
            .get(of.file as usize)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        (p, of.ordinal)
    }

    pub fn report(&self, langs: &[String]) -> DedupReport {
        let mut r = DedupReport {
            mode: Some(self.cfg.mode),
            held_out_documents: self.held_paths.len() as u64,
            ..Default::default()
        };
        for (lang, l) in langs.iter().zip(&self.lanes) {
            let l = l.lock().expect("dedup lane lock");
            r.per_lang.insert(lang.clone(), l.report.clone());
            r.index_keys.insert(lang.clone(), l.map.len() as u64);
        }
        r
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.cfg.mode,
            "ngram": self.cfg.ngram,
            "bands": self.cfg.bands,
            "rows": self.cfg.rows,
            "threshold": self.cfg.threshold,
            "seed": self.cfg.seed,
            "lanes": self.lane_files,
        })
    }

    /// Writes the entries a run resumed at `lanes` needs: per lane, the keys and MinHash values of documents before
    /// its position (all of them once the lane is past its first epoch). Held-out entries are rebuilt from the
    /// config, not stored. Sorted, so the bytes depend only on the position.
    pub fn write_snapshot(&self, lanes: &[LanePosition], path: &Path) -> std::io::Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        let header = serde_json::to_vec(&self.params()).expect("params are JSON");
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        let k = self.cfg.bands * self.cfg.rows;
        for (i, l) in self.lanes.iter().enumerate() {
            let end = lanes.get(i).copied().unwrap_or_default();
            let end = Pos {
                file: end.file,
                ordinal: end.ordinal,
            };
            let before = |p: &Pos| !p.held() && *p < end;
            let g = l.lock().expect("dedup lane lock");
            let mut keys: Vec<(u128, Pos)> = g
                .map
                .iter()
                .map(|(k, p)| (*k, *p))
                .chain(
                    g.more
                        .iter()
                        .flat_map(|(k, v)| v.iter().map(move |p| (*k, *p))),
                )
                .filter(|(_, p)| before(p))
                .collect();
            keys.sort_unstable();
            let mut mins: Vec<(Pos, &[u32])> = g
                .minhashes
                .iter()
                .filter(|(p, m)| before(p) && m.len() == k)
                .map(|(p, m)| (*p, &m[..]))
                .collect();
            mins.sort_unstable();
            out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
            for (key, p) in keys {
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&p.file.to_le_bytes());
                out.extend_from_slice(&p.ordinal.to_le_bytes());
            }
            out.extend_from_slice(&(mins.len() as u64).to_le_bytes());
            for (p, m) in mins {
                out.extend_from_slice(&p.file.to_le_bytes());
                out.extend_from_slice(&p.ordinal.to_le_bytes());
                for v in m {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let mut f = std::fs::File::create(path)?;
        f.write_all(&out)?;
        f.sync_all()
    }

    /// Loads a checkpoint's entries (before any lane runs). Refuses a snapshot taken with other `[dedup]` settings
    /// or another lane layout: its decisions would not be this config's.
    pub fn restore(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        let bad = |why: &str| anyhow::anyhow!("{}: {why}", path.display());
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(bad("not a lexflow dedup state (bad magic)"));
        }
        let hlen = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let header: serde_json::Value = bytes
            .get(12..12usize.saturating_add(hlen))
            .ok_or_else(|| bad("truncated header"))
            .and_then(|h| serde_json::from_slice(h).map_err(|e| bad(&e.to_string())))?;
        let now = self.params();
        for key in [
            "mode",
            "ngram",
            "bands",
            "rows",
            "threshold",
            "seed",
            "lanes",
        ] {
            if header.get(key) != now.get(key) {
                anyhow::bail!(
                    "{}: the checkpoint was deduplicated with {key} = {} but the config now says {} \
                     (dedup.{key}; `lanes` = files per language lane): resume and replay need the same [dedup] and inputs",
                    path.display(),
                    header.get(key).cloned().unwrap_or_default(),
                    now.get(key).cloned().unwrap_or_default()
                );
            }
        }
        let k = self.cfg.bands * self.cfg.rows;
        let mut at = 12usize.saturating_add(hlen);
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            let end = at.checked_add(n).ok_or_else(|| bad("corrupt count"))?;
            let b = bytes.get(at..end).ok_or_else(|| bad("truncated"))?;
            at = end;
            Ok(b)
        };
        let u32_at =
            |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        for l in &self.lanes {
            let mut g = l.lock().expect("dedup lane lock");
            let n = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
            for e in take(n.checked_mul(24).ok_or_else(|| bad("corrupt count"))?)?.chunks_exact(24)
            {
                let key = u128::from_le_bytes(e[..16].try_into().expect("16 bytes"));
                let p = Pos {
                    file: u32_at(e, 16),
                    ordinal: u32_at(e, 20),
                };
                // Sorted by (key, position): the first of a key is its first document.
                match g.map.entry(key) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(p);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {
                        g.more.entry(key).or_default().push(p)
                    }
                }
            }
            let n = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
            let rec = 8 + 4 * k;
            for e in
                take(n.checked_mul(rec).ok_or_else(|| bad("corrupt count"))?)?.chunks_exact(rec)
            {
                let p = Pos {
                    file: u32_at(e, 0),
                    ordinal: u32_at(e, 4),
                };
                let m: Box<[u32]> = (0..k).map(|j| u32_at(e, 8 + 4 * j)).collect();
                g.minhashes.insert(p, m);
            }
        }
        if at != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        Document {
            text: text.to_string(),
            ..Default::default()
        }
    }

    fn near_cfg() -> DedupConfig {
        DedupConfig {
            mode: DedupMode::Near,
            ..Default::default()
        }
    }

    fn words(n: usize, salt: &str) -> String {
        (0..n)
            .map(|i| format!("w{salt}{}", i * 7919 % 10007))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Exact Jaccard similarity of two texts' shingle sets, the quantity MinHash estimates.
    fn jaccard(h: &MinHasher, x: &str, y: &str) -> f64 {
        let sh = |t: &str| -> std::collections::HashSet<String> {
            let l = t.to_lowercase();
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(h.ngram.min(w.len()))
                .map(|s| s.join(" "))
                .collect()
        };
        let (a, b) = (sh(x), sh(y));
        a.intersection(&b).count() as f64 / a.union(&b).count() as f64
    }

    #[test]
    fn minhash_agreement_estimates_jaccard_similarity() {
        let h = MinHasher::new(&DedupConfig {
            bands: 32,
            rows: 16,
            ..near_cfg()
        });
        let base = words(2000, "a");
        // Replace a growing tail: similarity falls, and the share of equal MinHash values tracks it.
        for cut in [100, 500, 1000, 1600] {
            let other = format!(
                "{} {}",
                base.split(' ')
                    .take(2000 - cut)
                    .collect::<Vec<_>>()
                    .join(" "),
                words(cut, "b")
            );
            let j = jaccard(&h, &base, &other);
            let (x, y) = (h.minhash(&base).unwrap(), h.minhash(&other).unwrap());
            let agree = x.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / x.len() as f64;
            // 512 permutations: standard error sqrt(j(1-j)/512) <= 0.022; allow 4 of them.
            assert!(
                (agree - j).abs() < 0.09,
                "cut {cut}: jaccard {j}, minhash {agree}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// A damaged `dedup.bin` (bytes flipped, cut, extended) is an error or a valid index, never a panic.
        #[test]
        fn damaged_snapshots_never_panic(
            cut in 0usize..4000,
            flips in proptest::collection::vec((0usize..4000, proptest::prelude::any::<u8>()), 0..6),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let cfg = near_cfg();
            let idx = DedupIndex::new(&cfg, vec![4]);
            for i in 0..4u32 {
                idx.decide(0, i, 0, &idx.hasher.signature(&doc(&words(50, &i.to_string()))));
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join(STATE_FILE);
            idx.write_snapshot(&[LanePosition { file: 4, ordinal: 0 }], &p).unwrap();
            let mut bytes = std::fs::read(&p).unwrap();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] ^= v;
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            bytes.extend(extra);
            std::fs::write(&p, &bytes).unwrap();
            let _ = DedupIndex::new(&cfg, vec![4]).restore(&p);
        }
    }

    #[test]
    fn mersenne_reduction_is_the_remainder() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            assert_eq!(mod_mersenne(x), x % MERSENNE, "{x}");
        }
        for x in [
            0,
            MERSENNE - 1,
            MERSENNE,
            MERSENNE + 1,
            2 * MERSENNE,
            u64::MAX,
        ] {
            assert_eq!(mod_mersenne(x), x % MERSENNE, "{x}");
        }
    }

    #[test]
    fn decisions_exact_near_and_distinct() {
        let cfg = near_cfg();
        let idx = DedupIndex::new(&cfg, vec![10]);
        let h = &idx.hasher;
        let a = words(400, "a");
        let mut near = a.clone();
        near.push_str(" one extra closing sentence");
        let distinct = words(400, "z");
        let s = |t: &str| h.signature(&doc(t));
        assert_eq!(idx.decide(0, 0, 0, &s(&a)), Verdict::Keep);
        let p0 = Pos {
            file: 0,
            ordinal: 0,
        };
        assert_eq!(idx.decide(0, 0, 1, &s(&a)), Verdict::Exact(p0));
        assert_eq!(idx.decide(0, 1, 0, &s(&near)), Verdict::Near(p0));
        assert_eq!(idx.decide(0, 2, 0, &s(&distinct)), Verdict::Keep);
        // A second epoch (file 10 = file 0 again) decides the same, document by document.
        assert_eq!(idx.decide(0, 10, 0, &s(&a)), Verdict::Keep);
        assert_eq!(idx.decide(0, 10, 1, &s(&a)), Verdict::Exact(p0));
        assert_eq!(idx.decide(0, 11, 0, &s(&near)), Verdict::Near(p0));
        assert_eq!(idx.decide(0, 12, 0, &s(&distinct)), Verdict::Keep);
        let r = idx.report(&["en".into()]).per_lang["en"].clone();
        assert_eq!((r.documents, r.kept, r.exact, r.near), (8, 4, 2, 2));
        // Exact mode ignores the near-duplicate, and instruction pairs never get bands.
        let ex = DedupIndex::new(
            &DedupConfig {
                mode: DedupMode::Exact,
                ..Default::default()
            },
            vec![3],
        );
        assert!(ex.hasher.signature(&doc(&a)).bands.is_empty());
        assert_eq!(
            ex.decide(0, 0, 0, &ex.hasher.signature(&doc(&a))),
            Verdict::Keep
        );
        assert_eq!(
            ex.decide(0, 1, 0, &ex.hasher.signature(&doc(&near))),
            Verdict::Keep
        );
        let qa = Document {
            answer_start: Some(3),
            ..doc(&a)
        };
        assert!(h.signature(&qa).bands.is_empty());
    }

    #[test]
    fn band_matches_below_the_threshold_are_kept_and_still_found_later() {
        // Few bands of few rows: documents at similarity ~0.8 share a band almost surely.
        let cfg = DedupConfig {
            bands: 20,
            rows: 2,
            ..near_cfg()
        };
        let idx = DedupIndex::new(&cfg, vec![10]);
        let s = |t: &str| idx.hasher.signature(&doc(t));
        let a = words(600, "a");
        // ~10% of the words replaced: n-gram Jaccard far below 0.9.
        let b: String = a
            .split(' ')
            .enumerate()
            .map(|(i, w)| {
                if i % 10 == 0 {
                    format!("x{i}")
                } else {
                    w.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let (sa, sb) = (s(&a), s(&b));
        let sim = similarity(
            sa.minhash.as_deref().unwrap(),
            sb.minhash.as_deref().unwrap(),
        );
        assert!(sim < 0.9 && sim > 0.2, "{sim}");
        assert!(
            sa.bands.iter().any(|k| sb.bands.contains(k)),
            "the test needs a shared band"
        );
        assert_eq!(idx.decide(0, 0, 0, &sa), Verdict::Keep);
        assert_eq!(idx.decide(0, 1, 0, &sb), Verdict::Keep);
        // A copy of the second is found through the second, although the first holds the shared bands.
        let mut b2 = b.clone();
        b2.push_str(" end");
        assert_eq!(
            idx.decide(0, 2, 0, &s(&b2)),
            Verdict::Near(Pos {
                file: 1,
                ordinal: 0
            })
        );
        // Lowering the threshold below their similarity makes the second a duplicate of the first.
        let low = DedupIndex::new(
            &DedupConfig {
                threshold: sim * 0.9,
                ..cfg
            },
            vec![10],
        );
        assert_eq!(low.decide(0, 0, 0, &sa), Verdict::Keep);
        assert_eq!(
            low.decide(0, 1, 0, &sb),
            Verdict::Near(Pos {
                file: 0,
                ordinal: 0
            })
        );
        // The snapshot keeps the second document's MinHash and its share of the bands.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        idx.write_snapshot(
            &[LanePosition {
                file: 2,
                ordinal: 0,
            }],
            &p,
        )
        .unwrap();
        let resumed = DedupIndex::new(&idx.cfg, vec![10]);
        resumed.restore(&p).unwrap();
        assert_eq!(
            resumed.decide(0, 2, 0, &s(&b2)),
            Verdict::Near(Pos {
                file: 1,
                ordinal: 0
            })
        );
    }

    #[test]
    fn held_out_documents_block_their_copies() {
        let mut idx = DedupIndex::new(&near_cfg(), vec![5]);
        let a = words(300, "h");
        idx.add_held_out(
            0,
            &Document {
                path: "held.xml".into(),
                ..doc(&a)
            },
        );
        let v = idx.decide(0, 0, 0, &idx.hasher.signature(&doc(&a)));
        assert_eq!(v.label(), "heldout");
        let Verdict::Exact(p) = v else {
            panic!("{v:?}")
        };
        assert_eq!(idx.describe(p, &[]).0, "held.xml");
    }

    #[test]
    fn snapshot_restores_exactly_the_decisions_after_the_resume_point() {
        let cfg = near_cfg();
        let texts: Vec<String> = (0..12).map(|i| words(200, &format!("{}", i % 5))).collect();
        let run = |idx: &DedupIndex, from: usize| -> Vec<Verdict> {
            (from..texts.len())
                .map(|i| idx.decide(0, i as u32, 0, &idx.hasher.signature(&doc(&texts[i]))))
                .collect()
        };
        let whole = DedupIndex::new(&cfg, vec![12]);
        let all = run(&whole, 0);
        assert_eq!(all.iter().filter(|v| **v == Verdict::Keep).count(), 5);
        // The writer ran ahead (all 12 decided) but the checkpoint is at file 7: only entries before it are stored.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        whole
            .write_snapshot(
                &[LanePosition {
                    file: 7,
                    ordinal: 0,
                }],
                &p,
            )
            .unwrap();
        let resumed = DedupIndex::new(&cfg, vec![12]);
        resumed.restore(&p).unwrap();
        assert_eq!(run(&resumed, 7), all[7..].to_vec());
        // Without the snapshot the resumed run would keep repeats.
        let fresh = DedupIndex::new(&cfg, vec![12]);
        assert_ne!(run(&fresh, 7), all[7..].to_vec());
        // Other settings are refused, naming the key.
        let other = DedupIndex::new(
            &DedupConfig {
                bands: 10,
                ..cfg.clone()
            },
            vec![12],
        );
        let e = other.restore(&p).unwrap_err().to_string();
        assert!(e.contains("bands = 14") && e.contains("dedup.bands"), "{e}");
        // A truncated file is an error, not a partial index.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let e = DedupIndex::new(&cfg, vec![12])
            .restore(&p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
