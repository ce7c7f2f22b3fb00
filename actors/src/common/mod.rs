//! Helpers shared by every layer above `types` and `config` — the stages, the tasks, the trainer and the run — so
//! that none of them has to import a higher one: device names, the layout of a run directory and its checkpoints,
//! and printing to a pipe that may close.

pub mod device;
pub mod output;
pub mod run_dir;
pub mod slurm;
