//! # lexflow-gpu
//!
//! Everything that touches tch/libtorch, and nothing else: the LLaMA model, the loss, AdamW over flat buffers,
//! gradient collectives (in-process for CPU ranks; NCCL through cudarc behind the `cuda` feature) and model checkpoint
//! I/O in the Hugging Face safetensors layout. No channels, no actors.
//!
//! The pieces, in the order a training step uses them:
//!
//! * [`Batch`] turns packed sequences (`seq_len + 1` token ids, trailing padding, document starts) into input and
//!   label tensors plus per-position document ordinals, from which the model builds a block-diagonal causal mask.
//! * [`Llama`] is the LLaMA 3 architecture (RMSNorm, RoPE with Llama 3.1 scaling, GQA through
//!   `scaled_dot_product_attention`, SwiGLU) whose parameters are views into one flat buffer ([`Params`]) named with
//!   the Hugging Face `LlamaForCausalLM` keys; [`LlamaConfig`] has the `tiny`, `125m`, `1b`, `8b`, `70b` presets.
//! * [`cross_entropy_sum`] is the next-token loss over non-padding targets; the trainer divides by the valid targets
//!   of the whole global step, so data parallelism does not change the gradient.
//! * [`FlatAdamW`] gathers gradients into one flat fp32 buffer, which a [`Collective`] averages across ranks, then
//!   clips and applies AdamW (fp32 master weights; bf16 parameters on CUDA) with a warmup + cosine schedule.
//! * [`checkpoint`] writes and reads safetensors (HF layout, sharded above a size, `config.json`) and atomic
//!   checkpoint directories with SHA-256 manifests.
//!
//! Tensors are `Send` but not `Sync`: each trainer thread owns its model, optimizer and collective endpoint.

mod batch;
pub mod checkpoint;
mod collective;
mod error;
mod loss;
mod model;
#[cfg(feature = "cuda")]
mod nccl;
mod optim;

pub use batch::{valid_targets, Batch, SequenceRef, IGNORE_INDEX};
pub use collective::{Collective, InProcessCollective, SingleRank};
pub use error::{GpuError, Result};
pub use loss::{cross_entropy_mean, cross_entropy_sum};
pub use model::{document_mask, Llama, LlamaConfig, Param, Params, RopeScaling, LLAMA3_VOCAB};
#[cfg(feature = "cuda")]
pub use nccl::{NcclCollective, NcclUniqueId};
pub use optim::{AdamWConfig, FlatAdamW, StepStats};
/// The tch version this crate is built on, for callers that inspect tensors (tests, tools).
pub use tch;
