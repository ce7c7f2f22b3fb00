//! `LEXFLOW_PROFILE_STEPS=A..B` records those training steps with libtorch's Kineto profiler (through the C++ shim)
//! into `run_dir/profile/trace-rank0.json`, and `bench/gpu/kernels.py` summarises that trace — the tooling the GPU
//! benchmark uses to compare lexflow's step with PyTorch's, exercised here on CPU.

use lexflow_tests::{lexflow_bin, venv_python};
use std::path::{Path, PathBuf};
use std::process::Command;

fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "profile"
dir = {dir:?}
[input.generate]
acts_per_language = 4
[packer]
seq_len = 64
[train]
devices = ["cpu"]
model = "tiny"
micro_batch = 2
steps = 4
[metrics]
enabled = false
"#,
        dir = dir.display().to_string()
    );
    let p = dir.with_extension("toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn profile_steps_write_a_kineto_trace_that_kernels_py_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cfg = config(&dir);
    let out = Command::new(lexflow_bin())
        .args(["run", cfg.to_str().unwrap(), "--quiet"])
        .env("LEXFLOW_PROFILE_STEPS", "2..3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = dir.join("profile/trace-rank0.json");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let names: Vec<&str> = j["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    // The model's matmuls and the fused optimizer kernel ran inside the profiled steps.
    for want in ["aten::mm", "aten::_fused_adamw_"] {
        assert!(names.contains(&want), "{want} not in the trace");
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/gpu/kernels.py");
    let json = tmp.path().join("kernels.json");
    let k = Command::new(venv_python())
        .arg(&script)
        .arg(format!("lexflow={}", trace.display()))
        .args(["--steps", "2", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let run = &s["lexflow"];
    assert_eq!(run["kind"], "cpu");
    assert!(run["total_ms"].as_f64().unwrap() > 0.0);
    let ops: Vec<&str> = run["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k[0].as_str())
        .collect();
    assert!(ops.iter().any(|o| o.contains("_fused_adamw_")), "{ops:?}");
    // Steps outside 2..3 are not recorded: one profile, two optimizer steps.
    let adam = names
        .iter()
        .filter(|n| **n == "aten::_fused_adamw_")
        .count();
    assert_eq!(adam, 2 * 2, "two steps x two parameter groups");
}
