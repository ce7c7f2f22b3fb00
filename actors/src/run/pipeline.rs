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
use crate::run::filter::{build_filter, run_filter, FilterSetup};
use crate::run::heldout::{eval_paths_files, heldout_set};
use crate::run::lanes::{input_files, lanes_of, Lane};
use crate::run::progress::{export_eval_gauges, progress_loop, Counters, RELAXED};
use crate::run::resume::{check_same_inputs, check_same_stream};
use crate::run::signals;
use crate::run::stats::{train_json, write_file_atomically, InputReport, RunStats};
use crate::stages::arrow_tee::SharedTee;
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

/// Runs a whole pipeline; returns the statistics (also written to `<run.dir>/stats.json`). Each step is one box
/// of the diagram in ARCHITECTURE.md: prepare (resume point, inputs by lane, tokenizer, start position, dedup
/// index), then per lane source → reader pool → (dedup) → tokenizer pool, then sampler → packer → shard writer →
/// trainer ranks (or counting sinks), run them to the end, and write the statistics.
pub fn run(cfg: &Config, opts: &RunOptions) -> anyhow::Result<RunStats> {
    let t0 = Instant::now();
    let mut p = prepare(cfg, opts)?;

    let shutdown = install_shutdown();
    let mut topo = Topology::new(shutdown.clone());
    let quarantine_path = p.here.per_process("quarantine", ".jsonl");
    let quarantine = Arc::new(Quarantine::create(&quarantine_path)?);
    let counters = Arc::new(Counters::default());
    read_files_outside_mix(&mut p.inputs, &p.tok, &quarantine, &counters);
    let evals = evaluation_inputs(&p, &quarantine)?;

    let lane_rx = spawn_lanes(&mut topo, &p, &quarantine, &counters);
    let reports = Reports::default();
    let (stx, srx) = edge::<Vec<crate::types::SampledDoc>>("sampler->packer", p.cap("sampler"));
    let (ptx, prx) = edge::<PackedSequence>("packer->shard_writer", p.cap("packer"));
    spawn_sampler(&mut topo, &p, lane_rx, stx, &reports);
    spawn_packer(&mut topo, &p, srx, ptx, &reports)?;
    let (rank_rx, tee) = spawn_shard_writer(&mut topo, &p, prx, &reports)?;
    let train_handle = match cfg.train.as_ref().filter(|_| p.replay().is_none()) {
        Some(t) => Some(spawn_ranks(&mut topo, &p, t, tee, &evals, rank_rx)?),
        None => {
            spawn_sinks(&mut topo, &p, &counters, rank_rx);
            None
        }
    };

    // The global ranks this process trains: all of them in one process, its own with one process per rank.
    let local_ranks: Vec<usize> = match train_handle {
        Some(_) => match p.here.process {
            Some((r, _)) => vec![r],
            None => (0..p.world).collect(),
        },
        None => Vec::new(),
    };
    // `lexflow_eval_step` and `lexflow_eval_seconds` have no labels, so they would be exported (0, empty) by every
    // process from its start: only a process that records evaluations (it trains rank 0 with `[eval]`) exports them.
    export_eval_gauges(
        train_handle.is_some()
            && evals.rank0
            && (evals.heldout.is_some() || evals.qa_probe.is_some()),
    );
    let result = join_with_progress(topo, &p, &counters, &reports, &local_ranks);

    let ended = Ended {
        t0,
        quarantine_path: &quarantine_path,
        counters: &counters,
        reports: &reports,
        train_handle: train_handle.as_ref(),
        local_ranks: &local_ranks,
        evals: &evals,
        result: &result,
        shutdown: &shutdown,
    };
    let stats = collect_stats(&mut p, ended);
    if let Some(r) = p.replay().filter(|r| r.describe) {
        describe_pieces(&p, r)?;
    }
    finish(&p, stats, result)
}

/// What a run prepares before it starts any actor.
struct Prepared<'a> {
    cfg: &'a Config,
    opts: &'a RunOptions,
    here: RunDir,
    _metrics_server: Option<lexflow_metrics::MetricsServer>,
    resume: Option<crate::train::ResumeInfo>,
    inputs: Inputs,
    tok: TokenizerSetup,
    /// Ranks (edges out of the shard writer) this process feeds.
    world: usize,
    start: StartPosition,
    dedup: DedupState,
    /// `[filter]`: the lanes' cuts and counts.
    filter: Option<Arc<FilterSetup>>,
}

impl Prepared<'_> {
    fn replay(&self) -> Option<&ReplaySpec> {
        self.opts.replay.as_ref()
    }

    /// The capacity of the edges out of `stage` (`[edges]`).
    fn cap(&self, stage: &str) -> std::num::NonZeroUsize {
        self.cfg.edges.capacity_of(stage)
    }
}

/// Where this process writes, `/metrics`, the checkpoint a resume continues, the input files by lane, the tokenizer,
/// where the stream starts, the dedup index: in this order, each step failing before anything of the next is done.
fn prepare<'a>(cfg: &'a Config, opts: &'a RunOptions) -> anyhow::Result<Prepared<'a>> {
    let replay = opts.replay.as_ref();
    let here = where_this_process_writes(cfg, replay)?;
    let metrics_server = serve_metrics(cfg, here.process)?;
    let resume = find_resume_point(cfg, opts, &here)?;
    let inputs = plan_inputs(cfg, replay, resume.as_ref(), &here)?;
    let tok = load_tokenizer(cfg)?;
    check_same_tokenizer(&tok.tokenizer, replay, resume.as_ref())?;
    let world = if replay.is_some() || here.process.is_some() {
        1
    } else {
        cfg.world_size()
    };
    set_aside_earlier_run(cfg, replay, resume.as_ref(), &here)?;
    let start = start_position(replay, resume.as_ref(), inputs.lanes.len())?;
    let dedup = dedup_state(cfg, replay, resume.as_ref(), &inputs, &tok, &here)?;
    let filter = filter_state(cfg, replay, resume.as_ref(), &inputs, &tok, &here)?;
    Ok(Prepared {
        cfg,
        opts,
        here,
        _metrics_server: metrics_server,
        resume,
        inputs,
        tok,
        world,
        start,
        dedup,
        filter,
    })
}

/// Where this process writes: `run.dir`, and with one process per rank (torchrun-style launch), which rank it is.
/// Such a process trains one rank and keeps its share of the stream; ranks other than 0 write their own
/// stats/quarantine/corpus files and serve metrics on port + LOCAL_RANK.
struct RunDir {
    run_dir: PathBuf,
    process: Option<(usize, usize)>,
}

impl RunDir {
    /// `<run.dir>/<name><ext>`, or `<name>.rankR<ext>` in the process of rank R > 0.
    fn per_process(&self, name: &str, ext: &str) -> PathBuf {
        match self.process {
            Some((r, _)) if r > 0 => self.run_dir.join(format!("{name}.rank{r}{ext}")),
            _ => self.run_dir.join(format!("{name}{ext}")),
        }
    }

    fn rank0(&self) -> bool {
        self.process.is_none_or(|(r, _)| r == 0)
    }
}

fn where_this_process_writes(cfg: &Config, replay: Option<&ReplaySpec>) -> anyhow::Result<RunDir> {
    let run_dir = cfg.run.dir.clone();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating run directory {}", run_dir.display()))?;
    let process = match (&cfg.train, replay) {
        (Some(t), None) => crate::train::process_group(t)?,
        _ => None,
    };
    Ok(RunDir { run_dir, process })
}

/// `/metrics` (`[metrics]`), on port + LOCAL_RANK in the processes of one node.
fn serve_metrics(
    cfg: &Config,
    process: Option<(usize, usize)>,
) -> anyhow::Result<Option<lexflow_metrics::MetricsServer>> {
    lexflow_metrics::set_run_labels(&cfg.run.name);
    if !cfg.metrics.enabled {
        return Ok(None);
    }
    let listen = match (
        process,
        std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse::<u16>().ok()),
    ) {
        (Some(_), Some(local)) if local > 0 => offset_port(&cfg.metrics.listen, local)?,
        _ => cfg.metrics.listen.clone(),
    };
    Ok(Some(lexflow_metrics::serve(&listen)?))
}

/// `--resume`: the newest checkpoint that verifies (its stream keys checked against this config), or None.
fn find_resume_point(
    cfg: &Config,
    opts: &RunOptions,
    here: &RunDir,
) -> anyhow::Result<Option<crate::train::ResumeInfo>> {
    if opts.replay.is_some() || !opts.resume || cfg.train.is_none() {
        return Ok(None);
    }
    match crate::train::resume_point(&here.run_dir)? {
        Some(r) => {
            check_same_stream(cfg, &r.checkpoint)?;
            if here.rank0() {
                crate::train::set_aside_unusable(&r.skipped_dirs);
            }
            tracing::info!(step = r.step, sequences = r.sequences_consumed, checkpoint = %r.checkpoint.display(), "resuming");
            Ok(Some(r))
        }
        None => {
            tracing::warn!(
                "--resume: no checkpoint in {}; starting from the beginning",
                here.run_dir.display()
            );
            Ok(None)
        }
    }
}

/// The run's input files, by lane.
struct Inputs {
    lanes: Vec<Lane>,
    /// Files of no language of the mix, with the language sniffed (None: none could be told).
    outside: Vec<(PathBuf, Option<String>)>,
    held_files: Vec<PathBuf>,
    eval_files: Vec<PathBuf>,
    manifests: Arc<reader::ManifestIndex>,
    mix: Vec<(String, f64)>,
    record: crate::run::inputs::InputsRecord,
    report: InputReport,
}

/// The input files split into lanes and held-out files, checked against what the checkpoint this run continues (or
/// replays) recorded of its inputs; a mix language with nothing to read is an error unless the mix may renormalize.
fn plan_inputs(
    cfg: &Config,
    replay: Option<&ReplaySpec>,
    resume: Option<&crate::train::ResumeInfo>,
    here: &RunDir,
) -> anyhow::Result<Inputs> {
    // What the checkpoint this run continues (or replays) recorded of its inputs: its files are checked below, and its
    // held-out split is kept (a checkpoint written before records existed split by file).
    let from_checkpoint: Option<PathBuf> = match replay {
        Some(r) => r.inputs_from.clone(),
        None => resume.map(|r| r.checkpoint.clone()),
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

    let files = input_files(cfg, &here.per_process("corpus", ""))?;
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
    let record = crate::run::inputs::InputsRecord::new(
        lanes.iter().map(|l| (l.lang.as_str(), l.files.as_slice())),
        &held_files,
        holdout_split,
        cfg.eval.holdout,
    )
    .with_eval_files(&eval_files);
    if let (Some(then), Some(dir)) = (&recorded, &from_checkpoint) {
        check_same_inputs(cfg, &record, then, dir, replay.is_some())?;
    }
    let report = InputReport {
        files: total_files,
        files_held_out: held_files.len() as u64,
        files_outside_mix: outside.len() as u64,
        ..Default::default()
    };
    let mut inputs = Inputs {
        lanes,
        outside,
        held_files,
        eval_files,
        manifests,
        mix,
        record,
        report,
    };
    check_every_lane_has_input(cfg, &mut inputs)?;
    Ok(inputs)
}

/// Counts each lane's files; a lane with none is an error (unless `sampler.on_exhausted = renormalize`).
fn check_every_lane_has_input(cfg: &Config, inputs: &mut Inputs) -> anyhow::Result<()> {
    let Inputs {
        lanes,
        outside,
        held_files,
        report: input,
        ..
    } = inputs;
    let mut empty_lanes = Vec::new();
    for l in lanes.iter() {
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
    Ok(())
}

/// Refuses to continue (or replay) a checkpoint's stream with another tokenizer than the one that tokenized it.
fn check_same_tokenizer(
    tok: &Tokenizer,
    replay: Option<&ReplaySpec>,
    resume: Option<&crate::train::ResumeInfo>,
) -> anyhow::Result<()> {
    let (checkpoint, what) = match (replay, resume) {
        (Some(r), _) => (r.inputs_from.as_ref(), "replay"),
        (None, r) => (r.map(|r| &r.checkpoint), "--resume"),
    };
    match checkpoint {
        Some(dir) => crate::stages::tokenizer::check_same_tokenizer(tok, dir, what),
        None => Ok(()),
    }
}

/// The tokenizer, checked for the Q&A template's control tokens and the packer's EOT and padding tokens.
struct TokenizerSetup {
    tokenizer: Tokenizer,
    read_opts: Arc<reader::ReadOptions>,
    eot: u32,
    pad: u32,
}

fn load_tokenizer(cfg: &Config) -> anyhow::Result<TokenizerSetup> {
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
    Ok(TokenizerSetup {
        tokenizer,
        read_opts,
        eot,
        pad,
    })
}

/// A fresh training run sets the checkpoints of an earlier run in `run.dir` aside (rank 0), after refusing a
/// `train.init_from` that points into them.
fn set_aside_earlier_run(
    cfg: &Config,
    replay: Option<&ReplaySpec>,
    resume: Option<&crate::train::ResumeInfo>,
    here: &RunDir,
) -> anyhow::Result<()> {
    let (None, Some(t), None) = (replay, &cfg.train, resume) else {
        return Ok(());
    };
    // Weights to start from inside this run's own checkpoints would be set aside before they are read.
    if let Some(init) = &t.init_from {
        let c = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let own = crate::common::run_dir::checkpoints_dir(&here.run_dir);
        if c(init).starts_with(c(&own))
            && !crate::common::run_dir::list_checkpoints(&here.run_dir).is_empty()
        {
            anyhow::bail!(
                "train.init_from = {} is a checkpoint of this run.dir, which a run started without --resume sets \
                 aside: continue this run with --resume, or start the new one in another run.dir",
                init.display()
            );
        }
    }
    if here.rank0() {
        crate::train::set_aside_previous_run(&here.run_dir)?;
    }
    Ok(())
}

/// Where the stream starts: the global index to skip to, the checkpoint's dataflow position (lanes, sampler,
/// packer), each lane's position.
struct StartPosition {
    skip: u64,
    data: Option<crate::types::ResumePoint>,
    lanes: Vec<LanePosition>,
}

fn start_position(
    replay: Option<&ReplaySpec>,
    resume: Option<&crate::train::ResumeInfo>,
    lanes: usize,
) -> anyhow::Result<StartPosition> {
    let (skip, data) = match replay {
        Some(r) => (r.skip, r.data.clone()),
        None => (
            resume.map_or(0, |r| r.sequences_consumed),
            resume.and_then(|r| r.data.clone()),
        ),
    };
    if let Some(d) = &data {
        if d.lanes.len() != lanes {
            anyhow::bail!(
                "the checkpoint's dataflow has {} language lanes but sampler.mix now has {}: resume needs the same mix",
                d.lanes.len(),
                lanes
            );
        }
    }
    let start_lanes: Vec<LanePosition> = data
        .as_ref()
        .map(|d| d.lanes.clone())
        .unwrap_or_else(|| vec![LanePosition::default(); lanes]);
    Ok(StartPosition {
        skip,
        data,
        lanes: start_lanes,
    })
}

/// `[dedup]`: the lanes' index, and the log of its decisions.
struct DedupState {
    index: Option<Arc<crate::stages::dedup::DedupIndex>>,
    log: Option<Arc<Mutex<std::fs::File>>>,
}

fn dedup_state(
    cfg: &Config,
    replay: Option<&ReplaySpec>,
    resume: Option<&crate::train::ResumeInfo>,
    inputs: &Inputs,
    tok: &TokenizerSetup,
    here: &RunDir,
) -> anyhow::Result<DedupState> {
    // The lanes' index, with the held-out documents and (resume, replay) the checkpoint's entries.
    let index = match cfg.dedup.enabled() {
        true => {
            let from = match replay {
                Some(r) => r.checkpoint.clone().filter(|_| r.data.is_some()),
                None => resume
                    .filter(|r| r.data.is_some())
                    .map(|r| r.checkpoint.clone()),
            };
            Some(Arc::new(build_dedup_index(
                cfg,
                &inputs.lanes,
                &inputs.held_files,
                &inputs.eval_files,
                &tok.read_opts,
                from.as_deref(),
            )?))
        }
        false => None,
    };
    let log = match (&index, replay) {
        (Some(_), None) => {
            let p = here.per_process("dedup", ".jsonl");
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
    Ok(DedupState { index, log })
}

/// `[filter]`: the cut of every lane — the checkpoint's when a resume or replay continues one (refused when this
/// config's `[filter]` differs), else fixed now (a first pass over the lanes with `keep_fraction`); written to
/// `<run.dir>/filter.json` by a run that trains or preprocesses (not a replay).
fn filter_state(
    cfg: &Config,
    replay: Option<&ReplaySpec>,
    resume: Option<&crate::train::ResumeInfo>,
    inputs: &Inputs,
    tok: &TokenizerSetup,
    here: &RunDir,
) -> anyhow::Result<Option<Arc<FilterSetup>>> {
    let Some(fcfg) = &cfg.filter else {
        return Ok(None);
    };
    let from = match replay {
        Some(r) => r.inputs_from.clone(),
        None => resume.map(|r| r.checkpoint.clone()),
    };
    let f = build_filter(
        cfg,
        fcfg,
        &inputs.lanes,
        &inputs.held_files,
        &inputs.eval_files,
        &inputs.manifests,
        &tok.read_opts,
        from.as_deref(),
    )?;
    if replay.is_none() && here.rank0() {
        let p = here.run_dir.join(crate::stages::filter::STATE_FILE);
        write_file_atomically(&p, f.state_json().as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Some(Arc::new(f)))
}

/// Ctrl-C/SIGTERM/SIGHUP drain the pipeline; which signal stopped the run sets the exit code, a second one exits.
fn install_shutdown() -> Shutdown {
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.install_signal_handler() {
        tracing::debug!("signal handler not installed: {e}");
    }
    // On top of it: which signal stopped the run (its exit code), and the forced exit on a second one.
    if let Err(e) = signals::install() {
        tracing::debug!("signal exit codes not installed: {e}");
    }
    shutdown
}

/// Files outside the mix are not trained on. One whose language could not be told is read here: if it is broken
/// (a corrupt archive, a Q&A file whose first line is not JSON) it is quarantined like any unreadable input,
/// never just counted; if it reads, it is a file of no known language, listed in the log.
fn read_files_outside_mix(
    inputs: &mut Inputs,
    tok: &TokenizerSetup,
    quarantine: &Quarantine,
    counters: &Counters,
) {
    let input = &mut inputs.report;
    for (f, lang) in &inputs.outside {
        if lang.is_none() {
            counters.files_read.fetch_add(1, RELAXED);
            if let Err(e) = reader::read_file_with(f, &inputs.manifests, &tok.read_opts) {
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
}

/// What the ranks evaluate (`[eval]`): the held-out set, packed once before training starts, and the Q&A questions
/// asked at every evaluation; rank 0 writes both into `run.dir`.
struct EvalInputs {
    rank0: bool,
    heldout: Option<Arc<crate::tasks::heldout::HeldOutSet>>,
    qa_probe: Option<Arc<crate::tasks::heldout::QaProbe>>,
}

fn evaluation_inputs(p: &Prepared<'_>, quarantine: &Quarantine) -> anyhow::Result<EvalInputs> {
    let (cfg, replay, inputs, tok, here) = (p.cfg, p.replay(), &p.inputs, &p.tok, &p.here);
    let rank0 = here.rank0();
    let evaluating = cfg.train.is_some() && replay.is_none();
    let heldout = match evaluating && cfg.eval.has_loss_set() {
        true => {
            let t = Instant::now();
            let set = heldout_set(
                cfg,
                &inputs.held_files,
                &inputs.eval_files,
                &inputs.manifests,
                &tok.tokenizer,
                tok.eot,
                tok.pad,
                quarantine,
            )?;
            tracing::info!(
                seconds = format!("{:.2}", t.elapsed().as_secs_f64()),
                files = set.files,
                sequences = set.languages.iter().map(|l| l.sequences).sum::<usize>(),
                hash = %set.hash,
                "held-out set ready"
            );
            if rank0 {
                let p = here.run_dir.join(crate::tasks::heldout::SET_FILE);
                std::fs::write(&p, serde_json::to_string_pretty(&set)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Some(Arc::new(set))
        }
        false => None,
    };
    let qa_probe = match evaluating {
        true => crate::tasks::heldout::qa_probe(cfg, tok.tokenizer.clone())?.map(Arc::new),
        false => None,
    };
    if let (Some(q), true) = (&qa_probe, rank0) {
        let dir = here.run_dir.join(crate::tasks::heldout::QA_DIR);
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
    Ok(EvalInputs {
        rank0,
        heldout,
        qa_probe,
    })
}

/// Every lane: source → reader pool → (dedup) → tokenizer pool; returns the lanes' edges into the sampler.
fn spawn_lanes(
    topo: &mut Topology,
    p: &Prepared<'_>,
    quarantine: &Arc<Quarantine>,
    counters: &Arc<Counters>,
) -> Vec<EdgeReceiver<TokenizedBatch>> {
    let mut lane_rx: Vec<EdgeReceiver<TokenizedBatch>> = Vec::new();
    for (li, lane) in p.inputs.lanes.iter().enumerate() {
        let lang = lane.lang.clone();
        let (ftx, frx) =
            edge::<(u32, PathBuf, u32)>(&format!("source.{lang}->reader.{lang}"), p.cap("reader"));
        // reader → (dedup) → (filter) → tokenizer.
        let after_dedup = match p.filter {
            Some(_) => format!("filter.{lang}"),
            None => format!("tokenizer.{lang}"),
        };
        let to_tokenizer = match p.dedup.index {
            Some(_) => format!("reader.{lang}->dedup.{lang}"),
            None => format!("reader.{lang}->{after_dedup}"),
        };
        let (dtx, drx) = edge::<DocBatch>(&to_tokenizer, p.cap("reader"));
        let (ttx, trx) =
            edge::<TokenizedBatch>(&format!("tokenizer.{lang}->sampler"), p.cap("tokenizer"));
        spawn_source(topo, p, li, ftx);
        spawn_readers(topo, p, li, quarantine, counters, frx, dtx);
        let drx = match &p.dedup.index {
            Some(d) => {
                let (xtx, xrx) =
                    edge::<DocBatch>(&format!("dedup.{lang}->{after_dedup}"), p.cap("reader"));
                let d = d.clone();
                let log = p.dedup.log.clone();
                let lang = lang.clone();
                let paths = lane.files.clone();
                topo.spawn(format!("dedup.{lang}"), move |ctx| {
                    run_dedup(ctx, &d, li, &lang, &paths, log.as_deref(), drx, xtx)
                });
                xrx
            }
            None => drx,
        };
        let drx = match &p.filter {
            Some(f) => {
                let (ytx, yrx) =
                    edge::<DocBatch>(&format!("filter.{lang}->tokenizer.{lang}"), p.cap("reader"));
                let f = f.clone();
                let lang = lang.clone();
                let paths = lane.files.clone();
                topo.spawn(format!("filter.{lang}"), move |ctx| {
                    run_filter(ctx, &f, li, &lang, &paths, drx, ytx)
                });
                yrx
            }
            None => drx,
        };
        spawn_tokenizers(topo, p, li, counters, drx, ttx);
        lane_rx.push(trx);
    }
    lane_rx
}

/// `source.<lang>`: the lane's files in order, from the start position on (forever under `on_exhausted = cycle`).
fn spawn_source(
    topo: &mut Topology,
    p: &Prepared<'_>,
    li: usize,
    ftx: lexflow_dataflow::EdgeSender<(u32, PathBuf, u32)>,
) {
    let lane = &p.inputs.lanes[li];
    let files = lane.files.clone();
    let cycle = p.cfg.sampler.on_exhausted == ExhaustedPolicy::Cycle;
    let start = p.start.lanes[li];
    topo.spawn(format!("source.{}", lane.lang), move |ctx| {
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
}

/// `reader.<lang>`: the lane's ordered pool of readers (`reader.threads`), each a [`LaneReader`].
fn spawn_readers(
    topo: &mut Topology,
    p: &Prepared<'_>,
    li: usize,
    quarantine: &Arc<Quarantine>,
    counters: &Arc<Counters>,
    frx: EdgeReceiver<(u32, PathBuf, u32)>,
    dtx: lexflow_dataflow::EdgeSender<DocBatch>,
) {
    let lang = p.inputs.lanes[li].lang.clone();
    let q = quarantine.clone();
    let c = counters.clone();
    let lang2 = lang.clone();
    let mi = p.inputs.manifests.clone();
    let ro = p.tok.read_opts.clone();
    let dd = p.dedup.index.clone();
    ordered_pool(
        topo,
        &format!("reader.{lang}"),
        p.cfg.reader.threads,
        p.cap("reader"),
        frx,
        dtx,
        move |_| {
            let r = LaneReader {
                quarantine: q.clone(),
                counters: c.clone(),
                lang: lang2.clone(),
                manifests: mi.clone(),
                read_opts: ro.clone(),
                dedup: dd.clone(),
                metrics: lexflow_metrics::actor(&format!("reader.{lang2}")),
                lane: li as u16,
            };
            move |ctx: &lexflow_dataflow::ActorContext, (file, path, skip): (u32, PathBuf, u32)| {
                r.read(ctx, file, path, skip)
            }
        },
    );
}

/// One reader worker of a lane.
struct LaneReader {
    quarantine: Arc<Quarantine>,
    counters: Arc<Counters>,
    lang: String,
    manifests: Arc<reader::ManifestIndex>,
    read_opts: Arc<reader::ReadOptions>,
    dedup: Option<Arc<crate::stages::dedup::DedupIndex>>,
    metrics: lexflow_metrics::ActorMetrics,
    lane: u16,
}

impl LaneReader {
    /// The documents of file number `file` of the lane (`path`), those before `skip` without their text (a resume
    /// trained on them already), with their dedup keys; a bad file is quarantined (no documents).
    fn read(
        &self,
        ctx: &lexflow_dataflow::ActorContext,
        file: u32,
        path: PathBuf,
        skip: u32,
    ) -> Result<DocBatch, lexflow_dataflow::ActorError> {
        ctx.set_input(path.display().to_string());
        let t = Instant::now();
        let mut docs = match reader::read_file_with(&path, &self.manifests, &self.read_opts) {
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
                self.quarantine.record(&e);
                self.counters.quarantined.fetch_add(1, RELAXED);
                self.metrics.error("quarantined");
                Vec::new()
            }
        };
        // Documents before the resume position were trained on already: keep their ordinals, drop their text.
        for d in docs.iter_mut().take(skip as usize) {
            d.text.clear();
        }
        self.counters.files_read.fetch_add(1, RELAXED);
        self.counters
            .documents
            .fetch_add(docs.len() as u64, RELAXED);
        if let Ok(mut g) = self.counters.documents_per_lang.lock() {
            *g.entry(self.lang.clone()).or_insert(0) += docs.len() as u64;
        }
        let mism = docs
            .iter()
            .filter(|d| d.lang.as_deref().is_some_and(|l| l != self.lang))
            .count();
        self.counters
            .lang_mismatches
            .fetch_add(mism as u64, RELAXED);
        self.metrics.items_in.inc();
        self.metrics.items_out.inc_by(docs.len() as u64);
        self.metrics
            .bytes_out
            .inc_by(docs.iter().map(|d| d.text.len() as u64).sum());
        self.metrics.busy_seconds.inc_by(t.elapsed().as_secs_f64());
        lexflow_metrics::latency(&format!("reader.{}", self.lang)).record(t.elapsed());
        let m = lexflow_metrics::global();
        m.reader_files.with_label_values(&[&self.lang]).inc();
        m.reader_documents
            .with_label_values(&[&self.lang])
            .inc_by(docs.len() as u64);
        // Dedup keys here, in the parallel workers; the decision is the dedup actor's (lane order).
        let signatures = match &self.dedup {
            Some(d) => docs
                .iter()
                .map(|doc| (!doc.text.is_empty()).then(|| d.hasher.signature(doc)))
                .collect(),
            None => Vec::new(),
        };
        Ok(DocBatch {
            lane: self.lane,
            file,
            docs,
            signatures,
        })
    }
}

/// `tokenizer.<lang>`: the lane's ordered pool of tokenizers (`tokenizer.threads`), BOS prepended with
/// `tokenizer.add_bos`.
fn spawn_tokenizers(
    topo: &mut Topology,
    p: &Prepared<'_>,
    li: usize,
    counters: &Arc<Counters>,
    drx: EdgeReceiver<DocBatch>,
    ttx: lexflow_dataflow::EdgeSender<TokenizedBatch>,
) {
    let lang = p.inputs.lanes[li].lang.clone();
    let c = counters.clone();
    let tk = p.tok.tokenizer.clone();
    let lang3 = lang.clone();
    let add_bos = p.cfg.tokenizer.add_bos;
    ordered_pool(
        topo,
        &format!("tokenizer.{lang}"),
        p.cfg.tokenizer.threads,
        p.cap("tokenizer"),
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
}

/// The reports the sampler, the packer and the shard writer fill as they run.
#[derive(Default)]
struct Reports {
    sampler: Arc<Mutex<SamplerReport>>,
    packer: Arc<Mutex<PackerReport>>,
    shards: Arc<Mutex<ShardReport>>,
}

/// `sampler`: the lanes merged into one stream at the token-exact language mix.
fn spawn_sampler(
    topo: &mut Topology,
    p: &Prepared<'_>,
    lane_rx: Vec<EdgeReceiver<TokenizedBatch>>,
    stx: lexflow_dataflow::EdgeSender<Vec<crate::types::SampledDoc>>,
    reports: &Reports,
) {
    let mix = p.inputs.mix.clone();
    let policy = p.cfg.sampler.on_exhausted;
    let rep = reports.sampler.clone();
    let start = SamplerStart {
        lanes: p.start.lanes.clone(),
        state: p.start.data.as_ref().map(|d| d.sampler.clone()),
        lane_files: p
            .inputs
            .lanes
            .iter()
            .map(|l| l.files.len() as u64)
            .collect(),
        max_doc_tokens: p.cfg.packer.max_doc_tokens.map(|n| n.get()),
    };
    topo.spawn("sampler", move |ctx| {
        run_sampler(ctx, &mix, policy, start, lane_rx, stx, &rep)
    });
}

/// `packer`: fixed-length sequences; a resume first rebuilds the checkpoint's open sequences by re-reading and
/// re-tokenizing only their documents.
fn spawn_packer(
    topo: &mut Topology,
    p: &Prepared<'_>,
    srx: EdgeReceiver<Vec<crate::types::SampledDoc>>,
    ptx: lexflow_dataflow::EdgeSender<PackedSequence>,
    reports: &Reports,
) -> anyhow::Result<()> {
    let mut packer = Packer::new(&p.cfg.packer, p.tok.eot, p.tok.pad);
    let start_sampler = match &p.start.data {
        Some(d) => {
            // Rebuild the carry-over: re-read and re-tokenize only the partly packed documents.
            let t = Instant::now();
            packer.restore(&d.packer, d.next_index, |id| {
                fetch_doc_tokens(
                    &p.inputs.lanes,
                    &p.inputs.manifests,
                    &p.tok.read_opts,
                    &p.tok.tokenizer,
                    p.cfg.tokenizer.add_bos,
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
        None => {
            let lanes = p.inputs.lanes.len();
            SamplerState {
                emitted_tokens: vec![0; lanes],
                documents: vec![0; lanes],
                active: vec![true; lanes],
            }
        }
    };
    let rep = reports.packer.clone();
    let sl = p.start.lanes.clone();
    topo.spawn("packer", move |ctx| {
        run_packer(ctx, packer, srx, ptx, &rep, sl, start_sampler)
    });
    Ok(())
}

/// `shard_writer`: logical shards, one edge per rank (`index % world`), the Arrow tee (`shards.arrow_dir`; rank 0's
/// process only), the skip to a resume's position. Returns the ranks' edges and the tee, shared with rank 0.
fn spawn_shard_writer(
    topo: &mut Topology,
    p: &Prepared<'_>,
    prx: EdgeReceiver<PackedSequence>,
    reports: &Reports,
) -> anyhow::Result<(RankEdges, Option<Arc<SharedTee>>)> {
    let cfg = p.cfg;
    let skip = p.start.skip;
    let mut rank_rx = Vec::new();
    let mut rank_tx = Vec::new();
    for r in 0..p.world {
        let (tx, rx) = edge::<PackedSequence>(&format!("shard_writer->rank{r}"), p.cap("rank"));
        rank_tx.push(tx);
        rank_rx.push(rx);
    }
    // One process per rank: rank 0's process tees the whole stream, the others none.
    let tee = match cfg
        .shards
        .arrow_dir
        .as_ref()
        .filter(|_| p.here.process.is_none_or(|(r, _)| r == 0))
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
    .map(|t| Arc::new(SharedTee::new(t, skip)));
    let tee_for_trainer = tee.clone();
    let w = ShardWriter {
        shards: cfg.shards.count.get(),
        skip,
        limit: p.replay().map(|r| r.limit).or(cfg.run.max_sequences),
        tee,
        process: p.here.process,
    };
    let rep = reports.shards.clone();
    topo.spawn("shard_writer", move |ctx| {
        run_shard_writer(ctx, w, prx, rank_tx, &rep)
    });
    Ok((rank_rx, tee_for_trainer))
}

/// The shard writer's edges to the ranks, rank 0 first.
type RankEdges = Vec<EdgeReceiver<PackedSequence>>;

/// The trainer ranks (`[train]`), given everything a checkpoint stores besides the model: the run config, the
/// inputs record, the tokenizer's files, the dedup index, the tee, the evaluation inputs.
fn spawn_ranks(
    topo: &mut Topology,
    p: &Prepared<'_>,
    t: &crate::config::TrainConfig,
    tee: Option<Arc<SharedTee>>,
    evals: &EvalInputs,
    rank_rx: Vec<EdgeReceiver<PackedSequence>>,
) -> anyhow::Result<crate::train::TrainHandle> {
    let cfg = p.cfg;
    let tokenizer = &p.tok.tokenizer;
    let mut hf_files = crate::stages::tokenizer::hf_model_files(
        tokenizer,
        (cfg.input.qa_template == crate::stages::qa_format::QaTemplate::Llama3)
            .then_some(crate::stages::tokenizer::LLAMA3_CHAT_TEMPLATE),
        Some(&cfg.packer.pad_token),
    )?;
    // `[filter]`: the lanes' cuts go into every checkpoint with the files written as they are (the cuts are fixed
    // for the whole run), so that a resume or replay decides as this run did.
    if let Some(f) = &p.filter {
        hf_files.files.push((
            crate::stages::filter::STATE_FILE,
            f.state_json().into_bytes(),
        ));
    }
    crate::train::spawn_trainers(
        topo,
        crate::train::TrainerSetup {
            cfg: t.clone(),
            run_dir: p.here.run_dir.clone(),
            vocab_size: tokenizer.vocab_size(),
            seq_len: cfg.packer.seq_len.get(),
            seed: cfg.run.seed,
            resume: p.opts.resume,
            run_config: Some(toml::to_string(cfg)?),
            inputs: Some(p.inputs.record.to_json()),
            hf_files: Arc::new(hf_files),
            dedup: p.dedup.index.clone(),
            tee,
            eval: (evals.heldout.is_some() || evals.qa_probe.is_some()).then(|| {
                crate::train::EvalSetup {
                    set: evals.heldout.clone(),
                    qa: evals.qa_probe.clone(),
                    every: cfg.eval.every,
                    micro_batch: cfg
                        .eval
                        .micro_batch
                        .map_or(t.micro_batch.get(), |m| m.get()),
                }
            }),
        },
        rank_rx,
    )
}

/// Without `[train]` (or in a replay): counting sinks in place of the ranks, collecting the sequences of a replay.
fn spawn_sinks(
    topo: &mut Topology,
    p: &Prepared<'_>,
    counters: &Arc<Counters>,
    rank_rx: Vec<EdgeReceiver<PackedSequence>>,
) {
    for (r, rx) in rank_rx.into_iter().enumerate() {
        let c = counters.clone();
        let collect = p.replay().map(|r| r.collected.clone());
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
}

/// Runs the topology to its end with progress shown: a bar on a terminal, a log line every few seconds otherwise.
fn join_with_progress(
    topo: Topology,
    p: &Prepared<'_>,
    counters: &Arc<Counters>,
    reports: &Reports,
    local_ranks: &[usize],
) -> Result<(), lexflow_dataflow::RunError> {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = {
        let done = done.clone();
        let counters = counters.clone();
        let pr = reports.packer.clone();
        let show_bar = p.opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let steps = p.cfg.train.as_ref().map(|t| t.steps);
        let ranks = local_ranks.to_vec();
        std::thread::spawn(move || progress_loop(&done, &counters, &pr, show_bar, steps, &ranks))
    };
    let result = topo.join();
    done.store(true, RELAXED);
    let _ = progress.join();
    result
}

/// What a run ended with, for its statistics.
struct Ended<'a> {
    t0: Instant,
    quarantine_path: &'a Path,
    counters: &'a Counters,
    reports: &'a Reports,
    train_handle: Option<&'a crate::train::TrainHandle>,
    local_ranks: &'a [usize],
    evals: &'a EvalInputs,
    result: &'a Result<(), lexflow_dataflow::RunError>,
    shutdown: &'a Shutdown,
}

/// `stats.json`: the inputs read, the mix, the packer and the shards, the training, the held-out set, dedup.
fn collect_stats(p: &mut Prepared<'_>, e: Ended<'_>) -> RunStats {
    let (cfg, counters) = (p.cfg, e.counters);
    let mut input = std::mem::take(&mut p.inputs.report);
    input.files_read = counters.files_read.load(RELAXED);
    input.documents = counters.documents.load(RELAXED);
    input.quarantined_files = counters.quarantined.load(RELAXED);
    input.lang_mismatches = counters.lang_mismatches.load(RELAXED);
    input.text_bytes = counters.text_bytes.load(RELAXED);
    input.tokens = counters.tokens.load(RELAXED);
    input.quarantine_report =
        (input.quarantined_files > 0).then(|| e.quarantine_path.display().to_string());
    let sampler = e
        .reports
        .sampler
        .lock()
        .map(|g| g.clone())
        .unwrap_or_default();
    // Documents read per language (the lanes' readers, like `input.documents`); what the sampler passed on to
    // training is `sampler.languages[].documents`.
    let lanes = &p.inputs.lanes;
    input.documents_per_lang = lanes.iter().map(|l| (l.lang.clone(), 0)).collect();
    if let Ok(g) = counters.documents_per_lang.lock() {
        for (lang, n) in g.iter() {
            *input.documents_per_lang.entry(lang.clone()).or_insert(0) += n;
        }
    }
    let elapsed = e.t0.elapsed().as_secs_f64();
    let tokenizer_busy = counters.tokenizer_busy_nanos.load(RELAXED) as f64 * 1e-9;
    RunStats {
        run: cfg.run.name.clone(),
        config: p.opts.origin.clone(),
        seed: cfg.run.seed,
        elapsed_seconds: elapsed,
        preprocess_tokens_per_second: input.tokens as f64 / elapsed.max(1e-9),
        tokenizer_tokens_per_busy_second: match tokenizer_busy > 0.0 {
            true => input.tokens as f64 / tokenizer_busy,
            false => 0.0,
        },
        paced_by_training: e.train_handle.is_some(),
        input,
        sampler,
        packer: e
            .reports
            .packer
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default(),
        shards: e
            .reports
            .shards
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default(),
        train: e.train_handle.map(|h| {
            train_json(
                h.report(),
                &p.here.run_dir,
                p.resume.as_ref().map(|r| r.step),
                e.local_ranks,
                p.here.process.map_or(p.world, |(_, w)| w),
            )
        }),
        eval_set: e
            .evals
            .heldout
            .as_deref()
            .and_then(|s| serde_json::to_value(s).ok()),
        dedup: p
            .dedup
            .index
            .as_ref()
            .map(|d| d.report(&lanes.iter().map(|l| l.lang.clone()).collect::<Vec<_>>())),
        filter: match (&p.filter, &cfg.filter) {
            (Some(f), Some(c)) => Some(f.report(c)),
            _ => None,
        },
        outcome: match (e.result, e.shutdown.reason()) {
            (Err(_), _) => "failed".into(),
            (Ok(()), Some(_)) => "interrupted".into(),
            (Ok(()), None) => "completed".into(),
        },
    }
}

/// `lexflow provenance`: every piece of the replayed sequences with its document (re-read from its file).
fn describe_pieces(p: &Prepared<'_>, r: &ReplaySpec) -> anyhow::Result<()> {
    let (lanes, manifests, read_opts, tokenizer) = (
        &p.inputs.lanes,
        &p.inputs.manifests,
        &p.tok.read_opts,
        &p.tok.tokenizer,
    );
    let seqs = r.collected.lock().map(|g| g.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut cache: std::collections::HashMap<DocId, (crate::types::Document, Vec<u32>)> =
        Default::default();
    for s in &seqs {
        for piece in &s.pieces {
            if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(piece.doc) {
                let d = fetch_doc(lanes, manifests, read_opts, piece.doc)?;
                let t = fetch_doc_tokens(
                    lanes,
                    manifests,
                    read_opts,
                    tokenizer,
                    p.cfg.tokenizer.add_bos,
                    piece.doc,
                )?;
                e.insert((d, t));
            }
            let (d, toks) = &cache[&piece.doc];
            let lane = &lanes[piece.doc.lane as usize];
            out.push(PieceInfo {
                index: s.index,
                offset: piece.offset,
                lang: lane.lang.clone(),
                path: lane.files[piece.doc.file as usize % lane.files.len()]
                    .display()
                    .to_string(),
                ordinal: piece.doc.ordinal,
                celex: d.celex.clone(),
                doc_type: d.doc_type.as_str().to_string(),
                title: d.title.clone(),
                article: article_at(tokenizer, d, toks, piece.start as usize),
                token_start: piece.start,
                token_end: piece.end,
            });
        }
    }
    if let Ok(mut g) = r.described.lock() {
        *g = out;
    }
    Ok(())
}

/// Writes `stats.json`, keeps `/metrics` up for `metrics.linger_seconds`, and reports the run's outcome: its error
/// first (then a failure to write the statistics), a run that read no document at all.
fn finish(
    p: &Prepared<'_>,
    stats: RunStats,
    result: Result<(), lexflow_dataflow::RunError>,
) -> anyhow::Result<RunStats> {
    let cfg = p.cfg;
    // Atomically (a temporary file renamed into place): a failed write (a full disk) leaves the previous stats.json
    // whole, never a truncated one. When the run failed too, its error comes first: it is the cause.
    let stats_path = p.here.per_process("stats", ".json");
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
    if p.replay().is_none() && stats.outcome == "completed" && stats.input.documents == 0 {
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
