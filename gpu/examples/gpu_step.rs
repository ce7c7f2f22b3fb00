//! GPU smoke check (run by `scripts/gpu_check.sh`): a few training steps on `cuda:N` with bf16 parameters, fp32
//! master weights and the gradient all-reduce through NCCL (torchrun-style env, world size 1 is fine), plus an fp32
//! logit comparison of the same weights on CPU and GPU.
//!
//! `gpu_step [preset] [steps] [seq_len] [micro_batch]`, e.g. `gpu_step 125m 20 1024 4`.

use std::time::Instant;

use lexflow_gpu::tch::{Device, Kind, Tensor};
use lexflow_gpu::{
    cross_entropy_sum, AdamWConfig, Batch, Collective, FlatAdamW, Llama, LlamaConfig,
    NcclCollective, SequenceRef,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("125m");
    let steps: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let seq_len: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let mb: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let local: usize = std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let device = Device::Cuda(local);
    anyhow_like(
        lexflow_gpu::init_cuda(),
        "CUDA is not available to libtorch",
    )?;

    // 1. fp32 parity CPU vs GPU on a small model (catches kernel/dtype mistakes on the device path).
    let small = LlamaConfig::tiny(512);
    let cpu = Llama::new(&small, Device::Cpu, Kind::Float, 5)?;
    let gpu = Llama::new(&small, device, Kind::Float, 5)?;
    lexflow_gpu::tch::no_grad(|| gpu.params.flat.detach().copy_(&cpu.params.flat));
    let ids = Tensor::randint(512, [2, 64], (Kind::Int64, Device::Cpu));
    let doc = Tensor::cat(
        &[
            Tensor::zeros([2, 20], (Kind::Int64, Device::Cpu)),
            Tensor::ones([2, 44], (Kind::Int64, Device::Cpu)),
        ],
        1,
    );
    for mask in [None, Some(&doc)] {
        let a = lexflow_gpu::tch::no_grad(|| cpu.forward(&ids, mask));
        let b = lexflow_gpu::tch::no_grad(|| {
            gpu.forward(
                &ids.to_device(device),
                mask.map(|m| m.to_device(device)).as_ref(),
            )
        });
        let d = (a - b.to_device(Device::Cpu)).abs().max().double_value(&[]);
        println!(
            "cpu_vs_gpu_fp32 doc_mask={} max_abs_diff {d:.3e}",
            mask.is_some()
        );
        anyhow_like(d < 1e-3, "CPU and GPU logits differ")?;
    }
    // The per-document flash path (what `forward_batch` uses for packed documents) against the CPU mask path.
    let segs = vec![vec![20i64, 44]; 2];
    let a = lexflow_gpu::tch::no_grad(|| cpu.forward(&ids, Some(&doc)));
    let b = lexflow_gpu::tch::no_grad(|| gpu.forward_segments(&ids.to_device(device), &segs));
    let d = (a - b.to_device(Device::Cpu)).abs().max().double_value(&[]);
    println!("cpu_mask_vs_gpu_segments_fp32 max_abs_diff {d:.3e}");
    anyhow_like(d < 1e-3, "per-document attention differs from the mask")?;
    // Same in bf16 on the GPU (flash kernels): segments vs mask, both on the device.
    let mut gbf = Llama::new(&small, device, Kind::BFloat16, 5)?;
    let (ids_d, doc_d) = (ids.to_device(device), doc.to_device(device));
    let a = lexflow_gpu::tch::no_grad(|| gbf.forward(&ids_d, Some(&doc_d))).to_kind(Kind::Float);
    let b = lexflow_gpu::tch::no_grad(|| gbf.forward_segments(&ids_d, &segs)).to_kind(Kind::Float);
    let d = (&a - &b).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]);
    println!("gpu_bf16_mask_vs_segments max_abs_diff {d:.3e} (max |logit| {scale:.3})");
    anyhow_like(
        d <= 0.02 * scale.max(1.0),
        "bf16 per-document attention differs from the mask",
    )?;
    // Varlen flash attention (the default CUDA path for packed documents) against per-segment flash calls, bf16:
    // logits, then the gradient of every parameter through the backward of each path.
    let toks: Vec<Vec<u32>> = (0..2)
        .map(|r| (0..65).map(|i| ((i * 31 + r * 17) % 512) as u32).collect())
        .collect();
    let vrows: Vec<SequenceRef<'_>> = toks
        .iter()
        .map(|t| SequenceRef {
            tokens: t,
            padding: 0,
            doc_starts: &[0, 20],
            no_loss: &[],
        })
        .collect();
    let vb = Batch::new(&vrows, device)?;
    anyhow_like(
        gbf.attention_path(&vb) == "varlen",
        "packed bf16 batch on CUDA does not take the varlen path",
    )?;
    let cu = vb.cu_seqlens.as_ref().ok_or("no cu_seqlens")?;
    let segs = vb.segments.clone().ok_or("no segments")?;
    let mut grads = Vec::new();
    let mut logits = Vec::new();
    for varlen in [true, false] {
        gbf.params.zero_grad();
        let l = if varlen {
            gbf.forward_varlen(&vb.inputs, cu, vb.max_seqlen)
        } else {
            gbf.forward_segments(&vb.inputs, &segs)
        };
        cross_entropy_sum(&l, &vb.labels).backward();
        let g: Vec<Tensor> = gbf
            .params
            .params
            .iter()
            .map(|p| p.tensor.grad().to_kind(Kind::Float).reshape([-1]))
            .collect();
        grads.push(Tensor::cat(&g, 0));
        logits.push(l.detach().to_kind(Kind::Float));
    }
    gbf.params.zero_grad();
    let d = (&logits[0] - &logits[1]).abs().max().double_value(&[]);
    let scale = logits[1].abs().max().double_value(&[]);
    let cos = (&grads[0] * &grads[1]).sum(Kind::Float).double_value(&[])
        / (grads[0].norm().double_value(&[]) * grads[1].norm().double_value(&[])).max(1e-30);
    let gd = (&grads[0] - &grads[1]).abs().max().double_value(&[])
        / grads[1].abs().max().double_value(&[]).max(1e-30);
    println!(
        "gpu_bf16_varlen_vs_segments logits max_abs_diff {d:.3e} (max |logit| {scale:.3}); grads cosine {cos:.6}, \
         max diff / max |grad| {gd:.3e}"
    );
    anyhow_like(
        d <= 0.02 * scale.max(1.0),
        "varlen flash attention differs from per-segment attention",
    )?;
    anyhow_like(
        cos > 0.999 && gd < 0.05,
        "varlen flash attention gradients differ from per-segment attention",
    )?;

    // 2. Training steps in bf16 with NCCL.
    let coll = NcclCollective::from_env()?;
    println!("nccl rank {} of {}", coll.rank(), coll.world_size());
    let cfg = LlamaConfig::preset(preset, 128_256)?;
    let mut model = Llama::new(&cfg, device, Kind::BFloat16, 1234)?;
    coll.broadcast(&mut model.params.flat.detach(), 0)?;
    let mut opt = FlatAdamW::new(
        &model.params,
        AdamWConfig {
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 2,
            total_steps: steps,
            schedule: lexflow_gpu::LrSchedule::Cosine,
            decay_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        },
    );
    // A fixed batch: the loss must fall.
    let tokens: Vec<Vec<u32>> = (0..mb)
        .map(|r| {
            (0..=seq_len)
                .map(|i| ((i * 7919 + r * 104_729) % 128_000) as u32)
                .collect()
        })
        .collect();
    let starts = [0u32, (seq_len / 3) as u32];
    let rows: Vec<SequenceRef<'_>> = tokens
        .iter()
        .map(|t| SequenceRef {
            tokens: t,
            padding: 0,
            doc_starts: &starts,
            no_loss: &[],
        })
        .collect();
    let batch = Batch::new(&rows, device)?;
    println!(
        "training batch attention path: {}",
        model.attention_path(&batch)
    );
    let flops = cfg.train_flops_per_token(seq_len);
    let mut first = None;
    let mut last = 0.0;
    let t_all = Instant::now();
    let mut timed_tokens = 0usize;
    let mut timed_secs = 0.0;
    for step in 1..=steps {
        let t0 = Instant::now();
        let logits = model.forward_batch(&batch);
        let loss = cross_entropy_sum(&logits, &batch.labels) / batch.valid_tokens as f64;
        loss.backward();
        opt.reduce_grads(&model.params, &coll)?;
        let st = opt.step(&model.params.flat, &coll)?;
        model.params.zero_grad();
        last = loss.double_value(&[]);
        first.get_or_insert(last);
        lexflow_gpu::tch::Cuda::synchronize(local as i64);
        let secs = t0.elapsed().as_secs_f64();
        if step > 2 {
            timed_tokens += mb * seq_len;
            timed_secs += secs;
        }
        println!(
            "step {step} loss {last:.4} lr {:.2e} grad_norm {:.3} step_s {secs:.3}",
            st.lr, st.grad_norm
        );
    }
    let tps = timed_tokens as f64 / timed_secs.max(1e-9);
    println!(
        "preset {preset} params {:.1}M tokens/s {tps:.0} mfu_h100 {:.3} total_s {:.1}",
        cfg.num_params() as f64 / 1e6,
        tps * flops / 989e12,
        t_all.elapsed().as_secs_f64()
    );
    let first = first.unwrap_or(f64::NAN);
    anyhow_like(last.is_finite() && last < first, "loss did not fall")?;
    println!("GPU CHECK OK: loss {first:.3} -> {last:.3}");
    Ok(())
}

fn anyhow_like(ok: bool, msg: &str) -> Result<(), Box<dyn std::error::Error>> {
    if ok {
        Ok(())
    } else {
        Err(msg.into())
    }
}
