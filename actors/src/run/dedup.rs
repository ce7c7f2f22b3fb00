//! `[dedup]` in a run: the index built before the lanes start (held-out documents and a checkpoint's entries
//! included), the `dedup.<lang>` actor that decides in lane order, and `lexflow dedup`'s audit of a config.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use lexflow_dataflow::EdgeReceiver;

use crate::config::Config;
use crate::run::heldout::eval_paths_files;
use crate::run::lanes::{input_files, lanes_of, Lane};
use crate::stages::reader;
use crate::types::DocBatch;

/// `lexflow dedup`: what `[dedup]` drops from a config's training input, decided exactly as `lexflow run` decides
/// (same lanes, held-out documents, keys and order), without tokenizing or training. `out`: one JSON line per
/// document (`texts`: with its text, after a first line holding the MinHash parameters).
pub fn audit_dedup(
    cfg: &Config,
    out: Option<&Path>,
    texts: bool,
) -> anyhow::Result<crate::stages::dedup::DedupReport> {
    use std::io::Write;
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
    let idx = build_dedup_index(
        cfg,
        &lanes,
        &held_files,
        &eval_paths_files(cfg)?,
        &read_opts,
        None,
    )?;
    let mut w = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    if let (Some(w), true) = (&mut w, texts) {
        let h = &idx.hasher;
        let line = serde_json::json!({"minhash": {
            "ngram": h.ngram, "bands": h.bands, "rows": h.rows, "a": h.a, "b": h.b,
            "threshold": cfg.dedup.threshold,
            "mode": cfg.dedup.mode, "held_out_documents": idx.held_out_documents(),
        }});
        writeln!(w, "{line}")?;
    }
    let mut unreadable = 0u64;
    for (li, lane) in lanes.iter().enumerate() {
        for (k, path) in lane.files.iter().enumerate() {
            let docs = match reader::read_file_with(path, &manifests, &read_opts) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("skipped (`lexflow run` quarantines it): {e}");
                    unreadable += 1;
                    continue;
                }
            };
            for (i, doc) in docs.iter().enumerate() {
                if doc.text.is_empty() {
                    continue;
                }
                let sig = idx.hasher.signature(doc);
                let (_, rec) =
                    idx.judge(li, &lane.lang, k as u32, i as u32, doc, &sig, &lane.files);
                if let Some(w) = &mut w {
                    let mut line = serde_json::to_value(&rec)?;
                    if texts {
                        line["text"] = serde_json::Value::String(doc.text.clone());
                        line["qa"] = serde_json::Value::Bool(doc.answer_start.is_some());
                        if cfg.dedup.mode == crate::stages::dedup::DedupMode::Near
                            && doc.answer_start.is_none()
                        {
                            line["minhash"] = serde_json::json!(idx.hasher.minhash(&doc.text));
                        }
                    }
                    writeln!(w, "{line}")?;
                }
            }
        }
    }
    if let Some(mut w) = w {
        w.flush()?;
    }
    if unreadable > 0 {
        tracing::warn!(
            files = unreadable,
            "unreadable input files skipped (`lexflow run` quarantines them)"
        );
    }
    Ok(idx.report(&lanes.iter().map(|l| l.lang.clone()).collect::<Vec<_>>()))
}

/// The lanes' dedup index: held-out documents first (`dedup.against_heldout`), then a checkpoint's entries.
pub(super) fn build_dedup_index(
    cfg: &Config,
    lanes: &[Lane],
    held_files: &[PathBuf],
    eval_files: &[PathBuf],
    read_opts: &reader::ReadOptions,
    checkpoint: Option<&Path>,
) -> anyhow::Result<crate::stages::dedup::DedupIndex> {
    let mut idx = crate::stages::dedup::DedupIndex::new(
        &cfg.dedup,
        lanes.iter().map(|l| l.files.len() as u32).collect(),
    );
    if cfg.dedup.against_heldout {
        // Held-out FORMEX files (Q&A pairs are not documents the corpus could repeat).
        let files: Vec<PathBuf> = held_files
            .iter()
            .chain(eval_files)
            .filter(|f| !f.to_string_lossy().ends_with(".jsonl"))
            .cloned()
            .collect();
        let manifests = reader::ManifestIndex::build(&files);
        let opts = reader::ReadOptions {
            qa: read_opts.qa.clone(),
            mixed_languages: true,
        };
        for f in &files {
            // Unreadable held-out files are reported by the held-out set's own build (quarantine).
            let Ok(docs) = reader::read_file_with(f, &manifests, &opts) else {
                continue;
            };
            for d in &docs {
                let lang = d.lang.clone().or_else(|| reader::sniff_lang(f));
                if let Some(li) = lang.and_then(|l| lanes.iter().position(|x| x.lang == l)) {
                    idx.add_held_out(li, d);
                }
            }
        }
    }
    if let Some(dir) = checkpoint {
        let p = dir.join(crate::stages::dedup::STATE_FILE);
        if p.exists() {
            idx.restore(&p)?;
        } else {
            tracing::warn!(
                checkpoint = %dir.display(),
                "the checkpoint has no dedup state (its run had no [dedup]): documents before it are not in the index"
            );
        }
    }
    Ok(idx)
}

/// The dedup actor of one lane: decides in lane order, empties the text of duplicates (the tokenizer skips empty
/// documents; ordinals stay), logs each drop to `dedup.jsonl`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_dedup(
    ctx: &lexflow_dataflow::ActorContext,
    idx: &crate::stages::dedup::DedupIndex,
    lane: usize,
    lang: &str,
    paths: &[PathBuf],
    log: Option<&Mutex<std::fs::File>>,
    rx: EdgeReceiver<DocBatch>,
    tx: lexflow_dataflow::EdgeSender<DocBatch>,
) -> Result<(), lexflow_dataflow::ActorError> {
    use std::io::Write;
    let am = lexflow_metrics::actor(&format!("dedup.{lang}"));
    let lat = lexflow_metrics::latency(&format!("dedup.{lang}"));
    let m = lexflow_metrics::global();
    for label in ["kept", "exact", "near", "heldout"] {
        m.dedup_documents.with_label_values(&[lang, label]);
    }
    m.dedup_dropped_bytes.with_label_values(&[lang]);
    while let Ok(mut b) = rx.recv() {
        ctx.set_input(format!("file #{} of lane {lang}", b.file));
        let t = Instant::now();
        let mut lines = String::new();
        for (i, sig) in b.signatures.iter().enumerate() {
            let Some(sig) = sig else { continue };
            let (v, rec) = idx.judge(lane, lang, b.file, i as u32, &b.docs[i], sig, paths);
            m.dedup_documents
                .with_label_values(&[lang, v.label()])
                .inc();
            if v == crate::stages::dedup::Verdict::Keep {
                continue;
            }
            m.dedup_dropped_bytes
                .with_label_values(&[lang])
                .inc_by(rec.bytes);
            lines.push_str(&serde_json::to_string(&rec).expect("drop record is JSON"));
            lines.push('\n');
            b.docs[i].text.clear();
        }
        if let (Some(f), false) = (log, lines.is_empty()) {
            let mut f = f.lock().expect("dedup log lock");
            if let Err(e) = f.write_all(lines.as_bytes()) {
                tracing::warn!("cannot append to {}: {e}", crate::stages::dedup::LOG_FILE);
            }
        }
        b.signatures = Vec::new();
        am.items_in.inc();
        am.items_out.inc();
        am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
        lat.record(t.elapsed());
        if tx.send(b).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
