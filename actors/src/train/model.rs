//! Which model a run trains: a `train.model` preset, or the shape of `train.init_from`'s checkpoint (its weights
//! define it), sized to the tokenizer's vocabulary.

use std::path::Path;

use lexflow_gpu::checkpoint;
use lexflow_gpu::LlamaConfig;

use super::setup::{TrainerError, TrainerSetup};

pub(super) fn model_config(setup: &TrainerSetup) -> Result<LlamaConfig, TrainerError> {
    let cfg = match &setup.cfg.init_from {
        Some(dir) => init_config(&setup.cfg.model, setup.vocab_size, dir)?,
        None => LlamaConfig::preset(&setup.cfg.model, setup.vocab_size)?,
    };
    if cfg.vocab_size < setup.vocab_size {
        return Err(TrainerError::Setup(format!(
            "model has {} embeddings, the tokenizer {} ids",
            cfg.vocab_size, setup.vocab_size
        )));
    }
    Ok(cfg)
}

/// The shape of `train.init_from`'s model (its `config.json`). The weights define the shape: a `train.model` other
/// than the default that names another shape is a mistake (the wrong directory, or the wrong preset), not something
/// to ignore silently.
pub(crate) fn init_config(
    model: &str,
    vocab_size: usize,
    dir: &Path,
) -> Result<LlamaConfig, TrainerError> {
    let cfg = checkpoint::read_hf_config(dir)?;
    if model != "tiny" {
        let preset = LlamaConfig::preset(model, vocab_size)?;
        if shape(&preset) != shape(&cfg) {
            return Err(TrainerError::Setup(format!(
                "train.model = \"{model}\" is {}, but train.init_from {} holds a model of {} (its config.json): \
                 the weights define the shape; point train.init_from at a {model} model, or remove train.model",
                describe_shape(&preset),
                dir.display(),
                describe_shape(&cfg),
            )));
        }
    }
    Ok(cfg)
}

/// What makes two models' weights interchangeable (the vocabulary aside: presets grow it to the tokenizer's size).
pub(super) fn shape(c: &LlamaConfig) -> [usize; 6] {
    [
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    ]
}

pub(super) fn describe_shape(c: &LlamaConfig) -> String {
    format!(
        "{:.2} B parameters (hidden {}, MLP {}, {} layers, {} heads, {} KV heads, head dim {})",
        c.num_params() as f64 / 1e9,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    )
}

/// The weights a rank trains: the whole model (replicated or ZeRO-2), or its slices of every unit (`train.shard =
/// "full"`).
pub(super) enum Weights {
    Whole(lexflow_gpu::Llama),
    Sharded(lexflow_gpu::ShardedLlama),
}

impl Weights {
    /// The compute-dtype buffer the optimizer updates: the whole flat parameters, or this rank's slices.
    pub(super) fn target(&self) -> &tch::Tensor {
        match self {
            Weights::Whole(m) => &m.params.flat,
            Weights::Sharded(m) => &m.local,
        }
    }

    /// Logits of a batch without a graph. Sharded, every rank must call it the same number of times (the units
    /// are gathered from all of them).
    pub(super) fn logits(
        &self,
        batch: &lexflow_gpu::Batch,
        coll: &dyn lexflow_gpu::Collective,
    ) -> Result<tch::Tensor, TrainerError> {
        match self {
            Weights::Whole(m) => Ok(tch::no_grad(|| m.forward_batch(batch))),
            Weights::Sharded(m) => Ok(m.logits(batch, coll)?),
        }
    }

    /// Runs `f` on the whole model, for what needs all of it at once (decoding): the model itself, or gathered
    /// onto every rank (a replicated model's memory while `f` runs).
    pub(super) fn with_whole<R>(
        &self,
        coll: &dyn lexflow_gpu::Collective,
        f: impl FnOnce(&lexflow_gpu::Llama) -> R,
    ) -> Result<R, TrainerError> {
        match self {
            Weights::Whole(m) => Ok(f(m)),
            Weights::Sharded(m) => Ok(f(&m.gather_all(coll)?)),
        }
    }
}
