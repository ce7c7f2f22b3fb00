//! Arrow IPC tee of packed sequences (being written).
use std::path::Path;
use std::process::ExitCode;

pub fn cli_inspect(_file: &Path, _tokenizer: &str, _limit: usize) -> anyhow::Result<ExitCode> {
    anyhow::bail!("lexflow inspect: not yet implemented")
}
