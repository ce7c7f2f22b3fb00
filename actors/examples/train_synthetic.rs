//! The lexflow trainer actor fed synthetic in-memory batches: the same `trainer::spawn_trainers` actor as `lexflow
//! run`, but its input edge is fed by one source actor generating deterministic `PackedSequence`s (no readers, no
//! tokenizer, no packer). Measures the trainer alone (GPU bench `bench/gpu/run.sh`, part b) and produces the lexflow
//! side of the loss-parity check against `bench/gpu/torch_ref.py` (initial weights as HF safetensors + the token
//! stream + per-step losses).
//!
//! ```text
//! train_synthetic [--device cuda:0] [--model 1b] [--seq-len 4096] [--micro-batch 2] [--grad-accum 8]
//!                 [--steps 25] [--warmup 5] [--docs-per-seq 1] [--pattern random|ramp] [--seed 1234]
//!                 [--lr 3e-4] [--min-lr 3e-5] [--lr-warmup 5] [--dtype auto|bf16|fp32] [--vocab 128256]
//!                 [--recompute] [--run-dir DIR] [--export-init DIR] [--dump-tokens FILE] [--json FILE]
//! ```
//! * `--recompute`: `train.recompute` (per-layer activation recomputation).
//! * `--dtype`: `train.dtype` of the trainer (auto = bf16 on CUDA, fp32 on CPU) and of the `--export-init` weights;
//!   `--device cpu --dtype bf16` runs the bf16 arithmetic on CPU (deterministic: the loss-parity noise floor).
//! * `--vocab N`: the tokenizer vocabulary the trainer is told about (default Llama 3's 128,256); the `tiny` preset
//!   sizes its embeddings from it, and token ids are taken modulo N. A small N keeps CPU runs fast (the 128k-row
//!   head dominates `tiny`, and CPUs without bf16 instructions multiply bf16 matrices slowly).
//! * `--export-init DIR`: builds the model the trainer would build (same preset, seed, device, dtype), writes it to
//!   DIR in the HF layout and makes the trainer start from it (`train.init_from`).
//! * `--dump-tokens FILE`: the first `steps × micro_batch × grad_accum` sequences, `seq_len + 1` little-endian u32
//!   each, in the order the trainer consumes them.
//! * Timing: a monitor thread reads the trainer's own `lexflow_trainer_step_seconds` histogram (rank 0) when
//!   `--warmup` steps are done and again at the end: timed tokens / timed step seconds, so warm-up (cuBLAS/flash
//!   autotuning, allocator growth) and the final checkpoint are excluded. Wall-clock over the same steps is printed
//!   too.
//!
//! Prints one JSON object (also to `--json FILE`): tokens_per_s, mfu (vs `LEXFLOW_PEAK_FLOPS` or 989 TFLOP/s, and vs
//! `BENCH_MATMUL_PEAK` when set), step seconds, losses.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lexflow_actors::config::{TrainConfig, TrainDtype};
use lexflow_actors::trainer::{spawn_trainers, TrainerSetup};
use lexflow_actors::types::PackedSequence;
use lexflow_dataflow::{edge, Shutdown, Topology};
use lexflow_gpu::tch::{Device, Kind};
use lexflow_gpu::{Llama, LlamaConfig, LLAMA3_VOCAB};

struct Args {
    device: String,
    model: String,
    seq_len: usize,
    micro_batch: usize,
    grad_accum: usize,
    steps: u64,
    warmup: u64,
    docs_per_seq: usize,
    pattern: String,
    seed: u64,
    lr: f64,
    min_lr: f64,
    lr_warmup: u64,
    dtype: TrainDtype,
    vocab: usize,
    recompute: bool,
    run_dir: PathBuf,
    export_init: Option<PathBuf>,
    dump_tokens: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        device: "cuda:0".into(),
        model: "1b".into(),
        seq_len: 4096,
        micro_batch: 2,
        grad_accum: 8,
        steps: 25,
        warmup: 5,
        docs_per_seq: 1,
        pattern: "random".into(),
        seed: 1234,
        lr: 3e-4,
        min_lr: 3e-5,
        lr_warmup: 5,
        dtype: TrainDtype::Auto,
        vocab: LLAMA3_VOCAB,
        recompute: false,
        run_dir: std::env::temp_dir().join("lexflow-train-synthetic"),
        export_init: None,
        dump_tokens: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--device" => a.device = v()?,
            "--model" => a.model = v()?,
            "--seq-len" => a.seq_len = v()?.parse()?,
            "--micro-batch" => a.micro_batch = v()?.parse()?,
            "--grad-accum" => a.grad_accum = v()?.parse()?,
            "--steps" => a.steps = v()?.parse()?,
            "--warmup" => a.warmup = v()?.parse()?,
            "--docs-per-seq" => a.docs_per_seq = v()?.parse()?,
            "--pattern" => a.pattern = v()?,
            "--seed" => a.seed = v()?.parse()?,
            "--lr" => a.lr = v()?.parse()?,
            "--min-lr" => a.min_lr = v()?.parse()?,
            "--lr-warmup" => a.lr_warmup = v()?.parse()?,
            "--vocab" => a.vocab = v()?.parse()?,
            "--recompute" => a.recompute = true,
            "--dtype" => {
                a.dtype = match v()?.as_str() {
                    "auto" => TrainDtype::Auto,
                    "bf16" => TrainDtype::Bf16,
                    "fp32" => TrainDtype::Fp32,
                    other => anyhow::bail!("--dtype is auto, bf16 or fp32, not {other}"),
                }
            }
            "--run-dir" => a.run_dir = v()?.into(),
            "--export-init" => a.export_init = Some(v()?.into()),
            "--dump-tokens" => a.dump_tokens = Some(v()?.into()),
            "--json" => a.json = Some(v()?.into()),
            other => anyhow::bail!(
                "unknown argument {other} (see the header of actors/examples/train_synthetic.rs)"
            ),
        }
    }
    anyhow::ensure!(
        a.pattern == "random" || a.pattern == "ramp",
        "--pattern is random or ramp"
    );
    anyhow::ensure!(
        (2..=LLAMA3_VOCAB).contains(&a.vocab),
        "--vocab is between 2 and {LLAMA3_VOCAB}"
    );
    anyhow::ensure!(
        a.docs_per_seq >= 1 && a.steps > a.warmup,
        "need docs-per-seq ≥ 1 and steps > warmup"
    );
    Ok(a)
}

fn dtype_name(d: TrainDtype) -> &'static str {
    match d {
        TrainDtype::Auto => "auto",
        TrainDtype::Bf16 => "bf16",
        TrainDtype::Fp32 => "fp32",
    }
}

/// SplitMix64: a stateless, platform-independent hash, so the token stream depends only on (seed, index, position).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sequence `index`: `seq_len + 1` tokens below `vocab`, no padding, `docs` equal documents.
/// `random`: uniform ids below min(128,000, vocab) (the loss stays near ln V: a pure throughput load).
/// `ramp`: per document an arithmetic progression modulo 4,096 over a random offset (modulo `vocab`), so the model
/// has something to learn within a few dozen steps (the parity check wants a falling loss curve, not a flat ln V).
fn sequence(
    seed: u64,
    index: u64,
    seq_len: usize,
    docs: usize,
    pattern: &str,
    vocab: usize,
) -> PackedSequence {
    let n = seq_len + 1;
    let doc_len = seq_len.div_ceil(docs).max(1);
    let doc_starts: Vec<u32> = (0..docs)
        .map(|d| (d * doc_len) as u32)
        .filter(|&s| (s as usize) < seq_len)
        .collect();
    let base = mix(seed ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let tokens: Vec<u32> = if pattern == "random" {
        (0..n)
            .map(|p| (mix(base ^ p as u64) % 128_000.min(vocab as u64)) as u32)
            .collect()
    } else {
        (0..n)
            .map(|p| {
                let d = (p / doc_len) as u64;
                let h = mix(base ^ (d << 32));
                let (offset, stride) = (h % 100_000, 1 + (h >> 20) % 7);
                let i = (p % doc_len) as u64;
                ((offset + (i * stride) % 4096) % vocab as u64) as u32
            })
            .collect()
    };
    PackedSequence {
        index,
        tokens,
        doc_starts,
        pieces: Vec::new(),
        padding: 0,
        no_loss: Vec::new(),
        shard: (index % 32) as u32,
        resume: None,
    }
}

fn main() -> anyhow::Result<()> {
    lexflow_actors::run::cli::init_logging();
    let a = parse_args()?;
    let per_step = a.micro_batch * a.grad_accum;
    if a.device.starts_with("cuda") {
        anyhow::ensure!(
            lexflow_gpu::init_cuda(),
            "CUDA is not available to libtorch"
        );
    }
    let cfg = LlamaConfig::preset(&a.model, a.vocab)?;
    let _ = std::fs::remove_dir_all(&a.run_dir);
    std::fs::create_dir_all(&a.run_dir)?;

    if let Some(dir) = &a.export_init {
        let t = Instant::now();
        let device = if a.device == "cpu" {
            Device::Cpu
        } else {
            Device::Cuda(a.device.trim_start_matches("cuda:").parse()?)
        };
        // The dtype the trainer will use (`train.dtype`, written into the config below).
        let kind = if a.dtype.is_bf16(device.is_cuda()) {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let model = Llama::new(&cfg, device, kind, a.seed)?;
        std::fs::create_dir_all(dir)?;
        lexflow_gpu::checkpoint::save_hf(
            dir,
            &model,
            lexflow_gpu::checkpoint::DEFAULT_MAX_SHARD_BYTES,
        )?;
        eprintln!(
            "train_synthetic: initial weights ({kind:?}) written to {} in {:.1}s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }

    let toml_text = format!(
        "devices = [\"{}\"]\nmodel = \"{}\"\nmicro_batch = {}\ngrad_accum = {}\nsteps = {}\nlr = {:e}\nmin_lr = {:e}\n\
         warmup_steps = {}\nweight_decay = 0.1\ngrad_clip = 1.0\ncheckpoint_every = 0\nkeep_checkpoints = 1\n\
         dtype = \"{}\"\nrecompute = {}\n{}",
        a.device,
        a.model,
        a.micro_batch,
        a.grad_accum,
        a.steps,
        a.lr,
        a.min_lr,
        a.lr_warmup,
        dtype_name(a.dtype),
        a.recompute,
        a.export_init.as_ref().map(|d| format!("init_from = {:?}\n", d.display().to_string())).unwrap_or_default()
    );
    let train: TrainConfig =
        toml::from_str(&toml_text).with_context(|| format!("train config:\n{toml_text}"))?;

    let mut topo = Topology::new(Shutdown::new());
    let (tx, rx) = edge::<PackedSequence>(
        "synthetic->rank0",
        std::num::NonZeroUsize::new(2 * per_step).expect("> 0"),
    );
    {
        let (seed, seq_len, docs, pattern, vocab) = (
            a.seed,
            a.seq_len,
            a.docs_per_seq,
            a.pattern.clone(),
            a.vocab,
        );
        let dump_n = a.steps * per_step as u64;
        let mut dump = match &a.dump_tokens {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| p.display().to_string())?,
            )),
            None => None,
        };
        topo.spawn("synthetic_source", move |ctx| {
            for index in 0.. {
                if ctx.should_stop() {
                    break;
                }
                let s = sequence(seed, index, seq_len, docs, &pattern, vocab);
                if let Some(w) = dump.as_mut() {
                    if index < dump_n {
                        for t in &s.tokens {
                            w.write_all(&t.to_le_bytes())?;
                        }
                    } else {
                        w.flush()?;
                    }
                }
                if tx.send(s).is_err() {
                    break; // the trainer finished
                }
            }
            if let Some(mut w) = dump {
                w.flush()?;
            }
            Ok(())
        });
    }
    let handle = spawn_trainers(
        &mut topo,
        TrainerSetup {
            cfg: train,
            run_dir: a.run_dir.clone(),
            vocab_size: a.vocab,
            seq_len: a.seq_len,
            seed: a.seed,
            resume: false,
            run_config: None,
            inputs: None,
            hf_files: Default::default(),
            eval: None,
            dedup: None,
            tee: None,
        },
        vec![rx],
    )?;

    // Monitor: snapshot the step histogram after the warm-up steps and after the last step.
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let done = done.clone();
        let (warmup, steps) = (a.warmup, a.steps);
        std::thread::spawn(move || {
            let h = lexflow_metrics::global()
                .trainer_step_seconds
                .with_label_values(&["0"]);
            let mut warm: Option<(u64, f64, Instant)> = None;
            let mut last: Option<(u64, f64, Instant)> = None;
            let t0 = Instant::now();
            let mut seen = 0;
            while !done.load(Ordering::Relaxed) {
                let (c, s) = (h.get_sample_count(), h.get_sample_sum());
                if c != seen {
                    seen = c;
                    eprintln!(
                        "train_synthetic: step {c}/{steps} at {:.1}s, step sum {s:.2}s",
                        t0.elapsed().as_secs_f64()
                    );
                }
                if warm.is_none() && c >= warmup {
                    warm = Some((c, s, Instant::now()));
                }
                if c >= steps && last.is_none() {
                    last = Some((c, s, Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (warm, last)
        })
    };
    let result = topo.join();
    done.store(true, Ordering::Relaxed);
    let (warm, last) = monitor.join().expect("monitor thread");
    result.map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = handle.report().context("trainer produced no report")?;

    let (Some((c0, s0, i0)), Some((c1, s1, i1))) = (warm, last) else {
        anyhow::bail!("the trainer did not reach {} steps", a.steps);
    };
    let step_tokens = (per_step * a.seq_len) as f64;
    let timed_steps = (c1 - c0) as f64;
    let tps = timed_steps * step_tokens / (s1 - s0).max(1e-9);
    let tps_wall = timed_steps * step_tokens / (i1 - i0).as_secs_f64().max(1e-9);
    let fpt = cfg.train_flops_per_token(a.seq_len);
    let peak: f64 = std::env::var("LEXFLOW_PEAK_FLOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(989e12);
    let measured: Option<f64> = std::env::var("BENCH_MATMUL_PEAK")
        .ok()
        .and_then(|v| v.parse().ok());
    let out = serde_json::json!({
        "name": "lexflow_synthetic",
        "model": a.model,
        "params": cfg.num_params(),
        "vocab": cfg.vocab_size,
        "seq_len": a.seq_len,
        "micro_batch": a.micro_batch,
        "grad_accum": a.grad_accum,
        "global_batch_tokens": step_tokens,
        "docs_per_seq": a.docs_per_seq,
        "pattern": a.pattern,
        "dtype": dtype_name(a.dtype),
        "recompute": a.recompute,
        "doc_attention": std::env::var("LEXFLOW_DOC_ATTENTION").unwrap_or_else(|_| "auto".into()),
        "adamw": std::env::var("LEXFLOW_ADAMW").unwrap_or_else(|_| "fused".into()),
        "timed_steps": timed_steps,
        "step_s": (s1 - s0) / timed_steps.max(1.0),
        "tokens_per_s": tps,
        "tokens_per_s_wall": tps_wall,
        "flops_per_token": fpt,
        "mfu_vs_989": tps * fpt / 989e12,
        "mfu_vs_peak": tps * fpt / peak,
        "mfu_vs_measured_matmul": measured.map(|m| tps * fpt / m),
        "losses": report.losses,
        "data_wait_fraction": report.data_wait_fraction,
    });
    println!("{out}");
    if let Some(p) = &a.json {
        std::fs::write(p, out.to_string())?;
    }
    Ok(())
}
