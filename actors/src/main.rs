//! `lexflow`: parse the command line → build → run. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        #[arg(long)]
        jsonl: bool,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Decode and print the sequences of an Arrow IPC shard file.
    Inspect {
        file: PathBuf,
        /// Tokenizer to decode with (default: the Llama 3 tokenizer).
        #[arg(long, default_value = "llama3")]
        tokenizer: String,
        /// Print at most this many sequences.
        #[arg(long, default_value_t = 4)]
        limit: usize,
    },
    /// Generate a deterministic sample corpus of FORMEX packages.
    GenSample {
        out: PathBuf,
        #[arg(long, default_value_t = 40)]
        acts_per_language: usize,
        #[arg(long, default_value = "en,fr,de,es,pt", value_delimiter = ',')]
        languages: Vec<String>,
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
        checkpoint: PathBuf,
        /// `A..B` (B exclusive), `A..=B` or `N`; steps are 1-based.
        #[arg(long)]
        steps: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the documents (CELEX, language, article where known, token range) that went into step N of a run.
    Provenance {
        run: PathBuf,
        #[arg(long)]
        step: u64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective config (the embedded sample when CONFIG is omitted).
    Config { config: Option<PathBuf> },
    /// Build the held-out evaluation set of a config (`[eval]`) exactly as `lexflow run` does: print its summary
    /// (JSON) and, with --out, write its sequences as JSON lines.
    Heldout {
        config: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What `[dedup]` drops from a config's training input, decided as `lexflow run` decides, without training:
    /// counts per language (JSON) and, with --out, one JSON line per document (verdict, the document it repeats).
    Dedup {
        config: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override dedup.mode (`exact`, `near`) — e.g. to audit a corpus before turning dedup on.
        #[arg(long)]
        mode: Option<String>,
        /// Include every document's text in --out (and the MinHash parameters as the first line).
        #[arg(long)]
        texts: bool,
    },
    /// The evaluation history of a run (its eval.jsonl): held-out loss overall and per language, Q&A scores.
    Evals {
        run: PathBuf,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate text with a checkpoint (or a run directory: its newest checkpoint): continue raw text, or answer
    /// questions in the Q&A template the model was fine-tuned with. Greedy unless --temperature > 0.
    Generate {
        model: PathBuf,
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

/// How answers are decoded with a checkpoint (`lexflow generate`, `lexflow qa eval --model`).
#[derive(clap::Args, Debug, Clone)]
struct DecodeArgs {
    /// Tokenizer (`llama3` or a tokenizer.json); default: the checkpoint's own tokenizer.json, else `llama3`.
    #[arg(long)]
    tokenizer: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Prompts decoded together (left-padded batch).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// How the next token is chosen (`lexflow generate`, `lexflow qa eval --model`).
#[derive(clap::Args, Debug, Clone)]
struct SamplingArgs {
    /// 0: greedy decoding; > 0: sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens whose probability adds up to P (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling (each prompt has its own stream: answers do not depend on the batch).
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
        #[arg(long)]
        out: PathBuf,
        /// Share of the provisions written to eval.jsonl: a hash of (CELEX, article) decides, so every language and
        /// question kind of a provision is on the same side.
        #[arg(long, default_value_t = 0.1)]
        eval_fraction: f64,
        /// Articles with longer text get no `article_text` pair (counted in summary.json), never a truncated one.
        #[arg(long, default_value_t = 6000)]
        max_answer_chars: usize,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Score answers (--predictions FILE of {"id","output"} lines, or generated by --model DIR) against a gold
    /// file: exact match, ROUGE-L, citation accuracy, hallucinated citations, per language and kind.
    Eval {
        #[arg(long)]
        gold: PathBuf,
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// A checkpoint directory (HF layout) to generate the answers with (greedy).
        #[arg(long)]
        model: Option<PathBuf>,
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
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Encode text from stdin and print the ids.
    Encode {
        #[arg(long, default_value = "llama3")]
        tokenizer: String,
    },
}

fn main() -> ExitCode {
    lexflow_actors::pipeline::init_logging();
    let cli = Cli::parse();
    let r: anyhow::Result<ExitCode> = match cli.cmd {
        Cmd::Run {
            config,
            resume,
            quiet,
        } => lexflow_actors::pipeline::cli_run(config.as_deref(), resume, quiet),
        Cmd::Parse { jsonl: _, paths } => lexflow_actors::reader::cli_parse(&paths),
        Cmd::Inspect {
            file,
            tokenizer,
            limit,
        } => lexflow_actors::arrow_tee::cli_inspect(&file, &tokenizer, limit),
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
        Cmd::Replay {
            checkpoint,
            steps,
            out,
        } => lexflow_actors::replay::cli_replay(&checkpoint, &steps, out.as_deref()),
        Cmd::Provenance { run, step, json } => {
            lexflow_actors::replay::cli_provenance(&run, step, json)
        }
        Cmd::Config { config } => lexflow_actors::pipeline::cli_config(config.as_deref()),
        Cmd::Dedup {
            config,
            out,
            mode,
            texts,
        } => cli_dedup(config, out, mode, texts),
        Cmd::Evals { run, json } => lexflow_actors::heldout::cli_evals(&run, json),
        Cmd::Heldout { config, out } => {
            lexflow_actors::heldout::cli_heldout(config.as_deref(), out.as_deref())
        }
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
            prompt,
            prompts,
            template,
            system,
            decode,
            json,
            out,
        } => {
            let model = lexflow_actors::generate::resolve_model_dir(&model);
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
        Cmd::Qa {
            cmd:
                QaCmd::Eval {
                    gold,
                    predictions,
                    model,
                    index,
                    decode,
                    template,
                    system,
                    limit,
                    out,
                    predictions_out,
                },
        } => {
            // A run directory stands for its newest checkpoint, as with `lexflow generate`; the tokenizer defaults to
            // the checkpoint's own.
            let model = model.map(|m| lexflow_actors::generate::resolve_model_dir(&m));
            let tokenizer = match &model {
                Some(m) => lexflow_actors::generate::tokenizer_for(m, decode.tokenizer),
                None => decode.tokenizer.unwrap_or_else(|| "llama3".into()),
            };
            lexflow_actors::eval::cli_eval(lexflow_actors::eval::EvalArgs {
                gold: &gold,
                predictions: predictions.as_deref(),
                model: model.as_deref(),
                index: index.as_deref(),
                gen: lexflow_actors::eval::GenOptions {
                    tokenizer,
                    device: decode.device,
                    max_new_tokens: decode.max_new_tokens,
                    batch_size: decode.batch_size,
                    sampling: decode.sampling.get(),
                    format: match lexflow_actors::qa::parse_template(template.as_deref(), system) {
                        Ok(f) => f,
                        Err(e) => {
                            eprintln!("lexflow: error: {e:#}");
                            return ExitCode::FAILURE;
                        }
                    },
                },
                limit,
                out: out.as_deref(),
                predictions_out: predictions_out.as_deref(),
            })
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lexflow: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cli_dedup(
    config: Option<PathBuf>,
    out: Option<PathBuf>,
    mode: Option<String>,
    texts: bool,
) -> anyhow::Result<ExitCode> {
    let (mut cfg, _) = lexflow_actors::pipeline::load_config(config.as_deref())?;
    if let Some(m) = mode {
        cfg.dedup.mode = serde_json::from_value(serde_json::Value::String(m.clone()))
            .map_err(|_| anyhow::anyhow!("--mode {m}: expected `exact` or `near`"))?;
    }
    if !cfg.dedup.enabled() {
        anyhow::bail!(
            "dedup.mode is `off` in this config: set [dedup] mode = \"exact\" or \"near\", or pass --mode"
        );
    }
    let report = lexflow_actors::pipeline::audit_dedup(&cfg, out.as_deref(), texts)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}
