//! The input files of a run, by language lane: `input.paths` expanded (or the sample corpus generated), each file in
//! the lane of its language (sniffed from its name or content), the others outside the mix.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;
use crate::stages::reader;

/// One lane's inputs.
pub(super) struct Lane {
    pub(super) lang: String,
    pub(super) files: Vec<PathBuf>,
}

/// One lane per language of the mix, each with its files (in the given, sorted order); and the files outside the
/// mix, with their language (None: none could be told from the name or the first 64 KiB).
pub(super) fn lanes_of(
    cfg: &Config,
    files: Vec<PathBuf>,
) -> (Vec<Lane>, Vec<(PathBuf, Option<String>)>) {
    let mut lanes: Vec<Lane> = cfg
        .sampler
        .mix
        .keys()
        .map(|l| Lane {
            lang: l.clone(),
            files: Vec::new(),
        })
        .collect();
    let mut outside = Vec::new();
    for f in files {
        let lang = reader::sniff_lang(&f);
        match lang
            .as_deref()
            .and_then(|l| lanes.iter().position(|x| x.lang == l))
        {
            Some(i) => lanes[i].files.push(f),
            None => outside.push((f, lang)),
        }
    }
    (lanes, outside)
}

/// The input files of a config: `input.paths` expanded, or the sample corpus generated into `corpus_dir`.
pub(super) fn input_files(cfg: &Config, corpus_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let patterns: Vec<String> = if cfg.input.paths.is_empty() {
        let g = crate::stages::gen_sample::generate_exact(&cfg.input.generate, corpus_dir)
            .with_context(|| {
                format!("generating the sample corpus into {}", corpus_dir.display())
            })?;
        tracing::info!(dir = %corpus_dir.display(), ?g, "generated sample corpus");
        vec![corpus_dir.display().to_string()]
    } else {
        cfg.input.paths.clone()
    };
    Ok(reader::expand_inputs(&patterns)?)
}
