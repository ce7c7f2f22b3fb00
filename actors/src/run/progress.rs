//! Progress of a run: the counters the lanes update, the bar (on a terminal) or log line every few seconds, and the
//! evaluation gauges a process exports.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::stages::packer::PackerReport;

pub(super) const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

#[derive(Default)]
pub(super) struct Counters {
    pub(super) files_read: std::sync::atomic::AtomicU64,
    pub(super) documents: std::sync::atomic::AtomicU64,
    /// `documents` per lane language.
    pub(super) documents_per_lang: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Time the tokenizer threads spent tokenizing (all threads and lanes together).
    pub(super) tokenizer_busy_nanos: std::sync::atomic::AtomicU64,
    pub(super) quarantined: std::sync::atomic::AtomicU64,
    pub(super) lang_mismatches: std::sync::atomic::AtomicU64,
    pub(super) text_bytes: std::sync::atomic::AtomicU64,
    pub(super) tokens: std::sync::atomic::AtomicU64,
    pub(super) sink_sequences: std::sync::atomic::AtomicU64,
    pub(super) sink_tokens: std::sync::atomic::AtomicU64,
}

/// Registers (`on`) or unregisters the label-less evaluation metrics of the process registry (idempotent).
pub(super) fn export_eval_gauges(on: bool) {
    let m = lexflow_metrics::global();
    let step = Box::new(m.eval_step.clone());
    let seconds = Box::new(m.eval_seconds.clone());
    if on {
        // Already registered (the registry's start, or an earlier run of this process): nothing to do.
        let _ = m.registry.register(step);
        let _ = m.registry.register(seconds);
    } else {
        let _ = m.registry.unregister(step);
        let _ = m.registry.unregister(seconds);
    }
}

/// The trainer's step, loss and tokens/s of each of `ranks` whose series exist, read from a gather of the registry:
/// a `with_label_values` read would create (and export) a zero series for a rank that has not stepped yet, or that
/// another process runs.
pub(super) fn trainer_progress(ranks: &[usize]) -> Vec<(usize, u64, f64, f64)> {
    use lexflow_metrics::names::{
        LABEL_RANK, TRAINER_LOSS, TRAINER_STEPS_TOTAL, TRAINER_TOKENS_PER_SECOND,
    };
    if ranks.is_empty() {
        return Vec::new();
    }
    let families = lexflow_metrics::global().registry.gather();
    let value = |name: &str, rank: &str| -> Option<f64> {
        let f = families.iter().find(|f| f.get_name() == name)?;
        let m = f.get_metric().iter().find(|m| {
            m.get_label()
                .iter()
                .any(|l| l.get_name() == LABEL_RANK && l.get_value() == rank)
        })?;
        // Counters end in `_total` (docs/OBSERVABILITY.md).
        Some(match name.ends_with("_total") {
            true => m.get_counter().get_value(),
            false => m.get_gauge().get_value(),
        })
    };
    ranks
        .iter()
        .filter_map(|&r| {
            let label = r.to_string();
            let step = value(TRAINER_STEPS_TOTAL, &label)?;
            Some((
                r,
                step as u64,
                value(TRAINER_LOSS, &label)?,
                value(TRAINER_TOKENS_PER_SECOND, &label)?,
            ))
        })
        .collect()
}

/// The progress line: input counters, and the training of this process's `ranks` once they stepped.
pub(super) fn progress_message(
    c: &Counters,
    seqs: u64,
    ranks: &[usize],
    trained: &[(usize, u64, f64, f64)],
) -> (Option<u64>, String) {
    let mut msg = format!(
        "files {} docs {} tokens {} seqs {}",
        c.files_read.load(RELAXED),
        c.documents.load(RELAXED),
        c.tokens.load(RELAXED),
        seqs
    );
    // The loss is global (all-reduced), the same on every rank; tokens/s is summed over this process's ranks.
    let step = trained.iter().map(|t| t.1).min();
    if let (Some(step), false) = (step, trained.len() < ranks.len()) {
        let loss = trained[0].2;
        let tps: f64 = trained.iter().map(|t| t.3).sum();
        let which = match ranks {
            [r] => format!("rank {r}"),
            _ => format!(
                "ranks {}-{} of this process",
                ranks[0],
                ranks[ranks.len() - 1]
            ),
        };
        msg += &format!(" | step {step} loss {loss:.3} {tps:.0} tok/s ({which})");
    }
    (step.filter(|_| trained.len() == ranks.len()), msg)
}

pub(super) fn progress_loop(
    done: &std::sync::atomic::AtomicBool,
    c: &Counters,
    packer: &Mutex<PackerReport>,
    bar: bool,
    steps: Option<u64>,
    ranks: &[usize],
) {
    let pb = bar.then(|| {
        let pb = match steps {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let mut last_log = Instant::now();
    while !done.load(RELAXED) {
        std::thread::sleep(Duration::from_millis(200));
        // The bar refreshes every 200 ms, the log line every 5 s: gather the registry only when shown.
        if pb.is_none() && last_log.elapsed() <= Duration::from_secs(5) {
            continue;
        }
        let seqs = packer.lock().map(|p| p.sequences).unwrap_or(0);
        let (step, msg) = progress_message(c, seqs, ranks, &trainer_progress(ranks));
        if let Some(pb) = &pb {
            pb.set_position(step.unwrap_or(0));
            pb.set_message(msg);
        } else {
            match step {
                Some(step) => tracing::info!(step, "{msg}"),
                None => tracing::info!("{msg}"),
            }
            last_log = Instant::now();
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
}
