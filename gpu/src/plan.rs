//! The memory planner: the bytes one trainer rank holds on its device and in host memory for a model, a world size,
//! a sharding mode and a batch — one model of memory for `lexflow plan` (before renting GPUs) and for the trainer's
//! up-front fit check and `train.recompute = "auto"`.
//!
//! The state figures follow what lexflow allocates, tensor by tensor (`tests/memory_plan.rs` checks them against the
//! storage bytes libtorch holds in CPU runs, within 5%). `N` is the parameter count, `T` the flat buffer's length
//! (`N` plus the padding that starts every sharding unit on a 64 Ki-element block: < 0.1% for 8B and 70B):
//! - **weights** `T · p` (p = 2 bytes in bf16, 4 in fp32) and their **gradients** (`.grad`, `N · p`) — whole on every
//!   rank unless the parameters are fully sharded (`ShardMode::Full`: the rank's slice of every unit, ≈`T/world`,
//!   plus the gathered units and their gradients, see below);
//! - the **fp32 gradient** the optimizer reduces into (`FlatAdamW::grad`): `T` elements replicated, the rank's slice
//!   when sharded;
//! - the **fp32 master** (none when the parameters are fp32 and not offloaded: it shares their storage) and the two
//!   **AdamW moments**, over the rank's slice — in host memory instead of the device with `offload`;
//! - **communication buffers**: ZeRO-2's reduce-scatter input (`(world + 1) · c` fp32 elements) and all-gather
//!   buffers (`(world + 1) · c` in the parameter dtype), `c = min(16 Mi / world, slice)`; fully sharded, one unit's
//!   fp32 gradient (`world` slices) and the reduced slice.
//!
//! Fully sharded parameters (ZeRO-3 / FSDP) have one sharding unit per transformer block and one (unit 0) for the
//! embeddings, final norm and head. Unit 0 stays gathered for a micro-batch; with recomputation one block computes
//! while the next is gathered (2 blocks), without it every block's graph holds its gathered weights until its
//! backward (all `N`). Gradients in the compute dtype exist for unit 0 and one block at a time. Activations: per
//! layer and token the tensors autograd keeps (norm inputs and outputs, q/k/v before and after RoPE, attention
//! output, the MLP's gate, up, SiLU and product: ≈ 10·D + 4·D_kv + 4·F elements); with recomputation only each
//! layer's input plus one layer's full set. Logits and their gradient (2 · tokens · V elements) and 1 GiB of
//! workspace (loss chunks in fp32, CUDA context, allocator slack) on top.

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
    /// Gathered units (full sharding: unit 0, the computing block and the next one; every block without
    /// recomputation).
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
    /// Elements of the rank's slice of the flat parameter buffer (all of it without sharding; ≈`N/world`, rounded
    /// up to 64 Ki-element blocks, per unit when fully sharded).
    pub slice: u64,
}

/// Elements per reduce-scatter / all-gather bucket over all ranks (`gpu/src/optim.rs`).
pub const BUCKET_ELEMS: u64 = 16 << 20;

/// Parameters of each sharding unit: one per transformer block, one for everything else (embeddings, final norm,
/// head), largest first.
pub fn unit_sizes(c: &LlamaConfig) -> Vec<u64> {
    let mut units: Vec<u64> = c
        .param_layout()
        .units
        .iter()
        .map(|u| u.numel as u64)
        .collect();
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
    let layout = s.model.param_layout();
    let n = s.model.num_params() as u64;
    // The flat buffer: the parameters and the padding that aligns each unit to a norm block.
    let total = layout.total as u64;
    let w = s.world.max(1);
    let p = s.param_bytes;
    let mut m = RankMemory::default();
    let slice = match s.shard {
        ShardMode::None => total,
        ShardMode::Optimizer => {
            let per = (crate::NORM_BLOCK as u64) * w as u64;
            total.div_ceil(per) * crate::NORM_BLOCK as u64
        }
        ShardMode::Full => layout.full_shard_numel(w) as u64,
    };
    match s.shard {
        ShardMode::None | ShardMode::Optimizer => {
            m.weights = total * p;
            m.gradients = n * p;
            if s.shard == ShardMode::Optimizer && w > 1 {
                let c = (BUCKET_ELEMS / w as u64).clamp(1, slice.max(1));
                m.comm = (w as u64 + 1) * c * 4 + (w as u64 + 1) * c * p;
            }
        }
        ShardMode::Full => {
            let head = layout.units[0].numel as u64;
            let block = layout.units[1..]
                .iter()
                .map(|u| u.numel as u64)
                .max()
                .unwrap_or(0);
            let block_shard = layout.units[1..]
                .iter()
                .map(|u| u.shard(w) as u64)
                .max()
                .unwrap_or(0)
                .max(layout.units[0].shard(w) as u64);
            m.weights = slice * p;
            // Unit 0 stays gathered for the micro-batch; with recomputation one block computes while the next is
            // gathered; without, every block's graph keeps its gathered weights until its backward.
            m.gathered = if s.recompute {
                (head + 2 * block) * p
            } else {
                n * p
            };
            // The gathered leaves' gradients: unit 0's (until the end of the backward) and one block's.
            m.gradients = (head + block) * p;
            // A unit's gradient in fp32 (the reduce-scatter's input) and the reduced slice before it is added.
            m.comm = (w as u64 + 1) * block_shard * 4;
        }
    }
    // fp32 weights share the master's storage, unless the master is offloaded.
    let master = if p == 4 && !s.offload { 0 } else { slice * 4 };
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
        let t = m.param_layout().total as u64;
        // The padding that aligns the 81 units on 64 Ki-element blocks is under 0.01%.
        assert!(t >= n && ((t - n) as f64) < 1e-4 * n as f64, "{t} vs {n}");
        let none = plan(&spec(m.clone(), 4, ShardMode::None, false));
        assert_eq!(none.device.state(), t * (2 + 4 + 8 + 4) + n * 2);
        let zero2 = plan(&spec(m.clone(), 4, ShardMode::Optimizer, false));
        let slice = zero2.slice;
        assert!(slice >= t.div_ceil(4) && slice - t.div_ceil(4) < 1 << 16);
        assert_eq!(zero2.device.weights + zero2.device.gradients, 2 * (t + n));
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
        assert_eq!(full.host, 16 * full.slice);
        assert!(full.slice >= t.div_ceil(4) && full.slice - t.div_ceil(4) < 81 << 16);
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
