//! AdamW over flat buffers, the learning-rate schedule and global-norm gradient clipping, replicated on every rank
//! or sharded across ranks (ZeRO stage 2: optimizer state and reduced gradients).
//!
//! The whole model is one flat parameter buffer; the optimizer owns a contiguous slice of it — all of it when
//! replicated, `1/world` of it when sharded ([`ShardLayout`]) — with an fp32 master copy, two moments and an fp32
//! gradient of that slice. A step is libtorch's fused AdamW kernel (`at::_fused_adamw_`, the one behind
//! `torch.optim.AdamW(fused=True)`, called through the C++ shim in [`crate::ops`]: tch binds neither it nor a foreach
//! AdamW) over at most two contiguous ranges (decayed weights, the rest), with global-norm clipping folded into its
//! `grad_scale`. [`FlatAdamW::set_fused`]`(false)` selects the same update as ten whole-buffer tch kernels (the
//! reference the fused path is tested against).
//!
//! With fp32 parameters the master *is* the parameter slice; with bf16 parameters (CUDA) the master is a separate
//! fp32 copy and the parameters are refreshed from it after each step. Weight decay applies to the ≥2-D weights only,
//! which [`Params`] lays out as one contiguous prefix.
//!
//! Sharded, a step is: reduce-scatter the gradients (bucketed; each rank keeps the mean of its slice), the global
//! norm from per-block partial norms, AdamW on the slice, all-gather the parameters. The gradient norm is computed
//! the same way in both modes (squared norms of 64 Ki-element blocks aligned to the flat index, summed in f64 in block
//! order) and the reduce-scatter does the all-reduce's arithmetic, so on the CPU collectives a sharded run takes
//! bit-identical steps to a replicated one. The state (master, moments, step) is saved as one safetensors file in the
//! same layout either way — rank 0 streams the other ranks' slices into it — and loaded by byte ranges, so a
//! checkpoint resumes at any world size, sharded or not, bit-exactly.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{write_safetensors, SafetensorsRanges, StreamingSafetensors};
use crate::collective::Collective;
use crate::error::{GpuError, Result};
use crate::model::{ParamLayout, Params};

/// The shape of the learning rate after the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Cosine decay from `lr` to `min_lr` at `total_steps`.
    #[default]
    Cosine,
    /// Warmup-stable-decay: `lr` until the last `decay_steps` steps, then linear decay to `min_lr` at
    /// `total_steps`. The stable phase does not depend on the run's length, so a run can be extended (and decayed
    /// later) without changing the steps already taken.
    Wsd,
    /// `lr` after the warmup, for good.
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Length of the schedule: the cosine (and the WSD decay) reaches `min_lr` here.
    pub total_steps: u64,
    #[serde(default)]
    pub schedule: LrSchedule,
    /// WSD: steps of the final decay.
    #[serde(default)]
    pub decay_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (≤ 0: no clipping).
    pub grad_clip: f64,
}

/// The usual LLaMA pre-training settings (β = 0.9 / 0.95, weight decay 0.1, clipping at 1, cosine to a tenth),
/// for code that sets only some fields.
impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 0,
            total_steps: 1,
            schedule: LrSchedule::Cosine,
            decay_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

impl AdamWConfig {
    /// Linear warmup from 0 to `lr` over `warmup_steps`, then the [`LrSchedule`]; `step` counts from 1 (the step being
    /// taken).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            LrSchedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress =
                    ((step.saturating_sub(self.warmup_steps)) as f64 / span).clamp(0.0, 1.0);
                self.min_lr
                    + 0.5
                        * (self.lr - self.min_lr)
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            LrSchedule::Constant => self.lr,
            LrSchedule::Wsd => {
                let decay = self
                    .decay_steps
                    .min(self.total_steps.saturating_sub(self.warmup_steps));
                let start = self.total_steps.saturating_sub(decay);
                if decay == 0 || step <= start {
                    return self.lr;
                }
                let progress = ((step - start) as f64 / decay as f64).clamp(0.0, 1.0);
                self.lr + (self.min_lr - self.lr) * progress
            }
        }
    }
}

pub use crate::model::NORM_BLOCK;

/// Elements per reduce-scatter / all-gather call of a sharded step (all ranks' chunks together: 64 MB of fp32).
const BUCKET_ELEMS: i64 = 16 << 20;

/// Elements per broadcast while rank 0 streams a sharded state into the checkpoint file (64 MB of fp32).
const SAVE_CHUNK_ELEMS: i64 = 16 << 20;

/// A run of one unit's parameter elements that a rank's optimizer owns: `len` elements at `global` in the flat
/// parameter layout, at `local` in the optimizer's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub local: i64,
    pub global: i64,
    pub len: i64,
}

/// Which parts of the flat parameter buffer ([`ParamLayout`]) a rank's optimizer owns.
///
/// - replicated: all of it (`world` 1);
/// - ZeRO-2 ([`sharded`](Self::sharded)): one contiguous slice of the flat buffer, `shard` elements (a multiple of
///   [`NORM_BLOCK`]) per rank;
/// - fully sharded ([`full`](Self::full)): a slice of every unit, `Unit::shard(world)` elements each, kept unit after
///   unit in the rank's own buffer (the model holds the same slices: [`crate::ShardedLlama`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub rank: usize,
    pub world: usize,
    /// Elements of the flat buffer.
    pub total: i64,
    /// Elements of the rank's buffers: the whole model when replicated, a ZeRO-2 shard, or the rank's slices of
    /// every unit (padding included).
    pub shard: i64,
    /// Fully sharded (per unit) rather than one contiguous slice.
    pub full: bool,
    /// The parameter elements this rank owns, in global order.
    pub pieces: Vec<Piece>,
    layout: ParamLayout,
}

impl ShardLayout {
    /// Every rank holds the whole state.
    pub fn replicated(layout: &ParamLayout) -> Self {
        let pieces = layout
            .units
            .iter()
            .map(|u| Piece {
                local: u.start,
                global: u.start,
                len: u.numel,
            })
            .collect();
        ShardLayout {
            rank: 0,
            world: 1,
            total: layout.total,
            shard: layout.total,
            full: false,
            pieces,
            layout: layout.clone(),
        }
    }

    /// ZeRO-2: `rank` of `world` holds `[rank · shard, (rank + 1) · shard) ∩ [0, total)`.
    pub fn sharded(layout: &ParamLayout, rank: usize, world: usize) -> Self {
        if world <= 1 {
            return Self::replicated(layout);
        }
        let per = NORM_BLOCK * world as i64;
        let total = layout.total;
        let shard = (total + per - 1) / per * NORM_BLOCK;
        let start = (rank as i64 * shard).min(total);
        let end = (start + shard).min(total);
        let pieces = layout
            .units
            .iter()
            .filter_map(|u| {
                let (a, b) = (u.start.max(start), (u.start + u.numel).min(end));
                (b > a).then_some(Piece {
                    local: a - start,
                    global: a,
                    len: b - a,
                })
            })
            .collect();
        ShardLayout {
            rank,
            world,
            total,
            shard,
            full: false,
            pieces,
            layout: layout.clone(),
        }
    }

    /// Fully sharded: `rank` of `world` holds, of every unit, elements `[rank · s, (rank + 1) · s)` (`s` =
    /// [`Unit::shard`]), unit after unit in its buffers; elements past a unit's end are zero padding.
    pub fn full(layout: &ParamLayout, rank: usize, world: usize) -> Self {
        let world = world.max(1);
        let mut pieces = Vec::new();
        let mut local = 0;
        for u in &layout.units {
            let s = u.shard(world);
            let from = rank as i64 * s;
            let len = (u.numel - from).clamp(0, s);
            if len > 0 {
                pieces.push(Piece {
                    local,
                    global: u.start + from,
                    len,
                });
            }
            local += s;
        }
        ShardLayout {
            rank,
            world,
            total: layout.total,
            shard: local,
            full: true,
            pieces,
            layout: layout.clone(),
        }
    }

    /// More than one rank shares the state (ZeRO-2 or fully sharded).
    pub fn is_sharded(&self) -> bool {
        self.world > 1
    }

    /// ZeRO-2 / replicated: global `[start, end)` of rank `i`'s slice.
    pub fn range_of(&self, i: usize) -> (i64, i64) {
        let start = (i as i64 * self.shard).min(self.total);
        (start, (start + self.shard).min(self.total))
    }

    /// ZeRO-2 / replicated: global `[start, end)` of this rank's slice.
    pub fn range(&self) -> (i64, i64) {
        self.range_of(self.rank)
    }

    /// Elements of this rank's master weights and moments.
    pub fn len(&self) -> i64 {
        if self.full {
            return self.shard;
        }
        let (a, b) = self.range();
        b - a
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fully sharded: offset of unit `u`'s slice in the rank's buffers, and its length.
    pub fn unit_slice(&self, u: usize) -> (i64, i64) {
        let w = self.world;
        let off = self.layout.units[..u].iter().map(|x| x.shard(w)).sum();
        (off, self.layout.units[u].shard(w))
    }

    /// The flat buffer in global order as runs `(owner, owner's local offset, len)`; `None` owns the padding between
    /// units of a fully sharded layout (zeros). What rank 0 streams into a checkpoint.
    fn runs(&self) -> Vec<(Option<usize>, i64, i64)> {
        if !self.full {
            return (0..self.world)
                .map(|i| {
                    let (a, b) = self.range_of(i);
                    (Some(i), 0, b - a)
                })
                .collect();
        }
        let mut runs = Vec::new();
        let (mut local, mut at) = (0, 0);
        for u in &self.layout.units {
            if u.start > at {
                runs.push((None, 0, u.start - at));
            }
            let s = u.shard(self.world);
            for i in 0..self.world {
                let len = (u.numel - i as i64 * s).clamp(0, s);
                if len > 0 {
                    runs.push((Some(i), local, len));
                }
            }
            local += s;
            at = u.start + u.numel;
        }
        if self.total > at {
            runs.push((None, 0, self.total - at));
        }
        runs
    }

    /// `(local start, length, weight decay)` of the runs of this rank's buffers the update touches: the decayed
    /// ≥2-D weights and the norms of each piece.
    fn groups(&self, weight_decay: f64) -> Vec<(i64, i64, f64)> {
        let mut g = Vec::new();
        for p in &self.pieces {
            let u = self
                .layout
                .units
                .iter()
                .find(|u| u.start <= p.global && p.global < u.start + u.numel)
                .expect("a piece lies in a unit");
            let decay_end = u.start + u.decay;
            let d = (decay_end - p.global).clamp(0, p.len);
            if d > 0 {
                g.push((p.local, d, weight_decay));
            }
            if p.len > d {
                g.push((p.local + d, p.len - d, 0.0));
            }
        }
        g
    }
}

/// Squared L2 norms of `g`'s [`NORM_BLOCK`]-element blocks (the last may be short) as f64 on `g`'s device. Per-row
/// norms also sidestep libtorch's CPU fp32 norm, which loses precision on very long vectors (2.5% low at 174 M
/// elements, pytorch#169237).
fn block_sq_norms(g: &Tensor) -> Tensor {
    let n = g.numel() as i64;
    let rows = n / NORM_BLOCK;
    let mut parts = Vec::with_capacity(2);
    if rows > 0 {
        parts.push(
            g.narrow(0, 0, rows * NORM_BLOCK)
                .view([rows, NORM_BLOCK])
                .linalg_norm(2.0, [1i64].as_slice(), false, None::<Kind>),
        );
    }
    if n > rows * NORM_BLOCK {
        parts.push(
            g.narrow(0, rows * NORM_BLOCK, n - rows * NORM_BLOCK)
                .norm()
                .view([1]),
        );
    }
    if parts.is_empty() {
        return Tensor::zeros([0], (Kind::Double, g.device()));
    }
    Tensor::cat(&parts, 0).to_kind(Kind::Double).square()
}

/// L2 norm of a flat fp32 buffer, as a 0-dim fp32 tensor on its device (the replicated case of the sharded norm).
#[cfg(test)]
fn global_norm(g: &Tensor) -> Tensor {
    block_sq_norms(g)
        .sum(Kind::Double)
        .sqrt()
        .to_kind(Kind::Float)
}

/// Copies the gradients of the flat range `[from, from + dst.numel())` into `dst` (fp32): one converting copy per
/// overlapping parameter; missing gradients and elements past the model are zero.
fn copy_flat_grads(params: &Params, from: i64, dst: &mut Tensor) {
    flat_grads(params, from, dst, false)
}

/// [`copy_flat_grads`], adding into `dst` instead of overwriting it (parameters without a gradient add nothing).
fn add_flat_grads(params: &Params, from: i64, dst: &mut Tensor) {
    flat_grads(params, from, dst, true)
}

fn flat_grads(params: &Params, from: i64, dst: &mut Tensor, add: bool) {
    let len = dst.numel() as i64;
    let end = from + len;
    // Overwriting: elements no parameter covers (the padding between units, past the model) become zero.
    let mut cursor = from;
    let zero_to = |dst: &mut Tensor, cursor: &mut i64, upto: i64| {
        if !add && upto > *cursor {
            let _ = dst.narrow(0, *cursor - from, upto - *cursor).zero_();
        }
        *cursor = (*cursor).max(upto);
    };
    for p in &params.params {
        let (ps, pe) = (p.offset, p.offset + p.numel);
        if pe <= from || ps >= end {
            continue;
        }
        let (a, b) = (ps.max(from), pe.min(end));
        zero_to(dst, &mut cursor, a);
        let mut d = dst.narrow(0, a - from, b - a);
        let g = p.tensor.grad();
        match (g.defined(), add) {
            (true, false) => d.copy_(&g.reshape([-1]).narrow(0, a - ps, b - a)),
            (true, true) => {
                let _ = d.g_add_(&g.reshape([-1]).narrow(0, a - ps, b - a));
            }
            (false, false) => {
                let _ = d.zero_();
            }
            (false, true) => {}
        }
        cursor = b;
    }
    zero_to(dst, &mut cursor, end);
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
    /// fp32 master weights of this rank's slice (shares storage with the parameters when they are fp32).
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// fp32 gradient of this rank's slice (`layout.shard` long; elements past the slice are zero), averaged across
    /// ranks by [`reduce_grads`](Self::reduce_grads) and consumed by [`step`](Self::step).
    pub grad: Tensor,
    /// Steps taken.
    pub step: u64,
    layout: ShardLayout,
    shares_params: bool,
    /// The device the model computes on (and the collectives run on).
    device: Device,
    /// Master, moments and gradient live in host memory ([`offload`](Self::offload)).
    offloaded: bool,
    /// Reused fp32 work buffer of the unfused path (squared gradient, then the denominator).
    scratch: Option<Tensor>,
    /// Sharded: reduce-scatter input (fp32) and all-gather buffers (parameter dtype), allocated on first use.
    scatter_buf: Option<Tensor>,
    gather_bufs: Option<(Tensor, Tensor)>,
    /// libtorch's fused kernel (default) or the whole-buffer tch kernels.
    fused: bool,
    /// The fused kernel's step counter: an fp32 scalar on the device, filled before each step (no host sync).
    step_t: Option<Tensor>,
    /// [`grad`](Self::grad) holds micro-batches of the current step ([`accumulate_micro_batch`](Self::accumulate_micro_batch)):
    /// the next gather adds to it instead of overwriting it.
    acc_pending: bool,
}

impl FlatAdamW {
    /// Every rank holds the whole optimizer state.
    pub fn new(params: &Params, cfg: AdamWConfig) -> Self {
        Self::with_layout(&params.flat, cfg, ShardLayout::replicated(&params.layout))
    }

    /// Rank `rank` of `world` holds `1/world` of the optimizer state and of the reduced gradient (ZeRO-2).
    pub fn sharded(params: &Params, cfg: AdamWConfig, rank: usize, world: usize) -> Self {
        Self::with_layout(
            &params.flat,
            cfg,
            ShardLayout::sharded(&params.layout, rank, world),
        )
    }

    /// Fully sharded: the optimizer of `local`, rank `rank`'s slices of every unit of a model laid out as `layout`
    /// (what [`crate::ShardedLlama::local`] holds).
    pub fn full(
        local: &Tensor,
        layout: &ParamLayout,
        cfg: AdamWConfig,
        rank: usize,
        world: usize,
    ) -> Self {
        Self::with_layout(local, cfg, ShardLayout::full(layout, rank, world))
    }

    fn with_layout(buf: &Tensor, cfg: AdamWConfig, layout: ShardLayout) -> Self {
        let mine = if layout.full {
            buf.shallow_clone()
        } else {
            let (start, end) = layout.range();
            buf.narrow(0, start, end - start)
        };
        let shares_params = buf.kind() == Kind::Float;
        let master = if shares_params {
            mine
        } else {
            mine.detach().to_kind(Kind::Float)
        };
        let n = master.numel() as i64;
        let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, buf.device()));
        FlatAdamW {
            cfg,
            master,
            exp_avg: zeros(n),
            exp_avg_sq: zeros(n),
            grad: zeros(layout.shard),
            step: 0,
            layout,
            shares_params,
            device: buf.device(),
            offloaded: false,
            scratch: None,
            scatter_buf: None,
            gather_bufs: None,
            fused: std::env::var("LEXFLOW_ADAMW").map_or(true, |v| v != "unfused"),
            step_t: None,
            acc_pending: false,
        }
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// CPU optimizer offload (ZeRO-Offload): moves the fp32 master, moments and gradient slice to host memory
    /// (pinned when the model is on a GPU). The collectives still reduce on the device, into a staging buffer that
    /// is copied down; AdamW runs on the host; the updated slice is copied up into the compute-dtype weights. On a
    /// CPU device nothing changes numerically (the master becomes a copy instead of the weights themselves). Fully
    /// sharded state only: a replicated or ZeRO-2 optimizer would all-reduce or all-gather host memory.
    pub fn offload(mut self) -> Result<Self> {
        if !self.layout.full {
            return Err(GpuError::Config(
                "optimizer offload needs fully sharded state (train.shard = \"full\")".into(),
            ));
        }
        let cuda = self.device;
        let host = |t: &Tensor| {
            let h = t.to_device(Device::Cpu);
            if cuda.is_cuda() {
                h.pin_memory(cuda)
            } else {
                h
            }
        };
        let _ng = tch::no_grad_guard();
        // Shared with fp32 weights: the master becomes a copy of them.
        let master = if self.shares_params {
            self.master.detach().copy()
        } else {
            self.master.detach()
        };
        self.master = host(&master);
        self.exp_avg = host(&self.exp_avg);
        self.exp_avg_sq = host(&self.exp_avg_sq);
        self.grad = host(&self.grad);
        self.shares_params = false;
        self.offloaded = true;
        self.scratch = None;
        self.step_t = None;
        Ok(self)
    }

    pub fn is_offloaded(&self) -> bool {
        self.offloaded
    }

    /// Every tensor this optimizer holds (master, moments, gradient, work and communication buffers, the fused
    /// kernel's step counter), for measuring its memory; the master is a view of the parameters when they are fp32.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.master, &self.exp_avg, &self.exp_avg_sq, &self.grad];
        v.extend(self.scratch.iter());
        v.extend(self.scatter_buf.iter());
        if let Some((a, b)) = &self.gather_bufs {
            v.extend([a, b]);
        }
        v.extend(self.step_t.iter());
        v
    }

    /// Fused kernel (default; `LEXFLOW_ADAMW=unfused` in the environment turns it off) or whole-buffer kernels.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Copies this rank's slice of its own parameter gradients into [`grad`](Self::grad) (fp32; no reduction across
    /// ranks): one converting copy per parameter, no bf16 concatenation in between.
    pub fn gather_grads(&mut self, params: &Params) -> &mut Tensor {
        let _ng = tch::no_grad_guard();
        let (start, _) = self.layout.range();
        if std::mem::take(&mut self.acc_pending) {
            add_flat_grads(params, start, &mut self.grad);
        } else {
            copy_flat_grads(params, start, &mut self.grad);
        }
        &mut self.grad
    }

    /// Adds this micro-batch's gradients (the parameters' `.grad`) to the step's fp32 gradient and zeroes them, so
    /// that the micro-batches of a step sum in fp32 rather than in the parameters' dtype (bf16 `.grad` tensors would
    /// round every partial sum to 8 bits of mantissa, as PyTorch does with bf16 parameters; FSDP-style trainers keep
    /// the sum in fp32). Call it after every micro-batch but the last; [`reduce_grads`](Self::reduce_grads) then adds
    /// the last one. Replicated: one add per parameter into the full fp32 buffer, no communication; returns false,
    /// and does nothing, for fp32 parameters (their `.grad` already sums in fp32). Sharded: no rank holds a full
    /// fp32 buffer, so each micro-batch is reduce-scattered into this rank's fp32 slice, as FSDP and ZeRO-2 do (one
    /// reduce-scatter per micro-batch instead of one per step; no extra memory), whatever the dtype — the step's
    /// gradient is then the sum over micro-batches of their means over ranks, as a fully sharded run computes it.
    pub fn accumulate_micro_batch(
        &mut self,
        params: &mut Params,
        coll: &dyn Collective,
    ) -> Result<bool> {
        if self.layout.full {
            return Err(GpuError::Config(
                "a fully sharded optimizer reduces each unit's gradients itself (reduce_unit)"
                    .into(),
            ));
        }
        if self.layout.is_sharded() {
            let add = std::mem::take(&mut self.acc_pending);
            self.scatter_grads(params, coll, add)?;
        } else if params.flat.kind() == Kind::Float {
            return Ok(false);
        } else {
            self.gather_grads(params);
        }
        self.acc_pending = true;
        params.zero_grad();
        Ok(true)
    }

    /// Fills [`grad`](Self::grad) with the mean over ranks of this rank's slice of the gradients: replicated, a
    /// gather and one bucketed all-reduce; sharded, a reduce-scatter per bucket of `world` equal chunks (chunk `i`
    /// from rank `i`'s slice), so no rank ever holds the whole fp32 gradient. Micro-batches accumulated before
    /// ([`accumulate_micro_batch`](Self::accumulate_micro_batch)) are added.
    pub fn reduce_grads(&mut self, params: &Params, coll: &dyn Collective) -> Result<()> {
        if !self.layout.is_sharded() {
            self.gather_grads(params);
            return coll.all_reduce_mean(&mut self.grad);
        }
        let add = std::mem::take(&mut self.acc_pending);
        self.scatter_grads(params, coll, add)
    }

    /// Sharded: reduce-scatters the parameters' gradients into this rank's slice of [`grad`](Self::grad), replacing
    /// it or (`add`) adding to it.
    fn scatter_grads(&mut self, params: &Params, coll: &dyn Collective, add: bool) -> Result<()> {
        self.check_group(coll)?;
        let _ng = tch::no_grad_guard();
        let (w, shard) = (self.layout.world as i64, self.layout.shard);
        let c = (BUCKET_ELEMS / w).clamp(1, shard);
        let device = params.flat.device();
        // Input chunks of every rank, then (adding) one output chunk.
        let buf = self
            .scatter_buf
            .get_or_insert_with(|| Tensor::zeros([w * c + c], (Kind::Float, device)));
        let mut o = 0;
        while o < shard {
            let cc = c.min(shard - o);
            for i in 0..w {
                copy_flat_grads(params, i * shard + o, &mut buf.narrow(0, i * cc, cc));
            }
            let input = buf.narrow(0, 0, w * cc);
            let mut dst = self.grad.narrow(0, o, cc);
            if add {
                let mut out = buf.narrow(0, w * c, cc);
                coll.reduce_scatter_mean(&input, &mut out)?;
                let _ = dst.g_add_(&out);
            } else {
                coll.reduce_scatter_mean(&input, &mut dst)?;
            }
            o += cc;
        }
        Ok(())
    }

    /// Fully sharded: reduce-scatters unit `u`'s gradient — `grads`, fp32, the whole unit in its gathered layout
    /// padded to `world` slices — into this rank's fp32 slice, replacing it (first micro-batch of a step) or adding
    /// to it (`add`).
    pub fn reduce_unit(
        &mut self,
        u: usize,
        grads: &Tensor,
        coll: &dyn Collective,
        add: bool,
    ) -> Result<()> {
        self.check_group(coll)?;
        let _ng = tch::no_grad_guard();
        let (off, len) = self.layout.unit_slice(u);
        let mut dst = self.grad.narrow(0, off, len);
        if add || self.offloaded {
            // Reduced on the device, then added (or, offloaded, copied down) into the slice.
            let mut out = Tensor::zeros([len], (Kind::Float, grads.device()));
            coll.reduce_scatter_mean(grads, &mut out)?;
            if add {
                let _ = dst.g_add_(&out);
            } else {
                dst.copy_(&out);
            }
        } else {
            coll.reduce_scatter_mean(grads, &mut dst)?;
        }
        Ok(())
    }

    fn check_group(&self, coll: &dyn Collective) -> Result<()> {
        if coll.rank() != self.layout.rank || coll.world_size() != self.layout.world {
            return Err(GpuError::Collective {
                rank: coll.rank(),
                message: format!(
                    "optimizer sharded as rank {} of {}, collective is rank {} of {}",
                    self.layout.rank,
                    self.layout.world,
                    coll.rank(),
                    coll.world_size()
                ),
            });
        }
        Ok(())
    }

    /// Global gradient norm as a 0-dim fp32 tensor: squared norms of the [`NORM_BLOCK`]-element blocks of each unit
    /// (blocks start at the unit's start; a unit's last block is its tail), placed at their global block index,
    /// summed across ranks when sharded (exact: every position has one non-zero contribution), then summed in block
    /// order. The same vector, so the same bits, however the state is split.
    fn grad_norm(&self, coll: &dyn Collective) -> Result<Tensor> {
        let blocks = (self.layout.total + NORM_BLOCK - 1) / NORM_BLOCK;
        let all = Tensor::zeros([blocks], (Kind::Double, self.grad.device()));
        for p in &self.layout.pieces {
            let local = block_sq_norms(&self.grad.narrow(0, p.local, p.len));
            all.narrow(0, p.global / NORM_BLOCK, local.numel() as i64)
                .copy_(&local);
        }
        let mut all = all;
        if self.layout.is_sharded() {
            let mut on_device = all.to_device(self.device);
            coll.all_reduce_sum(&mut on_device)?;
            all = on_device.to_device(all.device());
        }
        Ok(all.sum(Kind::Double).sqrt().to_kind(Kind::Float))
    }

    /// One AdamW step from [`grad`](Self::grad) (already averaged across ranks): clip, update moments and master,
    /// refresh the parameters (sharded: every rank's slice, by all-gather).
    ///
    /// The norm, the clipping scale (on the device: no host round trip before the update), the update (fused or
    /// whole-buffer, see [`set_fused`](Self::set_fused)), then the bf16 refresh; the gradient norm is read back
    /// once, after everything is enqueued. Errors if libtorch rejects the fused kernel's launch or a collective fails.
    ///
    /// `target` is the compute-dtype buffer this optimizer updates: the model's flat parameters
    /// ([`Params::flat`]), or a fully sharded model's slices ([`crate::ShardedLlama::local`]).
    pub fn step(&mut self, target: &Tensor, coll: &dyn Collective) -> Result<StepStats> {
        let _ng = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg.clone();
        let lr = c.lr_at(self.step);
        let norm = self.grad_norm(coll)?;
        if !self.layout.is_empty() {
            if self.fused {
                self.fused_update(&norm, lr)?;
            } else {
                self.unfused_update(&norm, lr);
            }
        }
        if !self.shares_params {
            if self.layout.full {
                target.detach().copy_(&self.master);
            } else {
                let (start, end) = self.layout.range();
                if end > start {
                    target
                        .detach()
                        .narrow(0, start, end - start)
                        .copy_(&self.master);
                }
            }
        }
        if self.layout.is_sharded() && !self.layout.full {
            self.gather_params(target, coll)?;
        }
        let grad_norm = norm.double_value(&[]);
        Ok(StepStats {
            step: self.step,
            lr,
            grad_norm,
            clipped: c.grad_clip > 0.0 && c.grad_clip / (grad_norm + 1e-6) < 1.0,
        })
    }

    /// Every rank's updated slice into every rank's parameters, bucket by bucket.
    fn gather_params(&mut self, target: &Tensor, coll: &dyn Collective) -> Result<()> {
        let (w, shard, total) = (
            self.layout.world as i64,
            self.layout.shard,
            self.layout.total,
        );
        let flat = target.detach();
        let c = (BUCKET_ELEMS / w).clamp(1, shard);
        let (inp, out) = self.gather_bufs.get_or_insert_with(|| {
            let o = (flat.kind(), flat.device());
            (Tensor::zeros([c], o), Tensor::zeros([w * c], o))
        });
        let mut o = 0;
        while o < shard {
            let cc = c.min(shard - o);
            let i_buf = inp.narrow(0, 0, cc);
            let from = self.layout.rank as i64 * shard + o;
            let valid = (total - from).clamp(0, cc);
            if valid > 0 {
                i_buf
                    .narrow(0, 0, valid)
                    .copy_(&flat.narrow(0, from, valid));
            }
            coll.all_gather(&i_buf, &mut out.narrow(0, 0, w * cc))?;
            for i in 0..w {
                let from = i * shard + o;
                let valid = (total - from).clamp(0, cc);
                if i != self.layout.rank as i64 && valid > 0 {
                    flat.narrow(0, from, valid)
                        .copy_(&out.narrow(0, i * cc, valid));
                }
            }
            o += cc;
        }
        Ok(())
    }

    /// `at::_fused_adamw_` on the decayed part and on the rest; clipping as `grad_scale = max((‖g‖ + 1e-6) / clip,
    /// 1)`, i.e. `g · min(clip / (‖g‖ + 1e-6), 1)` as `torch.nn.utils.clip_grad_norm_`.
    fn fused_update(&mut self, norm: &Tensor, lr: f64) -> Result<()> {
        let groups = self.layout.groups(self.cfg.weight_decay);
        let c = &self.cfg;
        let step_t = self
            .step_t
            .get_or_insert_with(|| Tensor::zeros([], (Kind::Float, self.master.device())));
        let _ = step_t.fill_(self.step as f64);
        let scale =
            (c.grad_clip > 0.0).then(|| (norm + 1e-6).g_div_scalar(c.grad_clip).clamp_min(1.0));
        let args = crate::ops::AdamWArgs {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            weight_decay: c.weight_decay,
            eps: c.eps,
        };
        // One kernel launch per weight-decay value, over all of its runs.
        for decayed in [true, false] {
            let views: Vec<[Tensor; 4]> = groups
                .iter()
                .filter(|&&(_, _, wd)| (wd != 0.0) == decayed)
                .map(|&(start, len, _)| {
                    [
                        self.master.narrow(0, start, len),
                        self.grad.narrow(0, start, len),
                        self.exp_avg.narrow(0, start, len),
                        self.exp_avg_sq.narrow(0, start, len),
                    ]
                })
                .collect();
            if views.is_empty() {
                continue;
            }
            let list: Vec<crate::ops::AdamWGroup<'_>> = views
                .iter()
                .map(|[p, g, m, v]| crate::ops::AdamWGroup {
                    params: p,
                    grads: g,
                    exp_avg: m,
                    exp_avg_sq: v,
                    step: step_t,
                })
                .collect();
            crate::ops::fused_adamw(
                &list,
                crate::ops::AdamWArgs {
                    weight_decay: if decayed { c.weight_decay } else { 0.0 },
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
        let groups = self.layout.groups(c.weight_decay);
        let n = self.master.numel() as i64;
        let mut grad = self.grad.narrow(0, 0, n);
        if c.grad_clip > 0.0 {
            // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1.
            let coef = (norm + 1e-6)
                .reciprocal()
                .g_mul_scalar(c.grad_clip)
                .clamp_max(1.0);
            let _ = grad.g_mul_(&coef);
        }
        for &(start, len, wd) in &groups {
            if wd != 0.0 {
                let _ = self
                    .master
                    .narrow(0, start, len)
                    .g_mul_scalar_(1.0 - lr * wd);
            }
        }
        let _ = self.exp_avg.lerp_(&grad, 1.0 - c.beta1);
        let scratch = self
            .scratch
            .get_or_insert_with(|| self.exp_avg_sq.empty_like());
        let _ = grad.square_out(scratch);
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

    fn metadata(&self) -> HashMap<String, String> {
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("layout".to_string(), self.layout.layout.fingerprint());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&self.cfg).expect("config is JSON"),
        );
        meta
    }

    /// Saves master weights, moments and the step counter of a replicated optimizer (sharded: see
    /// [`save_collective`](Self::save_collective)).
    pub fn save(&self, path: &Path) -> Result<u64> {
        if self.layout.is_sharded() || self.layout.full {
            return Err(GpuError::checkpoint(
                path,
                "a sharded optimizer is saved by all ranks together (save_collective)",
            ));
        }
        let tensors = vec![
            ("master".to_string(), self.master.shallow_clone()),
            ("exp_avg".to_string(), self.exp_avg.shallow_clone()),
            ("exp_avg_sq".to_string(), self.exp_avg_sq.shallow_clone()),
        ];
        write_safetensors(path, &tensors, Some(self.metadata()))
    }

    /// Saves the whole optimizer state to `path` on rank 0, which must pass `Some(path)`; every other rank passes
    /// `None` and, when sharded, sends its slices (one broadcast per chunk), so the file is the same as a replicated
    /// optimizer's. Replicated, only rank 0 does anything. Returns the bytes written (0 on other ranks).
    pub fn save_collective(&self, path: Option<&Path>, coll: &dyn Collective) -> Result<u64> {
        if !self.layout.is_sharded() && !self.layout.full {
            return match path {
                Some(p) if coll.rank() == 0 => self.save(p),
                _ => Ok(0),
            };
        }
        self.check_group(coll)?;
        let total = self.layout.total;
        let names = ["exp_avg", "exp_avg_sq", "master"];
        let mut writer = match (coll.rank(), path) {
            (0, Some(p)) => Some(StreamingSafetensors::create(
                p,
                &names.map(|n| (n, total)),
                self.metadata(),
            )?),
            (0, None) => {
                return Err(GpuError::Config(
                    "rank 0 must name the optimizer file".into(),
                ))
            }
            _ => None,
        };
        let _ng = tch::no_grad_guard();
        let device = self.device;
        let mut buf: Option<Tensor> = None;
        let runs = self.layout.runs();
        for (name, mine) in names
            .iter()
            .zip([&self.exp_avg, &self.exp_avg_sq, &self.master])
        {
            for &(owner, local, len) in &runs {
                let mut o = 0;
                while o < len {
                    let cc = SAVE_CHUNK_ELEMS.min(len - o);
                    match owner {
                        Some(0) => {
                            if let Some(w) = writer.as_mut() {
                                w.write(name, &mine.narrow(0, local + o, cc))?;
                            }
                        }
                        None => {
                            if let Some(w) = writer.as_mut() {
                                w.write(name, &Tensor::zeros([cc], (Kind::Float, device)))?;
                            }
                        }
                        Some(i) => {
                            let chunk = buf.get_or_insert_with(|| {
                                Tensor::zeros([SAVE_CHUNK_ELEMS], (Kind::Float, device))
                            });
                            let mut part = chunk.narrow(0, 0, cc);
                            if i == self.layout.rank {
                                part.copy_(&mine.narrow(0, local + o, cc));
                            }
                            coll.broadcast(&mut part, i)?;
                            if let Some(w) = writer.as_mut() {
                                w.write(name, &part)?;
                            }
                        }
                    }
                    o += cc;
                }
            }
        }
        match writer {
            Some(w) => w.finish(),
            None => Ok(0),
        }
    }

    /// Writes this rank's part of the state — the master, moments of the elements it owns, nothing else — to
    /// `dir`/[`part_file`]`(rank, world)`, streamed piece by piece (no copy of the state, no communication). With
    /// every rank's part and rank 0's [`parts_manifest`](Self::parts_manifest), [`load_dir`](Self::load_dir)
    /// restores the state at any world size or mode. Returns the bytes written.
    pub fn save_part(&self, dir: &Path) -> Result<u64> {
        let l = &self.layout;
        let n: i64 = l.pieces.iter().map(|p| p.len).sum();
        let names = ["exp_avg", "exp_avg_sq", "master"];
        let mut meta = self.metadata();
        meta.insert("rank".into(), l.rank.to_string());
        meta.insert("world".into(), l.world.to_string());
        meta.insert(
            "pieces".into(),
            serde_json::to_string(
                &l.pieces
                    .iter()
                    .map(|p| [p.global, p.len])
                    .collect::<Vec<_>>(),
            )
            .expect("JSON"),
        );
        let path = dir.join(part_file(l.rank, l.world));
        let mut w = StreamingSafetensors::create(&path, &names.map(|x| (x, n)), meta)?;
        let _ng = tch::no_grad_guard();
        for (name, t) in names
            .iter()
            .zip([&self.exp_avg, &self.exp_avg_sq, &self.master])
        {
            for p in &l.pieces {
                let mut o = 0;
                while o < p.len {
                    let cc = SAVE_CHUNK_ELEMS.min(p.len - o);
                    w.write(name, &t.narrow(0, p.local + o, cc))?;
                    o += cc;
                }
            }
        }
        w.finish()
    }

    /// The [`OPTIMIZER_PARTS`] manifest of the parts every rank of this optimizer's group writes
    /// ([`save_part`](Self::save_part)): which global ranges each file holds (computed from the layout: rank 0
    /// writes it without hearing from the others).
    pub fn parts_manifest(&self) -> String {
        let l = &self.layout;
        let parts: Vec<serde_json::Value> = (0..l.world)
            .map(|r| {
                let other = if l.full {
                    ShardLayout::full(&l.layout, r, l.world)
                } else {
                    ShardLayout::sharded(&l.layout, r, l.world)
                };
                serde_json::json!({
                    "file": part_file(r, l.world),
                    "pieces": other.pieces.iter().map(|p| [p.global, p.len]).collect::<Vec<_>>(),
                })
            })
            .collect();
        let meta = self.metadata();
        serde_json::to_string_pretty(&serde_json::json!({
            "format": "lexflow-optimizer-parts-v1",
            "total": l.total,
            "metadata": meta,
            "parts": parts,
        }))
        .expect("JSON")
    }

    /// Restores this rank's slice of a state saved by [`save`](Self::save) or
    /// [`save_collective`](Self::save_collective) (at any world size, sharded or not) into a model of the same shape,
    /// and the whole model's parameters from the saved master weights. Reads the moments of this slice only.
    ///
    /// `target` is the compute-dtype buffer of [`step`](Self::step): the model's flat parameters or a fully sharded
    /// model's slices; it receives the saved master weights (the whole model's for ZeRO-2, which keeps every
    /// rank's parameters whole).
    pub fn load(&mut self, path: &Path, target: &Tensor) -> Result<()> {
        let files = StateFiles::One(SafetensorsRanges::open(path)?);
        self.load_from(path, &files, target)
    }

    /// Restores this rank's part of the state in checkpoint directory `dir`, saved either as one file
    /// (`optimizer.safetensors`: [`save`](Self::save), [`save_collective`](Self::save_collective)) or as one file
    /// per rank ([`save_part`](Self::save_part), with the [`OPTIMIZER_PARTS`] manifest) — by any world size and
    /// sharding mode: each rank reads the ranges it owns now from whichever files hold them.
    pub fn load_dir(&mut self, dir: &Path, target: &Tensor) -> Result<()> {
        let one = dir.join(OPTIMIZER_FILE);
        if one.is_file() {
            return self.load(&one, target);
        }
        let manifest = dir.join(OPTIMIZER_PARTS);
        let files = StateFiles::open_parts(dir)?;
        self.load_from(&manifest, &files, target)
    }

    fn load_from(&mut self, path: &Path, file: &StateFiles, target: &Tensor) -> Result<()> {
        let _ng = tch::no_grad_guard();
        let meta = file.metadata();
        let bad = |m: String| GpuError::checkpoint(path, m);
        let step: u64 = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no step in metadata".into()))?;
        let want = self.layout.layout.fingerprint();
        match meta.get("layout") {
            Some(l) if *l == want => {}
            Some(_) => {
                return Err(bad(
                    "the optimizer state was saved for another model shape (its parameter layout differs)".into(),
                ))
            }
            None => {
                return Err(bad(
                    "the optimizer state has no parameter layout: it was saved by an older lexflow, whose flat \
                     layout differs; resume from a newer checkpoint or start from its weights (train.init_from)"
                        .into(),
                ))
            }
        }
        let total = self.layout.total;
        for (name, dst) in [
            ("master", &mut self.master),
            ("exp_avg", &mut self.exp_avg),
            ("exp_avg_sq", &mut self.exp_avg_sq),
        ] {
            if self.layout.full {
                let _ = dst.zero_();
                for p in &self.layout.pieces {
                    let t = file.read(name, total, p.global, p.len)?;
                    dst.narrow(0, p.local, p.len).copy_(&t);
                }
            } else {
                let (start, end) = self.layout.range();
                let t = file.read(name, total, start, end - start)?;
                dst.copy_(&t);
            }
        }
        if self.layout.is_sharded() && !self.layout.full {
            // The parameters are the whole model (the master weights of every slice, in the parameter dtype: what
            // the all-gather after each step would have produced), read in chunks.
            let flat = target.detach();
            let mut a = 0;
            while a < total {
                let n = SAVE_CHUNK_ELEMS.min(total - a);
                let t = file.read("master", total, a, n)?;
                flat.narrow(0, a, n).copy_(&t);
                a += n;
            }
        } else if !self.shares_params {
            target.detach().copy_(&self.master);
        }
        self.step = step;
        Ok(())
    }
}

/// The optimizer state of a checkpoint as one file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The manifest of an optimizer state saved as one file per rank ([`FlatAdamW::save_part`]).
pub const OPTIMIZER_PARTS: &str = "optimizer.json";

/// The file of rank `rank`'s part of the optimizer state.
pub fn part_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}

/// One rank's part file, its `(global start, length, offset in the file)` runs, and its length.
type Part = (SafetensorsRanges, Vec<(i64, i64, i64)>, i64);

/// Where a saved optimizer state is read from: one file in the global layout, or per-rank parts.
enum StateFiles {
    One(SafetensorsRanges),
    /// Each part: its file, its `(global start, length, offset in the file)` runs, and its length.
    Parts {
        metadata: HashMap<String, String>,
        parts: Vec<Part>,
    },
}

impl StateFiles {
    fn open_parts(dir: &Path) -> Result<Self> {
        let mpath = dir.join(OPTIMIZER_PARTS);
        let bad = |m: String| GpuError::checkpoint(&mpath, m);
        let text = std::fs::read_to_string(&mpath).map_err(|e| {
            GpuError::checkpoint(
                dir,
                format!(
                    "no {OPTIMIZER_FILE} and no {OPTIMIZER_PARTS} ({e}): not a complete checkpoint"
                ),
            )
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if v["format"] != "lexflow-optimizer-parts-v1" {
            return Err(bad(format!("unknown format {}", v["format"])));
        }
        let metadata: HashMap<String, String> = serde_json::from_value(v["metadata"].clone())
            .map_err(|e| bad(format!("metadata: {e}")))?;
        let mut parts = Vec::new();
        for p in v["parts"]
            .as_array()
            .ok_or_else(|| bad("no parts".into()))?
        {
            let file = p["file"]
                .as_str()
                .ok_or_else(|| bad("a part without a file".into()))?;
            let pieces: Vec<[i64; 2]> = serde_json::from_value(p["pieces"].clone())
                .map_err(|e| bad(format!("{file}: pieces: {e}")))?;
            let mut runs = Vec::with_capacity(pieces.len());
            let mut off = 0;
            for [g, l] in pieces {
                runs.push((g, l, off));
                off += l;
            }
            let f = SafetensorsRanges::open(&dir.join(file))?;
            parts.push((f, runs, off));
        }
        Ok(StateFiles::Parts { metadata, parts })
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            StateFiles::One(f) => f.metadata(),
            StateFiles::Parts { metadata, .. } => metadata.clone(),
        }
    }

    /// Elements `[start, start + len)` of the global array `name` (`total` long; padding between units is zero).
    fn read(&self, name: &str, total: i64, start: i64, len: i64) -> Result<Tensor> {
        match self {
            StateFiles::One(f) => f.read_f32_range(name, total, start, len),
            StateFiles::Parts { parts, .. } => {
                let out = Tensor::zeros([len], (Kind::Float, Device::Cpu));
                let end = start + len;
                for (f, runs, n) in parts {
                    for &(g, l, off) in runs {
                        let (a, b) = (g.max(start), (g + l).min(end));
                        if b > a {
                            let t = f.read_f32_range(name, *n, off + (a - g), b - a)?;
                            out.narrow(0, a - start, b - a).copy_(&t);
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The whole optimizer state of checkpoint directory `dir` in the global flat layout (either format): `(name,
/// tensor)` for `master`, `exp_avg`, `exp_avg_sq`, and the metadata (step, schedule, layout). For comparing and
/// inspecting checkpoints; it holds three fp32 copies of the model in memory.
pub fn read_optimizer_state(
    dir: &Path,
) -> Result<(crate::checkpoint::NamedTensors, HashMap<String, String>)> {
    let one = dir.join(OPTIMIZER_FILE);
    let files = if one.is_file() {
        StateFiles::One(SafetensorsRanges::open(&one)?)
    } else {
        StateFiles::open_parts(dir)?
    };
    let meta = files.metadata();
    let total: i64 = match &files {
        StateFiles::One(_) => {
            let (t, _) = crate::checkpoint::read_safetensors(&one)?;
            t.first().map_or(0, |(_, x)| x.numel() as i64)
        }
        StateFiles::Parts { .. } => {
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(OPTIMIZER_PARTS))
                    .map_err(|e| GpuError::io(dir.join(OPTIMIZER_PARTS), e))?,
            )
            .map_err(|e| GpuError::checkpoint(dir, e.to_string()))?;
            v["total"].as_i64().unwrap_or(0)
        }
    };
    let mut out = Vec::new();
    for name in ["exp_avg", "exp_avg_sq", "master"] {
        out.push((name.to_string(), files.read(name, total, 0, total)?));
    }
    Ok((out, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::read_safetensors;
    use crate::model::{Llama, LlamaConfig};
    use crate::{InProcessCollective, SingleRank};
    use tch::{nn, nn::OptimizerConfig, Device};

    /// `t` (flat, the model's length) with the padding between units zeroed, as real gradients have it.
    fn masked(layout: &ParamLayout, t: Tensor) -> Tensor {
        let m = t.zeros_like();
        for u in &layout.units {
            m.narrow(0, u.start, u.numel)
                .copy_(&t.narrow(0, u.start, u.numel));
        }
        m
    }

    /// bf16 parameters, 16 micro-batches: with [`FlatAdamW::accumulate_micro_batch`] the step's gradient is the
    /// fp32 sum of the micro-batches' bf16 gradients (to fp32 rounding); summed in the bf16 `.grad` tensors, as
    /// before, it is off by bf16 roundings of the partial sums. The same for a sharded optimizer (each rank's fp32
    /// slice); fp32 parameters are left as they were.
    #[test]
    fn micro_batches_of_bf16_parameters_sum_in_fp32() {
        let vocab = 64;
        let model = Llama::new(&LlamaConfig::tiny(vocab), Device::Cpu, Kind::BFloat16, 3).unwrap();
        let n = model.params.numel();
        // Micro-batch k's gradient: a deterministic wave (libtorch's generator is shared with concurrent tests),
        // of one sign so that the partial sums grow and bf16 rounds them coarsely.
        let grads: Vec<Tensor> = (0..16)
            .map(|k| {
                masked(
                    &model.params.layout,
                    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.37 + 0.01 * k as f64))
                        .sin()
                        .abs()
                        .g_add_scalar(0.5)
                        .to_kind(Kind::BFloat16),
                )
            })
            .collect();
        let backward = |params: &Params, g: &Tensor| {
            let loss = params
                .params
                .iter()
                .map(|p| {
                    let gp = g.narrow(0, p.offset, p.numel).view(p.shape.as_slice());
                    (&p.tensor * gp).sum(Kind::Float)
                })
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
        };
        let exact = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double))
            .reduce(|a, b| a + b)
            .unwrap();
        let err = |got: &Tensor| {
            let d = (got.to_kind(Kind::Double) - &exact)
                .abs()
                .max()
                .double_value(&[]);
            d / exact.abs().max().double_value(&[])
        };
        let run = |fp32: bool| {
            let mut m =
                Llama::new(&LlamaConfig::tiny(vocab), Device::Cpu, Kind::BFloat16, 3).unwrap();
            let mut opt = FlatAdamW::new(&m.params, cfg());
            for (k, g) in grads.iter().enumerate() {
                backward(&m.params, g);
                if fp32 && k + 1 < grads.len() {
                    assert!(opt
                        .accumulate_micro_batch(&mut m.params, &SingleRank)
                        .unwrap());
                }
            }
            opt.reduce_grads(&m.params, &SingleRank).unwrap();
            let e = err(&opt.grad.narrow(0, 0, n));
            // The next step starts afresh: its gradient is its own micro-batch only.
            m.params.zero_grad();
            backward(&m.params, &grads[0]);
            opt.reduce_grads(&m.params, &SingleRank).unwrap();
            let first = (opt.grad.narrow(0, 0, n).to_kind(Kind::Double)
                - grads[0].to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
            assert_eq!(first, 0.0, "the previous step leaked into the next one");
            e
        };
        let (in_fp32, in_bf16) = (run(true), run(false));
        assert!(in_fp32 < 1e-6, "fp32 accumulation off by {in_fp32:e}");
        assert!(
            in_bf16 > 1e-3,
            "bf16 accumulation unexpectedly exact ({in_bf16:e}): the test cannot tell"
        );
        // fp32 parameters: nothing to do.
        let mut f32m = Llama::new(&LlamaConfig::tiny(vocab), Device::Cpu, Kind::Float, 3).unwrap();
        let mut opt = FlatAdamW::new(&f32m.params, cfg());
        assert!(!opt
            .accumulate_micro_batch(&mut f32m.params, &SingleRank)
            .unwrap());

        // Sharded over 2 ranks (rank 1's micro-batches in another order, halved): each micro-batch is
        // reduce-scattered into the rank's fp32 slice, so each slice is the fp32 mean over ranks of the sums.
        let world = 2;
        let rank_grads = |r: usize| -> Vec<Tensor> {
            (0..grads.len())
                .map(|k| match r {
                    0 => grads[k].shallow_clone(),
                    _ => (&grads[(k + 5) % grads.len()] * 0.5).to_kind(Kind::BFloat16),
                })
                .collect()
        };
        let exact_mean = (0..world)
            .flat_map(|r| rank_grads(r).into_iter().map(|g| g.to_kind(Kind::Double)))
            .reduce(|a, b| a + b)
            .unwrap()
            / world as f64;
        let sharded = |fp32: bool| -> f64 {
            let handles: Vec<_> = InProcessCollective::group(world)
                .into_iter()
                .map(|coll| {
                    let grads = rank_grads(coll.rank());
                    let exact = exact_mean.shallow_clone();
                    std::thread::spawn(move || {
                        let mut m =
                            Llama::new(&LlamaConfig::tiny(vocab), Device::Cpu, Kind::BFloat16, 3)
                                .unwrap();
                        let mut opt = FlatAdamW::sharded(&m.params, cfg(), coll.rank(), world);
                        for (k, g) in grads.iter().enumerate() {
                            backward(&m.params, g);
                            if fp32 && k + 1 < grads.len() {
                                assert!(opt.accumulate_micro_batch(&mut m.params, &coll).unwrap());
                            }
                        }
                        opt.reduce_grads(&m.params, &coll).unwrap();
                        let (a, b) = opt.layout().range();
                        let got = opt.grad.narrow(0, 0, b - a).to_kind(Kind::Double);
                        let want = exact.narrow(0, a, b - a);
                        let d = (got - &want).abs().max().double_value(&[]);
                        d / exact.abs().max().double_value(&[])
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0.0, f64::max)
        };
        let (in_fp32, in_bf16) = (sharded(true), sharded(false));
        assert!(
            in_fp32 < 1e-6,
            "sharded fp32 accumulation off by {in_fp32:e}"
        );
        assert!(
            in_bf16 > 1e-3,
            "sharded bf16 accumulation unexpectedly exact ({in_bf16:e})"
        );
    }

    #[test]
    fn schedules_warm_up_then_follow_their_shape() {
        let c = |schedule, decay_steps| AdamWConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            schedule,
            decay_steps,
            ..cfg()
        };
        for s in [LrSchedule::Cosine, LrSchedule::Wsd, LrSchedule::Constant] {
            assert!((c(s, 20).lr_at(5) - 0.5).abs() < 1e-12, "{s:?}: warmup");
            assert!((c(s, 20).lr_at(10) - 1.0).abs() < 1e-12, "{s:?}: peak");
        }
        let cos = c(LrSchedule::Cosine, 0);
        assert!(
            (cos.lr_at(60) - 0.55).abs() < 1e-12,
            "cosine halfway: (1 + 0.1) / 2"
        );
        assert!((cos.lr_at(110) - 0.1).abs() < 1e-12);
        let wsd = c(LrSchedule::Wsd, 20);
        assert_eq!(wsd.lr_at(90), 1.0, "stable until the last 20 steps");
        assert!(
            (wsd.lr_at(100) - 0.55).abs() < 1e-12,
            "linear decay halfway"
        );
        assert!((wsd.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((wsd.lr_at(500) - 0.1).abs() < 1e-12, "past the end: min_lr");
        assert_eq!(c(LrSchedule::Constant, 0).lr_at(110), 1.0);
        // An older trainer_state.json (no schedule fields) reads as cosine.
        let mut v = serde_json::to_value(c(LrSchedule::Wsd, 20)).unwrap();
        v.as_object_mut().unwrap().remove("schedule");
        v.as_object_mut().unwrap().remove("decay_steps");
        let old: AdamWConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old.schedule, LrSchedule::Cosine);
    }

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
            schedule: LrSchedule::Cosine,
            decay_steps: 0,
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
        let w = {
            let _g = crate::model::rng_lock();
            tch::manual_seed(0);
            vs.root().randn("w", &[3, 4], 0.0, 1.0)
        };
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
        let x = {
            let _g = crate::model::rng_lock();
            Tensor::randn([4, 2], (Kind::Float, Device::Cpu))
        };
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
            flat.step(&model.params.flat, &SingleRank).unwrap();
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
        let _ = opt.grad.narrow(0, 0, 4).fill_(10.0);
        let norms = |m: &Llama| -> Vec<Tensor> {
            m.params
                .layout
                .norm_ranges()
                .iter()
                .map(|&(a, b)| m.params.flat.narrow(0, a, b - a).copy())
                .collect()
        };
        let before = norms(&model);
        let s = opt.step(&model.params.flat, &SingleRank).unwrap();
        assert!(s.clipped && (s.grad_norm - 20.0).abs() < 1e-4);
        assert!((opt.grad.norm().double_value(&[]) - 1.0).abs() < 1e-5);
        // Norm weights had zero gradient and no decay: unchanged.
        for (a, b) in norms(&model).iter().zip(&before) {
            assert!(a.equal(b));
        }
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
            let g = {
                let _g = crate::model::rng_lock();
                tch::manual_seed(100 + step);
                masked(
                    &models[0].params.layout,
                    Tensor::randn([models[0].params.numel()], (Kind::Float, Device::Cpu)),
                )
            };
            for (m, o) in models.iter().zip(opts.iter_mut()) {
                o.grad.copy_(&g);
                let st = o.step(&m.params.flat, &SingleRank).unwrap();
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
        let g = {
            let _g = crate::model::rng_lock();
            tch::manual_seed(0);
            Tensor::randn([20_000_037], (Kind::Float, Device::Cpu))
        } * 1e-3;
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
        {
            let _g = crate::model::rng_lock();
            let _ = opt.grad.normal_(0.0, 1.0);
        }
        opt.step(&model.params.flat, &SingleRank).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("opt.safetensors");
        opt.save(&p).unwrap();
        let model2 = Llama::new(&LlamaConfig::tiny(8), Device::Cpu, Kind::Float, 1).unwrap();
        let mut opt2 = FlatAdamW::new(&model2.params, cfg());
        opt2.load(&p, &model2.params.flat).unwrap();
        assert_eq!(opt2.step, 1);
        assert!(
            opt2.exp_avg_sq.equal(&opt.exp_avg_sq) && model2.params.flat.equal(&model.params.flat)
        );
    }

    /// Trains `world` in-process ranks for `steps` steps on per-rank random gradients (clipping active), replicated
    /// or sharded; returns every rank's final parameters and its optimizer.
    fn train_group(
        world: usize,
        vocab: usize,
        kind: Kind,
        sharded: bool,
        steps: u64,
    ) -> Vec<(Tensor, FlatAdamW)> {
        let c = AdamWConfig {
            grad_clip: 0.5,
            ..cfg()
        };
        // libtorch's generator is process-global and other tests reseed it concurrently: weights and gradients come
        // from a deterministic formula instead.
        let layout = LlamaConfig::tiny(vocab).param_layout();
        let n = layout.total;
        let wave = |f: f64, amp: f64| {
            masked(
                &layout,
                (Tensor::arange(n, (Kind::Double, Device::Cpu)) * f)
                    .sin()
                    .g_mul_scalar(amp)
                    .to_kind(Kind::Float),
            )
        };
        let inputs: Vec<(Llama, Vec<Tensor>)> = (0..world)
            .map(|rank| {
                let model = Llama::new(&LlamaConfig::tiny(vocab), Device::Cpu, kind, 7).unwrap();
                tch::no_grad(|| model.params.flat.detach().copy_(&wave(0.731, 0.02)));
                let grads = (0..steps)
                    .map(|step| wave(0.37 + 0.11 * rank as f64 + 0.013 * step as f64, 1.0))
                    .collect();
                (model, grads)
            })
            .collect();
        let handles: Vec<_> = InProcessCollective::group(world)
            .into_iter()
            .zip(inputs)
            .map(|(coll, (mut model, grads))| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let rank = coll.rank();
                    assert_eq!(model.params.numel(), n);
                    let mut opt = if sharded {
                        FlatAdamW::sharded(&model.params, c, rank, world)
                    } else {
                        FlatAdamW::new(&model.params, c)
                    };
                    for g in grads {
                        let loss = model
                            .params
                            .params
                            .iter()
                            .map(|p| {
                                let gp = g.narrow(0, p.offset, p.numel).view(p.shape.as_slice());
                                (&p.tensor * gp.to_kind(kind)).sum(Kind::Float)
                            })
                            .reduce(|a, b| a + b)
                            .unwrap();
                        loss.backward();
                        opt.reduce_grads(&model.params, &coll).unwrap();
                        let st = opt.step(&model.params.flat, &coll).unwrap();
                        assert!(st.clipped);
                        model.params.zero_grad();
                    }
                    (model.params.flat.detach().copy(), opt)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Sharded (ZeRO-2) and replicated optimizers take bit-identical steps on the CPU collectives: fp32 parameters
    /// (master = parameter slice) and bf16 (separate master, bf16 all-gather), shards with both weight-decay groups,
    /// and ranks whose shard is empty.
    #[test]
    fn sharded_steps_equal_replicated_bit_for_bit() {
        for (world, vocab, kind) in [
            (3, 4000, Kind::Float),
            (2, 4000, Kind::BFloat16),
            (4, 16, Kind::Float),
        ] {
            let rep = train_group(world, vocab, kind, false, 4);
            let sh = train_group(world, vocab, kind, true, 4);
            let layout = sh[0].1.layout();
            assert!(layout.is_sharded() && layout.shard % NORM_BLOCK == 0);
            if vocab == 16 {
                assert!(sh[world - 1].1.layout().is_empty(), "want an empty shard");
            }
            let start = rep[0].0.copy();
            for r in 0..world {
                assert!(
                    rep[r].0.equal(&rep[0].0) && sh[r].0.equal(&rep[0].0),
                    "{world} {kind:?} rank {r}"
                );
                let (a, b) = sh[r].1.layout().range();
                for (x, y) in [
                    (&sh[r].1.master, &rep[0].1.master),
                    (&sh[r].1.exp_avg, &rep[0].1.exp_avg),
                    (&sh[r].1.exp_avg_sq, &rep[0].1.exp_avg_sq),
                ] {
                    assert!(x.equal(&y.narrow(0, a, b - a)), "state of rank {r}");
                }
            }
            // And the weights did move (the comparison is not between two untouched models).
            let n = start.numel() as i64;
            let init = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.731)
                .sin()
                .g_mul_scalar(0.02)
                .to_kind(Kind::Float)
                .to_kind(kind);
            assert!(!init.equal(&start));
        }
    }

    /// A sharded state is saved (rank 0 streaming the others' slices) into the replicated file layout, and that file
    /// resumes replicated or sharded at another world size.
    #[test]
    fn sharded_state_saves_in_the_replicated_layout_and_loads_at_any_world() {
        let dir = tempfile::tempdir().unwrap();
        let (p_rep, p_sh) = (
            dir.path().join("rep.safetensors"),
            dir.path().join("sh.safetensors"),
        );
        let rep = train_group(2, 4000, Kind::BFloat16, false, 2);
        rep[0].1.save(&p_rep).unwrap();
        let sh = train_group(3, 4000, Kind::BFloat16, true, 2);
        assert!(
            sh[0].1.save(&p_sh).is_err(),
            "a sharded optimizer cannot save alone"
        );
        let handles: Vec<_> = InProcessCollective::group(3)
            .into_iter()
            .zip(sh)
            .map(|(coll, (_, opt))| {
                let p = (coll.rank() == 0).then(|| p_sh.clone());
                std::thread::spawn(move || opt.save_collective(p.as_deref(), &coll).unwrap())
            })
            .collect();
        let sizes: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(sizes[0] > 0 && sizes[1] == 0);
        // Same tensors (the replicated run is 2 ranks with other random gradients: compare the 3-rank sharded file
        // with a replicated 3-rank run's instead).
        let rep3 = train_group(3, 4000, Kind::BFloat16, false, 2);
        let p_rep3 = dir.path().join("rep3.safetensors");
        rep3[0].1.save(&p_rep3).unwrap();
        let (a, ma) = read_safetensors(&p_sh).unwrap();
        let (b, mb) = read_safetensors(&p_rep3).unwrap();
        assert_eq!(ma, mb);
        assert_eq!(a.len(), 3);
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert!(na == nb && ta.equal(tb), "{na}");
        }
        // Load the sharded file into 2 sharded ranks and into a replicated optimizer.
        let model = Llama::new(&LlamaConfig::tiny(4000), Device::Cpu, Kind::BFloat16, 99).unwrap();
        let mut whole = FlatAdamW::new(&model.params, cfg());
        whole.load(&p_sh, &model.params.flat).unwrap();
        assert_eq!(whole.step, 2);
        assert!(whole.master.equal(&rep3[0].1.master));
        assert!(model.params.flat.equal(&rep3[0].0));
        for r in 0..2 {
            let m = Llama::new(&LlamaConfig::tiny(4000), Device::Cpu, Kind::BFloat16, 5).unwrap();
            let mut o = FlatAdamW::sharded(&m.params, cfg(), r, 2);
            o.load(&p_sh, &m.params.flat).unwrap();
            let (a, b) = o.layout().range();
            assert!(o.exp_avg_sq.equal(&whole.exp_avg_sq.narrow(0, a, b - a)));
            // The whole model, not only this rank's slice (the other slices arrive by all-gather only after a step).
            assert!(m.params.flat.equal(&rep3[0].0), "parameters of rank {r}");
        }
        // The replicated 2-rank file is a valid input too.
        let mut again = FlatAdamW::sharded(&model.params, cfg(), 1, 2);
        again.load(&p_rep, &model.params.flat).unwrap();
    }

    /// A truncated or foreign optimizer file is refused with the file, the tensor and the reason.
    #[test]
    fn broken_state_files_are_named() {
        let model = Llama::new(&LlamaConfig::tiny(8), Device::Cpu, Kind::Float, 0).unwrap();
        let opt = FlatAdamW::new(&model.params, cfg());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("opt.safetensors");
        opt.save(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
        let mut o = FlatAdamW::new(&model.params, cfg());
        let e = o.load(&p, &model.params.flat).unwrap_err().to_string();
        assert!(
            e.contains("opt.safetensors") && e.contains("truncated"),
            "{e}"
        );
        let other = Llama::new(&LlamaConfig::tiny(16), Device::Cpu, Kind::Float, 0).unwrap();
        opt.save(&p).unwrap();
        let mut o = FlatAdamW::new(&other.params, cfg());
        let e = o.load(&p, &other.params.flat).unwrap_err().to_string();
        assert!(
            e.contains("another model") || e.contains("decay group"),
            "{e}"
        );
    }
}
