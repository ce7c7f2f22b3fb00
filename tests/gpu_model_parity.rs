//! What `tests/hf_parity.rs` leaves out, against Hugging Face transformers (`scripts/hf_parity.py`, eager attention,
//! fp32) in the same run: packed rows of several documents (transformers runs each document on its own), trailing
//! padding and prompt (`no_loss`) targets, the training loss and every parameter's gradient, activation
//! recomputation, the per-segment and the mask attention paths, KV-cache decoding, and attention shapes other than
//! the default: multi-query (1 KV head), grouped (4 query heads per KV head) and plain multi-head attention, with and
//! without Llama 3.1 RoPE scaling, tied and untied embeddings. Needs the project venv (`source scripts/env.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

use lexflow_gpu::checkpoint::{save_hf, write_safetensors, DEFAULT_MAX_SHARD_BYTES};
use lexflow_gpu::tch::{self, Device, Kind, Tensor};
use lexflow_gpu::{Batch, KvCache, Llama, LlamaConfig, RopeScaling, SequenceRef};
use lexflow_tests::venv_python;

const LOGIT_TOL: f64 = 1e-4;
const LOSS_REL_TOL: f64 = 1e-5;
const GRAD_REL_TOL: f64 = 1e-4;

fn config(heads: usize, kv_heads: usize, tied: bool, scaling: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 112,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: if scaling { 500_000.0 } else { 10_000.0 },
        // A short original context puts the head's frequencies in all three bands.
        rope_scaling: scaling.then_some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        max_position_embeddings: 512,
        tie_word_embeddings: tied,
    }
}

/// The shapes checked: (query heads, KV heads, tied, Llama 3.1 scaling).
const SHAPES: [(usize, usize, bool, bool); 3] = [
    (4, 1, false, false),
    (8, 2, true, true),
    (4, 4, false, true),
];

/// A model with non-trivial norm weights, saved in HF layout under `dir/model`.
fn model_in(dir: &Path, cfg: &LlamaConfig) -> (Llama, PathBuf) {
    let model = Llama::new(cfg, Device::Cpu, Kind::Float, 11).unwrap();
    tch::no_grad(|| {
        for (a, b) in model.params.layout.norm_ranges() {
            let _ = model.params.flat.narrow(0, a, b - a).uniform_(0.5, 1.5);
        }
    });
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    save_hf(&model_dir, &model, DEFAULT_MAX_SHARD_BYTES).unwrap();
    (model, model_dir)
}

/// `hf_parity.py` on `io`: its `key value` lines.
fn reference(model_dir: &Path, io: &Path, extra: &[&str]) -> Vec<(String, f64)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/hf_parity.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(model_dir)
        .arg(io)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the venv python (source scripts/env.sh): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hf_parity.py failed:\n{stdout}\n{stderr}"
    );
    stdout
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn value(r: &[(String, f64)], key: &str) -> f64 {
    r.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
}

/// Two packed rows: the first holds five documents (one of a single token, a boundary right before a prompt) and a
/// prompt range, the second two documents and trailing padding.
struct Packed {
    tokens: Vec<Vec<u32>>,
}

impl Packed {
    const T: usize = 48;
    const STARTS: [&'static [u32]; 2] = [&[0, 7, 19, 20, 33], &[0, 25]];
    const NO_LOSS: [&'static [[u32; 2]]; 2] = [&[[19, 24]], &[]];
    const PADDING: [u32; 2] = [0, 3];

    fn new(vocab: u32) -> Self {
        let tokens = (0..2u32)
            .map(|r| {
                (0..=Self::T as u32)
                    .map(|i| (i * 37 + r * 11 + i * i) % vocab)
                    .collect()
            })
            .collect();
        Packed { tokens }
    }

    fn batch(&self) -> Batch {
        let rows: Vec<SequenceRef<'_>> = (0..2)
            .map(|r| SequenceRef {
                tokens: &self.tokens[r],
                padding: Self::PADDING[r],
                doc_starts: Self::STARTS[r],
                no_loss: Self::NO_LOSS[r],
            })
            .collect();
        Batch::new(&rows, Device::Cpu).unwrap()
    }
}

/// Logits of `batch` through the per-segment path (`segments`) or the `(B, 1, T, T)` mask (`mask`), then loss and
/// gradients through `forward_backward` (with or without recomputation), written for `hf_parity.py`.
/// Returns the loss sum.
fn packed_io(model: &mut Llama, batch: &Batch, path: &str, recompute: bool, io: &Path) -> f64 {
    let logits = tch::no_grad(|| match path {
        "segments" => model.forward_segments(&batch.inputs, batch.segments.as_ref().unwrap()),
        "mask" => model.forward(&batch.inputs, batch.doc_ids.as_ref()),
        other => panic!("{other}"),
    });
    model.params.zero_grad();
    model.set_recompute(recompute);
    let loss = model.forward_backward(batch, 1.0);
    model.set_recompute(false);
    let loss_value = loss.double_value(&[]);
    let mut t = vec![
        ("input_ids".to_string(), batch.inputs.copy()),
        (
            "doc_ids".to_string(),
            batch.doc_ids.as_ref().expect("packed").copy(),
        ),
        ("labels".to_string(), batch.labels.copy()),
        ("logits".to_string(), logits),
        ("loss".to_string(), loss),
    ];
    for p in &model.params.params {
        t.push((format!("grad.{}", p.name), p.tensor.grad().copy()));
    }
    write_safetensors(io, &t, None).unwrap();
    loss_value
}

#[test]
fn packed_documents_loss_and_gradients_match_transformers() {
    let mut checked = 0;
    for (h, kvh, tied, scaling) in SHAPES {
        let cfg = config(h, kvh, tied, scaling);
        let root = tempfile::tempdir().unwrap();
        let (mut model, model_dir) = model_in(root.path(), &cfg);
        let packed = Packed::new(cfg.vocab_size as u32);
        let batch = packed.batch();
        assert_eq!(batch.segments.as_ref().unwrap()[0].len(), 5);
        let labels = Vec::<i64>::try_from(batch.labels.view([-1])).unwrap();
        assert!(labels[19..24].iter().all(|&l| l == -100) && labels[18] != -100);
        assert!(labels[2 * Packed::T - 3..].iter().all(|&l| l == -100));
        for (path, recompute) in [("segments", false), ("mask", true)] {
            let io = root.path().join(format!("{path}.safetensors"));
            let loss = packed_io(&mut model, &batch, path, recompute, &io);
            let r = reference(&model_dir, &io, &[]);
            let what = format!("{h} heads / {kvh} KV, tied {tied}, scaling {scaling}, {path}, recompute {recompute}");
            let dl = value(&r, "loss_abs_diff");
            eprintln!("{what}: {r:?}");
            assert!(
                value(&r, "max_abs_diff") <= LOGIT_TOL,
                "{what}: logits {r:?}"
            );
            assert!(dl <= LOSS_REL_TOL * loss, "{what}: loss {r:?}");
            assert!(
                value(&r, "grad_max_rel_diff") <= GRAD_REL_TOL,
                "{what}: gradients {r:?}"
            );
            checked += 1;
        }
        // The check has teeth: transformers seeing each packed row as one document disagrees.
        if kvh == 1 {
            let io = root.path().join("segments.safetensors");
            let r = reference(&model_dir, &io, &["--whole-rows"]);
            assert!(
                value(&r, "max_abs_diff") > 100.0 * LOGIT_TOL
                    && value(&r, "grad_max_rel_diff") > 100.0 * GRAD_REL_TOL,
                "rows as one document should not match: {r:?}"
            );
        }
    }
    assert_eq!(checked, 2 * SHAPES.len());
}

/// Prefill then one token at a time through the KV cache, plain and left-padded-batch variants, against
/// transformers' full forward of the same rows (positions past the original RoPE context of 64).
#[test]
fn kv_cache_decoding_matches_transformers() {
    for (h, kvh, tied, scaling) in SHAPES {
        let cfg = config(h, kvh, tied, scaling);
        let root = tempfile::tempdir().unwrap();
        let (model, model_dir) = model_in(root.path(), &cfg);
        let (b, t, prefill) = (2i64, 80i64, 70i64);
        let ids = Tensor::from_slice(
            &(0..b * t)
                .map(|i| (i * 29 + i * i / 7) % cfg.vocab_size as i64)
                .collect::<Vec<_>>(),
        )
        .view([b, t]);
        for padded in [false, true] {
            let logits = tch::no_grad(|| {
                let mut cache = KvCache::new();
                let ones = |n: i64| Tensor::ones([b, n], (Kind::Bool, Device::Cpu));
                let mut step = |x: &Tensor| {
                    if padded {
                        model.forward_cached_padded(x, &ones(x.size()[1]), &mut cache)
                    } else {
                        model.forward_cached(x, &mut cache)
                    }
                };
                let mut parts = vec![step(&ids.narrow(1, 0, prefill))];
                for i in prefill..t {
                    parts.push(step(&ids.narrow(1, i, 1)));
                }
                Tensor::cat(&parts, 1)
            });
            let io = root.path().join("io.safetensors");
            write_safetensors(
                &io,
                &[
                    ("input_ids".to_string(), ids.copy()),
                    ("logits".to_string(), logits),
                ],
                None,
            )
            .unwrap();
            let r = reference(&model_dir, &io, &[]);
            eprintln!("{h} heads / {kvh} KV, padded {padded}: {r:?}");
            assert!(
                value(&r, "max_abs_diff") <= LOGIT_TOL,
                "{h} heads / {kvh} KV, padded {padded}: {r:?}"
            );
        }
    }
}
