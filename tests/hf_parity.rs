//! Logit parity with Hugging Face transformers: a small random LLaMA with GQA and Llama 3.1 RoPE scaling is built in
//! Rust, saved in HF layout, and `scripts/hf_parity.py` (transformers `LlamaForCausalLM`, eager attention, fp32)
//! recomputes the logits. Needs the project venv (`source scripts/env.sh`).

use std::path::PathBuf;
use std::process::Command;

use lexflow_gpu::checkpoint::{save_hf, write_safetensors, DEFAULT_MAX_SHARD_BYTES};
use lexflow_gpu::tch::{Device, Kind, Tensor};
use lexflow_gpu::{Llama, LlamaConfig, RopeScaling};
use lexflow_tests::venv_python;

fn parity(cfg: &LlamaConfig, max_shard: u64) -> f64 {
    let root = tempfile::tempdir().unwrap();
    let model_dir = root.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let model = Llama::new(cfg, Device::Cpu, Kind::Float, 11).unwrap();
    // Non-trivial norms, so a swapped or ignored norm weight shows.
    lexflow_gpu::tch::no_grad(|| {
        for (a, b) in model.params.layout.norm_ranges() {
            let _ = model.params.flat.narrow(0, a, b - a).uniform_(0.5, 1.5);
        }
    });
    save_hf(&model_dir, &model, max_shard).unwrap();
    let ids = Tensor::randint(cfg.vocab_size as i64, [2, 40], (Kind::Int64, Device::Cpu));
    let logits = lexflow_gpu::tch::no_grad(|| model.forward(&ids, None));
    let diff = hf_diff(root.path(), &model_dir, ids, logits);
    eprintln!(
        "parity ({}): max |Δlogit| = {diff:.3e}",
        if cfg.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    );
    diff
}

/// transformers' logits for `ids` from the HF directory `model_dir`, against `logits`: the largest difference.
fn hf_diff(
    root: &std::path::Path,
    model_dir: &std::path::Path,
    ids: Tensor,
    logits: Tensor,
) -> f64 {
    let io = root.join("io.safetensors");
    write_safetensors(
        &io,
        &[("input_ids".into(), ids), ("logits".into(), logits)],
        None,
    )
    .unwrap();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/hf_parity.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(model_dir)
        .arg(&io)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (source scripts/env.sh): {e}",
                venv_python().display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hf_parity.py failed:\n{stdout}\n{stderr}"
    );
    let diff: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("max_abs_diff "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no max_abs_diff in output:\n{stdout}\n{stderr}"));
    eprintln!("{}", stderr.trim());
    diff
}

fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 320,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 3,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        // A short original context puts the head's frequencies in all three bands (kept, smoothed, divided).
        rope_scaling: Some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        max_position_embeddings: 512,
        tie_word_embeddings: tied,
    }
}

#[test]
fn logits_match_transformers_untied_gqa_llama3_rope() {
    let cfg = config(false);
    let plain = LlamaConfig {
        rope_scaling: None,
        ..cfg.clone()
    }
    .rope_inv_freq();
    let scaled = cfg.rope_inv_freq();
    assert!(
        scaled.iter().zip(&plain).filter(|(a, b)| a != b).count() >= 3,
        "scaling must matter in this config"
    );
    let d = parity(&cfg, DEFAULT_MAX_SHARD_BYTES);
    assert!(d <= 1e-5, "max |Δlogit| = {d}");
}

#[test]
fn logits_match_transformers_tied_sharded() {
    let d = parity(&config(true), 100_000);
    assert!(d <= 1e-5, "max |Δlogit| = {d}");
}

/// A fully sharded model (2 in-process ranks, one training step so the slices moved apart from the initial weights),
/// exported the way a checkpoint does it (gathered unit by unit into rank 0's host memory, HF safetensors), loads in
/// transformers and gives the logits the sharded model computes (fp32, within 1e-5; seen: 2.7e-7).
#[test]
fn the_hf_export_of_a_fully_sharded_model_matches_transformers() {
    use lexflow_gpu::{
        AdamWConfig, Batch, Collective, InProcessCollective, SequenceRef, ShardedLlama,
    };
    let cfg = config(false);
    let root = tempfile::tempdir().unwrap();
    let model_dir = root.path().join("model");
    let ids = Tensor::randint(cfg.vocab_size as i64, [2, 40], (Kind::Int64, Device::Cpu));
    let handles: Vec<_> = InProcessCollective::group(2)
        .into_iter()
        .map(|coll| {
            let (cfg, model_dir, ids) = (cfg.clone(), model_dir.clone(), ids.copy());
            std::thread::spawn(move || {
                let whole = Llama::new(&cfg, Device::Cpu, Kind::Float, 11).unwrap();
                let m = ShardedLlama::from_params(&cfg, &whole.params, coll.rank(), 2).unwrap();
                drop(whole);
                let mut opt = m.optimizer(AdamWConfig {
                    lr: 1e-2,
                    ..AdamWConfig::default()
                });
                let toks: Vec<u32> = (0..24)
                    .map(|i| ((i * 7 + coll.rank() * 5) % 320) as u32)
                    .collect();
                let rows = [SequenceRef {
                    tokens: &toks,
                    padding: 0,
                    doc_starts: &[0],
                    no_loss: &[],
                }];
                let batch = Batch::new(&rows, Device::Cpu).unwrap();
                let _ = m
                    .forward_backward(&batch, 0.05, &mut opt, &coll, false)
                    .unwrap();
                opt.step(&m.local, &coll).unwrap();
                if let Some(host) = m.gather_whole(&coll, Device::Cpu, Some(0)).unwrap() {
                    std::fs::create_dir_all(&model_dir).unwrap();
                    save_hf(&model_dir, &host, DEFAULT_MAX_SHARD_BYTES).unwrap();
                }
                let probe = Batch {
                    inputs: ids.shallow_clone(),
                    ..Batch::new(&rows, Device::Cpu).unwrap()
                };
                m.logits(&probe, &coll).unwrap()
            })
        })
        .collect();
    let logits: Vec<Tensor> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        logits[0].equal(&logits[1]),
        "both ranks compute the same logits"
    );
    let d = hf_diff(root.path(), &model_dir, ids, logits[0].shallow_clone());
    eprintln!("fully sharded export: max |Δlogit| = {d:.3e}");
    assert!(d <= 1e-5, "max |Δlogit| = {d}");
}
