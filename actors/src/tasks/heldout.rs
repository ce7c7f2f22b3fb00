//! The held-out evaluation set (`[eval]`): documents never trained on, packed once at the start of a run into
//! sequences exactly like the training stream's (same tokenizer, BOS, end-of-text, packer), one language at a time,
//! so that the trainer can measure a loss per language every `eval.every` steps (`docs/EVAL_LOSS.md`).
//!
//! Where the documents come from:
//! * `eval.paths`: files of their own (FORMEX, or Q&A `.jsonl` that may mix languages, such as `lexflow qa build`'s
//!   `eval.jsonl`);
//! * `eval.holdout`: a fraction of the input's act packages, taken out of the training lanes. A package is a manifest
//!   and the files it lists (body, annexes), or a file no manifest claims ([`crate::stages::reader::PackageKeys`]); the
//!   choice is a hash of the package's key, its body's name with the language code blanked
//!   ([`crate::stages::formex::lang_neutral_name`]). So an act is held out whole (an annex of a held-out act in the training
//!   data would leak it) and in every language or in none (so would a translation), and the choice does not depend
//!   on the order or the size of the corpus.
//!
//! The set is the same for every rank, every thread count and every resume of the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{EvalConfig, PackerConfig};
use crate::stages::packer::Packer;
use crate::stages::reader::{self, ManifestIndex, Quarantine};
use crate::stages::tokenizer::Tokenizer;
use crate::types::{DocId, PackedSequence, TokenizedDoc};

/// Summary of the held-out set in the run directory (`HeldOutSet` as JSON).
pub const SET_FILE: &str = "eval_set.json";
/// One line per evaluation ([`EvalResult`]), appended by rank 0 (a resumed run appends its own).
pub const RESULTS_FILE: &str = "eval.jsonl";

/// How `eval.holdout` groups the input files it chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldoutSplit {
    /// By act package: a manifest and the files it lists go together ([`crate::stages::reader::PackageKeys`]).
    Package,
    /// By file, each on its own language-neutral name: what lexflow did before checkpoints recorded their inputs
    /// (an annex or manifest could land on the other side from its act's body). Kept only to resume and replay
    /// checkpoints written then exactly.
    File,
}

/// Whether `path` belongs to the held-out `fraction` of the input, by file ([`HoldoutSplit::File`]).
pub fn is_held_out(path: &Path, fraction: f64) -> bool {
    let mut key = crate::stages::formex::lang_neutral_name(&path.to_string_lossy());
    // `x.xml` and `x.xml.zst` are the same act.
    for ext in [".zst", ".gz"] {
        if let Some(k) = key.strip_suffix(ext) {
            key = k.to_string();
        }
    }
    key_held_out(&key, fraction)
}

/// Whether the package (or file) `key` belongs to the held-out `fraction`.
pub fn key_held_out(key: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(key.as_bytes());
    let x = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    (x as f64) < fraction * 18_446_744_073_709_551_616.0
}

/// Splits the input files into (training, held out); order is kept on both sides. `manifests`: the index of the
/// whole input (before the split), which knows the packages.
pub fn split_files(
    files: Vec<PathBuf>,
    fraction: f64,
    manifests: &ManifestIndex,
    split: HoldoutSplit,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    match split {
        HoldoutSplit::File => files.into_iter().partition(|f| !is_held_out(f, fraction)),
        HoldoutSplit::Package => {
            if fraction <= 0.0 {
                return (files, Vec::new());
            }
            let keys = manifests.package_keys();
            files
                .into_iter()
                .partition(|f| !key_held_out(&keys.key_of(f), fraction))
        }
    }
}

/// One language of the held-out set.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutLang {
    pub lang: String,
    /// Documents packed (a document split over the `max_sequences` limit counts).
    pub documents: u64,
    pub sequences: usize,
    /// Positions whose target counts in the loss (not padding, not prompt tokens).
    pub target_tokens: u64,
    #[serde(skip)]
    pub seqs: Vec<PackedSequence>,
}

/// The whole held-out set, languages in `sampler.mix` order.
#[derive(Debug, Clone, Serialize, Default)]
pub struct HeldOutSet {
    pub languages: Vec<HeldOutLang>,
    /// Files given (`eval.paths`) or held out of the input (`eval.holdout`).
    pub files: u64,
    /// Their paths, in the order they are read.
    pub paths: Vec<String>,
    /// Files actually read (reading stops once every language has `max_sequences`).
    pub files_read: u64,
    /// Files that failed to parse (recorded in the run's quarantine report, like training inputs).
    pub quarantined_files: u64,
    /// Documents in a language outside `sampler.mix` (not evaluated, counted).
    pub documents_outside_mix: u64,
    /// sha256 prefix over every sequence's tokens, in order: the identity of the set.
    pub hash: String,
}

impl HeldOutSet {
    pub fn is_empty(&self) -> bool {
        self.languages.iter().all(|l| l.seqs.is_empty())
    }

    /// Every sequence with its language index, in the order ranks share them out (`k % world`).
    pub fn sequences(&self) -> Vec<(usize, &PackedSequence)> {
        self.languages
            .iter()
            .enumerate()
            .flat_map(|(li, l)| l.seqs.iter().map(move |s| (li, s)))
            .collect()
    }
}

/// Everything [`build`] needs besides the files.
pub struct BuildSpec<'a> {
    pub eval: &'a EvalConfig,
    /// Prompt format of Q&A inputs (the run's `input.qa_template`).
    pub qa: crate::stages::qa_format::PromptFormat,
    pub packer: &'a PackerConfig,
    pub langs: &'a [String],
    pub tokenizer: &'a Tokenizer,
    pub add_bos: bool,
    pub eot: u32,
    pub pad: u32,
}

/// Reads, tokenizes and packs `files` (in order) into at most `eval.max_sequences` sequences per language. A file
/// that fails to parse is recorded in `quarantine` and counted; the others still make the set.
pub fn build(
    files: &[(PathBuf, &ManifestIndex)],
    spec: &BuildSpec<'_>,
    quarantine: &Quarantine,
) -> HeldOutSet {
    let max = spec.eval.max_sequences;
    // Unmetered: the held-out sequences are not part of the training stream's `lexflow_packer_*` metrics.
    let mut packers: Vec<Packer> = spec
        .langs
        .iter()
        .map(|_| Packer::unmetered(spec.packer, spec.eot, spec.pad))
        .collect();
    let mut out: Vec<Vec<PackedSequence>> = vec![Vec::new(); spec.langs.len()];
    let mut documents = vec![0u64; spec.langs.len()];
    let mut set = HeldOutSet {
        files: files.len() as u64,
        paths: files.iter().map(|(p, _)| p.display().to_string()).collect(),
        ..Default::default()
    };
    let read_opts = reader::ReadOptions {
        qa: spec.qa.clone(),
        mixed_languages: true,
    };
    let lane_of = |lang: Option<&str>| lang.and_then(|l| spec.langs.iter().position(|x| x == l));
    for (fi, (path, manifests)) in files.iter().enumerate() {
        if out.iter().all(|o| o.len() >= max) {
            break;
        }
        // A file of one language whose sequences are complete is not read (Q&A files may mix languages).
        if !reader::is_qa_jsonl(path) {
            if let Some(li) = lane_of(reader::sniff_lang(path).as_deref()) {
                if out[li].len() >= max {
                    continue;
                }
            }
        }
        let docs = match reader::read_file_with(path, manifests, &read_opts) {
            Ok(d) => d,
            Err(e) => {
                quarantine.record(&e);
                set.quarantined_files += 1;
                continue;
            }
        };
        set.files_read += 1;
        for (ordinal, d) in docs.iter().enumerate() {
            if d.text.is_empty() {
                continue;
            }
            let lang = d.lang.clone().or_else(|| reader::sniff_lang(path));
            let Some(li) = lane_of(lang.as_deref()) else {
                set.documents_outside_mix += 1;
                continue;
            };
            if out[li].len() >= max {
                continue;
            }
            let (mut tokens, mut loss_from) = spec.tokenizer.encode_document(d);
            if spec.add_bos {
                // As the training tokenizers do: the BOS shifts the prompt of instruction data.
                let added = crate::stages::tokenize::prepend_bos(spec.tokenizer, &mut tokens);
                if loss_from > 0 {
                    loss_from += added;
                }
            }
            let doc = TokenizedDoc {
                id: DocId {
                    lane: li as u16,
                    file: fi as u32,
                    ordinal: ordinal as u32,
                },
                celex: d.celex.as_deref().map(Into::into),
                text_bytes: d.text.len(),
                tokens,
                loss_from,
            };
            documents[li] += 1;
            packers[li].push(&doc);
            while let Some(s) = packers[li].pop() {
                if out[li].len() < max {
                    out[li].push(s);
                }
            }
        }
    }
    for (li, p) in packers.iter_mut().enumerate() {
        p.flush();
        while let Some(s) = p.pop() {
            if out[li].len() < max {
                out[li].push(s);
            }
        }
    }
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (li, seqs) in out.into_iter().enumerate() {
        let target_tokens = seqs
            .iter()
            .map(|s| lexflow_gpu::valid_targets(&crate::common::device::seq_ref(s)) as u64)
            .sum();
        for s in &seqs {
            for t in &s.tokens {
                h.update(t.to_le_bytes());
            }
        }
        set.languages.push(HeldOutLang {
            lang: spec.langs[li].clone(),
            documents: documents[li],
            sequences: seqs.len(),
            target_tokens,
            seqs,
        });
    }
    set.hash = hex::encode(&h.finalize()[..8]);
    set
}

/// One evaluation: the loss on the held-out set and/or the Q&A scores, at one step.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct EvalResult {
    pub step: u64,
    /// Mean cross-entropy per target token over every language (token-weighted); None without a held-out set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
    pub languages: BTreeMap<String, EvalLang>,
    /// `eval.qa_gold`: the model's answers scored like `lexflow qa eval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qa: Option<QaEvalResult>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct EvalLang {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
    pub sequences: usize,
}

/// Q&A scores at one evaluation.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct QaEvalResult {
    pub overall: crate::tasks::eval::Aggregate,
    pub by_language: BTreeMap<String, crate::tasks::eval::Aggregate>,
    pub seconds: f64,
    /// The answers (`{"id", "lang", "output"}` lines).
    pub predictions: PathBuf,
}

/// Directory of the Q&A evaluation files in the run directory (`gold.jsonl`, `step-NNNNNN.jsonl`).
pub const QA_DIR: &str = "eval_qa";

/// The questions asked at every evaluation (`eval.qa_gold`), with everything needed to ask and score them.
pub struct QaProbe {
    pub gold: Vec<crate::stages::qa_format::QaPair>,
    /// Prompt token ids per question (the run's `input.qa_template`).
    pub prompts: Vec<Vec<i64>>,
    pub index: crate::tasks::qa::CitationIndex,
    pub index_source: String,
    pub stops: Vec<u32>,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub tokenizer: Tokenizer,
}

impl std::fmt::Debug for QaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QaProbe")
            .field("questions", &self.gold.len())
            .field("max_new_tokens", &self.max_new_tokens)
            .field("batch_size", &self.batch_size)
            .field("index", &self.index_source)
            .finish()
    }
}

/// Reads `eval.qa_gold` and keeps, in file order, the first `eval.qa_per_language` pairs of every language of the
/// mix; tokenizes their prompts with the run's prompt format.
pub fn qa_probe(
    cfg: &crate::config::Config,
    tokenizer: Tokenizer,
) -> anyhow::Result<Option<QaProbe>> {
    let e = &cfg.eval;
    let Some(path) = &e.qa_gold else {
        return Ok(None);
    };
    let all = crate::tasks::qa::read_pairs(path)
        .map_err(|err| anyhow::anyhow!("eval.qa_gold: {err:#}"))?;
    let mut per_lang: BTreeMap<&str, usize> = BTreeMap::new();
    let gold: Vec<crate::stages::qa_format::QaPair> = all
        .iter()
        .filter(|p| {
            if !cfg.sampler.mix.contains_key(&p.lang) {
                return false;
            }
            let n = per_lang.entry(p.lang.as_str()).or_default();
            *n += 1;
            *n <= e.qa_per_language
        })
        .cloned()
        .collect();
    anyhow::ensure!(
        !gold.is_empty(),
        "eval.qa_gold = {}: no pair in a language of sampler.mix ({} pairs read)",
        path.display(),
        all.len()
    );
    let format = cfg.input.prompt_format();
    format.check_tokenizer(&tokenizer)?;
    let prompts = gold
        .iter()
        .map(|g| crate::tasks::decode::prompt_ids(&tokenizer, &format, &g.question))
        .collect();
    let (index, index_source) = crate::tasks::eval::load_index(e.qa_index.as_deref(), &all)
        .map_err(|err| anyhow::anyhow!("eval.qa_index: {err:#}"))?;
    Ok(Some(QaProbe {
        gold,
        prompts,
        index,
        index_source,
        stops: crate::tasks::decode::stop_ids(&tokenizer),
        max_new_tokens: e.qa_max_new_tokens,
        batch_size: e.qa_batch_size.get(),
        tokenizer,
    }))
}

/// Aggregates per-sequence loss sums (in [`HeldOutSet::sequences`] order) into an [`EvalResult`]: sums in index
/// order, so the result does not depend on how the sequences were shared among ranks.
pub fn aggregate(set: &HeldOutSet, step: u64, sums: &[f64], seconds: f64) -> EvalResult {
    let mut languages = BTreeMap::new();
    let (mut total, mut tokens) = (0.0f64, 0u64);
    let mut k = 0;
    for l in &set.languages {
        let s: f64 = sums[k..k + l.seqs.len()].iter().sum();
        k += l.seqs.len();
        if l.seqs.is_empty() {
            continue;
        }
        total += s;
        tokens += l.target_tokens;
        let loss = s / (l.target_tokens.max(1)) as f64;
        languages.insert(
            l.lang.clone(),
            EvalLang {
                loss,
                perplexity: loss.exp(),
                tokens: l.target_tokens,
                sequences: l.seqs.len(),
            },
        );
    }
    EvalResult {
        step,
        loss: Some(total / (tokens.max(1)) as f64),
        tokens,
        seconds,
        languages,
        qa: None,
    }
}

/// The evaluations of a run (`eval.jsonl`), one per step in step order: after a crash and resume a step evaluated
/// twice keeps its last record; a torn last line (killed mid-write) is ignored.
pub fn read_results(run_dir: &Path) -> anyhow::Result<Vec<EvalResult>> {
    let path = run_dir.join(RESULTS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read: {e} (a run writes it when its config has an [eval] section)",
            path.display()
        )
    })?;
    let mut by_step = BTreeMap::new();
    for l in text.lines() {
        if let Ok(r) = serde_json::from_str::<EvalResult>(l) {
            by_step.insert(r.step, r);
        }
    }
    Ok(by_step.into_values().collect())
}

/// `lexflow evals RUN_DIR [--json]`: the evaluation history of a run as a table (held-out loss overall and per
/// language, Q&A scores), or as JSON lines.
pub fn cli_evals(run_dir: &Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let rs = read_results(run_dir)?;
    let text = if json {
        let mut t = String::new();
        for r in &rs {
            t += &serde_json::to_string(r)?;
            t.push('\n');
        }
        t
    } else {
        results_table(&rs)
    };
    crate::common::output::print_to_stdout(&text)?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Markdown table of evaluations: one row per step.
pub fn results_table(rs: &[EvalResult]) -> String {
    use std::fmt::Write;
    let langs: std::collections::BTreeSet<&str> = rs
        .iter()
        .flat_map(|r| r.languages.keys().map(String::as_str))
        .collect();
    let qa = rs.iter().any(|r| r.qa.is_some());
    let mut head = vec!["step".to_string(), "loss".to_string()];
    head.extend(langs.iter().map(|l| format!("loss {l}")));
    if qa {
        head.extend(
            ["citation acc.", "hallucination", "ROUGE-L", "exact match"]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
    let f = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.4}"));
    for r in rs {
        let mut row = vec![r.step.to_string(), f(r.loss)];
        row.extend(langs.iter().map(|l| f(r.languages.get(*l).map(|x| x.loss))));
        if qa {
            let o = r.qa.as_ref().map(|q| &q.overall);
            row.extend([
                f(o.map(|a| a.citation_accuracy)),
                f(o.map(|a| a.hallucination_rate)),
                f(o.map(|a| a.rouge_l)),
                f(o.map(|a| a.exact_match)),
            ]);
        }
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_keeps_an_act_together_in_every_language_and_hits_the_fraction() {
        let langs = ["EN", "FR", "DE", "ES", "PT", "IT"];
        let mut held = 0;
        let n = 2000;
        for i in 0..n {
            let versions: Vec<bool> = langs
                .iter()
                .map(|l| {
                    is_held_out(
                        Path::new(&format!("/c/{l}/L_2016{i:03}{l}.01000101.xml")),
                        0.1,
                    )
                })
                .collect();
            assert!(
                versions.iter().all(|&v| v == versions[0]),
                "act {i}: held out in some languages only: {versions:?}"
            );
            // Consolidated names, compressed or not, and the directory do not matter either.
            let cl = |l: &str, ext: &str| {
                is_held_out(
                    Path::new(&format!("/x/{l}/CL2019L{i:04}{l}0010010.0001.xml{ext}")),
                    0.1,
                )
            };
            assert_eq!(cl("EN", ""), cl("FR", ".zst"), "act {i}");
            held += versions[0] as usize;
        }
        // 2000 draws at p = 0.1: mean 200, sd ≈ 13.4.
        assert!((150..250).contains(&held), "held out {held} of {n} at 0.1");
        assert!(!is_held_out(Path::new("L_2016119EN.01000101.xml"), 0.0));
        assert!(is_held_out(Path::new("L_2016119EN.01000101.xml"), 1.0));
        // Different acts differ: the hash sees the act number.
        let a: Vec<bool> = (0..64)
            .map(|i| is_held_out(Path::new(&format!("CL2019L{i:04}EN0010010.0001.xml")), 0.5))
            .collect();
        assert!(a.iter().any(|&x| x) && a.iter().any(|&x| !x), "{a:?}");
    }

    #[test]
    fn language_neutral_names() {
        use crate::stages::formex::lang_neutral_name as n;
        assert_eq!(n("a/L_2016119EN.01000101.xml"), "L_2016119__.01000101.xml");
        assert_eq!(
            n("CL2016R0679FR0000020.0001.xml"),
            "CL2016R0679__0000020.0001.xml"
        );
        assert_eq!(n("62018CJ0311.lv.fmx.xml"), "62018CJ0311.__.fmx.xml");
        assert_eq!(n("act_de.xml"), "act___.xml");
        // No language code: the name itself (and non-ASCII names do not panic).
        assert_eq!(n("32022R1925-formex.xml"), "32022R1925-formex.xml");
        assert_eq!(n("dé.xml"), "dé.xml");
        assert_eq!(n("abcé.xml"), "abcé.xml");
        assert_eq!(n("abc€.xml"), "abc€.xml");
        assert_eq!(crate::stages::formex::lang_from_filename("abc€.xml"), None);
    }

    #[test]
    fn holdout_keeps_an_act_package_together_on_the_real_corpus() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/formex"
        ));
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        files.sort();
        let index = ManifestIndex::build(&files);
        let keys = index.package_keys();
        let key = |n: &str| keys.key_of(&dir.join(n));
        // Packages of the corpus: a manifest, its parts, its table of contents, its translations without manifests.
        let packages: [&[&str]; 4] = [
            &[
                "L_2017154EN.01000101.doc.xml",
                "L_2017154EN.01000101.xml",
                "L_2017154EN.01008901.xml",
                "L_2017154EN.01009301.xml",
                "L_2017154EN.01009401.xml",
            ],
            &[
                "L_202401689EN.doc.fmx.xml",
                "L_202401689EN.toc.fmx.xml",
                "L_202401689EN.000101.fmx.xml",
                "L_202401689EN.012401.fmx.xml",
                "L_202401689EN.014401.fmx.xml",
            ],
            &[
                "L_2016119EN.01000101.doc.xml",
                "L_2016119EN.01000101.xml",
                "L_2016119DE.01000101.xml",
                "L_2016119PT.01000101.xml",
            ],
            &["32024R2847-formex.xml", "32024R2847-toc-formex.xml"],
        ];
        for p in packages {
            let k = key(p[0]);
            for f in p {
                assert_eq!(key(f), k, "{f} is not in the package of {}", p[0]);
            }
        }
        // A body with no manifest keeps the key the file split gave it (existing splits of such corpora hold).
        assert_eq!(
            key("CL1967L0227FR0030010.0001.xml"),
            "CL1967L0227__0030010.0001.xml"
        );
        // Different acts are different packages.
        assert_ne!(
            key("L_2017154EN.01000101.xml"),
            key("L_2018127EN.01000201.xml")
        );
        assert_ne!(
            key("L_202400903EN.000101.fmx.xml"),
            key("L_202401689EN.000101.fmx.xml")
        );

        // At any fraction, the package split never separates a package; the file split did.
        let mut file_split_separated = 0;
        for i in 1..40 {
            let fraction = i as f64 / 40.0;
            for (split, separated) in [
                (HoldoutSplit::Package, &mut 0),
                (HoldoutSplit::File, &mut file_split_separated),
            ] {
                let (_, held) = split_files(files.clone(), fraction, &index, split);
                for p in packages {
                    let n = p.iter().filter(|f| held.contains(&dir.join(f))).count();
                    if n != 0 && n != p.len() {
                        assert_eq!(
                            split,
                            HoldoutSplit::File,
                            "fraction {fraction}: {p:?} split"
                        );
                        *separated += 1;
                    }
                }
            }
        }
        assert!(file_split_separated > 0);
    }

    #[test]
    fn split_keeps_order_and_loses_nothing() {
        let files: Vec<PathBuf> = (0..300)
            .map(|i| PathBuf::from(format!("d/CL2020R{i:04}DE0010010.0001.xml")))
            .collect();
        let none = ManifestIndex::default();
        for split in [HoldoutSplit::File, HoldoutSplit::Package] {
            let (train, held) = split_files(files.clone(), 0.2, &none, split);
            assert_eq!(train.len() + held.len(), files.len());
            assert!(train.windows(2).all(|w| w[0] < w[1]) && held.windows(2).all(|w| w[0] < w[1]));
            // Without manifests every file is its own package: both splits agree.
            assert!(
                held.iter().all(|f| is_held_out(f, 0.2))
                    && train.iter().all(|f| !is_held_out(f, 0.2))
            );
            let (t0, h0) = split_files(files.clone(), 0.0, &none, split);
            assert!(h0.is_empty() && t0.len() == 300);
        }
    }

    #[test]
    fn holdout_keeps_an_act_package_together_across_language_directories() {
        // The generated corpus has a directory per language. Drop the French manifests (a language version without
        // a manifest of its own), and move the German annexes out of their manifest's directory (a manifest listing
        // files kept elsewhere): every file of an act must still go with its act.
        let tmp = tempfile::tempdir().unwrap();
        let g = crate::config::GenerateConfig {
            acts_per_language: 6,
            languages: vec!["en".into(), "fr".into(), "de".into()],
            seed: 7,
        };
        crate::stages::gen_sample::generate(&g, tmp.path()).unwrap();
        let dir = |l: &str| tmp.path().join(l);
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        for n in names(&dir("fr")) {
            if n.contains(".doc.") {
                std::fs::remove_file(dir("fr").join(n)).unwrap();
            }
        }
        std::fs::create_dir_all(tmp.path().join("de-annexes")).unwrap();
        for n in names(&dir("de")) {
            if !n.contains(".doc.") && !n.contains(".01000101.") && n.ends_with(".xml") {
                std::fs::rename(dir("de").join(&n), tmp.path().join("de-annexes").join(&n))
                    .unwrap();
            }
        }
        let files =
            crate::stages::reader::expand_inputs(&[tmp.path().display().to_string()]).unwrap();
        let index = ManifestIndex::build(&files);
        let keys = index.package_keys();
        // Every file of an act (`L_2023104EN.…`, `L_2023104FR.…`, …) has the key of the act's package.
        let act = |f: &PathBuf| {
            let n = f.file_name().unwrap().to_string_lossy().into_owned();
            crate::stages::formex::lang_neutral_name(&n[..n.find('.').unwrap()])
        };
        let mut key_of_act: BTreeMap<String, String> = BTreeMap::new();
        let mut annexes = 0;
        for f in files
            .iter()
            .filter(|f| !f.to_string_lossy().ends_with(".zip"))
        {
            let k = key_of_act.entry(act(f)).or_insert_with(|| keys.key_of(f));
            assert_eq!(
                &keys.key_of(f),
                k,
                "{} is not in its act's package",
                f.display()
            );
            annexes += usize::from(
                f.parent().unwrap().ends_with("de-annexes") || f.to_string_lossy().contains("FR"),
            );
        }
        assert!(
            annexes > 6,
            "the corpus has annexes in every language: {files:?}"
        );
        // So at any fraction no act is split.
        assert_no_act_split(&files, &index, act);
    }

    #[test]
    fn a_zip_package_has_the_key_of_its_unpacked_files() {
        // English as a zip package (manifest, body, annexes), French unpacked without a manifest of its own.
        let real = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/formex"
        ));
        let tmp = tempfile::tempdir().unwrap();
        let zip_path = tmp.path().join("L_2017154EN.zip");
        let mut zw = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
        let members = [
            "L_2017154EN.01009401.xml",
            "L_2017154EN.01000101.doc.xml",
            "L_2017154EN.01000101.xml",
            "L_2017154EN.01008901.xml",
        ];
        for m in members {
            zw.start_file(m, zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut zw, &std::fs::read(real.join(m)).unwrap()).unwrap();
        }
        zw.finish().unwrap();
        let fr = tmp.path().join("fr");
        std::fs::create_dir_all(&fr).unwrap();
        let mut files = vec![zip_path.clone()];
        for (m, n) in [
            ("L_2017154EN.01000101.xml", "L_2017154FR.01000101.xml"),
            ("L_2017154EN.01008901.xml", "L_2017154FR.01008901.xml"),
        ] {
            std::fs::copy(real.join(m), fr.join(n)).unwrap();
            files.push(fr.join(n));
        }
        // Without a manifest the zip's first FORMEX member names it.
        let bare = tmp.path().join("L_2018127DE.zip");
        let mut zw = zip::ZipWriter::new(std::fs::File::create(&bare).unwrap());
        zw.start_file(
            "L_2018127DE.01000201.xml",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        std::io::Write::write_all(
            &mut zw,
            &std::fs::read(real.join("L_2018127EN.01000201.xml")).unwrap(),
        )
        .unwrap();
        zw.finish().unwrap();
        files.push(bare.clone());
        let index = ManifestIndex::build(&files);
        let keys = index.package_keys();
        assert_eq!(keys.key_of(&zip_path), "L_2017154__.01000101.xml");
        assert_eq!(keys.key_of(&files[1]), "L_2017154__.01000101.xml");
        assert_eq!(keys.key_of(&bare), "L_2018127__.01000201.xml");
        assert_eq!(
            keys.key_of(&real.join("L_2018127EN.01000201.xml")),
            keys.key_of(&bare)
        );
        // A broken zip keeps its own name (the reader reports it).
        let broken = tmp.path().join("L_2019001EN.zip");
        std::fs::write(&broken, b"PK\x03\x04 no").unwrap();
        assert_eq!(keys.key_of(&broken), "L_2019001__.zip");
    }

    #[test]
    fn holdout_keeps_a_cellar_package_together() {
        // Cellar names an act's files `DOC_1.xml` (the manifest, listing the OJ names), `DOC_2.xml`, … in a directory
        // per act and language; the real corpus has one such package with its directory flattened into the names.
        let real = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpus/formex"
        ));
        let prefix = "tulit__e115172d-3ab3-4b14-b0a4-dfdcc9871793.0006.04__";
        let tmp = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (act, oj) in [
            ("e115.0006.04", "L_2008311EN"),
            ("f226.0006.04", "L_2009999EN"),
        ] {
            let d = tmp.path().join(act);
            std::fs::create_dir_all(&d).unwrap();
            for n in 1..=4 {
                let text =
                    std::fs::read_to_string(real.join(format!("{prefix}DOC_{n}.xml"))).unwrap();
                std::fs::write(
                    d.join(format!("DOC_{n}.xml")),
                    text.replace("L_2008311EN", oj),
                )
                .unwrap();
                files.push(d.join(format!("DOC_{n}.xml")));
            }
        }
        for n in 1..=4 {
            files.push(real.join(format!("{prefix}DOC_{n}.xml")));
        }
        let index = ManifestIndex::build(&files);
        let keys = index.package_keys();
        let k: Vec<String> = files.iter().map(|f| keys.key_of(f)).collect();
        // One key per act: its body's language-neutral OJ name, the key of its other language versions too.
        assert_eq!(k[..4], ["L_2008311__.01000101.xml"; 4], "{files:?}");
        assert_eq!(k[4..8], ["L_2009999__.01000101.xml"; 4], "{files:?}");
        assert_eq!(k[8..], ["L_2008311__.01000101.xml"; 4], "{files:?}");
        // So the body (`DOC_2.xml`) of every act is not one package, held out for all acts or for none.
        let dirs: Vec<PathBuf> = files.iter().map(|f| f.parent().unwrap().into()).collect();
        assert_no_act_split(&files, &index, |f| {
            // The real corpus's act is flattened into one directory with other files: its 4 files are the last.
            let i = files.iter().position(|g| g == f).unwrap();
            format!("{} #{}", dirs[i].display(), i / 4)
        });
    }

    /// At fractions 0.05, 0.10, …, 0.95 the package split never puts two files of one act (`act(file)`) on
    /// different sides.
    fn assert_no_act_split(
        files: &[PathBuf],
        index: &ManifestIndex,
        act: impl Fn(&PathBuf) -> String,
    ) {
        for i in 1..20 {
            let fraction = i as f64 / 20.0;
            let (_, held) = split_files(files.to_vec(), fraction, index, HoldoutSplit::Package);
            let mut side: BTreeMap<String, bool> = BTreeMap::new();
            for f in files {
                let h = held.contains(f);
                let first = *side.entry(act(f)).or_insert(h);
                assert_eq!(
                    first,
                    h,
                    "act {} split at {fraction}: {}",
                    act(f),
                    f.display()
                );
            }
        }
    }
}
