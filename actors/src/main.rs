//! `lexflow`: parse the command line → build → run. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lexflow_actors::config::{Config, FileChecks};

#[derive(Parser)]
#[command(
    name = "lexflow",
    version,
    about = "Stream EUR-Lex FORMEX documents into LLM training"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline from a TOML config (the embedded sample when CONFIG is omitted).
    Run {
        /// TOML config (default: the embedded configs/sample.toml).
        config: Option<PathBuf>,
        /// Continue from the latest good checkpoint in the run directory.
        #[arg(long)]
        resume: bool,
        /// No progress bar even on a terminal.
        #[arg(long)]
        quiet: bool,
    },
    /// Parse FORMEX inputs and print one JSON object per document (`path, error` for a bad file).
    Parse {
        /// JSON lines (the only output format; accepted so scripts may spell it out).
        #[arg(long)]
        jsonl: bool,
        /// FORMEX files, directories, globs, .zst/.gz/.zip packages.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Decode and print the sequences of an Arrow IPC shard file.
    Inspect {
        /// A shard file of the Arrow tee (`shards.arrow_dir`).
        file: PathBuf,
        /// Tokenizer to decode with (`llama3` or a tokenizer.json; default: the one the file records, the run's
        /// `tokenizer.path`).
        #[arg(long)]
        tokenizer: Option<String>,
        /// Print at most this many sequences.
        #[arg(long, default_value_t = 4)]
        limit: usize,
    },
    /// Generate a deterministic sample corpus of FORMEX packages.
    GenSample {
        /// Output directory.
        out: PathBuf,
        /// Acts per language (each with annexes and a manifest).
        #[arg(long, default_value_t = 40, value_parser = at_least_one)]
        acts_per_language: usize,
        /// Languages (lower-case ISO 639-1 codes), comma-separated.
        #[arg(long, default_value = "en,fr,de,es,pt", value_delimiter = ',')]
        languages: Vec<String>,
        /// Seed of the generated text (configs/sample.toml uses 7; `[input.generate]` defaults to 1234).
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokCmd,
    },
    /// Regenerate exactly the batches of training steps A..B from a checkpoint, without training (JSON lines).
    Replay {
        /// A checkpoint directory (`<run.dir>/checkpoints/step-NNNNNN`).
        checkpoint: PathBuf,
        /// `A..B` (B exclusive), `A..=B` or `N`; steps are 1-based.
        #[arg(long)]
        steps: String,
        /// Write the JSON lines to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the documents (CELEX, language, article where known, token range) that went into step N of a run.
    Provenance {
        /// The run directory (`run.dir`).
        run: PathBuf,
        /// The optimizer step (1-based).
        #[arg(long)]
        step: u64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Memory per rank and per host of a config's training in every sharding mode, whether it fits, and the
    /// cheapest change that makes it fit (before renting GPUs).
    Plan {
        /// TOML config (default: the embedded configs/sample.toml).
        config: Option<PathBuf>,
        /// Memory of one GPU, e.g. 180GiB, 80GB (default: the first CUDA device's, when the config trains on CUDA).
        #[arg(long, value_parser = lexflow_actors::train::parse_bytes)]
        gpu_memory: Option<u64>,
        /// Host memory per node, e.g. 2TiB.
        #[arg(long, value_parser = lexflow_actors::train::parse_bytes)]
        host_memory: Option<u64>,
        /// Data-parallel ranks (default: $WORLD_SIZE, $SLURM_NTASKS, else the config's train.devices).
        #[arg(long, value_parser = at_least_one)]
        ranks: Option<usize>,
        /// Ranks per host (default: $LOCAL_WORLD_SIZE, else the config's train.devices).
        #[arg(long, value_parser = at_least_one)]
        ranks_per_host: Option<usize>,
    },
    /// Print the effective config (the embedded sample when CONFIG is omitted).
    Config {
        /// TOML config (default: the embedded configs/sample.toml).
        config: Option<PathBuf>,
    },
    /// Build the held-out evaluation set of a config (`[eval]`) exactly as `lexflow run` does: print its summary
    /// (JSON) and, with --out, write its sequences as JSON lines.
    Heldout {
        /// TOML config (default: the embedded configs/sample.toml).
        config: Option<PathBuf>,
        /// Write the held-out sequences as JSON lines to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What `[dedup]` drops from a config's training input, decided as `lexflow run` decides, without training:
    /// counts per language (JSON) and, with --out, one JSON line per document (verdict, the document it repeats).
    Dedup {
        /// TOML config (default: the embedded configs/sample.toml).
        config: Option<PathBuf>,
        /// Write one JSON line per document (verdict, the document it repeats) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override dedup.mode (`exact`, `near`) — e.g. to audit a corpus before turning dedup on.
        #[arg(long)]
        mode: Option<String>,
        /// Include every document's text in --out (and the MinHash parameters as the first line).
        #[arg(long)]
        texts: bool,
    },
    /// What `[filter]` keeps of a config's training input, decided as `lexflow run` decides, without tokenizing or
    /// training: per language the cut, counts by reason and the score distribution (JSON) and, with --out, one JSON
    /// line per document (criteria, score, verdict, reason).
    Filter {
        /// TOML config (default: the embedded configs/sample.toml).
        config: Option<PathBuf>,
        /// Write one JSON line per document (criteria, score, verdict, reason) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override filter.keep_fraction (e.g. to see what another share would keep; drops filter.threshold).
        #[arg(long)]
        keep_fraction: Option<f64>,
    },
    /// The evaluation history of a run (its eval.jsonl): held-out loss overall and per language, Q&A scores.
    Evals {
        /// The run directory (`run.dir`).
        run: PathBuf,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate text with a checkpoint (or a run directory: its newest checkpoint): continue raw text, or answer
    /// questions in the Q&A template the model was fine-tuned with. Greedy unless --temperature > 0.
    Generate {
        /// A checkpoint directory (HF layout) or a run directory (its newest checkpoint).
        model: PathBuf,
        /// With a run directory: its best checkpoint (`train.keep_best`) instead of the newest.
        #[arg(long)]
        best: bool,
        /// A prompt (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        /// JSON lines with "prompt" (or "question") and an optional "id".
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// `raw` (text continued as written), `plain` or `llama3` (Q&A templates); default: the run's Q&A template
        /// when it fine-tuned on Q&A pairs, else raw.
        #[arg(long)]
        template: Option<String>,
        /// System turn for `--template llama3`.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        decode: DecodeArgs,
        /// One JSON object per answer (id, prompt, output, token_ids) instead of plain text.
        #[arg(long)]
        json: bool,
        /// Write the JSON lines to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Instruction-tuning data (Q&A with legal citations) and its evaluation.
    Qa {
        #[command(subcommand)]
        cmd: QaCmd,
    },
}

/// How answers are decoded with a checkpoint (`lexflow generate`, `lexflow qa eval --model`). With `qa eval
/// --predictions` nothing is decoded: an option given there would be ignored, so it is an error
/// ([`DecodeArgs::given`]).
#[derive(clap::Args, Debug, Clone)]
struct DecodeArgs {
    /// Tokenizer (`llama3` or a tokenizer.json); default: the checkpoint's own tokenizer.json, else `llama3`.
    #[arg(long)]
    tokenizer: Option<String>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Tokens generated at most per answer.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    max_new_tokens: usize,
    /// Prompts decoded together (left-padded batch).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    batch_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// How the next token is chosen (`lexflow generate`, `lexflow qa eval --model`).
#[derive(clap::Args, Debug, Clone)]
struct SamplingArgs {
    /// 0: greedy decoding; > 0: sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens whose probability adds up to P (1: all).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// Seed of the sampling (each prompt has its own stream: answers do not depend on the batch).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl DecodeArgs {
    /// The options set to something other than their defaults (clap's `requires` cannot say this for `qa eval`:
    /// `--model` conflicts with `--predictions`, and clap then waives what `--model` requires).
    fn given(&self) -> Vec<&'static str> {
        let s = &self.sampling;
        [
            ("--tokenizer", self.tokenizer.is_some()),
            ("--device", self.device != "cpu"),
            ("--max-new-tokens", self.max_new_tokens != 256),
            ("--batch-size", self.batch_size != 8),
            ("--temperature", s.temperature != 0.0),
            ("--top-k", s.top_k != 0),
            ("--top-p", s.top_p != 1.0),
            ("--seed", s.seed != 0),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect()
    }
}

impl SamplingArgs {
    fn get(&self) -> lexflow_actors::generate::Sampling {
        lexflow_actors::generate::Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

// Parsed once per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum QaCmd {
    /// Build Q&A pairs with citations from the articles of FORMEX acts: OUT/train/<lang>.jsonl, eval.jsonl,
    /// citations.json (every article of the corpus), summary.json.
    Build {
        /// Output directory (train/<lang>.jsonl, eval.jsonl, citations.json, summary.json).
        #[arg(long)]
        out: PathBuf,
        /// Share of the provisions written to eval.jsonl: a hash of (CELEX, article) decides, so every language and
        /// question kind of a provision is on the same side.
        #[arg(long, default_value_t = 0.1)]
        eval_fraction: f64,
        /// Articles with longer text get no `article_text` pair (counted in summary.json), never a truncated one.
        #[arg(long, default_value_t = 6000)]
        max_answer_chars: usize,
        /// FORMEX files, directories, globs, .zst/.gz/.zip packages.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Score answers (--predictions FILE of {"id","output"} lines, or generated by --model DIR) against a gold
    /// file: exact match, ROUGE-L, citation accuracy, hallucinated citations, per language and kind.
    #[command(group(clap::ArgGroup::new("answers").required(true).args(["predictions", "model"])))]
    Eval {
        /// Gold Q&A pairs (`lexflow qa build`'s eval.jsonl).
        #[arg(long)]
        gold: PathBuf,
        /// Answers to score: {"id","output"} JSON lines (exclusive with --model).
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// A checkpoint directory (HF layout), or a run directory (its newest checkpoint), to generate the answers
        /// with (greedy unless --temperature).
        #[arg(long)]
        model: Option<PathBuf>,
        /// With a run directory as --model: its best checkpoint (`train.keep_best`) instead of the newest.
        #[arg(long)]
        best: bool,
        /// citations.json of `lexflow qa build`: the known provisions for hallucination checks, together with the
        /// gold file's own citations (alone by default).
        #[arg(long)]
        index: Option<PathBuf>,
        #[command(flatten)]
        decode: DecodeArgs,
        /// Prompt format (`plain` or `llama3`); default: the `input.qa_template` of the run that wrote --model
        /// (its run_config.toml), else `plain`.
        #[arg(long)]
        template: Option<String>,
        /// System turn for `--template llama3` (default: the run's `input.qa_system`).
        #[arg(long)]
        system: Option<String>,
        /// Only the first N gold examples (predictions for later ones are ignored).
        #[arg(long)]
        limit: Option<usize>,
        /// The full report (aggregates and every example's scores) as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the generated answers ({"id","output"} lines).
        #[arg(long)]
        predictions_out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokCmd {
    /// Train a byte-level BPE tokenizer on FORMEX inputs and write tokenizer.json.
    Train {
        /// Vocabulary size (more than 258: 256 bytes + 2 special tokens).
        #[arg(long)]
        vocab_size: usize,
        /// The tokenizer.json to write.
        #[arg(long)]
        out: PathBuf,
        /// FORMEX files, directories, globs, .zst/.gz/.zip packages.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Encode text from stdin and print the ids.
    Encode {
        #[arg(long, default_value = "llama3")]
        tokenizer: String,
    },
    /// Write the tokenizer as a Hugging Face tokenizer.json (`llama3`: generated from Meta's tokenizer.model).
    Export {
        #[arg(long, default_value = "llama3")]
        tokenizer: String,
        /// The tokenizer.json to write.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    lexflow_actors::run::cli::init_logging();
    let cli = Cli::parse();
    // Under `srun`: RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR from Slurm's variables, before any thread starts.
    if let Err(e) = lexflow_actors::common::slurm::apply_from_env() {
        eprintln!("lexflow: error: {e}");
        return ExitCode::FAILURE;
    }
    let r: anyhow::Result<ExitCode> = match cli.cmd {
        Cmd::Run {
            config,
            resume,
            quiet,
        } => preflight(config.as_deref(), true)
            .and_then(|()| lexflow_actors::run::cli::cli_run(config.as_deref(), resume, quiet)),
        Cmd::Parse { jsonl: _, paths } => lexflow_actors::reader::cli_parse(&paths),
        Cmd::Inspect {
            file,
            tokenizer,
            limit,
        } => lexflow_actors::arrow_tee::cli_inspect(&file, tokenizer.as_deref(), limit),
        Cmd::GenSample {
            out,
            acts_per_language,
            languages,
            seed,
        } => {
            let g = lexflow_actors::config::GenerateConfig {
                acts_per_language,
                languages,
                seed,
            };
            lexflow_actors::gen_sample::generate(&g, &out).map(|s| {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                ExitCode::SUCCESS
            })
        }
        Cmd::Tokenizer {
            cmd:
                TokCmd::Train {
                    vocab_size,
                    out,
                    paths,
                },
        } => lexflow_actors::tokenizer::cli_train(&paths, vocab_size, &out),
        Cmd::Tokenizer {
            cmd: TokCmd::Encode { tokenizer },
        } => lexflow_actors::tokenizer::cli_encode(&tokenizer),
        Cmd::Tokenizer {
            cmd: TokCmd::Export { tokenizer, out },
        } => lexflow_actors::tokenizer::cli_export(&tokenizer, &out),
        Cmd::Replay {
            checkpoint,
            steps,
            out,
        } => lexflow_actors::replay::cli_replay(&checkpoint, &steps, out.as_deref()),
        Cmd::Provenance { run, step, json } => {
            lexflow_actors::replay::cli_provenance(&run, step, json)
        }
        Cmd::Config { config } => lexflow_actors::run::cli::cli_config(config.as_deref()),
        Cmd::Dedup {
            config,
            out,
            mode,
            texts,
        } => lexflow_actors::run::cli::cli_dedup(config.as_deref(), out.as_deref(), mode, texts),
        Cmd::Filter {
            config,
            out,
            keep_fraction,
        } => lexflow_actors::run::cli::cli_filter(config.as_deref(), out.as_deref(), keep_fraction),
        Cmd::Plan {
            config,
            gpu_memory,
            host_memory,
            ranks,
            ranks_per_host,
        } => lexflow_actors::train::cli_plan(
            config.as_deref(),
            gpu_memory,
            host_memory,
            ranks,
            ranks_per_host,
        ),
        Cmd::Evals { run, json } => lexflow_actors::heldout::cli_evals(&run, json),
        Cmd::Heldout { config, out } => preflight(config.as_deref(), false).and_then(|()| {
            lexflow_actors::run::cli::cli_heldout(config.as_deref(), out.as_deref())
        }),
        Cmd::Qa {
            cmd:
                QaCmd::Build {
                    out,
                    eval_fraction,
                    max_answer_chars,
                    paths,
                },
        } => {
            let opts = lexflow_actors::qa::BuildOptions {
                eval_fraction,
                max_answer_chars,
            };
            lexflow_actors::qa::build(&paths, &out, &opts).map(|s| {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                ExitCode::SUCCESS
            })
        }
        Cmd::Generate {
            model,
            best,
            prompt,
            prompts,
            template,
            system,
            decode,
            json,
            out,
        } => match lexflow_actors::generate::resolve_model_dir_best(&model, best) {
            Err(e) => Err(e),
            Ok(model) => {
                lexflow_actors::generate::cli_generate(lexflow_actors::generate::GenerateArgs {
                    model: &model,
                    prompts: prompt,
                    prompts_file: prompts.as_deref(),
                    template,
                    system,
                    tokenizer: decode.tokenizer,
                    device: decode.device,
                    max_new_tokens: decode.max_new_tokens,
                    batch_size: decode.batch_size,
                    sampling: decode.sampling.get(),
                    json,
                    out: out.as_deref(),
                })
            }
        },
        Cmd::Qa {
            cmd:
                QaCmd::Eval {
                    gold,
                    predictions,
                    model,
                    best,
                    index,
                    decode,
                    template,
                    system,
                    limit,
                    out,
                    predictions_out,
                },
        } => lexflow_actors::tasks::eval::cli_qa_eval(lexflow_actors::tasks::eval::QaEvalCli {
            gold: &gold,
            predictions: predictions.as_deref(),
            model: model.as_deref(),
            best,
            index: index.as_deref(),
            decode_options_given: decode.given(),
            tokenizer: decode.tokenizer,
            device: decode.device,
            max_new_tokens: decode.max_new_tokens,
            batch_size: decode.batch_size,
            sampling: decode.sampling.get(),
            template,
            system,
            limit,
            out: out.as_deref(),
            predictions_out: predictions_out.as_deref(),
        }),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lexflow: error: {}", lexflow_actors::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The config checked as a run will use it — validated, and the files it names present — before the command
/// builds anything: a missing corpus path or tokenizer is a config error with its key and line, not a failure
/// after the sample corpus was generated or the pipeline started. `train`: also `train.init_from`.
fn preflight(config: Option<&std::path::Path>, train: bool) -> anyhow::Result<()> {
    Config::load_checked(
        config,
        FileChecks {
            tokenizer: true,
            init_from: train,
        },
    )?;
    Ok(())
}

/// A count that must be at least 1 (0 would silently do nothing or be raised to 1).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}: expected a whole number >= 1")),
    }
}
