//! The LLaMA 3 architecture in tch, in one file: config presets, RMSNorm, RoPE (with Llama 3.1 frequency scaling),
//! grouped-query attention through `scaled_dot_product_attention` (causal, or block-diagonal causal for packed
//! documents), SwiGLU MLP, tied or untied embeddings.
//!
//! Parameters live in one flat buffer ([`Params`]): every weight is a view into it, named with its Hugging Face
//! `LlamaForCausalLM` key, grouped by sharding unit ([`ParamLayout`]: one per transformer block, one for the
//! embeddings, final norm and head), ≥2-D weights first in each unit (the optimizer's weight-decay group).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::error::{GpuError, Result};

/// Llama 3.1 RoPE frequency scaling (`rope_scaling` with `rope_type = "llama3"` in HF configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Shape of a LLaMA model; field names follow the HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// Vocabulary of the Llama 3 tokenizer (128,000 BPE + 256 special ids).
pub const LLAMA3_VOCAB: usize = 128_256;

const LLAMA31_SCALING: RopeScaling = RopeScaling {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

impl LlamaConfig {
    /// CPU tests and smoke runs: dim 64, 2 layers, 4 heads, 2 KV heads.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 192,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling {
                original_max_position_embeddings: 256,
                ..LLAMA31_SCALING
            }),
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
        }
    }

    /// GPT-3-Small-shaped body (12 × 768, ~85M non-embedding parameters) with Llama 3 blocks and vocabulary.
    pub fn llama_125m() -> Self {
        LlamaConfig {
            vocab_size: LLAMA3_VOCAB,
            hidden_size: 768,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_key_value_heads: 4,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(LLAMA31_SCALING),
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
        }
    }

    /// Llama 3.2 1B.
    pub fn llama3_2_1b() -> Self {
        LlamaConfig {
            vocab_size: LLAMA3_VOCAB,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling {
                factor: 32.0,
                ..LLAMA31_SCALING
            }),
            max_position_embeddings: 131_072,
            tie_word_embeddings: true,
        }
    }

    /// Llama 3.1 8B.
    pub fn llama3_1_8b() -> Self {
        LlamaConfig {
            vocab_size: LLAMA3_VOCAB,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(LLAMA31_SCALING),
            max_position_embeddings: 131_072,
            tie_word_embeddings: false,
        }
    }

    /// Llama 3.1 70B.
    pub fn llama3_1_70b() -> Self {
        LlamaConfig {
            hidden_size: 8192,
            intermediate_size: 28_672,
            num_hidden_layers: 80,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            ..Self::llama3_1_8b()
        }
    }

    /// A named preset: `tiny` (vocabulary of the tokenizer), `125m`, `1b`, `8b`, `70b` (Llama 3 vocabulary, which
    /// must hold every id of the tokenizer).
    pub fn preset(name: &str, tokenizer_vocab: usize) -> Result<Self> {
        let cfg = match name {
            "tiny" => return Ok(Self::tiny(tokenizer_vocab)),
            "125m" => Self::llama_125m(),
            "1b" => Self::llama3_2_1b(),
            "8b" => Self::llama3_1_8b(),
            "70b" => Self::llama3_1_70b(),
            other => {
                return Err(GpuError::Config(format!(
                    "unknown model preset `{other}` (expected tiny, 125m, 1b, 8b, 70b)"
                )))
            }
        };
        let mut cfg = cfg;
        if tokenizer_vocab > cfg.vocab_size {
            // E.g. the Llama 3.2 tokenizer.json adds `<|image|>` (id 128256) to Llama 3's 128,256 ids: grow the
            // embeddings so that every id the tokenizer can emit has a row (loading 128,256-row HF weights with
            // `init_from` then reports the shape mismatch).
            tracing::warn!(
                preset = name,
                preset_vocab = cfg.vocab_size,
                tokenizer_vocab,
                "the tokenizer has more ids than the preset: growing the embeddings to the tokenizer's size"
            );
            cfg.vocab_size = tokenizer_vocab;
        }
        Ok(cfg)
    }

    // `is_multiple_of` needs Rust 1.87; the workspace promises 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<()> {
        let mut errs = Vec::new();
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0
        {
            errs.push(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            errs.push(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                errs.push(format!("{k} must be > 0"));
            }
        }
        // A zero or negative epsilon divides by zero on an all-zero row; a non-positive theta makes NaN frequencies.
        for (k, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                errs.push(format!("{k} ({v}) must be a finite number > 0"));
            }
        }
        if let Some(r) = &self.rope_scaling {
            // HF's Llama 3 rope-scaling checks: the smoothing divides by high − low.
            let finite_pos = |v: f64| v.is_finite() && v > 0.0;
            if !finite_pos(r.factor) || !finite_pos(r.low_freq_factor) {
                errs.push(format!(
                    "rope_scaling.factor ({}) and rope_scaling.low_freq_factor ({}) must be finite numbers > 0",
                    r.factor, r.low_freq_factor
                ));
            }
            if !(r.high_freq_factor.is_finite() && r.high_freq_factor > r.low_freq_factor) {
                errs.push(format!(
                    "rope_scaling.high_freq_factor ({}) must be greater than rope_scaling.low_freq_factor ({})",
                    r.high_freq_factor, r.low_freq_factor
                ));
            }
            if r.original_max_position_embeddings == 0 {
                errs.push("rope_scaling.original_max_position_embeddings must be > 0".into());
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(GpuError::Config(errs.join("; ")))
        }
    }

    /// `(HF key, shape)` of every parameter, in buffer order: ≥2-D weights first (decayed), then the norms.
    /// `(HF key, shape)` of every parameter, in the order of the flat buffer ([`param_layout`](Self::param_layout)).
    pub fn param_specs(&self) -> Vec<(String, Vec<i64>)> {
        self.param_layout()
            .specs
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect()
    }

    /// Where every parameter lives in the flat buffer: sharding unit 0 holds the embeddings, the head (untied) and
    /// the final norm, unit `1 + i` transformer block `i`; inside a unit the ≥2-D weights come first (the weight
    /// decay group), then the norms. Every unit starts at a multiple of [`NORM_BLOCK`] (zero padding between
    /// units), so gradient-norm blocks never straddle two units and a unit's slices can be cut at block boundaries.
    pub fn param_layout(&self) -> ParamLayout {
        let (d, f, v) = (
            self.hidden_size as i64,
            self.intermediate_size as i64,
            self.vocab_size as i64,
        );
        let q = (self.num_attention_heads * self.head_dim) as i64;
        let kv = (self.num_key_value_heads * self.head_dim) as i64;
        // Per unit: its ≥2-D weights, then its norms.
        type Named = Vec<(String, Vec<i64>)>;
        let mut groups: Vec<(Named, Named)> = Vec::new();
        let mut head = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        if !self.tie_word_embeddings {
            head.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        groups.push((head, vec![("model.norm.weight".to_string(), vec![d])]));
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            groups.push((
                vec![
                    (format!("{p}.self_attn.q_proj.weight"), vec![q, d]),
                    (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
                    (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
                    (format!("{p}.self_attn.o_proj.weight"), vec![d, q]),
                    (format!("{p}.mlp.gate_proj.weight"), vec![f, d]),
                    (format!("{p}.mlp.up_proj.weight"), vec![f, d]),
                    (format!("{p}.mlp.down_proj.weight"), vec![d, f]),
                ],
                vec![
                    (format!("{p}.input_layernorm.weight"), vec![d]),
                    (format!("{p}.post_attention_layernorm.weight"), vec![d]),
                ],
            ));
        }
        let mut specs = Vec::new();
        let mut units = Vec::with_capacity(groups.len());
        let mut offset = 0i64;
        for (u, (weights, norms)) in groups.into_iter().enumerate() {
            let start = (offset + NORM_BLOCK - 1) / NORM_BLOCK * NORM_BLOCK;
            offset = start;
            let first = specs.len();
            let mut decay = 0;
            for (k, (name, shape)) in weights.into_iter().chain(norms).enumerate() {
                let numel: i64 = shape.iter().product();
                if shape.len() >= 2 {
                    debug_assert_eq!(k as i64, specs.len() as i64 - first as i64);
                    decay += numel;
                }
                specs.push(ParamSpec {
                    name,
                    shape,
                    offset,
                    numel,
                    unit: u,
                });
                offset += numel;
            }
            units.push(Unit {
                start,
                numel: offset - start,
                decay,
                params: first..specs.len(),
            });
        }
        ParamLayout {
            specs,
            units,
            total: offset,
        }
    }

    pub fn num_params(&self) -> usize {
        self.param_specs()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>() as usize)
            .sum()
    }

    /// Training FLOPs per token (forward + backward): 6·N for the matmuls plus 12·L·d·T for attention scores
    /// (PaLM appendix B), with the embedding lookup excluded from N.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let embed = (self.vocab_size * self.hidden_size) as f64;
        let n = self.num_params() as f64 - if self.tie_word_embeddings { 0.0 } else { embed };
        let attn = 12.0
            * (self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len) as f64;
        6.0 * n + attn
    }

    /// Inverse RoPE frequencies (`head_dim / 2`), with Llama 3.1 scaling when configured (HF
    /// `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f64> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / dim as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base.iter().map(|&x| x as f32).collect();
        };
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    f
                };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                if medium {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                }
            })
            .collect()
    }
}

/// Elements per gradient-norm block. Sharding units start at multiples of it and every shard boundary is one, so
/// every block lies in one rank's slice and the global norm has the same bits however the state is split.
pub const NORM_BLOCK: i64 = 1 << 16;

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    /// Offset (in elements) in the flat buffer.
    pub offset: i64,
    pub numel: i64,
    /// The sharding unit it belongs to.
    pub unit: usize,
}

/// A sharding unit: what fully sharded training gathers, computes with and frees as one piece (a transformer block;
/// unit 0 is the embeddings, final norm and head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Offset of the unit in the flat buffer: a multiple of [`NORM_BLOCK`].
    pub start: i64,
    /// Elements of its parameters (the padding after it is not counted).
    pub numel: i64,
    /// Elements of its ≥2-D weights, at its start: the weight-decay group.
    pub decay: i64,
    /// Its parameters, as indices into [`ParamLayout::specs`].
    pub params: std::ops::Range<usize>,
}

impl Unit {
    /// Elements of each rank's slice of the unit when it is sharded over `world` ranks: a multiple of
    /// [`NORM_BLOCK`], `world` slices covering the unit (the last ones padded with zeros).
    pub fn shard(&self, world: usize) -> i64 {
        let per = NORM_BLOCK * world.max(1) as i64;
        (self.numel + per - 1) / per * NORM_BLOCK
    }
}

/// Where every parameter of a model lives in its flat buffer ([`LlamaConfig::param_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub units: Vec<Unit>,
    /// Elements of the flat buffer (parameters and the padding between units).
    pub total: i64,
}

impl ParamLayout {
    /// Global `[start, end)` ranges of the weight-decay group (the ≥2-D weights of each unit).
    pub fn decay_ranges(&self) -> Vec<(i64, i64)> {
        self.units
            .iter()
            .map(|u| (u.start, u.start + u.decay))
            .collect()
    }

    /// Global `[start, end)` ranges of the norms (no weight decay).
    pub fn norm_ranges(&self) -> Vec<(i64, i64)> {
        self.units
            .iter()
            .map(|u| (u.start + u.decay, u.start + u.numel))
            .collect()
    }

    /// Elements of one rank's slices of every unit, sharded over `world` ranks.
    pub fn full_shard_numel(&self, world: usize) -> i64 {
        self.units.iter().map(|u| u.shard(world)).sum()
    }

    /// The layout of unit `u` alone, as the buffer an all-gather of its slices fills: its parameters at offsets
    /// from the unit's start, one unit starting at 0, `total` = the unit's elements.
    pub fn unit_local(&self, u: usize) -> ParamLayout {
        let unit = &self.units[u];
        ParamLayout {
            specs: self.specs[unit.params.clone()]
                .iter()
                .map(|p| ParamSpec {
                    offset: p.offset - unit.start,
                    unit: 0,
                    ..p.clone()
                })
                .collect(),
            units: vec![Unit {
                start: 0,
                params: 0..unit.params.len(),
                ..unit.clone()
            }],
            total: unit.numel,
        }
    }

    /// A short description of the layout for checkpoint metadata: states saved in another layout are refused.
    pub fn fingerprint(&self) -> String {
        let units: Vec<String> = self
            .units
            .iter()
            .map(|u| format!("{}+{}/{}", u.start, u.numel, u.decay))
            .collect();
        format!("units-v1:{}:{}", self.total, units.join(","))
    }
}

/// One named parameter: a view into [`Params::flat`].
pub struct Param {
    pub name: String,
    pub shape: Vec<i64>,
    /// Offset (in elements) of the parameter in the flat buffer.
    pub offset: i64,
    pub numel: i64,
    pub tensor: Tensor,
}

/// All parameters of a model in one flat buffer of the model's dtype ([`ParamLayout`]). Each [`Param::tensor`] is a
/// leaf view of it that requires grad; writing into the flat buffer (under no-grad) updates every parameter at once.
pub struct Params {
    pub flat: Tensor,
    pub params: Vec<Param>,
    pub layout: ParamLayout,
}

impl Params {
    fn allocate(layout: ParamLayout, kind: Kind, device: Device) -> Params {
        let flat = Tensor::zeros([layout.total], (kind, device));
        Self::views(flat, layout)
    }

    /// Leaf views (requiring grad) of `flat`, laid out as `layout`; `flat` may also hold just the parameters of
    /// some units when `layout` says so (the offsets are into `flat`).
    pub fn views(flat: Tensor, layout: ParamLayout) -> Params {
        let params = layout
            .specs
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                shape: p.shape.clone(),
                offset: p.offset,
                numel: p.numel,
                tensor: flat
                    .narrow(0, p.offset, p.numel)
                    .view(p.shape.as_slice())
                    .set_requires_grad(true),
            })
            .collect();
        Params {
            flat,
            params,
            layout,
        }
    }

    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.tensor)
    }

    fn must(&self, name: &str) -> Tensor {
        self.get(name)
            .unwrap_or_else(|| panic!("parameter {name} is in param_specs"))
            .shallow_clone()
    }

    /// The parameters of unit `u` as their own [`Params`]: the same leaf tensors (shallow handles, gradients
    /// accumulate into this model's), `flat` still the whole buffer.
    pub fn unit(&self, u: usize) -> Params {
        let range = self.layout.units[u].params.clone();
        Params {
            flat: self.flat.shallow_clone(),
            params: self.params[range]
                .iter()
                .map(|p| Param {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    offset: p.offset,
                    numel: p.numel,
                    tensor: p.tensor.shallow_clone(),
                })
                .collect(),
            layout: self.layout.clone(),
        }
    }

    /// Drops every accumulated gradient (the next backward allocates fresh ones).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// `(HF key, tensor)` pairs, for saving.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.detach()))
            .collect()
    }

    /// Copies named tensors into the parameters. Every parameter must be present with its exact shape;
    /// `rotary_emb.inv_freq` buffers and (for tied models) `lm_head.weight` are ignored, anything else unexpected is an
    /// error.
    pub fn load_named(
        &mut self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        tied: bool,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut seen = vec![false; self.params.len()];
        let mut errs = Vec::new();
        for (name, t) in tensors {
            match self.params.iter().position(|p| p.name == name) {
                Some(i) => {
                    let p = &mut self.params[i];
                    if t.size() != p.shape {
                        errs.push(format!(
                            "{name}: shape {:?}, model expects {:?}",
                            t.size(),
                            p.shape
                        ));
                        continue;
                    }
                    p.tensor.detach().copy_(&t);
                    seen[i] = true;
                }
                None if name.ends_with("rotary_emb.inv_freq") => {}
                None if tied && name == "lm_head.weight" => {}
                None => errs.push(format!("unexpected tensor {name}")),
            }
        }
        for (p, s) in self.params.iter().zip(&seen) {
            if !s {
                errs.push(format!("missing tensor {}", p.name));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(GpuError::Config(format!(
                "loading weights: {}",
                errs.join("; ")
            )))
        }
    }
}

/// libtorch's default generators are process-wide: ranks initialising at the same time would interleave their draws.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Holds libtorch's process-wide default generator, as [`Llama::new`] does while it seeds and draws: code that draws
/// random numbers while models may be created in other threads (tests running side by side) takes it around its
/// draws, or a model's "same seed, same weights" breaks. Not reentrant: never create a model while holding it.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &Params, name: &str, eps: f64) -> Self {
        RmsNorm {
            weight: p.must(&format!("{name}.weight")),
            eps,
        }
    }

    /// `x · rsqrt(mean(x²) + eps) · weight` through libtorch's `rms_norm` (one fused kernel on CUDA, statistics in
    /// fp32 whatever the input dtype; in fp32 this is exactly HF `LlamaRMSNorm`).
    fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("normalised axis");
        x.rms_norm([d], Some(&self.weight), self.eps)
    }
}

/// `cos`/`sin` tables for the positions of one forward pass, `(T, 1, head_dim)` in the model dtype, laid out for
/// `(B, T, H, head_dim)` activations. `sin` carries the sign of `rotate_half`: `[-sin, sin]`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(inv_freq: &Tensor, t: i64, kind: Kind) -> Self {
        Self::at(inv_freq, 0, t, kind)
    }

    /// Tables for positions `start .. start + t` (incremental decoding): `cos`/`sin` of shape `(t, 1, hd)`.
    fn at(inv_freq: &Tensor, start: i64, t: i64, kind: Kind) -> Self {
        // Positions are global within the packed sequence: attention scores under RoPE depend only on relative
        // positions, so a document mask alone keeps documents independent.
        let pos = Tensor::arange_start(start, start + t, (Kind::Float, inv_freq.device()));
        Self::per_row(inv_freq, &pos, kind)
    }

    /// Tables for the positions `pos`, `(t)` or per row `(B, t)` (left-padded batched decoding): `cos`/`sin` of shape
    /// `pos.shape + (1, hd)`, broadcasting over the heads of `(…, t, H, hd)`.
    fn per_row(inv_freq: &Tensor, pos: &Tensor, kind: Kind) -> Self {
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * inv_freq; // (…, t, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let s = freqs.sin();
        Rope {
            cos: emb.cos().to_kind(kind).unsqueeze(-2),
            sin: Tensor::cat(&[&s.neg(), &s], -1).to_kind(kind).unsqueeze(-2),
        }
    }

    /// `x * cos + rotate_half(x) * sin` on `(B, T, H, hd)` (the half-split convention of HF checkpoints), in three
    /// kernels: `rotate_half(x) * sin == roll(x, hd/2) * [-sin, sin]`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let hd = x.size()[3];
        let swapped = x.roll([hd / 2], [-1]);
        (x * &self.cos).addcmul(&swapped, &self.sin)
    }
}

/// How attention is restricted for one forward pass.
enum AttnLayout<'a> {
    /// Plain causal: `scaled_dot_product_attention(is_causal)`, no mask (flash kernel, GQA native).
    Causal,
    /// Block-diagonal causal given as per-row document lengths (each row sums to T): one flash call per document
    /// segment, exact and without a T×T mask.
    Segments(&'a [Vec<i64>]),
    /// Block-diagonal causal as a `(B, 1, T, T)` bool mask (memory-efficient kernel, heads repeated for GQA).
    Mask(Tensor),
    /// Block-diagonal causal in one varlen flash-attention call per layer over the flattened `(B·T)` positions
    /// (`cu_seqlens`: cumulative document lengths, int32 on the device). CUDA, bf16/fp16.
    Varlen {
        cu_seqlens: &'a Tensor,
        max_len: i64,
    },
}

/// How packed documents are attended to, from `LEXFLOW_DOC_ATTENTION` (default `auto`: varlen flash attention where
/// it runs — CUDA, bf16/fp16 — else one flash call per segment up to [`MAX_FLASH_SEGMENTS`], else the mask).
fn doc_attention_choice() -> &'static str {
    static CHOICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| match std::env::var("LEXFLOW_DOC_ATTENTION") {
        Ok(v) if ["auto", "varlen", "segments", "mask"].contains(&v.as_str()) => v,
        Ok(v) => {
            tracing::warn!(
                "LEXFLOW_DOC_ATTENTION={v:?} is not one of auto, varlen, segments, mask: using auto"
            );
            "auto".into()
        }
        Err(_) => "auto".into(),
    })
}

/// Micro-batches with more document segments than this use the mask instead of per-segment flash calls (each
/// segment costs a few host-side dispatches per layer). Measured on an H100 (2026-11-23): with the streamed FORMEX
/// sample (best-fit, seq_len 4096, micro-batch 2) the limit 256 sent micro-batches to the mask path, whose SDPA
/// fallback materialises (B, H, T, T) scores and ran out of 80 GB at 1B; per-segment flash calls do not.
pub const MAX_FLASH_SEGMENTS: usize = 4096;

struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    n_head: i64,
    n_kv_head: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: &Params, name: &str, cfg: &LlamaConfig) -> Self {
        Attention {
            q_proj: p.must(&format!("{name}.q_proj.weight")),
            k_proj: p.must(&format!("{name}.k_proj.weight")),
            v_proj: p.must(&format!("{name}.v_proj.weight")),
            o_proj: p.must(&format!("{name}.o_proj.weight")),
            n_head: cfg.num_attention_heads as i64,
            n_kv_head: cfg.num_key_value_heads as i64,
            head_dim: cfg.head_dim as i64,
        }
    }

    /// Queries, keys (both with RoPE) and values as `(B, T, heads, hd)`: RoPE on the contiguous projection output,
    /// attention on transposed views.
    fn qkv(&self, x: &Tensor, rope: &Rope) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().expect("(B, T, D)");
        let (h, kvh, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let q = rope.apply(&x.linear::<&Tensor>(&self.q_proj, None).view([b, t, h, hd]));
        let k = rope.apply(
            &x.linear::<&Tensor>(&self.k_proj, None)
                .view([b, t, kvh, hd]),
        );
        let v = x
            .linear::<&Tensor>(&self.v_proj, None)
            .view([b, t, kvh, hd]);
        (q, k, v)
    }

    fn forward(&self, x: &Tensor, rope: &Rope, attn: &AttnLayout<'_>) -> Tensor {
        let (b, t, _) = x.size3().expect("(B, T, D)");
        let (h, kvh, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (q, k, v) = self.qkv(x, rope);
        let gqa = kvh != h;
        let causal = |q: &Tensor, k: &Tensor, v: &Tensor| {
            // Flash/cuDNN kernels take GQA natively on the causal path; the output comes back as (.., H, T, hd).
            Tensor::scaled_dot_product_attention::<&Tensor>(
                &q.transpose(-3, -2),
                &k.transpose(-3, -2),
                &v.transpose(-3, -2),
                None,
                0.0,
                true,
                None,
                gqa,
            )
            .transpose(-3, -2)
        };
        // Flash and cuDNN kernels take 4-D inputs only; a 3-D (T, H, hd) row would silently fall back to the math
        // kernel, which materialises fp32 (H, T, T) scores (seen on an H100: out of memory at 1B, seq_len 4096).
        let causal_row = |q: &Tensor, k: &Tensor, v: &Tensor| {
            causal(&q.unsqueeze(0), &k.unsqueeze(0), &v.unsqueeze(0)).squeeze_dim(0)
        };
        let y = match attn {
            AttnLayout::Causal => causal(&q, &k, &v), // (B, T, H, hd)
            AttnLayout::Varlen {
                cu_seqlens,
                max_len,
            } => crate::ops::flash_varlen(
                &q.reshape([b * t, h, hd]),
                &k.reshape([b * t, kvh, hd]),
                &v.reshape([b * t, kvh, hd]),
                cu_seqlens,
                *max_len,
            )
            .unwrap_or_else(|e| panic!("{e}")) // like every tch op of this forward: libtorch errors panic
            .view([b, t, h, hd]),
            AttnLayout::Segments(segs) => {
                let (qs, ks, vs) = (q.unbind(0), k.unbind(0), v.unbind(0));
                let rows: Vec<Tensor> = (0..b as usize)
                    .map(|r| {
                        let lens = &segs[r];
                        if lens.len() <= 1 {
                            return causal_row(&qs[r], &ks[r], &vs[r]);
                        }
                        // split_with_sizes: its backward is one cat, not a zero-filled buffer per segment.
                        let qp = qs[r].split_with_sizes(lens.as_slice(), 0);
                        let kp = ks[r].split_with_sizes(lens.as_slice(), 0);
                        let vp = vs[r].split_with_sizes(lens.as_slice(), 0);
                        let outs: Vec<Tensor> = qp
                            .iter()
                            .zip(&kp)
                            .zip(&vp)
                            .map(|((q, k), v)| causal_row(q, k, v))
                            .collect();
                        Tensor::cat(&outs, 0)
                    })
                    .collect();
                Tensor::stack(&rows, 0)
            }
            // With an explicit mask the memory-efficient kernel is used, which wants equal head counts.
            AttnLayout::Mask(m) => {
                let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
                let rep = h / kvh;
                let (k, v) = if rep > 1 {
                    (
                        k.repeat_interleave_self_int(rep, 1, None),
                        v.repeat_interleave_self_int(rep, 1, None),
                    )
                } else {
                    (k, v)
                };
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, false)
                    .transpose(1, 2)
            }
        }; // (B, T, H, hd)
        y.reshape([b, t, h * hd])
            .linear::<&Tensor>(&self.o_proj, None)
    }
}

impl Attention {
    /// Attention of `t` new positions over the cached keys/values of earlier ones plus their own (inference only):
    /// either a prefill (empty cache, causal over the `t` positions) or one new position (it sees everything).
    /// `mask`: `(B, 1, t, K)` bool (true = may attend) for left-padded batches; None: plain causal.
    fn forward_cached(
        &self,
        x: &Tensor,
        rope: &Rope,
        kv: &mut Option<(Tensor, Tensor)>,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("(B, T, D)");
        let (h, kvh, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (q, k, v) = self.qkv(x, rope);
        let prefill = kv.is_none();
        assert!(
            prefill || t == 1,
            "a KV cache takes a prefill or one position at a time"
        );
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1), Tensor::cat(&[&pv, &v], 1)),
            None => (k, v),
        };
        let y = match mask {
            None => Tensor::scaled_dot_product_attention::<&Tensor>(
                &q.transpose(1, 2),
                &k.transpose(1, 2),
                &v.transpose(1, 2),
                None,
                0.0,
                prefill,
                None,
                kvh != h,
            ),
            Some(m) => {
                // Explicit masks go to kernels that want equal head counts.
                let rep = h / kvh;
                let (kr, vr) = if rep > 1 {
                    (
                        k.repeat_interleave_self_int(rep, 2, None),
                        v.repeat_interleave_self_int(rep, 2, None),
                    )
                } else {
                    (k.shallow_clone(), v.shallow_clone())
                };
                Tensor::scaled_dot_product_attention(
                    &q.transpose(1, 2),
                    &kr.transpose(1, 2),
                    &vr.transpose(1, 2),
                    Some(m),
                    0.0,
                    false,
                    None,
                    false,
                )
            }
        }
        .transpose(1, 2);
        *kv = Some((k, v));
        y.reshape([b, t, h * hd])
            .linear::<&Tensor>(&self.o_proj, None)
    }
}

/// Keys and values of the positions decoded so far, per layer (inference only; see [`Llama::forward_cached`] and
/// [`Llama::forward_cached_padded`]).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
    /// Padded batches: `(B, len)` bool, the cached positions that are real tokens.
    key_valid: Option<Tensor>,
    /// Padded batches: `(B,)` int64, each row's next position.
    next_pos: Option<Tensor>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl Mlp {
    fn new(p: &Params, name: &str) -> Self {
        Mlp {
            gate_proj: p.must(&format!("{name}.gate_proj.weight")),
            up_proj: p.must(&format!("{name}.up_proj.weight")),
            down_proj: p.must(&format!("{name}.down_proj.weight")),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let gate = x.linear::<&Tensor>(&self.gate_proj, None).silu();
        let up = x.linear::<&Tensor>(&self.up_proj, None);
        (gate * up).linear::<&Tensor>(&self.down_proj, None)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(p: &Params, i: usize, cfg: &LlamaConfig) -> Self {
        let name = format!("model.layers.{i}");
        Block {
            input_layernorm: RmsNorm::new(p, &format!("{name}.input_layernorm"), cfg.rms_norm_eps),
            self_attn: Attention::new(p, &format!("{name}.self_attn"), cfg),
            post_attention_layernorm: RmsNorm::new(
                p,
                &format!("{name}.post_attention_layernorm"),
                cfg.rms_norm_eps,
            ),
            mlp: Mlp::new(p, &format!("{name}.mlp")),
        }
    }

    fn forward(&self, x: &Tensor, rope: &Rope, attn: &AttnLayout<'_>) -> Tensor {
        let x = x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x), rope, attn);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

/// A LLaMA causal language model whose parameters live in one flat buffer.
pub struct Llama {
    pub cfg: LlamaConfig,
    pub params: Params,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Tensor,
    recompute: bool,
}

impl Llama {
    /// A freshly initialised model: N(0, 0.02) weights, unit norms. Same seed and device ⇒ same weights.
    pub fn new(cfg: &LlamaConfig, device: Device, kind: Kind, seed: u64) -> Result<Self> {
        cfg.validate()?;
        if device.is_cuda() {
            crate::init_cuda();
        }
        let params = Params::allocate(cfg.param_layout(), kind, device);
        {
            let _g = rng_lock();
            let _ng = tch::no_grad_guard();
            tch::manual_seed(seed as i64);
            // One draw per unit's weights, in unit order; norms are ones; the padding between units stays zero.
            for u in &params.layout.units {
                let _ = params.flat.narrow(0, u.start, u.decay).normal_(0.0, 0.02);
                let _ = params
                    .flat
                    .narrow(0, u.start + u.decay, u.numel - u.decay)
                    .fill_(1.0);
            }
        }
        Ok(Self::from_params(cfg, params))
    }

    /// A model over `flat`, a buffer laid out as `cfg.param_layout()` (weights as they are).
    pub fn from_flat(cfg: &LlamaConfig, flat: Tensor) -> Result<Self> {
        cfg.validate()?;
        let layout = cfg.param_layout();
        if flat.numel() as i64 != layout.total {
            return Err(GpuError::Config(format!(
                "a flat buffer of {} elements for a model of {}",
                flat.numel(),
                layout.total
            )));
        }
        Ok(Self::from_params(cfg, Params::views(flat, layout)))
    }

    fn from_params(cfg: &LlamaConfig, params: Params) -> Self {
        let embed_tokens = params.must("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            params.must("lm_head.weight")
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(&params, i, cfg))
            .collect();
        let norm = RmsNorm::new(&params, "model.norm", cfg.rms_norm_eps);
        let inv_freq = Tensor::from_slice(&cfg.rope_inv_freq()).to_device(params.flat.device());
        Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            params,
            recompute: false,
        }
    }

    /// Per-layer activation recomputation in [`forward_backward`](Self::forward_backward): keep only each layer's
    /// input during the forward and re-run one layer at a time during the backward (about one extra forward of
    /// compute; activation memory of one layer instead of all of them).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    pub fn device(&self) -> Device {
        self.params.flat.device()
    }

    pub fn kind(&self) -> Kind {
        self.params.flat.kind()
    }

    /// Logits `(B, T, V)` in the model dtype. `doc_ids` `(B, T)` (document ordinal of each position) makes attention
    /// block-diagonal causal through a `(B, 1, T, T)` mask; None is plain causal (flash, no mask).
    pub fn forward(&self, input_ids: &Tensor, doc_ids: Option<&Tensor>) -> Tensor {
        let attn = match doc_ids {
            Some(d) => AttnLayout::Mask(document_mask(d)),
            None => AttnLayout::Causal,
        };
        self.forward_layout(input_ids, &attn)
    }

    /// Block-diagonal causal attention given per-row document lengths (each row sums to T), one flash call per
    /// document segment: the same function as [`forward`](Self::forward) with the equivalent `doc_ids`.
    pub fn forward_segments(&self, input_ids: &Tensor, segments: &[Vec<i64>]) -> Tensor {
        self.forward_layout(input_ids, &AttnLayout::Segments(segments))
    }

    /// Hidden states after the final norm, `(B, T, D)`.
    fn hidden(&self, input_ids: &Tensor, attn: &AttnLayout<'_>) -> Tensor {
        let (_, t) = input_ids.size2().expect("(B, T) token ids");
        let rope = Rope::new(&self.inv_freq, t, self.kind());
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // (B, T, D)
        for block in &self.layers {
            x = block.forward(&x, &rope, attn);
        }
        self.norm.forward(&x)
    }

    /// Logits `(B, t, V)` of `t` new positions given the cache of the earlier ones, which it extends: first a
    /// prefill (any `t`, causal), then one token at a time. The same function as [`forward`](Self::forward) on the
    /// whole prefix, without recomputing it. Call under `no_grad`.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let (_, t) = input_ids.size2().expect("(B, T) token ids");
        let rope = Rope::at(&self.inv_freq, cache.len, t, self.kind());
        self.cached_layers(input_ids, &rope, None, cache)
    }

    /// [`forward_cached`](Self::forward_cached) for a batch of prompts of different lengths, left-padded: `valid`
    /// `(B, t)` bool is false at padding. Every row gets its own positions (counting its real tokens only) and
    /// attends to its real tokens only, so each row's logits are those of that prompt alone; a padding position
    /// attends to itself (no empty softmax). Decode steps pass `(B, 1)` tokens with `valid` all true.
    pub fn forward_cached_padded(
        &self,
        input_ids: &Tensor,
        valid: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let (b, t) = input_ids.size2().expect("(B, T) token ids");
        let dev = input_ids.device();
        let valid = valid.to_kind(Kind::Bool);
        let next = cache
            .next_pos
            .take()
            .unwrap_or_else(|| Tensor::zeros([b], (Kind::Int64, dev)));
        let counts = valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64); // (B, t)
        let pos = (&counts + next.unsqueeze(1) - 1).clamp_min(0);
        cache.next_pos = Some(&next + counts.select(1, t - 1));
        let keys = match cache.key_valid.take() {
            Some(k) => Tensor::cat(&[&k, &valid], 1),
            None => valid.shallow_clone(),
        };
        let kn = keys.size()[1];
        // Query i sits at padded index cache.len + i: it sees real keys up to there, and always itself.
        let qi = Tensor::arange_start(cache.len, cache.len + t, (Kind::Int64, dev)).view([t, 1]);
        let ki = Tensor::arange(kn, (Kind::Int64, dev)).view([1, kn]);
        let causal = ki.le_tensor(&qi); // (t, K)
        let own = ki.eq_tensor(&qi);
        let mask = causal
            .unsqueeze(0)
            .logical_and(&keys.unsqueeze(1))
            .logical_or(&own.unsqueeze(0))
            .unsqueeze(1); // (B, 1, t, K)
        cache.key_valid = Some(keys);
        let rope = Rope::per_row(&self.inv_freq, &pos, self.kind());
        self.cached_layers(input_ids, &rope, Some(&mask), cache)
    }

    fn cached_layers(
        &self,
        input_ids: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Tensor {
        let (_, t) = input_ids.size2().expect("(B, T) token ids");
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        for (block, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let a =
                block
                    .self_attn
                    .forward_cached(&block.input_layernorm.forward(&x), rope, kv, mask);
            let h = &x + a;
            x = &h
                + block
                    .mlp
                    .forward(&block.post_attention_layernorm.forward(&h));
        }
        cache.len += t;
        self.norm.forward(&x).linear::<&Tensor>(&self.lm_head, None)
    }

    fn forward_layout(&self, input_ids: &Tensor, attn: &AttnLayout<'_>) -> Tensor {
        self.hidden(input_ids, attn)
            .linear::<&Tensor>(&self.lm_head, None)
    }

    fn layout_of<'b>(&self, batch: &'b Batch) -> AttnLayout<'b> {
        attn_layout(&self.cfg, &self.params.flat, batch)
    }

    /// Which attention path [`forward_batch`](Self::forward_batch) takes for `batch`: "causal", "varlen",
    /// "segments" or "mask" (for logs, benchmarks and tests).
    pub fn attention_path(&self, batch: &Batch) -> &'static str {
        match self.layout_of(batch) {
            AttnLayout::Causal => "causal",
            AttnLayout::Varlen { .. } => "varlen",
            AttnLayout::Segments(_) => "segments",
            AttnLayout::Mask(_) => "mask",
        }
    }

    /// Block-diagonal causal attention through varlen flash attention (CUDA, bf16/fp16): `cu_seqlens` int32
    /// cumulative document lengths over the flattened `(B·T)` positions, as [`Batch::cu_seqlens`]. The same
    /// function as [`forward`](Self::forward) with the equivalent `doc_ids`.
    pub fn forward_varlen(&self, input_ids: &Tensor, cu_seqlens: &Tensor, max_len: i64) -> Tensor {
        self.forward_layout(
            input_ids,
            &AttnLayout::Varlen {
                cu_seqlens,
                max_len,
            },
        )
    }

    /// One micro-batch of training: accumulates `scale · ∇ Σ cross-entropy` into the parameters' gradients and returns
    /// the cross-entropy sum (a detached fp32 scalar, still on the device: reading it is the caller's one sync).
    /// Equivalent to `(cross_entropy_sum(forward_batch(b)) * scale).backward()`; with
    /// [`set_recompute`](Self::set_recompute) the layers are recomputed one at a time during the backward.
    pub fn forward_backward(&self, batch: &Batch, scale: f64) -> Tensor {
        let attn = self.layout_of(batch);
        if !self.recompute {
            let logits = self.forward_layout(&batch.inputs, &attn);
            return crate::loss::cross_entropy_sum_backward(&logits, &batch.labels, scale)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        unit_forward_backward(&self.cfg, batch, scale, true, &mut OwnUnits(&self.params))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Forward over a [`Batch`] (inputs on the model's device): plain causal flash attention when every sequence is
    /// one document; packed documents through varlen flash attention on CUDA in bf16/fp16, else one flash call per
    /// document segment, else (past [`MAX_FLASH_SEGMENTS`] segments) the `(B, 1, T, T)` mask.
    /// `LEXFLOW_DOC_ATTENTION=varlen|segments|mask` forces a path where it can run.
    pub fn forward_batch(&self, batch: &Batch) -> Tensor {
        self.forward_layout(&batch.inputs, &self.layout_of(batch))
    }
}

/// The attention path for `batch` ([`Llama::attention_path`]); `probe` is any tensor of the model's dtype and
/// device.
fn attn_layout<'b>(cfg: &LlamaConfig, probe: &Tensor, batch: &'b Batch) -> AttnLayout<'b> {
    let Some(doc_ids) = &batch.doc_ids else {
        return AttnLayout::Causal;
    };
    let choice = doc_attention_choice();
    if let (Some(cu), "auto" | "varlen") = (&batch.cu_seqlens, choice) {
        let probe = probe.narrow(0, 0, cfg.head_dim as i64);
        if crate::ops::flash_varlen_supported(&probe.view([1, 1, -1])) {
            return AttnLayout::Varlen {
                cu_seqlens: cu,
                max_len: batch.max_seqlen,
            };
        }
    }
    match &batch.segments {
        Some(segs)
            if choice != "mask"
                && segs.iter().map(Vec::len).sum::<usize>() <= MAX_FLASH_SEGMENTS =>
        {
            AttnLayout::Segments(segs)
        }
        _ => AttnLayout::Mask(document_mask(doc_ids)),
    }
}

/// Where unit-by-unit training ([`unit_forward_backward`]) gets each sharding unit's parameters and hands back its
/// gradients: a model's own parameters ([`Llama::forward_backward`] with recomputation), or, fully sharded, an
/// all-gather of the ranks' slices before and a reduce-scatter of the gradients after.
pub trait UnitSource {
    /// Unit `u`'s parameters ([`ParamLayout::units`]): leaves that require grad, named with their HF keys.
    fn gather(&mut self, u: usize) -> Result<Params>;
    /// The backward of unit `u` for this micro-batch is done: `params` (what [`gather`](Self::gather) returned)
    /// carry its final gradients; it is not used again in this micro-batch.
    fn reduced(&mut self, u: usize, params: &Params) -> Result<()>;
}

/// A model's own parameters as a [`UnitSource`]: the units are views of them, gradients stay where they are.
struct OwnUnits<'a>(&'a Params);

impl UnitSource for OwnUnits<'_> {
    fn gather(&mut self, u: usize) -> Result<Params> {
        Ok(self.0.unit(u))
    }

    fn reduced(&mut self, _u: usize, _params: &Params) -> Result<()> {
        Ok(())
    }
}

/// Unit 0: the embeddings, the final norm and the head (the embeddings when tied).
struct Head {
    embed: Tensor,
    norm: RmsNorm,
    lm_head: Tensor,
}

impl Head {
    fn new(p: &Params, cfg: &LlamaConfig) -> Self {
        let embed = p.must("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            p.must("lm_head.weight")
        };
        Head {
            embed,
            norm: RmsNorm::new(p, "model.norm", cfg.rms_norm_eps),
            lm_head,
        }
    }

    fn logits(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h).linear::<&Tensor>(&self.lm_head, None)
    }
}

/// One micro-batch of training, one sharding unit at a time: accumulates `scale · ∇ Σ cross-entropy` into the
/// units' parameters and returns the cross-entropy sum (detached fp32 scalar on the device), as
/// [`Llama::forward_backward`].
///
/// Unit 0 (embeddings, final norm, head) is gathered first and kept to the end of the micro-batch; every block is
/// gathered for its forward and dropped after it. With `recompute` the forward runs without a graph keeping each
/// block's input, and the backward gathers each block again (in reverse), recomputes it with a graph and pushes the
/// gradient through it: one block's weights and activations at a time. Without, each block's graph (and so its
/// gathered weights) lives until its backward; the graph is cut at the blocks' boundaries so that each block's
/// gradients are final, and handed to [`UnitSource::reduced`], as soon as its backward is done.
pub fn unit_forward_backward(
    cfg: &LlamaConfig,
    batch: &Batch,
    scale: f64,
    recompute: bool,
    src: &mut dyn UnitSource,
) -> Result<Tensor> {
    let (_, t) = batch.inputs.size2()?;
    let p0 = src.gather(0)?;
    let head = Head::new(&p0, cfg);
    let (kind, device) = (p0.flat.kind(), p0.flat.device());
    let inv_freq = Tensor::from_slice(&cfg.rope_inv_freq()).to_device(device);
    let rope = Rope::new(&inv_freq, t, kind);
    let attn = attn_layout(cfg, &p0.flat, batch);
    let layers = cfg.num_hidden_layers;
    if recompute {
        let mut inputs = Vec::with_capacity(layers);
        let mut x =
            tch::no_grad(|| Tensor::embedding(&head.embed, &batch.inputs, -1, false, false));
        for i in 0..layers {
            let p = src.gather(1 + i)?;
            let block = Block::new(&p, i, cfg);
            let next = tch::no_grad(|| block.forward(&x, &rope, &attn));
            inputs.push(x);
            x = next;
        }
        let h = x.set_requires_grad(true);
        let loss = crate::loss::cross_entropy_sum_backward(&head.logits(&h), &batch.labels, scale)?;
        let mut g = h.grad();
        // Blocks in reverse: recompute one with a graph, push its output gradient through it (`Σ y·g` has gradient
        // g with respect to y).
        for (i, x_in) in inputs.into_iter().enumerate().rev() {
            let p = src.gather(1 + i)?;
            let block = Block::new(&p, i, cfg);
            let x_in = x_in.set_requires_grad(true);
            let y = block.forward(&x_in, &rope, &attn);
            (y * &g).sum(Kind::Float).backward();
            g = x_in.grad();
            drop(block);
            src.reduced(1 + i, &p)?;
        }
        // The embedding (its gradient adds to the head's when tied).
        let e = Tensor::embedding(&head.embed, &batch.inputs, -1, false, false);
        (e * &g).sum(Kind::Float).backward();
        drop(head);
        src.reduced(0, &p0)?;
        return Ok(loss);
    }
    let e = Tensor::embedding(&head.embed, &batch.inputs, -1, false, false);
    let mut x = e.detach().set_requires_grad(true);
    let mut segments = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = src.gather(1 + i)?;
        let y = Block::new(&p, i, cfg).forward(&x, &rope, &attn);
        let next = y.detach().set_requires_grad(true);
        segments.push((x, y, p));
        x = next;
    }
    let loss = crate::loss::cross_entropy_sum_backward(&head.logits(&x), &batch.labels, scale)?;
    let mut g = x.grad();
    while let Some((x_in, y, p)) = segments.pop() {
        crate::ops::backward_with_grad(&y, &g)?;
        drop(y);
        g = x_in.grad();
        src.reduced(1 + segments.len(), &p)?;
    }
    crate::ops::backward_with_grad(&e, &g)?;
    drop(head);
    src.reduced(0, &p0)?;
    Ok(loss)
}

/// Logits `(B, T, V)` of a batch, one sharding unit at a time, without a graph (evaluation of a sharded model).
pub fn unit_logits(cfg: &LlamaConfig, batch: &Batch, src: &mut dyn UnitSource) -> Result<Tensor> {
    let _ng = tch::no_grad_guard();
    let (_, t) = batch.inputs.size2()?;
    let p0 = src.gather(0)?;
    let head = Head::new(&p0, cfg);
    let inv_freq = Tensor::from_slice(&cfg.rope_inv_freq()).to_device(p0.flat.device());
    let rope = Rope::new(&inv_freq, t, p0.flat.kind());
    let attn = attn_layout(cfg, &p0.flat, batch);
    let mut x = Tensor::embedding(&head.embed, &batch.inputs, -1, false, false);
    for i in 0..cfg.num_hidden_layers {
        let p = src.gather(1 + i)?;
        x = Block::new(&p, i, cfg).forward(&x, &rope, &attn);
    }
    Ok(head.logits(&x))
}

/// `(B, 1, T, T)` bool: position i may attend to j iff j ≤ i and both lie in the same document.
pub fn document_mask(doc_ids: &Tensor) -> Tensor {
    let t = doc_ids.size()[1];
    let same = doc_ids.unsqueeze(2).eq_tensor(&doc_ids.unsqueeze(1)); // (B, T, T)
    let causal = Tensor::ones([t, t], (Kind::Bool, doc_ids.device())).tril(0);
    same.logical_and(&causal).unsqueeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `config.json` whose numbers would divide by zero or make NaN is a config error naming the key, never a
    /// panic or a model that trains on NaN.
    #[test]
    fn degenerate_configs_are_errors_naming_the_key() {
        let base = LlamaConfig::tiny(256);
        base.validate().unwrap();
        base.rope_inv_freq()
            .iter()
            .for_each(|f| assert!(f.is_finite() && *f > 0.0));
        let scaled = || {
            let mut c = LlamaConfig::tiny(256);
            c.rope_scaling = Some(RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            });
            c
        };
        scaled().validate().unwrap();
        type Breaks<T> = (&'static str, fn(&mut T));
        let cases: [Breaks<LlamaConfig>; 5] = [
            ("num_attention_heads", |c| c.num_attention_heads = 0),
            ("rms_norm_eps", |c| c.rms_norm_eps = 0.0),
            ("rms_norm_eps", |c| c.rms_norm_eps = f64::NAN),
            ("rope_theta", |c| c.rope_theta = -1.0),
            ("rope_theta", |c| c.rope_theta = 0.0),
        ];
        for (key, break_it) in &cases {
            let mut c = LlamaConfig::tiny(256);
            break_it(&mut c);
            let e = c.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
            let e = Llama::new(&c, Device::Cpu, Kind::Float, 1)
                .err()
                .expect(key)
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let scaled_cases: [Breaks<RopeScaling>; 3] = [
            ("high_freq_factor", |r| {
                r.high_freq_factor = r.low_freq_factor
            }),
            ("rope_scaling.factor", |r| r.factor = 0.0),
            ("original_max_position_embeddings", |r| {
                r.original_max_position_embeddings = 0
            }),
        ];
        for (key, break_it) in &scaled_cases {
            let mut c = scaled();
            break_it(c.rope_scaling.as_mut().unwrap());
            let e = c.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn presets_have_published_sizes() {
        let p = |c: LlamaConfig| c.num_params() as f64 / 1e9;
        assert!(
            (p(LlamaConfig::llama3_2_1b()) - 1.236).abs() < 0.01,
            "{}",
            p(LlamaConfig::llama3_2_1b())
        );
        assert!(
            (p(LlamaConfig::llama3_1_8b()) - 8.030).abs() < 0.01,
            "{}",
            p(LlamaConfig::llama3_1_8b())
        );
        assert!(
            (p(LlamaConfig::llama3_1_70b()) - 70.55).abs() < 0.05,
            "{}",
            p(LlamaConfig::llama3_1_70b())
        );
        // A tokenizer with more ids than the preset grows the embeddings (every id needs a row).
        assert_eq!(
            LlamaConfig::preset("8b", 128_257).unwrap().vocab_size,
            128_257
        );
        assert_eq!(LlamaConfig::preset("8b", 1000).unwrap().vocab_size, 128_256);
        assert!(LlamaConfig::preset("3b", 100).is_err());
    }

    #[test]
    fn llama3_scaling_matches_reference_bands() {
        let cfg = LlamaConfig::llama3_1_8b();
        let f = cfg.rope_inv_freq();
        let plain = LlamaConfig {
            rope_scaling: None,
            ..cfg.clone()
        }
        .rope_inv_freq();
        // Highest frequencies (short wavelengths) untouched; lowest divided by the factor.
        assert_eq!(f[0], plain[0]);
        assert!((f[63] / plain[63] - 1.0 / 8.0).abs() < 1e-6);
        // A medium band exists and lies strictly between.
        assert!(f.iter().zip(&plain).any(|(a, b)| *a < *b && *a > *b / 8.0));
    }

    #[test]
    fn same_seed_same_weights_and_params_are_views() {
        let cfg = LlamaConfig::tiny(50);
        let a = Llama::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap();
        let b = Llama::new(&cfg, Device::Cpu, Kind::Float, 7).unwrap();
        let c = Llama::new(&cfg, Device::Cpu, Kind::Float, 8).unwrap();
        assert!(a.params.flat.equal(&b.params.flat));
        assert!(!a.params.flat.equal(&c.params.flat));
        let _ng = tch::no_grad_guard();
        let _ = a.params.flat.narrow(0, 0, 1).fill_(3.0);
        assert_eq!(
            a.params
                .get("model.embed_tokens.weight")
                .unwrap()
                .double_value(&[0, 0]),
            3.0
        );
        // Unit 0 is the embeddings, the head and the final norm; every unit starts at a block boundary.
        let l = &a.params.layout;
        assert_eq!(l.units.len(), cfg.num_hidden_layers + 1);
        let unit0: Vec<&str> = l.specs[l.units[0].params.clone()]
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert!(cfg.tie_word_embeddings);
        assert_eq!(unit0, ["model.embed_tokens.weight", "model.norm.weight"]);
        assert!(l.units.iter().all(|u| u.start % NORM_BLOCK == 0));
        assert_eq!(l.specs.len(), a.params.params.len());
    }

    #[test]
    fn gqa_mask_path_equals_causal_path_for_one_document() {
        let cfg = LlamaConfig::tiny(50);
        let m = Llama::new(&cfg, Device::Cpu, Kind::Float, 1).unwrap();
        let ids = {
            let _g = rng_lock();
            Tensor::randint(50, [2, 12], (Kind::Int64, Device::Cpu))
        };
        let a = m.forward(&ids, None);
        let b = m.forward(
            &ids,
            Some(&Tensor::zeros([2, 12], (Kind::Int64, Device::Cpu))),
        );
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn segment_path_equals_mask_path() {
        let cfg = LlamaConfig::tiny(50);
        let mut m = Llama::new(&cfg, Device::Cpu, Kind::Float, 3).unwrap();
        let ids = {
            let _g = rng_lock();
            Tensor::randint(50, [2, 16], (Kind::Int64, Device::Cpu))
        };
        let toks: Vec<Vec<u32>> = (0..2)
            .map(|r| {
                Vec::<i64>::try_from(ids.get(r))
                    .unwrap()
                    .iter()
                    .map(|&x| x as u32)
                    .chain([0])
                    .collect()
            })
            .collect();
        let starts: [&[u32]; 2] = [&[0, 5, 11], &[0]];
        let rows: Vec<crate::batch::SequenceRef<'_>> = toks
            .iter()
            .zip(starts)
            .map(|(t, s)| crate::batch::SequenceRef {
                tokens: t,
                padding: 0,
                doc_starts: s,
                no_loss: &[],
            })
            .collect();
        let batch = Batch::new(&rows, Device::Cpu).unwrap();
        assert_eq!(
            batch.segments.as_deref(),
            Some(&[vec![5i64, 6, 5], vec![16]][..])
        );
        let a = m.forward_batch(&batch);
        let b = m.forward(&batch.inputs, batch.doc_ids.as_ref());
        let d = (&a - &b).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{d}");
        // Gradients agree too.
        a.square().sum(Kind::Float).backward();
        let ga = m.params.params[1].tensor.grad().copy();
        m.params.zero_grad();
        b.square().sum(Kind::Float).backward();
        let gb = m.params.params[1].tensor.grad().copy();
        let d = (ga - gb).abs().max().double_value(&[]);
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn recompute_gives_the_same_loss_and_gradients() {
        let cfg = LlamaConfig::tiny(50);
        let mut m = Llama::new(&cfg, Device::Cpu, Kind::Float, 4).unwrap();
        let toks: Vec<u32> = (0..17).map(|i| (i * 7 % 50) as u32).collect();
        let rows = [crate::batch::SequenceRef {
            tokens: &toks,
            padding: 2,
            doc_starts: &[0, 6],
            no_loss: &[],
        }];
        let batch = Batch::new(&rows, Device::Cpu).unwrap();
        let a = m.forward_backward(&batch, 0.5).double_value(&[]);
        let ga: Vec<Tensor> = m
            .params
            .params
            .iter()
            .map(|p| p.tensor.grad().copy())
            .collect();
        m.params.zero_grad();
        m.set_recompute(true);
        let b = m.forward_backward(&batch, 0.5).double_value(&[]);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        for (p, g) in m.params.params.iter().zip(&ga) {
            let d = (p.tensor.grad() - g).abs().max().double_value(&[]);
            assert!(d < 1e-5, "{}: {d}", p.name);
        }
    }

    #[test]
    fn kv_cache_decoding_equals_the_full_forward() {
        let model = Llama::new(&LlamaConfig::tiny(64), Device::Cpu, Kind::Float, 4).unwrap();
        let ids = {
            let _g = rng_lock();
            Tensor::randint(64, [2, 10], (Kind::Int64, Device::Cpu))
        };
        tch::no_grad(|| {
            let full = model.forward(&ids, None);
            let mut cache = KvCache::new();
            let mut parts = vec![model.forward_cached(&ids.narrow(1, 0, 6), &mut cache)];
            for i in 6..10 {
                parts.push(model.forward_cached(&ids.narrow(1, i, 1), &mut cache));
            }
            assert_eq!(cache.len(), 10);
            let inc = Tensor::cat(&parts, 1);
            let d = (&inc - &full).abs().max().double_value(&[]);
            assert!(d < 1e-5, "cached vs full: {d}");
        });
    }

    /// Left-padded prompts of different lengths decoded together give each row the logits it gets alone.
    #[test]
    fn padded_batch_decoding_equals_each_prompt_alone() {
        let model = Llama::new(&LlamaConfig::tiny(64), Device::Cpu, Kind::Float, 5).unwrap();
        let prompts: Vec<Vec<i64>> = vec![
            vec![3, 9, 27, 81 % 64, 5],
            vec![7, 11],
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        ];
        let cont: Vec<Vec<i64>> = vec![vec![10, 20, 30], vec![40, 50, 60], vec![11, 12, 13]];
        tch::no_grad(|| {
            let l = prompts.iter().map(Vec::len).max().unwrap();
            let mut ids = Vec::new();
            let mut valid = Vec::new();
            for p in &prompts {
                ids.extend(std::iter::repeat_n(0i64, l - p.len()).chain(p.iter().copied()));
                valid.extend((0..l).map(|j| j >= l - p.len()));
            }
            let b = prompts.len() as i64;
            let ids = Tensor::from_slice(&ids).view([b, l as i64]);
            let valid = Tensor::from_slice(&valid).view([b, l as i64]);
            let mut cache = KvCache::new();
            let first = model.forward_cached_padded(&ids, &valid, &mut cache);
            let mut steps = vec![first.select(1, l as i64 - 1)];
            for k in 0..3 {
                let next: Vec<i64> = cont.iter().map(|c| c[k]).collect();
                let t = Tensor::from_slice(&next).view([b, 1]);
                let ones = Tensor::ones([b, 1], (Kind::Bool, Device::Cpu));
                steps.push(
                    model
                        .forward_cached_padded(&t, &ones, &mut cache)
                        .select(1, 0),
                );
            }
            for (r, p) in prompts.iter().enumerate() {
                let mut seq = p.clone();
                seq.extend(&cont[r]);
                let full = model.forward(&Tensor::from_slice(&seq).view([1, -1]), None);
                for (k, s) in steps.iter().enumerate() {
                    let want = full.select(1, (p.len() - 1 + k) as i64).squeeze_dim(0);
                    let d = (s.get(r as i64) - &want).abs().max().double_value(&[]);
                    assert!(d < 1e-4, "row {r} step {k}: {d}");
                }
            }
        });
    }

    #[test]
    fn documents_do_not_see_each_other() {
        let cfg = LlamaConfig::tiny(50);
        let m = Llama::new(&cfg, Device::Cpu, Kind::Float, 1).unwrap();
        let ids = {
            let _g = rng_lock();
            Tensor::randint(50, [1, 16], (Kind::Int64, Device::Cpu))
        };
        let doc_ids =
            Tensor::from_slice(&[0i64, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([1, 16]);
        let packed = m.forward(&ids, Some(&doc_ids));
        // Second document alone (RoPE is relative, so global positions do not matter).
        let alone = m.forward(&ids.narrow(1, 6, 10), None);
        let d = (packed.narrow(1, 6, 10) - &alone)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-4, "{d}");
        // Without the mask the second document does see the first.
        let leaky = m.forward(&ids, None);
        let d = (leaky.narrow(1, 6, 10) - alone)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d > 1e-3, "{d}");
    }
}
