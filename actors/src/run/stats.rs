//! End-of-run statistics: `stats.json` in the run directory and a human summary.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::stages::packer::PackerReport;
use crate::stages::sampler::SamplerReport;
use crate::stages::shard_writer::ShardReport;

#[derive(Debug, Clone, Default, Serialize)]
pub struct InputReport {
    pub files: u64,
    /// Files per lane language.
    pub files_per_lang: BTreeMap<String, u64>,
    /// Files whose language is not in the mix (not trained on).
    pub files_outside_mix: u64,
    /// The same per language (`unknown`: none could be told; such a file is read once, and quarantined if broken).
    pub outside_mix: BTreeMap<String, u64>,
    /// Files held out of training for evaluation (`eval.holdout`; counted in `files`, not in `files_per_lang`).
    pub files_held_out: u64,
    /// File reads (a file counts again in every `cycle` epoch, and once more when read ahead of the end of training).
    pub files_read: u64,
    /// Documents parsed from the lanes' file reads (read-ahead of the end of training and, on a resume, the documents
    /// skipped before the resume position included). How many the sampler passed on to training, per language:
    /// `sampler.languages[].documents`.
    pub documents: u64,
    /// `documents` per language of the mix (sums to `documents`).
    pub documents_per_lang: BTreeMap<String, u64>,
    pub quarantined_files: u64,
    pub quarantine_report: Option<String>,
    /// Documents whose parsed language differs from their file's lane.
    pub lang_mismatches: u64,
    pub text_bytes: u64,
    /// Tokens out of the tokenizers (read-ahead included).
    pub tokens: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunStats {
    pub run: String,
    pub config: String,
    pub seed: u64,
    pub elapsed_seconds: f64,
    pub input: InputReport,
    pub sampler: SamplerReport,
    pub packer: PackerReport,
    pub shards: ShardReport,
    /// The trainer's report (`TrainReport`), with `checkpoints` = the checkpoints on disk (after a resume, the
    /// earlier sessions' too), `process_ranks` (the global ranks this process trains, whose throughput
    /// `tokens_per_second` sums) and `world_size`. A failed run: `complete: false`, the steps done and their losses
    /// (from `steps.jsonl`), the checkpoints on disk.
    pub train: Option<serde_json::Value>,
    /// The held-out evaluation set (`[eval]`): files, sequences and target tokens per language, its hash. The
    /// losses measured on it are in `train.evals`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_set: Option<serde_json::Value>,
    /// Documents dropped as repeats (`[dedup]`), per language.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<crate::stages::dedup::DedupReport>,
    /// Documents dropped by the quality filter (`[filter]`), per language and reason, with each lane's cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<crate::stages::filter::FilterReport>,
    /// `input.tokens` per second of the whole run's wall time (`elapsed_seconds`). With `[train]` the trainers set the
    /// pace (backpressure: preprocessing only reads ahead), so this is the rate the run consumed input at, not what
    /// preprocessing could do: that is `tokenizer_tokens_per_busy_second`.
    pub preprocess_tokens_per_second: f64,
    /// `input.tokens` per second the tokenizer threads spent tokenizing (one thread's speed; waits excluded).
    pub tokenizer_tokens_per_busy_second: f64,
    /// The run trained (`[train]`): `preprocess_tokens_per_second` is paced by training.
    pub paced_by_training: bool,
    pub outcome: String,
}

/// The `train` line of the summary: steps, loss from first to last step, throughput, data wait, last checkpoint
/// (the whole report is in `stats.json`).
fn train_line(t: &serde_json::Value) -> String {
    let f = |k: &str| t.get(k).and_then(|v| v.as_f64());
    let losses: Vec<f64> = t
        .get("losses")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let mut line = format!("  train      {} steps", t["steps"]);
    if t.get("complete").and_then(|v| v.as_bool()) == Some(false) {
        line += " done before the failure";
    }
    if let Some(r) = t.get("resumed_from_step").and_then(|v| v.as_u64()) {
        line += &format!(" (resumed from step {r})");
    }
    if let (Some(a), Some(b)) = (losses.first(), losses.last()) {
        line += &format!(", loss {a:.4} → {b:.4}");
    }
    if let Some(tps) = f("tokens_per_second") {
        // Summed over the ranks this process trains: all of them in one process, one with one process per rank.
        let ranks: Vec<u64> = t
            .get("process_ranks")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let world = t.get("world_size").and_then(|v| v.as_u64());
        line += &format!(", {tps:.0} tokens/s");
        line += &match (ranks.as_slice(), world) {
            ([r], Some(w)) if w > 1 => {
                format!(" (rank {r} only: one process per rank, world size {w})")
            }
            (rs, Some(w)) if rs.len() as u64 == w && w > 1 => {
                format!(" (all {w} ranks of this process)")
            }
            _ => String::new(),
        };
    }
    let wait: Vec<f64> = t
        .get("data_wait_fraction")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if let Some(w) = wait.iter().cloned().reduce(f64::max) {
        line += &format!(", data wait ≤ {:.3}% of step time", w * 100.0);
    }
    if let Some(c) = t
        .get("checkpoints")
        .and_then(|v| v.as_array())
        .and_then(|a| a.last())
        .and_then(|c| c.as_str())
    {
        line += &format!(", last checkpoint {c}");
    }
    if let Some(b) = t.get("best") {
        line += &format!(
            ", best checkpoint step {} ({} = {:.4})",
            b["step"],
            b["metric"].as_str().unwrap_or("?"),
            b["value"].as_f64().unwrap_or(f64::NAN)
        );
    }
    line
}

/// A byte count in the largest unit it fills (a small tee is not "0.0 MB").
fn human_bytes(b: u64) -> String {
    match b {
        0..=999 => format!("{b} bytes"),
        1_000..=999_999 => format!("{:.1} kB", b as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.1} GB", b as f64 / 1e9),
    }
}

impl RunStats {
    /// A completed training run that trained fewer than `train.steps` steps: the input ran out first (a sentence
    /// naming the exhausted languages), or None.
    pub fn input_ended_before_target(&self) -> Option<String> {
        let t = self.train.as_ref()?;
        let (steps, target) = (t.get("steps")?.as_u64()?, t.get("target_steps")?.as_u64()?);
        if self.outcome != "completed" || steps >= target {
            return None;
        }
        let exhausted: Vec<&str> = self
            .sampler
            .languages
            .iter()
            .filter(|l| l.exhausted)
            .map(|l| l.lang.as_str())
            .collect();
        Some(format!(
            "the input ran out after {steps} of train.steps = {target} steps{}: a longer run needs more input, \
             sampler.on_exhausted = \"cycle\" (repeat a language's files) or \"renormalize\"",
            match exhausted.as_slice() {
                [] => String::new(),
                l => format!(" (exhausted: {})", l.join(", ")),
            }
        ))
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "lexflow run `{}`: {} in {:.1}s",
            self.run, self.outcome, self.elapsed_seconds
        );
        let i = &self.input;
        let _ = writeln!(
            s,
            "  input      {} files ({} outside the mix, {} held out, {} quarantined; {} file reads), {} documents and {} tokens read (read-ahead included)",
            i.files,
            i.files_outside_mix,
            i.files_held_out,
            i.quarantined_files,
            i.files_read,
            i.documents,
            i.tokens
        );
        if let Some(d) = &self.dedup {
            let sum = |f: fn(&crate::stages::dedup::LaneReport) -> u64| {
                d.per_lang.values().map(f).sum::<u64>()
            };
            let mode = serde_json::to_value(d.mode.unwrap_or_default()).unwrap_or_default();
            let _ = writeln!(
                s,
                "  dedup      {}: {} documents, {} kept, dropped {} exact, {} near and {} held-out repeats ({} bytes)",
                mode.as_str().unwrap_or("?"),
                sum(|l| l.documents),
                sum(|l| l.kept),
                sum(|l| l.exact),
                sum(|l| l.near),
                sum(|l| l.heldout),
                sum(|l| l.bytes_dropped)
            );
        }
        if let Some(f) = &self.filter {
            let docs: u64 = f.per_lang.values().map(|l| l.documents).sum();
            let kept: u64 = f.per_lang.values().map(|l| l.kept).sum();
            let mut reasons: std::collections::BTreeMap<&str, u64> = Default::default();
            for l in f.per_lang.values() {
                for (r, n) in &l.dropped {
                    *reasons.entry(r.as_str()).or_insert(0) += n;
                }
            }
            let rule = match (f.keep_fraction, f.threshold) {
                (Some(k), _) => format!("keep {:.0}% per language", k * 100.0),
                (_, Some(t)) => format!("score ≥ {t}"),
                _ => "?".into(),
            };
            let _ = writeln!(
                s,
                "  filter     {rule}: {docs} documents, {kept} kept, dropped {} ({} bytes)",
                if reasons.is_empty() {
                    "none".to_string()
                } else {
                    reasons
                        .iter()
                        .map(|(r, n)| format!("{n} {r}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                f.per_lang.values().map(|l| l.bytes_dropped).sum::<u64>()
            );
        }
        // What the sampler emitted, read-ahead of the last steps included (what each step trained: `lexflow
        // provenance`); the share is exact over the stream, not over a few steps of whole acts.
        let _ = writeln!(
            s,
            "  mix        lang  target  realized  tokens      docs   (sampled stream, incl. read-ahead)"
        );
        for l in &self.sampler.languages {
            let _ = writeln!(
                s,
                "             {:<4}  {:>5.1}%  {:>7.2}%  {:<10}  {}{}",
                l.lang,
                l.target_share * 100.0,
                l.realized_share * 100.0,
                l.tokens,
                l.documents,
                if l.exhausted { "  (exhausted)" } else { "" }
            );
        }
        let p = &self.packer;
        let _ = writeln!(
            s,
            "  packer     {} sequences, fill {:.2}%, {} padding tokens, {} split docs, {} truncated docs ({} tokens)",
            p.sequences,
            p.fill_efficiency * 100.0,
            p.padding_tokens,
            p.split_documents,
            p.truncated_documents,
            p.truncated_tokens
        );
        let _ = writeln!(
            s,
            "  shards     {} routed to ranks {:?}, {} skipped on resume",
            self.shards.sequences_routed,
            self.shards.per_rank,
            self.shards.sequences_skipped_on_resume
        );
        if let Some(t) = &self.shards.arrow_tee {
            let recovered: u64 = t.recovered.iter().map(|r| r.rows).sum();
            let _ = writeln!(
                s,
                "  tee        {} sequences from index {} in {} ({}){}",
                t.sequences,
                t.first_index,
                t.dir.display(),
                human_bytes(t.bytes),
                if t.recovered.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} unfinished parts of the stopped run recovered ({recovered} sequences)",
                        t.recovered.len()
                    )
                }
            );
        }
        if let Some(t) = &self.train {
            let _ = writeln!(s, "{}", train_line(t));
            if let Some(n) = self.input_ended_before_target() {
                let _ = writeln!(s, "             {n}");
            }
            let last = t
                .get("evals")
                .and_then(|e| e.as_array())
                .and_then(|a| a.last());
            if let Some(e) = last {
                let langs = e["languages"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| {
                                format!("{k} {:.4}", v["loss"].as_f64().unwrap_or(f64::NAN))
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                if let Some(loss) = e["loss"].as_f64() {
                    let _ = writeln!(
                        s,
                        "  eval       step {}: held-out loss {loss:.4} ({langs})",
                        e["step"]
                    );
                }
                if let Some(q) = e.get("qa") {
                    let o = &q["overall"];
                    let _ = writeln!(
                        s,
                        "  eval qa    step {}: {} questions, citation accuracy {:.3}, hallucination rate {:.3}, \
                         ROUGE-L {:.3}, exact match {:.3} ({})",
                        e["step"],
                        o["examples"],
                        o["citation_accuracy"].as_f64().unwrap_or(f64::NAN),
                        o["hallucination_rate"].as_f64().unwrap_or(f64::NAN),
                        o["rouge_l"].as_f64().unwrap_or(f64::NAN),
                        o["exact_match"].as_f64().unwrap_or(f64::NAN),
                        q["predictions"].as_str().unwrap_or("")
                    );
                }
            }
        }
        let _ = write!(
            s,
            "  throughput {:.0} tokens/s read over the run{}; tokenizing {:.0} tokens/s per busy tokenizer thread",
            self.preprocess_tokens_per_second,
            if self.paced_by_training {
                " (paced by training)"
            } else {
                ""
            },
            self.tokenizer_tokens_per_busy_second
        );
        s
    }
}

/// Writes `path` through a temporary sibling (`.<name>.tmp-<pid>`), synced and renamed into place; the temporary file
/// is removed when anything fails.
pub(super) fn write_file_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .with_context(|| format!("{}: no file name", path.display()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

/// `stats.json` → `train`: the trainer's report (`report`: None when a rank failed) with what this process adds: the
/// checkpoints on disk (after a resume, the earlier sessions' too), the global ranks this process trains (whose
/// tokens/s `tokens_per_second` sums) and the world size. A failed run still says how far it got: the steps done and
/// their losses from `steps.jsonl`, the checkpoints on disk, `complete: false`.
pub(super) fn train_json(
    report: Option<crate::train::TrainReport>,
    run_dir: &Path,
    resumed_from: Option<u64>,
    ranks: &[usize],
    world: usize,
) -> serde_json::Value {
    let checkpoints: Vec<String> = crate::common::run_dir::list_checkpoints(run_dir)
        .into_iter()
        .map(|(_, d)| d.display().to_string())
        .collect();
    let mut v = match report.and_then(|r| serde_json::to_value(r).ok()) {
        Some(v) => v,
        None => {
            // Steps this session finished (every rank records each step; the loss is global).
            let mut losses = std::collections::BTreeMap::new();
            for ((step, _), r) in crate::train::read_step_records(run_dir) {
                if step > resumed_from.unwrap_or(0) {
                    losses.entry(step).or_insert(r.loss);
                }
            }
            let steps = losses
                .keys()
                .next_back()
                .copied()
                .or(resumed_from)
                .unwrap_or(0);
            serde_json::json!({
                "complete": false,
                "steps": steps,
                "losses": losses.values().collect::<Vec<_>>(),
                "resumed_from_step": resumed_from,
            })
        }
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("checkpoints".into(), serde_json::json!(checkpoints));
        o.insert("process_ranks".into(), serde_json::json!(ranks));
        o.insert("world_size".into(), serde_json::json!(world));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_line_reads_the_trainer_report() {
        // Built from the real report type: a renamed field breaks this test, not the summary silently.
        let report = crate::train::TrainReport {
            steps: 12,
            final_loss: 2.5,
            losses: vec![3.25, 2.75, 2.5],
            tokens_per_second: 1234.4,
            data_wait_fraction: vec![0.001, 0.02],
            checkpoints: vec!["runs/x/step-10".into(), "runs/x/step-12".into()],
            resumed_from_step: Some(9),
            sequences_consumed: 48,
            evals: Vec::new(),
            target_steps: Some(12),
            best: None,
        };
        let line = train_line(&serde_json::to_value(&report).unwrap());
        assert_eq!(
            line,
            "  train      12 steps (resumed from step 9), loss 3.2500 → 2.5000, 1234 tokens/s, \
             data wait ≤ 2.000% of step time, last checkpoint runs/x/step-12"
        );
        // train.keep_best: the best checkpoint is named.
        let with_best = crate::train::TrainReport {
            best: Some(crate::train::BestCheckpoint {
                metric: "heldout_loss".into(),
                step: 10,
                value: 2.125,
                dir: "runs/x/checkpoints/step-000010".into(),
            }),
            ..report.clone()
        };
        assert!(train_line(&serde_json::to_value(&with_best).unwrap())
            .ends_with(", best checkpoint step 10 (heldout_loss = 2.1250)"));
        // Whose tokens/s: all ranks of one process, or one rank's process.
        let mut v = serde_json::to_value(&report).unwrap();
        v["world_size"] = serde_json::json!(2);
        v["process_ranks"] = serde_json::json!([0, 1]);
        assert!(train_line(&v).contains("1234 tokens/s (all 2 ranks of this process)"));
        v["process_ranks"] = serde_json::json!([1]);
        assert!(train_line(&v)
            .contains("1234 tokens/s (rank 1 only: one process per rank, world size 2)"));
        // A failed run: how far it got.
        let failed = serde_json::json!({"complete": false, "steps": 23, "losses": [3.0, 2.0],
            "checkpoints": ["runs/x/step-20"], "process_ranks": [0], "world_size": 1});
        assert_eq!(
            train_line(&failed),
            "  train      23 steps done before the failure, loss 3.0000 → 2.0000, last checkpoint runs/x/step-20"
        );
    }

    #[test]
    fn tee_line_gives_a_small_tee_a_visible_size() {
        let st = RunStats {
            shards: ShardReport {
                arrow_tee: Some(crate::stages::arrow_tee::TeeSummary {
                    dir: "runs/x/arrow".into(),
                    files: Vec::new(),
                    rows_per_shard: vec![34],
                    sequences: 34,
                    batches: 9,
                    bytes: 46_576,
                    first_index: 8,
                    recovered: Vec::new(),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(
            st.summary()
                .contains("  tee        34 sequences from index 8 in runs/x/arrow (46.6 kB)\n"),
            "{}",
            st.summary()
        );
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(142_032_490), "142.0 MB");
        assert_eq!(human_bytes(3_100_000_000), "3.1 GB");
    }

    #[test]
    fn summary_says_what_its_throughput_measures() {
        let st = RunStats {
            preprocess_tokens_per_second: 1000.0,
            tokenizer_tokens_per_busy_second: 250000.0,
            paced_by_training: true,
            ..Default::default()
        };
        assert!(
            st.summary().ends_with(
                "throughput 1000 tokens/s read over the run (paced by training); tokenizing 250000 tokens/s per \
                 busy tokenizer thread"
            ),
            "{}",
            st.summary()
        );
    }
}
