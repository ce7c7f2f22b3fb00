//! The dataflow stages, in the order data flows: the sample-corpus source, the FORMEX reader (+ its parser), dedup, the quality filter,
//! the tokenizer, the language sampler, the packer, the shard writer and its Arrow tee. Each file holds one actor's
//! state, its loop and its tests; a stage never imports the run (`crate::run`) or the trainer (`crate::train`).

pub mod arrow_tee;
pub mod dedup;
pub mod filter;
pub mod formex;
pub mod gen_sample;
pub mod packer;
pub mod qa_format;
pub mod reader;
pub mod sampler;
pub mod shard_writer;
pub mod tokenize;
pub mod tokenizer;
