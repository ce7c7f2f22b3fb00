//! Evaluation of answers to the Q&A pairs of [`crate::tasks::qa`]: exact match, ROUGE-L, citation accuracy and
//! hallucinated citations, overall, per language and per question kind.
//!
//! `lexflow qa eval --gold eval.jsonl --predictions preds.jsonl` scores answers produced anywhere (`{"id", "output"}`
//! per line); `--model DIR` generates them first with a lexflow/HF checkpoint (greedy decoding of
//! [`PromptFormat::prompt`], stopping at end-of-text/end-of-turn).
//!
//! Per example:
//! * exact match: the answer equals the reference after trimming, collapsing whitespace and lower-casing;
//! * ROUGE-L: F1 of the longest common subsequence of lower-cased alphanumeric word tokens (both empty: 1);
//! * citation accuracy: every reference citation appears in the answer (an act-level reference is satisfied by any
//!   citation of that act);
//! * every cited provision ([`extract_citations`]) is exactly one of: a reference citation of this example; else
//!   hallucinated, when its act, or that article of the act, is not known — known are the citation index
//!   (`citations.json` of `lexflow qa build`: every article of the corpus read) and the reference citations of the
//!   whole gold file (alone without `--index`); else wrong (a real provision, not the reference one).
//!
//! Aggregates: exact match, ROUGE-L, citation accuracy, hallucination rate (answers with a hallucinated citation) and
//! wrong citation rate (answers with a wrong one) are means over the examples; citation precision is pooled over the
//! group's answers (micro-average: Σ reference citations / Σ cited provisions), None when nothing was cited. An
//! answer missing from the predictions file counts as empty (and is counted), a prediction for an id the gold file
//! lacks is an error.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

pub use crate::tasks::decode::{decode_batch, greedy_batch, prompt_ids, stop_ids};
use crate::tasks::qa::{
    extract_citations, read_pairs, Citation, CitationIndex, PromptFormat, QaPair,
};

/// Whitespace collapsed, trimmed, lower-cased.
pub fn normalize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Lower-cased maximal runs of alphanumeric characters.
pub fn rouge_tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F1 between a candidate and a reference: the arithmetic of Google's `rouge_score` (`rougeL`, no stemming;
/// 0 when either side has no token), on Unicode-aware tokens ([`rouge_tokens`]; `rouge_score`'s default tokenizer
/// keeps only `[a-z0-9]`, splitting `données` into `donn`, `es`). Equal to it on ASCII text (`tests/qa_eval.rs`).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (rouge_tokens(candidate), rouge_tokens(reference));
    if c.is_empty() || r.is_empty() {
        return 0.0;
    }
    let l = lcs_len(&c, &r) as f64;
    if l == 0.0 {
        return 0.0;
    }
    let (p, rec) = (l / c.len() as f64, l / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

fn cites(pred: &[Citation], want: &Citation) -> bool {
    pred.iter()
        .any(|p| p.celex == want.celex && (want.article.is_none() || p.article == want.article))
}

/// `c` is (or, for an act-level reference, falls under) one of `refs`.
fn is_reference(refs: &[Citation], c: &Citation) -> bool {
    refs.iter()
        .any(|r| r.celex == c.celex && (r.article.is_none() || r.article == c.article))
}

fn exists(index: &CitationIndex, c: &Citation) -> bool {
    match (index.get(&c.celex), &c.article) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(arts), Some(a)) => arts.contains(a),
    }
}

/// Scores of one answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExampleScore {
    pub id: String,
    pub lang: String,
    pub kind: String,
    pub exact_match: bool,
    pub rouge_l: f64,
    pub citation_correct: bool,
    /// Citations in the answer: `cited = cited_reference + hallucinated + wrong`.
    pub cited: usize,
    /// … that are reference citations of this example;
    pub cited_reference: usize,
    /// … that are not, of an act or article that is not known (index and gold file);
    pub hallucinated: usize,
    /// … that are not, of a known provision.
    pub wrong: usize,
    pub missing: bool,
}

pub fn score(gold: &QaPair, output: Option<&str>, index: &CitationIndex) -> ExampleScore {
    let out = output.unwrap_or("");
    let pred = extract_citations(out);
    let (mut cited_reference, mut hallucinated, mut wrong) = (0, 0, 0);
    for p in &pred {
        if is_reference(&gold.citations, p) {
            cited_reference += 1;
        } else if !exists(index, p) {
            hallucinated += 1;
        } else {
            wrong += 1;
        }
    }
    ExampleScore {
        id: gold.id.clone(),
        lang: gold.lang.clone(),
        kind: gold.kind.clone(),
        exact_match: normalize(out) == normalize(&gold.answer),
        rouge_l: rouge_l(out, &gold.answer),
        citation_correct: gold.citations.iter().all(|c| cites(&pred, c)),
        cited: pred.len(),
        cited_reference,
        hallucinated,
        wrong,
        missing: output.is_none(),
    }
}

/// Scores of a group of examples: means over its examples, except citation precision (pooled).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Aggregate {
    pub examples: usize,
    pub exact_match: f64,
    pub rouge_l: f64,
    pub citation_accuracy: f64,
    /// Pooled over the group (micro-average): Σ reference citations / Σ cited provisions of its answers (None when
    /// nothing was cited); an answer citing ten provisions weighs ten times one citing one.
    pub citation_precision: Option<f64>,
    /// Answers citing at least one provision that is not known (neither in the index nor in the gold file).
    pub hallucination_rate: f64,
    /// Answers citing at least one known provision that is not a reference citation.
    pub wrong_citation_rate: f64,
    pub missing_predictions: usize,
}

pub fn aggregate<'a>(scores: impl IntoIterator<Item = &'a ExampleScore>) -> Aggregate {
    let v: Vec<&ExampleScore> = scores.into_iter().collect();
    let n = v.len().max(1) as f64;
    let mean = |f: &dyn Fn(&ExampleScore) -> f64| v.iter().map(|s| f(s)).sum::<f64>() / n;
    let cited: usize = v.iter().map(|s| s.cited).sum();
    let right: usize = v.iter().map(|s| s.cited_reference).sum();
    Aggregate {
        examples: v.len(),
        exact_match: mean(&|s| s.exact_match as u8 as f64),
        rouge_l: mean(&|s| s.rouge_l),
        citation_accuracy: mean(&|s| s.citation_correct as u8 as f64),
        citation_precision: (cited > 0).then(|| right as f64 / cited as f64),
        hallucination_rate: mean(&|s| (s.hallucinated > 0) as u8 as f64),
        wrong_citation_rate: mean(&|s| (s.wrong > 0) as u8 as f64),
        missing_predictions: v.iter().filter(|s| s.missing).count(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub overall: Aggregate,
    pub by_language: BTreeMap<String, Aggregate>,
    pub by_kind: BTreeMap<String, Aggregate>,
    /// Where the citation index came from.
    pub index: String,
    pub examples: Vec<ExampleScore>,
}

pub fn report(
    gold: &[QaPair],
    outputs: &HashMap<String, String>,
    index: &CitationIndex,
    index_source: &str,
) -> Report {
    let examples: Vec<ExampleScore> = gold
        .iter()
        .map(|g| score(g, outputs.get(&g.id).map(String::as_str), index))
        .collect();
    let group = |key: &dyn Fn(&ExampleScore) -> String| {
        let mut m: BTreeMap<String, Vec<&ExampleScore>> = BTreeMap::new();
        for s in &examples {
            m.entry(key(s)).or_default().push(s);
        }
        m.into_iter()
            .map(|(k, v)| (k, aggregate(v)))
            .collect::<BTreeMap<_, _>>()
    };
    Report {
        overall: aggregate(&examples),
        by_language: group(&|s| s.lang.clone()),
        by_kind: group(&|s| s.kind.clone()),
        index: index_source.to_string(),
        examples,
    }
}

/// The citations of the gold answers, as an index (when no `citations.json` is given).
pub fn index_from_gold(gold: &[QaPair]) -> CitationIndex {
    let mut m = CitationIndex::new();
    for c in gold.iter().flat_map(|g| &g.citations) {
        let e = m.entry(c.celex.clone()).or_default();
        if let Some(a) = &c.article {
            e.insert(a.clone());
        }
    }
    m
}

#[derive(Deserialize)]
struct Prediction {
    id: String,
    output: String,
}

/// `{"id", "output"}` lines; ids must be unique and known.
pub fn read_predictions(path: &Path, gold: &[QaPair]) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let known: std::collections::HashSet<&str> = gold.iter().map(|g| g.id.as_str()).collect();
    let mut out = HashMap::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let p: Prediction = serde_json::from_str(l).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a prediction ({e}); expected {{\"id\": …, \"output\": …}}",
                at()
            )
        })?;
        anyhow::ensure!(
            known.contains(p.id.as_str()),
            "{}: id {:?} is not in the gold file (predictions for another eval set?)",
            at(),
            p.id
        );
        anyhow::ensure!(
            out.insert(p.id.clone(), p.output).is_none(),
            "{}: second prediction for id {:?}",
            at(),
            p.id
        );
    }
    Ok(out)
}

/// Generation settings for `--model`.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub tokenizer: String,
    pub device: String,
    pub max_new_tokens: usize,
    /// Questions decoded together (left-padded, each row masked to its own prompt); 1: one at a time.
    pub batch_size: usize,
    /// The prompt format the model was fine-tuned with; None: the checkpoint's `run_config.toml`
    /// (`input.qa_template`, `input.qa_system`), else `plain`.
    pub format: Option<PromptFormat>,
    /// Greedy by default; sampled answers are reproducible per question (its index in the gold file).
    pub sampling: crate::tasks::decode::Sampling,
}

/// The prompt format for generating with `model_dir`: `explicit`, else the one of the run that wrote the checkpoint
/// (its `run_config.toml`), else `plain`.
pub fn prompt_format_for(
    model_dir: &Path,
    explicit: Option<&PromptFormat>,
) -> anyhow::Result<PromptFormat> {
    if let Some(f) = explicit {
        return Ok(f.clone());
    }
    let p = model_dir.join(crate::common::run_dir::RUN_CONFIG_FILE);
    if !p.is_file() {
        return Ok(PromptFormat::default());
    }
    let cfg = crate::config::Config::stored_file(&p).map_err(|e| {
        anyhow::anyhow!("{e} (pass --template to choose the prompt format yourself)")
    })?;
    Ok(cfg.input.prompt_format())
}

/// Answers of a checkpoint (HF layout: `config.json` + safetensors) to every gold question: greedy decoding of the
/// prompt with a KV cache, `batch_size` questions at a time, stopping at end-of-text / end-of-turn, the model's
/// context length or `max_new_tokens`.
pub fn generate(
    model_dir: &Path,
    gold: &[QaPair],
    opts: &GenOptions,
) -> anyhow::Result<HashMap<String, String>> {
    Ok(generate_ids(model_dir, gold, opts)?
        .into_iter()
        .map(|(id, (text, _))| (id, text))
        .collect())
}

/// [`generate`], also returning the generated token ids (without the stop token).
pub fn generate_ids(
    model_dir: &Path,
    gold: &[QaPair],
    opts: &GenOptions,
) -> anyhow::Result<HashMap<String, (String, Vec<u32>)>> {
    use lexflow_gpu::tch::Kind;
    opts.sampling.check()?;
    let device = crate::common::device::parse_device(&opts.device)?;
    crate::common::device::check_device(device, "--device", "--device cpu")?;
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let model = lexflow_gpu::checkpoint::load_hf(model_dir, device, kind)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the model: {e}", model_dir.display()))?;
    let tok = crate::stages::tokenizer::Tokenizer::load(&opts.tokenizer)?;
    let format = prompt_format_for(model_dir, opts.format.as_ref())?;
    format.check_tokenizer(&tok)?;
    eprintln!(
        "lexflow qa eval: prompt template `{}`{}",
        format.template.as_str(),
        if format.system.is_some() {
            " with a system turn"
        } else {
            ""
        }
    );
    let vocab = model.cfg.vocab_size as i64;
    let stops = stop_ids(&tok);
    let mut out = HashMap::new();
    let bs = opts.batch_size.max(1);
    let mut done_n = 0;
    for chunk in gold.chunks(bs) {
        let prompts: Vec<Vec<i64>> = chunk
            .iter()
            .map(|g| prompt_ids(&tok, &format, &g.question))
            .collect();
        // A tokenizer with more ids than the model has embeddings (the wrong --tokenizer) would index past the table.
        for (g, p) in chunk.iter().zip(&prompts) {
            if let Some(&bad) = p.iter().find(|&&t| t >= vocab) {
                anyhow::bail!(
                    "{}: question {:?} has token id {bad}, but {} has {vocab} embeddings: pass the tokenizer the \
                     model was trained with (--tokenizer)",
                    opts.tokenizer,
                    g.id,
                    model_dir.display()
                );
            }
        }
        let rows: Vec<u64> = (done_n..done_n + chunk.len()).map(|r| r as u64).collect();
        let gen = decode_batch(
            &model,
            &prompts,
            &stops,
            opts.max_new_tokens,
            &opts.sampling,
            &rows,
        )?;
        for (g, ids) in chunk.iter().zip(gen) {
            out.insert(g.id.clone(), (tok.decode(&ids).trim().to_string(), ids));
        }
        done_n += chunk.len();
        eprintln!("lexflow qa eval: generated {done_n}/{}", gold.len());
    }
    Ok(out)
}

/// The citation index to score against: `citations.json` of `lexflow qa build` (from any build: an index that lacks
/// some of the gold file's acts is completed by them), plus the reference citations of `gold` (the whole gold file,
/// not a `--limit`ed part of it), or those alone. A reference citation is therefore always known. Returns it with a
/// description of its source.
pub fn load_index(path: Option<&Path>, gold: &[QaPair]) -> anyhow::Result<(CitationIndex, String)> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", p.display()))?;
            let mut idx: CitationIndex = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a citation index ({e}); expected the citations.json of `lexflow qa build`",
                    p.display()
                )
            })?;
            for (celex, arts) in index_from_gold(gold) {
                idx.entry(celex).or_default().extend(arts);
            }
            (
                idx,
                format!(
                    "{} and the reference citations of the gold file",
                    p.display()
                ),
            )
        }
        None => (
            index_from_gold(gold),
            "reference citations of the gold file".to_string(),
        ),
    })
}

/// Human-readable table of a report.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("| group | n | exact match | ROUGE-L | citation acc. | citation prec. | hallucination | wrong citation |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    let mut row = |name: &str, a: &Aggregate| {
        s.push_str(&format!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {} | {:.3} | {:.3} |\n",
            a.examples,
            a.exact_match,
            a.rouge_l,
            a.citation_accuracy,
            a.citation_precision
                .map_or("—".to_string(), |p| format!("{p:.3}")),
            a.hallucination_rate,
            a.wrong_citation_rate
        ));
    };
    row("all", &r.overall);
    for (k, a) in &r.by_language {
        row(&format!("lang {k}"), a);
    }
    for (k, a) in &r.by_kind {
        row(k, a);
    }
    s
}

/// `lexflow qa eval` as given on the command line: the answers to score (`predictions`) or the checkpoint to generate
/// them with (`model`: a checkpoint, or a run directory standing for its newest checkpoint), and how to decode.
pub struct QaEvalCli<'a> {
    pub gold: &'a Path,
    pub predictions: Option<&'a Path>,
    pub model: Option<&'a Path>,
    /// `--best`: the run directory's best checkpoint (`train.keep_best`).
    pub best: bool,
    pub index: Option<&'a Path>,
    /// The decoding options given with values other than their defaults (`--device`, `--temperature`, …): with
    /// `--predictions` nothing is decoded, so any of them is an error.
    pub decode_options_given: Vec<&'static str>,
    pub tokenizer: Option<String>,
    pub device: String,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub sampling: crate::tasks::decode::Sampling,
    pub template: Option<String>,
    pub system: Option<String>,
    pub limit: Option<usize>,
    pub out: Option<&'a Path>,
    pub predictions_out: Option<&'a Path>,
}

/// `lexflow qa eval`: refuses generation options with `--predictions` (exit code 2, as a usage error), resolves the
/// checkpoint and its tokenizer, then scores ([`cli_eval`]).
pub fn cli_qa_eval(a: QaEvalCli<'_>) -> anyhow::Result<ExitCode> {
    if a.predictions.is_some() {
        let mut ignored = a.decode_options_given;
        for (flag, set) in [
            ("--template", a.template.is_some()),
            ("--system", a.system.is_some()),
            ("--predictions-out", a.predictions_out.is_some()),
        ] {
            if set {
                ignored.push(flag);
            }
        }
        if !ignored.is_empty() {
            eprintln!(
                "lexflow: error: {} given, but only --model generates answers: with --predictions they \
                 would be ignored; drop them, or use --model instead of --predictions",
                ignored.join(", ")
            );
            return Ok(ExitCode::from(2));
        }
    }
    // A run directory stands for its newest checkpoint, as with `lexflow generate`; the tokenizer defaults to
    // the checkpoint's own.
    let model = match a.model {
        Some(m) => Some(crate::tasks::generate::resolve_model_dir_best(m, a.best)?),
        None if a.best => {
            anyhow::bail!("--best picks a run's best checkpoint: give the run directory as --model")
        }
        None => None,
    };
    let tokenizer = match &model {
        Some(m) => crate::tasks::generate::tokenizer_for(m, a.tokenizer),
        None => a.tokenizer.unwrap_or_else(|| "llama3".into()),
    };
    cli_eval(EvalArgs {
        gold: a.gold,
        predictions: a.predictions,
        model: model.as_deref(),
        index: a.index,
        gen: GenOptions {
            tokenizer,
            device: a.device,
            max_new_tokens: a.max_new_tokens,
            batch_size: a.batch_size,
            sampling: a.sampling,
            format: match crate::stages::qa_format::parse_template(a.template.as_deref(), a.system)
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("lexflow: error: {e:#}");
                    return Ok(ExitCode::FAILURE);
                }
            },
        },
        limit: a.limit,
        out: a.out,
        predictions_out: a.predictions_out,
    })
}

/// `lexflow qa eval`.
pub struct EvalArgs<'a> {
    pub gold: &'a Path,
    pub predictions: Option<&'a Path>,
    pub model: Option<&'a Path>,
    pub index: Option<&'a Path>,
    pub gen: GenOptions,
    pub limit: Option<usize>,
    pub out: Option<&'a Path>,
    pub predictions_out: Option<&'a Path>,
}

pub fn cli_eval(a: EvalArgs<'_>) -> anyhow::Result<ExitCode> {
    let all = read_pairs(a.gold)?;
    anyhow::ensure!(!all.is_empty(), "{}: no Q&A pairs", a.gold.display());
    let gold = &all[..a.limit.unwrap_or(all.len()).min(all.len())];
    let (outputs, token_ids) = match (a.predictions, a.model) {
        // Ids are checked against the whole gold file; with --limit, predictions for the examples after the first N
        // are ignored, not errors.
        (Some(p), None) => {
            let mut o = read_predictions(p, &all)?;
            let scored: std::collections::HashSet<&str> =
                gold.iter().map(|g| g.id.as_str()).collect();
            o.retain(|id, _| scored.contains(id.as_str()));
            (o, HashMap::new())
        }
        (None, Some(m)) => {
            let g = generate_ids(m, gold, &a.gen)?;
            let ids = g.iter().map(|(k, (_, t))| (k.clone(), t.clone())).collect();
            (g.into_iter().map(|(k, (o, _))| (k, o)).collect(), ids)
        }
        _ => anyhow::bail!("give exactly one of --predictions FILE and --model DIR"),
    };
    if let Some(p) = a.predictions_out {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(p)
                .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", p.display()))?,
        );
        for g in gold {
            if let Some(o) = outputs.get(&g.id) {
                let mut j = serde_json::json!({"id": g.id, "output": o});
                if let Some(t) = token_ids.get(&g.id) {
                    j["token_ids"] = serde_json::json!(t);
                }
                writeln!(w, "{j}")?;
            }
        }
        w.flush()?;
    }
    let (index, source) = load_index(a.index, &all)?;
    let r = report(gold, &outputs, &index, &source);
    crate::common::output::print_to_stdout(&table(&r))?;
    if r.overall.missing_predictions > 0 {
        eprintln!(
            "lexflow qa eval: {} of {} gold examples have no prediction (scored as empty answers)",
            r.overall.missing_predictions, r.overall.examples
        );
    }
    if let Some(p) = a.out {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .map_err(|e| anyhow::anyhow!("{}: write failed: {e}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: &str, lang: &str, answer: &str, celex: &str, art: &str) -> QaPair {
        QaPair {
            id: id.into(),
            lang: lang.into(),
            kind: "article_text".into(),
            celex: celex.into(),
            article: art.into(),
            doc_type: "regulation".into(),
            question: "q".into(),
            answer: answer.into(),
            citations: vec![Citation {
                celex: celex.into(),
                article: Some(art.into()),
            }],
            source: "x".into(),
        }
    }

    #[test]
    fn rouge_l_by_hand() {
        // candidate "the cat sat on mat" vs reference "the cat was on the mat": LCS "the cat on mat" = 4,
        // P = 4/5, R = 4/6, F1 = 2·0.8·0.6667/(1.4667) = 0.72727…
        let f = rouge_l("The cat sat on mat", "the cat was on the mat");
        assert!((f - 8.0 / 11.0).abs() < 1e-12, "{f}");
        assert_eq!(rouge_l("", ""), 0.0);
        assert_eq!(rouge_l("a", ""), 0.0);
        assert_eq!(rouge_l("x y", "z"), 0.0);
        assert_eq!(rouge_l("Données à caractère", "données, à caractère!"), 1.0);
    }

    #[test]
    fn scores_citations_and_hallucinations() {
        let g = pair(
            "1",
            "en",
            "Text.\n[CELEX 32016R0679, Art. 5]",
            "32016R0679",
            "5",
        );
        let mut idx = index_from_gold(std::slice::from_ref(&g));
        idx.entry("32016R0679".into())
            .or_default()
            .insert("6".into());
        let s = score(&g, Some("  text.   [CELEX 32016R0679, Art. 5] "), &idx);
        assert!(s.exact_match && s.citation_correct && s.hallucinated == 0 && s.rouge_l == 1.0);
        // A real but wrong article, and a made-up one.
        let s = score(
            &g,
            Some("Text. [CELEX 32016R0679, Art. 6] [CELEX 32099R9999, Art. 1]"),
            &idx,
        );
        assert!(!s.exact_match && !s.citation_correct);
        assert_eq!((s.cited, s.cited_reference, s.hallucinated), (2, 0, 1));
        let a = aggregate([&s]);
        assert_eq!(
            (
                a.hallucination_rate,
                a.wrong_citation_rate,
                a.citation_precision
            ),
            (1.0, 1.0, Some(0.0))
        );
        let m = score(&g, None, &idx);
        assert!(m.missing && !m.citation_correct && m.rouge_l == 0.0);
    }

    #[test]
    fn a_reference_citation_missing_from_the_index_is_never_hallucinated() {
        // An index from another build (or `{}`) that lacks the gold act: the reference citation is still known.
        let g = pair("1", "en", "T [CELEX 32016R0679, Art. 5]", "32016R0679", "5");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("citations.json");
        std::fs::write(&empty, "{}").unwrap();
        let (idx, source) = load_index(Some(&empty), std::slice::from_ref(&g)).unwrap();
        assert!(source.contains("gold file"), "{source}");
        for index in [&idx, &CitationIndex::new()] {
            let s = score(&g, Some(&g.answer), index);
            assert_eq!(
                (s.cited, s.cited_reference, s.hallucinated, s.wrong),
                (1, 1, 0, 0)
            );
            let a = aggregate([&s]);
            assert_eq!((a.hallucination_rate, a.wrong_citation_rate), (0.0, 0.0));
        }
        // With the merged index, another article of the gold act is known (wrong), an unknown act is hallucinated.
        let mut idx = idx;
        idx.entry("32016R0679".into())
            .or_default()
            .insert("6".into());
        let s = score(
            &g,
            Some("[CELEX 32016R0679, Art. 5] [CELEX 32016R0679, Art. 6] [CELEX 39999R9999] [celex 32016r0679, art. 5(2)]"),
            &idx,
        );
        assert_eq!(
            (s.cited, s.cited_reference, s.hallucinated, s.wrong),
            (4, 2, 1, 1)
        );
        assert!(s.citation_correct);
    }

    #[test]
    fn citation_precision_is_pooled_over_the_answers() {
        // One answer with 1 reference citation out of 1, one with 0 out of 3: pooled 1/4 (a mean of per-answer
        // precisions would give 1/2).
        let gold = vec![
            pair("a", "en", "A [CELEX 1, Art. 1]", "1", "1"),
            pair("b", "en", "B [CELEX 2, Art. 2]", "2", "2"),
        ];
        let outputs: HashMap<String, String> = [
            ("a".to_string(), "[CELEX 1, Art. 1]".to_string()),
            (
                "b".to_string(),
                "[CELEX 1, Arts. 1 and 1] [CELEX 2]".to_string(),
            ),
        ]
        .into();
        let r = report(&gold, &outputs, &index_from_gold(&gold), "gold");
        assert_eq!(r.overall.citation_precision, Some(0.25));
    }

    #[test]
    fn limit_ignores_predictions_for_later_examples_but_not_unknown_ids() {
        let dir = tempfile::tempdir().unwrap();
        let gold: Vec<QaPair> = (0..5)
            .map(|i| {
                pair(
                    &format!("g{i}"),
                    "en",
                    &format!("A [CELEX 1, Art. {i}]"),
                    "1",
                    &i.to_string(),
                )
            })
            .collect();
        let gold_path = dir.path().join("eval.jsonl");
        let text: String = gold
            .iter()
            .map(|g| serde_json::to_string(g).unwrap() + "\n")
            .collect();
        std::fs::write(&gold_path, text).unwrap();
        let preds = dir.path().join("preds.jsonl");
        let text: String = gold
            .iter()
            .map(|g| serde_json::json!({"id": g.id, "output": g.answer}).to_string() + "\n")
            .collect();
        std::fs::write(&preds, &text).unwrap();
        let out = dir.path().join("report.json");
        fn args<'a>(gold_path: &'a Path, preds: &'a Path, out: &'a Path) -> EvalArgs<'a> {
            EvalArgs {
                gold: gold_path,
                predictions: Some(preds),
                model: None,
                index: None,
                gen: GenOptions {
                    tokenizer: String::new(),
                    device: "cpu".into(),
                    max_new_tokens: 1,
                    batch_size: 1,
                    format: None,
                    sampling: Default::default(),
                },
                limit: Some(2),
                out: Some(out),
                predictions_out: None,
            }
        }
        cli_eval(args(&gold_path, &preds, &out)).unwrap();
        let r: Report = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!((r.overall.examples, r.overall.missing_predictions), (2, 0));
        assert_eq!(r.overall.exact_match, 1.0);
        // An id that is in no part of the gold file is still an error naming the line.
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(
            &bad,
            format!("{text}{{\"id\": \"nope\", \"output\": \"x\"}}\n"),
        )
        .unwrap();
        let e = cli_eval(args(&gold_path, &bad, &out))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.jsonl:6") && e.contains("nope"), "{e}");
    }

    #[test]
    fn report_groups_by_language() {
        let gold = vec![
            pair("a", "en", "A [CELEX 1, Art. 1]", "1", "1"),
            pair("b", "fr", "B [CELEX 2, Art. 2]", "2", "2"),
            pair("c", "fr", "C [CELEX 2, Art. 3]", "2", "3"),
        ];
        let outputs: HashMap<String, String> = [
            ("a".to_string(), gold[0].answer.clone()),
            ("b".to_string(), "wrong".to_string()),
        ]
        .into();
        let r = report(&gold, &outputs, &index_from_gold(&gold), "gold");
        assert_eq!(r.overall.examples, 3);
        assert!((r.overall.exact_match - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.by_language["en"].exact_match, 1.0);
        assert_eq!(r.by_language["fr"].exact_match, 0.0);
        assert_eq!(r.by_language["fr"].missing_predictions, 1);
        assert!(table(&r).contains("| lang fr | 2 |"));
    }
}
