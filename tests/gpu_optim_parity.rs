//! `FlatAdamW` against `torch.optim.AdamW` + `torch.nn.utils.clip_grad_norm_`, computed in the same run from the same
//! initial weights and gradients: two parameter groups (weight decay on ≥2-D weights, none on the norms), clipping
//! active, warmup then cosine, bias correction from step 1. The lexflow side takes the awkward route on purpose: two
//! in-process ranks with *different* gradients (the step's gradient is their mean), the optimizer sharded across
//! them, its state saved mid-warmup (rank 0 streaming the other rank's slice), and the run finished by a replicated
//! optimizer on a freshly initialised model that loads that file. Any difference in the update formula, the decay
//! groups, the clipping (global norm across ranks and shards), the schedule or the state's round trip (step counter,
//! moments, master weights) shows up orders of magnitude above fp32 rounding. Needs the project venv
//! (`source scripts/env.sh`).

use std::process::Command;

use lexflow_gpu::checkpoint::{read_safetensors, write_safetensors};
use lexflow_gpu::tch::{Device, Kind, Tensor};
use lexflow_gpu::{
    AdamWConfig, Collective, FlatAdamW, InProcessCollective, Llama, LlamaConfig, LrSchedule,
    ParamLayout,
};
use lexflow_tests::venv_python;

const STEPS: u64 = 7;
/// Steps taken before the state is saved and reloaded (inside the warmup).
const SAVE_AT: u64 = 2;
const WORLD: usize = 2;

fn adamw() -> AdamWConfig {
    AdamWConfig {
        lr: 2e-2,
        min_lr: 2e-3,
        warmup_steps: 3,
        total_steps: STEPS,
        schedule: LrSchedule::Cosine,
        decay_steps: 0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 0.5,
    }
}

fn model_cfg() -> LlamaConfig {
    // Small enough that the flat buffer spans a few 64 Ki-element norm blocks, so both ranks own a shard.
    LlamaConfig {
        num_hidden_layers: 2,
        ..LlamaConfig::tiny(1200)
    }
}

/// Rank `rank`'s gradient at `step` (1-based), a deterministic function of the flat index: ranks disagree, and the
/// norm elements get their own scale, so their missing weight decay and their share of the global norm both matter.
/// The padding between units has no gradient.
fn grad(layout: &ParamLayout, rank: usize, step: u64) -> Tensor {
    let n = layout.total;
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let g = (&i * (0.37 + 0.05 * rank as f64 + 0.011 * step as f64)).sin()
        + (&i * 0.0013 + step as f64).cos() * 0.3;
    let scale = Tensor::zeros([n], (Kind::Double, Device::Cpu));
    for u in &layout.units {
        let _ = scale.narrow(0, u.start, u.decay).fill_(1.0);
        let _ = scale
            .narrow(0, u.start + u.decay, u.numel - u.decay)
            .fill_(4.0);
    }
    (g * scale * (0.02 * (rank as f64 + 1.0))).to_kind(Kind::Float)
}

/// Puts `flat` (the whole gradient) into every parameter's `.grad` through a backward, as training does.
fn set_grads(model: &mut Llama, flat: &Tensor) {
    model.params.zero_grad();
    let loss = model
        .params
        .params
        .iter()
        .map(|p| {
            let g = flat.narrow(0, p.offset, p.numel).view(p.shape.as_slice());
            (&p.tensor * g).sum(Kind::Float)
        })
        .reduce(|a, b| a + b)
        .expect("parameters");
    loss.backward();
}

const TORCH_REF: &str = r#"
import json, math, sys
import torch
from safetensors.torch import load_file
io = load_file(sys.argv[1]); c = json.loads(sys.argv[2])
names = c["names"]
params = [torch.nn.Parameter(io["init." + n].clone()) for n in names]
decay = [p for p in params if p.dim() >= 2]
no_decay = [p for p in params if p.dim() < 2]
opt = torch.optim.AdamW([dict(params=decay, weight_decay=c["weight_decay"]),
                         dict(params=no_decay, weight_decay=0.0)],
                        lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"], foreach=False, fused=False)
def lr_at(step):
    w = c["warmup_steps"]
    if w > 0 and step <= w:
        return c["lr"] * step / w
    span = max(c["total_steps"] - w, 1)
    progress = min(max((step - w) / span, 0.0), 1.0)
    return c["min_lr"] + 0.5 * (c["lr"] - c["min_lr"]) * (1 + math.cos(math.pi * progress))
norms = []
for step in range(1, c["steps"] + 1):
    for n, p in zip(names, params):
        p.grad = io[f"grad{step}." + n].clone()
    norms.append(torch.nn.utils.clip_grad_norm_(params, c["grad_clip"]).item())
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.step()
worst = {}
scale = {}
def cmp(key, got, want):
    # Largest difference relative to the largest magnitude of that state (moments are tiny after clipping).
    worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item())
    scale[key] = max(scale.get(key, 0.0), want.abs().max().item())
for n, p in zip(names, params):
    cmp("params", io["final." + n], p.detach())
    st = opt.state[p]
    cmp("exp_avg", io["exp_avg." + n], st["exp_avg"])
    cmp("exp_avg_sq", io["exp_avg_sq." + n], st["exp_avg_sq"])
worst = {k: v / max(scale[k], 1e-30) for k, v in worst.items()}
moved = max((io["final." + n] - io["init." + n]).abs().max().item() for n in names)
print(json.dumps(dict(worst=worst, moved=moved, norms=norms)))
"#;

#[test]
fn sharded_then_resumed_adamw_matches_torch_adamw() {
    let cfg = model_cfg();
    let c = adamw();
    let init = Llama::new(&cfg, Device::Cpu, Kind::Float, 3).unwrap();
    let (n, layout) = (init.params.numel(), init.params.layout.clone());
    assert!(
        n > 2 * lexflow_gpu::NORM_BLOCK,
        "every rank must own a shard"
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("optimizer.safetensors");

    // Steps 1..=SAVE_AT: two ranks, optimizer sharded, state saved collectively.
    let handles: Vec<_> = InProcessCollective::group(WORLD)
        .into_iter()
        .map(|coll| {
            let (cfg, c, state, layout) = (cfg.clone(), c.clone(), state.clone(), layout.clone());
            std::thread::spawn(move || {
                let rank = coll.rank();
                let mut model = Llama::new(&cfg, Device::Cpu, Kind::Float, 3).unwrap();
                let mut opt = FlatAdamW::sharded(&model.params, c, rank, WORLD);
                assert!(opt.layout().is_sharded() && !opt.layout().is_empty());
                for step in 1..=SAVE_AT {
                    set_grads(&mut model, &grad(&layout, rank, step));
                    opt.reduce_grads(&model.params, &coll).unwrap();
                    let st = opt.step(&model.params.flat, &coll).unwrap();
                    assert!(st.clipped, "step {step}: the clipping branch must be taken");
                }
                let path = (rank == 0).then_some(state.as_path());
                opt.save_collective(path, &coll).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // Steps SAVE_AT+1..=STEPS: one replicated optimizer, another seed's weights replaced by the saved master.
    let mut model = Llama::new(&cfg, Device::Cpu, Kind::Float, 99).unwrap();
    let mut opt = FlatAdamW::new(&model.params, c.clone());
    opt.load(&state, &model.params.flat).unwrap();
    assert_eq!(opt.step, SAVE_AT);
    let mut io: Vec<(String, Tensor)> = Vec::new();
    for step in SAVE_AT + 1..=STEPS {
        let g0 = grad(&layout, 0, step);
        let g1 = grad(&layout, 1, step);
        // What the mean all-reduce of the two ranks gives (f64 sum, fp32 result, then the 1/world scale).
        let mean = (g0.to_kind(Kind::Double) + g1.to_kind(Kind::Double)).to_kind(Kind::Float) * 0.5;
        set_grads(&mut model, &mean);
        opt.gather_grads(&model.params);
        assert!(
            opt.step(&model.params.flat, &lexflow_gpu::SingleRank)
                .unwrap()
                .clipped
        );
    }

    // The reference's inputs: initial weights and every step's mean gradient, per HF parameter name.
    let names: Vec<String> = init.params.params.iter().map(|p| p.name.clone()).collect();
    let per_param = |prefix: &str, flat: &Tensor| -> Vec<(String, Tensor)> {
        init.params
            .params
            .iter()
            .map(|p| {
                (
                    format!("{prefix}.{}", p.name),
                    flat.narrow(0, p.offset, p.numel)
                        .view(p.shape.as_slice())
                        .copy(),
                )
            })
            .collect()
    };
    io.extend(per_param("init", &init.params.flat.detach()));
    for step in 1..=STEPS {
        let g0 = grad(&layout, 0, step).to_kind(Kind::Double);
        let g1 = grad(&layout, 1, step).to_kind(Kind::Double);
        let mean = (g0 + g1).to_kind(Kind::Float) * 0.5;
        io.extend(per_param(&format!("grad{step}"), &mean));
    }
    io.extend(per_param("final", &model.params.flat.detach()));
    io.extend(per_param("exp_avg", &opt.exp_avg));
    io.extend(per_param("exp_avg_sq", &opt.exp_avg_sq));
    let io_path = dir.path().join("io.safetensors");
    write_safetensors(&io_path, &io, None).unwrap();
    // The reloaded file holds the same state the reference has after SAVE_AT steps (checked through the run).
    assert_eq!(read_safetensors(&state).unwrap().0.len(), 3);

    let spec = serde_json::json!({
        "names": names, "steps": STEPS, "lr": c.lr, "min_lr": c.min_lr, "warmup_steps": c.warmup_steps,
        "total_steps": c.total_steps, "weight_decay": c.weight_decay, "beta1": c.beta1, "beta2": c.beta2,
        "eps": c.eps, "grad_clip": c.grad_clip,
    });
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(TORCH_REF)
        .arg(&io_path)
        .arg(spec.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run the venv python (source scripts/env.sh): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "torch reference failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("torch AdamW vs lexflow FlatAdamW: {r}");
    let worst = |k: &str| r["worst"][k].as_f64().unwrap();
    let moved = r["moved"].as_f64().unwrap();
    assert!(
        moved > 1e-2,
        "the weights barely moved ({moved}): a vacuous comparison"
    );
    for n in r["norms"].as_array().unwrap() {
        assert!(n.as_f64().unwrap() > c.grad_clip, "clipping must be active");
    }
    for k in ["params", "exp_avg", "exp_avg_sq"] {
        assert!(
            worst(k) < 1e-5,
            "{k} differ (relative to their largest magnitude): {r}"
        );
    }
}
