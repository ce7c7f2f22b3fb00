//! The held-out evaluation set of a run (`[eval]`): the act packages `eval.holdout` takes out of the lanes and the
//! files of `eval.paths`, read, tokenized and packed once before training ([`crate::tasks::heldout::build`]).

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::run::lanes::input_files;
use crate::stages::reader::{self, Quarantine};
use crate::stages::tokenizer::Tokenizer;

/// Packs the held-out set: the `held` input files (their manifests in `manifests`), then `extra` (the `eval.paths`
/// files).
#[allow(clippy::too_many_arguments)]
pub(super) fn heldout_set(
    cfg: &Config,
    held: &[PathBuf],
    extra: &[PathBuf],
    manifests: &reader::ManifestIndex,
    tokenizer: &Tokenizer,
    eot: u32,
    pad: u32,
    quarantine: &Quarantine,
) -> anyhow::Result<crate::tasks::heldout::HeldOutSet> {
    let extra_manifests = reader::ManifestIndex::build(extra);
    let files: Vec<(PathBuf, &reader::ManifestIndex)> = held
        .iter()
        .map(|f| (f.clone(), manifests))
        .chain(extra.iter().map(|f| (f.clone(), &extra_manifests)))
        .collect();
    let langs: Vec<String> = cfg.sampler.mix.keys().cloned().collect();
    let spec = crate::tasks::heldout::BuildSpec {
        eval: &cfg.eval,
        qa: cfg.input.prompt_format(),
        packer: &cfg.packer,
        langs: &langs,
        tokenizer,
        add_bos: cfg.tokenizer.add_bos,
        eot,
        pad,
    };
    let set = crate::tasks::heldout::build(&files, &spec, quarantine);
    if set.is_empty() {
        anyhow::bail!(
            "[eval]: the held-out set is empty ({} files, {} read, {} quarantined, {} documents outside the mix): \
             eval.holdout holds out act packages (each with that probability, by a hash of its name; an act's \
             files and language versions go together), so with few acts it may hold out none, or only files that \
             carry no text; give held-out files in eval.paths, or raise eval.holdout",
            set.files,
            set.files_read,
            set.quarantined_files,
            set.documents_outside_mix
        );
    }
    Ok(set)
}

/// The held-out set of a config, built exactly as `lexflow run` builds it (`lexflow heldout`).
pub fn build_heldout(
    cfg: &Config,
    quarantine: &Quarantine,
) -> anyhow::Result<crate::tasks::heldout::HeldOutSet> {
    let files = input_files(cfg, &cfg.run.dir.join("corpus"))?;
    let manifests = reader::ManifestIndex::build(&files);
    let (_, held) = crate::tasks::heldout::split_files(
        files,
        cfg.eval.holdout,
        &manifests,
        crate::tasks::heldout::HoldoutSplit::Package,
    );
    let tokenizer = Tokenizer::load(&cfg.tokenizer.path)?;
    let id = |name: &str| {
        tokenizer.token_id(name).with_context(|| {
            format!(
                "{name:?} is not a token of tokenizer {}",
                cfg.tokenizer.path
            )
        })
    };
    let (eot, pad) = (id(&cfg.packer.eot_token)?, id(&cfg.packer.pad_token)?);
    heldout_set(
        cfg,
        &held,
        &eval_paths_files(cfg)?,
        &manifests,
        &tokenizer,
        eot,
        pad,
        quarantine,
    )
}

/// The files `eval.paths` names (none when it is empty).
pub(super) fn eval_paths_files(cfg: &Config) -> anyhow::Result<Vec<PathBuf>> {
    if cfg.eval.paths.is_empty() {
        return Ok(Vec::new());
    }
    reader::expand_inputs(&cfg.eval.paths).context("eval.paths")
}
