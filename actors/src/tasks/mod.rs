//! Instruction data and evaluation: building Q&A pairs with citations, scoring answers, decoding with a checkpoint
//! (`lexflow generate`, `lexflow qa eval`), and the held-out evaluation set with the aggregation of its losses.
//! Used by the trainer's evaluation hook and by the CLI; never imports the run or the trainer.

pub mod decode;
pub mod eval;
pub mod generate;
pub mod heldout;
pub mod qa;
