//! `[filter]` in a run: the first pass that fixes each lane's cut (or the cut the checkpoint a resume or replay
//! continues recorded), the `filter.<lang>` actor that decides in the stream, and `lexflow filter`'s listing of a
//! config's scores and verdicts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use lexflow_dataflow::EdgeReceiver;

use crate::config::Config;
use crate::run::dedup::build_dedup_index;
use crate::run::heldout::eval_paths_files;
use crate::run::lanes::{input_files, lanes_of, Lane};
use crate::stages::filter::{
    config_text, fraction_cut, FilterConfig, FilterLaneReport, FilterReport, FilterState, LaneCut,
    RankKey, Score, Scorer, STATE_FILE,
};
use crate::stages::reader;
use crate::types::{DocBatch, Document};

/// The filter of a run: the cut of every lane, the scorer, and what the lanes' actors counted.
#[derive(Debug)]
pub struct FilterSetup {
    pub state: FilterState,
    pub scorer: Scorer,
    pub first_pass_seconds: f64,
    reports: Vec<Mutex<FilterLaneReport>>,
}

impl FilterSetup {
    fn new(cfg: &FilterConfig, state: FilterState, first_pass_seconds: f64) -> Self {
        FilterSetup {
            scorer: Scorer::new(cfg),
            reports: state.lanes.iter().map(|_| Mutex::default()).collect(),
            state,
            first_pass_seconds,
        }
    }

    /// `filter.json`, as every checkpoint and `<run.dir>` hold it.
    pub fn state_json(&self) -> String {
        serde_json::to_string_pretty(&self.state).expect("filter state is JSON")
    }

    /// Decides for document `ordinal` of file `file` (counting on across epochs) of lane `lane`, whose files are
    /// `paths`; None for a document that is not scored (no text: a manifest, a dedup drop, a document a resume
    /// skips; or an instruction pair).
    pub fn decide(
        &self,
        lane: usize,
        paths: &[PathBuf],
        file: u32,
        ordinal: u32,
        doc: &Document,
    ) -> Option<(bool, Score, &'static str)> {
        if doc.text.is_empty() || doc.answer_start.is_some() || paths.is_empty() {
            return None;
        }
        let at = file % paths.len() as u32;
        let s = self.scorer.score(doc);
        let key = RankKey::new(s.score, &paths[at as usize].to_string_lossy(), at, ordinal);
        let keep = self.state.lanes[lane].1.keeps(&key);
        Some((keep, s, if keep { "kept" } else { self.scorer.reason(&s) }))
    }

    pub fn report(&self, cfg: &FilterConfig) -> FilterReport {
        FilterReport {
            keep_fraction: cfg.keep_fraction,
            threshold: cfg.threshold,
            first_pass_seconds: self.first_pass_seconds,
            cuts: self.state.lanes.iter().cloned().collect(),
            per_lang: self
                .state
                .lanes
                .iter()
                .zip(&self.reports)
                .map(|((l, _), r)| (l.clone(), r.lock().map(|g| g.clone()).unwrap_or_default()))
                .collect(),
        }
    }
}

/// What `lexflow filter` lists of a document besides its score: CELEX, kind, date, title.
pub(super) type DocMeta = (Option<String>, &'static str, Option<String>, Option<String>);

/// One scored document of the first pass.
#[derive(Debug, Clone)]
pub(super) struct Scored {
    pub file: u32,
    pub ordinal: u32,
    pub score: Score,
    pub key: RankKey,
    /// Dropped by `[dedup]` before the filter sees it: the dedup verdict (`exact`, `near`, `heldout`).
    pub dedup: Option<&'static str>,
    pub chars: u64,
    pub bytes: u64,
    /// `lexflow filter`'s listing only.
    pub meta: Option<DocMeta>,
}

/// The first pass over the lanes: every document with text (not instruction pairs) read and scored, in lane order,
/// with `[dedup]`'s first-epoch verdicts (the documents it drops never reach the filter). Files are read on
/// `threads` threads; the result does not depend on their number.
#[allow(clippy::too_many_arguments)]
pub(super) fn first_pass(
    cfg: &Config,
    fcfg: &FilterConfig,
    lanes: &[Lane],
    held_files: &[PathBuf],
    eval_files: &[PathBuf],
    manifests: &reader::ManifestIndex,
    read_opts: &reader::ReadOptions,
    threads: usize,
    describe: bool,
) -> anyhow::Result<Vec<Vec<Scored>>> {
    let scorer = Scorer::new(fcfg);
    let dedup = match cfg.dedup.enabled() {
        true => Some(build_dedup_index(
            cfg, lanes, held_files, eval_files, read_opts, None,
        )?),
        false => None,
    };
    let mut out = Vec::with_capacity(lanes.len());
    for (li, lane) in lanes.iter().enumerate() {
        type FileDocs = Vec<(Document, Option<crate::types::Signature>)>;
        let slots: Vec<Mutex<Option<FileDocs>>> =
            lane.files.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, lane.files.len().max(1)) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= lane.files.len() {
                        return;
                    }
                    let docs = match reader::read_file_with(&lane.files[k], manifests, read_opts) {
                        Ok(d) => d,
                        Err(e) if e.is_transient_io() => {
                            *failed.lock().expect("first pass") = Some(anyhow::anyhow!(
                                "[filter] first pass: {e} (an I/O failure: the run would stop on it too)"
                            ));
                            return;
                        }
                        // Bad input: the run quarantines it (no documents).
                        Err(_) => Vec::new(),
                    };
                    let docs = docs
                        .into_iter()
                        .map(|d| {
                            let sig = match &dedup {
                                Some(x) if !d.text.is_empty() => Some(x.hasher.signature(&d)),
                                _ => None,
                            };
                            (d, sig)
                        })
                        .collect();
                    *slots[k].lock().expect("first pass") = Some(docs);
                });
            }
        });
        if let Some(e) = failed.into_inner().expect("first pass") {
            return Err(e);
        }
        let mut scored = Vec::new();
        for (k, slot) in slots.into_iter().enumerate() {
            let name = lane.files[k].to_string_lossy();
            for (i, (d, sig)) in slot
                .into_inner()
                .expect("first pass")
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                if d.text.is_empty() || d.answer_start.is_some() {
                    continue;
                }
                let dd = match (&dedup, &sig) {
                    (Some(x), Some(sig)) => {
                        let v = x.decide(li, k as u32, i as u32, sig);
                        (v != crate::stages::dedup::Verdict::Keep).then(|| v.label())
                    }
                    _ => None,
                };
                let score = scorer.score(&d);
                scored.push(Scored {
                    file: k as u32,
                    ordinal: i as u32,
                    key: RankKey::new(score.score, &name, k as u32, i as u32),
                    score,
                    dedup: dd,
                    chars: d.text.chars().count() as u64,
                    bytes: d.text.len() as u64,
                    meta: describe.then(|| {
                        (
                            d.celex.clone(),
                            d.doc_type.as_str(),
                            d.date.clone(),
                            d.title.clone(),
                        )
                    }),
                });
            }
        }
        out.push(scored);
    }
    Ok(out)
}

/// The cut of every lane from a first pass (documents dedup drops are not in the population).
pub(super) fn cuts_of(fcfg: &FilterConfig, lanes: &[Lane], pass: &[Vec<Scored>]) -> FilterState {
    FilterState {
        config: config_text(fcfg),
        lanes: lanes
            .iter()
            .zip(pass)
            .map(|(l, docs)| {
                let cut = match (fcfg.keep_fraction, fcfg.threshold) {
                    (Some(f), _) => fraction_cut(
                        f,
                        docs.iter()
                            .filter(|d| d.dedup.is_none())
                            .map(|d| d.key)
                            .collect(),
                    ),
                    (None, t) => LaneCut::Threshold {
                        threshold: t.unwrap_or(0.0),
                    },
                };
                (l.lang.clone(), cut)
            })
            .collect(),
    }
}

/// The filter of a run: the cuts of the checkpoint it continues (`checkpoint`: the resumed one, or the replayed
/// run's), checked against this config; else those of a threshold, or of a first pass over the lanes.
#[allow(clippy::too_many_arguments)]
pub(super) fn build_filter(
    cfg: &Config,
    fcfg: &FilterConfig,
    lanes: &[Lane],
    held_files: &[PathBuf],
    eval_files: &[PathBuf],
    manifests: &reader::ManifestIndex,
    read_opts: &reader::ReadOptions,
    checkpoint: Option<&Path>,
) -> anyhow::Result<FilterSetup> {
    let langs: Vec<String> = lanes.iter().map(|l| l.lang.clone()).collect();
    if let Some(dir) = checkpoint {
        let p = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: the checkpoint has no filter state, but the config has [filter]: the checkpoint's run was not \
                 filtered, so it cannot be continued or replayed with one",
                p.display()
            )
        })?;
        let mut state: FilterState = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a lexflow filter state", p.display()))?;
        state.check_matches(fcfg, &langs).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}\nresume and replay need the [filter] the run was started with",
                p.display()
            )
        })?;
        // A threshold is the config's own number (JSON need not give back the same double).
        if let Some(t) = fcfg.threshold {
            for (_, c) in &mut state.lanes {
                *c = LaneCut::Threshold { threshold: t };
            }
        }
        tracing::info!(checkpoint = %dir.display(), "[filter]: the checkpoint's cuts");
        return Ok(FilterSetup::new(fcfg, state, 0.0));
    }
    if fcfg.keep_fraction.is_none() {
        return Ok(FilterSetup::new(
            fcfg,
            cuts_of(fcfg, lanes, &vec![Vec::new(); lanes.len()]),
            0.0,
        ));
    }
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pass = first_pass(
        cfg, fcfg, lanes, held_files, eval_files, manifests, read_opts, threads, false,
    )?;
    let state = cuts_of(fcfg, lanes, &pass);
    let secs = t.elapsed().as_secs_f64();
    for (l, c) in &state.lanes {
        if let LaneCut::Fraction {
            documents,
            keep,
            last,
        } = c
        {
            tracing::info!(
                lang = %l,
                documents,
                keep,
                cut_score = last.map(|k| k.score()),
                "[filter] first pass"
            );
        }
    }
    tracing::info!(
        seconds = format!("{secs:.2}"),
        "[filter] cuts fixed by the first pass"
    );
    Ok(FilterSetup::new(fcfg, state, secs))
}

/// The filter actor of one lane: decides in lane order, empties the text of dropped documents (the tokenizer skips
/// empty documents; ordinals stay), counts them by reason.
pub(super) fn run_filter(
    ctx: &lexflow_dataflow::ActorContext,
    f: &FilterSetup,
    lane: usize,
    lang: &str,
    paths: &[PathBuf],
    rx: EdgeReceiver<DocBatch>,
    tx: lexflow_dataflow::EdgeSender<DocBatch>,
) -> Result<(), lexflow_dataflow::ActorError> {
    let am = lexflow_metrics::actor(&format!("filter.{lang}"));
    let lat = lexflow_metrics::latency(&format!("filter.{lang}"));
    let m = lexflow_metrics::global();
    for label in ["kept", "recency", "type", "length", "subject"] {
        m.filter_documents.with_label_values(&[lang, label]);
    }
    m.filter_dropped_bytes.with_label_values(&[lang]);
    while let Ok(mut b) = rx.recv() {
        ctx.set_input(format!("file #{} of lane {lang}", b.file));
        let t = Instant::now();
        let bytes_in: u64 = b.docs.iter().map(|d| d.text.len() as u64).sum();
        let mut rep = FilterLaneReport::default();
        for (i, d) in b.docs.iter_mut().enumerate() {
            if d.answer_start.is_some() && !d.text.is_empty() {
                rep.unscored += 1;
                continue;
            }
            let Some((keep, _, label)) = f.decide(lane, paths, b.file, i as u32, d) else {
                continue;
            };
            let bytes = d.text.len() as u64;
            rep.count(keep, label, bytes);
            m.filter_documents.with_label_values(&[lang, label]).inc();
            if !keep {
                m.filter_dropped_bytes
                    .with_label_values(&[lang])
                    .inc_by(bytes);
                d.text.clear();
            }
        }
        if let Ok(mut g) = f.reports[lane].lock() {
            g.documents += rep.documents;
            g.kept += rep.kept;
            g.bytes_dropped += rep.bytes_dropped;
            g.unscored += rep.unscored;
            g.busy_seconds += t.elapsed().as_secs_f64();
            for (k, v) in rep.dropped {
                *g.dropped.entry(k).or_insert(0) += v;
            }
        }
        am.items_in.inc();
        am.items_out.inc();
        am.bytes_in.inc_by(bytes_in);
        am.bytes_out
            .inc_by(b.docs.iter().map(|d| d.text.len() as u64).sum());
        am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
        lat.record(t.elapsed());
        if tx.send(b).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `lexflow filter`: every document of a config's training input with its criteria, score and verdict, decided as
/// `lexflow run` decides (same lanes, dedup before the filter, same cuts), without tokenizing or training. `out`:
/// one JSON line per document. Returns the report: per language the cut, the counts, the score distribution.
pub fn audit_filter(cfg: &Config, out: Option<&Path>) -> anyhow::Result<serde_json::Value> {
    use std::io::Write;
    let fcfg = cfg
        .filter
        .as_ref()
        .context("the config has no [filter] section: add one with keep_fraction or threshold")?;
    let t0 = Instant::now();
    let files = input_files(cfg, &cfg.run.dir.join("corpus"))?;
    let manifests = reader::ManifestIndex::build(&files);
    let (files, held_files) = crate::tasks::heldout::split_files(
        files,
        cfg.eval.holdout,
        &manifests,
        crate::tasks::heldout::HoldoutSplit::Package,
    );
    let (lanes, _) = lanes_of(cfg, files);
    let read_opts = reader::ReadOptions {
        qa: cfg.input.prompt_format(),
        mixed_languages: false,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pass = first_pass(
        cfg,
        fcfg,
        &lanes,
        &held_files,
        &eval_paths_files(cfg)?,
        &manifests,
        &read_opts,
        threads,
        true,
    )?;
    let state = cuts_of(fcfg, &lanes, &pass);
    let setup = FilterSetup::new(fcfg, state, t0.elapsed().as_secs_f64());
    let mut w = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut per_lang = serde_json::Map::new();
    for (li, (lane, docs)) in lanes.iter().zip(&pass).enumerate() {
        let mut rep = FilterLaneReport::default();
        let mut scores = Vec::new();
        let mut kept_chars = 0u64;
        for d in docs {
            let (verdict, reason) = match d.dedup {
                Some(v) => ("dedup", Some(v)),
                None => {
                    let keep = setup.state.lanes[li].1.keeps(&d.key);
                    let reason = (!keep).then(|| setup.scorer.reason(&d.score));
                    rep.count(keep, reason.unwrap_or("kept"), d.bytes);
                    scores.push(d.score.score);
                    if keep {
                        kept_chars += d.chars;
                    }
                    (if keep { "kept" } else { "dropped" }, reason)
                }
            };
            if let Some(w) = &mut w {
                let (celex, kind, date, title) = d.meta.clone().unwrap_or((None, "", None, None));
                let line = serde_json::json!({
                    "lang": lane.lang,
                    "file": d.file,
                    "ordinal": d.ordinal,
                    "path": lane.files[d.file as usize].display().to_string(),
                    "celex": celex,
                    "doc_type": kind,
                    "date": date,
                    "title": title,
                    "chars": d.chars,
                    "criteria": {
                        "recency": d.score.recency,
                        "type": d.score.doc_type,
                        "length": d.score.length,
                        "subject": d.score.subject,
                    },
                    "score": d.score.score,
                    "verdict": verdict,
                    "reason": reason,
                });
                writeln!(w, "{line}")?;
            }
        }
        scores.sort_by(f64::total_cmp);
        let q = |p: f64| -> Option<f64> {
            (!scores.is_empty()).then(|| scores[((scores.len() - 1) as f64 * p).round() as usize])
        };
        per_lang.insert(
            lane.lang.clone(),
            serde_json::json!({
                "cut": setup.state.lanes[li].1,
                "documents": rep.documents,
                "kept": rep.kept,
                "kept_fraction": if rep.documents > 0 { rep.kept as f64 / rep.documents as f64 } else { 0.0 },
                "dropped": rep.dropped,
                "dedup_dropped": docs.iter().filter(|d| d.dedup.is_some()).count(),
                "kept_chars": kept_chars,
                "bytes_dropped": rep.bytes_dropped,
                "score": {
                    "min": q(0.0), "p10": q(0.1), "p25": q(0.25), "p50": q(0.5),
                    "p75": q(0.75), "p90": q(0.9), "max": q(1.0),
                },
            }),
        );
    }
    if let Some(mut w) = w {
        w.flush()?;
    }
    Ok(serde_json::json!({
        "keep_fraction": fcfg.keep_fraction,
        "threshold": fcfg.threshold,
        "first_pass_seconds": setup.first_pass_seconds,
        "per_lang": per_lang,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generated corpus in two lanes, read as a run reads it.
    fn lanes(dir: &Path) -> (Config, Vec<Lane>, reader::ManifestIndex) {
        let text = format!(
            "[run]\nname = \"f\"\ndir = {:?}\n[input.generate]\nacts_per_language = 8\nlanguages = [\"en\", \"fr\"]\n\
             [sampler]\nmix = {{ en = 0.5, fr = 0.5 }}\n[filter]\nkeep_fraction = 0.4\n",
            dir.display().to_string()
        );
        let cfg = Config::from_toml(&text, "t.toml").unwrap();
        let files = input_files(&cfg, &dir.join("corpus")).unwrap();
        let manifests = reader::ManifestIndex::build(&files);
        let (lanes, _) = lanes_of(&cfg, files);
        (cfg, lanes, manifests)
    }

    fn pass(
        cfg: &Config,
        lanes: &[Lane],
        m: &reader::ManifestIndex,
        threads: usize,
    ) -> FilterState {
        let f = cfg.filter.clone().unwrap();
        let opts = reader::ReadOptions {
            qa: cfg.input.prompt_format(),
            mixed_languages: false,
        };
        let p = first_pass(cfg, &f, lanes, &[], &[], m, &opts, threads, false).unwrap();
        cuts_of(&f, lanes, &p)
    }

    #[test]
    fn the_first_pass_cuts_do_not_depend_on_its_thread_count() {
        let d = tempfile::tempdir().unwrap();
        let (cfg, lanes, m) = lanes(d.path());
        let one = pass(&cfg, &lanes, &m, 1);
        for (_, c) in &one.lanes {
            let LaneCut::Fraction {
                documents,
                keep,
                last,
            } = c
            else {
                panic!("{c:?}")
            };
            assert!(*documents > 10, "{c:?}");
            assert!(last.is_some() && (*keep as f64 - 0.4 * *documents as f64).abs() <= 1.0);
        }
        for t in [2, 3, 8] {
            assert_eq!(pass(&cfg, &lanes, &m, t), one, "{t} threads");
        }
    }

    #[test]
    fn the_stream_keeps_exactly_the_first_pass_share() {
        let d = tempfile::tempdir().unwrap();
        let (cfg, lanes, m) = lanes(d.path());
        let f = cfg.filter.clone().unwrap();
        let setup = FilterSetup::new(&f, pass(&cfg, &lanes, &m, 2), 0.0);
        let opts = reader::ReadOptions {
            qa: cfg.input.prompt_format(),
            mixed_languages: false,
        };
        for (li, lane) in lanes.iter().enumerate() {
            let (mut kept, mut all) = (0u64, 0u64);
            // Two epochs: file indices count on, the verdicts repeat.
            let mut epochs = [Vec::new(), Vec::new()];
            for (e, verdicts) in epochs.iter_mut().enumerate() {
                for (k, p) in lane.files.iter().enumerate() {
                    let file = (e * lane.files.len() + k) as u32;
                    for (i, doc) in reader::read_file_with(p, &m, &opts)
                        .unwrap()
                        .iter()
                        .enumerate()
                    {
                        if let Some((keep, _, _)) =
                            setup.decide(li, &lane.files, file, i as u32, doc)
                        {
                            verdicts.push(keep);
                            if e == 0 {
                                all += 1;
                                kept += u64::from(keep);
                            }
                        }
                    }
                }
            }
            assert_eq!(epochs[0], epochs[1]);
            assert!(
                (kept as f64 - 0.4 * all as f64).abs() <= 1.0,
                "{kept} of {all}"
            );
        }
    }
}
