//! The trainer actors: one per rank (= per input edge from the shard writer), each owning its device, model, flat
//! AdamW and collective endpoint.
//!
//! A global step consumes `world × micro_batch × grad_accum` sequences in global-index order (the shard writer deals
//! sequence `i` to rank `i % world`). Before each step the ranks vote (one small all-reduce) on whether every rank has
//! a full step and on the number of non-padding targets in it; the loss of each micro-batch is its token sum divided
//! by that global count, so any split over ranks and micro-batches gives the same gradient. A rank stops after
//! `steps` steps or when any rank's input ends (a partial last step is discarded on every rank).
//!
//! Checkpoints (`run_dir/checkpoints/step-000020/`): `model.safetensors` + `config.json` (HF layout),
//! `optimizer.safetensors` (fp32 master weights, moments, step), `trainer_state.json` (step, sequences consumed,
//! schedule, seed, world size, config) and `manifest.json` (SHA-256 of every file). Rank 0 writes atomically
//! (temporary directory, fsync, rename, fsync parent), the other ranks wait at a barrier. [`resume_point`] takes the
//! newest checkpoint whose checksums verify, warning about each one it skips.

#![allow(clippy::manual_checked_ops)]
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lexflow_dataflow::{ActorContext, EdgeReceiver, Topology};
use lexflow_gpu::checkpoint::{self, DEFAULT_MAX_SHARD_BYTES};
use lexflow_gpu::{
    valid_targets, AdamWConfig, Batch, Collective, FlatAdamW, GpuError, InProcessCollective, Llama,
    LlamaConfig, SequenceRef, SingleRank,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::common::device::{check_device, parse_device, seq_ref, DeviceError};
use crate::common::run_dir::{checkpoints_dir, list_checkpoints, RUN_CONFIG_FILE};
use crate::config::{Recompute, TrainConfig};
use crate::tasks::heldout::{EvalResult, HeldOutSet, QaEvalResult, QaProbe};
use crate::types::{PackedSequence, ResumePoint};
use anyhow::Context as _;

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
}

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
}

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
struct RankResult {
    steps: u64,
    losses: Vec<f64>,
    tokens: u64,
    seconds: f64,
    wait_seconds: f64,
    checkpoints: Vec<PathBuf>,
    resumed_from_step: Option<u64>,
    sequences_consumed: u64,
    evals: Vec<EvalResult>,
    eval_seconds: f64,
}

/// Collects the ranks' results; [`report`](TrainHandle::report) is complete after `topo.join()`.
pub struct TrainHandle {
    results: Arc<Mutex<Vec<Option<RankResult>>>>,
    target_steps: u64,
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
        })
    }
}

/// How the ranks talk: in-process threads, or one process per rank (torchrun-style `RANK`/`WORLD_SIZE`).
struct Layout {
    world: usize,
    /// (global rank, device) for each local input edge.
    local: Vec<(usize, Device)>,
    multi_process: bool,
}

/// One process per rank (torchrun-style `RANK` and `WORLD_SIZE` in the environment): `(rank, world)`. At world size
/// 1 this still counts when the devices are CUDA and NCCL is built in (`cuda` feature), which is how the single-GPU
/// check exercises the NCCL path; otherwise world size 1 is a plain single-process run, as is an environment with
/// neither variable. A launch mistake is an error naming the variable (see [`rank_and_world`]), never a silent
/// single-process run: the pipeline calls this before it writes anything into `run.dir`.
pub fn process_group(cfg: &TrainConfig) -> Result<Option<(usize, usize)>, TrainerError> {
    let var = |k: &str| std::env::var(k).ok();
    let Some((rank, world)) = rank_and_world(
        var("RANK").as_deref(),
        var("WORLD_SIZE").as_deref(),
        var("LOCAL_RANK").as_deref(),
    )?
    else {
        return Ok(None);
    };
    group_of(&cfg.devices, rank, world)
}

/// [`process_group`] once the variables are read. With `RANK`/`WORLD_SIZE` set, `train.devices` names one device
/// kind whatever the world size: at world size 1 a list of several would otherwise train them all in this process,
/// silently contradicting the launch (one process per rank).
fn group_of(
    devices: &[String],
    rank: usize,
    world: usize,
) -> Result<Option<(usize, usize)>, TrainerError> {
    process_device(devices, 0)?;
    let cuda = devices.iter().all(|d| d.starts_with("cuda"));
    Ok((world > 1 || (cuda && cfg!(feature = "cuda"))).then_some((rank, world)))
}

/// The device of a process of a one-process-per-rank run. `train.devices` names the device kind in one entry, the
/// same config on every process: `"cpu"`, or `"cuda:N"` for the GPU of `LOCAL_RANK` (`local_rank`). More entries
/// would be ignored silently (each process trains one rank): refused, as is an entry that is not a device.
pub fn process_device(devices: &[String], local_rank: usize) -> Result<Device, TrainerError> {
    if devices.len() != 1 {
        return Err(TrainerError::Setup(format!(
            "key `train.devices`: one process per rank (RANK/WORLD_SIZE set) trains one rank per process, on the \
             device kind train.devices names in one entry ([\"cuda:0\"]: the GPU of LOCAL_RANK, or [\"cpu\"]); it \
             lists {} ({:?}). Give one entry, or run one process without RANK/WORLD_SIZE for one rank per listed \
             device",
            devices.len(),
            devices
        )));
    }
    Ok(match parse_device(&devices[0])? {
        Device::Cpu => Device::Cpu,
        _ => Device::Cuda(local_rank),
    })
}

/// `RANK`, `WORLD_SIZE` and `LOCAL_RANK` as found in the environment (None or empty: not set). Neither `RANK` nor
/// `WORLD_SIZE`: Ok(None). Otherwise both must be set, `WORLD_SIZE` ≥ 1, `RANK` < `WORLD_SIZE`, and `LOCAL_RANK`, where
/// set, a number: a rank that guessed would train as another rank and write into the shared `run.dir`.
fn rank_and_world(
    rank: Option<&str>,
    world: Option<&str>,
    local: Option<&str>,
) -> Result<Option<(usize, usize)>, TrainerError> {
    const BOTH: &str = "one process per rank needs both RANK and WORLD_SIZE (torchrun-style); a single-process run \
                        sets neither";
    fn set(v: Option<&str>) -> Option<&str> {
        v.filter(|v| !v.is_empty())
    }
    let (r, w) = match (set(rank), set(world)) {
        (None, None) => return Ok(None),
        (Some(r), None) => {
            return Err(TrainerError::Setup(format!(
                "RANK={r} is set but WORLD_SIZE is not: {BOTH}"
            )))
        }
        (None, Some(w)) => {
            return Err(TrainerError::Setup(format!(
                "WORLD_SIZE={w} is set but RANK is not: {BOTH}"
            )))
        }
        (Some(r), Some(w)) => (r, w),
    };
    let world = w.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| {
        TrainerError::Setup(format!(
            "WORLD_SIZE={w} is not a whole number ≥ 1 (the number of ranks)"
        ))
    })?;
    let rank = r.parse::<usize>().map_err(|_| {
        TrainerError::Setup(format!(
            "RANK={r} is not a whole number (this process's rank, 0 to WORLD_SIZE − 1)"
        ))
    })?;
    if rank >= world {
        return Err(TrainerError::Setup(format!(
            "RANK={rank} is not below WORLD_SIZE={world}"
        )));
    }
    if let Some(l) = set(local) {
        l.parse::<usize>().map_err(|_| {
            TrainerError::Setup(format!(
                "LOCAL_RANK={l} is not a whole number (this rank's GPU on its node)"
            ))
        })?;
    }
    Ok(Some((rank, world)))
}

#[cfg(test)]
mod process_group_tests {
    use super::{group_of, rank_and_world};

    #[test]
    fn a_launch_with_rank_variables_trains_one_device_kind_even_at_world_size_one() {
        let v = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = group_of(&v(&["cpu", "cpu"]), 0, 1).unwrap_err().to_string();
        assert!(
            e.contains("train.devices") && e.contains("one process per rank"),
            "{e}"
        );
        assert_eq!(group_of(&v(&["cpu"]), 0, 1).unwrap(), None);
        assert_eq!(group_of(&v(&["cpu"]), 1, 2).unwrap(), Some((1, 2)));
    }

    fn err(rank: Option<&str>, world: Option<&str>, local: Option<&str>) -> String {
        rank_and_world(rank, world, local).unwrap_err().to_string()
    }

    #[test]
    fn no_variables_is_a_single_process_and_valid_ones_are_a_group() {
        assert_eq!(rank_and_world(None, None, None).unwrap(), None);
        assert_eq!(rank_and_world(Some(""), Some(""), None).unwrap(), None);
        assert_eq!(
            rank_and_world(Some("1"), Some("2"), Some("1")).unwrap(),
            Some((1, 2))
        );
        assert_eq!(
            rank_and_world(Some("0"), Some("1"), None).unwrap(),
            Some((0, 1))
        );
    }

    /// A launch mistake is named, never a silent single-process run writing into the shared run.dir.
    #[test]
    fn launch_mistakes_name_the_variable_and_its_value() {
        let e = err(None, Some("2"), None);
        assert!(e.contains("WORLD_SIZE=2 is set but RANK is not"), "{e}");
        let e = err(Some("1"), None, Some("1"));
        assert!(e.contains("RANK=1 is set but WORLD_SIZE is not"), "{e}");
        let e = err(Some("0"), Some("0"), None);
        assert!(e.contains("WORLD_SIZE=0 is not a whole number ≥ 1"), "{e}");
        let e = err(Some("0"), Some("two"), None);
        assert!(e.contains("WORLD_SIZE=two is not"), "{e}");
        let e = err(Some("-1"), Some("2"), None);
        assert!(e.contains("RANK=-1 is not a whole number"), "{e}");
        let e = err(Some("2"), Some("2"), None);
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = err(Some("1"), Some("2"), Some("gpu1"));
        assert!(e.contains("LOCAL_RANK=gpu1 is not a whole number"), "{e}");
    }
}

fn layout(cfg: &TrainConfig, inputs: usize) -> Result<Layout, TrainerError> {
    if let Some((rank, world)) = process_group(cfg)? {
        if inputs != 1 {
            return Err(TrainerError::Setup(format!(
                "WORLD_SIZE={world} (one process per rank) needs exactly one input edge, got {inputs}"
            )));
        }
        if rank >= world {
            return Err(TrainerError::Setup(format!(
                "RANK={rank} is not below WORLD_SIZE={world}"
            )));
        }
        let local_rank = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let device = process_device(&cfg.devices, local_rank)?;
        return Ok(Layout {
            world,
            local: vec![(rank, device)],
            multi_process: true,
        });
    }
    if cfg.devices.len() != inputs {
        return Err(TrainerError::Setup(format!(
            "{} train.devices but {inputs} rank edges from the shard writer",
            cfg.devices.len()
        )));
    }
    let local = cfg
        .devices
        .iter()
        .enumerate()
        .map(|(r, d)| Ok((r, parse_device(d)?)))
        .collect::<Result<Vec<_>, TrainerError>>()?;
    Ok(Layout {
        world: inputs,
        local,
        multi_process: false,
    })
}

/// Every CUDA device of the layout must exist: libtorch itself would abort deep inside with an unwrap.
fn check_devices(l: &Layout) -> Result<(), TrainerError> {
    let from = match l.multi_process {
        true => "LOCAL_RANK (one process per rank, train.devices = [\"cuda:…\"])",
        false => "train.devices",
    };
    for (_, d) in &l.local {
        check_device(*d, from, "devices = [\"cpu\"]")?;
    }
    Ok(())
}

fn collectives(l: &Layout) -> Result<Vec<Box<dyn Collective>>, TrainerError> {
    if l.multi_process {
        // CUDA ranks talk NCCL; CPU ranks (or CUDA without the `cuda` feature) a TCP star through rank 0.
        #[cfg(feature = "cuda")]
        if l.local.iter().all(|(_, d)| d.is_cuda()) {
            return Ok(vec![Box::new(lexflow_gpu::NcclCollective::from_env()?)]);
        }
        return Ok(vec![Box::new(lexflow_gpu::TcpCollective::from_env()?)]);
    }
    if l.world == 1 {
        return Ok(vec![Box::new(SingleRank)]);
    }
    // CPU ranks (or CUDA ranks without the `cuda` feature: correct, but reduced through host memory).
    Ok(InProcessCollective::group(l.world)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Collective>)
        .collect())
}

/// A collective to be created inside the rank's thread (NCCL comm init blocks until all ranks call it).
enum Pending {
    Ready(Box<dyn Collective>),
    #[cfg(feature = "cuda")]
    Nccl {
        id: lexflow_gpu::NcclUniqueId,
        rank: usize,
        world: usize,
        ordinal: usize,
    },
}

impl Pending {
    fn open(self) -> Result<Box<dyn Collective>, TrainerError> {
        match self {
            Pending::Ready(c) => Ok(c),
            #[cfg(feature = "cuda")]
            Pending::Nccl {
                id,
                rank,
                world,
                ordinal,
            } => Ok(Box::new(lexflow_gpu::NcclCollective::new(
                id, rank, world, ordinal,
            )?)),
        }
    }
}

fn pending_collectives(l: &Layout) -> Result<Vec<Pending>, TrainerError> {
    #[cfg(feature = "cuda")]
    if !l.multi_process && l.world > 1 && l.local.iter().all(|(_, d)| d.is_cuda()) {
        let id = lexflow_gpu::NcclUniqueId::new()?;
        return Ok(l
            .local
            .iter()
            .map(|&(rank, d)| {
                let ordinal = match d {
                    Device::Cuda(o) => o,
                    _ => unreachable!("all devices are CUDA"),
                };
                Pending::Nccl {
                    id,
                    rank,
                    world: l.world,
                    ordinal,
                }
            })
            .collect());
    }
    Ok(collectives(l)?.into_iter().map(Pending::Ready).collect())
}

/// Spawns one trainer actor per input edge (= per rank) on `topo`; the handle's `.report()` is available after
/// `topo.join()`.
pub fn spawn_trainers(
    topo: &mut Topology,
    setup: TrainerSetup,
    inputs: Vec<EdgeReceiver<PackedSequence>>,
) -> anyhow::Result<TrainHandle> {
    let layout = layout(&setup.cfg, inputs.len())?;
    check_devices(&layout)?;
    let resume = if setup.resume {
        resume_point(&setup.run_dir)?
    } else {
        None
    };
    if let Some(r) = &resume {
        if r.world_size != layout.world {
            tracing::warn!(
                checkpoint_world = r.world_size,
                world = layout.world,
                "resuming with a different world size: the global batch changes from here on"
            );
        }
    }
    // Fail on a bad preset now, not inside every rank.
    model_config(&setup)?;
    // CPU ranks share the cores: libtorch's intra-op pool is process-wide, so give each rank its share instead of
    // letting every rank spawn a pool as large as the machine (oversubscription costs more than it gives).
    let cpu_ranks = layout
        .local
        .iter()
        .filter(|(_, d)| matches!(d, tch::Device::Cpu))
        .count();
    if cpu_ranks > 0 {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // OMP_NUM_THREADS (torchrun sets it to 1 when it starts several processes per node) wins.
        let per_rank = std::env::var("OMP_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or((cores / cpu_ranks).max(1));
        tch::set_num_threads(per_rank as i32);
        tracing::debug!(cpu_ranks, per_rank, "libtorch intra-op threads");
        // CPU reductions split their work by thread: another count may round the last bits differently.
        if let Some(then) = resume.as_ref().and_then(|r| r.cpu_threads) {
            if then != per_rank {
                tracing::warn!(
                    checkpoint_threads = then,
                    threads = per_rank,
                    "the checkpoint was trained with another number of libtorch CPU threads per rank: the batches are \
                     the same, but losses and weights may differ from an uninterrupted run in the last bits; set \
                     OMP_NUM_THREADS={then} for a bit-identical continuation"
                );
            }
        }
    }
    let pending = pending_collectives(&layout)?;
    let results = Arc::new(Mutex::new(vec![None; inputs.len()]));
    let setup = Arc::new(setup);
    for (((slot, rx), (rank, device)), coll) in inputs
        .into_iter()
        .enumerate()
        .zip(layout.local.clone())
        .zip(pending)
    {
        let setup = setup.clone();
        let results = results.clone();
        let resume = resume.clone();
        let world = layout.world;
        topo.spawn(format!("trainer.rank{rank}"), move |ctx| {
            let coll = coll.open()?;
            let mut rank_state = Rank::new(ctx, &setup, rank, world, device, coll);
            // libtorch errors surface as panics inside tch; turn them into this rank's error (with a hint when the
            // device ran out of memory) and let the peers know.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rank_state.run(&rx, resume.as_ref())
            }))
            .unwrap_or_else(|p| Err(libtorch_failure(device, p.as_ref())));
            match outcome {
                Ok(r) => {
                    results.lock().unwrap_or_else(|e| e.into_inner())[slot] = Some(r);
                    Ok(())
                }
                Err(e) => {
                    rank_state.coll.abort();
                    Err(e.into())
                }
            }
        });
    }
    Ok(TrainHandle {
        results,
        target_steps: setup.cfg.steps,
    })
}

/// Estimated activation memory of one micro-batch of `tokens` tokens without recomputation: per layer and token the
/// tensors autograd keeps (norm inputs and outputs, q/k/v before and after RoPE, attention output, the MLP's gate,
/// up, SiLU and product: ≈ 10·D + 4·D_kv + 4·F elements), plus the logits and their gradient and one fp32 loss chunk.
fn activation_bytes(c: &LlamaConfig, tokens: u64, elt: u64) -> u64 {
    let d = c.hidden_size as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let f = c.intermediate_size as u64;
    let per_layer = (10 * d + 4 * kv + 4 * f) * elt;
    let logits = tokens * c.vocab_size as u64 * 2 * elt + (1u64 << 30);
    tokens * c.num_hidden_layers as u64 * per_layer + logits
}

/// `train.recompute = "auto"`: recompute when state + activations would take more than 85% of the device.
fn needs_recompute(state: u64, activations: u64, total: u64) -> bool {
    (state + activations) as f64 > 0.85 * total as f64
}

/// Parameters, gradients and (replicated or sharded) optimizer state must leave room for activations on the device.
/// Refuses a model whose training state cannot fit on the device; returns the state's bytes per rank (weights,
/// gradients, fp32 master + moments, `param_bytes` per weight, AdamW state split `shards` ways).
fn check_fits(
    mcfg: &LlamaConfig,
    param_bytes: u64,
    total: u64,
    ordinal: usize,
    shards: usize,
) -> Result<u64, TrainerError> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let n = mcfg.num_params() as u64;
    let need = lexflow_gpu::train_state_bytes(n, param_bytes, shards as u64);
    // Weights and their gradients are whole on every rank (`train.shard_optimizer` splits only the AdamW state):
    // when they alone do not fit, no number of ranks helps, and saying "more ranks" would send the user on a
    // fruitless hunt for GPUs.
    let whole = 2 * param_bytes * n;
    if whole as f64 > 0.9 * total as f64 {
        let bf16 = if param_bytes > 2 && 4 * n <= (0.9 * total as f64) as u64 {
            "set `train.dtype = \"bf16\"` (halves weights and gradients), "
        } else {
            ""
        };
        return Err(TrainerError::Setup(format!(
            "train.model: {:.2} B parameters need {:.1} GiB per rank for the weights and gradients alone, but \
             cuda:{ordinal} has {:.1} GiB: more ranks do not help (lexflow shards the AdamW state across ranks, \
             `train.shard_optimizer`, not the weights): {bf16}pick a smaller `train.model`, or use GPUs with more \
             memory",
            n as f64 / 1e9,
            gib(whole),
            gib(total)
        )));
    }
    if need as f64 > 0.9 * total as f64 {
        let what = if shards > 1 {
            format!("AdamW state sharded {shards} ways")
        } else {
            "replicated AdamW state".to_string()
        };
        // The fewest ranks whose share of the AdamW state fits beside the whole weights and gradients.
        let budget = (0.9 * total as f64) as u64 - whole;
        let state = need - whole;
        let ranks = (state * shards as u64).div_ceil(budget.max(1));
        let hint = if shards > 1 {
            format!(
                "train on at least {ranks} ranks (the sharded state shrinks with the world size), pick a smaller \
                 `train.model`, or use GPUs with more memory"
            )
        } else {
            format!(
                "set `train.shard_optimizer = true` to split the AdamW state across the ranks (ZeRO-2; it fits from \
                 {ranks} ranks on), pick a smaller `train.model`, or use GPUs with more memory"
            )
        };
        return Err(TrainerError::Setup(format!(
            "train.model: {:.2} B parameters need {:.1} GiB per rank for weights, gradients and {what} (fp32 master \
             + moments + gradient), but cuda:{ordinal} has {:.1} GiB: {hint}",
            mcfg.num_params() as f64 / 1e9,
            gib(need),
            gib(total)
        )));
    }
    if need as f64 > 0.7 * total as f64 {
        tracing::warn!(
            "weights, gradients and AdamW state take {:.1} of cuda:{ordinal}'s {:.1} GiB: little room for \
             activations (consider train.recompute = true or a smaller micro_batch)",
            gib(need),
            gib(total)
        );
    }
    Ok(need)
}

/// A panic out of tch (a libtorch error) as a trainer error, with what to do when it is an out-of-memory.
fn libtorch_failure(device: Device, payload: &(dyn std::any::Any + Send)) -> TrainerError {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("panic without a message");
    // libtorch appends a C++ backtrace (as real or as escaped newlines): keep what comes before it.
    let cut = [
        "\\nframe #",
        "\nframe #",
        "\\nException raised",
        "\nException raised",
    ]
    .iter()
    .filter_map(|k| msg.find(k))
    .min()
    .unwrap_or(msg.len());
    let head: String = msg[..cut].lines().take(4).collect::<Vec<_>>().join("\n");
    let oom = [
        "out of memory",
        "can't allocate memory",
        "CUBLAS_STATUS_ALLOC_FAILED",
    ]
    .iter()
    .any(|k| msg.contains(k));
    let hint = if oom {
        format!(
            "\n  hint: the model, its optimizer state (fp32 master + two moments + gradient: 16 bytes per parameter) \
             and the activations of one micro-batch do not fit on {device:?}: lower `train.micro_batch` (raise \
             `train.grad_accum` to keep the global batch), set `train.recompute = true`, shorten `packer.seq_len`, \
             or pick a smaller `train.model`"
        )
    } else {
        String::new()
    };
    TrainerError::Setup(format!("libtorch failed on {device:?}: {head}{hint}"))
}

fn model_config(setup: &TrainerSetup) -> Result<LlamaConfig, TrainerError> {
    let cfg = match &setup.cfg.init_from {
        Some(dir) => init_config(&setup.cfg.model, setup.vocab_size, dir)?,
        None => LlamaConfig::preset(&setup.cfg.model, setup.vocab_size)?,
    };
    if cfg.vocab_size < setup.vocab_size {
        return Err(TrainerError::Setup(format!(
            "model has {} embeddings, the tokenizer {} ids",
            cfg.vocab_size, setup.vocab_size
        )));
    }
    Ok(cfg)
}

/// The shape of `train.init_from`'s model (its `config.json`). The weights define the shape: a `train.model` other
/// than the default that names another shape is a mistake (the wrong directory, or the wrong preset), not something
/// to ignore silently.
fn init_config(model: &str, vocab_size: usize, dir: &Path) -> Result<LlamaConfig, TrainerError> {
    let cfg = checkpoint::read_hf_config(dir)?;
    if model != "tiny" {
        let preset = LlamaConfig::preset(model, vocab_size)?;
        if shape(&preset) != shape(&cfg) {
            return Err(TrainerError::Setup(format!(
                "train.model = \"{model}\" is {}, but train.init_from {} holds a model of {} (its config.json): \
                 the weights define the shape; point train.init_from at a {model} model, or remove train.model",
                describe_shape(&preset),
                dir.display(),
                describe_shape(&cfg),
            )));
        }
    }
    Ok(cfg)
}

/// What makes two models' weights interchangeable (the vocabulary aside: presets grow it to the tokenizer's size).
fn shape(c: &LlamaConfig) -> [usize; 6] {
    [
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    ]
}

fn describe_shape(c: &LlamaConfig) -> String {
    format!(
        "{:.2} B parameters (hidden {}, MLP {}, {} layers, {} heads, {} KV heads, head dim {})",
        c.num_params() as f64 / 1e9,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    )
}

fn schedule(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.steps,
        schedule: cfg.schedule,
        // WSD without an explicit length: the last 10% of the steps (at least one).
        decay_steps: cfg.decay_steps.unwrap_or((cfg.steps / 10).max(1)),
        weight_decay: cfg.weight_decay,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        grad_clip: cfg.grad_clip,
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Peak dense FLOP/s for MFU: `LEXFLOW_PEAK_FLOPS`, else H100 bf16 (989 TFLOP/s, the datasheet) on CUDA; on CPU the
/// matmul peak measured here at start (so MFU says how well the model uses what this machine's BLAS can do).
fn peak_flops(device: Device, kind: Kind) -> Option<f64> {
    if let Some(v) = std::env::var("LEXFLOW_PEAK_FLOPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    if device.is_cuda() {
        return Some(989e12);
    }
    Some(measured_matmul_flops(device, kind))
}

/// Best of a few square matmuls, in FLOP/s.
fn measured_matmul_flops(device: Device, kind: Kind) -> f64 {
    let n = 512i64;
    let a = tch::Tensor::ones([n, n], (kind, device));
    let b = tch::Tensor::ones([n, n], (kind, device));
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]);
        let secs = t.elapsed().as_secs_f64().max(1e-9);
        best = best.max(2.0 * (n * n * n) as f64 / secs);
    }
    best
}

/// Resident memory of this process (the "device memory" of CPU ranks).
fn process_rss_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as i64)
}

struct Rank<'a> {
    ctx: &'a ActorContext,
    setup: &'a TrainerSetup,
    rank: usize,
    world: usize,
    device: Device,
    coll: Box<dyn Collective>,
    /// The run's global batches so far, this run's last ([`BatchSegment`]).
    batches: Vec<BatchSegment>,
}

impl<'a> Rank<'a> {
    fn new(
        ctx: &'a ActorContext,
        setup: &'a TrainerSetup,
        rank: usize,
        world: usize,
        device: Device,
        coll: Box<dyn Collective>,
    ) -> Self {
        Rank {
            ctx,
            setup,
            rank,
            world,
            device,
            coll,
            batches: Vec::new(),
        }
    }

    // `is_multiple_of` needs Rust 1.87; the workspace promises 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    fn run(
        &mut self,
        rx: &EdgeReceiver<PackedSequence>,
        resume: Option<&ResumeInfo>,
    ) -> Result<RankResult, TrainerError> {
        let cfg = &self.setup.cfg;
        let label = self.rank.to_string();
        let m = lexflow_metrics::global();
        // `train.dtype`: auto = bf16 on CUDA, fp32 on CPU (the optimizer state is fp32 either way).
        let kind = if cfg.dtype.is_bf16(self.device.is_cuda()) {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let mcfg = model_config(self.setup)?;
        let elt = if kind == Kind::BFloat16 { 2 } else { 4 };
        let mut recompute = cfg.recompute == Recompute::On;
        let shards = if cfg.shard_optimizer { self.world } else { 1 };
        if let Device::Cuda(ordinal) = self.device {
            if let Some(total) = lexflow_gpu::cuda_memory_total(ordinal) {
                let need = check_fits(&mcfg, elt, total, ordinal, shards)?;
                if cfg.recompute == Recompute::Auto {
                    let tokens = (cfg.micro_batch.get() * self.setup.seq_len) as u64;
                    let act = activation_bytes(&mcfg, tokens, elt);
                    recompute = needs_recompute(need, act, total);
                    if self.rank == 0 {
                        tracing::info!(
                            recompute,
                            state_gib = format!("{:.1}", need as f64 / (1u64 << 30) as f64),
                            activations_gib = format!("{:.1}", act as f64 / (1u64 << 30) as f64),
                            device_gib = format!("{:.1}", total as f64 / (1u64 << 30) as f64),
                            "train.recompute = \"auto\": estimated memory of a step"
                        );
                    }
                }
            }
        }
        let mut model = Llama::new(&mcfg, self.device, kind, self.setup.seed)?;
        model.set_recompute(recompute);
        if let Some(dir) = &cfg.init_from {
            model
                .params
                .load_named(checkpoint::read_hf_weights(dir)?, mcfg.tie_word_embeddings)?;
            if self.rank == 0 && resume.is_none() {
                tracing::info!(
                    from = %dir.display(),
                    parameters = mcfg.num_params(),
                    "train.init_from: weights loaded"
                );
            }
        }
        let mut opt = if cfg.shard_optimizer {
            FlatAdamW::sharded(&model.params, schedule(cfg), self.rank, self.world)
        } else {
            FlatAdamW::new(&model.params, schedule(cfg))
        };
        if self.rank == 0 && opt.layout().is_sharded() {
            let l = opt.layout();
            tracing::info!(
                world = l.world,
                shard_elements = l.shard,
                "train.shard_optimizer: AdamW state and reduced gradients sharded across ranks"
            );
        }
        let mut result = RankResult::default();
        if let Some(r) = resume {
            opt.load(&r.checkpoint.join("optimizer.safetensors"), &model.params)?;
            if opt.step != r.step {
                return Err(TrainerError::Checkpoint {
                    path: r.checkpoint.clone(),
                    message: format!(
                        "optimizer is at step {}, trainer_state at {}",
                        opt.step, r.step
                    ),
                });
            }
            result.resumed_from_step = Some(r.step);
        }
        let here = BatchSegment {
            from_step: resume.map_or(0, |r| r.step),
            sequences_before: resume.map_or(0, |r| r.sequences_consumed),
            global_batch: (self.world * cfg.micro_batch.get() * cfg.grad_accum.get()) as u64,
            world_size: self.world,
        };
        self.batches = resume.map_or_else(Vec::new, |r| r.batches.clone());
        match self.batches.last() {
            Some(l) if l.global_batch == here.global_batch && l.world_size == here.world_size => {}
            _ => self.batches.push(here),
        }
        // Ranks start from identical weights whatever their RNG did.
        self.coll.broadcast(&mut model.params.flat.detach(), 0)?;

        let (mb, ga) = (cfg.micro_batch.get(), cfg.grad_accum.get());
        let per_rank = mb * ga;
        let flops_per_token = mcfg.train_flops_per_token(self.setup.seq_len);
        let peak = peak_flops(self.device, kind);
        let lat = lexflow_metrics::latency("trainer");
        let mut last_ckpt = opt.step;
        let mut last_eval = opt.step;
        let start = Instant::now();
        let mut seqs: Vec<PackedSequence> = Vec::with_capacity(per_rank);
        // Resume point of the last sequence this rank trained on (rank 0's goes into checkpoints).
        let mut last_resume: Option<Arc<ResumePoint>> =
            resume.and_then(|r| r.data.clone().map(Arc::new));
        // `LEXFLOW_PROFILE_STEPS=A..B`: rank 0 records steps A to B with libtorch's profiler (Kineto; every CUDA
        // kernel on a GPU) into run_dir/profile/trace-rank0.json (bench/gpu/kernels.py summarises it).
        let profile_steps = if self.rank == 0 {
            profile_steps_from_env()
        } else {
            None
        };
        let mut profiler: Option<lexflow_gpu::ops::Profiler> = None;
        let mut attention_logged = false;
        while opt.step < cfg.steps {
            let step = opt.step + 1;
            self.ctx.set_input(format!("step {step}"));
            if profile_steps.is_some_and(|(a, _)| a == step) {
                profiler = Some(lexflow_gpu::ops::Profiler::start(self.device.is_cuda())?);
            }
            let t_step = Instant::now();
            seqs.clear();
            let mut wait = 0.0;
            while seqs.len() < per_rank {
                let (r, waited) = rx.recv_timed();
                wait += waited.as_secs_f64();
                match r {
                    Ok(s) => seqs.push(s),
                    Err(_) => break,
                }
            }
            result.wait_seconds += wait;
            m.trainer_data_wait_seconds
                .with_label_values(&[&label])
                .inc_by(wait);
            let full = seqs.len() == per_rank && !self.ctx.should_stop();
            let local_valid: i64 = seqs.iter().map(|s| valid_targets(&seq_ref(s))).sum();
            let mut vote = [if full { 1.0 } else { 0.0 }, local_valid as f64];
            self.coll.all_reduce_sum_f64(&mut vote, self.device)?;
            if vote[0] < self.world as f64 {
                tracing::info!(
                    rank = self.rank,
                    step = opt.step,
                    "input ended or stop requested: training stops"
                );
                break;
            }
            let n_valid = vote[1].max(1.0);

            // The loss stays on the device until the step is done: no host sync per micro-batch.
            let mut loss_acc: Option<tch::Tensor> = None;
            let n_chunks = seqs.len().div_ceil(mb);
            for (i, chunk) in seqs.chunks(mb).enumerate() {
                let rows: Vec<SequenceRef<'_>> = chunk.iter().map(seq_ref).collect();
                let batch = Batch::new(&rows, self.device)?;
                if self.rank == 0 && !attention_logged && batch.segments.is_some() {
                    attention_logged = true;
                    tracing::info!(
                        path = model.attention_path(&batch),
                        "packed documents: block-diagonal causal attention"
                    );
                }
                // Gradient of (sum over all ranks' targets) / n_valid after the mean all-reduce.
                let loss = model.forward_backward(&batch, self.world as f64 / n_valid);
                loss_acc = Some(match loss_acc {
                    Some(acc) => acc + loss.to_kind(Kind::Double),
                    None => loss.to_kind(Kind::Double),
                });
                // bf16 parameters: the micro-batches' gradients sum in the optimizer's fp32 buffer, not in bf16.
                if i + 1 < n_chunks {
                    opt.accumulate_micro_batch(&mut model.params, &*self.coll)?;
                }
            }
            opt.reduce_grads(&model.params, &*self.coll)?;
            let st = opt.step(&model.params, &*self.coll)?;
            // Read after the optimizer is enqueued (its gradient-norm read-back already waited for the device).
            let loss_sum = loss_acc.map_or(0.0, |l| l.double_value(&[]));
            model.params.zero_grad();
            let mut lv = [loss_sum];
            self.coll.all_reduce_sum_f64(&mut lv, self.device)?;
            let loss = lv[0] / n_valid;
            if !loss.is_finite() {
                return Err(TrainerError::Setup(format!(
                    "loss is {loss} at step {step}"
                )));
            }
            result.losses.push(loss);
            result.steps = opt.step;
            if profile_steps.is_some_and(|(_, b)| b == step) {
                if let Some(p) = profiler.take() {
                    if let Device::Cuda(i) = self.device {
                        tch::Cuda::synchronize(i as i64);
                    }
                    let dir = self.setup.run_dir.join("profile");
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        TrainerError::Setup(format!("{}: cannot create: {e}", dir.display()))
                    })?;
                    let path = dir.join(format!("trace-rank{}.json", self.rank));
                    p.stop(&path)?;
                    tracing::info!(path = %path.display(), "profiler trace written");
                }
            }
            if let Some(rp) = seqs.last().and_then(|s| s.resume.clone()) {
                last_resume = Some(rp);
            }
            append_step_record(
                &self.setup.run_dir,
                &StepRecord {
                    step,
                    rank: self.rank,
                    loss,
                    sequences: seqs
                        .iter()
                        .map(|s| (s.index, sequence_hash(&s.tokens)))
                        .collect(),
                },
            );

            let secs = t_step.elapsed().as_secs_f64();
            let tokens = (per_rank * self.setup.seq_len) as u64;
            result.tokens += tokens;
            let tps = tokens as f64 / secs.max(1e-9);
            m.trainer_steps.with_label_values(&[&label]).inc();
            m.trainer_tokens.with_label_values(&[&label]).inc_by(tokens);
            m.trainer_tokens_per_second
                .with_label_values(&[&label])
                .set(tps);
            m.trainer_step_seconds
                .with_label_values(&[&label])
                .observe(secs);
            m.trainer_loss.with_label_values(&[&label]).set(loss);
            m.trainer_lr.with_label_values(&[&label]).set(st.lr);
            m.trainer_grad_norm
                .with_label_values(&[&label])
                .set(st.grad_norm);
            let elapsed = start.elapsed().as_secs_f64() - result.eval_seconds;
            m.trainer_data_wait_fraction
                .with_label_values(&[&label])
                .set(result.wait_seconds / elapsed.max(1e-9));
            lat.record(t_step.elapsed());
            let mem = if self.device.is_cuda() {
                lexflow_gpu::cuda_memory_used().map(|b| b as i64)
            } else {
                process_rss_bytes()
            };
            if let Some(bytes) = mem {
                m.trainer_device_memory
                    .with_label_values(&[&label])
                    .set(bytes);
            }
            if let Some(p) = peak {
                m.trainer_mfu
                    .with_label_values(&[&label])
                    .set(tps * flops_per_token / p);
            }
            if self.rank == 0 && (step == 1 || step % 10 == 0 || step == cfg.steps) {
                tracing::info!(
                    step,
                    loss = format!("{loss:.4}"),
                    lr = format!("{:.3e}", st.lr),
                    grad_norm = format!("{:.3}", st.grad_norm),
                    tokens_per_s = format!("{:.0}", tps * self.world as f64),
                    "train step"
                );
            }
            if let Some(e) = self.setup.eval.as_ref().filter(|e| e.every > 0) {
                if step % e.every == 0 {
                    self.evaluate(&model, e, step, &mut result)?;
                    last_eval = step;
                }
            }
            if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 {
                self.checkpoint(
                    &model,
                    &opt,
                    &mcfg,
                    Some(loss),
                    last_resume.as_deref(),
                    &mut result,
                )?;
                last_ckpt = step;
            }
        }
        // After the last step (also when the input ended early), unless a stop was requested.
        if let Some(e) = &self.setup.eval {
            if opt.step > last_eval && !self.ctx.should_stop() {
                self.evaluate(&model, e, opt.step, &mut result)?;
            }
        }
        // Training time only: evaluations are reported on their own.
        result.seconds = start.elapsed().as_secs_f64() - result.eval_seconds;
        if opt.step > last_ckpt {
            let last = result.losses.last().copied();
            self.checkpoint(
                &model,
                &opt,
                &mcfg,
                last,
                last_resume.as_deref(),
                &mut result,
            )?;
        }
        result.steps = opt.step;
        result.sequences_consumed = BatchSegment::consumed_at(&self.batches, opt.step);
        Ok(result)
    }

    /// One evaluation: the held-out loss and/or the Q&A scores (every rank takes part; rank 0 records).
    fn evaluate(
        &self,
        model: &Llama,
        e: &EvalSetup,
        step: u64,
        result: &mut RankResult,
    ) -> Result<(), TrainerError> {
        let t0 = Instant::now();
        self.ctx.set_input(format!("evaluation at step {step}"));
        let mut r = match &e.set {
            Some(set) => self.held_out_loss(model, set, e.micro_batch, step)?,
            None => EvalResult {
                step,
                loss: None,
                tokens: 0,
                seconds: 0.0,
                languages: Default::default(),
                qa: None,
            },
        };
        if let Some(qa) = &e.qa {
            r.qa = self.qa_scores(model, qa, step)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        r.seconds = secs;
        result.eval_seconds += secs;
        if self.rank != 0 {
            return Ok(());
        }
        let m = lexflow_metrics::global();
        for (lang, l) in &r.languages {
            m.eval_loss.with_label_values(&[lang]).set(l.loss);
            m.eval_tokens
                .with_label_values(&[lang])
                .set(l.tokens as i64);
        }
        if let Some(loss) = r.loss {
            m.eval_loss.with_label_values(&["all"]).set(loss);
            m.eval_tokens
                .with_label_values(&["all"])
                .set(r.tokens as i64);
        }
        if let Some(q) = &r.qa {
            let langs = q.by_language.iter().map(|(k, v)| (k.as_str(), v));
            for (lang, a) in std::iter::once(("all", &q.overall)).chain(langs) {
                for (metric, v) in [
                    ("exact_match", a.exact_match),
                    ("rouge_l", a.rouge_l),
                    ("citation_accuracy", a.citation_accuracy),
                    ("hallucination_rate", a.hallucination_rate),
                    ("wrong_citation_rate", a.wrong_citation_rate),
                ] {
                    m.eval_qa.with_label_values(&[metric, lang]).set(v);
                }
            }
        }
        m.eval_step.set(step as i64);
        m.eval_seconds.observe(secs);
        let per_lang: Vec<String> = r
            .languages
            .iter()
            .map(|(k, v)| format!("{k}={:.4}", v.loss))
            .collect();
        tracing::info!(
            step,
            loss = r.loss.map(|l| format!("{l:.4}")).unwrap_or_default(),
            per_language = per_lang.join(" "),
            qa_citation_accuracy =
                r.qa.as_ref()
                    .map(|q| format!("{:.3}", q.overall.citation_accuracy))
                    .unwrap_or_default(),
            qa_rouge_l =
                r.qa.as_ref()
                    .map(|q| format!("{:.3}", q.overall.rouge_l))
                    .unwrap_or_default(),
            seconds = format!("{secs:.2}"),
            "evaluation"
        );
        append_json_line(
            &self.setup.run_dir.join(crate::tasks::heldout::RESULTS_FILE),
            &serde_json::to_string(&r).expect("eval result is JSON"),
        );
        result.evals.push(r);
        Ok(())
    }

    /// Loss on the held-out set: rank r evaluates sequences `k ≡ r (mod world)`, without a graph, each sequence's
    /// cross-entropy sum kept apart; one all-reduce of those sums (every entry comes from one rank, the others add
    /// zeros, so it is exact) and a sum in index order make the result independent of the world size.
    fn held_out_loss(
        &self,
        model: &Llama,
        set: &HeldOutSet,
        micro_batch: usize,
        step: u64,
    ) -> Result<EvalResult, TrainerError> {
        let t0 = Instant::now();
        let all = set.sequences();
        let mut sums = vec![0f64; all.len()];
        let mine: Vec<usize> = (self.rank..all.len()).step_by(self.world).collect();
        for chunk in mine.chunks(micro_batch.max(1)) {
            let rows: Vec<SequenceRef<'_>> = chunk.iter().map(|&k| seq_ref(all[k].1)).collect();
            let batch = Batch::new(&rows, self.device)?;
            tch::no_grad(|| {
                let logits = model.forward_batch(&batch);
                for (i, &k) in chunk.iter().enumerate() {
                    let i = i as i64;
                    let l = lexflow_gpu::cross_entropy_sum(
                        &logits.narrow(0, i, 1),
                        &batch.labels.narrow(0, i, 1),
                    );
                    sums[k] = l.double_value(&[]);
                }
            });
        }
        self.coll.all_reduce_sum_f64(&mut sums, self.device)?;
        let r = crate::tasks::heldout::aggregate(set, step, &sums, t0.elapsed().as_secs_f64());
        match r.loss {
            Some(l) if !l.is_finite() => Err(TrainerError::Setup(format!(
                "held-out loss is {l} at step {step}"
            ))),
            _ => Ok(r),
        }
    }

    /// Greedy answers to the Q&A questions: rank r answers questions `k ≡ r (mod world)`, `batch_size` at a time;
    /// the answers' token ids travel to every rank in one all-reduce (each entry from one rank, exact), and rank 0
    /// decodes and scores them (None on the other ranks).
    fn qa_scores(
        &self,
        model: &Llama,
        qa: &QaProbe,
        step: u64,
    ) -> Result<Option<QaEvalResult>, TrainerError> {
        let t0 = Instant::now();
        let n = qa.gold.len();
        let w = qa.max_new_tokens + 1;
        let mut buf = vec![0f64; n * w];
        let mine: Vec<usize> = (self.rank..n).step_by(self.world).collect();
        for chunk in mine.chunks(qa.batch_size.max(1)) {
            let prompts: Vec<Vec<i64>> = chunk.iter().map(|&k| qa.prompts[k].clone()).collect();
            let gen =
                crate::tasks::decode::greedy_batch(model, &prompts, &qa.stops, qa.max_new_tokens)
                    .map_err(|e| {
                    TrainerError::Setup(format!("Q&A evaluation at step {step}: {e:#}"))
                })?;
            for (&k, ids) in chunk.iter().zip(gen) {
                buf[k * w] = ids.len() as f64;
                for (j, &t) in ids.iter().enumerate() {
                    buf[k * w + 1 + j] = t as f64;
                }
            }
        }
        self.coll.all_reduce_sum_f64(&mut buf, self.device)?;
        if self.rank != 0 {
            return Ok(None);
        }
        let mut outputs = std::collections::HashMap::new();
        let mut lines = String::new();
        for (k, g) in qa.gold.iter().enumerate() {
            let len = buf[k * w] as usize;
            let ids: Vec<u32> = buf[k * w + 1..k * w + 1 + len]
                .iter()
                .map(|&x| x as u32)
                .collect();
            let text = qa.tokenizer.decode(&ids).trim().to_string();
            lines +=
                &serde_json::json!({"id": g.id, "lang": g.lang, "output": text, "token_ids": ids})
                    .to_string();
            lines.push('\n');
            outputs.insert(g.id.clone(), text);
        }
        let path = self
            .setup
            .run_dir
            .join(crate::tasks::heldout::QA_DIR)
            .join(format!("step-{step:06}.jsonl"));
        if let Err(e) = std::fs::write(&path, lines) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        let rep = crate::tasks::eval::report(&qa.gold, &outputs, &qa.index, &qa.index_source);
        Ok(Some(QaEvalResult {
            overall: rep.overall,
            by_language: rep.by_language,
            seconds: t0.elapsed().as_secs_f64(),
            predictions: path,
        }))
    }

    fn checkpoint(
        &self,
        model: &Llama,
        opt: &FlatAdamW,
        mcfg: &LlamaConfig,
        last_loss: Option<f64>,
        data: Option<&ResumePoint>,
        result: &mut RankResult,
    ) -> Result<(), TrainerError> {
        if self.rank == 0 {
            let t0 = Instant::now();
            let cfg = &self.setup.cfg;
            let dir = checkpoints_dir(&self.setup.run_dir).join(format!("step-{:06}", opt.step));
            let state = TrainerState {
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
            };
            if let Some(tee) = &self.setup.tee {
                let upto = state.sequences_consumed;
                match tee.sync(upto, Duration::from_secs(120)) {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        step = opt.step,
                        sequences = upto,
                        "the Arrow tee had not received every sequence of this checkpoint after 120 s: if the run \
                         is killed before the next checkpoint, its tee may lack some of them"
                    ),
                    Err(e) => {
                        return Err(TrainerError::Setup(format!(
                            "making the Arrow tee durable before the checkpoint of step {}: {e}",
                            opt.step
                        )))
                    }
                }
            }
            let bytes = checkpoint::write_checkpoint_dir(&dir, |tmp| {
                // First, so that sharded peers waiting to send their slices are served before anything else.
                opt.save_collective(Some(&tmp.join("optimizer.safetensors")), &*self.coll)?;
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
                    serde_json::to_string_pretty(&state).expect("state is JSON"),
                )
            })?;
            prune_checkpoints(&self.setup.run_dir, cfg.keep_checkpoints, opt.step);
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
            tracing::info!(step = opt.step, dir = %dir.display(), bytes, "checkpoint written");
            result.checkpoints.push(dir);
        } else {
            // Sharded: send this rank's slices of the optimizer state to rank 0's file (replicated: nothing to do).
            opt.save_collective(None, &*self.coll)?;
        }
        self.coll.barrier()?;
        Ok(())
    }
}

/// `LEXFLOW_PROFILE_STEPS=A..B` (inclusive, 1-based) or `=A` (one step); anything else is ignored with a warning.
fn profile_steps_from_env() -> Option<(u64, u64)> {
    let v = std::env::var("LEXFLOW_PROFILE_STEPS").ok()?;
    let parsed = match v.split_once("..") {
        Some((a, b)) => a.trim().parse().ok().zip(b.trim().parse().ok()),
        None => v.trim().parse().ok().map(|a| (a, a)),
    };
    match parsed {
        Some((a, b)) if a >= 1 && a <= b => Some((a, b)),
        _ => {
            tracing::warn!("LEXFLOW_PROFILE_STEPS={v:?} is not A..B with 1 <= A <= B: no profile");
            None
        }
    }
}

/// Keeps the `keep` newest checkpoints and removes leftover temporary directories. (No checkpoint newer than the
/// run's step exists by then: a fresh run sets an earlier run's aside, a resumed run the newer ones that did not
/// verify — [`set_aside_previous_run`], [`set_aside_unusable`].)
fn prune_checkpoints(run_dir: &Path, keep: usize, current: u64) {
    // Newer ones (should a rename to `.unusable` have failed) are neither counted nor removed.
    let mut all = list_checkpoints(run_dir);
    all.retain(|(s, _)| *s <= current);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), "cannot remove old checkpoint: {e}");
        }
    }
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(run_dir)) {
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.')
                && name.contains(".tmp-")
                && !name.ends_with(&format!(".tmp-{}", std::process::id()))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Test hook for the kill test: `LEXFLOW_CRASH_IN_CHECKPOINT=<step>` aborts the process in the middle of writing that
/// step's checkpoint (model and optimizer written, state not yet), once per run directory.
fn crash_for_tests(run_dir: &Path, step: u64) {
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

/// Nanoseconds since the epoch (unique scratch names).
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Dataflow resume point inside a checkpoint directory.
pub const DATA_STATE_FILE: &str = "data_state.json";
/// Per-step record of what every rank trained on (one JSON object per rank and step).
pub const STEPS_FILE: &str = "steps.jsonl";

/// One line of `steps.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub rank: usize,
    pub loss: f64,
    /// `(global index, sha256 prefix of the tokens)` of each sequence this rank trained on in this step.
    pub sequences: Vec<(u64, String)>,
}

pub fn sequence_hash(tokens: &[u32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// Reads `steps.jsonl`, keeping the last record of each (step, rank): after a crash and resume, redone steps are
/// written again. Torn last lines (kill -9 mid-write) are ignored.
pub fn read_step_records(run_dir: &Path) -> std::collections::BTreeMap<(u64, usize), StepRecord> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(run_dir.join(STEPS_FILE)) {
        for line in text.lines() {
            if let Ok(r) = serde_json::from_str::<StepRecord>(line) {
                out.insert((r.step, r.rank), r);
            }
        }
    }
    out
}

fn append_step_record(run_dir: &Path, rec: &StepRecord) {
    append_json_line(
        &run_dir.join(STEPS_FILE),
        &serde_json::to_string(rec).expect("step record is JSON"),
    );
}

/// Appends one line with one write(2) on an O_APPEND file: lines of different ranks never interleave.
fn append_json_line(path: &Path, json: &str) {
    use std::io::Write;
    let line = format!("{json}\n");
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = r {
        tracing::warn!("cannot append to {}: {e}", path.display());
    }
}

fn read_state(dir: &Path) -> Result<TrainerState, String> {
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

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn auto_recompute_only_when_the_step_would_not_fit() {
        let gib = 1u64 << 30;
        let c1 = LlamaConfig::preset("1b", 128_256).unwrap();
        let state = lexflow_gpu::train_state_bytes(c1.num_params() as u64, 2, 1);
        // 1B, 2 × 4096 tokens on 80 GB: ~23 GiB state + ~18 GiB activations: no recomputation.
        let act2 = activation_bytes(&c1, 2 * 4096, 2);
        assert!(act2 > 10 * gib && act2 < 30 * gib, "{}", act2 / gib);
        assert!(!needs_recompute(state, act2, 80 * gib));
        // 8 × 4096 tokens per micro-batch: activations alone exceed the device.
        let act8 = activation_bytes(&c1, 8 * 4096, 2);
        assert!(needs_recompute(state, act8, 80 * gib));
    }

    #[test]
    fn earlier_runs_and_unusable_checkpoints_are_set_aside_not_pruned_over() {
        let dir = tempfile::tempdir().unwrap();
        let ck = |s: u64| checkpoints_dir(dir.path()).join(format!("step-{s:06}"));
        for s in [10u64, 20, 30] {
            std::fs::create_dir_all(ck(s)).unwrap();
        }
        // Resumed from 20 because 30 does not verify: 30 is renamed, so after writing 22 and pruning to 2, the
        // good 20 and 22 are what is left (counting 30 among the newest would have removed 20).
        set_aside_unusable(&[ck(30)]);
        std::fs::create_dir_all(ck(22)).unwrap();
        prune_checkpoints(dir.path(), 2, 22);
        let left: Vec<u64> = list_checkpoints(dir.path())
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![20, 22]);
        assert!(checkpoints_dir(dir.path())
            .join("step-000030.unusable")
            .is_dir());
        // A fresh run over it: everything moves to previous/, nothing is lost.
        std::fs::write(dir.path().join(STEPS_FILE), "{}\n").unwrap();
        std::fs::write(dir.path().join("dedup.rank1.jsonl"), "").unwrap();
        let moved = set_aside_previous_run(dir.path()).unwrap();
        assert_eq!(moved.len(), 3);
        assert!(list_checkpoints(dir.path()).is_empty());
        assert!(dir.path().join("previous/checkpoints/step-000022").is_dir());
        assert!(dir.path().join("previous").join(STEPS_FILE).is_file());
        assert!(dir.path().join("previous/dedup.rank1.jsonl").is_file());
        // A run that failed before training left only empty records: not an earlier run, nothing moves.
        std::fs::write(dir.path().join(crate::stages::dedup::LOG_FILE), "").unwrap();
        std::fs::write(dir.path().join(STEPS_FILE), "").unwrap();
        assert!(set_aside_previous_run(dir.path()).unwrap().is_empty());
        // Another earlier run: previous.1, previous/ untouched.
        std::fs::create_dir_all(ck(4)).unwrap();
        set_aside_previous_run(dir.path()).unwrap();
        assert!(dir
            .path()
            .join("previous.1/checkpoints/step-000004")
            .is_dir());
        assert!(dir.path().join("previous/checkpoints/step-000022").is_dir());
    }

    /// One process per rank: one device entry, the kind only (CUDA on LOCAL_RANK); a list of several, which a process
    /// would silently reduce to its first, or a non-device is an error naming the key.
    #[test]
    fn a_process_of_one_rank_takes_one_device_entry() {
        let v = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(process_device(&v(&["cpu"]), 3).unwrap(), Device::Cpu);
        assert_eq!(process_device(&v(&["cuda:0"]), 3).unwrap(), Device::Cuda(3));
        for bad in [&["cpu", "cpu"][..], &["cuda:0", "cuda:1"], &[]] {
            let e = process_device(&v(bad), 0).unwrap_err().to_string();
            assert!(
                e.contains("key `train.devices`") && e.contains("one entry"),
                "{e}"
            );
        }
        let e = process_device(&v(&["gpu"]), 0).unwrap_err().to_string();
        assert!(e.contains("`gpu` is not `cpu` or `cuda:N`"), "{e}");
    }

    #[test]
    fn a_cuda_device_libtorch_does_not_see_is_a_setup_error_naming_the_key() {
        let l = Layout {
            world: 2,
            local: vec![(0, Device::Cpu), (1, Device::Cuda(63))],
            multi_process: false,
        };
        let e = check_devices(&l).unwrap_err().to_string();
        assert!(
            e.contains("train.devices: cuda:63") && e.contains("CUDA device(s)"),
            "{e}"
        );
        // libtorch counts devices through its CUDA backend, which our binaries do not link (`init_cuda`): without
        // loading it first, every GPU run would be refused with "libtorch sees 0 CUDA device(s)".
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            maps.contains("libtorch_cuda.so"),
            "check_devices counted CUDA devices without loading libtorch's CUDA backend"
        );
        let cpu = Layout {
            world: 1,
            local: vec![(0, Device::Cpu)],
            multi_process: false,
        };
        assert!(check_devices(&cpu).is_ok());
    }

    #[test]
    fn models_that_cannot_fit_are_refused_before_allocating() {
        let gib = 1u64 << 30;
        let c8 = LlamaConfig::preset("8b", 128_256).unwrap();
        let n8 = c8.num_params() as u64;
        // 8B: 20 bytes per parameter, ~150 GiB: not on an 80 GB H100, nor a 141 GB H200.
        let e = check_fits(&c8, 2, 80 * gib, 0, 1).unwrap_err().to_string();
        assert!(
            e.contains("train.model")
                && e.contains("cuda:0")
                && e.contains("train.shard_optimizer = true")
                && e.contains("fits from 3 ranks on"),
            "{e}"
        );
        assert!(check_fits(&c8, 2, 141 * gib, 0, 1).is_err());
        // Sharded 8 ways: 4 bytes of weights and gradients + 16/8 of optimizer state per parameter (~45 GiB).
        let sharded8 = check_fits(&c8, 2, 80 * gib, 0, 8).unwrap();
        assert_eq!(sharded8, n8 * 4 + n8 * 16 / 8);
        // The rank count the hint names is the smallest that fits, and one fewer does not.
        assert!(check_fits(&c8, 2, 80 * gib, 0, 3).is_ok());
        assert!(check_fits(&c8, 2, 80 * gib, 0, 2).is_err());
        // Sharded 2 ways is still too much (~90 GiB), and the error says what to do.
        let e = check_fits(&c8, 2, 80 * gib, 0, 2).unwrap_err().to_string();
        assert!(
            e.contains("sharded 2 ways") && e.contains("at least 3 ranks"),
            "{e}"
        );
        // 70B: its bf16 weights and gradients alone (~263 GiB) fit on no GPU, however many ranks share the
        // AdamW state: the error must not send the user looking for more ranks.
        let c70 = LlamaConfig::preset("70b", 128_256).unwrap();
        for shards in [1, 8, 1024] {
            let e = check_fits(&c70, 2, 141 * gib, 0, shards)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("weights and gradients alone")
                    && e.contains("more ranks do not help")
                    && !e.contains("at least")
                    && !e.contains("bf16"),
                "{e}"
            );
        }
        // fp32 weights and gradients of 8B (~60 GiB) do not fit a 48 GB GPU however sharded; bf16 ones would.
        let e = check_fits(&c8, 4, 48 * gib, 0, 8).unwrap_err().to_string();
        assert!(
            e.contains("more ranks do not help") && e.contains("train.dtype = \"bf16\""),
            "{e}"
        );
        let c1 = LlamaConfig::preset("1b", 128_256).unwrap();
        assert!(check_fits(&c1, 2, 80 * gib, 0, 1).is_ok());
        assert_eq!(lexflow_gpu::train_state_bytes(10, 4, 1), 10 * 20);
    }

    #[test]
    fn init_from_of_another_shape_than_train_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = LlamaConfig::preset("125m", 128_256).unwrap();
        checkpoint::write_hf_config(dir.path(), &small, Kind::BFloat16).unwrap();
        // The default `model` (tiny) and the matching preset take the directory's shape.
        for model in ["tiny", "125m"] {
            let c = init_config(model, 128_256, dir.path()).unwrap();
            assert_eq!(shape(&c), shape(&small), "{model}");
        }
        let e = init_config("1b", 128_256, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.model = \"1b\"")
                && e.contains("hidden 2048")
                && e.contains("hidden 768")
                && e.contains(&dir.path().display().to_string())
                && e.contains("remove train.model"),
            "{e}"
        );
    }

    #[test]
    fn out_of_memory_gets_a_hint_other_failures_do_not() {
        let oom: Box<dyn std::any::Any + Send> = Box::new(String::from(
            "Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB\\nException raised from malloc at …\\nframe #0 …\")",
        ));
        let e = libtorch_failure(Device::Cuda(0), oom.as_ref()).to_string();
        assert!(
            e.contains("CUDA out of memory") && e.contains("train.micro_batch"),
            "{e}"
        );
        assert!(
            !e.contains("frame #0") && !e.contains("Exception raised"),
            "backtrace kept: {e}"
        );
        let other: Box<dyn std::any::Any + Send> = Box::new("shape mismatch");
        let e = libtorch_failure(Device::Cpu, other.as_ref()).to_string();
        assert!(e.contains("shape mismatch") && !e.contains("hint"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_must_match_edges_and_parse() {
        let mut cfg: TrainConfig =
            toml::from_str("devices = [\"cpu\", \"cuda:1\"]\nsteps = 1").unwrap();
        assert!(layout(&cfg, 3).is_err());
        let l = layout(&cfg, 2).unwrap();
        assert_eq!(l.local[1], (1, Device::Cuda(1)));
        cfg.devices = vec!["gpu0".into()];
        assert!(layout(&cfg, 1).is_err());
    }

    #[test]
    fn resume_point_none_without_checkpoints_and_error_when_all_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resume_point(dir.path()).unwrap().is_none());
        let bad = checkpoints_dir(dir.path()).join("step-000002");
        std::fs::create_dir_all(&bad).unwrap();
        let e = resume_point(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("none verifies") && e.contains("step-000002"),
            "{e}"
        );
    }
}
