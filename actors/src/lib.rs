//! # lexflow-actors
//!
//! The concrete actors of lexflow, one file each, and the pipeline that wires them from a [`config::Config`]:
//!
//! ```text
//! reader pool (per language lane) → tokenizer pool (per lane) → language sampler → packer → shard writer → trainer ranks
//! ```
//!
//! Every arrow is a bounded `lexflow_dataflow` edge; see `ARCHITECTURE.md`.

pub mod arrow_tee;
pub mod config;
pub mod dedup;
pub mod eval;
pub mod formex;
pub mod gen_sample;
pub mod generate;
pub mod heldout;
pub mod packer;
pub mod pipeline;
pub mod qa;
pub mod reader;
pub mod replay;
pub mod sampler;
pub mod shard_writer;
pub mod stats;
pub mod tokenizer;
pub mod trainer;
pub mod types;
