//! Fully sharded training (ZeRO-3 / FSDP): every rank keeps `1/world` of each sharding unit's weights (one unit per
//! transformer block, one for the embeddings, final norm and head; [`crate::ParamLayout`]) in the compute dtype, and
//! its optimizer ([`FlatAdamW::full`]) the fp32 master, moments and gradient of the same slices.
//!
//! A micro-batch ([`ShardedLlama::forward_backward`]) all-gathers unit 0, then each block as the forward reaches
//! it, and drops each block after its forward; the backward gathers each block again (in reverse, with per-layer
//! recomputation), and as soon as a unit's gradients are final they are reduce-scattered into the rank's fp32
//! slice and dropped. The optimizer step touches the rank's slices only; nothing is gathered after it (the next
//! forward gathers). Over the CPU collectives the all-gather copies bits and the reduce-scatter has the
//! all-reduce's arithmetic, and the units are computed by the same code as a replicated model's recomputation
//! ([`crate::unit_forward_backward`]), so a fully sharded run takes the same steps, bit for bit, as a replicated
//! or ZeRO-2 one.
//!
//! Not yet: prefetching unit `i + 1` on a side stream while unit `i` computes (the gathers are synchronous), and
//! building the slices without materialising the whole model once in host memory at start-up
//! ([`ShardedLlama::from_params`]; the trainer builds it on the host and moves only the slices to the GPU).

use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::collective::Collective;
use crate::error::{GpuError, Result};
use crate::model::{
    unit_forward_backward, unit_logits, Llama, LlamaConfig, ParamLayout, Params, UnitSource,
};
use crate::optim::FlatAdamW;

/// A model whose weights are sharded unit by unit over the ranks of a collective.
pub struct ShardedLlama {
    pub cfg: LlamaConfig,
    pub layout: ParamLayout,
    pub rank: usize,
    pub world: usize,
    /// This rank's slices of every unit in the compute dtype, unit after unit: unit `u`'s slice is
    /// `Unit::shard(world)` elements at [`unit_slice`](Self::unit_slice)`(u).0`, elements
    /// `[rank · s, (rank + 1) · s)` of the unit (zero past its end).
    pub local: Tensor,
    recompute: bool,
}

impl ShardedLlama {
    /// Rank `rank`'s slices of a whole model's parameters (same weights as the replicated model).
    pub fn from_params(
        cfg: &LlamaConfig,
        params: &Params,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        let layout = params.layout.clone();
        if layout != cfg.param_layout() {
            return Err(GpuError::Config(
                "sharding a model: its parameters are not laid out as its config says".into(),
            ));
        }
        let world = world.max(1);
        let flat = params.flat.detach();
        let n = layout.full_shard_numel(world);
        let local = Tensor::zeros([n], (flat.kind(), flat.device()));
        let _ng = tch::no_grad_guard();
        let mut off = 0;
        for u in &layout.units {
            let s = u.shard(world);
            let from = rank as i64 * s;
            let len = (u.numel - from).clamp(0, s);
            if len > 0 {
                local
                    .narrow(0, off, len)
                    .copy_(&flat.narrow(0, u.start + from, len));
            }
            off += s;
        }
        Ok(ShardedLlama {
            cfg: cfg.clone(),
            layout,
            rank,
            world,
            local,
            recompute: false,
        })
    }

    /// The same slices on `device` (a model built in host memory, moved to its GPU slice by slice).
    pub fn to_device(mut self, device: Device) -> Self {
        if self.local.device() != device {
            if device.is_cuda() {
                crate::init_cuda();
            }
            self.local = self.local.to_device(device);
        }
        self
    }

    /// See [`Llama::set_recompute`].
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    pub fn kind(&self) -> Kind {
        self.local.kind()
    }

    pub fn device(&self) -> Device {
        self.local.device()
    }

    /// Offset of unit `u`'s slice in [`local`](Self::local), and its length.
    pub fn unit_slice(&self, u: usize) -> (i64, i64) {
        let off = self.layout.units[..u]
            .iter()
            .map(|x| x.shard(self.world))
            .sum();
        (off, self.layout.units[u].shard(self.world))
    }

    /// The optimizer of this rank's slices.
    pub fn optimizer(&self, cfg: crate::AdamWConfig) -> FlatAdamW {
        FlatAdamW::full(&self.local, &self.layout, cfg, self.rank, self.world)
    }

    /// Unit `u` whole, gathered from every rank's slice: its parameters as leaves that require grad.
    pub fn gather_unit(&self, u: usize, coll: &dyn Collective) -> Result<Params> {
        self.check(coll)?;
        let (off, s) = self.unit_slice(u);
        let mut whole = Tensor::zeros([s * self.world as i64], (self.kind(), self.device()));
        coll.all_gather(&self.local.narrow(0, off, s), &mut whole)?;
        Ok(Params::views(whole, self.layout.unit_local(u)))
    }

    fn check(&self, coll: &dyn Collective) -> Result<()> {
        if coll.rank() != self.rank || coll.world_size() != self.world {
            return Err(GpuError::Collective {
                rank: coll.rank(),
                message: format!(
                    "model sharded as rank {} of {}, collective is rank {} of {}",
                    self.rank,
                    self.world,
                    coll.rank(),
                    coll.world_size()
                ),
            });
        }
        Ok(())
    }

    /// One micro-batch of training ([`Llama::forward_backward`]'s contract): every unit's gradient of
    /// `scale · Σ cross-entropy` is reduce-scattered (mean over ranks) into `opt`'s fp32 slice — replacing it
    /// (the step's first micro-batch) or adding to it (`accumulate`). Returns the rank's cross-entropy sum.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        scale: f64,
        opt: &mut FlatAdamW,
        coll: &dyn Collective,
        accumulate: bool,
    ) -> Result<Tensor> {
        let mut src = Gather {
            model: self,
            coll,
            reduce: Some((opt, accumulate)),
        };
        unit_forward_backward(&self.cfg, batch, scale, self.recompute, &mut src)
    }

    /// Logits `(B, T, V)` of a batch without a graph, gathering one unit at a time (every rank must call it).
    pub fn logits(&self, batch: &Batch, coll: &dyn Collective) -> Result<Tensor> {
        let mut src = Gather {
            model: self,
            coll,
            reduce: None,
        };
        unit_logits(&self.cfg, batch, &mut src)
    }

    /// The whole model, gathered on every rank (the memory of a replicated model: decoding).
    pub fn gather_all(&self, coll: &dyn Collective) -> Result<Llama> {
        let m = self.gather_whole(coll, self.device(), None)?;
        Ok(m.expect("every rank receives"))
    }

    /// The whole model on `device` of rank `root` (every rank when `None`), gathered one unit at a time: the others
    /// take part in the gathers and get `None`. A checkpoint gathers onto rank 0's host memory, so no GPU ever holds
    /// more than one gathered unit.
    pub fn gather_whole(
        &self,
        coll: &dyn Collective,
        device: Device,
        root: Option<usize>,
    ) -> Result<Option<Llama>> {
        let receives = root.is_none_or(|r| r == self.rank);
        let flat = receives.then(|| Tensor::zeros([self.layout.total], (self.kind(), device)));
        let _ng = tch::no_grad_guard();
        for (u, unit) in self.layout.units.iter().enumerate() {
            let p = self.gather_unit(u, coll)?;
            if let Some(f) = &flat {
                f.narrow(0, unit.start, unit.numel)
                    .copy_(&p.flat.narrow(0, 0, unit.numel));
            }
        }
        flat.map(|f| {
            let mut m = Llama::from_flat(&self.cfg, f)?;
            m.set_recompute(self.recompute);
            Ok(m)
        })
        .transpose()
    }
}

/// The units of a [`ShardedLlama`]: all-gathered on demand; gradients reduce-scattered into the optimizer.
struct Gather<'a> {
    model: &'a ShardedLlama,
    coll: &'a dyn Collective,
    reduce: Option<(&'a mut FlatAdamW, bool)>,
}

impl UnitSource for Gather<'_> {
    fn gather(&mut self, u: usize) -> Result<Params> {
        self.model.gather_unit(u, self.coll)
    }

    fn reduced(&mut self, u: usize, params: &Params) -> Result<()> {
        let Some((opt, accumulate)) = self.reduce.as_mut() else {
            return Ok(());
        };
        let _ng = tch::no_grad_guard();
        // The unit's gradient in its gathered layout, fp32, padding zero.
        let n = params.flat.numel() as i64;
        let grads = Tensor::zeros([n], (Kind::Float, params.flat.device()));
        for p in &params.params {
            let g = p.tensor.grad();
            if g.defined() {
                grads.narrow(0, p.offset, p.numel).copy_(&g.reshape([-1]));
            }
        }
        opt.reduce_unit(u, &grads, self.coll, *accumulate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SequenceRef;
    use crate::{AdamWConfig, InProcessCollective};

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Mode {
        Replicated,
        Zero2,
        Full,
        /// Fully sharded with the optimizer state in host memory.
        FullOffload,
    }

    /// What a run of `steps` steps gives: the losses of every rank and step, the final whole weights.
    struct Outcome {
        losses: Vec<Vec<u64>>,
        weights: Tensor,
        norms: Vec<f64>,
    }

    /// Rank `rank`'s micro-batch `k` of step `step`: two packed rows of deterministic tokens.
    fn batch(vocab: usize, rank: usize, step: usize, k: usize) -> Batch {
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|r| {
                (0..24)
                    .map(|i| ((i * 7 + rank * 13 + step * 5 + k * 3 + r * 11) % vocab) as u32)
                    .collect()
            })
            .collect();
        let refs: Vec<SequenceRef<'_>> = rows
            .iter()
            .map(|t| SequenceRef {
                tokens: t,
                padding: 3,
                doc_starts: &[0, 9],
                no_loss: &[],
            })
            .collect();
        Batch::new(&refs, Device::Cpu).unwrap()
    }

    /// `world` in-process ranks train `cfg` for `steps` steps of `accum` micro-batches, as the trainer does.
    fn train(
        cfg: &LlamaConfig,
        kind: Kind,
        world: usize,
        mode: Mode,
        recompute: bool,
        accum: usize,
        steps: usize,
    ) -> Outcome {
        let adamw = AdamWConfig {
            lr: 1e-2,
            min_lr: 1e-2,
            warmup_steps: 1,
            grad_clip: 0.05,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let handles: Vec<_> = InProcessCollective::group(world)
            .into_iter()
            .map(|coll| {
                let (cfg, adamw) = (cfg.clone(), adamw.clone());
                std::thread::spawn(move || {
                    let rank = coll.rank();
                    let mut whole = Llama::new(&cfg, Device::Cpu, kind, 11).unwrap();
                    whole.set_recompute(recompute);
                    let full = matches!(mode, Mode::Full | Mode::FullOffload);
                    let mut sharded = full.then(|| {
                        let mut m =
                            ShardedLlama::from_params(&cfg, &whole.params, rank, world).unwrap();
                        m.set_recompute(recompute);
                        m
                    });
                    let mut opt = match mode {
                        Mode::Replicated => FlatAdamW::new(&whole.params, adamw),
                        Mode::Zero2 => FlatAdamW::sharded(&whole.params, adamw, rank, world),
                        Mode::Full => sharded.as_ref().unwrap().optimizer(adamw),
                        Mode::FullOffload => {
                            let o = sharded
                                .as_ref()
                                .unwrap()
                                .optimizer(adamw)
                                .offload()
                                .unwrap();
                            assert!(
                                o.is_offloaded()
                                    && o.master.data_ptr()
                                        != sharded.as_ref().unwrap().local.data_ptr()
                            );
                            o
                        }
                    };
                    let (mut losses, mut norms) = (Vec::new(), Vec::new());
                    for step in 0..steps {
                        let mut sum = 0.0;
                        for k in 0..accum {
                            let b = batch(cfg.vocab_size, rank, step, k);
                            let scale = world as f64 / 1000.0;
                            let loss = match sharded.as_mut() {
                                Some(m) => m.forward_backward(&b, scale, &mut opt, &coll, k > 0),
                                None => {
                                    let l = whole.forward_backward(&b, scale);
                                    if k + 1 < accum {
                                        opt.accumulate_micro_batch(&mut whole.params, &coll)
                                            .unwrap();
                                    }
                                    Ok(l)
                                }
                            }
                            .unwrap();
                            sum += loss.double_value(&[]);
                        }
                        let st = match &sharded {
                            Some(m) => opt.step(&m.local, &coll).unwrap(),
                            None => {
                                opt.reduce_grads(&whole.params, &coll).unwrap();
                                let st = opt.step(&whole.params.flat, &coll).unwrap();
                                whole.params.zero_grad();
                                st
                            }
                        };
                        losses.push(sum.to_bits());
                        norms.push(st.grad_norm);
                    }
                    let weights = match &sharded {
                        Some(m) => m.gather_all(&coll).unwrap().params.flat.detach(),
                        None => whole.params.flat.detach(),
                    };
                    (losses, weights, norms)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (_, w, _) in &out[1..] {
            assert!(
                w.equal(&out[0].1),
                "{mode:?}: ranks disagree on the weights"
            );
        }
        Outcome {
            losses: out.iter().map(|(l, _, _)| l.clone()).collect(),
            weights: out[0].1.shallow_clone(),
            norms: out[0].2.clone(),
        }
    }

    fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
        assert_eq!(a.losses, b.losses, "{what}: loss bits");
        assert_eq!(a.norms, b.norms, "{what}: gradient norms");
        assert!(a.weights.equal(&b.weights), "{what}: final weights");
    }

    /// Full sharding takes the replicated run's steps bit for bit (fp32 and bf16, recomputation on and off, 2 and
    /// 4 ranks), and ZeRO-2's with gradient accumulation (both reduce each micro-batch; a replicated run sums the
    /// micro-batches before its one all-reduce, which rounds differently: equal to ~1e-6 only).
    #[test]
    fn full_sharding_equals_replicated_and_zero2_bit_for_bit() {
        let tiny = LlamaConfig::tiny(96);
        for (world, kind, recompute) in [
            (2, Kind::Float, false),
            (2, Kind::Float, true),
            (4, Kind::BFloat16, true),
            (4, Kind::Float, false),
        ] {
            let what = format!("tiny, {world} ranks, {kind:?}, recompute {recompute}");
            let rep = train(&tiny, kind, world, Mode::Replicated, recompute, 1, 3);
            let full = train(&tiny, kind, world, Mode::Full, recompute, 1, 3);
            assert_same(&full, &rep, &what);
            let offload = train(&tiny, kind, world, Mode::FullOffload, recompute, 1, 3);
            assert_same(&offload, &rep, &format!("{what}, offloaded"));
            let moved = (&rep.weights
                - Llama::new(&tiny, Device::Cpu, kind, 11)
                    .unwrap()
                    .params
                    .flat)
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                moved > 1e-3,
                "{what}: training moved the weights by {moved}"
            );
        }
        // A 125m-shaped model (12 heads of 64, MLP 3072) with two layers and a small vocabulary.
        let mid = LlamaConfig {
            num_hidden_layers: 2,
            vocab_size: 512,
            ..LlamaConfig::llama_125m()
        };
        for recompute in [false, true] {
            let what = format!("125m-shaped, 2 ranks, recompute {recompute}");
            let rep = train(&mid, Kind::Float, 2, Mode::Replicated, recompute, 1, 2);
            let full = train(&mid, Kind::Float, 2, Mode::Full, recompute, 1, 2);
            assert_same(&full, &rep, &what);
        }
        for (kind, recompute) in [(Kind::Float, false), (Kind::BFloat16, true)] {
            let what = format!("tiny, 2 ranks, 3 micro-batches, {kind:?}, recompute {recompute}");
            let z2 = train(&tiny, kind, 2, Mode::Zero2, recompute, 3, 2);
            let full = train(&tiny, kind, 2, Mode::Full, recompute, 3, 2);
            assert_same(&full, &z2, &what);
            let offload = train(&tiny, kind, 2, Mode::FullOffload, recompute, 3, 2);
            assert_same(&offload, &z2, &format!("{what}, offloaded"));
            let rep = train(&tiny, kind, 2, Mode::Replicated, recompute, 3, 2);
            assert_eq!(full.losses[0][0], rep.losses[0][0], "{what}: first loss");
            let d = (&full.weights - &rep.weights).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{what}: vs replicated {d}");
        }
    }
}
