//! Deterministic generator of FORMEX sample packages (being written).
use std::path::Path;

#[derive(Debug, Default, serde::Serialize)]
pub struct GenStats {
    pub files: usize,
}

pub fn generate(_cfg: &crate::config::GenerateConfig, _out: &Path) -> anyhow::Result<GenStats> {
    anyhow::bail!("gen-sample: not yet implemented")
}
