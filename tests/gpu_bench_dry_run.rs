//! The GPU benchmark script (`bench/gpu/run.sh`) on the CPU at toy size: every stage that does not need a GPU
//! (lexflow synthetic and packed, torch eager, the kernel profile comparison, the means, loss parity, the streaming run)
//! must run to the end and leave its JSON, and the summary must hold their rows. The GPU machine is lent rarely and
//! briefly; a plumbing mistake found there costs a whole session's measurements, found here it costs nothing.
//! The numbers of this run mean nothing and are not checked, except that parity (fp32 on CPU) must pass.

use std::process::Command;

use lexflow_tests::{example_bin, lexflow_bin, venv_python};

#[test]
fn gpu_bench_script_runs_every_cpu_capable_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(lexflow_bin(), bin.join("lexflow")).unwrap();
    std::os::unix::fs::symlink(example_bin("train_synthetic"), bin.join("train_synthetic"))
        .unwrap();
    let out = tmp.path().join("out");
    let tokenizer = lexflow_tests::llama3_tokenizer_json()
        .to_string_lossy()
        .into_owned();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let o = Command::new("bash")
        .arg(root.join("bench/gpu/run.sh"))
        .envs([
            ("BENCH_BIN", bin.to_str().unwrap()),
            ("OUT", out.to_str().unwrap()),
            ("PYTHON", venv_python().to_str().unwrap()),
            ("BENCH_DEVICE", "cpu"),
            ("BENCH_MODEL", "tiny"),
            ("BENCH_SEQ_LEN", "128"),
            ("BENCH_MICRO_BATCH", "1"),
            ("BENCH_GRAD_ACCUM", "2"),
            ("BENCH_WARMUP", "1"),
            ("BENCH_TIMED", "2"),
            ("BENCH_PARITY_STEPS", "3"),
            ("BENCH_PARITY_SEQ_LEN", "64"),
            ("BENCH_TOKENIZER", tokenizer.as_str()),
            (
                "BENCH_STAGES",
                "synthetic synthetic_packed torch_eager profile means parity stream",
            ),
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    let tail: String = log
        .lines()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    // What the device tool brings back from $OUT: at most 8 plain files of at most 16 MiB each, named in letters,
    // digits, '.', '_' and '-' (anything more is dropped). The stages' files come back packed in results.tar.gz.
    let files: Vec<(String, u64)> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            assert!(m.is_file(), "{:?} in $OUT is not a plain file", e.path());
            (e.file_name().to_string_lossy().to_string(), m.len())
        })
        .collect();
    assert!(
        files.len() <= 8,
        "{} files in $OUT, the device tool brings back 8: {files:?}",
        files.len()
    );
    for (name, len) in &files {
        assert!(
            *len <= 16 << 20
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{name} ({len} bytes) would not come back"
        );
    }
    for keep in ["run.log", "summary.md", "results.tar.gz"] {
        assert!(
            files.iter().any(|(n, _)| n == keep),
            "no {keep} in $OUT: {files:?}"
        );
    }
    let untar = Command::new("tar")
        .args(["xzf", "results.tar.gz"])
        .current_dir(&out)
        .status()
        .unwrap();
    assert!(untar.success(), "cannot unpack results.tar.gz");
    let json = |name: &str| -> serde_json::Value {
        let p = out.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}; the run's log ends with:\n{tail}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    for stage in [
        "synthetic",
        "synthetic_packed",
        "torch_eager",
        "profile",
        "means",
        "parity",
        "stream",
    ] {
        assert!(
            log.contains(&format!("=== [{stage}] rc=0")),
            "stage {stage} did not succeed; the run's log ends with:\n{tail}"
        );
    }
    for name in ["synthetic", "synthetic_packed", "torch_eager", "stream"] {
        let v = json(name);
        assert!(
            v["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{name}: {v}"
        );
    }
    assert!(json("stream")["data_wait_fraction_timed"].is_number());
    assert_eq!(json("synthetic_packed")["docs_per_seq"], 5);
    let means = json("means");
    for v in [
        "baseline",
        "adamw_unfused",
        "recompute",
        "nccl_world1",
        "packed_varlen",
        "packed_segments",
    ] {
        assert!(
            means[v]["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "means {v}: {means}"
        );
    }
    assert_eq!(json("parity")["ok"], true, "fp32 parity on CPU must hold");
    assert!(json("kernels").is_object());
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for row in [
        "(a) lexflow, streaming",
        "(b) lexflow, synthetic",
        "(b') lexflow",
        "(c) torch eager",
        "loss parity",
    ] {
        let line = summary
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("no {row} row:\n{summary}"));
        assert!(
            !line.contains("| — | — |") && !line.contains("FAILED"),
            "{row} has no result:\n{summary}"
        );
    }
}
