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
use lexflow_gpu::{valid_targets, Batch, Collective, FlatAdamW, Llama, SequenceRef};
use tch::{Device, Kind};

use super::checkpoint::{BatchSegment, ResumeInfo};
use super::memory::{activation_bytes, check_fits, needs_recompute, peak_flops, process_rss_bytes};
use super::model::model_config;
use super::records::{append_step_record, sequence_hash, StepRecord};
use super::schedule::schedule;
use super::setup::{RankResult, TrainerError, TrainerSetup};
use crate::common::device::seq_ref;
use crate::config::Recompute;
use crate::types::{PackedSequence, ResumePoint};

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
        let label = self.rank.to_string();
        let m = lexflow_metrics::global();
        // `train.dtype`: auto = bf16 on CUDA, fp32 on CPU (the optimizer state is fp32 either way).
        let kind = if cfg.dtype.is_bf16(self.device.is_cuda()) {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let mcfg = model_config(self.setup)?;
        let elt = if kind == Kind::BFloat16 { 2 } else { 4 };
        let mut recompute = cfg.recompute == Recompute::On;
        let shards = if cfg.shard_optimizer { self.world } else { 1 };
        if let Device::Cuda(ordinal) = self.device {
            if let Some(total) = lexflow_gpu::cuda_memory_total(ordinal) {
                let need = check_fits(&mcfg, elt, total, ordinal, shards)?;
                if cfg.recompute == Recompute::Auto {
                    let tokens = (cfg.micro_batch.get() * self.setup.seq_len) as u64;
                    let act = activation_bytes(&mcfg, tokens, elt);
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
        let mut model = Llama::new(&mcfg, self.device, kind, self.setup.seed)?;
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
        let mut opt = if cfg.shard_optimizer {
            FlatAdamW::sharded(&model.params, schedule(cfg), self.rank, self.world)
        } else {
            FlatAdamW::new(&model.params, schedule(cfg))
        };
        if self.rank == 0 && opt.layout().is_sharded() {
            let l = opt.layout();
            tracing::info!(
                world = l.world,
                shard_elements = l.shard,
                "train.shard_optimizer: AdamW state and reduced gradients sharded across ranks"
            );
        }
        let mut result = RankResult::default();
        if let Some(r) = resume {
            opt.load(&r.checkpoint.join("optimizer.safetensors"), &model.params)?;
            if opt.step != r.step {
                return Err(TrainerError::Checkpoint {
                    path: r.checkpoint.clone(),
                    message: format!(
                        "optimizer is at step {}, trainer_state at {}",
                        opt.step, r.step
                    ),
                });
            }
            result.resumed_from_step = Some(r.step);
        }
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
        // Ranks start from identical weights whatever their RNG did.
        self.coll.broadcast(&mut model.params.flat.detach(), 0)?;

        let (mb, ga) = (cfg.micro_batch.get(), cfg.grad_accum.get());
        let per_rank = mb * ga;
        let flops_per_token = mcfg.train_flops_per_token(self.setup.seq_len);
        let peak = peak_flops(self.device, kind);
        let lat = lexflow_metrics::latency("trainer");
        let mut last_ckpt = opt.step;
        let mut last_eval = opt.step;
        let start = Instant::now();
        let mut seqs: Vec<PackedSequence> = Vec::with_capacity(per_rank);
        // Resume point of the last sequence this rank trained on (rank 0's goes into checkpoints).
        let mut last_resume: Option<Arc<ResumePoint>> =
            resume.and_then(|r| r.data.clone().map(Arc::new));
        // `LEXFLOW_PROFILE_STEPS=A..B`: rank 0 records steps A to B with libtorch's profiler (Kineto; every CUDA
        // kernel on a GPU) into run_dir/profile/trace-rank0.json (bench/gpu/kernels.py summarises it).
        let profile_steps = if self.rank == 0 {
            profile_steps_from_env()
        } else {
            None
        };
        let mut profiler: Option<lexflow_gpu::ops::Profiler> = None;
        let mut attention_logged = false;
        while opt.step < cfg.steps {
            let step = opt.step + 1;
            self.ctx.set_input(format!("step {step}"));
            if profile_steps.is_some_and(|(a, _)| a == step) {
                profiler = Some(lexflow_gpu::ops::Profiler::start(self.device.is_cuda())?);
            }
            let t_step = Instant::now();
            seqs.clear();
            let mut wait = 0.0;
            while seqs.len() < per_rank {
                let (r, waited) = rx.recv_timed();
                wait += waited.as_secs_f64();
                match r {
                    Ok(s) => seqs.push(s),
                    Err(_) => break,
                }
            }
            result.wait_seconds += wait;
            m.trainer_data_wait_seconds
                .with_label_values(&[&label])
                .inc_by(wait);
            let full = seqs.len() == per_rank && !self.ctx.should_stop();
            let local_valid: i64 = seqs.iter().map(|s| valid_targets(&seq_ref(s))).sum();
            let mut vote = [if full { 1.0 } else { 0.0 }, local_valid as f64];
            self.coll.all_reduce_sum_f64(&mut vote, self.device)?;
            if vote[0] < self.world as f64 {
                tracing::info!(
                    rank = self.rank,
                    step = opt.step,
                    "input ended or stop requested: training stops"
                );
                break;
            }
            let n_valid = vote[1].max(1.0);

            // The loss stays on the device until the step is done: no host sync per micro-batch.
            let mut loss_acc: Option<tch::Tensor> = None;
            let n_chunks = seqs.len().div_ceil(mb);
            for (i, chunk) in seqs.chunks(mb).enumerate() {
                let rows: Vec<SequenceRef<'_>> = chunk.iter().map(seq_ref).collect();
                let batch = Batch::new(&rows, self.device)?;
                if self.rank == 0 && !attention_logged && batch.segments.is_some() {
                    attention_logged = true;
                    tracing::info!(
                        path = model.attention_path(&batch),
                        "packed documents: block-diagonal causal attention"
                    );
                }
                // Gradient of (sum over all ranks' targets) / n_valid after the mean all-reduce.
                let loss = model.forward_backward(&batch, self.world as f64 / n_valid);
                loss_acc = Some(match loss_acc {
                    Some(acc) => acc + loss.to_kind(Kind::Double),
                    None => loss.to_kind(Kind::Double),
                });
                // bf16 parameters: the micro-batches' gradients sum in the optimizer's fp32 buffer, not in bf16.
                if i + 1 < n_chunks {
                    opt.accumulate_micro_batch(&mut model.params, &*self.coll)?;
                }
            }
            opt.reduce_grads(&model.params, &*self.coll)?;
            let st = opt.step(&model.params, &*self.coll)?;
            // Read after the optimizer is enqueued (its gradient-norm read-back already waited for the device).
            let loss_sum = loss_acc.map_or(0.0, |l| l.double_value(&[]));
            model.params.zero_grad();
            let mut lv = [loss_sum];
            self.coll.all_reduce_sum_f64(&mut lv, self.device)?;
            let loss = lv[0] / n_valid;
            if !loss.is_finite() {
                return Err(TrainerError::Setup(format!(
                    "loss is {loss} at step {step}"
                )));
            }
            result.losses.push(loss);
            result.steps = opt.step;
            if profile_steps.is_some_and(|(_, b)| b == step) {
                if let Some(p) = profiler.take() {
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
            }
            if let Some(rp) = seqs.last().and_then(|s| s.resume.clone()) {
                last_resume = Some(rp);
            }
            append_step_record(
                &self.setup.run_dir,
                &StepRecord {
                    step,
                    rank: self.rank,
                    loss,
                    sequences: seqs
                        .iter()
                        .map(|s| (s.index, sequence_hash(&s.tokens)))
                        .collect(),
                },
            );

            let secs = t_step.elapsed().as_secs_f64();
            let tokens = (per_rank * self.setup.seq_len) as u64;
            result.tokens += tokens;
            let tps = tokens as f64 / secs.max(1e-9);
            m.trainer_steps.with_label_values(&[&label]).inc();
            m.trainer_tokens.with_label_values(&[&label]).inc_by(tokens);
            m.trainer_tokens_per_second
                .with_label_values(&[&label])
                .set(tps);
            m.trainer_step_seconds
                .with_label_values(&[&label])
                .observe(secs);
            m.trainer_loss.with_label_values(&[&label]).set(loss);
            m.trainer_lr.with_label_values(&[&label]).set(st.lr);
            m.trainer_grad_norm
                .with_label_values(&[&label])
                .set(st.grad_norm);
            let elapsed = start.elapsed().as_secs_f64() - result.eval_seconds;
            m.trainer_data_wait_fraction
                .with_label_values(&[&label])
                .set(result.wait_seconds / elapsed.max(1e-9));
            lat.record(t_step.elapsed());
            let mem = if self.device.is_cuda() {
                lexflow_gpu::cuda_memory_used().map(|b| b as i64)
            } else {
                process_rss_bytes()
            };
            if let Some(bytes) = mem {
                m.trainer_device_memory
                    .with_label_values(&[&label])
                    .set(bytes);
            }
            if let Some(p) = peak {
                m.trainer_mfu
                    .with_label_values(&[&label])
                    .set(tps * flops_per_token / p);
            }
            if self.rank == 0 && (step == 1 || step % 10 == 0 || step == cfg.steps) {
                tracing::info!(
                    step,
                    loss = format!("{loss:.4}"),
                    lr = format!("{:.3e}", st.lr),
                    grad_norm = format!("{:.3}", st.grad_norm),
                    tokens_per_s = format!("{:.0}", tps * self.world as f64),
                    "train step"
                );
            }
            if let Some(e) = self.setup.eval.as_ref().filter(|e| e.every > 0) {
                if step % e.every == 0 {
                    self.evaluate(&model, e, step, &mut result)?;
                    last_eval = step;
                }
            }
            if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 {
                self.checkpoint(
                    &model,
                    &opt,
                    &mcfg,
                    Some(loss),
                    last_resume.as_deref(),
                    &mut result,
                )?;
                last_ckpt = step;
            }
        }
        // After the last step (also when the input ended early), unless a stop was requested.
        if let Some(e) = &self.setup.eval {
            if opt.step > last_eval && !self.ctx.should_stop() {
                self.evaluate(&model, e, opt.step, &mut result)?;
            }
        }
        // Training time only: evaluations are reported on their own.
        result.seconds = start.elapsed().as_secs_f64() - result.eval_seconds;
        if opt.step > last_ckpt {
            let last = result.losses.last().copied();
            self.checkpoint(
                &model,
                &opt,
                &mcfg,
                last,
                last_resume.as_deref(),
                &mut result,
            )?;
        }
        result.steps = opt.step;
        result.sequences_consumed = BatchSegment::consumed_at(&self.batches, opt.step);
        Ok(result)
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
