//! One run: the composition root that wires lanes → stages → trainers (`pipeline`), and what a run needs around it.
//!
//! | file | what |
//! |---|---|
//! | `pipeline.rs` | the composition root: config → topology of actors and edges → run → statistics |
//! | `resume.rs` | what a resume checks: the stream keys of `run_config.toml`, the input files of `inputs.json` |
//! | `lanes.rs` | the input files by language lane |
//! | `inputs.rs` | the input files a checkpoint records (`inputs.json`) and the comparison a resume makes |
//! | `dedup.rs` | `[dedup]` in a run: the index, the `dedup.<lang>` actor, `lexflow dedup` |
//! | `filter.rs` | `[filter]` in a run: the first pass and its cuts, the `filter.<lang>` actor, `lexflow filter` |
//! | `heldout.rs` | the held-out set of a run (`[eval]`) |
//! | `progress.rs` | counters, the progress bar / log line, the evaluation gauges |
//! | `stats.rs` | `stats.json` and the summary |
//! | `signals.rs` | exit codes of a run stopped by a signal, the forced exit on a second one |
//! | `replay.rs` | `lexflow replay`, `lexflow provenance`: a run's stream regenerated from a checkpoint |
//! | `cli.rs` | `lexflow run`, `config`, `heldout`, `dedup`, `filter`; logging |

pub mod cli;
pub mod dedup;
pub mod filter;
pub mod heldout;
pub mod inputs;
pub mod lanes;
pub mod pipeline;
mod progress;
pub mod replay;
pub mod resume;
mod signals;
pub mod stats;
