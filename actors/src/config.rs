//! The run configuration: TOML, every section `deny_unknown_fields`, every error with its key path and line.
//! Semantic checks (mix sums to 1, capacities non-zero, …) run after parsing and are reported all at once.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::stages::formex::EU_LANGS;
// The sections of the stages that own them (each stage's file holds its config), re-exported: `config::PackerConfig`.
pub use crate::stages::filter::{FilterConfig, FilterWeights};
pub use crate::stages::gen_sample::GenerateConfig;
pub use crate::stages::packer::{PackMode, PackerConfig};
pub use crate::stages::sampler::{default_mix, ExhaustedPolicy};

/// The embedded default (`lexflow run` without a file, and `make run`).
pub const SAMPLE_TOML: &str = include_str!("../../configs/sample.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub reader: ReaderConfig,
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    #[serde(default)]
    pub sampler: SamplerConfig,
    #[serde(default)]
    pub packer: PackerConfig,
    #[serde(default)]
    pub shards: ShardConfig,
    #[serde(default)]
    pub edges: EdgeConfig,
    /// Absent: preprocessing only, the per-rank edges end in a counting sink.
    pub train: Option<TrainConfig>,
    /// Held-out evaluation during training (off unless `paths` or `holdout` is set).
    #[serde(default)]
    pub eval: EvalConfig,
    /// Document deduplication before tokenization (off by default).
    #[serde(default)]
    pub dedup: crate::stages::dedup::DedupConfig,
    /// Quality filter before tokenization (`[filter]`; absent: every document is trained on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub name: String,
    /// Run directory (stats.json, quarantine.jsonl, checkpoints). Relative paths are relative to the working directory.
    pub dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Stop after this many packed sequences (None: when the input is exhausted).
    #[serde(default)]
    pub max_sequences: Option<u64>,
}

fn default_seed() -> u64 {
    1234
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Files, directories (searched recursively) and glob patterns. Empty: generate a sample corpus.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Sample corpus generated into the run directory when `paths` is empty.
    #[serde(default)]
    pub generate: GenerateConfig,
    /// How Q&A `.jsonl` pairs become training text: `plain` (`### Question`/`### Answer`) or `llama3` (the Llama 3
    /// chat template). `lexflow qa eval --model` reads it from the checkpoint.
    #[serde(default)]
    pub qa_template: crate::stages::qa_format::QaTemplate,
    /// System turn of the `llama3` template.
    #[serde(default)]
    pub qa_system: Option<String>,
}

impl InputConfig {
    pub fn prompt_format(&self) -> crate::stages::qa_format::PromptFormat {
        crate::stages::qa_format::PromptFormat {
            template: self.qa_template,
            system: self.qa_system.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    /// Reader threads per language lane.
    #[serde(default = "one")]
    pub threads: NonZeroUsize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig { threads: one() }
    }
}

fn one() -> NonZeroUsize {
    NonZeroUsize::MIN
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Path to an HF `tokenizer.json`; `"llama3"` means Meta's Llama 3 tokenizer (its `tokenizer.model`, embedded in
    /// the binary at build time; tiktoken's ids).
    #[serde(default = "default_tokenizer")]
    pub path: String,
    /// Tokenizer threads per language lane.
    #[serde(default = "one")]
    pub threads: NonZeroUsize,
    /// Prepend the BOS token to each document.
    #[serde(default)]
    pub add_bos: bool,
}

fn default_tokenizer() -> String {
    "llama3".into()
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            path: default_tokenizer(),
            threads: one(),
            add_bos: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    /// Target token share per language (ISO 639-1); must sum to 1.
    #[serde(default = "default_mix")]
    pub mix: BTreeMap<String, f64>,
    #[serde(default)]
    pub on_exhausted: ExhaustedPolicy,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            mix: default_mix(),
            on_exhausted: ExhaustedPolicy::Stop,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Logical shards: sequence `index` is in shard `index % count` (the Arrow tee's files); ranks get
    /// `index % world_size`, whatever the shard count.
    #[serde(default = "default_shards")]
    pub count: NonZeroUsize,
    /// Ranks when there is no `[train]` section (the sinks).
    #[serde(default = "one")]
    pub ranks: NonZeroUsize,
    /// Optional tee: Arrow IPC files (zstd) with every sequence, one file per logical shard.
    #[serde(default)]
    pub arrow_dir: Option<PathBuf>,
}

fn default_shards() -> NonZeroUsize {
    NonZeroUsize::new(32).expect("non-zero")
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            count: default_shards(),
            ranks: one(),
            arrow_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Capacity (in messages) of every edge unless overridden below. Zero is an error: edges are never unbounded.
    #[serde(default = "default_capacity")]
    pub capacity: NonZeroUsize,
    /// Per-edge overrides by stage name: `reader`, `tokenizer`, `sampler`, `packer`, `rank`.
    #[serde(default)]
    pub overrides: BTreeMap<String, NonZeroUsize>,
}

fn default_capacity() -> NonZeroUsize {
    NonZeroUsize::new(8).expect("non-zero")
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            capacity: default_capacity(),
            overrides: BTreeMap::new(),
        }
    }
}

impl EdgeConfig {
    pub fn capacity_of(&self, stage: &str) -> NonZeroUsize {
        self.overrides.get(stage).copied().unwrap_or(self.capacity)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// One trainer actor per entry: `"cpu"`, `"cuda:0"`, … (overridden by torchrun-style env vars).
    pub devices: Vec<String>,
    /// Model preset (`tiny`, `125m`, `1b`, `8b`, `70b`).
    #[serde(default = "default_model")]
    pub model: String,
    /// Sequences per micro-batch per rank.
    #[serde(default = "one")]
    pub micro_batch: NonZeroUsize,
    #[serde(default = "one")]
    pub grad_accum: NonZeroUsize,
    pub steps: u64,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// After the warmup: `cosine` (to `min_lr` at `steps`), `wsd` (warmup-stable-decay: `lr`, then a linear decay
    /// to `min_lr` over the last `decay_steps`), `constant`.
    #[serde(default)]
    pub schedule: lexflow_gpu::LrSchedule,
    /// `wsd`: length of the final decay (default: the last 10% of `steps`).
    #[serde(default)]
    pub decay_steps: Option<u64>,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Write a checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Initialise from these HF safetensors weights instead of random.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute): `true`, `false`,
    /// or `"auto"` (on CUDA when the estimated memory of a step would not fit the device; never on CPU).
    #[serde(default)]
    pub recompute: Recompute,
    /// Parameter and activation dtype (the optimizer state is fp32 whatever this says).
    #[serde(default)]
    pub dtype: TrainDtype,
    /// How the training state is split over the data-parallel ranks: `"none"` (replicated), `"optimizer"` (ZeRO-2:
    /// the fp32 master, moments and reduced gradient), `"full"` (ZeRO-3 / FSDP: also the weights, gathered one
    /// transformer block at a time). Unset: `"optimizer"` when `shard_optimizer = true`, else `"none"`.
    #[serde(default)]
    pub shard: Option<ShardSetting>,
    /// The older spelling of `shard = "optimizer"`.
    #[serde(default)]
    pub shard_optimizer: bool,
    /// Keep the best checkpoint by this evaluation metric (`heldout_loss`, `qa_citation_accuracy`, `qa_rouge_l`,
    /// `qa_exact_match`, `qa_hallucination_rate`): it is never pruned, `run.dir/best` points to it, and the summary
    /// and `stats.json` name it. Needs an evaluation at every checkpoint (`eval.every` dividing `checkpoint_every`).
    #[serde(default)]
    pub keep_best: Option<BestMetric>,
    /// CPU optimizer offload (with `shard = "full"`: ZeRO-3-Offload): the fp32 master, moments and gradient slice in
    /// (pinned) host memory, AdamW on the host's cores, the updated weights copied back to the GPU.
    #[serde(default)]
    pub offload_optimizer: bool,
}

/// `train.keep_best`: the evaluation metric that picks the best checkpoint.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    /// Held-out loss (all languages, token-weighted): lower is better.
    HeldoutLoss,
    QaCitationAccuracy,
    QaRougeL,
    QaExactMatch,
    /// Share of answers citing an unknown provision: lower is better.
    QaHallucinationRate,
}

impl BestMetric {
    pub fn name(self) -> &'static str {
        match self {
            BestMetric::HeldoutLoss => "heldout_loss",
            BestMetric::QaCitationAccuracy => "qa_citation_accuracy",
            BestMetric::QaRougeL => "qa_rouge_l",
            BestMetric::QaExactMatch => "qa_exact_match",
            BestMetric::QaHallucinationRate => "qa_hallucination_rate",
        }
    }

    /// Measured on `eval.qa_gold` (else on the held-out set).
    pub fn needs_qa(self) -> bool {
        self != BestMetric::HeldoutLoss
    }

    /// Whether `a` is strictly better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            BestMetric::HeldoutLoss | BestMetric::QaHallucinationRate => a < b,
            _ => a > b,
        }
    }

    /// The metric's value in an evaluation (None when it was not measured).
    pub fn value(self, r: &crate::tasks::heldout::EvalResult) -> Option<f64> {
        let qa = r.qa.as_ref().map(|q| &q.overall);
        match self {
            BestMetric::HeldoutLoss => r.loss,
            BestMetric::QaCitationAccuracy => qa.map(|q| q.citation_accuracy),
            BestMetric::QaRougeL => qa.map(|q| q.rouge_l),
            BestMetric::QaExactMatch => qa.map(|q| q.exact_match),
            BestMetric::QaHallucinationRate => qa.map(|q| q.hallucination_rate),
        }
        .filter(|v| v.is_finite())
    }
}

/// `train.shard`: `"none"`, `"optimizer"` or `"full"`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShardSetting {
    None,
    Optimizer,
    Full,
}

impl TrainConfig {
    /// The sharding mode: `train.shard`, or `shard_optimizer`'s.
    pub fn shard_mode(&self) -> lexflow_gpu::plan::ShardMode {
        use lexflow_gpu::plan::ShardMode;
        match (self.shard, self.shard_optimizer) {
            (Some(ShardSetting::None), _) => ShardMode::None,
            (Some(ShardSetting::Optimizer), _) | (None, true) => ShardMode::Optimizer,
            (Some(ShardSetting::Full), _) => ShardMode::Full,
            (None, false) => ShardMode::None,
        }
    }
}

/// `train.recompute`: `true`, `false` or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Decide from the device's memory (CUDA) — off on CPU.
    #[default]
    Auto,
    On,
    Off,
}

impl Serialize for Recompute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Recompute::Auto => s.serialize_str("auto"),
            Recompute::On => s.serialize_bool(true),
            Recompute::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Recompute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected true, false or \"auto\""))?
        {
            Raw::Bool(true) => Ok(Recompute::On),
            Raw::Bool(false) => Ok(Recompute::Off),
            Raw::Str(s) if s == "auto" => Ok(Recompute::Auto),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "{s:?}: expected true, false or \"auto\""
            ))),
        }
    }
}

/// `train.dtype`: what the model's parameters and activations are stored in.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    /// bf16 on CUDA, fp32 on CPU.
    #[default]
    Auto,
    /// bf16 parameters and activations, fp32 master weights and moments (also on CPU: slow, for numerics checks).
    Bf16,
    /// fp32 everywhere (also on CUDA).
    Fp32,
}

impl TrainDtype {
    /// Whether a rank on a CUDA (`cuda = true`) or CPU device trains in bf16.
    pub fn is_bf16(self, cuda: bool) -> bool {
        match self {
            TrainDtype::Auto => cuda,
            TrainDtype::Bf16 => true,
            TrainDtype::Fp32 => false,
        }
    }
}

fn default_model() -> String {
    "tiny".into()
}
fn default_lr() -> f64 {
    3e-4
}
fn default_wd() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_keep() -> usize {
    3
}

/// `[eval]`: a held-out set, fixed at the start of the run, whose loss per language the trainer measures every
/// `every` steps and after the last one (`docs/EVAL_LOSS.md`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out inputs (files, directories, globs; FORMEX or Q&A `.jsonl`, which may mix languages here). Never
    /// trained on unless they are also among `input.paths`.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Fraction of the input acts held out of training and evaluated instead, chosen by a hash of the file name with
    /// its language code blanked: an act is held out in every language or in none.
    #[serde(default)]
    pub holdout: f64,
    /// Evaluate every N optimizer steps (0: only after the last step).
    #[serde(default)]
    pub every: u64,
    /// At most this many packed sequences per language.
    #[serde(default = "default_eval_sequences")]
    pub max_sequences: usize,
    /// Sequences per forward pass (default: `train.micro_batch`).
    #[serde(default)]
    pub micro_batch: Option<NonZeroUsize>,
    /// Q&A gold pairs (`lexflow qa build`'s `eval.jsonl`): at each evaluation the model answers them (greedy, the
    /// run's `input.qa_template`) and is scored like `lexflow qa eval` (exact match, ROUGE-L, citations).
    #[serde(default)]
    pub qa_gold: Option<PathBuf>,
    /// `citations.json` for the hallucination check (default: the gold answers' own citations).
    #[serde(default)]
    pub qa_index: Option<PathBuf>,
    /// Questions per language of the mix (the first ones of the gold file).
    #[serde(default = "default_qa_per_language")]
    pub qa_per_language: usize,
    #[serde(default = "default_qa_max_new_tokens")]
    pub qa_max_new_tokens: usize,
    /// Questions generated together (left-padded).
    #[serde(default = "default_qa_batch_size")]
    pub qa_batch_size: NonZeroUsize,
}

fn default_eval_sequences() -> usize {
    32
}
fn default_qa_per_language() -> usize {
    8
}
fn default_qa_max_new_tokens() -> usize {
    128
}
fn default_qa_batch_size() -> NonZeroUsize {
    NonZeroUsize::new(8).expect("8 > 0")
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            paths: Vec::new(),
            holdout: 0.0,
            every: 0,
            max_sequences: default_eval_sequences(),
            micro_batch: None,
            qa_gold: None,
            qa_index: None,
            qa_per_language: default_qa_per_language(),
            qa_max_new_tokens: default_qa_max_new_tokens(),
            qa_batch_size: default_qa_batch_size(),
        }
    }
}

impl EvalConfig {
    /// Any evaluation at all (held-out loss or Q&A).
    pub fn enabled(&self) -> bool {
        self.has_loss_set() || self.qa_gold.is_some()
    }

    /// A held-out set for the loss (`paths` or `holdout`).
    pub fn has_loss_set(&self) -> bool {
        !self.paths.is_empty() || self.holdout > 0.0
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Keep serving /metrics this many seconds after the run ends (so a scraper sees the final values).
    #[serde(default)]
    pub linger_seconds: u64,
}

fn yes() -> bool {
    true
}

fn default_listen() -> String {
    "127.0.0.1:9400".into()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: default_listen(),
            linger_seconds: 0,
        }
    }
}

/// A config error: where (file, key path, line) and why. `errors` holds every semantic error found at once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io::Error is part of the message, not a `source`: `{:#}` would print it a second time.
    #[error(
        "cannot read config {path}: {error} (check the path; relative paths are relative to the working directory)"
    )]
    Io { path: String, error: std::io::Error },
    #[error("{origin}:{line}: key `{key}`: {message}")]
    Parse {
        origin: String,
        key: String,
        line: usize,
        message: String,
    },
    /// Not TOML (or not a table we can read): the parser's own position and message, no key path to give.
    #[error("{origin}{}: {message}", position(*line, *column))]
    Syntax {
        origin: String,
        /// 1-based; 0 when the parser gave no position.
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {} error(s):\n{}", .errors.len(), .errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid { origin: String, errors: Vec<String> },
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates. `origin` names the source in messages (file path or `<embedded sample>`).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg = Self::parse(text, origin)?;
        let errors = cfg.validate(text);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                errors,
            })
        }
    }

    /// What a command that reads the config's files runs first: the config (a file, or the embedded sample) parsed
    /// and validated, and the files it names checked (`checks`), all errors at once — so a missing corpus path,
    /// tokenizer or checkpoint is a config error naming its key and line before anything starts, not a failure
    /// halfway through the run. [`Self::from_toml`] does not look at the filesystem (a config can be written,
    /// printed and tested before its files exist).
    pub fn load_checked(path: Option<&Path>, checks: FileChecks) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|error| ConfigError::Io {
                    path: p.display().to_string(),
                    error,
                })?,
                p.display().to_string(),
            ),
            None => (
                SAMPLE_TOML.to_string(),
                "<embedded configs/sample.toml>".to_string(),
            ),
        };
        let cfg = Self::parse(&text, &origin)?;
        let mut errors = cfg.validate(&text);
        errors.extend(cfg.check_files(&text, checks));
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid { origin, errors })
        }
    }

    /// The files and directories the config names that do not exist (or cannot be what they must be), as
    /// `line N: key `k`: why` messages. Glob patterns are only checked for syntax: the reader reports a pattern that
    /// matches nothing.
    pub fn check_files(&self, text: &str, checks: FileChecks) -> Vec<String> {
        let mut errs = Vec::new();
        let at = |key: &str| match find_key_line(text, key) {
            Some(l) => format!("line {l}: key `{key}`"),
            None => format!("key `{key}`"),
        };
        let missing = |p: &Path| {
            let cwd = std::env::current_dir()
                .map(|d| {
                    format!(
                        " (relative paths are relative to the working directory, {})",
                        d.display()
                    )
                })
                .unwrap_or_default();
            format!(
                "{} does not exist{}",
                p.display(),
                if p.is_relative() { cwd } else { String::new() }
            )
        };
        let mut inputs = |key: &str, paths: &[String]| {
            for p in paths {
                if p.contains(['*', '?', '[']) {
                    if let Err(e) = glob::Pattern::new(p) {
                        errs.push(format!(
                            "{}: `{p}` is not a valid glob pattern ({} at character {}); e.g. \"corpus/**/*.xml\"",
                            at(key),
                            e.msg,
                            e.pos + 1
                        ));
                    } else if let Err(e) =
                        crate::stages::reader::expand_inputs(std::slice::from_ref(p))
                    {
                        // A pattern that matches no input file (or cannot be walked): said here with its key and
                        // line, not later by the reader without either.
                        errs.push(format!("{}: {e}", at(key)));
                    }
                } else if std::fs::metadata(p).is_err() {
                    errs.push(format!(
                        "{}: {}: list files, directories or glob patterns that exist",
                        at(key),
                        missing(Path::new(p))
                    ));
                }
            }
        };
        inputs("input.paths", &self.input.paths);
        inputs("eval.paths", &self.eval.paths);
        for (key, file) in [
            ("eval.qa_gold", &self.eval.qa_gold),
            ("eval.qa_index", &self.eval.qa_index),
        ] {
            if let Some(f) = file.as_deref().filter(|f| !f.is_file()) {
                errs.push(format!(
                    "{}: {}: give the file `lexflow qa build` wrote (eval.jsonl, citations.json)",
                    at(key),
                    missing(f)
                ));
            }
        }
        if checks.tokenizer {
            if let Err(e) = crate::stages::tokenizer::resolve_spec(&self.tokenizer.path) {
                errs.push(format!(
                    "{}: {e} (give \"llama3\" or the path of a Hugging Face tokenizer.json)",
                    at("tokenizer.path")
                ));
            }
        }
        if let (true, Some(dir)) = (
            checks.init_from,
            self.train.as_ref().and_then(|t| t.init_from.as_deref()),
        ) {
            if !dir.join("config.json").is_file() {
                let why = if dir.exists() {
                    format!("{} has no config.json", dir.display())
                } else {
                    missing(dir)
                };
                errs.push(format!(
                    "{}: {why}: give a Hugging Face model directory (config.json + safetensors), e.g. a checkpoint \
                     `<run.dir>/checkpoints/step-NNNNNN`",
                    at("train.init_from")
                ));
            }
        }
        errs
    }

    /// A config stored in a checkpoint (`run_config.toml`): parsed, not validated again — the run ran with it, and
    /// checks added since must not lock its checkpoints out of `--resume`, `replay` or `provenance`.
    pub fn stored(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::parse(text, origin)
    }

    /// A stored config file ([`Self::stored`]).
    pub fn stored_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Self::stored(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let cfg: Result<Config, ConfigError> = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = inner
                .span()
                .map(|s| line_col(text, s.start))
                .unwrap_or((0, 0));
            // toml's messages may run over several lines ("invalid string\nexpected `\"`"): keep them on one.
            let message = inner
                .message()
                .trim_end()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ");
            let message = explain_nonzero(&key, message);
            // A syntax error or a duplicate key fails before any field is entered: the path is `.`, which names
            // nothing. Give the parser's line and column instead of a bogus key.
            if key == "." || key.is_empty() {
                ConfigError::Syntax {
                    origin: origin.to_string(),
                    line,
                    column,
                    message,
                }
            } else {
                ConfigError::Parse {
                    origin: origin.to_string(),
                    key,
                    line,
                    message,
                }
            }
        });
        match cfg {
            Ok(cfg) => Ok(cfg),
            Err(ConfigError::Parse {
                origin,
                key,
                line,
                message,
            }) => {
                let more = further_key_errors(text, &key);
                if more.is_empty() {
                    Err(ConfigError::Parse {
                        origin,
                        key,
                        line,
                        message,
                    })
                } else {
                    let mut errors = vec![format!("line {line}: key `{key}`: {message}")];
                    errors.extend(more);
                    Err(ConfigError::Invalid { origin, errors })
                }
            }
            Err(e) => Err(e),
        }
    }

    fn validate(&self, text: &str) -> Vec<String> {
        let mut errs = Vec::new();
        // `line N: key `a.b.c``. A key written inside an inline table (`mix = { en = 0.5 }`) or left at its
        // default has no line of its own: give the line of the closest enclosing key or table that has one.
        let at = |key: &str| -> String {
            let mut k = key;
            loop {
                if let Some(l) = find_key_line(text, k) {
                    return format!("line {l}: key `{key}`");
                }
                match k.rsplit_once('.') {
                    Some((parent, _)) => k = parent,
                    None => return format!("key `{key}`"),
                }
            }
        };
        if self.run.max_sequences == Some(0) {
            errs.push(format!(
                "{}: 0 must be at least 1 (or leave the key out to run until the input is exhausted)",
                at("run.max_sequences")
            ));
        }
        if let Err(why) = check_listen(&self.metrics.listen) {
            errs.push(format!(
                "{}: {:?} {why}",
                at("metrics.listen"),
                self.metrics.listen
            ));
        }
        let mix = &self.sampler.mix;
        if mix.is_empty() {
            errs.push(format!(
                "{}: the language mix is empty; give at least one language",
                at("sampler.mix")
            ));
        }
        let mut sum = 0.0;
        for (lang, share) in mix {
            if !(share.is_finite() && *share > 0.0 && *share <= 1.0) {
                errs.push(format!(
                    "{}: share {share} must be in (0, 1]",
                    at(&format!("sampler.mix.{lang}"))
                ));
            }
            if lang.len() != 2 || !lang.chars().all(|c| c.is_ascii_lowercase()) {
                errs.push(format!(
                    "{}: `{lang}` is not a lower-case ISO 639-1 code like `en`",
                    at("sampler.mix")
                ));
            } else if !EU_LANGS.contains(&lang.as_str()) {
                errs.push(format!(
                    "{}: `{lang}` is not an official EU language, so no FORMEX file can be in it (expected one of {})",
                    at("sampler.mix"),
                    EU_LANGS.join(", ")
                ));
            }
            sum += share;
        }
        if !mix.is_empty() && (sum - 1.0).abs() > 1e-6 {
            errs.push(format!(
                "{}: shares sum to {sum}, they must sum to 1",
                at("sampler.mix")
            ));
        }
        if self.packer.seq_len.get() < 2 {
            errs.push(format!("{}: must be at least 2", at("packer.seq_len")));
        }
        for k in self.edges.overrides.keys() {
            if !["reader", "tokenizer", "sampler", "packer", "rank"].contains(&k.as_str()) {
                errs.push(format!(
                    "{}: unknown stage `{k}` (expected reader, tokenizer, sampler, packer, rank)",
                    at("edges.overrides")
                ));
            }
        }
        if let Some(t) = &self.train {
            if t.devices.is_empty() {
                errs.push(format!(
                    "{}: list at least one device, e.g. [\"cpu\"]",
                    at("train.devices")
                ));
            }
            for d in &t.devices {
                if !(d == "cpu"
                    || d.strip_prefix("cuda:")
                        .is_some_and(|n| n.parse::<usize>().is_ok()))
                {
                    errs.push(format!(
                        "{}: `{d}` is not `cpu` or `cuda:N`",
                        at("train.devices")
                    ));
                }
            }
            for (i, d) in t.devices.iter().enumerate() {
                if d.starts_with("cuda:") && t.devices[..i].contains(d) {
                    errs.push(format!(
                        "{}: `{d}` is listed twice: one rank per GPU (NCCL refuses two ranks on one device); \
                         list each GPU once",
                        at("train.devices")
                    ));
                }
            }
            if t.steps == 0 {
                errs.push(format!("{}: must be at least 1", at("train.steps")));
            }
            if !(t.lr.is_finite() && t.lr > 0.0) {
                errs.push(format!(
                    "{}: {} must be finite and > 0 (the peak learning rate, e.g. 3e-4)",
                    at("train.lr"),
                    t.lr
                ));
            }
            if !(t.min_lr.is_finite() && t.min_lr >= 0.0) {
                errs.push(format!(
                    "{}: {} must be finite and in [0, train.lr] (the learning rate the cosine schedule decays to)",
                    at("train.min_lr"),
                    t.min_lr
                ));
            } else if t.lr.is_finite() && t.lr > 0.0 && t.min_lr > t.lr {
                errs.push(format!(
                    "{}: {} is above train.lr = {}; it must be in [0, train.lr] (the schedule decays from lr down \
                     to min_lr)",
                    at("train.min_lr"),
                    t.min_lr,
                    t.lr
                ));
            }
            if let Some(d) = t.decay_steps {
                if t.schedule != lexflow_gpu::LrSchedule::Wsd {
                    errs.push(format!(
                        "{}: only the `wsd` schedule has a decay phase (train.schedule = \"wsd\")",
                        at("train.decay_steps")
                    ));
                } else if d == 0 || d > t.steps.saturating_sub(t.warmup_steps) {
                    errs.push(format!(
                        "{}: {d} must be in [1, train.steps - train.warmup_steps = {}] (the final decay of the \
                         wsd schedule)",
                        at("train.decay_steps"),
                        t.steps.saturating_sub(t.warmup_steps)
                    ));
                }
            }
            if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
                errs.push(format!(
                    "{}: {} must be finite and >= 0 (0: no weight decay)",
                    at("train.weight_decay"),
                    t.weight_decay
                ));
            }
            for (key, beta) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
                if !(beta.is_finite() && (0.0..1.0).contains(&beta)) {
                    errs.push(format!(
                        "{}: {beta} must be in [0, 1) (an AdamW moment decay, e.g. 0.9 or 0.95)",
                        at(key)
                    ));
                }
            }
            if !(t.eps.is_finite() && t.eps > 0.0) {
                errs.push(format!(
                    "{}: {} must be finite and > 0 (AdamW's denominator term, e.g. 1e-8)",
                    at("train.eps"),
                    t.eps
                ));
            }
            if t.shard_optimizer
                && matches!(t.shard, Some(ShardSetting::None) | Some(ShardSetting::Full))
            {
                errs.push(format!(
                    "{}: `shard_optimizer = true` contradicts `shard = {:?}`; keep only `shard` (\"none\", \"optimizer\" \
                     or \"full\")",
                    at("train.shard_optimizer"),
                    t.shard.map_or("", |m| match m {
                        ShardSetting::None => "none",
                        ShardSetting::Optimizer => "optimizer",
                        ShardSetting::Full => "full",
                    })
                ));
            }
            if let Some(m) = t.keep_best {
                let ev = &self.eval;
                if m.needs_qa() && ev.qa_gold.is_none() {
                    errs.push(format!(
                        "{}: `{}` is measured on Q&A pairs: set `eval.qa_gold` (or keep the best by \"heldout_loss\")",
                        at("train.keep_best"),
                        m.name()
                    ));
                }
                if !m.needs_qa() && ev.holdout <= 0.0 && ev.paths.is_empty() {
                    errs.push(format!(
                        "{}: `heldout_loss` needs a held-out set: set `eval.holdout` or `eval.paths`",
                        at("train.keep_best")
                    ));
                }
                if ev.every == 0 && t.checkpoint_every > 0 {
                    errs.push(format!(
                        "{}: with `eval.every = 0` only the last checkpoint is evaluated: set `eval.every` to a \
                         divisor of `train.checkpoint_every` ({})",
                        at("train.keep_best"),
                        t.checkpoint_every
                    ));
                } else if ev.every > 0 && t.checkpoint_every % ev.every != 0 {
                    errs.push(format!(
                        "{}: every checkpoint needs an evaluation to be compared: `train.checkpoint_every` ({}) must \
                         be a multiple of `eval.every` ({})",
                        at("train.keep_best"),
                        t.checkpoint_every,
                        ev.every
                    ));
                }
            }
            if t.offload_optimizer && t.shard_mode() != lexflow_gpu::plan::ShardMode::Full {
                errs.push(format!(
                    "{}: optimizer offload needs fully sharded state: set `train.shard = \"full\"` (an offloaded \
                     replicated or ZeRO-2 state would be reduced in host memory)",
                    at("train.offload_optimizer")
                ));
            }
            if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
                errs.push(format!(
                    "{}: {} must be finite and >= 0 (the maximum global gradient norm; 0 turns clipping off)",
                    at("train.grad_clip"),
                    t.grad_clip
                ));
            }
            if !MODEL_PRESETS.contains(&t.model.as_str()) {
                errs.push(format!(
                    "{}: unknown model preset `{}` (expected one of {})",
                    at("train.model"),
                    t.model,
                    MODEL_PRESETS.join(", ")
                ));
            }
            if t.keep_checkpoints == 0 {
                errs.push(format!(
                    "{}: keep at least 1 checkpoint",
                    at("train.keep_checkpoints")
                ));
            }
        }
        if self.input.qa_system.is_some()
            && self.input.qa_template != crate::stages::qa_format::QaTemplate::Llama3
        {
            errs.push(format!(
                "{}: a system turn needs input.qa_template = \"llama3\" (the plain template has none)",
                at("input.qa_system")
            ));
        }
        let e = &self.eval;
        if !(e.holdout.is_finite() && (0.0..=0.5).contains(&e.holdout)) {
            errs.push(format!(
                "{}: {} must be in [0, 0.5] (a fraction of the input acts)",
                at("eval.holdout"),
                e.holdout
            ));
        }
        for (key, n, what) in [
            (
                "eval.qa_per_language",
                e.qa_per_language,
                "questions per mix language",
            ),
            (
                "eval.qa_max_new_tokens",
                e.qa_max_new_tokens,
                "tokens per generated answer",
            ),
        ] {
            if n == 0 {
                errs.push(format!("{}: 0 must be at least 1 ({what})", at(key)));
            }
        }
        if e.qa_index.is_some() && e.qa_gold.is_none() {
            errs.push(format!(
                "{}: a citation index without eval.qa_gold has nothing to check",
                at("eval.qa_index")
            ));
        }
        if e.max_sequences == 0 {
            errs.push(format!(
                "{}: 0 must be at least 1 (packed sequences per language)",
                at("eval.max_sequences")
            ));
        }
        if e.enabled() && self.train.is_none() {
            errs.push(format!(
                "{}: evaluation needs a model: add a [train] section or remove [eval]",
                at("eval")
            ));
        }
        for (key, why) in self.dedup.check() {
            let key = match key {
                "dedup.bands" if self.dedup.bands != 0 && self.dedup.rows == 0 => "dedup.rows",
                k => k,
            };
            errs.push(format!("{}: {why}", at(key)));
        }
        if let Some(f) = &self.filter {
            for (key, why) in f.check() {
                errs.push(format!("{}: {why}", at(&key)));
            }
        }
        if self.input.paths.is_empty() && self.input.generate.acts_per_language == 0 {
            errs.push(format!(
                "{}: no input paths and nothing to generate; set input.paths or input.generate.acts_per_language",
                at("input")
            ));
        }
        if self.input.paths.is_empty() {
            // The generated sample corpus is the input: it must hold every language the mix asks for.
            let langs = &self.input.generate.languages;
            for (i, l) in langs.iter().enumerate() {
                if !EU_LANGS.contains(&l.as_str()) {
                    errs.push(format!(
                        "{}: `{l}` is not an official EU language in lower case (expected one of {})",
                        at("input.generate.languages"),
                        EU_LANGS.join(", ")
                    ));
                } else if langs[..i].contains(l) {
                    errs.push(format!(
                        "{}: `{l}` is listed twice",
                        at("input.generate.languages")
                    ));
                }
            }
            let missing: Vec<&str> = mix
                .keys()
                .filter(|l| !langs.contains(l))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() && !langs.is_empty() {
                errs.push(format!(
                    "{}: sampler.mix has {} but input.paths is empty and the generated corpus has only {}: \
                     that language would have no input; add it to input.generate.languages or remove it from \
                     sampler.mix",
                    at("input.generate.languages"),
                    missing.join(", "),
                    langs.join(", ")
                ));
            }
            if langs.is_empty() {
                errs.push(format!(
                    "{}: empty, and input.paths is empty too: list the languages to generate, e.g. [\"en\", \"fr\"]",
                    at("input.generate.languages")
                ));
            }
        }
        if self.run.name.trim().is_empty() {
            errs.push(format!(
                "{}: empty: give the run a name (it labels the metrics and the summary)",
                at("run.name")
            ));
        }
        if self.run.dir.as_os_str().is_empty() {
            errs.push(format!(
                "{}: empty: give the run its own directory (stats, checkpoints and quarantine report go there; \
                 \".\" would be the working directory)",
                at("run.dir")
            ));
        }
        if self.train.is_some() && self.shards.ranks.get() != 1 {
            errs.push(format!(
                "{}: {} ranks, but with a [train] section the ranks are train.devices (one per entry): remove \
                 shards.ranks (it only sizes a run without [train])",
                at("shards.ranks"),
                self.shards.ranks
            ));
        }
        // `[eval]` keys that cannot act: there is nothing to evaluate, or no questions to answer. Only values other
        // than the default count: `lexflow config` (and a checkpoint's run_config.toml) writes every key.
        let d = EvalConfig::default();
        for (key, changed, needs_loss_set) in [
            ("eval.every", e.every != d.every, false),
            (
                "eval.max_sequences",
                e.max_sequences != d.max_sequences,
                true,
            ),
            ("eval.micro_batch", e.micro_batch.is_some(), true),
        ] {
            let idle = if needs_loss_set {
                !e.has_loss_set()
            } else {
                !e.enabled()
            };
            if changed && idle {
                errs.push(format!(
                    "{}: set, but there is nothing {}: set eval.holdout or eval.paths{}, or remove it",
                    at(key),
                    if needs_loss_set {
                        "held out to compute a loss on"
                    } else {
                        "to evaluate"
                    },
                    if needs_loss_set { "" } else { " (or eval.qa_gold)" }
                ));
            }
        }
        for (key, changed) in [
            (
                "eval.qa_per_language",
                e.qa_per_language != d.qa_per_language,
            ),
            (
                "eval.qa_max_new_tokens",
                e.qa_max_new_tokens != d.qa_max_new_tokens,
            ),
            ("eval.qa_batch_size", e.qa_batch_size != d.qa_batch_size),
        ] {
            if changed && e.qa_gold.is_none() {
                errs.push(format!(
                    "{}: set, but eval.qa_gold is not: there are no questions to answer; set eval.qa_gold or remove it",
                    at(key)
                ));
            }
        }
        errs
    }

    /// World size: number of trainer devices, or `shards.ranks` without training.
    pub fn world_size(&self) -> usize {
        match &self.train {
            Some(t) => t.devices.len().max(1),
            None => self.shards.ranks.get(),
        }
    }
}

/// Which files [`Config::load_checked`] checks besides the inputs (`input.paths`, `eval.paths`, `eval.qa_*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileChecks {
    /// `tokenizer.path` (`llama3`: the embedded Llama 3 tokenizer, or `$LEXFLOW_LLAMA3_TOKENIZER`).
    pub tokenizer: bool,
    /// `train.init_from`.
    pub init_from: bool,
}

/// The model presets `train.model` accepts: those of `lexflow_gpu::LlamaConfig::preset`.
pub const MODEL_PRESETS: [&str; 5] = ["tiny", "125m", "1b", "8b", "70b"];

/// `metrics.listen` must be `host:port` (what the metrics server binds): a non-empty host (an IPv6 address in
/// brackets, `[::1]:9400`) and a port in 0..=65535.
fn check_listen(listen: &str) -> Result<(), String> {
    let example = "write host:port, e.g. \"127.0.0.1:9400\"";
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(format!("has no port: {example}"));
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(format!("has no valid host before the port: {example}"));
    }
    if host.contains(':')
        && !(host.starts_with('[')
            && host.ends_with(']')
            && host[1..host.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok())
    {
        return Err(format!(
            "is not host:port: {example}, with an IPv6 address in brackets (\"[::1]:9400\")"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "has port `{port}`, which is not a number in 0..=65535: {example}"
        ));
    }
    Ok(())
}

/// serde's message for a `NonZeroUsize` ("invalid value: integer `0`, expected a nonzero usize") says neither why
/// nor what to write: say both.
fn explain_nonzero(key: &str, message: String) -> String {
    if !message.contains("expected a nonzero usize") {
        return message;
    }
    let why = if key.starts_with("edges.") {
        "every edge is bounded and blocking, nothing is unbounded: give a capacity in messages (default 8)"
    } else if key == "packer.seq_len" {
        "a sequence needs tokens: give tokens per sequence, at least 2 (default 4096)"
    } else if key.ends_with("threads") {
        "give the number of threads per language lane (default 1)"
    } else if key == "shards.ranks" {
        "give the number of ranks (sinks) of a run without [train] (default 1)"
    } else {
        "leave the key out for its default"
    };
    format!("{message}: it must be a whole number >= 1; {why}")
}

fn position(line: usize, column: usize) -> String {
    match (line, column) {
        (0, _) => String::new(),
        (l, 0) => format!(":{l}"),
        (l, c) => format!(":{l}:{c}"),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let mut byte = byte.min(text.len());
    while !text.is_char_boundary(byte) {
        byte -= 1;
    }
    let before = &text[..byte];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// Best-effort line of `a.b.c`: the line of key `c` after the `[a]`/`[a.b]` table header.
/// The key errors (unknown keys, wrong types) after the first one, which serde stops at: the offending key is
/// taken out of the parsed table and the rest deserialized again, so that a config with several such mistakes gets
/// them all in one report. Stops at what cannot be taken out (a missing key, an array element) or after 32.
fn further_key_errors(text: &str, first: &str) -> Vec<String> {
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    let mut key = first.to_string();
    for _ in 0..32 {
        if !remove_key(&mut table, &key) {
            break;
        }
        let e = match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(
            table.clone(),
        )) {
            Ok(_) => break,
            Err(e) => e,
        };
        key = e.path().to_string();
        let message = e.into_inner().to_string();
        if key == "." || key.is_empty() || key.contains('[') || message.contains("missing field") {
            break;
        }
        // Errors of a parsed table end with the key's table ("in `train`"): the report names the key already.
        let message = message
            .trim_end()
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("in `"))
            .collect::<Vec<_>>()
            .join("; ");
        let message = explain_nonzero(&key, message);
        // A key in an inline table has no line of its own: the closest enclosing key or table that has one.
        let mut k = key.as_str();
        let line = loop {
            if let Some(l) = find_key_line(text, k) {
                break l;
            }
            match k.rsplit_once('.') {
                Some((parent, _)) => k = parent,
                None => break 0,
            }
        };
        errors.push(format!("line {line}: key `{key}`: {message}"));
    }
    errors
}

/// Removes the dotted `key` from `table`; false when it is not there.
fn remove_key(table: &mut toml::Table, key: &str) -> bool {
    match key.split_once('.') {
        None => table.remove(key).is_some(),
        Some((head, rest)) => match table.get_mut(head) {
            Some(toml::Value::Table(t)) => remove_key(t, rest),
            _ => false,
        },
    }
}

fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let parts: Vec<&str> = dotted.split('.').collect();
    let (table, key) = if parts.len() > 1 {
        (parts[..parts.len() - 1].join("."), parts[parts.len() - 1])
    } else {
        (String::new(), parts[0])
    };
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = h.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            if current == dotted {
                return Some(i + 1);
            }
            continue;
        }
        let k = line.split('=').next().unwrap_or("").trim();
        if (current == table && k == key) || (current.is_empty() && k == dotted) {
            return Some(i + 1);
        }
        if table.starts_with(&current) && !current.is_empty() {
            let rest = &dotted[current.len()..].trim_start_matches('.');
            if k == *rest {
                return Some(i + 1);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_sample_parses() {
        let c = Config::from_toml(SAMPLE_TOML, "sample").unwrap();
        assert!(!c.sampler.mix.is_empty());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let t = "[run]\nname = \"x\"\ndir = \"r\"\n\n[packer]\nseq_len = 16\nsequence_len = 4\n";
        let e = Config::from_toml(t, "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml:7"), "{e}");
        assert!(e.contains("sequence_len"), "{e}");
    }

    #[test]
    fn zero_capacity_is_rejected_with_line() {
        let t = "[run]\nname = \"x\"\ndir = \"r\"\n[edges]\ncapacity = 0\n";
        let e = Config::from_toml(t, "t.toml").unwrap_err().to_string();
        assert!(e.contains(":5") && e.contains("edges.capacity"), "{e}");
    }

    #[test]
    fn train_recompute_takes_bools_or_auto_and_round_trips() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n[train]\ndevices = [\"cpu\"]\nsteps = 1\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        assert_eq!(c.train.unwrap().recompute, Recompute::Auto);
        for (v, want) in [
            ("true", Recompute::On),
            ("false", Recompute::Off),
            ("\"auto\"", Recompute::Auto),
        ] {
            let c = Config::from_toml(&format!("{base}recompute = {v}\n"), "t.toml").unwrap();
            assert_eq!(c.train.as_ref().unwrap().recompute, want);
            // What checkpoints store (run_config.toml) reads back the same.
            let again = Config::from_toml(&toml::to_string(&c).unwrap(), "again.toml").unwrap();
            assert_eq!(again.train.unwrap().recompute, want);
        }
        let e = Config::from_toml(&format!("{base}recompute = \"sometimes\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml:7") && e.contains("train.recompute") && e.contains("auto"),
            "{e}"
        );
    }

    #[test]
    fn train_dtype_defaults_to_auto_and_rejects_unknown_values_with_line() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n[train]\ndevices = [\"cpu\"]\nsteps = 1\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        let t = c.train.unwrap();
        assert_eq!(t.dtype, TrainDtype::Auto);
        assert!(!t.dtype.is_bf16(false) && t.dtype.is_bf16(true));
        for (v, want) in [("bf16", TrainDtype::Bf16), ("fp32", TrainDtype::Fp32)] {
            let c = Config::from_toml(&format!("{base}dtype = \"{v}\"\n"), "t.toml").unwrap();
            assert_eq!(c.train.unwrap().dtype, want);
        }
        assert!(TrainDtype::Bf16.is_bf16(false) && !TrainDtype::Fp32.is_bf16(true));
        let e = Config::from_toml(&format!("{base}dtype = \"fp16\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml:7") && e.contains("train.dtype") && e.contains("fp16"),
            "{e}"
        );
    }

    #[test]
    fn filter_section_is_off_when_absent_and_errors_name_key_and_line() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        assert!(c.filter.is_none());
        // Absent, it is not printed either: existing configs serialize as before.
        assert!(!toml::to_string(&c).unwrap().contains("filter"));
        let c =
            Config::from_toml(&format!("{base}[filter]\nkeep_fraction = 0.4\n"), "t.toml").unwrap();
        assert_eq!(c.filter.as_ref().unwrap().keep_fraction, Some(0.4));
        let again = Config::from_toml(&toml::to_string(&c).unwrap(), "t.toml").unwrap();
        assert_eq!(again.filter, c.filter);
        let e = invalid(&format!(
            "{base}[filter]\nkeep_fraction = 1.5\nweights = {{ length = -1 }}\n[filter.types]\nstatute = 0.5\n"
        ));
        assert!(e.contains("line 5: key `filter.keep_fraction`"), "{e}");
        assert!(e.contains("line 6: key `filter.weights.length`"), "{e}");
        assert!(e.contains("line 8: key `filter.types.statute`"), "{e}");
        let e = invalid(&format!("{base}[filter]\nweights = {{ recency = 1 }}\n"));
        assert!(
            e.contains("line 4: key `filter`") && e.contains("keep_fraction"),
            "{e}"
        );
        let e = invalid(&format!(
            "{base}[filter]\nkeep_fraction = 0.4\nthreshold = 0.5\n"
        ));
        assert!(e.contains("line 6: key `filter.threshold`"), "{e}");
        let e = invalid(&format!("{base}[filter]\nkeep_fraction = 0.4\nkeep = 3\n"));
        assert!(e.contains("t.toml:6: key `filter.keep`"), "{e}");
        let e = invalid(&format!("{base}[filter.weights]\nrecency = 1\ntopic = 2\n"));
        assert!(e.contains("filter.weights.topic"), "{e}");
    }

    #[test]
    fn dedup_section_defaults_off_and_errors_name_key_and_line() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        assert!(!c.dedup.enabled());
        assert_eq!(
            (c.dedup.bands, c.dedup.rows, c.dedup.threshold),
            (14, 8, 0.9)
        );
        let c = Config::from_toml(&format!("{base}[dedup]\nmode = \"near\"\n"), "t.toml").unwrap();
        assert_eq!(c.dedup.mode, crate::stages::dedup::DedupMode::Near);
        let e = Config::from_toml(
            &format!("{base}[dedup]\nmode = \"near\"\nthreshold = 1.5\nbands = 0\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 6: key `dedup.threshold`"), "{e}");
        assert!(e.contains("line 7: key `dedup.bands`"), "{e}");
        let e = Config::from_toml(&format!("{base}[dedup]\nmode = \"fuzzy\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml:5: key `dedup.mode`") && e.contains("`near`"),
            "{e}"
        );
    }

    #[test]
    fn eval_section_defaults_off_and_errors_name_key_and_line() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n[train]\ndevices = [\"cpu\"]\nsteps = 1\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        assert!(!c.eval.enabled());
        assert_eq!(c.eval.max_sequences, 32);
        let c = Config::from_toml(&format!("{base}[eval]\nholdout = 0.05\n"), "t.toml").unwrap();
        assert!(c.eval.enabled() && c.eval.every == 0);
        let e = Config::from_toml(&format!("{base}[eval]\nholdout = 0.7\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 8: key `eval.holdout`") && e.contains("[0, 0.5]"),
            "{e}"
        );
        let e = Config::from_toml(&format!("{base}[eval]\nmax_sequences = 0\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 8: key `eval.max_sequences`"), "{e}");
        for key in ["qa_per_language", "qa_max_new_tokens"] {
            let e = Config::from_toml(
                &format!("{base}[eval]\nqa_gold = \"g.jsonl\"\n{key} = 0\n"),
                "t.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("line 9: key `eval.{key}`: 0 must be at least 1")),
                "{e}"
            );
        }
        let e = Config::from_toml(&format!("{base}[eval]\nevery_steps = 5\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.toml:8") && e.contains("every_steps"), "{e}");
        // Evaluation without a model to evaluate.
        let e = Config::from_toml(
            "[run]\nname = \"x\"\ndir = \"r\"\n[eval]\npaths = [\"h\"]\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 4: key `eval`") && e.contains("[train]"),
            "{e}"
        );
    }

    #[test]
    fn all_semantic_errors_reported_at_once() {
        let t = "[run]\nname = \"x\"\ndir = \"r\"\n[sampler]\nmix = { en = 0.5, FR = 0.2 }\n[train]\ndevices = [\"tpu\"]\nsteps = 0\n";
        let e = Config::from_toml(t, "t.toml").unwrap_err();
        let ConfigError::Invalid { errors, .. } = &e else {
            panic!("{e}")
        };
        assert!(errors.len() >= 4, "{errors:#?}");
        let s = e.to_string();
        assert!(
            s.contains("sum to 0.7")
                && s.contains("tpu")
                && s.contains("train.steps")
                && s.contains("FR"),
            "{s}"
        );
    }

    const TRAIN_BASE: &str =
        "[run]\nname = \"x\"\ndir = \"r\"\n[train]\ndevices = [\"cpu\"]\nsteps = 1\n";

    fn invalid(toml: &str) -> String {
        Config::from_toml(toml, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_at_once() {
        let e = invalid(
            "[run]\nname = \"x\"\ndir = \"r\"\nbogus = 1\n[packer]\nseq_len = \"x\"\n[sampler]\nmix = { en = 1.0, xx = \"a\" }\n\
             [train]\ndevices = [\"cpu\"]\nsteps = 1\nfoo = 2\n",
        );
        for want in [
            "4 error(s)",
            "line 4: key `run.bogus`: unknown field `bogus`",
            "line 6: key `packer.seq_len`",
            "line 8: key `sampler.mix.xx`",
            "line 12: key `train.foo`: unknown field `foo`",
        ] {
            assert!(e.contains(want), "want {want:?} in {e}");
        }
        // One mistake keeps its one-line form.
        let e = invalid(&format!("{TRAIN_BASE}foo = 2\n"));
        assert!(
            e.starts_with("t.toml:7: key `train.foo`: unknown field `foo`"),
            "{e}"
        );
    }

    #[test]
    fn wsd_decay_steps_are_checked_against_the_schedule() {
        let e = invalid(&format!("{TRAIN_BASE}decay_steps = 3\n"));
        assert!(
            e.contains("line 7: key `train.decay_steps`") && e.contains("wsd"),
            "{e}"
        );
        let e = invalid(&format!(
            "{TRAIN_BASE}schedule = \"wsd\"\ndecay_steps = 0\n"
        ));
        assert!(
            e.contains("line 8: key `train.decay_steps`") && e.contains("[1,"),
            "{e}"
        );
        let e = invalid(&format!("{TRAIN_BASE}schedule = \"linear\"\n"));
        assert!(e.contains("train.schedule") && e.contains("wsd"), "{e}");
    }

    #[test]
    fn keep_best_needs_its_metric_measured_at_every_checkpoint() {
        let ok = |extra: &str| {
            Config::from_toml(&format!("{TRAIN_BASE}{extra}"), "t.toml").map_err(|e| e.to_string())
        };
        let good = "checkpoint_every = 4\nkeep_best = \"heldout_loss\"\n[eval]\nholdout = 0.1\nevery = 2\n";
        let c = ok(good).unwrap();
        assert_eq!(c.train.unwrap().keep_best, Some(BestMetric::HeldoutLoss));
        for (extra, want) in [
            (
                "keep_best = \"qa_rouge_l\"\n[eval]\nholdout = 0.1\n",
                ["line 7: key `train.keep_best`", "eval.qa_gold"],
            ),
            (
                "keep_best = \"heldout_loss\"\n",
                ["line 7: key `train.keep_best`", "eval.holdout"],
            ),
            (
                "checkpoint_every = 3\nkeep_best = \"heldout_loss\"\n[eval]\nholdout = 0.1\nevery = 2\n",
                ["key `train.keep_best`", "multiple of `eval.every` (2)"],
            ),
            (
                "checkpoint_every = 3\nkeep_best = \"heldout_loss\"\n[eval]\nholdout = 0.1\n",
                ["key `train.keep_best`", "eval.every = 0"],
            ),
            ("keep_best = \"perplexity\"\n", ["train.keep_best", "heldout_loss"]),
        ] {
            let e = ok(extra).unwrap_err();
            for w in want {
                assert!(e.contains(w), "{extra}: want {w:?} in {e}");
            }
        }
        // Lower is better for losses and hallucinations, higher for the rest.
        assert!(BestMetric::HeldoutLoss.better(1.0, 2.0) && !BestMetric::QaRougeL.better(1.0, 2.0));
        assert!(BestMetric::QaHallucinationRate.better(0.1, 0.2));
    }

    #[test]
    fn sharding_keys_resolve_and_contradictions_name_the_key() {
        use lexflow_gpu::plan::ShardMode;
        let mode = |extra: &str| {
            Config::from_toml(&format!("{TRAIN_BASE}{extra}"), "t.toml")
                .unwrap()
                .train
                .unwrap()
                .shard_mode()
        };
        assert_eq!(mode(""), ShardMode::None);
        assert_eq!(mode("shard_optimizer = true\n"), ShardMode::Optimizer);
        assert_eq!(mode("shard = \"optimizer\"\n"), ShardMode::Optimizer);
        assert_eq!(mode("shard = \"full\"\n"), ShardMode::Full);
        assert_eq!(
            mode("shard = \"full\"\noffload_optimizer = true\n"),
            ShardMode::Full
        );
        let e = invalid(&format!(
            "{TRAIN_BASE}shard = \"full\"\nshard_optimizer = true\n"
        ));
        assert!(
            e.contains("line 8: key `train.shard_optimizer`") && e.contains("\"full\""),
            "{e}"
        );
        let e = invalid(&format!("{TRAIN_BASE}offload_optimizer = true\n"));
        assert!(
            e.contains("line 7: key `train.offload_optimizer`") && e.contains("shard = \"full\""),
            "{e}"
        );
        let e = invalid(&format!("{TRAIN_BASE}shard = \"zero3\"\n"));
        assert!(e.contains("train.shard") && e.contains("full"), "{e}");
    }

    #[test]
    fn optimizer_keys_out_of_range_name_key_line_range_and_value() {
        for (line, want) in [
            (
                "beta1 = 1.5",
                ["line 7: key `train.beta1`", "1.5", "[0, 1)"],
            ),
            ("beta2 = 1.0", ["line 7: key `train.beta2`", "1", "[0, 1)"]),
            (
                "beta1 = -0.1",
                ["line 7: key `train.beta1`", "-0.1", "[0, 1)"],
            ),
            ("eps = -1", ["line 7: key `train.eps`", "-1", "> 0"]),
            ("eps = 0.0", ["line 7: key `train.eps`", "0", "> 0"]),
            (
                "grad_clip = -1",
                [
                    "line 7: key `train.grad_clip`",
                    "-1",
                    "0 turns clipping off",
                ],
            ),
            (
                "grad_clip = nan",
                ["line 7: key `train.grad_clip`", "NaN", ">= 0"],
            ),
            (
                "weight_decay = -3",
                ["line 7: key `train.weight_decay`", "-3", ">= 0"],
            ),
            (
                "lr = inf",
                ["line 7: key `train.lr`", "inf", "finite and > 0"],
            ),
            ("lr = nan", ["line 7: key `train.lr`", "NaN", "> 0"]),
            (
                "min_lr = -1e-5",
                ["line 7: key `train.min_lr`", "-0.00001", "[0, train.lr]"],
            ),
        ] {
            let e = invalid(&format!("{TRAIN_BASE}{line}\n"));
            for w in want {
                assert!(e.contains(w), "{line}: want {w:?} in {e}");
            }
        }
        // min_lr above lr: both values in the message.
        let e = invalid(&format!("{TRAIN_BASE}lr = 1e-3\nmin_lr = 5.0\n"));
        assert!(
            e.contains("line 8: key `train.min_lr`")
                && e.contains("5 is above train.lr = 0.001")
                && e.contains("[0, train.lr]"),
            "{e}"
        );
        // An invalid lr is one error: min_lr is not also reported as "above" it.
        let e = invalid(&format!("{TRAIN_BASE}lr = -1.0\n"));
        assert!(
            e.contains("key `train.lr`") && !e.contains("train.min_lr"),
            "{e}"
        );
        // min_lr = lr (a constant schedule after warmup) and grad_clip = 0 (no clipping) are fine.
        Config::from_toml(
            &format!("{TRAIN_BASE}lr = 1e-3\nmin_lr = 1e-3\ngrad_clip = 0.0\nweight_decay = 0.0\nbeta1 = 0.0\n"),
            "t.toml",
        )
        .unwrap();
    }

    #[test]
    fn run_max_sequences_zero_is_rejected_with_line() {
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\nmax_sequences = 0\n");
        assert!(
            e.contains("line 4: key `run.max_sequences`") && e.contains("at least 1"),
            "{e}"
        );
        let c = Config::from_toml(
            "[run]\nname = \"x\"\ndir = \"r\"\nmax_sequences = 1\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.run.max_sequences, Some(1));
    }

    #[test]
    fn unknown_model_preset_is_rejected_with_line_and_the_presets() {
        let e = invalid(&format!("{TRAIN_BASE}model = \"huge\"\n"));
        assert!(
            e.contains("line 7: key `train.model`")
                && e.contains("`huge`")
                && e.contains("tiny, 125m, 1b, 8b, 70b"),
            "{e}"
        );
        // The list is the trainer's: every preset builds, and the one rejected here is rejected there too.
        for p in MODEL_PRESETS {
            lexflow_gpu::LlamaConfig::preset(p, 1000).unwrap();
            Config::from_toml(&format!("{TRAIN_BASE}model = \"{p}\"\n"), "t.toml").unwrap();
        }
        assert!(lexflow_gpu::LlamaConfig::preset("huge", 1000).is_err());
    }

    #[test]
    fn metrics_listen_must_be_host_and_port() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n[metrics]\n";
        for (listen, why) in [
            ("localhost", "has no port"),
            ("abc:99999", "`99999`"),
            (":9400", "no valid host"),
            ("127.0.0.1:", "port ``"),
            ("::1:9400", "brackets"),
        ] {
            let e = invalid(&format!("{base}listen = \"{listen}\"\n"));
            assert!(
                e.contains("line 5: key `metrics.listen`")
                    && e.contains(&format!("{listen:?}"))
                    && e.contains(why)
                    && e.contains("127.0.0.1:9400"),
                "{listen}: {e}"
            );
        }
        for ok in [
            "localhost:9400",
            "0.0.0.0:0",
            "[::1]:9400",
            "metrics.example:80",
        ] {
            Config::from_toml(&format!("{base}listen = \"{ok}\"\n"), "t.toml").unwrap();
        }
    }

    #[test]
    fn bad_share_in_an_inline_mix_table_has_the_line_of_the_table() {
        let e =
            invalid("[run]\nname = \"x\"\ndir = \"r\"\n[sampler]\nmix = { en = 0.5, fr = -0.5 }\n");
        assert!(
            e.contains("line 5: key `sampler.mix.fr`") && e.contains("-0.5"),
            "{e}"
        );
        // The sub-table form gives the share's own line.
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\n[sampler.mix]\nen = 0.5\nfr = -0.5\n");
        assert!(e.contains("line 6: key `sampler.mix.fr`"), "{e}");
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_give_the_parser_position_without_a_key() {
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\nseed = = 3\n");
        assert!(e.starts_with("t.toml:4:"), "{e}");
        assert!(!e.contains("key `.`"), "{e}");
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\nname = \"y\"\n");
        assert!(
            e.starts_with("t.toml:4:") && e.contains("duplicate key") && !e.contains("key `.`"),
            "{e}"
        );
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\n[run]\nseed = 1\n");
        assert!(e.starts_with("t.toml:4:") && !e.contains("key `.`"), "{e}");
    }
    #[test]
    fn zero_counts_say_why_and_what_to_write() {
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\n[edges]\ncapacity = 0\n");
        assert!(
            e.contains("t.toml:5: key `edges.capacity`")
                && e.contains(">= 1")
                && e.contains("bounded"),
            "{e}"
        );
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\n[packer]\nseq_len = 0\n");
        assert!(
            e.contains("packer.seq_len") && e.contains("at least 2"),
            "{e}"
        );
        let e = invalid(&format!("{TRAIN_BASE}micro_batch = 0\n"));
        assert!(
            e.contains("t.toml:7: key `train.micro_batch`") && e.contains(">= 1"),
            "{e}"
        );
    }

    #[test]
    fn mix_languages_must_be_eu_languages_the_input_can_have() {
        let base = "[run]\nname = \"x\"\ndir = \"r\"\n";
        let e = invalid(&format!(
            "{base}[input]\npaths = [\"c\"]\n[sampler]\nmix = {{ en = 0.5, xx = 0.5 }}\n"
        ));
        assert!(
            e.contains("line 7: key `sampler.mix`")
                && e.contains("`xx` is not an official EU language"),
            "{e}"
        );
        // The generated corpus (no input.paths) must hold every mix language.
        let e = invalid(&format!(
            "{base}[input.generate]\nlanguages = [\"en\", \"fr\"]\n[sampler]\nmix = {{ en = 0.5, it = 0.5 }}\n"
        ));
        assert!(
            e.contains("line 5: key `input.generate.languages`")
                && e.contains("sampler.mix has it"),
            "{e}"
        );
        let e = invalid(&format!(
            "{base}[input.generate]\nlanguages = [\"en\", \"en\", \"EN\"]\n[sampler]\nmix = {{ en = 1.0 }}\n"
        ));
        assert!(
            e.contains("`en` is listed twice") && e.contains("`EN` is not"),
            "{e}"
        );
        // With input paths the generator's languages do not matter.
        Config::from_toml(
            &format!("{base}[input]\npaths = [\"c\"]\n[sampler]\nmix = {{ en = 0.5, it = 0.5 }}\n"),
            "t.toml",
        )
        .unwrap();
    }

    #[test]
    fn settings_that_cannot_act_are_errors() {
        // shards.ranks sizes a run without [train]; with [train] the ranks are the devices.
        let e = invalid(&format!("{TRAIN_BASE}[shards]\nranks = 4\n"));
        assert!(
            e.contains("line 8: key `shards.ranks`") && e.contains("train.devices"),
            "{e}"
        );
        // Evaluation keys with nothing to evaluate.
        for (eval, key) in [
            ("every = 5", "eval.every"),
            ("max_sequences = 4", "eval.max_sequences"),
            ("micro_batch = 2", "eval.micro_batch"),
            ("qa_per_language = 4", "eval.qa_per_language"),
            ("qa_batch_size = 4", "eval.qa_batch_size"),
            ("qa_max_new_tokens = 4", "eval.qa_max_new_tokens"),
        ] {
            let e = invalid(&format!("{TRAIN_BASE}[eval]\n{eval}\n"));
            assert!(
                e.contains(&format!("line 8: key `{key}`: set, but")),
                "{eval}: {e}"
            );
        }
        // …and with something to evaluate they are fine; `max_sequences` needs a held-out set, not only questions.
        Config::from_toml(
            &format!("{TRAIN_BASE}[eval]\nholdout = 0.1\nevery = 5\nmax_sequences = 4\nmicro_batch = 2\n"),
            "t.toml",
        )
        .unwrap();
        let e = invalid(&format!(
            "{TRAIN_BASE}[eval]\nqa_gold = \"g.jsonl\"\nevery = 5\nmax_sequences = 4\n"
        ));
        assert!(
            e.contains("line 10: key `eval.max_sequences`") && !e.contains("eval.every"),
            "{e}"
        );
        // A GPU listed twice; empty run name or directory.
        let e = invalid(
            "[run]\nname = \"x\"\ndir = \"r\"\n[train]\ndevices = [\"cuda:0\", \"cuda:0\"]\nsteps = 1\n",
        );
        assert!(
            e.contains("line 5: key `train.devices`") && e.contains("twice"),
            "{e}"
        );
        let e = invalid("[run]\nname = \"\"\ndir = \"\"\n");
        assert!(
            e.contains("line 2: key `run.name`") && e.contains("line 3: key `run.dir`"),
            "{e}"
        );
    }

    #[test]
    fn printed_effective_configs_validate_again() {
        // `lexflow config` writes every key with its value: what it prints must run as it is.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for f in [
            "sample.toml",
            "eurlex-cpt-llama3.toml",
            "eurlex-sft-llama3.toml",
        ] {
            let c = Config::from_file(&dir.join(f)).unwrap();
            let printed = toml::to_string_pretty(&c).unwrap();
            Config::from_toml(&printed, f).unwrap_or_else(|e| panic!("{f}: {e}\n{printed}"));
        }
        let c = Config::from_toml(TRAIN_BASE, "t.toml").unwrap();
        Config::from_toml(&toml::to_string_pretty(&c).unwrap(), "again.toml").unwrap();
    }

    #[test]
    fn dedup_rows_of_zero_names_rows() {
        let e = invalid("[run]\nname = \"x\"\ndir = \"r\"\n[dedup]\nrows = 0\n");
        assert!(e.contains("line 5: key `dedup.rows`"), "{e}");
    }

    #[test]
    fn missing_files_name_key_and_line_and_all_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        let ok = dir.path().join("corpus");
        std::fs::create_dir(&ok).unwrap();
        std::fs::write(ok.join("a.xml"), "<ACT/>").unwrap();
        let matching = format!("{}/*.xml", ok.display());
        let text = format!(
            "[run]\nname = \"x\"\ndir = \"r\"\n[input]\npaths = [{ok:?}, \"/no/such/dir\", \"c/[x\", \
             \"/no/such/**/*.xml\", {matching:?}]\n\
             [tokenizer]\npath = \"/no/tokenizer.json\"\n[train]\ndevices = [\"cpu\"]\nsteps = 1\n\
             init_from = \"/no/ckpt\"\n[eval]\nqa_gold = \"/no/eval.jsonl\"\n",
            ok = ok.display().to_string()
        );
        std::fs::write(&cfg, &text).unwrap();
        // Parsing alone does not look at the filesystem.
        Config::from_toml(&text, "c.toml").unwrap();
        let all = FileChecks {
            tokenizer: true,
            init_from: true,
        };
        let e = Config::load_checked(Some(&cfg), all)
            .unwrap_err()
            .to_string();
        for want in [
            "line 5: key `input.paths`: /no/such/dir does not exist",
            "line 5: key `input.paths`: `c/[x` is not a valid glob pattern",
            "line 5: key `input.paths`: /no/such/**/*.xml: no input matches",
            "line 7: key `tokenizer.path`: tokenizer file /no/tokenizer.json not found",
            "line 11: key `train.init_from`: /no/ckpt does not exist",
            "line 13: key `eval.qa_gold`: /no/eval.jsonl does not exist",
        ] {
            assert!(e.contains(want), "want {want:?} in {e}");
        }
        assert!(!e.contains(&ok.display().to_string()), "{e}");
        // Without the optional checks the tokenizer and init_from are not looked at.
        let e = Config::load_checked(Some(&cfg), FileChecks::default())
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("tokenizer.path") && !e.contains("init_from"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_config_says_why_once() {
        let e = Config::from_file(Path::new("/no/such/config.toml")).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            shown.matches("No such file or directory").count(),
            1,
            "{shown}"
        );
        assert!(shown.contains("/no/such/config.toml"), "{shown}");
    }
}
