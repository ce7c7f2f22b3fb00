//! Generation with a trained checkpoint, checked against Hugging Face:
//! - a checkpoint is a complete HF model directory: `transformers` loads tokenizer, model and generation config from
//!   it alone, tokenizes a prompt to the ids lexflow feeds, and its greedy `generate` gives the ids
//!   `lexflow generate` gives (`scripts/hf_checkpoint.py generate`);
//! - the sampling distribution (temperature, top-k, top-p) is the one transformers' logits warpers leave
//!   (`scripts/hf_checkpoint.py sample`);
//! - sampled answers depend on the seed and the prompt only, not on the batch.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lexflow_actors::generate::{distribution, Sampling};
use lexflow_tests::{json_lines_of, lexflow_bin, tiny_run_config, venv_python};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hf_checkpoint.py")
}

fn trained_checkpoint(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    let cfg = tiny_run_config(&run, &["cpu"], 2, 6, "");
    let st = Command::new(lexflow_bin())
        .args(["run", cfg.to_str().unwrap(), "--quiet"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    run.join("checkpoints/step-000006")
}

fn lexflow_generate(args: &[&str]) -> Vec<serde_json::Value> {
    let o = Command::new(lexflow_bin())
        .arg("generate")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    json_lines_of(&o)
}

const PROMPTS: [&str; 3] = [
    "Article 1\nSubject matter",
    "The Commission shall adopt implementing acts",
    "Les États membres",
];

#[test]
fn a_checkpoint_loads_in_transformers_alone_and_generates_what_lexflow_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = trained_checkpoint(tmp.path());
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing from the checkpoint");
    }
    let max_new = "16";
    let o = Command::new(venv_python())
        .arg(script())
        .args(["generate", ckpt.to_str().unwrap(), max_new])
        .args(PROMPTS)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // Loading and generating must not make transformers warn (a false "incorrect regex" tokenizer warning when
    // config.json lacks transformers_version; "pad_token_id" when no pad token is declared).
    for w in ["incorrect regex", "pad_token_id"] {
        assert!(!stderr.contains(w), "transformers warns ({w}): {stderr}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert!(
        cfg["bos_token_id"].is_u64() && cfg["eos_token_id"].is_u64(),
        "{cfg}"
    );
    let theirs = json_lines_of(&o);
    let mut args = vec![
        ckpt.to_str().unwrap(),
        "--max-new-tokens",
        max_new,
        "--batch-size",
        "1",
    ];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    let ours = lexflow_generate(&args);
    assert_eq!(theirs.len(), PROMPTS.len());
    assert_eq!(ours.len(), PROMPTS.len());
    let tok =
        lexflow_actors::tokenizer::Tokenizer::load(ckpt.join("tokenizer.json").to_str().unwrap())
            .unwrap();
    for (t, o) in theirs.iter().zip(&ours) {
        // The prompt ids: HF's tokenizer (BOS from the tokenizer's post-processor) = lexflow's raw prompt.
        let mut want: Vec<u64> = vec![tok.bos_id().unwrap() as u64];
        want.extend(
            tok.encode(t["prompt"].as_str().unwrap())
                .iter()
                .map(|&i| i as u64),
        );
        let got: Vec<u64> = t["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "prompt ids of {}", t["prompt"]);
        assert_eq!(
            t["token_ids"], o["token_ids"],
            "greedy answer to {}",
            t["prompt"]
        );
        assert!(!o["token_ids"].as_array().unwrap().is_empty());
    }
}

#[test]
fn sampling_keeps_the_distribution_transformers_warpers_keep() {
    // Pseudo-random logits without ties, with settings from plain sampling to narrow nuclei.
    let mut x = 0x9e37_79b9u64;
    let mut cases = Vec::new();
    for (t, k, p) in [
        (1.0, 0, 1.0),
        (0.7, 0, 0.9),
        (1.3, 20, 1.0),
        (0.5, 50, 0.8),
        (2.0, 5, 0.5),
        (0.9, 0, 0.3),
        (1.0, 1, 1.0),
    ] {
        let logits: Vec<f32> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64 * 12.0 - 6.0) as f32
            })
            .collect();
        cases.push((
            logits,
            Sampling {
                temperature: t,
                top_k: k,
                top_p: p,
                seed: 0,
            },
        ));
    }
    let mut child = Command::new(venv_python())
        .arg(script())
        .arg("sample")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for (l, s) in &cases {
            let line = serde_json::json!({"logits": l, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p});
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let theirs = json_lines_of(&child.wait_with_output().unwrap());
    assert_eq!(theirs.len(), cases.len());
    for ((l, s), t) in cases.iter().zip(&theirs) {
        let ours = distribution(l, s);
        let ids: Vec<u64> = ours.iter().map(|x| x.0 as u64).collect();
        let want: Vec<u64> = t["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, want, "kept tokens for {s:?}");
        for ((_, p), q) in ours.iter().zip(t["probs"].as_array().unwrap()) {
            let q = q.as_f64().unwrap();
            assert!(
                (p - q).abs() <= 1e-5 * q.max(1e-3),
                "{s:?}: p {p} vs transformers {q}"
            );
        }
    }
}

#[test]
fn sampled_answers_depend_on_seed_and_prompt_not_on_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = trained_checkpoint(tmp.path());
    let run = |batch: &str, seed: &str| {
        let mut args = vec![
            ckpt.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-k",
            "200",
            "--seed",
            seed,
            "--batch-size",
            batch,
        ];
        for p in PROMPTS {
            args.extend(["--prompt", p]);
        }
        lexflow_generate(&args)
            .into_iter()
            .map(|v| v["token_ids"].clone())
            .collect::<Vec<_>>()
    };
    let one = run("1", "11");
    assert_eq!(one, run("3", "11"), "the batch changed sampled answers");
    assert_ne!(one, run("1", "12"), "another seed, the same answers");
    let greedy: Vec<serde_json::Value> = {
        let mut args = vec![ckpt.to_str().unwrap(), "--max-new-tokens", "12"];
        for p in PROMPTS {
            args.extend(["--prompt", p]);
        }
        lexflow_generate(&args)
            .into_iter()
            .map(|v| v["token_ids"].clone())
            .collect()
    };
    assert_ne!(
        one, greedy,
        "temperature 1 sampled exactly the greedy answers"
    );
    // A GPU this machine does not have is an error naming the option, not a libtorch panic with a C++ backtrace.
    let o = Command::new(lexflow_bin())
        .args(["generate", ckpt.to_str().unwrap(), "--prompt", PROMPTS[0]])
        .args(["--device", "cuda:63"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--device: cuda:63, but libtorch sees")
            && !err.contains("panicked")
            && !err.contains("frame #"),
        "{err}"
    );
}
