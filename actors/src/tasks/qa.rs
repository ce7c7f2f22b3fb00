//! Instruction-tuning data: question/answer pairs with legal citations, built from the articles of FORMEX acts.
//!
//! `lexflow qa build --out DIR PATHS…` reads FORMEX inputs (files, directories, globs, archives — as `lexflow parse`),
//! and for every article of every act with a CELEX number writes, in the act's language:
//! * `article_text`: "What does Article 5 of Regulation (EU) 2016/679 provide?" → the article's paragraphs, then the
//!   citation;
//! * `article_locate` (articles with a heading): "Which article of Regulation (EU) 2016/679 is headed “Principles
//!   relating to processing of personal data”?" → "Article 5" and the citation;
//! * `provision_identify`: "Which provision of EU law says: “1. Personal data shall be: (a) processed …”?" (the
//!   opening of the article's first paragraph) → "Regulation (EU) 2016/679, Article 5" and the citation — only when
//!   no other provision of the corpus in that language opens with the same words.
//!
//! The articles are the act's own (`ENACTING.TERMS`, not quoted amendments nor articles of its annexes, see
//! [`crate::stages::formex`]), named by their heading without footnotes ([`Article::title`]).
//!
//! Every answer ends with a machine-checkable citation `[CELEX 32016R0679, Art. 5]` ([`format_citation`]), which is
//! what `lexflow qa eval` checks (citation accuracy, hallucinated citations). Pairs are split into `train/<lang>.jsonl`
//! (one file per language: the input of an SFT run, one sampler lane each) and `eval.jsonl` by a hash of the cited
//! provision (CELEX, article) — stable whatever the input order or file set. Every language and question kind of a
//! provision lands on the same side: the answer's citation is the same in all of them, so a provision trained in
//! French and evaluated in English would leak the eval answer into training. `citations.json` indexes every (CELEX, article) the
//! corpus contains (the reference for "does this cited article exist"), `summary.json` counts pairs and everything
//! skipped, by reason. Files that fail to parse are reported with path, offset and reason and skipped; the others
//! still produce their pairs.
//!
//! Prompt format for training and generation: [`PromptFormat`] (`input.qa_template`: lexflow's plain
//! `### Question`/`### Answer` format, or the Llama 3 chat template).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::stages::qa_format::{parse_template, Citation, PromptFormat, QaPair, QaTemplate};
use crate::stages::reader::{expand_inputs, read_file_indexed, ManifestIndex};
use crate::types::{Article, DocType, Document};

/// `[CELEX 32016R0679, Art. 5]` (or `[CELEX 32016R0679]` for a whole act).
pub fn format_citation(c: &Citation) -> String {
    match &c.article {
        Some(a) => format!("[CELEX {}, Art. {a}]", c.celex),
        None => format!("[CELEX {}]", c.celex),
    }
}

/// The citations in a text, in order of appearance. A citation is a bracket opened by `[CELEX` (any case):
/// * `[CELEX 32016R0679]`: the act (CELEX upper-cased);
/// * `[CELEX 32016R0679, Art. 5]`, also `Art 5`, `Article 5`, `art. 5`: one article (number lower-cased: `8a`);
///   paragraphs and points after the number (`Art. 5(1)(a)`) are dropped, the citation is of the article;
/// * several articles, each one citation: `Art. 9, Art. 12`, `Arts. 5 and 6`, `Articles 5, 6 & 7`, `Art. 5; Art. 6`.
///
/// Anything else inside such a bracket (ranges `Arts. 5-7`, `point (a)`, free text) makes the whole bracket not a
/// citation, and so is free-form text outside brackets: the metrics never guess. A `[CELEX` that is not closed by
/// `]` before the next `[` is skipped alone, so it cannot swallow the citation that follows it.
pub fn extract_citations(text: &str) -> Vec<Citation> {
    const OPEN: &str = "[celex";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = find_ascii_ci(&text[from..], OPEN) {
        let after = from + i + OPEN.len();
        from = after;
        let rest = &text[after..];
        let Some(end) = rest.find([']', '[']) else {
            break;
        };
        if rest.as_bytes()[end] != b']' {
            continue;
        }
        if let Some(cites) = parse_citation(&rest[..end]) {
            out.extend(cites);
            from = after + end + 1;
        }
    }
    out
}

/// Byte offset of the first ASCII-case-insensitive occurrence of `needle` (lower-case ASCII) in `hay`.
fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    (0..h.len().saturating_sub(n.len() - 1)).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

/// The inside of `[CELEX …]` (after `CELEX`): the act and its cited articles, or None when it is not of a form
/// [`extract_citations`] recognises.
fn parse_citation(inner: &str) -> Option<Vec<Citation>> {
    let (celex, arts) = match inner.split_once(',') {
        Some((c, a)) => (c.trim(), Some(a)),
        None => (inner.trim(), None),
    };
    let celex_ok = !celex.is_empty()
        && celex.len() <= 20
        && celex
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "()".contains(ch));
    if !celex_ok {
        return None;
    }
    let celex = celex.to_ascii_uppercase();
    let Some(arts) = arts else {
        return Some(vec![Citation {
            celex,
            article: None,
        }]);
    };
    let mut out = Vec::new();
    for item in arts.split([',', ';']).flat_map(split_and) {
        let item = item.trim();
        let lower = item.to_ascii_lowercase();
        // `Art.`, `Arts.`, `Article`, `Articles`, without the dot too; the first item must have one.
        let number = ["articles", "article", "arts.", "arts", "art.", "art"]
            .iter()
            .find_map(|p| lower.strip_prefix(p))
            .filter(|n| n.starts_with(|c: char| c.is_ascii_whitespace() || c.is_ascii_digit()))
            .map(str::trim_start);
        let number = match number {
            Some(n) => n,
            None if !out.is_empty() => lower.as_str(),
            None => return None,
        };
        out.push(Citation {
            celex: celex.clone(),
            article: Some(article_of_reference(number)?),
        });
    }
    Some(out)
}

/// `"5 and 6"` → `["5", "6"]` (also `&`); words are split on whitespace, so `"Standard"` is not cut.
fn split_and(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let sep = if b[i] == b'&' {
            Some(1)
        } else if b.len() - i >= 3
            && b[i..i + 3].eq_ignore_ascii_case(b"and")
            && (i == 0 || b[i - 1].is_ascii_whitespace())
            && b.get(i + 3).is_none_or(|c| c.is_ascii_whitespace())
        {
            Some(3)
        } else {
            None
        };
        match sep {
            Some(n) => {
                parts.push(&s[start..i]);
                i += n;
                start = i;
            }
            None => i += 1,
        }
    }
    parts.push(&s[start..]);
    parts
}

/// `"5(1)(a)"`, `"8a"`, `"12 (3)"` → the article number (`"5"`, `"8a"`, `"12"`): digits first, then letters or
/// digits, at most 12 characters; paragraph and point references in parentheses are dropped. None for anything else.
fn article_of_reference(s: &str) -> Option<String> {
    let s = s.trim();
    let n_end = s
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(s.len());
    let (n, mut rest) = s.split_at(n_end);
    if n.is_empty() || n.len() > 12 || !n.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    // Paragraphs and points: `(1)`, `(a)`, `(iv)`, possibly after a space.
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Some(n.to_ascii_lowercase());
        }
        let inner = rest.strip_prefix('(')?;
        let close = inner.find(')')?;
        let label = &inner[..close];
        if label.is_empty() || label.len() > 6 || !label.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return None;
        }
        rest = &inner[close + 1..];
    }
}

/// `IDENTIFIER="008A"` → `"8a"`; falls back to the digits of the title (`"Article 12"` → `"12"`).
pub fn article_number(a: &Article) -> Option<String> {
    let id = a.id.trim();
    let from_id = id.trim_start_matches('0');
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars().next().is_some_and(|c| c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_alphanumeric())
    };
    if ok(from_id) {
        return Some(from_id.to_ascii_lowercase());
    }
    let digits: String = a
        .title
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    ok(&digits).then(|| digits.to_ascii_lowercase())
}

/// The act's short name from its title: everything up to and including its number (`Regulation (EU) 2016/679`,
/// `Directive 95/46/EC`, `Règlement (CEE) no 1017/68`); without a recognisable number, `CELEX <id>`.
pub fn short_act_name(title: Option<&str>, celex: &str) -> String {
    let fallback = || format!("CELEX {celex}");
    let Some(t) = title else {
        return fallback();
    };
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()) {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j < b.len() && b[j] == b'/' && j + 1 < b.len() && b[j + 1].is_ascii_digit() {
                // The number: digits/digits, then further `/EC`-style parts.
                let mut k = j + 1;
                while k < b.len() && (b[k].is_ascii_alphanumeric() || b[k] == b'/') {
                    k += 1;
                }
                let name = t[..k].trim();
                if name.chars().count() <= 120 {
                    return name.to_string();
                }
                return fallback();
            }
            i = j;
        } else {
            i += 1;
        }
    }
    fallback()
}

/// Question templates: (article text, article locate, provision identify). `{act}`, `{art}` (the article's own
/// heading, e.g. "Artikel 5"), `{sub}` (its subject heading), `{quote}` (the opening of its text).
fn templates(lang: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match lang {
        "en" => (
            "What does {art} of {act} provide?",
            "Which article of {act} is headed “{sub}”?",
            "Which provision of EU law says: “{quote}”?",
        ),
        "fr" => (
            "{act}, {art} : que prévoit cette disposition ?",
            "{act} : quel article s'intitule « {sub} » ?",
            "Quelle disposition du droit de l'Union prévoit : « {quote} » ?",
        ),
        "de" => (
            "{act}, {art}: Was regelt diese Bestimmung?",
            "{act}: Welcher Artikel trägt die Überschrift „{sub}“?",
            "Welche Bestimmung des Unionsrechts lautet: „{quote}“?",
        ),
        "es" => (
            "{act}, {art}: ¿qué establece esta disposición?",
            "{act}: ¿qué artículo se titula «{sub}»?",
            "¿Qué disposición del Derecho de la Unión establece: «{quote}»?",
        ),
        "pt" => (
            "{act}, {art}: o que estabelece esta disposição?",
            "{act}: que artigo tem por título «{sub}»?",
            "Que disposição do direito da União estabelece: «{quote}»?",
        ),
        "it" => (
            "{act}, {art}: che cosa stabilisce questa disposizione?",
            "{act}: quale articolo è intitolato «{sub}»?",
            "Quale disposizione del diritto dell'Unione stabilisce: «{quote}»?",
        ),
        "nl" => (
            "{act}, {art}: wat bepaalt deze bepaling?",
            "{act}: welk artikel heeft als opschrift „{sub}”?",
            "Welke bepaling van het Unierecht luidt: „{quote}”?",
        ),
        _ => return None,
    })
}

/// Shortest quote worth asking about (shorter openings, such as "(deleted)", identify nothing).
pub const MIN_QUOTE_CHARS: usize = 40;
/// Longest quote: the opening of the article's first paragraph, cut at a word boundary, then "…".
pub const MAX_QUOTE_CHARS: usize = 200;

/// The quote of a `provision_identify` question: the article's first paragraph (a `PARAG`, or the article's first
/// `ALINEA` — with its lists: "1. Personal data shall be: (a) processed lawfully, …"), whitespace collapsed, cut at
/// a word after [`MAX_QUOTE_CHARS`]; None when it is shorter than [`MIN_QUOTE_CHARS`] (it identifies nothing).
pub fn quote_of(first_paragraph: &str) -> Option<String> {
    let plain = first_paragraph
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let n = plain.chars().count();
    if n < MIN_QUOTE_CHARS {
        return None;
    }
    if n <= MAX_QUOTE_CHARS {
        return Some(plain);
    }
    let cut: String = plain.chars().take(MAX_QUOTE_CHARS).collect();
    let head = match cut.rfind(' ') {
        Some(i) if i >= MIN_QUOTE_CHARS => &cut[..i],
        _ => cut.as_str(),
    };
    Some(format!("{}…", head.trim_end_matches([',', ';', ':'])))
}

/// Languages with question templates.
pub const QA_LANGUAGES: [&str; 7] = ["en", "fr", "de", "es", "pt", "it", "nl"];

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Share of provisions (CELEX, article), by a hash of the pair, whose pairs (all languages and kinds) go to
    /// `eval.jsonl`; see [`split_key`].
    pub eval_fraction: f64,
    /// Articles whose text is longer are skipped (counted), never truncated: a truncated answer would be wrong.
    pub max_answer_chars: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            eval_fraction: 0.1,
            max_answer_chars: 6000,
        }
    }
}

/// What a build produced and skipped.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BuildSummary {
    pub files: usize,
    pub documents: usize,
    pub train: usize,
    pub eval: usize,
    /// Pairs per `lang/kind`.
    pub pairs: BTreeMap<String, usize>,
    /// Articles (or documents) not turned into pairs, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Files that could not be read: `path: reason`.
    pub file_errors: Vec<String>,
    pub acts: usize,
    pub cited_articles: usize,
}

fn bump(m: &mut BTreeMap<String, usize>, k: impl Into<String>) {
    *m.entry(k.into()).or_insert(0) += 1;
}

/// Pairs of one document (in article order), recording skips in `summary`.
pub fn pairs_for_document(
    d: &Document,
    opts: &BuildOptions,
    summary: &mut BuildSummary,
) -> Vec<QaPair> {
    let mut out = Vec::new();
    if d.articles.is_empty() {
        return out;
    }
    if matches!(d.doc_type, DocType::Manifest | DocType::Corrigendum) {
        bump(&mut summary.skipped, "not an act (manifest or corrigendum)");
        return out;
    }
    let Some(celex) = d.celex.as_deref() else {
        bump(&mut summary.skipped, "document without CELEX");
        return out;
    };
    let lang = d.lang.as_deref().unwrap_or("");
    let Some((t_text, t_locate, t_identify)) = templates(lang) else {
        *summary
            .skipped
            .entry(format!("articles in a language without templates ({lang})"))
            .or_insert(0) += d.articles.len();
        return out;
    };
    // Headings use no-break spaces ("Artikel\u{a0}5"); questions get plain ones.
    let plain = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let act = plain(&short_act_name(d.title.as_deref(), celex));
    // A heading shared by several articles of the act ("Amendments to Regulation …") has no single answer.
    let mut headings: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &d.articles {
        if let Some(h) = a.subtitle.as_deref().map(str::trim) {
            *headings.entry(h).or_insert(0) += 1;
        }
    }
    // A number borne by several articles of the act (consolidated texts have two "Article 69a" inserted by different
    // amendments) has no single answer: none of them gets pairs (else the second would answer for the first when
    // the first is skipped, e.g. for length).
    let mut numbers: HashMap<String, usize> = HashMap::new();
    for n in d.articles.iter().filter_map(article_number) {
        *numbers.entry(n).or_insert(0) += 1;
    }
    for a in &d.articles {
        let Some(n) = article_number(a) else {
            bump(&mut summary.skipped, "article without a number");
            continue;
        };
        if numbers[&n] > 1 {
            bump(
                &mut summary.skipped,
                "article number shared by several articles of the act",
            );
            continue;
        }
        let paragraphs: Vec<&str> = a
            .paragraphs
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        let text = paragraphs.join("\n");
        let cite = Citation {
            celex: celex.to_string(),
            article: Some(n.clone()),
        };
        let tag = format_citation(&cite);
        // The reader's heading has no footnotes (`Article 37`, not `Article 37 [Note the Declaration …]`).
        let art = match plain(&a.title) {
            h if h.is_empty() => format!("Art. {n}"),
            h => h,
        };
        let mk = |kind: &str, question: String, answer: String| QaPair {
            id: format!("{celex}:{n}:{lang}:{kind}"),
            lang: lang.to_string(),
            kind: kind.to_string(),
            celex: celex.to_string(),
            article: n.clone(),
            doc_type: d.doc_type.as_str().to_string(),
            question,
            answer,
            citations: vec![cite.clone()],
            source: d.path.clone(),
        };
        if text.is_empty() {
            bump(&mut summary.skipped, "article without text");
        } else if text.chars().count() > opts.max_answer_chars {
            bump(&mut summary.skipped, "article longer than max_answer_chars");
        } else {
            let q = t_text.replace("{act}", &act).replace("{art}", &art);
            out.push(mk("article_text", q, format!("{text}\n{tag}")));
        }
        // Which provision says this? (Kept by `build` only when no other provision opens with the same words.)
        match paragraphs.first().and_then(|p| quote_of(p)) {
            Some(quote) => {
                let q = t_identify.replace("{quote}", &quote);
                out.push(mk("provision_identify", q, format!("{act}, {art} {tag}")));
            }
            None if !text.is_empty() => {
                bump(&mut summary.skipped, "article opening too short to quote");
            }
            None => {}
        }
        if let Some(sub) = a
            .subtitle
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if headings.get(sub).copied().unwrap_or(0) > 1 {
                bump(&mut summary.skipped, "heading shared by several articles");
            } else {
                let q = t_locate
                    .replace("{act}", &act)
                    .replace("{sub}", &plain(sub));
                out.push(mk("article_locate", q, format!("{art} {tag}")));
            }
        }
    }
    out
}

/// What the train/eval split hashes: the cited provision, so that every language and question kind of an article is
/// on one side.
pub fn split_key(p: &QaPair) -> String {
    format!("{}:{}", p.celex, p.article)
}

/// Deterministic split: eval when the hash of the key ([`split_key`]) falls under `fraction`.
pub fn is_eval(key: &str, fraction: f64) -> bool {
    let h = Sha256::digest(key.as_bytes());
    let v = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    (v as f64 / u64::MAX as f64) < fraction
}

/// `act → its articles` over the whole corpus read (every language): the reference for hallucination checks.
pub type CitationIndex = BTreeMap<String, BTreeSet<String>>;

/// Builds the pairs of every input into `out` (train/<lang>.jsonl, eval.jsonl, citations.json, summary.json).
pub fn build(paths: &[String], out: &Path, opts: &BuildOptions) -> anyhow::Result<BuildSummary> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.eval_fraction),
        "--eval-fraction must be within [0, 1], got {}",
        opts.eval_fraction
    );
    let files = expand_inputs(paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut w = PairWriter::create(out, opts.eval_fraction)?;
    let mut summary = BuildSummary {
        files: files.len(),
        ..Default::default()
    };
    let mut index: CitationIndex = BTreeMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    // `provision_identify` pairs wait until every input is read: a quote that opens several provisions (boilerplate
    // such as "This Regulation shall enter into force …") has no single answer and is dropped (counted).
    let mut held: Vec<QaPair> = Vec::new();
    let mut quotes: HashMap<(String, String), usize> = HashMap::new();
    // Manifests first (small files), then one input at a time: memory stays that of the largest file, not the corpus.
    let manifests = ManifestIndex::build(&files);
    for path in &files {
        let docs = match read_file_indexed(path, &manifests) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("lexflow qa build: skipping {}: {e}", path.display());
                summary.file_errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        for d in &docs {
            summary.documents += 1;
            if let (Some(c), false) = (
                d.celex.as_deref(),
                matches!(d.doc_type, DocType::Manifest | DocType::Corrigendum),
            ) {
                let arts = index.entry(c.to_string()).or_default();
                arts.extend(d.articles.iter().filter_map(article_number));
            }
            for p in pairs_for_document(d, opts, &mut summary) {
                // The same act in the same language can come twice (OJ act and consolidated text, or copies).
                if !seen.insert(p.id.clone()) {
                    bump(
                        &mut summary.skipped,
                        "duplicate (same act, article, language)",
                    );
                    continue;
                }
                if p.kind == "provision_identify" {
                    *quotes
                        .entry((p.lang.clone(), p.question.clone()))
                        .or_insert(0) += 1;
                    held.push(p);
                    continue;
                }
                w.write(&p, &mut summary)?;
            }
        }
    }
    for p in held {
        if quotes[&(p.lang.clone(), p.question.clone())] > 1 {
            bump(&mut summary.skipped, "quote opening several provisions");
            continue;
        }
        w.write(&p, &mut summary)?;
    }
    w.flush()?;
    summary.acts = index.len();
    summary.cited_articles = index.values().map(BTreeSet::len).sum();
    let write_json = |name: &str, v: String| -> anyhow::Result<()> {
        let p = out.join(name);
        std::fs::write(&p, v).map_err(|e| anyhow::anyhow!("{}: write failed: {e}", p.display()))
    };
    write_json(
        "citations.json",
        serde_json::to_string_pretty(&index).expect("index is JSON"),
    )?;
    write_json(
        "summary.json",
        serde_json::to_string_pretty(&summary).expect("summary is JSON"),
    )?;
    Ok(summary)
}

/// The output files of `qa build`: training pairs one file per language (each is one sampler lane of `lexflow
/// run`), evaluation pairs in one file.
struct PairWriter {
    out: PathBuf,
    eval_fraction: f64,
    train: BTreeMap<String, (PathBuf, BufWriter<std::fs::File>)>,
    eval: (PathBuf, BufWriter<std::fs::File>),
}

impl PairWriter {
    fn create(out: &Path, eval_fraction: f64) -> anyhow::Result<Self> {
        let train_dir = out.join("train");
        if train_dir.exists() {
            std::fs::remove_dir_all(&train_dir)
                .map_err(|e| anyhow::anyhow!("{}: cannot replace: {e}", train_dir.display()))?;
        }
        std::fs::create_dir_all(&train_dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", train_dir.display()))?;
        Ok(PairWriter {
            out: out.to_path_buf(),
            eval_fraction,
            train: BTreeMap::new(),
            eval: Self::open(&out.join("eval.jsonl"))?,
        })
    }

    fn open(p: &Path) -> anyhow::Result<(PathBuf, BufWriter<std::fs::File>)> {
        let f = std::fs::File::create(p)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", p.display()))?;
        Ok((p.to_path_buf(), BufWriter::new(f)))
    }

    fn write(&mut self, p: &QaPair, summary: &mut BuildSummary) -> anyhow::Result<()> {
        bump(&mut summary.pairs, format!("{}/{}", p.lang, p.kind));
        let line = serde_json::to_string(p).expect("pair is JSON");
        let ((path, w), n) = if is_eval(&split_key(p), self.eval_fraction) {
            (&mut self.eval, &mut summary.eval)
        } else {
            if !self.train.contains_key(&p.lang) {
                let f = Self::open(&self.out.join(format!("train/{}.jsonl", p.lang)))?;
                self.train.insert(p.lang.clone(), f);
            }
            (
                self.train.get_mut(&p.lang).expect("just inserted"),
                &mut summary.train,
            )
        };
        writeln!(w, "{line}")
            .map_err(|e| anyhow::anyhow!("{}: write failed: {e}", path.display()))?;
        *n += 1;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        for (p, w) in self.train.values_mut().chain([&mut self.eval]) {
            w.flush()
                .map_err(|e| anyhow::anyhow!("{}: write failed: {e}", p.display()))?;
        }
        Ok(())
    }
}

/// Reads a JSONL file of [`QaPair`]s; a bad line is an error naming the file and line.
pub fn read_pairs(path: &Path) -> anyhow::Result<Vec<QaPair>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}: not a Q&A pair ({e}); expected the JSON lines `lexflow qa build` writes",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(id: &str, title: &str, sub: Option<&str>, paras: &[&str]) -> Article {
        Article {
            id: id.into(),
            title: title.into(),
            subtitle: sub.map(Into::into),
            paragraphs: paras.iter().map(|s| s.to_string()).collect(),
            title_in_text: title.into(),
        }
    }

    #[test]
    fn citations_round_trip_and_junk_is_ignored() {
        let c = Citation {
            celex: "32016R0679".into(),
            article: Some("8a".into()),
        };
        let text = format!(
            "See {} and [CELEX 31995L0046] but not [CELEX bad id!, Art. 3] nor [CELEX 3, Art. 4 to 6] {}",
            format_citation(&c),
            "[CELEX 32016R0679, Art. 5"
        );
        assert_eq!(
            extract_citations(&text),
            vec![
                c,
                Citation {
                    celex: "31995L0046".into(),
                    article: None
                }
            ]
        );
        assert_eq!(
            extract_citations("[CELEX 32016R0679, Art. 12B]")[0]
                .article
                .as_deref(),
            Some("12b")
        );
    }

    fn cites(pairs: &[(&str, Option<&str>)]) -> Vec<Citation> {
        pairs
            .iter()
            .map(|(c, a)| Citation {
                celex: c.to_string(),
                article: a.map(str::to_string),
            })
            .collect()
    }

    #[test]
    fn citations_are_case_insensitive_with_upper_case_celex() {
        assert_eq!(
            extract_citations(
                "[celex 32022r1925, art. 9] [CeLeX 32016r0679] [CELEX 32016R0679, ART. 8A]"
            ),
            cites(&[
                ("32022R1925", Some("9")),
                ("32016R0679", None),
                ("32016R0679", Some("8a"))
            ])
        );
    }

    #[test]
    fn citations_with_paragraphs_or_several_articles() {
        let c = "39999R9999";
        for (text, want) in [
            ("[CELEX 39999R9999, Art. 5(1)]", vec!["5"]),
            ("[CELEX 39999R9999, Art. 5 (1)(a)]", vec!["5"]),
            ("[CELEX 39999R9999, Article 9]", vec!["9"]),
            ("[CELEX 39999R9999, Art 9]", vec!["9"]),
            ("[CELEX 39999R9999, Art. 9, Art. 999]", vec!["9", "999"]),
            ("[CELEX 39999R9999, Art. 9; Article 10(2)]", vec!["9", "10"]),
            ("[CELEX 39999R9999, Arts. 5 and 6]", vec!["5", "6"]),
            (
                "[CELEX 39999R9999, Articles 5, 6 & 7a]",
                vec!["5", "6", "7a"],
            ),
        ] {
            let want: Vec<_> = want.iter().map(|a| (c, Some(*a))).collect();
            assert_eq!(extract_citations(text), cites(&want), "{text}");
        }
        // Not of a recognised form: the whole bracket is not a citation.
        for text in [
            "[CELEX 39999R9999, Arts. 5-7]",
            "[CELEX 39999R9999, Art. 5, point (a)]",
            "[CELEX 39999R9999, 5]",
            "[CELEX 39999R9999, Art. 5(1]",
            "[CELEX 39999R9999, Article]",
            "[CELEX 39999R9999, Artikel 5]",
            "[CELEX 39999R9999, Art. 5,]",
        ] {
            assert_eq!(extract_citations(text), vec![], "{text}");
        }
        // Non-ASCII text around and inside brackets never panics.
        assert_eq!(
            extract_citations(
                "« [CELEX 39999R9999, Art. 5 et 6] » [CELEX é, Art. 1] [CELEX 39999R9999, Art. ①]"
            ),
            vec![]
        );
    }

    #[test]
    fn a_stray_celex_bracket_does_not_swallow_the_next_citation() {
        assert_eq!(
            extract_citations(
                "see [CELEX and then [CELEX 32016R0679, Art. 5] [CELEX 32016R0679, Art. 6"
            ),
            cites(&[("32016R0679", Some("5"))])
        );
        assert_eq!(
            extract_citations("[CELEX 3201, Art. x] [CELEX 32016R0679, Art. 6]"),
            cites(&[("32016R0679", Some("6"))])
        );
    }

    #[test]
    fn act_names_and_article_numbers() {
        for (t, want) in [
            (
                "Regulation (EU) 2016/679 of the European Parliament",
                "Regulation (EU) 2016/679",
            ),
            (
                "Directive 95/46/EC of the european parliament",
                "Directive 95/46/EC",
            ),
            (
                "Règlement (CEE) no 1017/68 du Conseil du 19 juillet 1968",
                "Règlement (CEE) no 1017/68",
            ),
            ("Regulation No 141 of the Council", "CELEX 31962R0141"),
        ] {
            assert_eq!(short_act_name(Some(t), "31962R0141"), want, "{t}");
        }
        assert_eq!(
            article_number(&art("008A", "Article 8a", None, &[])).as_deref(),
            Some("8a")
        );
        assert_eq!(
            article_number(&art("", "Artikel 12", None, &[])).as_deref(),
            Some("12")
        );
        assert_eq!(
            article_number(&art("", "Final provisions", None, &[])),
            None
        );
    }

    #[test]
    fn pairs_in_the_documents_language_with_citations() {
        let d = Document {
            path: "x.xml".into(),
            root: "ACT".into(),
            celex: Some("32016R0679".into()),
            lang: Some("de".into()),
            doc_type: DocType::Regulation,
            title: Some("Verordnung (EU) 2016/679 des Europäischen Parlaments".into()),
            articles: vec![
                art(
                    "005",
                    "Artikel 5",
                    Some("Grundsätze"),
                    &["(1) Personenbezogene Daten müssen", " "],
                ),
                art("006", "Artikel 6", None, &[]),
                art("007", "Artikel 7", Some("Änderungen"), &["a"]),
                art("008", "Artikel 8", Some("Änderungen"), &["b"]),
            ],
            text: String::new(),
            answer_start: None,
            date: None,
            keywords: Vec::new(),
        };
        let mut s = BuildSummary::default();
        let p = pairs_for_document(&d, &BuildOptions::default(), &mut s);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[2..].iter().all(|p| p.kind == "article_text"));
        assert_eq!(s.skipped["heading shared by several articles"], 2);
        assert_eq!(
            p[0].question,
            "Verordnung (EU) 2016/679, Artikel 5: Was regelt diese Bestimmung?"
        );
        assert_eq!(
            p[0].answer,
            "(1) Personenbezogene Daten müssen\n[CELEX 32016R0679, Art. 5]"
        );
        assert_eq!(p[1].kind, "article_locate");
        assert_eq!(p[1].answer, "Artikel 5 [CELEX 32016R0679, Art. 5]");
        assert_eq!(extract_citations(&p[1].answer), p[1].citations);
        assert_eq!(s.skipped["article without text"], 1);
        // No templates for Bulgarian: counted, not silently dropped.
        let bg = Document {
            lang: Some("bg".into()),
            ..d
        };
        assert!(pairs_for_document(&bg, &BuildOptions::default(), &mut s).is_empty());
        // …one per article, not per document.
        assert_eq!(
            s.skipped["articles in a language without templates (bg)"],
            bg.articles.len()
        );
    }

    fn doc(lang: &str, articles: Vec<Article>) -> Document {
        Document {
            path: "x.xml".into(),
            root: "CONS.ACT".into(),
            celex: Some("32000R1346".into()),
            lang: Some(lang.into()),
            doc_type: DocType::Regulation,
            title: Some("Council Regulation (EC) No 1346/2000 of 29 May 2000".into()),
            articles,
            text: String::new(),
            answer_start: None,
            date: None,
            keywords: Vec::new(),
        }
    }

    #[test]
    fn article_headings_leave_footnotes_out() {
        // As the reader gives them: a NOTE in TI.ART and in STI.ART (32000R1346 Art. 37; 32024R3117).
        let xml = r#"<ACT><ENACTING.TERMS><ARTICLE IDENTIFIER="037"><TI.ART>Article&#160;37<NOTE NOTE.ID="E1"><P>Note the Declaration by Portugal concerning the application of Articles 26 and 37 (OJ C 183, 30.6.2000, p. 1).</P></NOTE></TI.ART><STI.ART>Conversion of earlier proceedings<NOTE NOTE.ID="E2"><P>See [the] annex.</P></NOTE></STI.ART><ALINEA>The liquidator in the main proceedings may request that secondary proceedings be converted.</ALINEA></ARTICLE></ENACTING.TERMS></ACT>"#;
        let parsed = crate::stages::formex::parse_bytes("t.xml", xml.as_bytes()).unwrap();
        let a = parsed[0].articles[0].clone();
        assert_eq!(a.title, "Article 37");
        assert_eq!(
            a.subtitle.as_deref(),
            Some("Conversion of earlier proceedings")
        );
        assert!(a.title_in_text.contains("Portugal"), "{a:?}");
        assert!(parsed[0].text.contains(&a.title_in_text));
        let d = doc("en", vec![a]);
        let p = pairs_for_document(&d, &BuildOptions::default(), &mut BuildSummary::default());
        assert_eq!(p.len(), 3, "{p:?}");
        for p in &p {
            assert!(
                !p.question.contains("Portugal")
                    && !p.answer.contains("Portugal")
                    && !p.question.contains("annex"),
                "{p:?}"
            );
        }
        assert_eq!(
            p[0].question,
            "What does Article 37 of Council Regulation (EC) No 1346/2000 provide?"
        );
        assert_eq!(p[2].answer, "Article 37 [CELEX 32000R1346, Art. 37]");
    }

    #[test]
    fn an_article_number_borne_twice_in_an_act_gets_no_pairs() {
        let d = doc(
            "en",
            vec![
                art(
                    "069A",
                    "Article 69a",
                    None,
                    &["Long enough to be the text of the first article 69a."],
                ),
                art(
                    "069A",
                    "Article 69-a",
                    None,
                    &["Long enough to be the text of the other article 69a."],
                ),
                art("070", "Article 70", None, &["x"]),
            ],
        );
        let mut s = BuildSummary::default();
        let p = pairs_for_document(&d, &BuildOptions::default(), &mut s);
        assert!(p.iter().all(|p| p.article == "70"), "{p:?}");
        assert_eq!(
            s.skipped["article number shared by several articles of the act"],
            2
        );
    }

    #[test]
    fn quotes_are_first_paragraphs_cut_at_a_word() {
        assert_eq!(quote_of("(deleted)"), None);
        assert_eq!(quote_of("\n  \n"), None);
        let short = "1. Member States shall ensure that   the rules apply.";
        assert_eq!(
            quote_of(short).as_deref(),
            Some("1. Member States shall ensure that the rules apply.")
        );
        // The whole first paragraph, its list included, not its first line ("1. Personal data shall be:" is too
        // short to identify anything).
        let gdpr5 = "1. Personal data shall be:\n(a) processed lawfully, fairly and in a transparent manner in \
                     relation to the data subject;\n(b) collected for specified purposes.";
        assert_eq!(
            quote_of(gdpr5).as_deref(),
            Some(
                "1. Personal data shall be: (a) processed lawfully, fairly and in a transparent manner in relation \
                 to the data subject; (b) collected for specified purposes."
            )
        );
        let d = doc(
            "en",
            vec![art(
                "005",
                "Article 5",
                None,
                &[gdpr5, "2. The controller shall be responsible."],
            )],
        );
        let p = pairs_for_document(&d, &BuildOptions::default(), &mut BuildSummary::default());
        let q = p
            .iter()
            .find(|p| p.kind == "provision_identify")
            .expect("a quote");
        assert!(
            q.question.contains("(b) collected") && !q.question.contains("controller"),
            "{q:?}"
        );
        let long = "word ".repeat(100);
        let q = quote_of(&long).unwrap();
        assert!(
            q.ends_with("word…") && q.chars().count() <= MAX_QUOTE_CHARS + 1,
            "{q}"
        );
        // No space to cut at: cut at the limit.
        let q = quote_of(&"é".repeat(300)).unwrap();
        assert_eq!(q.chars().count(), MAX_QUOTE_CHARS + 1);
    }

    #[test]
    fn split_is_stable_and_near_the_fraction() {
        let n = (0..10_000)
            .filter(|i| is_eval(&format!("3201{i}R0001:{i}:en:article_text"), 0.1))
            .count();
        assert!((800..1200).contains(&n), "{n}");
        assert!(is_eval("a", 1.0) && !is_eval("a", 0.0));
    }
}
