//! FORMEX reader actors (being written): input expansion, decompression, archives, quarantine.
use std::process::ExitCode;

pub fn cli_parse(_paths: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("lexflow parse: not yet implemented")
}
