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
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lexflow: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
