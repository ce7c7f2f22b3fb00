//! The step loop of a trainer rank (torchtitan's `train_step`): receive the rank's sequences of a global step, vote
//! with the other ranks on whether everyone has a full step, forward/backward every micro-batch, reduce the
//! gradients, take the optimizer step, record it; evaluate and checkpoint on schedule.
//!
//! A global step consumes `world × micro_batch × grad_accum` sequences in global-index order (the shard writer deals
//! sequence `i` to rank `i % world`). Before each step the ranks vote (one small all-reduce) on whether every rank has
//! a full step and on the number of non-padding targets in it; the loss of each micro-batch is its token sum divided
//! by that global count, so any split over ranks and micro-batches gives the same gradient. A rank stops after
//! `steps` steps or when any rank's input ends (a partial last step is discarded on every rank).

use std::sync::Arc;
use std::time::Instant;

use lexflow_dataflow::{ActorContext, EdgeReceiver};
use lexflow_gpu::checkpoint;
use lexflow_gpu::plan::ShardMode;
use lexflow_gpu::{
    valid_targets, Batch, Collective, FlatAdamW, Llama, LlamaConfig, SequenceRef, ShardedLlama,
    StepStats,
};
use tch::{Device, Kind};

use super::checkpoint::{BatchSegment, ResumeInfo};
use super::memory::{
    activation_bytes, check_fits, needs_recompute, peak_flops, process_rss_bytes, rank_spec,
    Sharding,
};
use super::model::{model_config, Weights};
use super::records::{append_step_record, sequence_hash, StepRecord};
use super::schedule::schedule;
use super::setup::{RankResult, TrainerError, TrainerSetup};
use crate::common::device::seq_ref;
use crate::config::Recompute;
use crate::types::{PackedSequence, ResumePoint};
use lexflow_gpu::plan::plan;

pub(super) struct Rank<'a> {
    pub(super) ctx: &'a ActorContext,
    pub(super) setup: &'a TrainerSetup,
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) device: Device,
    pub(super) coll: Box<dyn Collective>,
    /// The run's global batches so far, this run's last ([`BatchSegment`]).
    pub(super) batches: Vec<BatchSegment>,
}

impl<'a> Rank<'a> {
    pub(super) fn new(
        ctx: &'a ActorContext,
        setup: &'a TrainerSetup,
        rank: usize,
        world: usize,
        device: Device,
        coll: Box<dyn Collective>,
    ) -> Self {
        Rank {
            ctx,
            setup,
            rank,
            world,
            device,
            coll,
            batches: Vec::new(),
        }
    }

    // `is_multiple_of` needs Rust 1.87; the workspace promises 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub(super) fn run(
        &mut self,
        rx: &EdgeReceiver<PackedSequence>,
        resume: Option<&ResumeInfo>,
    ) -> Result<RankResult, TrainerError> {
        let cfg = &self.setup.cfg;
        let (mut model, mut opt, mcfg, kind) = self.build_model(resume)?;
        let mut result = RankResult::default();
        if let Some(r) = resume {
            load_optimizer(&mut opt, &model, r)?;
            result.resumed_from_step = Some(r.step);
            result.best = r.best.clone();
        }
        self.extend_batch_history(resume);
        let mut s = StepLoop::new(self, &mcfg, kind, opt.step, resume, result);
        while opt.step < cfg.steps {
            let step = opt.step + 1;
            self.ctx.set_input(format!("step {step}"));
            if s.profile_steps.is_some_and(|(a, _)| a == step) {
                s.profiler = Some(lexflow_gpu::ops::Profiler::start(self.device.is_cuda())?);
            }
            let t_step = Instant::now();
            self.receive(rx, &mut s);
            let Some(n_valid) = self.vote(&s.seqs, s.per_rank, opt.step)? else {
                break;
            };
            let (loss, st) = self.train_step(&mut model, &mut opt, &mut s, n_valid, step)?;
            s.result.losses.push(loss);
            s.result.steps = opt.step;
            if s.profile_steps.is_some_and(|(_, b)| b == step) {
                self.stop_profiler(&mut s)?;
            }
            self.record_step(&mut s, step, loss, &st, t_step);
            if let Some(e) = self.setup.eval.as_ref().filter(|e| e.every > 0) {
                if step % e.every == 0 {
                    self.evaluate(&model, e, step, &mut s.result)?;
                    s.last_eval = step;
                }
            }
            if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 {
                let data = s.last_resume.as_deref();
                self.checkpoint(&model, &opt, &mcfg, Some(loss), data, &mut s.result)?;
                s.last_ckpt = step;
            }
        }
        self.finish(&model, &opt, &mcfg, s)
    }

    /// The model (dtype, recomputation, `train.init_from`'s weights) and its optimizer, as `[train]` asks; the
    /// same weights on every rank (rank 0's), whole or (`train.shard = "full"`) this rank's slices of them.
    fn build_model(
        &self,
        resume: Option<&ResumeInfo>,
    ) -> Result<(Weights, FlatAdamW, LlamaConfig, Kind), TrainerError> {
        let cfg = &self.setup.cfg;
        // `train.dtype`: auto = bf16 on CUDA, fp32 on CPU (the optimizer state is fp32 either way).
        let kind = if cfg.dtype.is_bf16(self.device.is_cuda()) {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let mcfg = model_config(self.setup)?;
        let recompute = self.plan_recompute(&mcfg, kind)?;
        let mode = cfg.shard_mode();
        // Fully sharded: the whole model is built (and loaded) in host memory, and only this rank's slices go to
        // the device — a 70B model never has to fit one GPU.
        let build_on = if mode == ShardMode::Full {
            Device::Cpu
        } else {
            self.device
        };
        let mut model = Llama::new(&mcfg, build_on, kind, self.setup.seed)?;
        model.set_recompute(recompute);
        if let Some(dir) = &cfg.init_from {
            model
                .params
                .load_named(checkpoint::read_hf_weights(dir)?, mcfg.tie_word_embeddings)?;
            if self.rank == 0 && resume.is_none() {
                tracing::info!(
                    from = %dir.display(),
                    parameters = mcfg.num_params(),
                    "train.init_from: weights loaded"
                );
            }
        }
        // Ranks start from identical weights whatever their RNG did. (Fully sharded, each rank keeps only its
        // slices of its copy: there is one model whatever the copies were; they are the same anyway, from one seed
        // drawn on the host or one file.)
        if mode != ShardMode::Full {
            self.coll.broadcast(&mut model.params.flat.detach(), 0)?;
        }
        let (weights, opt) = match mode {
            ShardMode::None => {
                let opt = FlatAdamW::new(&model.params, schedule(cfg));
                (Weights::Whole(model), opt)
            }
            ShardMode::Optimizer => {
                let opt = FlatAdamW::sharded(&model.params, schedule(cfg), self.rank, self.world);
                (Weights::Whole(model), opt)
            }
            ShardMode::Full => {
                let mut sharded =
                    ShardedLlama::from_params(&mcfg, &model.params, self.rank, self.world)?
                        .to_device(self.device);
                sharded.set_recompute(recompute);
                drop(model);
                let mut opt = sharded.optimizer(schedule(cfg));
                if cfg.offload_optimizer {
                    opt = opt.offload()?;
                }
                (Weights::Sharded(sharded), opt)
            }
        };
        if self.rank == 0 && mode != ShardMode::None {
            let l = opt.layout();
            tracing::info!(
                world = l.world,
                shard_elements = l.shard,
                mode = mode.name(),
                offload = opt.is_offloaded(),
                "train.shard = \"{}\": {} sharded across ranks{}",
                mode.name(),
                if mode == ShardMode::Full {
                    "weights, gradients and AdamW state"
                } else {
                    "AdamW state and reduced gradients"
                },
                if opt.is_offloaded() {
                    "; the fp32 AdamW state offloaded to host memory"
                } else {
                    ""
                }
            );
        }
        Ok((weights, opt, mcfg, kind))
    }

    /// Whether to recompute activations: `train.recompute`, or with `auto` on a GPU, whether the step would not fit
    /// otherwise; refuses a model whose training state cannot fit the GPU at all ([`check_fits`]).
    fn plan_recompute(&self, mcfg: &LlamaConfig, kind: Kind) -> Result<bool, TrainerError> {
        let cfg = &self.setup.cfg;
        let elt = if kind == Kind::BFloat16 { 2 } else { 4 };
        let mut recompute = cfg.recompute == Recompute::On;
        let sh = Sharding::new(cfg.shard_mode(), self.world, cfg.offload_optimizer);
        if let Device::Cuda(ordinal) = self.device {
            if let Some(total) = lexflow_gpu::cuda_memory_total(ordinal) {
                check_fits(
                    mcfg,
                    elt,
                    total,
                    ordinal,
                    sh,
                    cfg.recompute != Recompute::Off,
                )?;
                if cfg.recompute == Recompute::Auto {
                    let tokens = (cfg.micro_batch.get() * self.setup.seq_len) as u64;
                    let act = activation_bytes(mcfg, tokens, elt);
                    // The state without recomputation (fully sharded, it keeps every gathered block).
                    let need = plan(&rank_spec(mcfg, elt, sh, 0, false)).device.state();
                    recompute = needs_recompute(need, act, total);
                    if self.rank == 0 {
                        tracing::info!(
                            recompute,
                            state_gib = format!("{:.1}", need as f64 / (1u64 << 30) as f64),
                            activations_gib = format!("{:.1}", act as f64 / (1u64 << 30) as f64),
                            device_gib = format!("{:.1}", total as f64 / (1u64 << 30) as f64),
                            "train.recompute = \"auto\": estimated memory of a step"
                        );
                    }
                }
            }
        }
        Ok(recompute)
    }

    /// The run's global batches so far ([`BatchSegment`]), with this run's appended when it differs from the last.
    fn extend_batch_history(&mut self, resume: Option<&ResumeInfo>) {
        let cfg = &self.setup.cfg;
        let here = BatchSegment {
            from_step: resume.map_or(0, |r| r.step),
            sequences_before: resume.map_or(0, |r| r.sequences_consumed),
            global_batch: (self.world * cfg.micro_batch.get() * cfg.grad_accum.get()) as u64,
            world_size: self.world,
        };
        self.batches = resume.map_or_else(Vec::new, |r| r.batches.clone());
        match self.batches.last() {
            Some(l) if l.global_batch == here.global_batch && l.world_size == here.world_size => {}
            _ => self.batches.push(here),
        }
    }

    /// This rank's sequences of the next step (fewer when the input ended), and the time it waited for them.
    fn receive(&self, rx: &EdgeReceiver<PackedSequence>, s: &mut StepLoop) {
        s.seqs.clear();
        let mut wait = 0.0;
        while s.seqs.len() < s.per_rank {
            let (r, waited) = rx.recv_timed();
            wait += waited.as_secs_f64();
            match r {
                Ok(seq) => s.seqs.push(seq),
                Err(_) => break,
            }
        }
        s.result.wait_seconds += wait;
        lexflow_metrics::global()
            .trainer_data_wait_seconds
            .with_label_values(&[&s.label])
            .inc_by(wait);
    }

    /// The ranks' vote before a step: does every rank have a full step (and no stop was requested)? Returns the
    /// global number of targets of the step, None when training stops.
    fn vote(
        &self,
        seqs: &[PackedSequence],
        per_rank: usize,
        done_steps: u64,
    ) -> Result<Option<f64>, TrainerError> {
        let full = seqs.len() == per_rank && !self.ctx.should_stop();
        let local_valid: i64 = seqs.iter().map(|s| valid_targets(&seq_ref(s))).sum();
        let mut vote = [if full { 1.0 } else { 0.0 }, local_valid as f64];
        self.coll.all_reduce_sum_f64(&mut vote, self.device)?;
        if vote[0] < self.world as f64 {
            tracing::info!(
                rank = self.rank,
                step = done_steps,
                "input ended or stop requested: training stops"
            );
            return Ok(None);
        }
        Ok(Some(vote[1].max(1.0)))
    }

    /// Forward and backward of every micro-batch, the gradients' reduction and the optimizer step; returns the
    /// step's global loss (per target) and what the optimizer did.
    fn train_step(
        &self,
        model: &mut Weights,
        opt: &mut FlatAdamW,
        s: &mut StepLoop,
        n_valid: f64,
        step: u64,
    ) -> Result<(f64, StepStats), TrainerError> {
        // The loss stays on the device until the step is done: no host sync per micro-batch.
        let mut loss_acc: Option<tch::Tensor> = None;
        let n_chunks = s.seqs.len().div_ceil(s.mb);
        for (i, chunk) in s.seqs.chunks(s.mb).enumerate() {
            let rows: Vec<SequenceRef<'_>> = chunk.iter().map(seq_ref).collect();
            let batch = Batch::new(&rows, self.device)?;
            // Gradient of (sum over all ranks' targets) / n_valid after the mean all-reduce.
            let scale = self.world as f64 / n_valid;
            let loss = match model {
                Weights::Whole(m) => {
                    if self.rank == 0 && !s.attention_logged && batch.segments.is_some() {
                        s.attention_logged = true;
                        tracing::info!(
                            path = m.attention_path(&batch),
                            "packed documents: block-diagonal causal attention"
                        );
                    }
                    let loss = m.forward_backward(&batch, scale);
                    // bf16 parameters (or sharded state): the micro-batches' gradients sum in the optimizer's fp32
                    // buffer, not in bf16.
                    if i + 1 < n_chunks {
                        opt.accumulate_micro_batch(&mut m.params, &*self.coll)?;
                    }
                    loss
                }
                // Each unit's gradient is reduce-scattered into the fp32 slice as soon as it is final.
                Weights::Sharded(m) => {
                    m.forward_backward(&batch, scale, opt, &*self.coll, i > 0)?
                }
            };
            loss_acc = Some(match loss_acc {
                Some(acc) => acc + loss.to_kind(Kind::Double),
                None => loss.to_kind(Kind::Double),
            });
        }
        if let Weights::Whole(m) = model {
            opt.reduce_grads(&m.params, &*self.coll)?;
        }
        let st = opt.step(model.target(), &*self.coll)?;
        // Read after the optimizer is enqueued (its gradient-norm read-back already waited for the device).
        let loss_sum = loss_acc.map_or(0.0, |l| l.double_value(&[]));
        if let Weights::Whole(m) = model {
            m.params.zero_grad();
        }
        let mut lv = [loss_sum];
        self.coll.all_reduce_sum_f64(&mut lv, self.device)?;
        let loss = lv[0] / n_valid;
        if !loss.is_finite() {
            return Err(TrainerError::Setup(format!(
                "loss is {loss} at step {step}"
            )));
        }
        Ok((loss, st))
    }

    /// `LEXFLOW_PROFILE_STEPS`: the last profiled step is done, write the trace.
    fn stop_profiler(&self, s: &mut StepLoop) -> Result<(), TrainerError> {
        if let Some(p) = s.profiler.take() {
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
            let dir = self.setup.run_dir.join("profile");
            std::fs::create_dir_all(&dir).map_err(|e| {
                TrainerError::Setup(format!("{}: cannot create: {e}", dir.display()))
            })?;
            let path = dir.join(format!("trace-rank{}.json", self.rank));
            p.stop(&path)?;
            tracing::info!(path = %path.display(), "profiler trace written");
        }
        Ok(())
    }

    /// After a step: its record in `steps.jsonl`, the trainer's metrics, the log line.
    // `is_multiple_of` needs Rust 1.87; the workspace promises 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    fn record_step(&self, s: &mut StepLoop, step: u64, loss: f64, st: &StepStats, t_step: Instant) {
        if let Some(rp) = s.seqs.last().and_then(|q| q.resume.clone()) {
            s.last_resume = Some(rp);
        }
        append_step_record(
            &self.setup.run_dir,
            &StepRecord {
                step,
                rank: self.rank,
                loss,
                sequences: s
                    .seqs
                    .iter()
                    .map(|q| (q.index, sequence_hash(&q.tokens)))
                    .collect(),
            },
        );
        let m = lexflow_metrics::global();
        let label = &s.label;
        let secs = t_step.elapsed().as_secs_f64();
        let tokens = (s.per_rank * self.setup.seq_len) as u64;
        s.result.tokens += tokens;
        let tps = tokens as f64 / secs.max(1e-9);
        m.trainer_steps.with_label_values(&[label]).inc();
        m.trainer_tokens.with_label_values(&[label]).inc_by(tokens);
        m.trainer_tokens_per_second
            .with_label_values(&[label])
            .set(tps);
        m.trainer_step_seconds
            .with_label_values(&[label])
            .observe(secs);
        m.trainer_loss.with_label_values(&[label]).set(loss);
        m.trainer_lr.with_label_values(&[label]).set(st.lr);
        m.trainer_grad_norm
            .with_label_values(&[label])
            .set(st.grad_norm);
        let elapsed = s.start.elapsed().as_secs_f64() - s.result.eval_seconds;
        m.trainer_data_wait_fraction
            .with_label_values(&[label])
            .set(s.result.wait_seconds / elapsed.max(1e-9));
        s.lat.record(t_step.elapsed());
        let mem = if self.device.is_cuda() {
            lexflow_gpu::cuda_memory_used().map(|b| b as i64)
        } else {
            process_rss_bytes()
        };
        if let Some(bytes) = mem {
            m.trainer_device_memory
                .with_label_values(&[label])
                .set(bytes);
        }
        if let Some(p) = s.peak {
            m.trainer_mfu
                .with_label_values(&[label])
                .set(tps * s.flops_per_token / p);
        }
        let steps = self.setup.cfg.steps;
        if self.rank == 0 && (step == 1 || step % 10 == 0 || step == steps) {
            tracing::info!(
                step,
                loss = format!("{loss:.4}"),
                lr = format!("{:.3e}", st.lr),
                grad_norm = format!("{:.3}", st.grad_norm),
                tokens_per_s = format!("{:.0}", tps * self.world as f64),
                "train step"
            );
        }
    }

    /// After the last step (also when the input ended early): the final evaluation and checkpoint, unless a stop was
    /// requested or they were just taken.
    fn finish(
        &self,
        model: &Weights,
        opt: &FlatAdamW,
        mcfg: &LlamaConfig,
        mut s: StepLoop,
    ) -> Result<RankResult, TrainerError> {
        if let Some(e) = &self.setup.eval {
            if opt.step > s.last_eval && !self.ctx.should_stop() {
                self.evaluate(model, e, opt.step, &mut s.result)?;
            }
        }
        // Training time only: evaluations are reported on their own.
        s.result.seconds = s.start.elapsed().as_secs_f64() - s.result.eval_seconds;
        if opt.step > s.last_ckpt {
            let last = s.result.losses.last().copied();
            let data = s.last_resume.as_deref();
            self.checkpoint(model, opt, mcfg, last, data, &mut s.result)?;
        }
        s.result.steps = opt.step;
        s.result.sequences_consumed = BatchSegment::consumed_at(&self.batches, opt.step);
        Ok(s.result)
    }
}

/// A resumed run's optimizer state, which must be at the checkpoint's step.
fn load_optimizer(
    opt: &mut FlatAdamW,
    model: &Weights,
    r: &ResumeInfo,
) -> Result<(), TrainerError> {
    opt.load_dir(&r.checkpoint, model.target())?;
    if opt.step != r.step {
        return Err(TrainerError::Checkpoint {
            path: r.checkpoint.clone(),
            message: format!(
                "optimizer is at step {}, trainer_state at {}",
                opt.step, r.step
            ),
        });
    }
    Ok(())
}

/// What the step loop of a rank carries from one step to the next, and the constants it measures with.
struct StepLoop {
    /// Sequences per micro-batch, and per rank and step.
    mb: usize,
    per_rank: usize,
    label: String,
    flops_per_token: f64,
    peak: Option<f64>,
    lat: lexflow_metrics::LatencyRecorder,
    last_ckpt: u64,
    last_eval: u64,
    start: Instant,
    seqs: Vec<PackedSequence>,
    /// Resume point of the last sequence this rank trained on (rank 0's goes into checkpoints).
    last_resume: Option<Arc<ResumePoint>>,
    profile_steps: Option<(u64, u64)>,
    profiler: Option<lexflow_gpu::ops::Profiler>,
    attention_logged: bool,
    result: RankResult,
}

impl StepLoop {
    fn new(
        rank: &Rank<'_>,
        mcfg: &LlamaConfig,
        kind: Kind,
        step: u64,
        resume: Option<&ResumeInfo>,
        result: RankResult,
    ) -> Self {
        let cfg = &rank.setup.cfg;
        let (mb, ga) = (cfg.micro_batch.get(), cfg.grad_accum.get());
        let per_rank = mb * ga;
        let flops_per_token = mcfg.train_flops_per_token(rank.setup.seq_len);
        let peak = peak_flops(rank.device, kind);
        let lat = lexflow_metrics::latency("trainer");
        StepLoop {
            mb,
            per_rank,
            label: rank.rank.to_string(),
            flops_per_token,
            peak,
            lat,
            last_ckpt: step,
            last_eval: step,
            start: Instant::now(),
            seqs: Vec::with_capacity(per_rank),
            last_resume: resume.and_then(|r| r.data.clone().map(Arc::new)),
            // `LEXFLOW_PROFILE_STEPS=A..B`: rank 0 records steps A to B with libtorch's profiler (Kineto; every CUDA
            // kernel on a GPU) into run_dir/profile/trace-rank0.json (bench/gpu/kernels.py summarises it).
            profile_steps: if rank.rank == 0 {
                profile_steps_from_env()
            } else {
                None
            },
            profiler: None,
            attention_logged: false,
            result,
        }
    }
}

/// `LEXFLOW_PROFILE_STEPS=A..B` (inclusive, 1-based) or `=A` (one step); anything else is ignored with a warning.
pub(super) fn profile_steps_from_env() -> Option<(u64, u64)> {
    let v = std::env::var("LEXFLOW_PROFILE_STEPS").ok()?;
    let parsed = match v.split_once("..") {
        Some((a, b)) => a.trim().parse().ok().zip(b.trim().parse().ok()),
        None => v.trim().parse().ok().map(|a| (a, a)),
    };
    match parsed {
        Some((a, b)) if a >= 1 && a <= b => Some((a, b)),
        _ => {
            tracing::warn!("LEXFLOW_PROFILE_STEPS={v:?} is not A..B with 1 <= A <= B: no profile");
            None
        }
    }
}
