//! The AdamW step on the host, as CPU optimizer offload would run it: fp32 master, moments and gradient of a slice in
//! host memory, libtorch's fused CPU kernel (`_fused_adamw_`, the default) or the whole-buffer kernels
//! (`--unfused`), the bf16 weights refreshed from the master. Prints seconds per step and per billion parameters.
//!
//!   cargo run --release -p lexflow-gpu --example host_adamw -- [--model 125m] [--steps 5] [--unfused]
//!   OMP_NUM_THREADS=N sets libtorch's CPU threads.

use std::time::Instant;

use lexflow_gpu::tch::{Device, Kind, Tensor};
use lexflow_gpu::{AdamWConfig, FlatAdamW, Llama, LlamaConfig, SingleRank};

fn main() -> anyhow::Result<()> {
    let mut model = "125m".to_string();
    let mut steps = 5u32;
    let mut fused = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model = args.next().expect("--model NAME"),
            "--steps" => steps = args.next().expect("--steps N").parse()?,
            "--unfused" => fused = false,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let cfg = LlamaConfig::preset(&model, 128_256)?;
    let llama = Llama::new(&cfg, Device::Cpu, Kind::BFloat16, 1)?;
    let n = llama.params.numel();
    let mut opt = FlatAdamW::new(
        &llama.params,
        AdamWConfig {
            lr: 1e-4,
            min_lr: 1e-4,
            total_steps: 1000,
            ..AdamWConfig::default()
        },
    );
    opt.set_fused(fused);
    let mut times = Vec::new();
    for s in 0..steps + 1 {
        // A gradient as the reduce would leave it (values do not change the kernel's cost).
        opt.grad
            .copy_(&Tensor::randn([n], (Kind::Float, Device::Cpu)).g_mul_scalar(1e-3));
        let t = Instant::now();
        opt.step(&llama.params.flat, &SingleRank)?;
        if s > 0 {
            times.push(t.elapsed().as_secs_f64()); // the first step allocates the kernel's buffers
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "model": model,
            "params": n,
            "kernel": if fused { "fused" } else { "unfused" },
            "threads": lexflow_gpu::tch::get_num_threads(),
            "steps": steps,
            "median_s": (median * 1e4).round() / 1e4,
            "s_per_billion_params": (median / (n as f64 / 1e9) * 1e3).round() / 1e3,
        })
    );
    Ok(())
}
