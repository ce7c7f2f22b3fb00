//! What a trainer rank is given ([`TrainerSetup`], [`EvalSetup`]) and what the ranks report when they are done
//! ([`TrainHandle`] → [`TrainReport`]); the trainer's error type.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lexflow_gpu::GpuError;
use serde::{Deserialize, Serialize};

use crate::common::device::DeviceError;
use crate::config::TrainConfig;
use crate::tasks::heldout::{EvalResult, HeldOutSet, QaProbe};

/// Everything a trainer needs besides its input edge.
#[derive(Debug, Clone)]
pub struct TrainerSetup {
    pub cfg: TrainConfig,
    pub run_dir: PathBuf,
    /// Ids the tokenizer can produce (the `tiny` preset sizes its embeddings from it).
    pub vocab_size: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// Continue from the newest valid checkpoint in `run_dir/checkpoints` (if any).
    pub resume: bool,
    /// The whole run config (TOML), stored in every checkpoint so `lexflow replay` can rebuild the dataflow.
    pub run_config: Option<String>,
    /// The input files of the run's stream (JSON, [`crate::run::inputs::InputsRecord`]), stored in every checkpoint so a
    /// resume or replay can check that it reads the same files.
    pub inputs: Option<String>,
    /// Tokenizer and generation files written into every checkpoint (a complete HF model directory):
    /// [`crate::stages::tokenizer::hf_model_files`].
    pub hf_files: Arc<crate::stages::tokenizer::HfFiles>,
    /// Held-out evaluation (`[eval]`).
    pub eval: Option<EvalSetup>,
    /// `[dedup]`: its index goes into every checkpoint (entries before the checkpoint's resume point).
    pub dedup: Option<Arc<crate::stages::dedup::DedupIndex>>,
    /// `shards.arrow_dir`: rank 0 makes the tee durable up to a checkpoint's position before writing it, so the tee
    /// of a run killed after that checkpoint still covers what it trained (`arrow_tee::recover_partials`).
    pub tee: Option<Arc<crate::stages::arrow_tee::SharedTee>>,
}

/// What the ranks evaluate, and when.
#[derive(Debug, Clone)]
pub struct EvalSetup {
    /// Held-out set for the loss (`eval.paths`, `eval.holdout`).
    pub set: Option<Arc<HeldOutSet>>,
    /// Q&A questions (`eval.qa_gold`).
    pub qa: Option<Arc<QaProbe>>,
    /// Every N optimizer steps (0: only after the last step).
    pub every: u64,
    /// Sequences per forward pass.
    pub micro_batch: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps done in total (including those before a resume).
    pub steps: u64,
    pub final_loss: f64,
    /// Global loss of every step of this run.
    pub losses: Vec<f64>,
    /// All ranks' input tokens over the slowest rank's training time.
    pub tokens_per_second: f64,
    /// Per rank: time blocked on the input edge / training time.
    pub data_wait_fraction: Vec<f64>,
    /// Checkpoints this run wrote that are still there (`keep_checkpoints` prunes the older ones).
    pub checkpoints: Vec<PathBuf>,
    pub resumed_from_step: Option<u64>,
    /// Global sequences trained by steps 1..`steps` (before a resume included): the sequences with a smaller index
    /// are exactly the trained ones (the Arrow tee may also hold a few prepared but never trained).
    pub sequences_consumed: u64,
    /// Held-out losses measured in this run (`[eval]`), in step order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evals: Vec<EvalResult>,
    /// `train.steps`: more than `steps` when the input ended (or the run was stopped) first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_steps: Option<u64>,
    /// `train.keep_best`: the best checkpoint (also `run.dir/best`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<super::checkpoint::BestCheckpoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{0}")]
    Setup(String),
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

impl From<DeviceError> for TrainerError {
    fn from(e: DeviceError) -> Self {
        TrainerError::Setup(e.0)
    }
}

/// Result of one rank, filled when its actor finishes.
#[derive(Debug, Clone, Default)]
pub(super) struct RankResult {
    pub(super) steps: u64,
    pub(super) losses: Vec<f64>,
    pub(super) tokens: u64,
    pub(super) seconds: f64,
    pub(super) wait_seconds: f64,
    pub(super) checkpoints: Vec<PathBuf>,
    pub(super) resumed_from_step: Option<u64>,
    pub(super) sequences_consumed: u64,
    pub(super) evals: Vec<EvalResult>,
    pub(super) eval_seconds: f64,
    pub(super) best: Option<super::checkpoint::BestCheckpoint>,
}

/// Collects the ranks' results; [`report`](TrainHandle::report) is complete after `topo.join()`.
pub struct TrainHandle {
    pub(super) results: Arc<Mutex<Vec<Option<RankResult>>>>,
    pub(super) target_steps: u64,
}

impl TrainHandle {
    /// None until every rank finished successfully.
    pub fn report(&self) -> Option<TrainReport> {
        let results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let ranks: Vec<&RankResult> = results.iter().map(|r| r.as_ref()).collect::<Option<_>>()?;
        let r0 = ranks.first()?;
        let seconds = ranks.iter().map(|r| r.seconds).fold(0.0, f64::max);
        let tokens: u64 = ranks.iter().map(|r| r.tokens).sum();
        Some(TrainReport {
            steps: r0.steps,
            final_loss: r0.losses.last().copied().unwrap_or(f64::NAN),
            losses: r0.losses.clone(),
            tokens_per_second: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
            data_wait_fraction: ranks
                .iter()
                .map(|r| {
                    if r.seconds > 0.0 {
                        r.wait_seconds / r.seconds
                    } else {
                        0.0
                    }
                })
                .collect(),
            checkpoints: r0
                .checkpoints
                .iter()
                .filter(|d| d.is_dir())
                .cloned()
                .collect(),
            resumed_from_step: r0.resumed_from_step,
            sequences_consumed: r0.sequences_consumed,
            evals: r0.evals.clone(),
            target_steps: Some(self.target_steps),
            best: r0.best.clone(),
        })
    }
}
