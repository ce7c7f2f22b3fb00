//! Tokenizer actors (being written).
use std::path::Path;
use std::process::ExitCode;

pub fn cli_train(_paths: &[String], _vocab: usize, _out: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}

pub fn cli_encode(_tok: &str) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}
