//! Builds the topology from a config and runs it (being written).
use std::path::Path;
use std::process::ExitCode;

pub fn init_logging() {}

pub fn cli_run(_config: Option<&Path>, _resume: bool, _quiet: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}

pub fn cli_config(_config: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}
