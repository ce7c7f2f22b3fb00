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
