//! `lexflow replay` and `lexflow provenance`: regenerate exactly the batches of given training steps from a
//! checkpoint's dataflow resume point (or from the beginning of the stream), without training.
//!
//! Step `s` (1-based) of a run with world size `W`, micro-batch `b` and accumulation `g` consumed the global sequences
//! `[(s-1)·G, s·G)` with `G = W·b·g`; sequence `i` went to rank `i % W`. A replay starts from the newest checkpoint of
//! the run taken before the first requested step, so its cost does not depend on how far into the corpus the steps are.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::common::output::print_to_stdout;
use crate::common::run_dir::{checkpoints_dir, list_checkpoints, RUN_CONFIG_FILE};
use crate::config::Config;
use crate::run::pipeline::{run, PieceInfo, ReplaySpec, RunOptions};
use crate::train::{TrainerState, DATA_STATE_FILE};
use crate::types::{PackedSequence, ResumePoint};

/// One replayed sequence.
#[derive(Debug, Serialize)]
pub struct ReplayedSequence {
    pub step: u64,
    pub rank: u64,
    pub index: u64,
    pub hash: String,
    pub padding: u32,
    pub doc_starts: Vec<u32>,
    pub pieces: Vec<crate::types::Piece>,
    pub tokens: Vec<u32>,
    /// Input positions `[a, b)` whose target the loss ignores (prompt tokens of instruction data).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub no_loss: Vec<[u32; 2]>,
}

/// Parses `A..B` (B exclusive), `A..=B` or `N`.
pub fn parse_steps(s: &str) -> anyhow::Result<(u64, u64)> {
    let bad = || format!("--steps {s:?}: expected A..B, A..=B or N with 1 <= A < B");
    let (a, b) = if let Some((a, b)) = s.split_once("..=") {
        (
            a.trim().parse::<u64>().with_context(bad)?,
            b.trim().parse::<u64>().with_context(bad)?,
        )
    } else if let Some((a, b)) = s.split_once("..") {
        let a = a.trim().parse::<u64>().with_context(bad)?;
        let b = b.trim().parse::<u64>().with_context(bad)?;
        anyhow::ensure!(b > a, bad());
        (a, b - 1)
    } else {
        let n = s.trim().parse::<u64>().with_context(bad)?;
        (n, n)
    };
    anyhow::ensure!(a >= 1 && b >= a, bad());
    Ok((a, b))
}

struct Ckpt {
    dir: PathBuf,
    state: TrainerState,
    data: Option<ResumePoint>,
    config: Config,
}

fn load_ckpt(dir: &Path) -> anyhow::Result<Ckpt> {
    lexflow_gpu::checkpoint::verify_checkpoint_dir(dir)
        .with_context(|| format!("checkpoint {} does not verify", dir.display()))?;
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer_state.json"))
            .with_context(|| format!("{}", dir.display()))?,
    )?;
    let data = match std::fs::read_to_string(dir.join(DATA_STATE_FILE)) {
        Ok(t) => Some(
            serde_json::from_str(&t)
                .with_context(|| format!("{}/{DATA_STATE_FILE}", dir.display()))?,
        ),
        Err(_) => None,
    };
    let cfg_path = dir.join(RUN_CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: no run config in this checkpoint", cfg_path.display()))?;
    let config = Config::stored(&text, &cfg_path.display().to_string())?;
    Ok(Ckpt {
        dir: dir.to_path_buf(),
        state,
        data,
        config,
    })
}

/// The checkpoint `path` names: a checkpoint directory (it has a `manifest.json`), or a run directory, which stands
/// for its newest checkpoint (a replay starts from the run's newest checkpoint before the first step anyway).
pub fn resolve_checkpoint(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join(lexflow_gpu::checkpoint::MANIFEST).is_file() {
        return Ok(path.to_path_buf());
    }
    if let Some((_, newest)) = list_checkpoints(path).pop() {
        return Ok(newest);
    }
    anyhow::bail!(
        "{}: neither a checkpoint (no {}) nor a run directory with checkpoints (none in {}): pass a run directory \
         (`run.dir`) or one of its checkpoints (`<run.dir>/checkpoints/step-NNNNNN`)",
        path.display(),
        lexflow_gpu::checkpoint::MANIFEST,
        checkpoints_dir(path).display()
    )
}

/// Regenerates steps `first..=last`, starting from the newest verified checkpoint in `checkpoint`'s run taken before
/// `first` (or from the beginning). `checkpoint` may be the run directory ([`resolve_checkpoint`]).
pub fn replay_steps(
    checkpoint: &Path,
    first: u64,
    last: u64,
    describe: bool,
) -> anyhow::Result<(Vec<ReplayedSequence>, Vec<PieceInfo>)> {
    anyhow::ensure!(
        first >= 1 && last >= first,
        "steps {first}..={last}: steps are numbered from 1 (the first optimizer step is step 1)"
    );
    let checkpoint = &resolve_checkpoint(checkpoint)?;
    let given = load_ckpt(checkpoint)?;
    let run_dir = checkpoint
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // The history of global batches maps steps to sequences (a resume may have changed it): the newest verified
    // checkpoint of the run knows the most of it (steps after it are taken to continue its last batch).
    let trained = crate::train::read_step_records(&run_dir)
        .keys()
        .map(|(s, _)| *s)
        .max()
        .unwrap_or(0)
        .max(given.state.step);
    if last > trained {
        eprintln!(
            "lexflow: note: the run has trained {trained} steps (steps.jsonl); steps after it are the batches it would \
             train next, not batches it trained"
        );
    }
    let batches = list_checkpoints(&run_dir)
        .into_iter()
        .rev()
        .find_map(|(_, d)| load_ckpt(&d).ok())
        .filter(|c| c.state.step >= given.state.step)
        .map_or_else(|| given.state.batch_history(), |c| c.state.batch_history());
    // Newest usable checkpoint: step < first.
    let mut start: Option<Ckpt> = None;
    if given.state.step < first {
        start = Some(given);
    } else {
        for (step, dir) in list_checkpoints(&run_dir).into_iter().rev() {
            if step < first {
                if let Ok(c) = load_ckpt(&dir) {
                    start = Some(c);
                    break;
                }
            }
        }
    }
    let base = match &start {
        Some(c) => c.config.clone(),
        None => load_ckpt(checkpoint)?.config,
    };
    let mut cfg = base;
    // Replay reads the run's inputs (its generated corpus too) but writes nothing into the run.
    if cfg.input.paths.is_empty() {
        let corpus = cfg.run.dir.join("corpus");
        let corpus = if corpus.is_dir() {
            corpus
        } else {
            run_dir.join("corpus")
        };
        cfg.input.paths = vec![corpus.display().to_string()];
    }
    let scratch = tempfile_dir()?;
    cfg.run.dir = scratch.clone();
    cfg.metrics.enabled = false;
    cfg.shards.arrow_dir = None;
    let spec = ReplaySpec {
        data: start.as_ref().and_then(|c| c.data.clone()),
        checkpoint: start.as_ref().map(|c| c.dir.clone()),
        inputs_from: Some(
            start
                .as_ref()
                .map_or_else(|| checkpoint.clone(), |c| c.dir.clone()),
        ),
        skip: crate::train::BatchSegment::consumed_at(&batches, first - 1),
        limit: crate::train::BatchSegment::consumed_at(&batches, last),
        describe,
        ..Default::default()
    };
    let collected = spec.collected.clone();
    let described = spec.described.clone();
    if let Some(c) = &start {
        tracing::info!(checkpoint = %c.dir.display(), step = c.state.step, "replaying from checkpoint");
    } else {
        tracing::info!(
            "replaying from the beginning of the stream (no checkpoint before step {first})"
        );
    }
    let opts = RunOptions {
        resume: false,
        progress: false,
        origin: "replay".into(),
        replay: Some(spec),
    };
    let r = run(&cfg, &opts);
    let _ = std::fs::remove_dir_all(&scratch);
    r?;
    let seqs: Vec<PackedSequence> = collected.lock().map(|g| g.clone()).unwrap_or_default();
    anyhow::ensure!(
        !seqs.is_empty(),
        "the run's data stream ends before step {first} (its config, from {}, yields fewer sequences): \
         nothing to replay",
        checkpoint.display()
    );
    let out = seqs
        .into_iter()
        .map(|s| {
            let (step, rank) = crate::train::BatchSegment::step_and_rank(&batches, s.index);
            ReplayedSequence {
                step,
                rank,
                index: s.index,
                hash: crate::train::sequence_hash(&s.tokens),
                padding: s.padding,
                doc_starts: s.doc_starts,
                pieces: s.pieces,
                tokens: s.tokens,
                no_loss: s.no_loss,
            }
        })
        .collect();
    let pieces = described.lock().map(|g| g.clone()).unwrap_or_default();
    Ok((out, pieces))
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "lexflow-replay-{}-{}",
        std::process::id(),
        crate::train::now_nanos()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

pub fn cli_replay(checkpoint: &Path, steps: &str, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (a, b) = parse_steps(steps)?;
    let (seqs, _) = replay_steps(checkpoint, a, b, false)?;
    let mut text = String::new();
    for s in &seqs {
        text += &serde_json::to_string(s)?;
        text.push('\n');
    }
    match out {
        Some(p) => std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?,
        None => print_to_stdout(&text)?,
    }
    eprintln!("replayed steps {a}..={b}: {} sequences", seqs.len());
    Ok(ExitCode::SUCCESS)
}

/// `lexflow provenance RUN --step N`: which documents went into step N.
pub fn cli_provenance(run_dir: &Path, step: u64, json: bool) -> anyhow::Result<ExitCode> {
    let all = list_checkpoints(run_dir);
    let (_, any) = all.last().with_context(|| {
        format!(
            "no checkpoint in {}: provenance needs one (for the run's config)",
            checkpoints_dir(run_dir).display()
        )
    })?;
    let (seqs, pieces) = replay_steps(any, step, step, true)?;
    use std::fmt::Write as _;
    let mut text = String::new();
    if json {
        for p in &pieces {
            let _ = writeln!(text, "{}", serde_json::to_string(p)?);
        }
    } else {
        let _ = writeln!(text, "step {step}: {} sequences", seqs.len());
        for s in &seqs {
            let _ = writeln!(
                text,
                "  sequence {} (rank {}, {} padding tokens, hash {})",
                s.index, s.rank, s.padding, s.hash
            );
            for p in pieces.iter().filter(|p| p.index == s.index) {
                let _ = writeln!(
                    text,
                    "    @{:<5} tokens {:>6}..{:<6} {} {:<12} {:<11} {}{}",
                    p.offset,
                    p.token_start,
                    p.token_end,
                    p.lang,
                    p.celex.as_deref().unwrap_or("-"),
                    p.doc_type,
                    p.article
                        .as_deref()
                        .map(|a| format!("{a} | "))
                        .unwrap_or_default(),
                    p.title
                        .as_deref()
                        .unwrap_or(&p.path)
                        .chars()
                        .take(80)
                        .collect::<String>()
                );
            }
        }
    }
    print_to_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}
