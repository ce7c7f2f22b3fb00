//! Quality filter per language lane (`[filter]`, `docs/FILTER.md`): the "fast CPT" of the seed system, which trains
//! on the best share of the documents and reaches most of the full run's quality in a fraction of its time.
//!
//! Each document gets a **score** in [0, 1], the weighted mean of four criteria, each in [0, 1]:
//!
//! * `recency`: the `filter.recency` scale's value for the document's year (the value of the latest year on the scale
//!   at or before it; earlier years 0, undated documents `filter.undated`);
//! * `type`: the `filter.types` scale's value for its kind (regulation, directive, decision, judgment, …; unlisted 0);
//! * `length`: `ln(1 + chars) / ln(1 + filter.length_full)`, capped at 1 (longer = more substantive, with diminishing
//!   returns);
//! * `subject`: the largest weight of the `filter.subjects` terms found (lower-cased substrings) in the document's
//!   title, its article headings and its subject keywords (case law's `INDEX/KEYWORD`), 0 when none is (without
//!   terms the criterion does not count: its weight is taken as 0).
//!
//! A document is kept when its score reaches `filter.threshold`, or (`filter.keep_fraction`) when it ranks among the
//! best `round(keep_fraction · n)` of the `n` documents of its lane. Ranking is by score, then by a hash of the
//! document's file name and ordinal (a tie-break that favours no part of the sorted file list), then by position:
//! a total order, so exactly that many are kept. The rank needs every document's score: a first pass over the lane
//! reads and scores its documents (metadata and text length only, no tokenization) and fixes the lane's **cut** —
//! the rank key of the last kept document. From then on a document's verdict is a pure function of the document and
//! the cut, the same in every epoch, on any number of threads, after a resume and in a replay (the cut is stored in
//! every checkpoint, `filter.json`). Instruction pairs (Q&A `.jsonl`) are not scored: they are always kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::types::{DocType, Document};

/// The filter's state inside a checkpoint directory (and `<run.dir>/filter.json` at the start of a run).
pub const STATE_FILE: &str = "filter.json";

/// The criteria, in the order of their scores and of the drop reasons.
pub const CRITERIA: [&str; 4] = ["recency", "type", "length", "subject"];

/// Document kinds a `filter.types` scale may name (manifests have no text and are never scored).
pub const TYPE_NAMES: [&str; 10] = [
    "regulation",
    "directive",
    "decision",
    "corrigendum",
    "judgment",
    "order",
    "opinion",
    "annex",
    "consolidated",
    "other",
];

/// `filter.weights`: the weight of each criterion in the score (≥ 0, not all 0; the score divides by their sum).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterWeights {
    #[serde(default = "w_recency")]
    pub recency: f64,
    #[serde(default = "w_type", rename = "type")]
    pub doc_type: f64,
    #[serde(default = "w_length")]
    pub length: f64,
    #[serde(default = "w_subject")]
    pub subject: f64,
}

fn w_recency() -> f64 {
    0.35
}
fn w_type() -> f64 {
    0.25
}
fn w_length() -> f64 {
    0.25
}
fn w_subject() -> f64 {
    0.15
}

impl Default for FilterWeights {
    fn default() -> Self {
        FilterWeights {
            recency: w_recency(),
            doc_type: w_type(),
            length: w_length(),
            subject: w_subject(),
        }
    }
}

impl FilterWeights {
    fn as_array(&self) -> [f64; 4] {
        [self.recency, self.doc_type, self.length, self.subject]
    }
}

/// `[filter]` (absent: every document is trained on).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Keep the best this fraction of each lane's documents, in (0, 1]. Exactly one of this and `threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_fraction: Option<f64>,
    /// Keep the documents whose score is at least this, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub weights: FilterWeights,
    /// Year (4 digits) → score of the documents from that year until the next year on the scale.
    #[serde(default = "default_recency")]
    pub recency: BTreeMap<String, f64>,
    /// The recency of a document without a date.
    #[serde(default)]
    pub undated: f64,
    /// Document kind ([`TYPE_NAMES`]) → score; kinds not listed score 0.
    #[serde(default = "default_types")]
    pub types: BTreeMap<String, f64>,
    /// Characters of text from which the length criterion is 1.
    #[serde(default = "default_length_full")]
    pub length_full: u64,
    /// Priority subject terms (matched case-insensitively as substrings of the title, the article headings and the
    /// subject keywords) → score in [0, 1]; a document scores the largest of the terms it contains.
    #[serde(default)]
    pub subjects: BTreeMap<String, f64>,
}

fn default_recency() -> BTreeMap<String, f64> {
    [
        ("2020", 1.0),
        ("2015", 0.75),
        ("2010", 0.55),
        ("2000", 0.35),
        ("1990", 0.2),
        ("1950", 0.1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn default_types() -> BTreeMap<String, f64> {
    [
        ("regulation", 1.0),
        ("consolidated", 0.9),
        ("directive", 0.85),
        ("decision", 0.65),
        ("judgment", 0.6),
        ("opinion", 0.5),
        ("annex", 0.45),
        ("order", 0.35),
        ("other", 0.25),
        ("corrigendum", 0.05),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn default_length_full() -> u64 {
    100_000
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            keep_fraction: None,
            threshold: None,
            weights: FilterWeights::default(),
            recency: default_recency(),
            undated: 0.0,
            types: default_types(),
            length_full: default_length_full(),
            subjects: BTreeMap::new(),
        }
    }
}

impl FilterConfig {
    /// Config errors as `(key, message)`.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut e = Vec::new();
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        match (self.keep_fraction, self.threshold) {
            (Some(_), Some(_)) => e.push((
                "filter.threshold".to_string(),
                "set either filter.keep_fraction or filter.threshold, not both".to_string(),
            )),
            (None, None) => e.push((
                "filter".to_string(),
                "set filter.keep_fraction (the share of each language's documents kept) or filter.threshold \
                 (the score a kept document reaches)"
                    .to_string(),
            )),
            _ => {}
        }
        if let Some(f) = self.keep_fraction {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                e.push((
                    "filter.keep_fraction".to_string(),
                    format!("{f} must be in (0, 1] (a share of each language's documents)"),
                ));
            }
        }
        if let Some(t) = self.threshold {
            if !unit(t) {
                e.push((
                    "filter.threshold".to_string(),
                    format!("{t} must be in [0, 1] (scores are in [0, 1])"),
                ));
            }
        }
        let w = self.weights.as_array();
        for (name, v) in CRITERIA.iter().zip(w) {
            if !(v.is_finite() && v >= 0.0) {
                e.push((
                    format!("filter.weights.{name}"),
                    format!("{v} must be a finite weight ≥ 0"),
                ));
            }
        }
        if w.iter().all(|v| *v == 0.0) {
            e.push((
                "filter.weights".to_string(),
                "every weight is 0: at least one criterion must count".to_string(),
            ));
        } else if w[..3].iter().all(|v| *v == 0.0) && self.subjects.is_empty() {
            e.push((
                "filter.weights".to_string(),
                "only `subject` has a weight, but filter.subjects lists no term (without terms the subject \
                 criterion does not count)"
                    .to_string(),
            ));
        }
        for (year, v) in &self.recency {
            if year.len() != 4 || !year.bytes().all(|b| b.is_ascii_digit()) {
                e.push((
                    format!("filter.recency.{year}"),
                    format!("`{year}` is not a year (4 digits)"),
                ));
            }
            if !unit(*v) {
                e.push((
                    format!("filter.recency.{year}"),
                    format!("{v} must be in [0, 1]"),
                ));
            }
        }
        if !unit(self.undated) {
            e.push((
                "filter.undated".to_string(),
                format!("{} must be in [0, 1]", self.undated),
            ));
        }
        for (name, v) in &self.types {
            if !TYPE_NAMES.contains(&name.as_str()) {
                e.push((
                    format!("filter.types.{name}"),
                    format!(
                        "unknown document kind `{name}` (expected one of {})",
                        TYPE_NAMES.join(", ")
                    ),
                ));
            }
            if !unit(*v) {
                e.push((
                    format!("filter.types.{name}"),
                    format!("{v} must be in [0, 1]"),
                ));
            }
        }
        if self.length_full < 2 {
            e.push((
                "filter.length_full".to_string(),
                format!(
                    "{} must be at least 2 characters (the length at which the criterion is 1)",
                    self.length_full
                ),
            ));
        }
        for (term, v) in &self.subjects {
            if term.trim().is_empty() {
                e.push((
                    "filter.subjects".to_string(),
                    "an empty subject term matches every document".to_string(),
                ));
            }
            if !unit(*v) {
                e.push((
                    format!("filter.subjects.{term}"),
                    format!("{v} must be in [0, 1]"),
                ));
            }
        }
        e
    }
}

/// The four criteria and the score of one document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    pub recency: f64,
    #[serde(rename = "type")]
    pub doc_type: f64,
    pub length: f64,
    pub subject: f64,
    /// Weighted mean of the four.
    pub score: f64,
}

impl Score {
    fn criteria(&self) -> [f64; 4] {
        [self.recency, self.doc_type, self.length, self.subject]
    }
}

/// Scores documents with a config's scales (built once: the scales sorted, the terms lower-cased).
#[derive(Debug, Clone)]
pub struct Scorer {
    weights: [f64; 4],
    weight_sum: f64,
    /// (year, value), latest first.
    years: Vec<(u32, f64)>,
    undated: f64,
    types: BTreeMap<String, f64>,
    log_full: f64,
    /// (lower-cased term, value), in the config's order.
    terms: Vec<(String, f64)>,
}

impl Scorer {
    pub fn new(cfg: &FilterConfig) -> Self {
        let mut weights = cfg.weights.as_array();
        // Without subject terms every document scores 0 on subject: a criterion that tells no document from another
        // would only scale the score and be named the reason of every drop.
        if cfg.subjects.is_empty() {
            weights[3] = 0.0;
        }
        let mut years: Vec<(u32, f64)> = cfg
            .recency
            .iter()
            .filter_map(|(y, v)| y.parse().ok().map(|y| (y, *v)))
            .collect();
        years.sort_by_key(|y| std::cmp::Reverse(y.0));
        Scorer {
            weights,
            weight_sum: weights.iter().sum(),
            years,
            undated: cfg.undated,
            types: cfg.types.clone(),
            log_full: (1.0 + cfg.length_full as f64).ln(),
            terms: cfg
                .subjects
                .iter()
                .map(|(t, v)| (t.to_lowercase(), *v))
                .collect(),
        }
    }

    /// The criteria and score of `doc`. A pure function of the document's metadata and text length, so every place
    /// that scores a document (the first pass, the stream, `lexflow filter`) gets the same bits.
    pub fn score(&self, doc: &Document) -> Score {
        let year = doc
            .date
            .as_deref()
            .and_then(|d| d.get(..4))
            .and_then(|y| y.parse::<u32>().ok());
        let recency = match year {
            Some(y) => self
                .years
                .iter()
                .find(|(from, _)| *from <= y)
                .map_or(0.0, |(_, v)| *v),
            None => self.undated,
        };
        let doc_type = self
            .types
            .get(type_name(doc.doc_type))
            .copied()
            .unwrap_or(0.0);
        let chars = doc.text.chars().count() as f64;
        let length = ((1.0 + chars).ln() / self.log_full).min(1.0);
        let subject = if self.terms.is_empty() {
            0.0
        } else {
            let hay = subject_text(doc);
            self.terms
                .iter()
                .filter(|(t, _)| hay.contains(t.as_str()))
                .map(|(_, v)| *v)
                .fold(0.0, f64::max)
        };
        let c = [recency, doc_type, length, subject];
        let score = c.iter().zip(self.weights).map(|(c, w)| c * w).sum::<f64>() / self.weight_sum;
        Score {
            recency,
            doc_type,
            length,
            subject,
            score,
        }
    }

    /// Why a dropped document scored low: the criterion with the largest weighted shortfall `w · (1 − c)` (the first
    /// of [`CRITERIA`] on a tie).
    pub fn reason(&self, s: &Score) -> &'static str {
        let mut best = (0usize, f64::NEG_INFINITY);
        for (i, (c, w)) in s.criteria().iter().zip(self.weights).enumerate() {
            let short = w * (1.0 - c);
            if short > best.1 {
                best = (i, short);
            }
        }
        CRITERIA[best.0]
    }
}

/// The `filter.types` name of a document kind.
pub fn type_name(t: DocType) -> &'static str {
    t.as_str()
}

/// Lower-cased title, article headings and subject keywords: what subject terms are matched against.
fn subject_text(doc: &Document) -> String {
    let mut s = String::new();
    if let Some(t) = &doc.title {
        s.push_str(t);
        s.push('\n');
    }
    for a in &doc.articles {
        s.push_str(&a.title);
        s.push('\n');
        if let Some(st) = &a.subtitle {
            s.push_str(st);
            s.push('\n');
        }
    }
    for k in &doc.keywords {
        s.push_str(k);
        s.push('\n');
    }
    s.to_lowercase()
}

/// Where a document ranks among its lane's: higher score first, then the tie-break hash, then the position. A total
/// order (positions are unique in a lane's first epoch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankKey {
    /// The score's bits (`f64::to_bits`): JSON numbers need not parse back to the same double.
    pub score_bits: u64,
    pub tiebreak: u64,
    pub file: u32,
    pub ordinal: u32,
}

impl RankKey {
    pub fn new(score: f64, file_name: &str, file: u32, ordinal: u32) -> Self {
        RankKey {
            score_bits: score.to_bits(),
            tiebreak: tiebreak(file_name, ordinal),
            file,
            ordinal,
        }
    }

    pub fn score(&self) -> f64 {
        f64::from_bits(self.score_bits)
    }

    /// Whether `self` ranks at or before `other` (scores are finite and ≥ 0).
    pub fn ranks_before_or_at(&self, other: &RankKey) -> bool {
        self.cmp_rank(other) != std::cmp::Ordering::Greater
    }

    fn cmp_rank(&self, o: &RankKey) -> std::cmp::Ordering {
        o.score()
            .total_cmp(&self.score())
            .then(self.tiebreak.cmp(&o.tiebreak))
            .then((self.file, self.ordinal).cmp(&(o.file, o.ordinal)))
    }
}

/// The tie-break of documents with equal scores: a hash of the file's name (not its directory: the same corpus in
/// another place ranks the same) and the document's ordinal.
pub fn tiebreak(file_name: &str, ordinal: u32) -> u64 {
    let name = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    xxh3_64(format!("{name}#{ordinal}").as_bytes())
}

/// One lane's decision rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum LaneCut {
    /// Keep documents scoring at least `threshold`.
    Threshold { threshold: f64 },
    /// Keep the `keep` best of the lane's `documents`: those ranking at or before `last` (None: keep none).
    Fraction {
        documents: u64,
        keep: u64,
        last: Option<RankKey>,
    },
}

/// How many of `n` documents a fraction keeps: `round(fraction · n)`, at least 1 of a non-empty lane (a lane that
/// keeps nothing would end the stream at once; one document is within one of the target).
pub fn keep_count(fraction: f64, n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    ((fraction * n as f64).round() as u64).clamp(1, n)
}

/// The cut of a lane from the rank keys of all its scored documents (the first pass).
pub fn fraction_cut(fraction: f64, mut keys: Vec<RankKey>) -> LaneCut {
    let n = keys.len() as u64;
    let keep = keep_count(fraction, n);
    keys.sort_by(|a, b| a.cmp_rank(b));
    LaneCut::Fraction {
        documents: n,
        keep,
        last: keep.checked_sub(1).map(|i| keys[i as usize]),
    }
}

impl LaneCut {
    pub fn keeps(&self, key: &RankKey) -> bool {
        match self {
            LaneCut::Threshold { threshold } => key.score() >= *threshold,
            LaneCut::Fraction { last, .. } => {
                last.as_ref().is_some_and(|l| key.ranks_before_or_at(l))
            }
        }
    }
}

/// What the filter keeps per lane, as a checkpoint stores it: the config it was decided with and each lane's cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterState {
    /// The `[filter]` the cuts were decided with, as TOML (exact floats: JSON numbers need not parse back to the
    /// same double).
    pub config: String,
    /// Lane language → cut, in lane order.
    pub lanes: Vec<(String, LaneCut)>,
}

impl FilterState {
    /// Refuses a state decided with another `[filter]` or other lanes than `cfg` and `langs` (resume, replay).
    pub fn check_matches(&self, cfg: &FilterConfig, langs: &[String]) -> Result<(), String> {
        let now = config_text(cfg);
        if self.config != now {
            return Err(format!(
                "the checkpoint's stream was filtered with another [filter]:\n--- checkpoint\n{}--- config\n{now}",
                self.config
            ));
        }
        let then: Vec<&str> = self.lanes.iter().map(|(l, _)| l.as_str()).collect();
        if then != langs.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(format!(
                "the checkpoint's filter has the lanes {then:?}, the config {langs:?}"
            ));
        }
        Ok(())
    }
}

/// `[filter]` as the state records it.
pub fn config_text(cfg: &FilterConfig) -> String {
    toml::to_string(cfg).unwrap_or_default()
}

/// Counts of one lane (this process's part of the stream).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FilterLaneReport {
    /// Documents decided (with text, past dedup; Q&A pairs not included).
    pub documents: u64,
    pub kept: u64,
    /// Dropped documents by reason ([`Scorer::reason`]): `recency`, `type`, `length`, `subject`.
    pub dropped: BTreeMap<String, u64>,
    pub bytes_dropped: u64,
    /// Seconds the lane's filter actor spent scoring and deciding (its busy time; compare the tokenizers').
    #[serde(default)]
    pub busy_seconds: f64,
    /// Instruction pairs passed unscored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unscored: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl FilterLaneReport {
    pub fn count(&mut self, kept: bool, reason: &str, bytes: u64) {
        self.documents += 1;
        if kept {
            self.kept += 1;
        } else {
            *self.dropped.entry(reason.to_string()).or_insert(0) += 1;
            self.bytes_dropped += bytes;
        }
    }
}

/// `stats.json` → `filter`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FilterReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Seconds of the first pass that fixed the cuts (0 when they came from a checkpoint or a threshold).
    pub first_pass_seconds: f64,
    /// Per language: the cut (the first pass's documents and keep count, the last kept score) …
    pub cuts: BTreeMap<String, LaneCut>,
    /// … and what the stream decided.
    pub per_lang: BTreeMap<String, FilterLaneReport>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Article;

    fn doc(date: Option<&str>, t: DocType, chars: usize, title: &str) -> Document {
        Document {
            date: date.map(str::to_string),
            doc_type: t,
            text: "x".repeat(chars),
            title: Some(title.to_string()),
            ..Default::default()
        }
    }

    fn cfg() -> FilterConfig {
        FilterConfig {
            keep_fraction: Some(0.4),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_need_a_rule() {
        assert!(cfg().check().is_empty(), "{:?}", cfg().check());
        let e = FilterConfig::default().check();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, "filter");
        let both = FilterConfig {
            threshold: Some(0.5),
            ..cfg()
        };
        assert_eq!(both.check()[0].0, "filter.threshold");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = cfg();
        c.keep_fraction = Some(0.0);
        c.weights.length = -1.0;
        c.recency.insert("20x0".into(), 0.5);
        c.types.insert("statute".into(), 0.5);
        c.types.insert("judgment".into(), 1.5);
        c.subjects.insert("  ".into(), 1.0);
        c.length_full = 1;
        let keys: Vec<String> = c.check().into_iter().map(|(k, _)| k).collect();
        for k in [
            "filter.keep_fraction",
            "filter.weights.length",
            "filter.recency.20x0",
            "filter.types.statute",
            "filter.types.judgment",
            "filter.subjects",
            "filter.length_full",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        let mut z = cfg();
        z.weights = FilterWeights {
            recency: 0.0,
            doc_type: 0.0,
            length: 0.0,
            subject: 0.0,
        };
        assert_eq!(z.check()[0].0, "filter.weights");
    }

    #[test]
    fn each_criterion_orders_as_the_seed_ranks() {
        let s = Scorer::new(&cfg());
        let base = |d: Option<&str>, t, n| s.score(&doc(d, t, n, "t"));
        // Recency: newer scores higher, the scale is a step function, undated is `undated`.
        assert!(
            base(Some("2021-01-01"), DocType::Other, 10).recency
                > base(Some("2012-06-30"), DocType::Other, 10).recency
        );
        assert_eq!(base(Some("2020-01-01"), DocType::Other, 10).recency, 1.0);
        assert_eq!(base(Some("2019-12-31"), DocType::Other, 10).recency, 0.75);
        assert_eq!(base(Some("1901-01-01"), DocType::Other, 10).recency, 0.0);
        assert_eq!(base(None, DocType::Other, 10).recency, 0.0);
        // Type: regulations > directives > decisions.
        let t = |t| base(None, t, 10).doc_type;
        assert!(t(DocType::Regulation) > t(DocType::Directive));
        assert!(t(DocType::Directive) > t(DocType::Decision));
        // Length: monotone, capped at 1.
        assert!(base(None, DocType::Other, 1000).length > base(None, DocType::Other, 100).length);
        assert_eq!(base(None, DocType::Other, 200_000).length, 1.0);
        assert!(base(None, DocType::Other, 0).length == 0.0);
    }

    #[test]
    fn subjects_match_title_headings_and_keywords_case_insensitively() {
        let mut c = cfg();
        c.subjects.insert("Data Protection".into(), 1.0);
        c.subjects.insert("banking".into(), 0.5);
        let s = Scorer::new(&c);
        let mut d = doc(
            None,
            DocType::Regulation,
            10,
            "On the protection of natural persons",
        );
        assert_eq!(s.score(&d).subject, 0.0);
        d.articles.push(Article {
            title: "Article 2".into(),
            subtitle: Some("Banking supervision".into()),
            ..Default::default()
        });
        assert_eq!(s.score(&d).subject, 0.5);
        d.keywords.push("DATA PROTECTION — transfers".into());
        assert_eq!(s.score(&d).subject, 1.0);
        // The body text is not a subject: a term only there does not count.
        let body = Document {
            text: "data protection".repeat(10),
            ..doc(None, DocType::Regulation, 0, "x")
        };
        assert_eq!(s.score(&body).subject, 0.0);
    }

    #[test]
    fn score_is_the_weighted_mean_and_a_weight_change_moves_it() {
        let s = Scorer::new(&cfg());
        let old_long = doc(Some("1995-01-01"), DocType::Regulation, 150_000, "a");
        let new_short = doc(Some("2023-01-01"), DocType::Regulation, 200, "b");
        let (a, b) = (s.score(&old_long), s.score(&new_short));
        assert!(a.score > 0.0 && a.score <= 1.0);
        let recency_only = Scorer::new(&FilterConfig {
            weights: FilterWeights {
                recency: 1.0,
                doc_type: 0.0,
                length: 0.0,
                subject: 0.0,
            },
            ..cfg()
        });
        let length_only = Scorer::new(&FilterConfig {
            weights: FilterWeights {
                recency: 0.0,
                doc_type: 0.0,
                length: 1.0,
                subject: 0.0,
            },
            ..cfg()
        });
        assert!(recency_only.score(&new_short).score > recency_only.score(&old_long).score);
        assert!(length_only.score(&new_short).score < length_only.score(&old_long).score);
        assert_eq!(recency_only.reason(&a), "recency");
        assert_eq!(length_only.reason(&b), "length");
        let _ = b;
    }

    fn keys(scores: &[f64]) -> Vec<RankKey> {
        scores
            .iter()
            .enumerate()
            .map(|(i, s)| RankKey::new(*s, &format!("f{i}.xml"), i as u32, 0))
            .collect()
    }

    #[test]
    fn a_fraction_keeps_exactly_its_count_ties_included() {
        for n in [1usize, 2, 5, 7, 10, 33] {
            for f in [0.01, 0.25, 0.4, 0.5, 0.99, 1.0] {
                // Few distinct scores: many ties at the cut.
                let scores: Vec<f64> = (0..n).map(|i| (i % 3) as f64 / 4.0).collect();
                let ks = keys(&scores);
                let cut = fraction_cut(f, ks.clone());
                let kept = ks.iter().filter(|k| cut.keeps(k)).count() as f64;
                let target = f * n as f64;
                assert!(
                    (kept - target).abs() <= 1.0,
                    "n {n} f {f}: kept {kept}, target {target}"
                );
                assert!(kept >= 1.0);
                // Kept documents score at least as high as dropped ones.
                let min_kept = ks
                    .iter()
                    .filter(|k| cut.keeps(k))
                    .map(|k| k.score())
                    .fold(1.0, f64::min);
                let max_dropped = ks
                    .iter()
                    .filter(|k| !cut.keeps(k))
                    .map(|k| k.score())
                    .fold(0.0, f64::max);
                assert!(min_kept >= max_dropped, "n {n} f {f}");
            }
        }
    }

    #[test]
    fn the_cut_does_not_depend_on_the_order_it_sees_documents_in() {
        let scores: Vec<f64> = (0..40).map(|i| ((i * 7919) % 13) as f64 / 13.0).collect();
        let ks = keys(&scores);
        let mut rev = ks.clone();
        rev.reverse();
        assert_eq!(fraction_cut(0.4, ks.clone()), fraction_cut(0.4, rev));
    }

    #[test]
    fn state_round_trips_through_json_bit_for_bit() {
        let ks = keys(&[0.1 + 0.2, 1.0 / 3.0, 0.7]);
        let st = FilterState {
            config: config_text(&cfg()),
            lanes: vec![("en".into(), fraction_cut(0.4, ks.clone()))],
        };
        let back: FilterState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);
        for k in &ks {
            assert_eq!(back.lanes[0].1.keeps(k), st.lanes[0].1.keeps(k));
        }
        assert!(back.check_matches(&cfg(), &["en".into()]).is_ok());
        let mut other = cfg();
        other.weights.length = 0.5;
        assert!(back.check_matches(&other, &["en".into()]).is_err());
        assert!(back.check_matches(&cfg(), &["fr".into()]).is_err());
    }
}
