//! AdamW over flat buffers, the learning-rate schedule and global-norm gradient clipping.
//!
//! The whole model is one fp32 master buffer with two moment buffers of the same length. A step is libtorch's fused
//! AdamW kernel (`at::_fused_adamw_`, the one behind `torch.optim.AdamW(fused=True)`, called through the C++ shim in
//! [`crate::ops`]: tch binds neither it nor a foreach AdamW) over two contiguous slices (decayed weights, the rest),
//! with global-norm clipping folded into its `grad_scale`: a norm, a few scalar kernels, two update launches and
//! the bf16 refresh, whatever the number of parameters. [`FlatAdamW::set_fused`]`(false)` selects the same update
//! as ten whole-buffer tch kernels (the reference the fused path is tested against).
//! With fp32 parameters the master buffer *is* the parameter buffer; with bf16 parameters (CUDA) the master is a
//! separate fp32 copy and the parameters are refreshed from it after each step. Weight decay applies to the ≥2-D
//! weights only, which [`Params`] lays out as one contiguous prefix. The state (master, moments, step) is saved as
//! safetensors so a resumed run continues bit-exactly.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint::{read_safetensors, write_safetensors};
use crate::error::{GpuError, Result};
use crate::model::Params;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Length of the schedule: the cosine reaches `min_lr` here.
    pub total_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (≤ 0: no clipping).
    pub grad_clip: f64,
}

impl AdamWConfig {
    /// Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`; `step` counts
    /// from 1 (the step being taken).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step.saturating_sub(self.warmup_steps)) as f64 / span).clamp(0.0, 1.0);
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// L2 norm of a flat fp32 buffer as a 0-dim fp32 tensor on its device. On CUDA one kernel. libtorch's CPU norm
/// loses precision on very long fp32 vectors (2.5% low at 174 M elements, pytorch#169237), so on CPU: norms of
/// 64 Ki-element rows, then the norm of those (exact to ~1e-6 relative).
fn global_norm(g: &Tensor) -> Tensor {
    if g.device().is_cuda() {
        return g.norm();
    }
    const ROW: i64 = 1 << 16;
    let n = g.numel() as i64;
    let rows = n / ROW;
    let mut parts = Vec::with_capacity(2);
    if rows > 0 {
        parts.push(g.narrow(0, 0, rows * ROW).view([rows, ROW]).linalg_norm(
            2.0,
            [1i64].as_slice(),
            false,
            None::<Kind>,
        ));
    }
    if n > rows * ROW {
        parts.push(g.narrow(0, rows * ROW, n - rows * ROW).norm().view([1]));
    }
    if parts.is_empty() {
        return Tensor::zeros([], (Kind::Float, g.device()));
    }
    Tensor::cat(&parts, 0)
        .to_kind(Kind::Double)
        .norm()
        .to_kind(Kind::Float)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub step: u64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
}

pub struct FlatAdamW {
    pub cfg: AdamWConfig,
    /// Flat fp32 master weights (shares storage with the parameters when they are fp32).
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Flat fp32 gradient: filled by [`gather_grads`](Self::gather_grads), reduced across ranks, consumed by
    /// [`step`](Self::step).
    pub grad: Tensor,
    /// Steps taken.
    pub step: u64,
    decay_numel: i64,
    shares_params: bool,
    /// Reused fp32 work buffer of the unfused path (squared gradient, then the denominator).
    scratch: Option<Tensor>,
    /// libtorch's fused kernel (default) or the whole-buffer tch kernels.
    fused: bool,
    /// The fused kernel's step counter: an fp32 scalar on the device, filled before each step (no host sync).
    step_t: Option<Tensor>,
}

impl FlatAdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Self {
        let flat = &params.flat;
        let shares_params = flat.kind() == Kind::Float;
        let master = if shares_params {
            flat.shallow_clone()
        } else {
            flat.detach().to_kind(Kind::Float)
        };
        let zeros = || Tensor::zeros([params.numel()], (Kind::Float, flat.device()));
        FlatAdamW {
            cfg,
            master,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            grad: zeros(),
            step: 0,
            decay_numel: params.decay_numel,
            shares_params,
            scratch: None,
            fused: std::env::var("LEXFLOW_ADAMW").map_or(true, |v| v != "unfused"),
            step_t: None,
        }
    }

    /// Fused kernel (default; `LEXFLOW_ADAMW=unfused` in the environment turns it off) or whole-buffer kernels.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Copies every parameter's gradient into [`grad`](Self::grad) (fp32; missing gradients count as zero): one
    /// converting copy per parameter straight into the flat buffer, no bf16 concatenation in between.
    pub fn gather_grads(&mut self, params: &Params) -> &mut Tensor {
        let _ng = tch::no_grad_guard();
        for p in &params.params {
            let mut dst = self.grad.narrow(0, p.offset, p.numel);
            let g = p.tensor.grad();
            if g.defined() {
                dst.copy_(&g.reshape([-1]));
            } else {
                let _ = dst.zero_();
            }
        }
        &mut self.grad
    }

    /// One AdamW step from [`grad`](Self::grad) (already averaged across ranks): clip, update moments and master,
    /// refresh the parameters.
    ///
    /// The norm, the clipping scale (on the device: no host round trip before the update), the update (fused or
    /// whole-buffer, see [`set_fused`](Self::set_fused)), then the bf16 refresh; the gradient norm is read back
    /// once, after everything is enqueued. Errors only if libtorch rejects the fused kernel's launch.
    pub fn step(&mut self, params: &Params) -> Result<StepStats> {
        let _ng = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg.clone();
        let lr = c.lr_at(self.step);
        let norm = global_norm(&self.grad);
        if self.fused {
            self.fused_update(&norm, lr)?;
        } else {
            self.unfused_update(&norm, lr);
        }
        if !self.shares_params {
            params.flat.detach().copy_(&self.master);
        }
        let grad_norm = norm.double_value(&[]);
        Ok(StepStats {
            step: self.step,
            lr,
            grad_norm,
            clipped: c.grad_clip > 0.0 && c.grad_clip / (grad_norm + 1e-6) < 1.0,
        })
    }

    /// `at::_fused_adamw_` on the decayed prefix and on the rest; clipping as `grad_scale = max((‖g‖ + 1e-6) / clip,
    /// 1)`, i.e. `g · min(clip / (‖g‖ + 1e-6), 1)` as `torch.nn.utils.clip_grad_norm_`.
    fn fused_update(&mut self, norm: &Tensor, lr: f64) -> Result<()> {
        let c = &self.cfg;
        let step_t = self
            .step_t
            .get_or_insert_with(|| Tensor::zeros([], (Kind::Float, self.master.device())));
        let _ = step_t.fill_(self.step as f64);
        let scale =
            (c.grad_clip > 0.0).then(|| (norm + 1e-6).g_div_scalar(c.grad_clip).clamp_min(1.0));
        let total = self.master.numel() as i64;
        let args = crate::ops::AdamWArgs {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            weight_decay: c.weight_decay,
            eps: c.eps,
        };
        for (start, len, wd) in [
            (0, self.decay_numel, c.weight_decay),
            (self.decay_numel, total - self.decay_numel, 0.0),
        ] {
            if len == 0 {
                continue;
            }
            let (p, g, m, v) = (
                self.master.narrow(0, start, len),
                self.grad.narrow(0, start, len),
                self.exp_avg.narrow(0, start, len),
                self.exp_avg_sq.narrow(0, start, len),
            );
            let group = crate::ops::AdamWGroup {
                params: &p,
                grads: &g,
                exp_avg: &m,
                exp_avg_sq: &v,
                step: step_t,
            };
            crate::ops::fused_adamw(
                &[group],
                crate::ops::AdamWArgs {
                    weight_decay: wd,
                    ..args
                },
                scale.as_ref(),
            )?;
        }
        Ok(())
    }

    /// The same update in ten whole-buffer tch kernels: clip (coefficient on the device), decay, `lerp_` (first
    /// moment), `square`+`lerp_` (second moment), `sqrt`+`mul_`+`add_` into a reused scratch buffer and one
    /// `addcdiv_` (bias corrections folded into the denominator, as PyTorch's foreach AdamW does).
    fn unfused_update(&mut self, norm: &Tensor, lr: f64) {
        let c = self.cfg.clone();
        if c.grad_clip > 0.0 {
            // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1.
            let coef = (norm + 1e-6)
                .reciprocal()
                .g_mul_scalar(c.grad_clip)
                .clamp_max(1.0);
            let _ = self.grad.g_mul_(&coef);
        }
        if c.weight_decay != 0.0 && self.decay_numel > 0 {
            let _ = self
                .master
                .narrow(0, 0, self.decay_numel)
                .g_mul_scalar_(1.0 - lr * c.weight_decay);
        }
        let _ = self.exp_avg.lerp_(&self.grad, 1.0 - c.beta1);
        let scratch = self
            .scratch
            .get_or_insert_with(|| self.exp_avg_sq.empty_like());
        let _ = self.grad.square_out(scratch);
        let _ = self.exp_avg_sq.lerp_(scratch, 1.0 - c.beta2);
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        if lr > 0.0 {
            // master −= lr/bc1 · m / (√(v/bc2) + eps)  ==  master += m / ((√v + eps·√bc2) · k),
            // k = −bc1 / (lr·√bc2): libtorch's addcdiv_ has no scale argument in tch, so the scale goes into the
            // denominator (PyTorch's foreach AdamW folds the bias corrections the same way).
            let k = -bc1 / (lr * bc2.sqrt());
            let _ = self.exp_avg_sq.sqrt_out(scratch);
            let _ = scratch.g_mul_scalar_(k);
            let _ = scratch.g_add_scalar_(c.eps * bc2.sqrt() * k);
            let _ = self.master.addcdiv_(&self.exp_avg, scratch);
        }
    }

    /// Saves master weights, moments and the step counter.
    pub fn save(&self, path: &Path) -> Result<u64> {
        let tensors = vec![
            ("master".to_string(), self.master.shallow_clone()),
            ("exp_avg".to_string(), self.exp_avg.shallow_clone()),
            ("exp_avg_sq".to_string(), self.exp_avg_sq.shallow_clone()),
        ];
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("decay_numel".to_string(), self.decay_numel.to_string());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&self.cfg).expect("config is JSON"),
        );
        write_safetensors(path, &tensors, Some(meta))
    }

    /// Restores state saved by [`save`](Self::save) into a model of the same shape, parameters included.
    pub fn load(&mut self, path: &Path, params: &Params) -> Result<()> {
        let _ng = tch::no_grad_guard();
        let (tensors, meta) = read_safetensors(path)?;
        let bad = |m: String| GpuError::checkpoint(path, m);
        let step: u64 = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no step in metadata".into()))?;
        let decay: i64 = meta
            .get("decay_numel")
            .and_then(|s| s.parse().ok())
            .unwrap_or(self.decay_numel);
        if decay != self.decay_numel {
            return Err(bad(format!(
                "decay group of {decay} elements, model has {}",
                self.decay_numel
            )));
        }
        let mut found = 0;
        for (name, t) in tensors {
            let dst = match name.as_str() {
                "master" => &mut self.master,
                "exp_avg" => &mut self.exp_avg,
                "exp_avg_sq" => &mut self.exp_avg_sq,
                _ => continue,
            };
            if t.size() != dst.size() || t.kind() != Kind::Float {
                return Err(bad(format!(
                    "{name}: {:?} {:?}, expected {:?} Float",
                    t.size(),
                    t.kind(),
                    dst.size()
                )));
            }
            dst.copy_(&t);
            found += 1;
        }
        if found != 3 {
            return Err(bad("needs master, exp_avg and exp_avg_sq".into()));
        }
        if !self.shares_params {
            params.flat.detach().copy_(&self.master);
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Llama, LlamaConfig};
    use tch::{nn, nn::OptimizerConfig, Device};

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 0.0,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = cfg();
        assert!((c.lr_at(1) - 5e-3).abs() < 1e-12);
        assert!((c.lr_at(2) - 1e-2).abs() < 1e-12);
        assert!((c.lr_at(6) - (1e-3 + 0.5 * 9e-3)).abs() < 1e-12);
        assert!((c.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(50) - 1e-3).abs() < 1e-12);
    }

    /// Same updates as libtorch's AdamW (constant lr, all parameters decayed, no clipping).
    #[test]
    fn matches_libtorch_adamw() {
        let vs = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(0);
        let w = vs.root().randn("w", &[3, 4], 0.0, 1.0);
        let mut opt = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs, 1e-2)
        .unwrap();

        let mcfg = LlamaConfig {
            num_hidden_layers: 1,
            ..LlamaConfig::tiny(3)
        };
        let mut model = Llama::new(
            &LlamaConfig {
                hidden_size: 4,
                head_dim: 2,
                ..mcfg
            },
            Device::Cpu,
            Kind::Float,
            0,
        )
        .unwrap();
        // Only the embedding (3×4) is used; the other parameters get no gradient.
        tch::no_grad(|| {
            model
                .params
                .get("model.embed_tokens.weight")
                .unwrap()
                .detach()
                .copy_(&w)
        });
        let mut flat = FlatAdamW::new(
            &model.params,
            AdamWConfig {
                warmup_steps: 0,
                min_lr: 1e-2,
                ..cfg()
            },
        );
        let x = Tensor::randn([4, 2], (Kind::Float, Device::Cpu));
        for _ in 0..5 {
            let loss = w.matmul(&x).square().sum(Kind::Float);
            opt.zero_grad();
            loss.backward();
            opt.step();

            let e = model.params.get("model.embed_tokens.weight").unwrap();
            let loss = e.matmul(&x).square().sum(Kind::Float);
            model.params.zero_grad();
            loss.backward();
            flat.gather_grads(&model.params);
            flat.step(&model.params).unwrap();
        }
        let e = model.params.get("model.embed_tokens.weight").unwrap();
        let d = (e - &w).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn clipping_scales_to_max_norm_and_norms_are_not_decayed() {
        let model = Llama::new(&LlamaConfig::tiny(8), Device::Cpu, Kind::Float, 0).unwrap();
        let mut opt = FlatAdamW::new(
            &model.params,
            AdamWConfig {
                grad_clip: 1.0,
                weight_decay: 0.5,
                ..cfg()
            },
        );
        let _ = opt.grad.fill_(0.0);
        let n = model.params.numel() - model.params.decay_numel;
        let _ = opt.grad.narrow(0, 0, 4).fill_(10.0);
        let before = model
            .params
            .flat
            .narrow(0, model.params.decay_numel, n)
            .copy();
        let s = opt.step(&model.params).unwrap();
        assert!(s.clipped && (s.grad_norm - 20.0).abs() < 1e-4);
        assert!((opt.grad.norm().double_value(&[]) - 1.0).abs() < 1e-5);
        // Norm weights had zero gradient and no decay: unchanged.
        assert!(model
            .params
            .flat
            .narrow(0, model.params.decay_numel, n)
            .equal(&before));
    }

    /// libtorch's fused kernel and the whole-buffer path take the same steps (clipping active, decay on the weights
    /// only, warmup then cosine), to fp32 rounding.
    #[test]
    fn fused_equals_unfused() {
        let c = AdamWConfig {
            grad_clip: 0.5,
            ..cfg()
        };
        let models: Vec<Llama> = (0..2)
            .map(|_| Llama::new(&LlamaConfig::tiny(16), Device::Cpu, Kind::Float, 3).unwrap())
            .collect();
        let mut opts: Vec<FlatAdamW> = models
            .iter()
            .map(|m| FlatAdamW::new(&m.params, c.clone()))
            .collect();
        opts[0].set_fused(true);
        opts[1].set_fused(false);
        let mut clipped = 0;
        for step in 0..6 {
            tch::manual_seed(100 + step);
            let g = Tensor::randn([models[0].params.numel()], (Kind::Float, Device::Cpu));
            for (m, o) in models.iter().zip(opts.iter_mut()) {
                o.grad.copy_(&g);
                let st = o.step(&m.params).unwrap();
                clipped += st.clipped as usize;
            }
        }
        assert_eq!(
            clipped, 12,
            "every step should clip (norm of N(0,1)^n ≫ 0.5)"
        );
        let d = (&models[0].params.flat - &models[1].params.flat)
            .abs()
            .max()
            .double_value(&[]);
        let moved = (&models[0].params.flat
            - Llama::new(&LlamaConfig::tiny(16), Device::Cpu, Kind::Float, 3)
                .unwrap()
                .params
                .flat)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            d < 1e-6 && moved > 1e-3,
            "fused vs unfused {d}, moved {moved}"
        );
        let dm = (&opts[0].exp_avg_sq - &opts[1].exp_avg_sq)
            .abs()
            .max()
            .double_value(&[]);
        assert!(dm < 1e-7, "second moments differ by {dm}");
    }

    /// The CPU norm of a long vector stays exact (libtorch's single-pass fp32 norm does not).
    #[test]
    fn global_norm_is_exact_on_long_vectors() {
        tch::manual_seed(0);
        let g = Tensor::randn([20_000_037], (Kind::Float, Device::Cpu)) * 1e-3;
        let exact = g
            .to_kind(Kind::Double)
            .square()
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[]);
        let got = global_norm(&g).double_value(&[]);
        assert!((got / exact - 1.0).abs() < 1e-6, "{got} vs {exact}");
        let short = Tensor::from_slice(&[3.0f32, 4.0]);
        assert!((global_norm(&short).double_value(&[]) - 5.0).abs() < 1e-6);
    }

    #[test]
    fn state_roundtrip() {
        let model = Llama::new(&LlamaConfig::tiny(8), Device::Cpu, Kind::Float, 0).unwrap();
        let mut opt = FlatAdamW::new(&model.params, cfg());
        let _ = opt.grad.normal_(0.0, 1.0);
        opt.step(&model.params).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("opt.safetensors");
        opt.save(&p).unwrap();
        let model2 = Llama::new(&LlamaConfig::tiny(8), Device::Cpu, Kind::Float, 1).unwrap();
        let mut opt2 = FlatAdamW::new(&model2.params, cfg());
        opt2.load(&p, &model2.params).unwrap();
        assert_eq!(opt2.step, 1);
        assert!(
            opt2.exp_avg_sq.equal(&opt.exp_avg_sq) && model2.params.flat.equal(&model.params.flat)
        );
    }
}
