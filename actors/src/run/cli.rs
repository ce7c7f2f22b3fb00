//! The commands that act on a config or a run as a whole: `lexflow run`, `config`, `heldout`, `dedup`, `filter` (the parsing of
//! their arguments is `main.rs`'s; what they do is here), and the logging every command sets up.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, FileChecks, SAMPLE_TOML};
use crate::run::dedup::audit_dedup;
use crate::run::filter::audit_filter;
use crate::run::heldout::build_heldout;
use crate::run::pipeline::{run, RunOptions};
use crate::run::signals;
use crate::stages::reader::Quarantine;

/// `RUST_LOG` sets the level (default `info`); `LEXFLOW_LOG=json` switches to JSON lines. Logs go to stderr.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LEXFLOW_LOG").is_ok_and(|v| v == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.compact().try_init()
    };
}

pub fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, String)> {
    Ok(match path {
        Some(p) => (Config::from_file(p)?, p.display().to_string()),
        None => (
            Config::from_toml(SAMPLE_TOML, "<embedded configs/sample.toml>")?,
            "<embedded>".into(),
        ),
    })
}

pub fn cli_config(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (cfg, _) = load_config(path)?;
    println!("{}", toml::to_string_pretty(&cfg)?);
    Ok(ExitCode::SUCCESS)
}

pub fn cli_run(path: Option<&Path>, resume: bool, quiet: bool) -> anyhow::Result<ExitCode> {
    let (cfg, origin) = load_config(path)?;
    // A finished run resumed: nothing to train, and its statistics stay as they are.
    if let (true, Some(t)) = (resume, &cfg.train) {
        // The newest checkpoint's step, read without verifying it (a resume verifies it, once): only a finished run
        // pays the verification here.
        let newest = crate::common::run_dir::list_checkpoints(&cfg.run.dir)
            .last()
            .and_then(|(_, d)| std::fs::read_to_string(d.join("trainer_state.json")).ok())
            .and_then(|t| serde_json::from_str::<crate::train::TrainerState>(&t).ok())
            .map_or(0, |s| s.step);
        let done = match newest >= t.steps {
            true => crate::train::resume_point(&cfg.run.dir)?,
            false => None,
        };
        if let Some(r) = done {
            if r.step >= t.steps {
                eprintln!(
                    "lexflow run `{}`: already complete ({} of {} steps, {}): nothing to do — raise train.steps to \
                     train further",
                    cfg.run.name,
                    r.step,
                    t.steps,
                    r.checkpoint.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let opts = RunOptions {
        resume,
        progress: !quiet,
        origin,
        replay: None,
    };
    let stats = run(&cfg, &opts)?;
    eprintln!("{}", stats.summary());
    Ok(if stats.outcome == "completed" {
        ExitCode::SUCCESS
    } else {
        // Stopped by a signal: 128 + its number, as a shell reports a process the signal killed (SIGINT 130,
        // SIGTERM 143, SIGHUP 129).
        ExitCode::from(signals::exit_code(signals::received()))
    })
}

/// `lexflow heldout [CONFIG] [--out FILE]`: build the held-out set of a config exactly as `lexflow run` does, print
/// its summary (JSON), and write its sequences as JSON lines (`lang`, `tokens`, `padding`, `doc_starts`, `no_loss`).
pub fn cli_heldout(
    config: Option<&Path>,
    out: Option<&Path>,
) -> anyhow::Result<std::process::ExitCode> {
    let (cfg, _) = load_config(config)?;
    if !cfg.eval.has_loss_set() {
        anyhow::bail!("the config has no held-out set: set eval.paths or eval.holdout");
    }
    let set = build_heldout(&cfg, &Quarantine::counting())?;
    if let Some(path) = out {
        use std::io::Write;
        let f = std::fs::File::create(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        for (li, s) in set.sequences() {
            let line = serde_json::json!({
                "lang": set.languages[li].lang,
                "index": s.index,
                "tokens": s.tokens,
                "padding": s.padding,
                "doc_starts": s.doc_starts,
                "no_loss": s.no_loss,
            });
            writeln!(w, "{line}")?;
        }
        w.flush()?;
    }
    crate::common::output::print_to_stdout(&format!("{}\n", serde_json::to_string_pretty(&set)?))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// `lexflow dedup [CONFIG] [--out F.jsonl] [--mode exact|near] [--texts]`: what `[dedup]` drops from a config's
/// training input ([`audit_dedup`]), with `--mode` overriding `dedup.mode`.
pub fn cli_dedup(
    config: Option<&Path>,
    out: Option<&Path>,
    mode: Option<String>,
    texts: bool,
) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::load_checked(config, FileChecks::default())?;
    if let Some(m) = mode {
        cfg.dedup.mode = serde_json::from_value(serde_json::Value::String(m.clone()))
            .map_err(|_| anyhow::anyhow!("--mode {m}: expected `exact` or `near`"))?;
    }
    if !cfg.dedup.enabled() {
        anyhow::bail!(
            "dedup.mode is `off` in this config: set [dedup] mode = \"exact\" or \"near\", or pass --mode"
        );
    }
    let report = audit_dedup(&cfg, out, texts)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// `lexflow filter [CONFIG] [--out F.jsonl] [--keep-fraction F]`: what `[filter]` keeps of a config's training input
/// ([`audit_filter`]), with `--keep-fraction` overriding the section's rule.
pub fn cli_filter(
    config: Option<&Path>,
    out: Option<&Path>,
    keep_fraction: Option<f64>,
) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::load_checked(config, FileChecks::default())?;
    if let Some(f) = keep_fraction {
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            anyhow::bail!("--keep-fraction {f}: must be in (0, 1]");
        }
        let mut fc = cfg.filter.take().unwrap_or_default();
        fc.keep_fraction = Some(f);
        fc.threshold = None;
        cfg.filter = Some(fc);
    }
    if cfg.filter.is_none() {
        anyhow::bail!(
            "the config has no [filter] section: add one (keep_fraction = 0.4, or threshold = …), or pass --keep-fraction"
        );
    }
    let report = audit_filter(&cfg, out)?;
    crate::common::output::print_to_stdout(&format!(
        "{}\n",
        serde_json::to_string_pretty(&report)?
    ))?;
    Ok(ExitCode::SUCCESS)
}
