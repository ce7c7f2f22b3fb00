//! The optimizer's schedule and hyper-parameters from `[train]` (warmup, cosine / WSD / constant, AdamW).

use lexflow_gpu::AdamWConfig;

use crate::config::TrainConfig;

pub(super) fn schedule(cfg: &TrainConfig) -> AdamWConfig {
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
