//! The composition root of a run: config → topology of actors and edges → run → statistics.
//!
//! ```text
//! per language lane l (files sorted, lane = sniffed language):
//!   source_l ─► reader pool_l (R threads, ordered) ─► tokenizer pool_l (T threads, ordered) ─► lane edge l ─┐
//! sampler (token-exact mix over lanes) ◄────────────────────────────────────────────────────────────────────┘
//!   ─► packer ─► shard writer ─► rank 0 … rank W-1 (trainer actors, or counting sinks without [train])
//! ```
//! Every arrow is a bounded edge (capacity from `[edges]`). Each lane's document order is fixed by its sorted file
//! list and the ordered pools, and the sampler's choice depends only on token counts, so the output stream is the
//! same for any number of reader/tokenizer threads.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lexflow_dataflow::{edge, ordered_pool, EdgeReceiver, Shutdown, Topology};

use crate::config::{Config, ExhaustedPolicy, SAMPLE_TOML};
use crate::run::stats::{InputReport, RunStats};
use crate::stages::packer::{run_packer, Packer, PackerReport};
use crate::stages::reader::{self, Quarantine};
use crate::stages::sampler::{run_sampler, SamplerReport, SamplerStart};
use crate::stages::shard_writer::{run_shard_writer, ShardReport, ShardWriter};
use crate::stages::tokenize::prepend_bos;
use crate::stages::tokenizer::Tokenizer;
use crate::types::{DocBatch, DocId, LanePosition, PackedSequence, SamplerState, TokenizedBatch};

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

pub struct RunOptions {
    pub resume: bool,
    pub progress: bool,
    pub origin: String,
    /// Regenerate sequences without training (`lexflow replay`, `lexflow provenance`).
    pub replay: Option<ReplaySpec>,
}

/// A replay: start from a dataflow resume point (or the beginning), skip to `skip`, stop at `limit`, collect.
#[derive(Default)]
pub struct ReplaySpec {
    pub data: Option<crate::types::ResumePoint>,
    /// The checkpoint `data` comes from (its dedup state, `[dedup]`).
    pub checkpoint: Option<PathBuf>,
    /// The checkpoint whose inputs record (`inputs.json`) the replayed stream's files must match, and whose held-out
    /// split it uses: the replayed run's.
    pub inputs_from: Option<PathBuf>,
    pub skip: u64,
    pub limit: u64,
    pub collected: Arc<Mutex<Vec<PackedSequence>>>,
    /// Also describe every piece's document (provenance).
    pub describe: bool,
    pub described: Arc<Mutex<Vec<PieceInfo>>>,
}

/// Provenance of one piece of one sequence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PieceInfo {
    pub index: u64,
    pub offset: u32,
    pub lang: String,
    pub path: String,
    pub ordinal: u32,
    pub celex: Option<String>,
    pub doc_type: String,
    pub title: Option<String>,
    /// Article (identifier and title) in which the piece starts, where the document has articles.
    pub article: Option<String>,
    pub token_start: u32,
    pub token_end: u32,
}

/// One lane's inputs.
struct Lane {
    lang: String,
    files: Vec<PathBuf>,
}

/// Runs a whole pipeline; returns the statistics (also written to `<run.dir>/stats.json`).
pub fn run(cfg: &Config, opts: &RunOptions) -> anyhow::Result<RunStats> {
    let t0 = Instant::now();
    let replay = opts.replay.as_ref();
    let run_dir = cfg.run.dir.clone();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating run directory {}", run_dir.display()))?;

    // One process per rank (torchrun-style launch): this process trains one rank and keeps its share of the stream;
    // ranks other than 0 write their own stats/quarantine/corpus files and serve metrics on port + LOCAL_RANK.
    let process = match (&cfg.train, replay) {
        (Some(t), None) => crate::train::process_group(t)?,
        _ => None,
    };
    let per_process = |name: &str, ext: &str| match process {
        Some((r, _)) if r > 0 => run_dir.join(format!("{name}.rank{r}{ext}")),
        _ => run_dir.join(format!("{name}{ext}")),
    };

    lexflow_metrics::set_run_labels(&cfg.run.name);
    let _metrics_server = if cfg.metrics.enabled {
        let listen = match (
            process,
            std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse::<u16>().ok()),
        ) {
            (Some(_), Some(local)) if local > 0 => offset_port(&cfg.metrics.listen, local)?,
            _ => cfg.metrics.listen.clone(),
        };
        Some(lexflow_metrics::serve(&listen)?)
    } else {
        None
    };

    let resume = if replay.is_some() {
        None
    } else if opts.resume && cfg.train.is_some() {
        match crate::train::resume_point(&run_dir)? {
            Some(r) => {
                check_same_stream(cfg, &r.checkpoint)?;
                if process.is_none_or(|(rank, _)| rank == 0) {
                    crate::train::set_aside_unusable(&r.skipped_dirs);
                }
                tracing::info!(step = r.step, sequences = r.sequences_consumed, checkpoint = %r.checkpoint.display(), "resuming");
                Some(r)
            }
            None => {
                tracing::warn!(
                    "--resume: no checkpoint in {}; starting from the beginning",
                    run_dir.display()
                );
                None
            }
        }
    } else {
        None
    };
    // What the checkpoint this run continues (or replays) recorded of its inputs: its files are checked below, and its
    // held-out split is kept (a checkpoint written before records existed split by file).
    let from_checkpoint: Option<PathBuf> = match replay {
        Some(r) => r.inputs_from.clone(),
        None => resume.as_ref().map(|r| r.checkpoint.clone()),
    };
    let recorded = match &from_checkpoint {
        Some(d) => crate::run::inputs::InputsRecord::read(d)?,
        None => None,
    };
    let holdout_split = match (&from_checkpoint, &recorded) {
        (_, Some(r)) => r.holdout_split,
        (Some(_), None) => crate::tasks::heldout::HoldoutSplit::File,
        (None, None) => crate::tasks::heldout::HoldoutSplit::Package,
    };

    let files = input_files(cfg, &per_process("corpus", ""))?;
    // Manifests (DOC/PUBLICATION) give act and annex files their CELEX/date/title; parsing them up front keeps the
    // result independent of reader thread timing.
    let manifests = Arc::new(reader::ManifestIndex::build(&files));
    // `eval.holdout`: these files are never trained on (also in replays: the lanes must be the run's lanes).
    let total_files = files.len() as u64;
    let (files, held_files) =
        crate::tasks::heldout::split_files(files, cfg.eval.holdout, &manifests, holdout_split);
    let mix: Vec<(String, f64)> = cfg
        .sampler
        .mix
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let (lanes, outside) = lanes_of(cfg, files);
    let eval_files = eval_paths_files(cfg)?;
    let inputs = crate::run::inputs::InputsRecord::new(
        lanes.iter().map(|l| (l.lang.as_str(), l.files.as_slice())),
        &held_files,
        holdout_split,
        cfg.eval.holdout,
    )
    .with_eval_files(&eval_files);
    if let (Some(then), Some(dir)) = (&recorded, &from_checkpoint) {
        check_same_inputs(cfg, &inputs, then, dir, replay.is_some())?;
    }
    let mut input = InputReport {
        files: total_files,
        files_held_out: held_files.len() as u64,
        files_outside_mix: outside.len() as u64,
        ..Default::default()
    };
    let mut empty_lanes = Vec::new();
    for l in &lanes {
        input
            .files_per_lang
            .insert(l.lang.clone(), l.files.len() as u64);
        if l.files.is_empty() {
            let held = held_files
                .iter()
                .filter(|f| reader::sniff_lang(f).as_deref() == Some(l.lang.as_str()))
                .count();
            match held {
                0 => empty_lanes.push(format!("`{}` (no input file)", l.lang)),
                n => empty_lanes.push(format!(
                    "`{}` (its {n} input files are all held out by eval.holdout)",
                    l.lang
                )),
            }
        }
    }
    if !empty_lanes.is_empty() && empty_lanes.len() < lanes.len() {
        // An empty lane is exhausted before its first document: under `stop` (and `cycle`, which has nothing to
        // restart) the stream would end before its first sequence, and a training run would "complete" 0 steps.
        // (No file in any language: the run fails once it has read and quarantined what it could, naming the
        // quarantine report.)
        let found: Vec<String> = lanes
            .iter()
            .filter(|l| !l.files.is_empty())
            .map(|l| format!("{} {}", l.lang, l.files.len()))
            .collect();
        let what = format!(
            "sampler.mix: nothing to read for {} (input files per language of the mix: {}; outside the mix: {})",
            empty_lanes.join(", "),
            if found.is_empty() { "none".to_string() } else { found.join(", ") },
            outside.len()
        );
        match cfg.sampler.on_exhausted {
            crate::config::ExhaustedPolicy::Renormalize => {
                tracing::warn!("{what}: the mix is renormalized over the other languages (on_exhausted = renormalize)")
            }
            policy => anyhow::bail!(
                "{what}. With sampler.on_exhausted = {:?} a language with nothing to read ends the stream before \
                 its first sequence. Add files in that language to input.paths, remove it from sampler.mix, or set \
                 sampler.on_exhausted = \"renormalize\" to train on the other languages",
                format!("{policy:?}").to_lowercase()
            ),
        }
    }

    let tokenizer = Tokenizer::load(&cfg.tokenizer.path)?;
    let token = |name: &str, key: &str| {
        tokenizer.token_id(name).with_context(|| {
            format!(
                "packer.{key} = {name:?} is not a token of tokenizer {}",
                cfg.tokenizer.path
            )
        })
    };
    let qa_format = cfg.input.prompt_format();
    qa_format
        .check_tokenizer(&tokenizer)
        .context("input.qa_template")?;
    let read_opts = Arc::new(reader::ReadOptions {
        qa: qa_format,
        mixed_languages: false,
    });
    let eot = token(&cfg.packer.eot_token, "eot_token")?;
    let pad = token(&cfg.packer.pad_token, "pad_token")?;

    let world = if replay.is_some() || process.is_some() {
        1
    } else {
        cfg.world_size()
    };
    if let (None, Some(t), None) = (replay, &cfg.train, &resume) {
        // Weights to start from inside this run's own checkpoints would be set aside before they are read.
        if let Some(init) = &t.init_from {
            let c = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let own = crate::common::run_dir::checkpoints_dir(&run_dir);
            if c(init).starts_with(c(&own))
                && !crate::common::run_dir::list_checkpoints(&run_dir).is_empty()
            {
                anyhow::bail!(
                    "train.init_from = {} is a checkpoint of this run.dir, which a run started without --resume sets \
                     aside: continue this run with --resume, or start the new one in another run.dir",
                    init.display()
                );
            }
        }
        if process.is_none_or(|(rank, _)| rank == 0) {
            crate::train::set_aside_previous_run(&run_dir)?;
        }
    }
    let (skip, data) = match replay {
        Some(r) => (r.skip, r.data.clone()),
        None => (
            resume.as_ref().map_or(0, |r| r.sequences_consumed),
            resume.as_ref().and_then(|r| r.data.clone()),
        ),
    };
    if let Some(d) = &data {
        if d.lanes.len() != lanes.len() {
            anyhow::bail!(
                "the checkpoint's dataflow has {} language lanes but sampler.mix now has {}: resume needs the same mix",
                d.lanes.len(),
                lanes.len()
            );
        }
    }
    let start_lanes: Vec<LanePosition> = data
        .as_ref()
        .map(|d| d.lanes.clone())
        .unwrap_or_else(|| vec![LanePosition::default(); lanes.len()]);

    // `[dedup]`: the lanes' index, with the held-out documents and (resume, replay) the checkpoint's entries.
    let dedup = match cfg.dedup.enabled() {
        true => {
            let from = match replay {
                Some(r) => r.checkpoint.clone().filter(|_| r.data.is_some()),
                None => resume
                    .as_ref()
                    .filter(|r| r.data.is_some())
                    .map(|r| r.checkpoint.clone()),
            };
            Some(Arc::new(build_dedup_index(
                cfg,
                &lanes,
                &held_files,
                &eval_files,
                &read_opts,
                from.as_deref(),
            )?))
        }
        false => None,
    };
    let dedup_log = match (&dedup, replay) {
        (Some(_), None) => {
            let p = per_process("dedup", ".jsonl");
            Some(Arc::new(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .with_context(|| format!("opening {}", p.display()))?,
            )))
        }
        _ => None,
    };

    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.install_signal_handler() {
        tracing::debug!("signal handler not installed: {e}");
    }
    // On top of it: which signal stopped the run (its exit code), and the forced exit on a second one.
    if let Err(e) = signals::install() {
        tracing::debug!("signal exit codes not installed: {e}");
    }
    let mut topo = Topology::new(shutdown.clone());
    let cap = |stage: &str| cfg.edges.capacity_of(stage);

    let quarantine_path = per_process("quarantine", ".jsonl");
    let quarantine = Arc::new(Quarantine::create(&quarantine_path)?);
    let counters = Arc::new(Counters::default());
    // Files outside the mix are not trained on. One whose language could not be told is read here: if it is broken
    // (a corrupt archive, a Q&A file whose first line is not JSON) it is quarantined like any unreadable input,
    // never just counted; if it reads, it is a file of no known language, listed in the log.
    for (f, lang) in &outside {
        if lang.is_none() {
            counters.files_read.fetch_add(1, RELAXED);
            if let Err(e) = reader::read_file_with(f, &manifests, &read_opts) {
                quarantine.record(&e);
                counters.quarantined.fetch_add(1, RELAXED);
                input.files_outside_mix -= 1;
                continue;
            }
            tracing::warn!(
                file = %f.display(),
                "no language could be told from this file's name or content: not in any lane of the mix (not trained on)"
            );
        }
        *input
            .outside_mix
            .entry(lang.clone().unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
    }
    if !input.outside_mix.is_empty() {
        tracing::info!(per_language = ?input.outside_mix, "input files outside the mix (not trained on)");
    }

    // The held-out set, packed once before training starts; the Q&A questions asked at every evaluation.
    let rank0 = process.is_none_or(|(r, _)| r == 0);
    let evaluating = cfg.train.is_some() && replay.is_none();
    let heldout = match evaluating && cfg.eval.has_loss_set() {
        true => {
            let t = Instant::now();
            let set = heldout_set(
                cfg,
                &held_files,
                &eval_files,
                &manifests,
                &tokenizer,
                eot,
                pad,
                &quarantine,
            )?;
            tracing::info!(
                seconds = format!("{:.2}", t.elapsed().as_secs_f64()),
                files = set.files,
                sequences = set.languages.iter().map(|l| l.sequences).sum::<usize>(),
                hash = %set.hash,
                "held-out set ready"
            );
            if rank0 {
                let p = run_dir.join(crate::tasks::heldout::SET_FILE);
                std::fs::write(&p, serde_json::to_string_pretty(&set)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Some(Arc::new(set))
        }
        false => None,
    };
    let qa_probe = match evaluating {
        true => crate::tasks::heldout::qa_probe(cfg, tokenizer.clone())?.map(Arc::new),
        false => None,
    };
    if let (Some(q), true) = (&qa_probe, rank0) {
        let dir = run_dir.join(crate::tasks::heldout::QA_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let text: String = q
            .gold
            .iter()
            .map(|g| serde_json::to_string(g).map(|l| l + "\n"))
            .collect::<Result<_, _>>()?;
        std::fs::write(dir.join("gold.jsonl"), text)
            .with_context(|| format!("writing {}", dir.join("gold.jsonl").display()))?;
        tracing::info!(questions = q.gold.len(), "Q&A evaluation questions ready");
    }

    // Lanes: source → reader pool → tokenizer pool.
    let mut lane_rx: Vec<EdgeReceiver<TokenizedBatch>> = Vec::new();
    for (li, lane) in lanes.iter().enumerate() {
        let lang = lane.lang.clone();
        let (ftx, frx) =
            edge::<(u32, PathBuf, u32)>(&format!("source.{lang}->reader.{lang}"), cap("reader"));
        let to_tokenizer = match dedup {
            Some(_) => format!("reader.{lang}->dedup.{lang}"),
            None => format!("reader.{lang}->tokenizer.{lang}"),
        };
        let (dtx, drx) = edge::<DocBatch>(&to_tokenizer, cap("reader"));
        let (ttx, trx) =
            edge::<TokenizedBatch>(&format!("tokenizer.{lang}->sampler"), cap("tokenizer"));
        let files = lane.files.clone();
        let cycle = cfg.sampler.on_exhausted == ExhaustedPolicy::Cycle;
        let start = start_lanes[li];
        topo.spawn(format!("source.{lang}"), move |ctx| {
            // File k of the lane's stream is files[k % n] (k counts on across cycles); resume starts at the
            // checkpoint's file and skips the documents before its ordinal: a seek, not a replay.
            let n = files.len() as u64;
            if n == 0 {
                return Ok(());
            }
            let mut k = start.file as u64;
            loop {
                if !cycle && k >= n {
                    return Ok(());
                }
                if ctx.should_stop() {
                    return Ok(());
                }
                let skip = if k == start.file as u64 {
                    start.ordinal
                } else {
                    0
                };
                if ftx
                    .send((k as u32, files[(k % n) as usize].clone(), skip))
                    .is_err()
                {
                    return Ok(());
                }
                k += 1;
            }
        });
        let q = quarantine.clone();
        let c = counters.clone();
        let lang2 = lang.clone();
        let mi = manifests.clone();
        let ro = read_opts.clone();
        let dd = dedup.clone();
        ordered_pool(
            &mut topo,
            &format!("reader.{lang}"),
            cfg.reader.threads,
            cap("reader"),
            frx,
            dtx,
            move |_| {
                let q = q.clone();
                let c = c.clone();
                let lang = lang2.clone();
                let mi = mi.clone();
                let ro = ro.clone();
                let dd = dd.clone();
                let am = lexflow_metrics::actor(&format!("reader.{lang}"));
                move |ctx: &lexflow_dataflow::ActorContext,
                      (file, path, skip): (u32, PathBuf, u32)| {
                    ctx.set_input(path.display().to_string());
                    let t = Instant::now();
                    let mut docs = match reader::read_file_with(&path, &mi, &ro) {
                        Ok(docs) => docs,
                        // Bad content (and a missing or forbidden file: the same on a resume) is quarantined; a
                        // file that cannot be read now is not bad input, and skipping it would make this run's
                        // stream differ from its resume and replay.
                        Err(e) if e.is_transient_io() => {
                            return Err(format!(
                                "{e} (retried). An I/O failure is not bad input: skipping the file would make this \
                                 run's stream differ from its resume and replay. Fix the storage and continue with \
                                 `lexflow run --resume` (exact from the last checkpoint), or remove the file from \
                                 the input and start a new run"
                            )
                            .into());
                        }
                        Err(e) => {
                            q.record(&e);
                            c.quarantined.fetch_add(1, RELAXED);
                            am.error("quarantined");
                            Vec::new()
                        }
                    };
                    // Documents before the resume position were trained on already: keep their ordinals, drop their text.
                    for d in docs.iter_mut().take(skip as usize) {
                        d.text.clear();
                    }
                    c.files_read.fetch_add(1, RELAXED);
                    c.documents.fetch_add(docs.len() as u64, RELAXED);
                    if let Ok(mut g) = c.documents_per_lang.lock() {
                        *g.entry(lang.clone()).or_insert(0) += docs.len() as u64;
                    }
                    let mism = docs
                        .iter()
                        .filter(|d| d.lang.as_deref().is_some_and(|l| l != lang))
                        .count();
                    c.lang_mismatches.fetch_add(mism as u64, RELAXED);
                    am.items_in.inc();
                    am.items_out.inc_by(docs.len() as u64);
                    am.bytes_out
                        .inc_by(docs.iter().map(|d| d.text.len() as u64).sum());
                    am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
                    lexflow_metrics::latency(&format!("reader.{lang}")).record(t.elapsed());
                    let m = lexflow_metrics::global();
                    m.reader_files.with_label_values(&[&lang]).inc();
                    m.reader_documents
                        .with_label_values(&[&lang])
                        .inc_by(docs.len() as u64);
                    // Dedup keys here, in the parallel workers; the decision is the dedup actor's (lane order).
                    let signatures = match &dd {
                        Some(d) => docs
                            .iter()
                            .map(|doc| (!doc.text.is_empty()).then(|| d.hasher.signature(doc)))
                            .collect(),
                        None => Vec::new(),
                    };
                    Ok(DocBatch {
                        lane: li as u16,
                        file,
                        docs,
                        signatures,
                    })
                }
            },
        );
        let drx = match &dedup {
            Some(d) => {
                let (xtx, xrx) =
                    edge::<DocBatch>(&format!("dedup.{lang}->tokenizer.{lang}"), cap("reader"));
                let d = d.clone();
                let log = dedup_log.clone();
                let lang = lang.clone();
                let paths = lane.files.clone();
                topo.spawn(format!("dedup.{lang}"), move |ctx| {
                    run_dedup(ctx, &d, li, &lang, &paths, log.as_deref(), drx, xtx)
                });
                xrx
            }
            None => drx,
        };
        let c = counters.clone();
        let tk = tokenizer.clone();
        let lang3 = lang.clone();
        let add_bos = cfg.tokenizer.add_bos;
        ordered_pool(
            &mut topo,
            &format!("tokenizer.{lang}"),
            cfg.tokenizer.threads,
            cap("tokenizer"),
            drx,
            ttx,
            move |_| {
                let tk = tk.clone();
                let c = c.clone();
                let am = lexflow_metrics::actor(&format!("tokenizer.{lang3}"));
                let lat = lexflow_metrics::latency(&format!("tokenizer.{lang3}"));
                move |ctx: &lexflow_dataflow::ActorContext, batch: DocBatch| {
                    ctx.set_input(format!("file #{} of lane {}", batch.file, batch.lane));
                    let t = Instant::now();
                    let bytes: u64 = batch.docs.iter().map(|d| d.text.len() as u64).sum();
                    let mut out = tk.tokenize_batch(batch);
                    if add_bos {
                        for d in &mut out.docs {
                            let added = prepend_bos(&tk, &mut d.tokens);
                            if d.loss_from > 0 {
                                d.loss_from += added;
                            }
                        }
                    }
                    let toks: u64 = out.docs.iter().map(|d| d.tokens.len() as u64).sum();
                    c.tokens.fetch_add(toks, RELAXED);
                    c.tokenizer_busy_nanos
                        .fetch_add(t.elapsed().as_nanos() as u64, RELAXED);
                    c.text_bytes.fetch_add(bytes, RELAXED);
                    am.items_in.inc();
                    am.bytes_in.inc_by(bytes);
                    am.items_out.inc_by(out.docs.len() as u64);
                    am.bytes_out.inc_by(toks * 4);
                    am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
                    lat.record(t.elapsed());
                    Ok(out)
                }
            },
        );
        lane_rx.push(trx);
    }

    // Sampler → packer → shard writer → ranks.
    let sampler_report = Arc::new(Mutex::new(SamplerReport::default()));
    let packer_report = Arc::new(Mutex::new(PackerReport::default()));
    let shard_report = Arc::new(Mutex::new(ShardReport::default()));
    let (stx, srx) = edge::<Vec<crate::types::SampledDoc>>("sampler->packer", cap("sampler"));
    let (ptx, prx) = edge::<PackedSequence>("packer->shard_writer", cap("packer"));
    {
        let mix = mix.clone();
        let policy = cfg.sampler.on_exhausted;
        let rep = sampler_report.clone();
        let start = SamplerStart {
            lanes: start_lanes.clone(),
            state: data.as_ref().map(|d| d.sampler.clone()),
            lane_files: lanes.iter().map(|l| l.files.len() as u64).collect(),
            max_doc_tokens: cfg.packer.max_doc_tokens.map(|n| n.get()),
        };
        topo.spawn("sampler", move |ctx| {
            run_sampler(ctx, &mix, policy, start, lane_rx, stx, &rep)
        });
    }
    {
        let mut packer = Packer::new(&cfg.packer, eot, pad);
        let start_sampler = match &data {
            Some(d) => {
                // Rebuild the carry-over: re-read and re-tokenize only the partly packed documents.
                let t = Instant::now();
                packer.restore(&d.packer, d.next_index, |id| {
                    fetch_doc_tokens(
                        &lanes,
                        &manifests,
                        &read_opts,
                        &tokenizer,
                        cfg.tokenizer.add_bos,
                        id,
                    )
                })?;
                tracing::info!(
                    seconds = t.elapsed().as_secs_f64(),
                    open = d.packer.open.len(),
                    "packer carry-over restored"
                );
                d.sampler.clone()
            }
            None => SamplerState {
                emitted_tokens: vec![0; lanes.len()],
                documents: vec![0; lanes.len()],
                active: vec![true; lanes.len()],
            },
        };
        let rep = packer_report.clone();
        let sl = start_lanes.clone();
        topo.spawn("packer", move |ctx| {
            run_packer(ctx, packer, srx, ptx, &rep, sl, start_sampler)
        });
    }
    let mut rank_rx = Vec::new();
    let mut rank_tx = Vec::new();
    for r in 0..world {
        let (tx, rx) = edge::<PackedSequence>(&format!("shard_writer->rank{r}"), cap("rank"));
        rank_tx.push(tx);
        rank_rx.push(rx);
    }
    let tee_for_trainer;
    {
        // One process per rank: rank 0's process tees the whole stream, the others none.
        let tee = match cfg
            .shards
            .arrow_dir
            .as_ref()
            .filter(|_| process.is_none_or(|(r, _)| r == 0))
        {
            Some(dir) => Some(crate::stages::arrow_tee::ArrowTee::create_part(
                dir,
                cfg.shards.count.get(),
                crate::stages::arrow_tee::TeeMeta {
                    run: cfg.run.name.clone(),
                    seq_len: cfg.packer.seq_len.get(),
                    tokenizer: cfg.tokenizer.path.clone(),
                },
                skip,
            )?),
            None => None,
        }
        .map(|t| Arc::new(crate::stages::arrow_tee::SharedTee::new(t, skip)));
        tee_for_trainer = tee.clone();
        let w = ShardWriter {
            shards: cfg.shards.count.get(),
            skip,
            limit: replay.map(|r| r.limit).or(cfg.run.max_sequences),
            tee,
            process,
        };
        let rep = shard_report.clone();
        topo.spawn("shard_writer", move |ctx| {
            run_shard_writer(ctx, w, prx, rank_tx, &rep)
        });
    }
    let train_handle = match cfg.train.as_ref().filter(|_| replay.is_none()) {
        Some(t) => Some(crate::train::spawn_trainers(
            &mut topo,
            crate::train::TrainerSetup {
                cfg: t.clone(),
                run_dir: run_dir.clone(),
                vocab_size: tokenizer.vocab_size(),
                seq_len: cfg.packer.seq_len.get(),
                seed: cfg.run.seed,
                resume: opts.resume,
                run_config: Some(toml::to_string(cfg)?),
                inputs: Some(inputs.to_json()),
                hf_files: Arc::new(crate::stages::tokenizer::hf_model_files(
                    &tokenizer,
                    (cfg.input.qa_template == crate::stages::qa_format::QaTemplate::Llama3)
                        .then_some(crate::stages::tokenizer::LLAMA3_CHAT_TEMPLATE),
                    Some(&cfg.packer.pad_token),
                )?),
                dedup: dedup.clone(),
                tee: tee_for_trainer,
                eval: (heldout.is_some() || qa_probe.is_some()).then(|| crate::train::EvalSetup {
                    set: heldout.clone(),
                    qa: qa_probe.clone(),
                    every: cfg.eval.every,
                    micro_batch: cfg
                        .eval
                        .micro_batch
                        .map_or(t.micro_batch.get(), |m| m.get()),
                }),
            },
            rank_rx,
        )?),
        None => {
            for (r, rx) in rank_rx.into_iter().enumerate() {
                let c = counters.clone();
                let collect = replay.map(|r| r.collected.clone());
                topo.spawn(format!("sink.rank{r}"), move |_ctx| {
                    for s in rx.iter() {
                        c.sink_sequences.fetch_add(1, RELAXED);
                        c.sink_tokens.fetch_add(s.tokens.len() as u64, RELAXED);
                        if let Some(v) = &collect {
                            if let Ok(mut g) = v.lock() {
                                g.push(s);
                            }
                        }
                    }
                    Ok(())
                });
            }
            None
        }
    };

    // The global ranks this process trains: all of them in one process, its own with one process per rank.
    let local_ranks: Vec<usize> = match train_handle {
        Some(_) => match process {
            Some((r, _)) => vec![r],
            None => (0..world).collect(),
        },
        None => Vec::new(),
    };
    // `lexflow_eval_step` and `lexflow_eval_seconds` have no labels, so they would be exported (0, empty) by every
    // process from its start: only a process that records evaluations (it trains rank 0 with `[eval]`) exports them.
    export_eval_gauges(
        train_handle.is_some() && rank0 && (heldout.is_some() || qa_probe.is_some()),
    );

    // Progress: a bar on a terminal, a log line every few seconds otherwise.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = {
        let done = done.clone();
        let counters = counters.clone();
        let pr = packer_report.clone();
        let show_bar = opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let steps = cfg.train.as_ref().map(|t| t.steps);
        let ranks = local_ranks.clone();
        std::thread::spawn(move || progress_loop(&done, &counters, &pr, show_bar, steps, &ranks))
    };

    let result = topo.join();
    done.store(true, RELAXED);
    let _ = progress.join();

    input.files_read = counters.files_read.load(RELAXED);
    input.documents = counters.documents.load(RELAXED);
    input.quarantined_files = counters.quarantined.load(RELAXED);
    input.lang_mismatches = counters.lang_mismatches.load(RELAXED);
    input.text_bytes = counters.text_bytes.load(RELAXED);
    input.tokens = counters.tokens.load(RELAXED);
    input.quarantine_report =
        (input.quarantined_files > 0).then(|| quarantine_path.display().to_string());
    let sampler = sampler_report.lock().map(|g| g.clone()).unwrap_or_default();
    // Documents read per language (the lanes' readers, like `input.documents`); what the sampler passed on to
    // training is `sampler.languages[].documents`.
    input.documents_per_lang = lanes.iter().map(|l| (l.lang.clone(), 0)).collect();
    if let Ok(g) = counters.documents_per_lang.lock() {
        for (lang, n) in g.iter() {
            *input.documents_per_lang.entry(lang.clone()).or_insert(0) += n;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let tokenizer_busy = counters.tokenizer_busy_nanos.load(RELAXED) as f64 * 1e-9;
    let stats = RunStats {
        run: cfg.run.name.clone(),
        config: opts.origin.clone(),
        seed: cfg.run.seed,
        elapsed_seconds: elapsed,
        preprocess_tokens_per_second: input.tokens as f64 / elapsed.max(1e-9),
        tokenizer_tokens_per_busy_second: match tokenizer_busy > 0.0 {
            true => input.tokens as f64 / tokenizer_busy,
            false => 0.0,
        },
        paced_by_training: train_handle.is_some(),
        input,
        sampler,
        packer: packer_report.lock().map(|g| g.clone()).unwrap_or_default(),
        shards: shard_report.lock().map(|g| g.clone()).unwrap_or_default(),
        train: train_handle.as_ref().map(|h| {
            train_json(
                h.report(),
                &run_dir,
                resume.as_ref().map(|r| r.step),
                &local_ranks,
                process.map_or(world, |(_, w)| w),
            )
        }),
        eval_set: heldout
            .as_deref()
            .and_then(|s| serde_json::to_value(s).ok()),
        dedup: dedup
            .as_ref()
            .map(|d| d.report(&lanes.iter().map(|l| l.lang.clone()).collect::<Vec<_>>())),
        outcome: match (&result, shutdown.reason()) {
            (Err(_), _) => "failed".into(),
            (Ok(()), Some(_)) => "interrupted".into(),
            (Ok(()), None) => "completed".into(),
        },
    };
    if let Some(r) = replay.filter(|r| r.describe) {
        let seqs = r.collected.lock().map(|g| g.clone()).unwrap_or_default();
        let mut out = Vec::new();
        let mut cache: std::collections::HashMap<DocId, (crate::types::Document, Vec<u32>)> =
            Default::default();
        for s in &seqs {
            for p in &s.pieces {
                if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(p.doc) {
                    let d = fetch_doc(&lanes, &manifests, &read_opts, p.doc)?;
                    let t = fetch_doc_tokens(
                        &lanes,
                        &manifests,
                        &read_opts,
                        &tokenizer,
                        cfg.tokenizer.add_bos,
                        p.doc,
                    )?;
                    e.insert((d, t));
                }
                let (d, toks) = &cache[&p.doc];
                let lane = &lanes[p.doc.lane as usize];
                out.push(PieceInfo {
                    index: s.index,
                    offset: p.offset,
                    lang: lane.lang.clone(),
                    path: lane.files[p.doc.file as usize % lane.files.len()]
                        .display()
                        .to_string(),
                    ordinal: p.doc.ordinal,
                    celex: d.celex.clone(),
                    doc_type: d.doc_type.as_str().to_string(),
                    title: d.title.clone(),
                    article: article_at(&tokenizer, d, toks, p.start as usize),
                    token_start: p.start,
                    token_end: p.end,
                });
            }
        }
        if let Ok(mut g) = r.described.lock() {
            *g = out;
        }
    }
    // Atomically (a temporary file renamed into place): a failed write (a full disk) leaves the previous stats.json
    // whole, never a truncated one. When the run failed too, its error comes first: it is the cause.
    let stats_path = per_process("stats", ".json");
    let written = serde_json::to_string_pretty(&stats)
        .map_err(anyhow::Error::from)
        .and_then(|text| write_file_atomically(&stats_path, text.as_bytes()))
        .with_context(|| format!("writing {}", stats_path.display()));
    if let (Err(w), Err(_)) = (&written, &result) {
        tracing::error!("the run failed, and its statistics could not be saved either: {w:#}");
    }
    if let Some(n) = stats.input_ended_before_target() {
        tracing::warn!("{n}");
    }
    if cfg.metrics.enabled && cfg.metrics.linger_seconds > 0 && signals::received().is_none() {
        tracing::info!(
            seconds = cfg.metrics.linger_seconds,
            "keeping /metrics up after the run (a signal ends the wait)"
        );
        let until = Instant::now() + Duration::from_secs(cfg.metrics.linger_seconds);
        while Instant::now() < until && signals::received().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    match (result, written) {
        (Err(e), Ok(())) => anyhow::bail!("{e}"),
        (Err(e), Err(w)) => anyhow::bail!(
            "{e}\n(outcome `failed`; the statistics of the run could not be saved either: {w:#})"
        ),
        (Ok(()), Err(w)) => return Err(w),
        (Ok(()), Ok(())) => {}
    }
    if replay.is_none() && stats.outcome == "completed" && stats.input.documents == 0 {
        let i = &stats.input;
        anyhow::bail!(
            "no document was read: {} input files, {} quarantined{}, {} outside the mix {:?} (sampler.mix has {}), {} \
             held out: check input.paths and sampler.mix",
            i.files,
            i.quarantined_files,
            i.quarantine_report
                .as_deref()
                .map(|p| format!(" (why: {p})"))
                .unwrap_or_default(),
            i.files_outside_mix,
            i.outside_mix,
            cfg.sampler.mix.keys().cloned().collect::<Vec<_>>().join(", "),
            i.files_held_out,
        );
    }
    Ok(stats)
}

/// Config keys that decide the data stream: a resume continues the checkpoint's stream, so they must not change.
/// (Thread counts, edge capacities, `[train]`, `[metrics]`, `[eval]` besides the held-out split do not change it.)
const STREAM_KEYS: [&str; 9] = [
    "run.seed",
    "input",
    "tokenizer.path",
    "tokenizer.add_bos",
    "sampler",
    "packer",
    "dedup",
    "eval.holdout",
    // Held-out documents of their own: with dedup.against_heldout, training copies of them are dropped.
    "eval.paths",
];

/// Refuses a resume or replay whose input files differ from those its checkpoint's stream read (`inputs.json`): its
/// lane positions would point at other documents. Held-out files that differ only change the evaluation set (a
/// warning), unless `dedup.against_heldout` drops their copies from the stream.
fn check_same_inputs(
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
fn check_same_stream(cfg: &Config, checkpoint: &Path) -> anyhow::Result<()> {
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
fn diff_values(key: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
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

/// One lane per language of the mix, each with its files (in the given, sorted order); and the files outside the
/// mix, with their language (None: none could be told from the name or the first 64 KiB).
fn lanes_of(cfg: &Config, files: Vec<PathBuf>) -> (Vec<Lane>, Vec<(PathBuf, Option<String>)>) {
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

/// `lexflow dedup`: what `[dedup]` drops from a config's training input, decided exactly as `lexflow run` decides
/// (same lanes, held-out documents, keys and order), without tokenizing or training. `out`: one JSON line per
/// document (`texts`: with its text, after a first line holding the MinHash parameters).
pub fn audit_dedup(
    cfg: &Config,
    out: Option<&Path>,
    texts: bool,
) -> anyhow::Result<crate::stages::dedup::DedupReport> {
    use std::io::Write;
    let files = input_files(cfg, &cfg.run.dir.join("corpus"))?;
    let manifests = reader::ManifestIndex::build(&files);
    let (files, held_files) = crate::tasks::heldout::split_files(
        files,
        cfg.eval.holdout,
        &manifests,
        crate::tasks::heldout::HoldoutSplit::Package,
    );
    let (lanes, _) = lanes_of(cfg, files);
    let read_opts = reader::ReadOptions {
        qa: cfg.input.prompt_format(),
        mixed_languages: false,
    };
    let idx = build_dedup_index(
        cfg,
        &lanes,
        &held_files,
        &eval_paths_files(cfg)?,
        &read_opts,
        None,
    )?;
    let mut w = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    if let (Some(w), true) = (&mut w, texts) {
        let h = &idx.hasher;
        let line = serde_json::json!({"minhash": {
            "ngram": h.ngram, "bands": h.bands, "rows": h.rows, "a": h.a, "b": h.b,
            "threshold": cfg.dedup.threshold,
            "mode": cfg.dedup.mode, "held_out_documents": idx.held_out_documents(),
        }});
        writeln!(w, "{line}")?;
    }
    let mut unreadable = 0u64;
    for (li, lane) in lanes.iter().enumerate() {
        for (k, path) in lane.files.iter().enumerate() {
            let docs = match reader::read_file_with(path, &manifests, &read_opts) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("skipped (`lexflow run` quarantines it): {e}");
                    unreadable += 1;
                    continue;
                }
            };
            for (i, doc) in docs.iter().enumerate() {
                if doc.text.is_empty() {
                    continue;
                }
                let sig = idx.hasher.signature(doc);
                let (_, rec) =
                    idx.judge(li, &lane.lang, k as u32, i as u32, doc, &sig, &lane.files);
                if let Some(w) = &mut w {
                    let mut line = serde_json::to_value(&rec)?;
                    if texts {
                        line["text"] = serde_json::Value::String(doc.text.clone());
                        line["qa"] = serde_json::Value::Bool(doc.answer_start.is_some());
                        if cfg.dedup.mode == crate::stages::dedup::DedupMode::Near
                            && doc.answer_start.is_none()
                        {
                            line["minhash"] = serde_json::json!(idx.hasher.minhash(&doc.text));
                        }
                    }
                    writeln!(w, "{line}")?;
                }
            }
        }
    }
    if let Some(mut w) = w {
        w.flush()?;
    }
    if unreadable > 0 {
        tracing::warn!(
            files = unreadable,
            "unreadable input files skipped (`lexflow run` quarantines them)"
        );
    }
    Ok(idx.report(&lanes.iter().map(|l| l.lang.clone()).collect::<Vec<_>>()))
}

/// The lanes' dedup index: held-out documents first (`dedup.against_heldout`), then a checkpoint's entries.
fn build_dedup_index(
    cfg: &Config,
    lanes: &[Lane],
    held_files: &[PathBuf],
    eval_files: &[PathBuf],
    read_opts: &reader::ReadOptions,
    checkpoint: Option<&Path>,
) -> anyhow::Result<crate::stages::dedup::DedupIndex> {
    let mut idx = crate::stages::dedup::DedupIndex::new(
        &cfg.dedup,
        lanes.iter().map(|l| l.files.len() as u32).collect(),
    );
    if cfg.dedup.against_heldout {
        // Held-out FORMEX files (Q&A pairs are not documents the corpus could repeat).
        let files: Vec<PathBuf> = held_files
            .iter()
            .chain(eval_files)
            .filter(|f| !f.to_string_lossy().ends_with(".jsonl"))
            .cloned()
            .collect();
        let manifests = reader::ManifestIndex::build(&files);
        let opts = reader::ReadOptions {
            qa: read_opts.qa.clone(),
            mixed_languages: true,
        };
        for f in &files {
            // Unreadable held-out files are reported by the held-out set's own build (quarantine).
            let Ok(docs) = reader::read_file_with(f, &manifests, &opts) else {
                continue;
            };
            for d in &docs {
                let lang = d.lang.clone().or_else(|| reader::sniff_lang(f));
                if let Some(li) = lang.and_then(|l| lanes.iter().position(|x| x.lang == l)) {
                    idx.add_held_out(li, d);
                }
            }
        }
    }
    if let Some(dir) = checkpoint {
        let p = dir.join(crate::stages::dedup::STATE_FILE);
        if p.exists() {
            idx.restore(&p)?;
        } else {
            tracing::warn!(
                checkpoint = %dir.display(),
                "the checkpoint has no dedup state (its run had no [dedup]): documents before it are not in the index"
            );
        }
    }
    Ok(idx)
}

/// The dedup actor of one lane: decides in lane order, empties the text of duplicates (the tokenizer skips empty
/// documents; ordinals stay), logs each drop to `dedup.jsonl`.
#[allow(clippy::too_many_arguments)]
fn run_dedup(
    ctx: &lexflow_dataflow::ActorContext,
    idx: &crate::stages::dedup::DedupIndex,
    lane: usize,
    lang: &str,
    paths: &[PathBuf],
    log: Option<&Mutex<std::fs::File>>,
    rx: EdgeReceiver<DocBatch>,
    tx: lexflow_dataflow::EdgeSender<DocBatch>,
) -> Result<(), lexflow_dataflow::ActorError> {
    use std::io::Write;
    let am = lexflow_metrics::actor(&format!("dedup.{lang}"));
    let lat = lexflow_metrics::latency(&format!("dedup.{lang}"));
    let m = lexflow_metrics::global();
    for label in ["kept", "exact", "near", "heldout"] {
        m.dedup_documents.with_label_values(&[lang, label]);
    }
    m.dedup_dropped_bytes.with_label_values(&[lang]);
    while let Ok(mut b) = rx.recv() {
        ctx.set_input(format!("file #{} of lane {lang}", b.file));
        let t = Instant::now();
        let mut lines = String::new();
        for (i, sig) in b.signatures.iter().enumerate() {
            let Some(sig) = sig else { continue };
            let (v, rec) = idx.judge(lane, lang, b.file, i as u32, &b.docs[i], sig, paths);
            m.dedup_documents
                .with_label_values(&[lang, v.label()])
                .inc();
            if v == crate::stages::dedup::Verdict::Keep {
                continue;
            }
            m.dedup_dropped_bytes
                .with_label_values(&[lang])
                .inc_by(rec.bytes);
            lines.push_str(&serde_json::to_string(&rec).expect("drop record is JSON"));
            lines.push('\n');
            b.docs[i].text.clear();
        }
        if let (Some(f), false) = (log, lines.is_empty()) {
            let mut f = f.lock().expect("dedup log lock");
            if let Err(e) = f.write_all(lines.as_bytes()) {
                tracing::warn!("cannot append to {}: {e}", crate::stages::dedup::LOG_FILE);
            }
        }
        b.signatures = Vec::new();
        am.items_in.inc();
        am.items_out.inc();
        am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
        lat.record(t.elapsed());
        if tx.send(b).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The article in which token `start` of a document falls: the last article whose title occurs in the text before the
/// piece's character offset (titles are searched in order, so the positions are increasing).
fn article_at(
    tk: &Tokenizer,
    d: &crate::types::Document,
    tokens: &[u32],
    start: usize,
) -> Option<String> {
    if d.articles.is_empty() {
        return None;
    }
    let offset = tk.decode(&tokens[..start.min(tokens.len())]).len();
    let mut from = 0usize;
    let mut found = None;
    let t = d.text.as_str();
    // A heading is a line of its own (`TI.ART` is a block): "Article 1" quoted in a recital is not one.
    let heading = |from: usize, title: &str| {
        t[from..]
            .match_indices(title)
            .map(|(p, _)| p + from)
            .find(|&p| {
                let end = p + title.len();
                (p == 0 || t.as_bytes()[p - 1] == b'\n')
                    && (end == t.len() || t.as_bytes()[end] == b'\n')
            })
    };
    for a in &d.articles {
        let in_text = if a.title_in_text.is_empty() {
            &a.title
        } else {
            &a.title_in_text
        };
        let Some(pos) = heading(from, in_text) else {
            continue;
        };
        if pos > offset {
            break;
        }
        found = Some(format!("{} ({})", a.title, a.id));
        from = pos + in_text.len();
    }
    found
}

/// The input files of a config: `input.paths` expanded, or the sample corpus generated into `corpus_dir`.
fn input_files(cfg: &Config, corpus_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
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

/// Packs the held-out set: the `held` input files (their manifests in `manifests`), then `extra` (the `eval.paths`
/// files).
#[allow(clippy::too_many_arguments)]
fn heldout_set(
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

/// The files `eval.paths` names (none when it is empty).
fn eval_paths_files(cfg: &Config) -> anyhow::Result<Vec<PathBuf>> {
    if cfg.eval.paths.is_empty() {
        return Ok(Vec::new());
    }
    reader::expand_inputs(&cfg.eval.paths).context("eval.paths")
}

/// The tokens of one document, read again from its file (resume, replay, provenance).
fn fetch_doc_tokens(
    lanes: &[Lane],
    manifests: &reader::ManifestIndex,
    opts: &reader::ReadOptions,
    tk: &Tokenizer,
    add_bos: bool,
    id: DocId,
) -> anyhow::Result<Vec<u32>> {
    let doc = fetch_doc(lanes, manifests, opts, id)?;
    let (mut t, _) = tk.encode_document(&doc);
    if add_bos {
        prepend_bos(tk, &mut t);
    }
    Ok(t)
}

fn fetch_doc(
    lanes: &[Lane],
    manifests: &reader::ManifestIndex,
    opts: &reader::ReadOptions,
    id: DocId,
) -> anyhow::Result<crate::types::Document> {
    let lane = lanes
        .get(id.lane as usize)
        .with_context(|| format!("document {id:?}: no lane {}", id.lane))?;
    anyhow::ensure!(
        !lane.files.is_empty(),
        "document {id:?}: lane {} has no files",
        lane.lang
    );
    let path = &lane.files[id.file as usize % lane.files.len()];
    let docs = reader::read_file_with(path, manifests, opts)
        .with_context(|| format!("re-reading {} for document {id:?}", path.display()))?;
    docs.into_iter().nth(id.ordinal as usize).with_context(|| {
        format!(
            "{} has no document #{} any more: the input changed since the checkpoint",
            path.display(),
            id.ordinal
        )
    })
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

#[derive(Default)]
struct Counters {
    files_read: std::sync::atomic::AtomicU64,
    documents: std::sync::atomic::AtomicU64,
    /// `documents` per lane language.
    documents_per_lang: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Time the tokenizer threads spent tokenizing (all threads and lanes together).
    tokenizer_busy_nanos: std::sync::atomic::AtomicU64,
    quarantined: std::sync::atomic::AtomicU64,
    lang_mismatches: std::sync::atomic::AtomicU64,
    text_bytes: std::sync::atomic::AtomicU64,
    tokens: std::sync::atomic::AtomicU64,
    sink_sequences: std::sync::atomic::AtomicU64,
    sink_tokens: std::sync::atomic::AtomicU64,
}

/// Registers (`on`) or unregisters the label-less evaluation metrics of the process registry (idempotent).
fn export_eval_gauges(on: bool) {
    let m = lexflow_metrics::global();
    let step = Box::new(m.eval_step.clone());
    let seconds = Box::new(m.eval_seconds.clone());
    if on {
        // Already registered (the registry's start, or an earlier run of this process): nothing to do.
        let _ = m.registry.register(step);
        let _ = m.registry.register(seconds);
    } else {
        let _ = m.registry.unregister(step);
        let _ = m.registry.unregister(seconds);
    }
}

/// The trainer's step, loss and tokens/s of each of `ranks` whose series exist, read from a gather of the registry:
/// a `with_label_values` read would create (and export) a zero series for a rank that has not stepped yet, or that
/// another process runs.
fn trainer_progress(ranks: &[usize]) -> Vec<(usize, u64, f64, f64)> {
    use lexflow_metrics::names::{
        LABEL_RANK, TRAINER_LOSS, TRAINER_STEPS_TOTAL, TRAINER_TOKENS_PER_SECOND,
    };
    if ranks.is_empty() {
        return Vec::new();
    }
    let families = lexflow_metrics::global().registry.gather();
    let value = |name: &str, rank: &str| -> Option<f64> {
        let f = families.iter().find(|f| f.get_name() == name)?;
        let m = f.get_metric().iter().find(|m| {
            m.get_label()
                .iter()
                .any(|l| l.get_name() == LABEL_RANK && l.get_value() == rank)
        })?;
        // Counters end in `_total` (docs/OBSERVABILITY.md).
        Some(match name.ends_with("_total") {
            true => m.get_counter().get_value(),
            false => m.get_gauge().get_value(),
        })
    };
    ranks
        .iter()
        .filter_map(|&r| {
            let label = r.to_string();
            let step = value(TRAINER_STEPS_TOTAL, &label)?;
            Some((
                r,
                step as u64,
                value(TRAINER_LOSS, &label)?,
                value(TRAINER_TOKENS_PER_SECOND, &label)?,
            ))
        })
        .collect()
}

/// The progress line: input counters, and the training of this process's `ranks` once they stepped.
fn progress_message(
    c: &Counters,
    seqs: u64,
    ranks: &[usize],
    trained: &[(usize, u64, f64, f64)],
) -> (Option<u64>, String) {
    let mut msg = format!(
        "files {} docs {} tokens {} seqs {}",
        c.files_read.load(RELAXED),
        c.documents.load(RELAXED),
        c.tokens.load(RELAXED),
        seqs
    );
    // The loss is global (all-reduced), the same on every rank; tokens/s is summed over this process's ranks.
    let step = trained.iter().map(|t| t.1).min();
    if let (Some(step), false) = (step, trained.len() < ranks.len()) {
        let loss = trained[0].2;
        let tps: f64 = trained.iter().map(|t| t.3).sum();
        let which = match ranks {
            [r] => format!("rank {r}"),
            _ => format!(
                "ranks {}-{} of this process",
                ranks[0],
                ranks[ranks.len() - 1]
            ),
        };
        msg += &format!(" | step {step} loss {loss:.3} {tps:.0} tok/s ({which})");
    }
    (step.filter(|_| trained.len() == ranks.len()), msg)
}

fn progress_loop(
    done: &std::sync::atomic::AtomicBool,
    c: &Counters,
    packer: &Mutex<PackerReport>,
    bar: bool,
    steps: Option<u64>,
    ranks: &[usize],
) {
    let pb = bar.then(|| {
        let pb = match steps {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let mut last_log = Instant::now();
    while !done.load(RELAXED) {
        std::thread::sleep(Duration::from_millis(200));
        // The bar refreshes every 200 ms, the log line every 5 s: gather the registry only when shown.
        if pb.is_none() && last_log.elapsed() <= Duration::from_secs(5) {
            continue;
        }
        let seqs = packer.lock().map(|p| p.sequences).unwrap_or(0);
        let (step, msg) = progress_message(c, seqs, ranks, &trainer_progress(ranks));
        if let Some(pb) = &pb {
            pb.set_position(step.unwrap_or(0));
            pb.set_message(msg);
        } else {
            match step {
                Some(step) => tracing::info!(step, "{msg}"),
                None => tracing::info!("{msg}"),
            }
            last_log = Instant::now();
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
}

/// Writes `path` through a temporary sibling (`.<name>.tmp-<pid>`), synced and renamed into place; the temporary file
/// is removed when anything fails.
fn write_file_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .with_context(|| format!("{}: no file name", path.display()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

/// `stats.json` → `train`: the trainer's report (`report`: None when a rank failed) with what this process adds: the
/// checkpoints on disk (after a resume, the earlier sessions' too), the global ranks this process trains (whose
/// tokens/s `tokens_per_second` sums) and the world size. A failed run still says how far it got: the steps done and
/// their losses from `steps.jsonl`, the checkpoints on disk, `complete: false`.
fn train_json(
    report: Option<crate::train::TrainReport>,
    run_dir: &Path,
    resumed_from: Option<u64>,
    ranks: &[usize],
    world: usize,
) -> serde_json::Value {
    let checkpoints: Vec<String> = crate::common::run_dir::list_checkpoints(run_dir)
        .into_iter()
        .map(|(_, d)| d.display().to_string())
        .collect();
    let mut v = match report.and_then(|r| serde_json::to_value(r).ok()) {
        Some(v) => v,
        None => {
            // Steps this session finished (every rank records each step; the loss is global).
            let mut losses = std::collections::BTreeMap::new();
            for ((step, _), r) in crate::train::read_step_records(run_dir) {
                if step > resumed_from.unwrap_or(0) {
                    losses.entry(step).or_insert(r.loss);
                }
            }
            let steps = losses
                .keys()
                .next_back()
                .copied()
                .or(resumed_from)
                .unwrap_or(0);
            serde_json::json!({
                "complete": false,
                "steps": steps,
                "losses": losses.values().collect::<Vec<_>>(),
                "resumed_from_step": resumed_from,
            })
        }
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("checkpoints".into(), serde_json::json!(checkpoints));
        o.insert("process_ranks".into(), serde_json::json!(ranks));
        o.insert("world_size".into(), serde_json::json!(world));
    }
    v
}

/// Signals of a run (SIGINT, SIGTERM, SIGHUP). The first one goes to the run's own handler
/// ([`Shutdown::install_signal_handler`]), which drains the pipeline and stops cleanly; this module only notes which
/// signal it was, so that the exit code is 128 + its number, as a shell reports a process that signal killed (130 for
/// Ctrl-C, 143 for `kill`/SIGTERM, 129 for SIGHUP). A second signal exits at once, with 128 + its own number.
mod signals {
    use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    /// The first signal received during the current run (0: none).
    static RECEIVED: AtomicI32 = AtomicI32::new(0);
    /// Write end of the self-pipe through which the handler reports a second signal.
    static PIPE_W: AtomicI32 = AtomicI32::new(-1);
    /// The handlers installed before ours (the run's clean-stop handler), per entry of `SIGNALS`.
    static PREVIOUS: [AtomicUsize; 3] = [
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ];

    pub fn name(sig: i32) -> &'static str {
        match sig {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            libc::SIGHUP => "SIGHUP",
            _ => "signal",
        }
    }

    /// 128 + `sig` (130, SIGINT's, when unknown).
    pub fn exit_code(sig: Option<i32>) -> u8 {
        sig.and_then(|s| u8::try_from(128 + s).ok()).unwrap_or(130)
    }

    /// The first signal of the current run.
    pub fn received() -> Option<i32> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Starts a run's signal bookkeeping; the handlers go in (once per process) on top of the ones installed before.
    pub fn install() -> Result<(), String> {
        RECEIVED.store(0, Ordering::SeqCst);
        static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
        INSTALLED.get_or_init(install_handlers).clone()
    }

    extern "C" fn on_signal(sig: libc::c_int) {
        // Async-signal-safe only: atomics, write(2), and the previous handler (itself a signal handler).
        let first = RECEIVED
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if first {
            let i = SIGNALS.iter().position(|&s| s == sig).unwrap_or(0);
            let prev = PREVIOUS[i].load(Ordering::SeqCst);
            if prev != libc::SIG_DFL && prev != libc::SIG_IGN {
                // SAFETY: `prev` is the one-argument handler sigaction returned for this signal.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
                f(sig);
                return;
            }
        }
        // A second signal (or no clean-stop handler): the dispatcher thread exits. High bit: a second signal.
        let fd = PIPE_W.load(Ordering::Relaxed);
        if fd >= 0 {
            let b = (sig as u8 & 0x7f) | if first { 0 } else { 0x80 };
            // SAFETY: writes one byte from a valid stack buffer to the pipe this module owns.
            unsafe {
                libc::write(fd, (&b as *const u8).cast(), 1);
            }
        }
    }

    fn install_handlers() -> Result<(), String> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
        }
        let (r, w) = (fds[0], fds[1]);
        // The handler must never block: its end is non-blocking (one byte per signal never fills the pipe anyway).
        // SAFETY: fcntl on a descriptor just created.
        unsafe {
            let fl = libc::fcntl(w, libc::F_GETFL);
            libc::fcntl(w, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        PIPE_W.store(w, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("lexflow-signals".into())
            .spawn(move || loop {
                let mut b = 0u8;
                // SAFETY: reads one byte into a valid stack buffer from the pipe's read end, owned by this thread.
                let n = unsafe { libc::read(r, (&mut b as *mut u8).cast(), 1) };
                match n {
                    1 => forced_exit(i32::from(b & 0x7f), b & 0x80 != 0),
                    n if n < 0
                        && std::io::Error::last_os_error().kind()
                            == std::io::ErrorKind::Interrupted => {}
                    _ => return,
                }
            })
            .map_err(|e| e.to_string())?;
        for (i, sig) in SIGNALS.into_iter().enumerate() {
            // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument; `old` receives
            // the previous disposition.
            let (rc, old) = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                let mut old: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                (libc::sigaction(sig, &sa, &mut old), old)
            };
            if rc != 0 {
                return Err(format!(
                    "sigaction({}): {}",
                    name(sig),
                    std::io::Error::last_os_error()
                ));
            }
            // A three-argument (SA_SIGINFO) handler cannot be called as a one-argument one: treat it as none.
            let prev = match old.sa_flags & libc::SA_SIGINFO {
                0 => old.sa_sigaction,
                _ => libc::SIG_DFL,
            };
            PREVIOUS[i].store(prev, Ordering::SeqCst);
        }
        Ok(())
    }

    fn forced_exit(sig: i32, second: bool) -> ! {
        let code = exit_code(Some(sig));
        match second {
            true => tracing::error!(
                "{} received while the run was stopping: forced exit (code {code}) without draining the pipeline \
                 or writing stats.json; continue from the last checkpoint with --resume",
                name(sig)
            ),
            false => tracing::error!("{} received: exiting (code {code})", name(sig)),
        }
        // _exit: no atexit handlers or static destructors (libtorch's would tear down under the running trainer
        // threads and crash instead of exiting with `code`). The log went to stderr, which is unbuffered.
        // SAFETY: _exit ends the process; nothing is used afterwards.
        unsafe { libc::_exit(i32::from(code)) }
    }
}

/// `host:port` with `port + offset` (metrics of the processes of one node, one per local rank).
fn offset_port(listen: &str, offset: u16) -> anyhow::Result<String> {
    let (host, port) = listen
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h, p)))
        .ok_or_else(|| anyhow::anyhow!("metrics.listen = {listen:?} is not host:port"))?;
    let port = port.checked_add(offset).ok_or_else(|| {
        anyhow::anyhow!("metrics.listen port {port} + LOCAL_RANK {offset} overflows")
    })?;
    Ok(format!("{host}:{port}"))
}
