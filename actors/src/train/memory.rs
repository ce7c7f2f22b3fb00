//! Memory and speed planning of a rank: whether the model's training state fits the device (refused before anything
//! is allocated, naming what would fit), whether to recompute activations (`train.recompute = "auto"`), and the
//! peak FLOP/s and resident memory that the MFU and memory metrics are measured against.

use std::time::Instant;

use lexflow_gpu::LlamaConfig;
use tch::{Device, Kind};

use super::setup::TrainerError;

/// Estimated activation memory of one micro-batch of `tokens` tokens without recomputation: per layer and token the
/// tensors autograd keeps (norm inputs and outputs, q/k/v before and after RoPE, attention output, the MLP's gate,
/// up, SiLU and product: ≈ 10·D + 4·D_kv + 4·F elements), plus the logits and their gradient and one fp32 loss chunk.
pub(super) fn activation_bytes(c: &LlamaConfig, tokens: u64, elt: u64) -> u64 {
    let d = c.hidden_size as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let f = c.intermediate_size as u64;
    let per_layer = (10 * d + 4 * kv + 4 * f) * elt;
    let logits = tokens * c.vocab_size as u64 * 2 * elt + (1u64 << 30);
    tokens * c.num_hidden_layers as u64 * per_layer + logits
}

/// `train.recompute = "auto"`: recompute when state + activations would take more than 85% of the device.
pub(super) fn needs_recompute(state: u64, activations: u64, total: u64) -> bool {
    (state + activations) as f64 > 0.85 * total as f64
}

/// Parameters, gradients and (replicated or sharded) optimizer state must leave room for activations on the device.
/// Refuses a model whose training state cannot fit on the device; returns the state's bytes per rank (weights,
/// gradients, fp32 master + moments, `param_bytes` per weight, AdamW state split `shards` ways).
pub(super) fn check_fits(
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

/// Peak dense FLOP/s for MFU: `LEXFLOW_PEAK_FLOPS`, else H100 bf16 (989 TFLOP/s, the datasheet) on CUDA; on CPU the
/// matmul peak measured here at start (so MFU says how well the model uses what this machine's BLAS can do).
pub(super) fn peak_flops(device: Device, kind: Kind) -> Option<f64> {
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
pub(super) fn measured_matmul_flops(device: Device, kind: Kind) -> f64 {
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
pub(super) fn process_rss_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as i64)
}
