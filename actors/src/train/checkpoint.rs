//! Checkpointing: writing a checkpoint (model in HF layout, AdamW state, schedule, data position, dedup index, run
//! config, inputs record, tokenizer files; atomically, rank 0 only, the others at a barrier), pruning old ones,
//! setting aside an earlier run's and unusable ones, and finding the point a resume starts from.
//!
//! Checkpoints (`run_dir/checkpoints/step-000020/`): `model.safetensors` + `config.json` (HF layout),
//! `optimizer.safetensors` (fp32 master weights, moments, step), `trainer_state.json` (step, sequences consumed,
//! schedule, seed, world size, config) and `manifest.json` (SHA-256 of every file). Rank 0 writes atomically
//! (temporary directory, fsync, rename, fsync parent), the other ranks wait at a barrier. [`resume_point`] takes the
//! newest checkpoint whose checksums verify, warning about each one it skips.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use lexflow_gpu::checkpoint::{self, DEFAULT_MAX_SHARD_BYTES};
use lexflow_gpu::{AdamWConfig, FlatAdamW, GpuError, Llama, LlamaConfig};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::model::Weights;
use super::records::STEPS_FILE;
use super::setup::{RankResult, TrainerError};
use super::step::Rank;
use crate::common::run_dir::{checkpoints_dir, list_checkpoints, RUN_CONFIG_FILE};
use crate::config::TrainConfig;
use crate::types::ResumePoint;

/// Where a resumed run starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeInfo {
    pub step: u64,
    /// Global sequences already trained on: the pipeline skips this many.
    pub sequences_consumed: u64,
    pub checkpoint: PathBuf,
    pub world_size: usize,
    /// The global batch of every stretch of steps so far (see [`BatchSegment`]).
    pub batches: Vec<BatchSegment>,
    /// libtorch CPU threads per rank of the run that wrote the checkpoint (None: CUDA ranks, or an older checkpoint).
    pub cpu_threads: Option<usize>,
    /// Newer checkpoints that failed verification, with the reason.
    pub skipped: Vec<String>,
    /// Their directories (set aside by the resumed run, so that they neither count among its newest checkpoints
    /// nor collide with the ones it writes).
    pub skipped_dirs: Vec<PathBuf>,
    /// The dataflow position right before the last sequence rank 0 trained on (`data_state.json`).
    pub data: Option<ResumePoint>,
    /// The best checkpoint so far (`train.keep_best`).
    pub best: Option<BestCheckpoint>,
}

/// A stretch of optimizer steps trained with one global batch. A resume may change the world size, micro-batch or
/// accumulation (the global batch); from then on a step consumes another number of sequences, so the mapping from
/// step to sequences is kept piecewise: steps `from_step + 1 ..` consume `global_batch` sequences each, starting at
/// sequence `sequences_before`, dealt to ranks by `index % world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSegment {
    pub from_step: u64,
    pub sequences_before: u64,
    pub global_batch: u64,
    pub world_size: usize,
}

impl BatchSegment {
    /// Sequences consumed after `step` optimizer steps (`history`: oldest first, never empty).
    pub fn consumed_at(history: &[BatchSegment], step: u64) -> u64 {
        let s = history
            .iter()
            .rev()
            .find(|s| s.from_step <= step)
            .unwrap_or(&history[0]);
        s.sequences_before + step.saturating_sub(s.from_step) * s.global_batch
    }

    /// The (1-based) step and the rank that trained sequence `index`.
    pub fn step_and_rank(history: &[BatchSegment], index: u64) -> (u64, u64) {
        let s = history
            .iter()
            .rev()
            .find(|s| s.sequences_before <= index)
            .unwrap_or(&history[0]);
        let g = s.global_batch.max(1);
        (
            s.from_step + index.saturating_sub(s.sequences_before) / g + 1,
            index % s.world_size.max(1) as u64,
        )
    }
}

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub sequences_consumed: u64,
    pub world_size: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub schedule: AdamWConfig,
    /// Learning rate of the last step taken.
    pub lr: f64,
    pub last_loss: Option<f64>,
    /// RNG state: the run seed (weights come from `manual_seed(seed)`; training itself draws no random numbers).
    pub seed: u64,
    pub model: LlamaConfig,
    pub train_config: TrainConfig,
    pub created_unix: f64,
    /// Every global batch the run has trained with, oldest first (written since lexflow 0.1 session 6; older
    /// checkpoints have none: one batch for the whole run, as they could only record).
    #[serde(default)]
    pub batches: Vec<BatchSegment>,
    /// libtorch intra-op threads of a CPU rank (the bits of CPU reductions depend on it); None on CUDA.
    #[serde(default)]
    pub cpu_threads: Option<usize>,
    /// `train.keep_best`: the best checkpoint so far (this one included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestCheckpoint>,
}

/// The best checkpoint by `train.keep_best`'s metric.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BestCheckpoint {
    pub metric: String,
    pub step: u64,
    pub value: f64,
    pub dir: PathBuf,
}

/// The link in the run directory to the best checkpoint (`train.keep_best`).
pub const BEST_LINK: &str = "best";

impl TrainerState {
    /// [`Self::batches`], or for an older checkpoint the one global batch it records.
    pub fn batch_history(&self) -> Vec<BatchSegment> {
        if self.batches.is_empty() {
            vec![BatchSegment {
                from_step: 0,
                sequences_before: 0,
                global_batch: (self.world_size * self.micro_batch * self.grad_accum) as u64,
                world_size: self.world_size,
            }]
        } else {
            self.batches.clone()
        }
    }
}

/// Dataflow resume point inside a checkpoint directory.
pub const DATA_STATE_FILE: &str = "data_state.json";

/// Keeps the `keep` newest checkpoints and removes leftover temporary directories. (No checkpoint newer than the
/// run's step exists by then: a fresh run sets an earlier run's aside, a resumed run the newer ones that did not
/// verify — [`set_aside_previous_run`], [`set_aside_unusable`].)
pub(super) fn prune_checkpoints(run_dir: &Path, keep: usize, current: u64, best: Option<u64>) {
    // Newer ones (should a rename to `.unusable` have failed) are neither counted nor removed; the best one
    // (`train.keep_best`) is kept besides the `keep` newest.
    let mut all = list_checkpoints(run_dir);
    all.retain(|(s, _)| *s <= current && Some(*s) != best);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), "cannot remove old checkpoint: {e}");
        }
    }
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(run_dir)) {
        let current_parts = parts_dir(run_dir, current);
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().to_string();
            let stale_tmp =
                name.contains(".tmp-") && !name.ends_with(&format!(".tmp-{}", std::process::id()));
            // Optimizer parts staged for a checkpoint that was never completed (a crash in between).
            let stale_parts = name.ends_with(".parts") && e.path() != current_parts;
            if name.starts_with('.') && (stale_tmp || stale_parts) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// `run_dir/best` → `checkpoints/step-NNNNNN` (relative), replaced atomically.
fn point_best(run_dir: &Path, step: u64) {
    let target = PathBuf::from("checkpoints").join(format!("step-{step:06}"));
    let tmp = run_dir.join(format!(".{BEST_LINK}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let r = std::os::unix::fs::symlink(&target, &tmp)
        .and_then(|_| std::fs::rename(&tmp, run_dir.join(BEST_LINK)));
    if let Err(e) = r {
        tracing::warn!(
            "cannot point {} at {}: {e}",
            run_dir.join(BEST_LINK).display(),
            target.display()
        );
    }
}

/// Where the ranks stage their optimizer parts for the checkpoint of `step` (rank 0 moves them in).
pub(super) fn parts_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".step-{step:06}.parts"))
}

/// Test hook for the kill test: `LEXFLOW_CRASH_IN_CHECKPOINT=<step>` aborts the process in the middle of writing that
/// step's checkpoint (model and optimizer written, state not yet), once per run directory.
pub(super) fn crash_for_tests(run_dir: &Path, step: u64) {
    let Some(want) = std::env::var("LEXFLOW_CRASH_IN_CHECKPOINT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let marker = run_dir.join(format!(".crashed-in-checkpoint-{want}"));
    if step == want && !marker.exists() {
        let _ = std::fs::write(&marker, b"");
        eprintln!("LEXFLOW_CRASH_IN_CHECKPOINT: aborting while writing checkpoint {step}");
        std::process::abort();
    }
}

pub(super) fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Nanoseconds since the epoch (unique scratch names).
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub(super) fn read_state(dir: &Path) -> Result<TrainerState, String> {
    checkpoint::verify_checkpoint_dir(dir).map_err(|e| e.to_string())?;
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// A fresh (not resumed) training run in a directory an earlier run trained in (it has a checkpoint, or step
/// records): that run's checkpoints, step records, evaluation history and dedup logs move to `<run_dir>/previous/`
/// (`previous.1/`, … when that exists: nothing is ever deleted), so the two runs' records never mix and the new run's
/// checkpoints are not pruned in favour of the old ones. Returns what was moved.
pub fn set_aside_previous_run(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let steps = run_dir.join(STEPS_FILE);
    let trained = !list_checkpoints(run_dir).is_empty()
        || std::fs::metadata(&steps).is_ok_and(|m| m.len() > 0);
    if !trained {
        return Ok(Vec::new());
    }
    let mut present: Vec<String> = [
        "checkpoints",
        STEPS_FILE,
        crate::tasks::heldout::RESULTS_FILE,
    ]
    .iter()
    .map(|n| n.to_string())
    .filter(|n| run_dir.join(n).exists())
    .collect();
    // dedup.jsonl and the per-process dedup.rankR.jsonl.
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        let mut logs: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("dedup.") && n.ends_with(".jsonl"))
            .collect();
        logs.sort();
        present.extend(logs);
    }
    let mut prev = run_dir.join("previous");
    let mut k = 1;
    while prev.exists() {
        prev = run_dir.join(format!("previous.{k}"));
        k += 1;
    }
    std::fs::create_dir_all(&prev).with_context(|| format!("creating {}", prev.display()))?;
    let mut moved = Vec::new();
    for n in present {
        let (from, to) = (run_dir.join(&n), prev.join(&n));
        std::fs::rename(&from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        moved.push(to);
    }
    tracing::warn!(
        dir = %prev.display(),
        moved = ?moved,
        "an earlier run trained in this directory and this run was started without --resume: its checkpoints and \
         records are set aside (to continue it instead: stop this run, move {}/checkpoints and steps.jsonl back, \
         and run with --resume)",
        prev.display()
    );
    Ok(moved)
}

/// Resume: the newer checkpoints that did not verify are renamed `step-NNNNNN.unusable` (kept for inspection; no
/// longer counted among the run's checkpoints, nor in the way of the ones the resumed run writes).
pub fn set_aside_unusable(dirs: &[PathBuf]) {
    for d in dirs {
        let mut to = d.as_os_str().to_owned();
        to.push(".unusable");
        let mut to = PathBuf::from(to);
        let mut k = 1;
        while to.exists() {
            let mut t = d.as_os_str().to_owned();
            t.push(format!(".unusable-{k}"));
            to = PathBuf::from(t);
            k += 1;
        }
        match std::fs::rename(d, &to) {
            Ok(()) => {
                tracing::warn!(from = %d.display(), to = %to.display(), "set aside a checkpoint that does not verify")
            }
            Err(e) => {
                tracing::warn!(dir = %d.display(), "cannot set aside a checkpoint that does not verify: {e}")
            }
        }
    }
}

/// On resume: the newest checkpoint whose manifest verifies. Newer broken ones are skipped with a warning; if
/// checkpoints exist but none verifies, that is an error (starting over silently would waste the run).
pub fn resume_point(run_dir: &Path) -> anyhow::Result<Option<ResumeInfo>> {
    let all = list_checkpoints(run_dir);
    if all.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    let mut skipped_dirs = Vec::new();
    for (step, dir) in all.iter().rev() {
        match read_state(dir) {
            Ok(s) if s.step == *step => {
                if !skipped.is_empty() {
                    tracing::warn!(
                        checkpoint = %dir.display(),
                        skipped = skipped.len(),
                        "falling back to an older checkpoint because newer ones are corrupt"
                    );
                }
                let data = match std::fs::read_to_string(dir.join(DATA_STATE_FILE)) {
                    Ok(t) => Some(serde_json::from_str(&t).with_context(|| {
                        format!("{}: invalid {DATA_STATE_FILE}", dir.display())
                    })?),
                    Err(_) => None,
                };
                return Ok(Some(ResumeInfo {
                    step: s.step,
                    sequences_consumed: s.sequences_consumed,
                    checkpoint: dir.clone(),
                    world_size: s.world_size,
                    batches: s.batch_history(),
                    cpu_threads: s.cpu_threads,
                    skipped,
                    skipped_dirs,
                    data,
                    best: s.best.clone(),
                }));
            }
            Ok(s) => {
                skipped.push(format!(
                    "{}: trainer_state says step {}",
                    dir.display(),
                    s.step
                ));
                skipped_dirs.push(dir.clone());
            }
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), "checkpoint is corrupt, skipping it: {e}");
                skipped.push(format!("{}: {e}", dir.display()));
                skipped_dirs.push(dir.clone());
            }
        }
    }
    anyhow::bail!(
        "{} checkpoint(s) in {} and none verifies:\n  {}\nRestore a good checkpoint from a backup, or run without \
         --resume to start over (the run's earlier checkpoints and step records are then moved to previous/ in the \
         run directory, for inspection)",
        all.len(),
        checkpoints_dir(run_dir).display(),
        skipped.join("\n  ")
    )
}

impl Rank<'_> {
    /// A checkpoint of the step `opt` is at. Sharded, every rank first writes its own part of the optimizer state
    /// (no gather: [`FlatAdamW::save_part`]) into a staging directory beside the checkpoints, and a fully sharded
    /// model is gathered unit by unit into rank 0's host memory; then rank 0 writes the checkpoint (after making the
    /// Arrow tee durable up to its position), moving the parts in, and prunes older ones; every rank waits at a
    /// barrier.
    pub(super) fn checkpoint(
        &self,
        model: &Weights,
        opt: &FlatAdamW,
        mcfg: &LlamaConfig,
        last_loss: Option<f64>,
        data: Option<&ResumePoint>,
        result: &mut RankResult,
    ) -> Result<(), TrainerError> {
        let parts = opt.layout().is_sharded() || opt.layout().full;
        let staging = parts_dir(&self.setup.run_dir, opt.step);
        if parts {
            std::fs::create_dir_all(&staging).map_err(|e| GpuError::io(&staging, e))?;
            opt.save_part(&staging)?;
            self.coll.barrier()?;
        }
        // Fully sharded: the model gathered unit by unit into rank 0's host memory (the others only send).
        let gathered = match model {
            Weights::Whole(_) => None,
            Weights::Sharded(m) => m.gather_whole(&*self.coll, Device::Cpu, Some(0))?,
        };
        let whole = match model {
            Weights::Whole(m) => Some(m),
            Weights::Sharded(_) => gathered.as_ref(),
        };
        if let (0, Some(model)) = (self.rank, whole) {
            let t0 = Instant::now();
            let dir = checkpoints_dir(&self.setup.run_dir).join(format!("step-{:06}", opt.step));
            let mut state = self.trainer_state(opt, mcfg, last_loss);
            let best = self.best_after(result, opt.step, &dir);
            state.best = best.clone();
            self.sync_tee(state.sequences_consumed, opt.step)?;
            let bytes = checkpoint::write_checkpoint_dir(&dir, |tmp| {
                self.write_files(tmp, model, opt, parts.then_some(&*staging), data, &state)
            })?;
            if parts {
                let _ = std::fs::remove_dir_all(&staging);
            }
            prune_checkpoints(
                &self.setup.run_dir,
                self.setup.cfg.keep_checkpoints,
                opt.step,
                best.as_ref().map(|b| b.step),
            );
            if let Some(b) = &best {
                if result.best.as_ref().map(|p| p.step) != Some(b.step) {
                    point_best(&self.setup.run_dir, b.step);
                    tracing::info!(
                        step = b.step,
                        metric = %b.metric,
                        value = b.value,
                        "best checkpoint so far (train.keep_best)"
                    );
                }
            }
            result.best = best;
            self.record_checkpoint(t0, bytes);
            tracing::info!(step = opt.step, dir = %dir.display(), bytes, "checkpoint written");
            result.checkpoints.push(dir);
        }
        self.coll.barrier()?;
        Ok(())
    }

    /// `train.keep_best`: the best checkpoint after the one of `step` (written to `dir`), judged by the evaluation
    /// of that step (rank 0's; a strictly better value replaces the best, ties keep the earlier one).
    fn best_after(&self, result: &RankResult, step: u64, dir: &Path) -> Option<BestCheckpoint> {
        let m = self.setup.cfg.keep_best?;
        let here = result
            .evals
            .iter()
            .rev()
            .find(|e| e.step == step)
            .and_then(|e| m.value(e))
            .map(|value| BestCheckpoint {
                metric: m.name().to_string(),
                step,
                value,
                dir: dir.to_path_buf(),
            });
        match (result.best.clone(), here) {
            (Some(b), Some(h)) if m.better(h.value, b.value) => Some(h),
            (Some(b), _) => Some(b),
            (None, h) => h,
        }
    }

    /// `trainer_state.json` of the checkpoint of the step `opt` is at.
    fn trainer_state(
        &self,
        opt: &FlatAdamW,
        mcfg: &LlamaConfig,
        last_loss: Option<f64>,
    ) -> TrainerState {
        let cfg = &self.setup.cfg;
        TrainerState {
            step: opt.step,
            sequences_consumed: BatchSegment::consumed_at(&self.batches, opt.step),
            world_size: self.world,
            micro_batch: cfg.micro_batch.get(),
            grad_accum: cfg.grad_accum.get(),
            seq_len: self.setup.seq_len,
            schedule: opt.cfg.clone(),
            lr: opt.cfg.lr_at(opt.step),
            last_loss,
            seed: self.setup.seed,
            model: mcfg.clone(),
            train_config: cfg.clone(),
            created_unix: now_unix(),
            batches: self.batches.clone(),
            cpu_threads: matches!(self.device, Device::Cpu)
                .then(|| tch::get_num_threads().max(1) as usize),
            best: None,
        }
    }

    /// `shards.arrow_dir`: the tee made durable up to the checkpoint's position (`upto` sequences).
    fn sync_tee(&self, upto: u64, step: u64) -> Result<(), TrainerError> {
        let Some(tee) = &self.setup.tee else {
            return Ok(());
        };
        match tee.sync(upto, Duration::from_secs(120)) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                step,
                sequences = upto,
                "the Arrow tee had not received every sequence of this checkpoint after 120 s: if the run \
                 is killed before the next checkpoint, its tee may lack some of them"
            ),
            Err(e) => {
                return Err(TrainerError::Setup(format!(
                    "making the Arrow tee durable before the checkpoint of step {step}: {e}"
                )))
            }
        }
        Ok(())
    }

    /// The files of a checkpoint, into its temporary directory `tmp`.
    fn write_files(
        &self,
        tmp: &Path,
        model: &Llama,
        opt: &FlatAdamW,
        parts: Option<&Path>,
        data: Option<&ResumePoint>,
        state: &TrainerState,
    ) -> Result<(), GpuError> {
        match parts {
            // Every rank's part, staged beside the checkpoints, and the manifest of their global ranges.
            Some(staging) => {
                let l = opt.layout();
                for r in 0..l.world {
                    let name = lexflow_gpu::part_file(r, l.world);
                    let (from, to) = (staging.join(&name), tmp.join(&name));
                    std::fs::rename(&from, &to).map_err(|e| GpuError::io(&from, e))?;
                }
                std::fs::write(tmp.join(lexflow_gpu::OPTIMIZER_PARTS), opt.parts_manifest())
                    .map_err(|e| GpuError::io(tmp.join(lexflow_gpu::OPTIMIZER_PARTS), e))?;
            }
            None => {
                opt.save(&tmp.join(lexflow_gpu::OPTIMIZER_FILE))?;
            }
        }
        checkpoint::save_hf(tmp, model, DEFAULT_MAX_SHARD_BYTES)?;
        let write = |name: &str, text: String| {
            std::fs::write(tmp.join(name), text).map_err(|e| GpuError::Io {
                path: tmp.join(name),
                source: e,
            })
        };
        if let Some(d) = data {
            write(
                DATA_STATE_FILE,
                serde_json::to_string(d).expect("resume point is JSON"),
            )?;
            if let Some(dd) = &self.setup.dedup {
                let p = tmp.join(crate::stages::dedup::STATE_FILE);
                dd.write_snapshot(&d.lanes, &p)
                    .map_err(|e| GpuError::Io { path: p, source: e })?;
            }
        }
        if let Some(c) = &self.setup.run_config {
            write(RUN_CONFIG_FILE, c.clone())?;
        }
        if let Some(i) = &self.setup.inputs {
            write(crate::common::run_dir::INPUTS_FILE, i.clone())?;
        }
        for (name, bytes) in self.setup.hf_files.files.iter() {
            std::fs::write(tmp.join(name), bytes).map_err(|e| GpuError::Io {
                path: tmp.join(name),
                source: e,
            })?;
        }
        if !self.setup.hf_files.config.is_empty() {
            // The tokenizer's ids in config.json, as transformers' own checkpoints have them.
            let p = tmp.join("config.json");
            let bad = |m: String| GpuError::Io {
                path: p.clone(),
                source: std::io::Error::other(m),
            };
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            if let Some(o) = v.as_object_mut() {
                o.extend(self.setup.hf_files.config.clone());
            }
            std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("JSON value"))
                .map_err(|e| bad(e.to_string()))?;
        }
        crash_for_tests(&self.setup.run_dir, opt.step);
        write(
            "trainer_state.json",
            serde_json::to_string_pretty(state).expect("state is JSON"),
        )
    }

    /// The checkpoint metrics of a checkpoint written in `bytes`, started at `t0`.
    fn record_checkpoint(&self, t0: Instant, bytes: u64) {
        let m = lexflow_metrics::global();
        let l = [self.rank.to_string()];
        m.checkpoint_duration
            .with_label_values(&[&l[0]])
            .observe(t0.elapsed().as_secs_f64());
        m.checkpoint_size
            .with_label_values(&[&l[0]])
            .set(bytes as i64);
        m.checkpoint_last_success
            .with_label_values(&[&l[0]])
            .set(now_unix());
        m.checkpoints.with_label_values(&[&l[0]]).inc();
    }
}
