//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The `lexflow` binary of this build (`LEXFLOW_BIN` overrides): `<target>/<profile>/lexflow`, next to the test
/// executable's `deps/` directory. `make test` builds it before running the tests.
pub fn lexflow_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LEXFLOW_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in <target>/<profile>/deps");
    let bin = profile_dir.join(format!("lexflow{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p lexflow-actors`, as `make test` does) or set LEXFLOW_BIN",
        bin.display()
    );
    bin
}

/// A workspace example binary of this build, `<target>/<profile>/examples/<name>` (`cargo test` builds the examples).
pub fn example_bin(name: &str) -> PathBuf {
    let bin = lexflow_bin()
        .parent()
        .expect("profile dir")
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test --workspace` (as `make test` runs) builds the examples",
        bin.display()
    );
    bin
}

/// The project venv's python (torch, transformers, tokenizers, pyarrow): `LEXFLOW_VENV` (set by scripts/env.sh),
/// else `~/.cache/lexflow/venv`.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("LEXFLOW_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/lexflow/venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run `make setup` (scripts/setup.sh) or `source scripts/env.sh`",
        py.display()
    );
    py
}

/// A small CPU training run (generated corpus, `tiny` model, seq_len 64, a checkpoint every 2 steps, metrics off)
/// written to `<dir>.toml`; `train_extra` is appended to its `[train]` table.
pub fn tiny_run_config(
    dir: &Path,
    devices: &[&str],
    micro_batch: usize,
    steps: u64,
    train_extra: &str,
) -> PathBuf {
    let devices = devices
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[run]
name = "tiny"
dir = {dir:?}
seed = 5
[input.generate]
acts_per_language = 8
[packer]
seq_len = 64
mode = "best-fit"
lookahead = 8
[shards]
count = 4
[edges]
capacity = 2
[train]
devices = [{devices}]
model = "tiny"
micro_batch = {micro_batch}
steps = {steps}
lr = 1e-3
warmup_steps = 2
checkpoint_every = 2
keep_checkpoints = 2
{train_extra}
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

/// The JSON lines a successful command printed (its stderr in the panic message otherwise).
pub fn json_lines_of(o: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// The real corpus (`shared/corpus` next to the repository: `formex/` 68 FORMEX files, `bench/` 610 acts). Required:
/// a test that needs it fails when it is missing instead of passing on nothing.
pub fn real_corpus() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus");
    assert!(
        p.join("formex").is_dir() && p.join("bench").is_dir(),
        "the real corpus is missing at {} (expected shared/corpus/formex and shared/corpus/bench next to the repo)",
        p.display()
    );
    p
}

/// Meta's Llama 3 `tokenizer.model` that set-up installed (`LEXFLOW_LLAMA3_TIKTOKEN`, set by scripts/env.sh): the
/// tiktoken referee's input.
pub fn llama3_tiktoken_model() -> PathBuf {
    let p = std::env::var_os("LEXFLOW_LLAMA3_TIKTOKEN")
        .map(PathBuf::from)
        .expect(
            "LEXFLOW_LLAMA3_TIKTOKEN is not set (run `make setup` and `source scripts/env.sh`)",
        );
    assert!(
        p.is_file(),
        "LEXFLOW_LLAMA3_TIKTOKEN={} does not exist (run `make setup`)",
        p.display()
    );
    p
}

/// The Hugging Face `tokenizer.json` of lexflow's `"llama3"` (generated from Meta's tokenizer.model, what
/// checkpoints hold), for Python checks that need a tokenizer file. Written under the temporary directory in a
/// folder named by its sha256, so runs and test processes share one copy (written to a temporary name, then renamed).
pub fn llama3_tokenizer_json() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let tk = lexflow_actors::tokenizer::Tokenizer::load("llama3").expect("Llama 3 tokenizer");
        let dir = std::env::temp_dir().join(format!("lexflow-llama3-{}", &tk.sha256()[..16]));
        let p = dir.join("tokenizer.json");
        if !p.is_file() {
            std::fs::create_dir_all(&dir).unwrap();
            let tmp = dir.join(format!("tokenizer.json.{}", std::process::id()));
            std::fs::write(&tmp, tk.json_bytes()).unwrap();
            std::fs::rename(&tmp, &p).unwrap();
        }
        p
    })
    .clone()
}

/// Runs `lexflow ARGS`: (success, stdout, stderr).
pub fn lexflow_output(args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(lexflow_bin())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// Runs `lexflow ARGS`, which must succeed; its stdout.
pub fn lexflow_ok(args: &[&str]) -> String {
    let (good, so, se) = lexflow_output(args);
    assert!(good, "lexflow {args:?}:\n{so}\n{se}");
    so
}

/// The JSON lines of a file (none when it is missing).
pub fn json_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every step record of a run (`steps.jsonl`) as (step, the hashes of its sequences).
pub fn step_hashes(dir: &Path) -> Vec<(u64, Vec<String>)> {
    json_lines(&dir.join("steps.jsonl"))
        .into_iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["sequences"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s[1].as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}
