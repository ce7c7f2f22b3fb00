//! How the ranks are laid out and started: devices, one process per rank (torchrun-style `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`) or several ranks in one process, the collectives between them, and [`spawn_trainers`], which starts
//! one trainer actor per rank.

#![allow(clippy::manual_checked_ops)]
use std::sync::{Arc, Mutex};

use lexflow_dataflow::{EdgeReceiver, Topology};
use lexflow_gpu::{Collective, InProcessCollective, SingleRank};
use tch::Device;

use super::checkpoint::{resume_point, ResumeInfo};
use super::model::model_config;
use super::setup::{RankResult, TrainHandle, TrainerError, TrainerSetup};
use super::step::Rank;
use crate::common::device::{check_device, parse_device};
use crate::config::TrainConfig;
use crate::types::PackedSequence;

/// How the ranks talk: in-process threads, or one process per rank (torchrun-style `RANK`/`WORLD_SIZE`).
pub(super) struct Layout {
    pub(super) world: usize,
    /// (global rank, device) for each local input edge.
    pub(super) local: Vec<(usize, Device)>,
    pub(super) multi_process: bool,
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
pub(super) fn group_of(
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
pub(super) fn rank_and_world(
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

pub(super) fn layout(cfg: &TrainConfig, inputs: usize) -> Result<Layout, TrainerError> {
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
pub(super) fn check_devices(l: &Layout) -> Result<(), TrainerError> {
    let from = match l.multi_process {
        true => "LOCAL_RANK (one process per rank, train.devices = [\"cuda:…\"])",
        false => "train.devices",
    };
    for (_, d) in &l.local {
        check_device(*d, from, "devices = [\"cpu\"]")?;
    }
    Ok(())
}

pub(super) fn collectives(l: &Layout) -> Result<Vec<Box<dyn Collective>>, TrainerError> {
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
pub(super) enum Pending {
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

pub(super) fn pending_collectives(l: &Layout) -> Result<Vec<Pending>, TrainerError> {
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
    let resume = launch_resume_point(&setup, &layout)?;
    // Fail on a bad preset now, not inside every rank.
    model_config(&setup)?;
    share_cpu_threads(&layout, resume.as_ref());
    let pending = pending_collectives(&layout)?;
    let results = Arc::new(Mutex::new(vec![None; inputs.len()]));
    let setup = Arc::new(setup);
    for (((slot, rx), (rank, device)), coll) in inputs
        .into_iter()
        .enumerate()
        .zip(layout.local.clone())
        .zip(pending)
    {
        let ranks = RankSlot {
            setup: setup.clone(),
            results: results.clone(),
            resume: resume.clone(),
            world: layout.world,
            slot,
            rank,
            device,
        };
        spawn_rank(topo, ranks, rx, coll);
    }
    Ok(TrainHandle {
        results,
        target_steps: setup.cfg.steps,
    })
}

/// `--resume`: the checkpoint the ranks continue from (a changed world size changes the global batch from here on).
fn launch_resume_point(
    setup: &TrainerSetup,
    layout: &Layout,
) -> anyhow::Result<Option<ResumeInfo>> {
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
    Ok(resume)
}

/// CPU ranks share the cores: libtorch's intra-op pool is process-wide, so give each rank its share instead of
/// letting every rank spawn a pool as large as the machine (oversubscription costs more than it gives).
fn share_cpu_threads(layout: &Layout, resume: Option<&ResumeInfo>) {
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
        if let Some(then) = resume.and_then(|r| r.cpu_threads) {
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
}

/// What one rank's actor is started with.
struct RankSlot {
    setup: Arc<TrainerSetup>,
    results: Arc<Mutex<Vec<Option<RankResult>>>>,
    resume: Option<ResumeInfo>,
    world: usize,
    /// Index of the rank's input edge (its entry in `results`).
    slot: usize,
    rank: usize,
    device: Device,
}

/// The actor `trainer.rank{rank}`: opens the rank's collective, runs its step loop, stores its result.
fn spawn_rank(topo: &mut Topology, s: RankSlot, rx: EdgeReceiver<PackedSequence>, coll: Pending) {
    let RankSlot {
        setup,
        results,
        resume,
        world,
        slot,
        rank,
        device,
    } = s;
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

/// A panic out of tch (a libtorch error) as a trainer error, with what to do when it is an out-of-memory.
pub(super) fn libtorch_failure(
    device: Device,
    payload: &(dyn std::any::Any + Send),
) -> TrainerError {
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
