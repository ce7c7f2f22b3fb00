//! The layout of a run directory (`run.dir`) that the trainer writes and the run, `replay`, `generate` and
//! `qa eval` read: where the checkpoints are, and the names of the files a checkpoint holds besides the model.

use std::path::{Path, PathBuf};

/// The run config inside a checkpoint directory.
pub const RUN_CONFIG_FILE: &str = "run_config.toml";
/// The input files of the run's stream inside a checkpoint directory ([`crate::run::inputs::InputsRecord`]).
pub const INPUTS_FILE: &str = "inputs.json";

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// `(step, dir)` of every `step-NNNNNN` directory, oldest first (temporary directories are not listed).
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(checkpoints_dir(run_dir)) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}
