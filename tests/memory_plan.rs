//! The memory planner (`lexflow_gpu::plan`, used by `lexflow plan` and the trainer's fit check) against what libtorch
//! actually allocates: the `125m` model (12 × 768, its 85 M non-embedding parameters; an 8,192-token vocabulary
//! instead of Llama 3's 128,256, so that four replicated fp32 ranks fit this machine's memory beside the other tests)
//! and its AdamW state on 1, 2 and 4 in-process CPU ranks, replicated and with the
//! optimizer sharded (ZeRO-2), fp32 and bf16 parameters, after a real reduce + step (so every lazily allocated buffer
//! exists). The planned state bytes (weights, gradients, fp32 gradient, master, moments, communication buffers) must
//! be within 5% of the sum of the tensors' storage bytes, and the per-rank figure must fall with the world size.

use lexflow_gpu::plan::{plan, PlanSpec, ShardMode};
use lexflow_gpu::tch::{Device, Kind, Tensor};
use lexflow_gpu::{
    AdamWConfig, Collective, FlatAdamW, InProcessCollective, Llama, LlamaConfig, LrSchedule,
};

fn adamw() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-3,
        min_lr: 1e-3,
        warmup_steps: 0,
        total_steps: 10,
        schedule: LrSchedule::Cosine,
        decay_steps: 0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
    }
}

/// Storage bytes of distinct tensors: a tensor whose data lies inside one counted before (a view) is not counted again.
fn storage_bytes(tensors: &[&Tensor]) -> u64 {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut total = 0u64;
    for t in tensors {
        if !t.defined() || t.numel() == 0 {
            continue;
        }
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let start = t.data_ptr() as usize;
        if ranges.iter().any(|&(a, b)| start >= a && start < b) {
            continue;
        }
        ranges.push((start, start + bytes));
        total += bytes as u64;
    }
    total
}

/// One rank: the model, a backward that fills every `.grad`, the optimizer's reduce and step; returns the bytes held.
fn measured_rank(cfg: &LlamaConfig, kind: Kind, shard: bool, coll: InProcessCollective) -> u64 {
    let (rank, world) = (coll.rank(), coll.world_size());
    let model = Llama::new(cfg, Device::Cpu, kind, 1).unwrap();
    let mut opt = match shard {
        true => FlatAdamW::sharded(&model.params, adamw(), rank, world),
        false => FlatAdamW::new(&model.params, adamw()),
    };
    let loss = model
        .params
        .params
        .iter()
        .map(|p| (&p.tensor * 1e-3).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
    opt.reduce_grads(&model.params, &coll).unwrap();
    opt.step(&model.params, &coll).unwrap();
    let grads: Vec<Tensor> = model
        .params
        .params
        .iter()
        .map(|p| p.tensor.grad())
        .collect();
    let mut all: Vec<&Tensor> = vec![&model.params.flat];
    all.extend(grads.iter());
    all.extend(opt.tensors());
    storage_bytes(&all)
}

#[test]
fn planned_state_bytes_match_libtorch_allocations_within_5_percent() {
    let cfg = LlamaConfig {
        vocab_size: 8192,
        ..LlamaConfig::llama_125m()
    };
    let mut per_world: Vec<(String, usize, u64)> = Vec::new();
    for (kind, pb) in [(Kind::Float, 4u64), (Kind::BFloat16, 2)] {
        for shard in [false, true] {
            for world in [1usize, 2, 4] {
                if shard && world == 1 {
                    continue;
                }
                let handles: Vec<_> = InProcessCollective::group(world)
                    .into_iter()
                    .map(|c| {
                        let cfg = cfg.clone();
                        std::thread::spawn(move || measured_rank(&cfg, kind, shard, c))
                    })
                    .collect();
                let got: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
                let planned = plan(&PlanSpec {
                    model: cfg.clone(),
                    world,
                    param_bytes: pb,
                    shard: if shard {
                        ShardMode::Optimizer
                    } else {
                        ShardMode::None
                    },
                    offload: false,
                    tokens: 1,
                    recompute: false,
                })
                .device
                .state();
                let mode = format!("{kind:?} {}", if shard { "optimizer" } else { "none" });
                for (rank, &g) in got.iter().enumerate() {
                    let rel = (planned as f64 - g as f64).abs() / g as f64;
                    eprintln!(
                        "{mode} world {world} rank {rank}: planned {planned} B, allocated {g} B ({:+.3}%)",
                        100.0 * (planned as f64 - g as f64) / g as f64
                    );
                    assert!(
                        rel < 0.05,
                        "{mode} world {world} rank {rank}: planned {planned}, allocated {g}"
                    );
                }
                per_world.push((mode, world, got[0]));
            }
        }
    }
    // Sharded: the per-rank state falls with the world size (measured, not assumed).
    for kind in ["Float", "BFloat16"] {
        let mode = format!("{kind} optimizer");
        let at = |w: usize| {
            per_world
                .iter()
                .find(|(m, ww, _)| *m == mode && *ww == w)
                .unwrap()
                .2
        };
        assert!(
            at(4) < at(2),
            "{mode}: {} at 4 ranks vs {} at 2",
            at(4),
            at(2)
        );
    }
}
