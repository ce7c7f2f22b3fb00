//! Memory and speed planning of a rank: whether the model's training state fits the device (refused before anything
//! is allocated, naming what would fit), whether to recompute activations (`train.recompute = "auto"`), and the
//! peak FLOP/s and resident memory that the MFU and memory metrics are measured against.

use std::time::Instant;

use lexflow_gpu::plan::{gib, plan, PlanSpec, ShardMode};
use lexflow_gpu::LlamaConfig;
use tch::{Device, Kind};

use super::setup::TrainerError;

/// How a run splits its training state: the mode, over how many ranks, optimizer state offloaded or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sharding {
    pub mode: ShardMode,
    pub world: usize,
    pub offload: bool,
}

impl Sharding {
    pub(crate) const REPLICATED: Sharding = Sharding {
        mode: ShardMode::None,
        world: 1,
        offload: false,
    };

    pub(crate) fn new(mode: ShardMode, world: usize, offload: bool) -> Self {
        Sharding {
            mode,
            world: world.max(1),
            offload,
        }
    }
}

/// The planner's spec of one rank of a run.
pub(crate) fn rank_spec(
    c: &LlamaConfig,
    elt: u64,
    sh: Sharding,
    tokens: u64,
    recompute: bool,
) -> PlanSpec {
    PlanSpec {
        model: c.clone(),
        world: sh.world,
        param_bytes: elt,
        shard: sh.mode,
        offload: sh.offload,
        tokens,
        recompute,
    }
}

/// Estimated memory of one micro-batch of `tokens` tokens without recomputation (the planner's activations, logits
/// and workspace).
pub(super) fn activation_bytes(c: &LlamaConfig, tokens: u64, elt: u64) -> u64 {
    plan(&rank_spec(c, elt, Sharding::REPLICATED, tokens, false))
        .device
        .batch()
}

/// The fewest ranks in `lo..=hi` for which `fits` holds, by bisection: a sharded rank's memory only falls as ranks
/// are added (its slice shrinks, its buffers stay ≈16 Mi elements).
fn fewest_ranks(lo: usize, hi: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if lo > hi || !fits(hi) {
        return None;
    }
    let (mut lo, mut hi) = (lo, hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// `train.recompute = "auto"`: recompute when state + activations would take more than 85% of the device.
pub(super) fn needs_recompute(state: u64, activations: u64, total: u64) -> bool {
    (state + activations) as f64 > 0.85 * total as f64
}

/// Parameters, gradients and (replicated or sharded) optimizer state must leave room for activations on the device.
/// Refuses a model whose training state cannot fit on the device, naming the cheapest mode that would (and from how
/// many ranks on); returns the state's bytes per rank as the planner counts them (weights, gathered units and
/// gradients in `param_bytes` per element; the fp32 master, moments and gradient of the rank's slice unless
/// offloaded; communication buffers). `recompute`: whether recomputation may be used (it decides how many gathered
/// units a fully sharded rank holds).
pub(super) fn check_fits(
    mcfg: &LlamaConfig,
    param_bytes: u64,
    total: u64,
    ordinal: usize,
    sh: Sharding,
    recompute: bool,
) -> Result<u64, TrainerError> {
    let n = mcfg.num_params() as u64;
    let state_of = |sh: Sharding| plan(&rank_spec(mcfg, param_bytes, sh, 0, recompute)).device;
    let mine = state_of(sh);
    let need = mine.state();
    let budget = (0.9 * total as f64) as u64;
    let fits =
        |mode, offload| move |r: usize| state_of(Sharding::new(mode, r, offload)).state() <= budget;
    let from = |mode, offload| fewest_ranks(2, 1 << 16, fits(mode, offload));
    // Fully sharded state shrinks with the ranks; offloaded, the fp32 part leaves the GPU.
    let full_hint = || {
        match (from(ShardMode::Full, false), from(ShardMode::Full, true)) {
        (Some(r), Some(o)) if o < r => Some(format!(
            "set `train.shard = \"full\"` (weights, gradients and AdamW state split over the ranks: it fits from {r} \
             ranks on; with `train.offload_optimizer = true`, the fp32 AdamW state in host memory, from {o} ranks on)"
        )),
        (Some(r), _) => Some(format!(
            "set `train.shard = \"full\"` (weights, gradients and AdamW state split over the ranks: it fits from \
             {r} ranks on)"
        )),
        (None, Some(r)) => Some(format!(
            "set `train.shard = \"full\"` and `train.offload_optimizer = true` (weights and gradients split over \
             the ranks, the fp32 AdamW state in host memory: it fits from {r} ranks on)"
        )),
        (None, None) => None,
    }
    };
    let gib_of = |b: u64| format!("{:.1} GiB", gib(b));
    let tail = |hint: Option<String>| {
        let mut h = hint.map(|h| h + ", ").unwrap_or_default();
        h += "pick a smaller `train.model`, or use GPUs with more memory (`lexflow plan` shows what each mode needs)";
        h
    };
    if sh.mode != ShardMode::Full {
        // Weights and their gradients are whole on every rank: when they alone do not fit, more ranks of this mode
        // do not help (saying so would send the user on a fruitless hunt for GPUs); full sharding might.
        let whole = mine.weights + mine.gradients;
        if whole > budget {
            let bf16 = if param_bytes > 2 && 4 * n <= budget {
                "set `train.dtype = \"bf16\"` (halves weights and gradients), "
            } else {
                ""
            };
            return Err(TrainerError::Setup(format!(
                "train.model: {:.2} B parameters need {} per rank for the weights and gradients alone, but \
                 cuda:{ordinal} has {}: with the weights whole on every rank (train.shard = \"{}\") more ranks do \
                 not help: {bf16}{}",
                n as f64 / 1e9,
                gib_of(whole),
                gib_of(total),
                sh.mode.name(),
                tail(full_hint())
            )));
        }
    }
    if need > budget {
        let what = match sh.mode {
            ShardMode::None => "replicated AdamW state".to_string(),
            ShardMode::Optimizer => format!("AdamW state sharded {} ways", sh.world),
            ShardMode::Full if sh.offload => format!(
                "weights and gradients fully sharded {} ways (AdamW state offloaded)",
                sh.world
            ),
            ShardMode::Full => format!(
                "weights, gradients and AdamW state fully sharded {} ways",
                sh.world
            ),
        };
        let hint = match sh.mode {
            ShardMode::None => from(ShardMode::Optimizer, false)
                .map(|r| {
                    format!(
                        "set `train.shard = \"optimizer\"` to split the AdamW state across the ranks (ZeRO-2; it \
                         fits from {r} ranks on)"
                    )
                })
                .or_else(full_hint),
            ShardMode::Optimizer => from(ShardMode::Optimizer, false)
                .map(|r| {
                    format!(
                        "train on at least {r} ranks (the sharded state shrinks with the world size)"
                    )
                })
                .or_else(full_hint),
            ShardMode::Full => from(ShardMode::Full, sh.offload)
                .map(|r| format!("train on at least {r} ranks"))
                .or_else(|| {
                    (!sh.offload)
                        .then(|| from(ShardMode::Full, true))
                        .flatten()
                        .map(|r| {
                            format!(
                                "set `train.offload_optimizer = true` (the fp32 AdamW state in host memory; it fits \
                                 from {r} ranks on)"
                            )
                        })
                }),
        };
        return Err(TrainerError::Setup(format!(
            "train.model: {:.2} B parameters need {} per rank for {what} (fp32 master + moments + gradient), but \
             cuda:{ordinal} has {}: {}",
            n as f64 / 1e9,
            gib_of(need),
            gib_of(total),
            tail(hint)
        )));
    }
    if need as f64 > 0.7 * total as f64 {
        tracing::warn!(
            "weights, gradients and AdamW state take {:.1} of cuda:{ordinal}'s {:.1} GiB: little room for \
             activations (consider train.recompute = true or a smaller micro_batch)",
            gib(need),
            gib(total)
        );
    }
    Ok(need)
}

/// Peak dense FLOP/s for MFU: `LEXFLOW_PEAK_FLOPS`, else H100 bf16 (989 TFLOP/s, the datasheet) on CUDA; on CPU the
/// matmul peak measured here at start (so MFU says how well the model uses what this machine's BLAS can do).
pub(super) fn peak_flops(device: Device, kind: Kind) -> Option<f64> {
    if let Some(v) = std::env::var("LEXFLOW_PEAK_FLOPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    if device.is_cuda() {
        return Some(989e12);
    }
    Some(measured_matmul_flops(device, kind))
}

/// Best of a few square matmuls, in FLOP/s.
pub(super) fn measured_matmul_flops(device: Device, kind: Kind) -> f64 {
    let n = 512i64;
    let a = tch::Tensor::ones([n, n], (kind, device));
    let b = tch::Tensor::ones([n, n], (kind, device));
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]);
        let secs = t.elapsed().as_secs_f64().max(1e-9);
        best = best.max(2.0 * (n * n * n) as f64 / secs);
    }
    best
}

/// Resident memory of this process (the "device memory" of CPU ranks).
pub(super) fn process_rss_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as i64)
}

/// Parses a memory size: `180GiB`, `80GB`, `2TiB`, `1.5TB`, `512MiB`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 180GiB, 80GB or 2TiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    Ok((x * mult).round() as u64)
}

/// What `lexflow plan` is asked about.
pub struct PlanRequest {
    pub model: LlamaConfig,
    /// How the model was chosen, for the heading (`train.model = "70b"`, `train.init_from = …`).
    pub model_source: String,
    pub ranks: usize,
    pub ranks_per_host: usize,
    pub param_bytes: u64,
    pub micro_batch: u64,
    pub seq_len: u64,
    pub recompute: bool,
    /// The configured `train.shard` and `train.offload_optimizer`.
    pub shard: ShardMode,
    pub offload: bool,
    pub gpu_memory: Option<u64>,
    pub host_memory: Option<u64>,
}

/// One column of the plan: a mode and its per-rank figures.
struct Column {
    name: &'static str,
    spec: PlanSpec,
}

/// The share of a device the state plus a micro-batch may take (as the trainer's own check: room for fragmentation).
const DEVICE_SHARE: f64 = 0.9;

fn fits(spec: &PlanSpec, req: &PlanRequest) -> (bool, bool) {
    let p = plan(spec);
    let device = req
        .gpu_memory
        .is_none_or(|g| p.device.total() as f64 <= DEVICE_SHARE * g as f64);
    let host = req
        .host_memory
        .is_none_or(|h| p.host * req.ranks_per_host as u64 <= h);
    (device, host)
}

/// The plan as text: per-rank figures of each sharding mode (the configured one marked), whether each fits, and the
/// cheapest change of the config that makes it fit.
pub fn render_plan(req: &PlanRequest) -> String {
    use std::fmt::Write;
    let tokens = req.micro_batch * req.seq_len;
    let spec = |shard, offload, recompute| PlanSpec {
        model: req.model.clone(),
        world: req.ranks,
        param_bytes: req.param_bytes,
        shard,
        offload,
        tokens,
        recompute,
    };
    let configured = configured_sharding(req);
    let cols = [
        Column {
            name: "none",
            spec: spec(ShardMode::None, false, req.recompute),
        },
        Column {
            name: "optimizer",
            spec: spec(ShardMode::Optimizer, false, req.recompute),
        },
        Column {
            name: "full",
            spec: spec(ShardMode::Full, false, req.recompute),
        },
        Column {
            name: "full+offload",
            spec: spec(ShardMode::Full, true, req.recompute),
        },
    ];
    let dtype = if req.param_bytes == 2 { "bf16" } else { "fp32" };
    let mut o = String::new();
    let m = &req.model;
    let _ = writeln!(
        o,
        "model: {} — {:.2} B parameters (hidden {}, {} layers, {} heads, {} KV heads, MLP {}, vocabulary {})",
        req.model_source,
        m.num_params() as f64 / 1e9,
        m.hidden_size,
        m.num_hidden_layers,
        m.num_attention_heads,
        m.num_key_value_heads,
        m.intermediate_size,
        m.vocab_size
    );
    let _ = writeln!(
        o,
        "ranks: {} ({} per host); {dtype} weights, fp32 master and moments; micro-batch {} × {} = {} tokens; \
         recompute {}",
        req.ranks,
        req.ranks_per_host,
        req.micro_batch,
        req.seq_len,
        tokens,
        if req.recompute { "on" } else { "off" }
    );
    let show = |b: Option<u64>| b.map_or("not given".to_string(), |b| format!("{:.1} GiB", gib(b)));
    let _ = writeln!(
        o,
        "GPU memory per rank: {} (the state and a micro-batch may use {:.0}%); host memory per host: {}\n",
        show(req.gpu_memory),
        DEVICE_SHARE * 100.0,
        show(req.host_memory)
    );
    let plans: Vec<_> = cols.iter().map(|c| plan(&c.spec)).collect();
    let _ = write!(o, "{:<38}", "per rank, GiB");
    for c in &cols {
        let mark = if c.spec.shard == configured.mode && c.spec.offload == configured.offload {
            "*"
        } else {
            ""
        };
        let _ = write!(o, "{:>15}", format!("{}{mark}", c.name));
    }
    o.push('\n');
    type Row = (&'static str, fn(&lexflow_gpu::plan::Plan) -> u64);
    let rows: [Row; 12] = [
        ("weights", |p| p.device.weights),
        ("gathered units", |p| p.device.gathered),
        ("gradients", |p| p.device.gradients),
        ("fp32 gradient", |p| p.device.grad_fp32),
        ("fp32 master", |p| p.device.master),
        ("AdamW moments", |p| p.device.moments),
        ("communication buffers", |p| p.device.comm),
        ("activations", |p| p.device.activations),
        ("logits + their gradient", |p| p.device.logits),
        ("workspace", |p| p.device.workspace),
        ("GPU total", |p| p.device.total()),
        ("host: offloaded fp32 state", |p| p.host),
    ];
    for (name, f) in rows {
        let _ = write!(o, "{name:<38}");
        for p in &plans {
            let _ = write!(o, "{:>15.1}", gib(f(p)));
        }
        o.push('\n');
    }
    let _ = write!(o, "{:<38}", "host total (all ranks of a host)");
    for p in &plans {
        let _ = write!(o, "{:>15.1}", gib(p.host * req.ranks_per_host as u64));
    }
    o.push('\n');
    let _ = write!(o, "{:<38}", "fits");
    for c in &cols {
        let (d, h) = fits(&c.spec, req);
        let v = match (req.gpu_memory.is_some() || req.host_memory.is_some(), d, h) {
            (false, _, _) => "?",
            (_, true, true) => "yes",
            (_, false, true) => "no: GPU",
            (_, true, false) => "no: host",
            (_, false, false) => "no: both",
        };
        let _ = write!(o, "{v:>15}");
    }
    let _ = writeln!(
        o,
        "\n\n* the configured mode (train.shard, train.offload_optimizer). full: weights, gradients and AdamW state split \
         over the ranks, one transformer block gathered at a time; +offload: the fp32 AdamW state in host memory"
    );
    o.push_str(&verdict(req, configured));
    o
}

/// The configured sharding; ZeRO-2 on one rank is replicated.
fn configured_sharding(req: &PlanRequest) -> Sharding {
    let mode = match req.shard {
        ShardMode::Optimizer if req.ranks < 2 => ShardMode::None,
        m => m,
    };
    Sharding::new(mode, req.ranks, req.offload && mode == ShardMode::Full)
}

/// Whether the configured run fits, else the cheapest change that makes it fit.
fn verdict(req: &PlanRequest, configured: Sharding) -> String {
    if req.gpu_memory.is_none() {
        return "verdict: give --gpu-memory (and --host-memory) to check the fit\n".into();
    }
    let tokens = req.micro_batch * req.seq_len;
    let spec = |sh: Sharding, recompute, tokens| {
        rank_spec(&req.model, req.param_bytes, sh, tokens, recompute)
    };
    let ok = |s: &PlanSpec| fits(s, req) == (true, true);
    let total = |s: &PlanSpec| gib(plan(s).device.total());
    let now = spec(configured, req.recompute, tokens);
    if ok(&now) {
        let p = plan(&now);
        let host = if p.host > 0 {
            format!(
                ", {:.1} GiB of host memory per host",
                gib(p.host * req.ranks_per_host as u64)
            )
        } else {
            String::new()
        };
        return format!(
            "verdict: fits ({:.1} GiB per GPU as configured{host})\n",
            gib(p.device.total())
        );
    }
    let r = req.ranks;
    let mode = |m, off| Sharding::new(m, r, off);
    let mut tries: Vec<(String, PlanSpec)> = Vec::new();
    if !req.recompute {
        tries.push((
            "set train.recompute = true".into(),
            spec(configured, true, tokens),
        ));
    }
    if configured.mode == ShardMode::None && r > 1 {
        tries.push((
            "set train.shard = \"optimizer\"".into(),
            spec(mode(ShardMode::Optimizer, false), req.recompute, tokens),
        ));
        tries.push((
            "set train.shard = \"optimizer\" and train.recompute = true".into(),
            spec(mode(ShardMode::Optimizer, false), true, tokens),
        ));
    }
    if configured.mode != ShardMode::Full && r > 1 {
        tries.push((
            "set train.shard = \"full\" and train.recompute = true".into(),
            spec(mode(ShardMode::Full, false), true, tokens),
        ));
    }
    if !configured.offload {
        tries.push((
            "set train.shard = \"full\", train.offload_optimizer = true and train.recompute = true"
                .into(),
            spec(mode(ShardMode::Full, true), true, tokens),
        ));
    }
    if req.micro_batch > 1 {
        tries.push((
            "set train.micro_batch = 1 and train.recompute = true (raise train.grad_accum to keep the global batch)"
                .into(),
            spec(configured, true, req.seq_len),
        ));
    }
    for (what, s) in &tries {
        if ok(s) {
            return format!(
                "verdict: does not fit as configured ({:.1} GiB per rank); cheapest change: {what} ({:.1} GiB per rank)\n",
                total(&now),
                total(s)
            );
        }
    }
    // More ranks: the mode that needs the fewest (the first of equals: less communication, no host traffic).
    let mut best: Option<(usize, &str, PlanSpec)> = None;
    for (m, off, how) in [
        (ShardMode::Optimizer, false, "train.shard = \"optimizer\""),
        (ShardMode::Full, false, "train.shard = \"full\""),
        (
            ShardMode::Full,
            true,
            "train.shard = \"full\", train.offload_optimizer = true",
        ),
    ] {
        let at = |w: usize| spec(Sharding::new(m, w, off), true, req.seq_len);
        if let Some(w) = fewest_ranks(r.max(2), 4096, |w| ok(&at(w))) {
            if best.as_ref().is_none_or(|b| w < b.0) {
                best = Some((w, how, at(w)));
            }
        }
    }
    if let Some((w, how, s)) = best {
        return format!(
            "verdict: does not fit as configured ({:.1} GiB per rank); cheapest change: train on {w} ranks with \
             {how}, train.recompute = true and train.micro_batch = 1 ({:.1} GiB per rank)\n",
            total(&now),
            total(&s)
        );
    }
    let p = plan(&spec(mode(ShardMode::Full, true), true, req.seq_len));
    format!(
        "verdict: does not fit in any mode on any number of ranks with this GPU and host memory (fully sharded with \
         offload it takes {:.1} GiB per GPU and {:.1} GiB of host memory per host)\n",
        gib(p.device.total()),
        gib(p.host * req.ranks_per_host as u64),
    )
}

/// `lexflow plan [CONFIG]`: the run's memory per rank and per host in every sharding mode, whether it fits, and the
/// cheapest change that makes it fit — before renting GPUs. The same planner the trainer's fit check uses.
pub fn cli_plan(
    config: Option<&std::path::Path>,
    gpu_memory: Option<u64>,
    host_memory: Option<u64>,
    ranks: Option<usize>,
    ranks_per_host: Option<usize>,
) -> anyhow::Result<std::process::ExitCode> {
    // The plan is for before the data and the weights are there: only the config itself is checked.
    let cfg = match config {
        Some(p) => crate::config::Config::from_file(p)?,
        None => crate::config::Config::from_toml(
            crate::config::SAMPLE_TOML,
            "<embedded configs/sample.toml>",
        )?,
    };
    let Some(train) = &cfg.train else {
        anyhow::bail!("the config has no [train] section: nothing to plan");
    };
    let vocab = crate::stages::tokenizer::Tokenizer::load(&cfg.tokenizer.path)?.vocab_size();
    let (model, model_source) = match &train.init_from {
        // Not here yet (planning before the download): the preset's shape, which `init_from` must match anyway.
        Some(dir) if !dir.join("config.json").is_file() => (
            LlamaConfig::preset(&train.model, vocab)?,
            format!(
                "train.model = {:?} (train.init_from {} is not here: its shape must be the preset's)",
                train.model,
                dir.display()
            ),
        ),
        Some(dir) => (
            super::model::init_config(&train.model, vocab, dir)?,
            format!("train.init_from = {}", dir.display()),
        ),
        None => (
            LlamaConfig::preset(&train.model, vocab)?,
            format!("train.model = {:?}", train.model),
        ),
    };
    let env_count = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let ranks = ranks
        .or_else(|| env_count("WORLD_SIZE"))
        .or_else(|| env_count("SLURM_NTASKS"))
        .unwrap_or_else(|| cfg.world_size())
        .max(1);
    let ranks_per_host = ranks_per_host
        .or_else(|| env_count("LOCAL_WORLD_SIZE"))
        .unwrap_or_else(|| train.devices.len().max(1))
        .clamp(1, ranks);
    let cuda = train.devices.iter().any(|d| d.starts_with("cuda"));
    let param_bytes = if train.dtype.is_bf16(cuda) { 2 } else { 4 };
    let gpu_memory =
        gpu_memory.or_else(|| cuda.then(|| lexflow_gpu::cuda_memory_total(0)).flatten());
    let micro_batch = train.micro_batch.get() as u64;
    let seq_len = cfg.packer.seq_len.get() as u64;
    let sh = Sharding::new(train.shard_mode(), ranks, train.offload_optimizer);
    let recompute = match train.recompute {
        crate::config::Recompute::On => true,
        crate::config::Recompute::Off => false,
        // As the trainer decides it on a GPU: when the state and a micro-batch would take more than 85%.
        crate::config::Recompute::Auto => gpu_memory.is_some_and(|g| {
            let p = plan(&rank_spec(
                &model,
                param_bytes,
                sh,
                micro_batch * seq_len,
                false,
            ));
            cuda && needs_recompute(p.device.state(), p.device.batch(), g)
        }),
    };
    let req = PlanRequest {
        model,
        model_source,
        ranks,
        ranks_per_host,
        param_bytes,
        micro_batch,
        seq_len,
        recompute,
        shard: train.shard_mode(),
        offload: train.offload_optimizer,
        gpu_memory,
        host_memory,
    };
    print!("{}", render_plan(&req));
    Ok(std::process::ExitCode::SUCCESS)
}
