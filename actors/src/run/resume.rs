//! What a resume (or a replay) checks before it continues a checkpoint's stream: the config keys that decide the
//! stream are unchanged (`run_config.toml`), and so are the input files (`inputs.json`, [`crate::run::inputs`]).

use std::path::Path;

use crate::config::Config;

/// Config keys that decide the data stream: a resume continues the checkpoint's stream, so they must not change.
/// (Thread counts, edge capacities, `[train]`, `[metrics]`, `[eval]` besides the held-out split do not change it.)
pub(super) const STREAM_KEYS: [&str; 10] = [
    "run.seed",
    "input",
    "tokenizer.path",
    "tokenizer.add_bos",
    "sampler",
    "packer",
    "dedup",
    "filter",
    "eval.holdout",
    // Held-out documents of their own: with dedup.against_heldout, training copies of them are dropped.
    "eval.paths",
];

/// Refuses a resume or replay whose input files differ from those its checkpoint's stream read (`inputs.json`): its
/// lane positions would point at other documents. Held-out files that differ only change the evaluation set (a
/// warning), unless `dedup.against_heldout` drops their copies from the stream.
pub(super) fn check_same_inputs(
    cfg: &Config,
    now: &crate::run::inputs::InputsRecord,
    then: &crate::run::inputs::InputsRecord,
    checkpoint: &Path,
    replay: bool,
) -> anyhow::Result<()> {
    let what = if replay { "replay" } else { "--resume" };
    let fix = if replay {
        "A replay regenerates the batches the run trained only from the files it read: restore them"
    } else {
        "A resumed run continues its checkpoint's stream exactly: restore the files, or start a new run (another \
         run.dir, train.init_from = the checkpoint to start from its weights)"
    };
    if let Some(d) = now.lanes_differ(then) {
        anyhow::bail!(
            "{what}: the input files differ from those the stream of checkpoint {} read: {d}. {fix}",
            checkpoint.display()
        );
    }
    let against_heldout = cfg.dedup.enabled() && cfg.dedup.against_heldout;
    for d in [now.eval_files_differ(then), now.held_out_differs(then)]
        .into_iter()
        .flatten()
    {
        if against_heldout {
            anyhow::bail!(
                "{what}: {d} (checkpoint {}); with dedup.against_heldout they decide which documents the stream \
                 drops. {fix}",
                checkpoint.display()
            );
        }
        tracing::warn!(
            checkpoint = %checkpoint.display(),
            "{what}: {d}: the held-out evaluation set is not the one of the checkpoint's run, so its losses are not \
             comparable with the earlier evaluations"
        );
    }
    Ok(())
}

/// Refuses to resume from `checkpoint` when a [`STREAM_KEYS`] key differs from the config that wrote it
/// (`run_config.toml`): the resumed run would train on a stream no uninterrupted run produces (and a shorter
/// `packer.seq_len` could not even hold the checkpoint's open sequences).
pub(super) fn check_same_stream(cfg: &Config, checkpoint: &Path) -> anyhow::Result<()> {
    let p = checkpoint.join(crate::common::run_dir::RUN_CONFIG_FILE);
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(()); // written by a run without a config file (tests driving the trainer directly)
    };
    let then = Config::stored(&text, &p.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e} (the config stored in the checkpoint)"))?;
    let (mut a, mut b) = (toml::Value::try_from(&then)?, toml::Value::try_from(cfg)?);
    // Settings that cannot act are not changes: [dedup] parameters while it is off in both, the generated corpus's
    // settings when both read input.paths, eval.paths when neither drops training copies of held-out documents.
    let off = |v: &toml::Value| {
        v.get("dedup")
            .and_then(|d| d.get("mode"))
            .and_then(|m| m.as_str())
            .is_none_or(|m| m == "off")
    };
    let reads_paths = |v: &toml::Value| {
        v.get("input")
            .and_then(|i| i.get("paths"))
            .and_then(|p| p.as_array())
            .is_some_and(|p| !p.is_empty())
    };
    let no_heldout_check = |v: &toml::Value| {
        off(v)
            || v.get("dedup")
                .and_then(|d| d.get("against_heldout"))
                .and_then(|h| h.as_bool())
                == Some(false)
    };
    let (dedup_off, paths) = (off(&a) && off(&b), reads_paths(&a) && reads_paths(&b));
    // eval.paths acts on the stream only through dedup.against_heldout.
    let eval_paths_inert = no_heldout_check(&a) && no_heldout_check(&b);
    for v in [&mut a, &mut b] {
        if let Some(t) = v.as_table_mut() {
            if dedup_off {
                t.remove("dedup");
            }
            if paths {
                if let Some(i) = t.get_mut("input").and_then(|i| i.as_table_mut()) {
                    i.remove("generate");
                }
            }
            if eval_paths_inert {
                if let Some(e) = t.get_mut("eval").and_then(|e| e.as_table_mut()) {
                    e.remove("paths");
                }
            }
        }
    }
    let mut diffs = Vec::new();
    for key in STREAM_KEYS {
        let get = |v: &toml::Value| key.split('.').try_fold(v.clone(), |v, k| v.get(k).cloned());
        diff_values(key, get(&a).as_ref(), get(&b).as_ref(), &mut diffs);
    }
    if diffs.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "--resume: the config changes the data stream of checkpoint {}:\n  {}\nA resumed run continues its \
         checkpoint's stream exactly; restore these keys, or start a new run (another run.dir, train.init_from = \
         the checkpoint to start from its weights)",
        checkpoint.display(),
        diffs.join("\n  ")
    )
}

/// The leaves where `a` (the checkpoint's config) and `b` (this one) differ, as `key: X in the checkpoint, Y now`.
pub(super) fn diff_values(
    key: &str,
    a: Option<&toml::Value>,
    b: Option<&toml::Value>,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                diff_values(&format!("{key}.{k}"), x.get(k), y.get(k), out);
            }
        }
        (x, y) if x != y => {
            let show = |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
            out.push(format!(
                "{key}: {} in the checkpoint, {} now",
                show(x),
                show(y)
            ));
        }
        _ => {}
    }
}
