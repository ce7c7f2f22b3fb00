//! The memory planner: the bytes one trainer rank holds on its device and in host memory for a model, a world size,
//! a sharding mode and a batch — one model of memory for `lexflow plan` (before renting GPUs) and for the trainer's
//! up-front fit check and `train.recompute = "auto"`.
//!
//! The state figures follow what lexflow allocates, tensor by tensor (`tests/memory_plan.rs` checks them against the
//! storage bytes libtorch holds in CPU runs, within 5%):
//! - **weights** `N · p` (p = 2 bytes in bf16, 4 in fp32) and their **gradients** (`.grad`, the same dtype) — whole on
//!   every rank unless the parameters are fully sharded (`ShardMode::Full`: the rank's `⌈N/world⌉` slice, plus the
//!   gathered units, see below);
//! - the **fp32 gradient** the optimizer reduces into (`FlatAdamW::grad`): `N` elements replicated, the rank's slice
//!   `⌈N/world⌉` when sharded;
//! - the **fp32 master** (none when the parameters are fp32: it shares their storage) and the two **AdamW moments**,
//!   over the rank's slice — on the host instead of the device with `offload`;
//! - **communication buffers** of the sharded modes: the reduce-scatter input (`(world + 1) · c` fp32 elements) and
//!   the all-gather buffers (`(world + 1) · c` in the parameter dtype), `c = min(16 Mi / world, slice)`.
//!
//! Fully sharded parameters (ZeRO-3 / FSDP) are planned with one sharding unit per transformer block and one for the
//! embeddings, final norm and head: a rank holds the largest unit gathered twice (the one computing and the next one
//! prefetched) and that unit's gradient before its reduce-scatter. Activations: per layer and token the tensors
//! autograd keeps (norm inputs and outputs, q/k/v before and after RoPE, attention output, the MLP's gate, up, SiLU and
//! product: ≈ 10·D + 4·D_kv + 4·F elements); with recomputation only each layer's input plus one layer's full set.
//! Logits and their gradient (2 · tokens · V elements) and 1 GiB of workspace (loss chunks in fp32, CUDA context,
//! allocator slack) on top.

use crate::LlamaConfig;

/// How the training state is split over the data-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardMode {
    /// Every rank holds everything.
    None,
    /// ZeRO-2: each rank holds `1/world` of the fp32 master, moments and reduced gradient.
    Optimizer,
    /// ZeRO-3 / FSDP: also the parameters and their gradients, gathered one unit at a time.
    Full,
}

impl ShardMode {
    pub fn name(self) -> &'static str {
        match self {
            ShardMode::None => "none",
            ShardMode::Optimizer => "optimizer",
            ShardMode::Full => "full",
        }
    }
}

/// What the plan is for.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub model: LlamaConfig,
    /// Data-parallel ranks.
    pub world: usize,
    /// Bytes per parameter element in the compute dtype (2: bf16, 4: fp32).
    pub param_bytes: u64,
    pub shard: ShardMode,
    /// fp32 master, moments and reduced gradient in host memory.
    pub offload: bool,
    /// Tokens of one micro-batch (micro_batch × seq_len).
    pub tokens: u64,
    pub recompute: bool,
}

/// Bytes of one rank, by what holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RankMemory {
    /// Parameters in the compute dtype (the rank's slice with full sharding).
    pub weights: u64,
    /// Gathered units (full sharding: the computing one and the prefetched next one).
    pub gathered: u64,
    /// Parameter gradients in the compute dtype (full sharding: one gathered unit's).
    pub gradients: u64,
    /// The fp32 gradient the optimizer reduces into (replicated: every element; sharded: the rank's slice).
    pub grad_fp32: u64,
    /// fp32 master weights of the rank's slice (0 when the parameters are fp32: shared storage).
    pub master: u64,
    /// The two AdamW moments of the rank's slice.
    pub moments: u64,
    /// Reduce-scatter and all-gather buffers.
    pub comm: u64,
    /// Activations kept for the backward pass of one micro-batch.
    pub activations: u64,
    /// Logits and their gradient.
    pub logits: u64,
    /// Loss chunks, CUDA context, allocator slack.
    pub workspace: u64,
}

impl RankMemory {
    /// What does not depend on the batch: parameters, gradients, optimizer state, communication buffers.
    pub fn state(&self) -> u64 {
        self.weights
            + self.gathered
            + self.gradients
            + self.grad_fp32
            + self.master
            + self.moments
            + self.comm
    }

    /// What one micro-batch adds.
    pub fn batch(&self) -> u64 {
        self.activations + self.logits + self.workspace
    }

    pub fn total(&self) -> u64 {
        self.state() + self.batch()
    }
}

/// One rank's plan: device bytes and, with offload, host bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub device: RankMemory,
    /// Host memory of the rank's offloaded optimizer state (fp32 master, moments, gradient slice; 0 without offload).
    pub host: u64,
    /// Parameters of the model.
    pub params: u64,
    /// Elements of the rank's slice (`⌈N/world⌉`, N without sharding).
    pub slice: u64,
}

/// Elements per reduce-scatter / all-gather bucket over all ranks (`gpu/src/optim.rs`).
pub const BUCKET_ELEMS: u64 = 16 << 20;

/// Parameters of each sharding unit: one per transformer block, one for everything else (embeddings, final norm,
/// head), largest first.
pub fn unit_sizes(c: &LlamaConfig) -> Vec<u64> {
    let layers = c.num_hidden_layers;
    let mut units = vec![0u64; layers + 1];
    for (name, shape) in c.param_specs() {
        let n = shape.iter().product::<i64>() as u64;
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        units[layer.unwrap_or(layers)] += n;
    }
    units.sort_unstable_by(|a, b| b.cmp(a));
    units
}

/// Activation bytes of one micro-batch of `tokens` tokens (without the logits), elements of `elt` bytes.
pub fn activation_bytes(c: &LlamaConfig, tokens: u64, elt: u64, recompute: bool) -> u64 {
    let d = c.hidden_size as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let f = c.intermediate_size as u64;
    let layers = c.num_hidden_layers as u64;
    let per_layer = (10 * d + 4 * kv + 4 * f) * elt;
    if recompute {
        // Each layer's input is kept; one layer's activations exist at a time while it is recomputed.
        tokens * (layers * d * elt + per_layer)
    } else {
        tokens * layers * per_layer
    }
}

/// The plan of one rank.
pub fn plan(s: &PlanSpec) -> Plan {
    let n = s.model.num_params() as u64;
    let w = s.world.max(1) as u64;
    let p = s.param_bytes;
    let sharded = s.shard != ShardMode::None;
    let slice = if sharded { n.div_ceil(w) } else { n };
    let mut m = RankMemory::default();
    match s.shard {
        ShardMode::None | ShardMode::Optimizer => {
            m.weights = n * p;
            m.gradients = n * p;
        }
        ShardMode::Full => {
            let units = unit_sizes(&s.model);
            let largest = units.first().copied().unwrap_or(0);
            let second = units.get(1).copied().unwrap_or(0);
            m.weights = slice * p;
            m.gathered = (largest + second) * p;
            m.gradients = largest * p;
        }
    }
    let master = if p == 4 { 0 } else { slice * 4 };
    let moments = 2 * slice * 4;
    let grad_fp32 = slice * 4;
    let host = if s.offload {
        master + moments + grad_fp32
    } else {
        m.master = master;
        m.moments = moments;
        m.grad_fp32 = grad_fp32;
        0
    };
    if sharded {
        let c = (BUCKET_ELEMS / w).clamp(1, slice.max(1));
        m.comm = (w + 1) * c * 4 + (w + 1) * c * p;
    }
    m.activations = activation_bytes(&s.model, s.tokens, p, s.recompute);
    m.logits = 2 * s.tokens * s.model.vocab_size as u64 * p;
    m.workspace = 1 << 30;
    Plan {
        device: m,
        host,
        params: n,
        slice,
    }
}

/// Gibibytes, for messages.
pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: LlamaConfig, world: usize, shard: ShardMode, offload: bool) -> PlanSpec {
        PlanSpec {
            model,
            world,
            param_bytes: 2,
            shard,
            offload,
            tokens: 4096,
            recompute: true,
        }
    }

    #[test]
    fn llama3_70b_on_four_gpus_matches_the_arithmetic() {
        // 70.55 B parameters; bf16 weights + grads 2 + 2 bytes, fp32 master + moments + gradient 16 bytes each.
        let m = LlamaConfig::llama3_1_70b();
        let n = m.num_params() as u64;
        let none = plan(&spec(m.clone(), 4, ShardMode::None, false));
        assert_eq!(none.device.state(), n * (2 + 2 + 4 + 8 + 4));
        let zero2 = plan(&spec(m.clone(), 4, ShardMode::Optimizer, false));
        let slice = n.div_ceil(4);
        assert_eq!(zero2.device.weights + zero2.device.gradients, 4 * n);
        assert_eq!(
            zero2.device.master + zero2.device.moments + zero2.device.grad_fp32,
            16 * slice
        );
        let full = plan(&spec(m.clone(), 4, ShardMode::Full, true));
        // ≈35 GB of bf16 weights per GPU, the fp32 state (≈282 GB per rank) on the host.
        assert!(
            (full.device.weights as f64 / 1e9 - 35.3).abs() < 0.2,
            "{full:?}"
        );
        assert_eq!(full.host, 16 * slice);
        assert_eq!(
            full.device.master + full.device.moments + full.device.grad_fp32,
            0
        );
        assert!(
            full.device.state() < 60 << 30,
            "{}",
            gib(full.device.state())
        );
        // The largest unit is the embeddings + head (2 × 128256 × 8192), gathered twice with the prefetch.
        let units = unit_sizes(&m);
        assert_eq!(units.len(), 81);
        assert_eq!(units[0], 2 * 128_256 * 8192 + 8192);
        assert_eq!(units.iter().sum::<u64>(), n);
    }

    #[test]
    fn recomputation_keeps_one_input_per_layer() {
        let m = LlamaConfig::llama3_1_8b();
        let with = activation_bytes(&m, 8192, 2, true);
        let without = activation_bytes(&m, 8192, 2, false);
        assert!(with * 10 < without, "{with} vs {without}");
    }
}
