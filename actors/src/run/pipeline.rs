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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lexflow_dataflow::{edge, ordered_pool, EdgeReceiver, Shutdown, Topology};

use crate::config::{Config, ExhaustedPolicy};
use crate::run::dedup::{build_dedup_index, run_dedup};
use crate::run::heldout::{eval_paths_files, heldout_set};
use crate::run::lanes::{input_files, lanes_of, Lane};
use crate::run::progress::{export_eval_gauges, progress_loop, Counters, RELAXED};
use crate::run::resume::{check_same_inputs, check_same_stream};
use crate::run::signals;
use crate::run::stats::{train_json, write_file_atomically, InputReport, RunStats};
use crate::stages::packer::{run_packer, Packer, PackerReport};
use crate::stages::reader::{self, Quarantine};
use crate::stages::sampler::{run_sampler, SamplerReport, SamplerStart};
use crate::stages::shard_writer::{run_shard_writer, ShardReport, ShardWriter};
use crate::stages::tokenize::prepend_bos;
use crate::stages::tokenizer::Tokenizer;
use crate::types::{DocBatch, DocId, LanePosition, PackedSequence, SamplerState, TokenizedBatch};

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
