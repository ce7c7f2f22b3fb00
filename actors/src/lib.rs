//! # lexflow-actors
//!
//! The concrete actors of lexflow, the trainer, the run that wires them from a [`config::Config`], the Q&A and
//! evaluation tasks, and the `lexflow` binary (`main.rs`). Folders by role, in the order data flows:
//!
//! ```text
//! types, common → stages (reader pool per language lane → tokenizer pool → language sampler → packer → shard writer)
//!              → config → tasks (Q&A, scoring, decoding, held-out set) → train (trainer ranks) → run (composition root)
//! ```
//!
//! Each folder imports only from those before it. Every arrow of the dataflow is a bounded `lexflow_dataflow` edge;
//! see `ARCHITECTURE.md`.

pub mod common;
pub mod config;
pub mod run;
pub mod stages;
pub mod tasks;
pub mod train;
pub mod types;

// The module paths from before the actors were grouped by role (`lexflow_actors::reader`, …), kept for the
// integration tests, the examples and code that names them.
pub use run::{inputs, pipeline, replay, stats};
pub use stages::{
    arrow_tee, dedup, formex, gen_sample, packer, reader, sampler, shard_writer, tokenizer,
};
pub use tasks::{eval, generate, heldout, qa};
pub use train as trainer;

/// An error and its causes on one line, as `{:#}` prints them, but without a cause whose text is already in the line:
/// several error types put their `io::Error` in their own message and also expose it as their source, which `{:#}`
/// would print twice ("…: No such file or directory (os error 2): No such file or directory (os error 2)").
pub fn error_line(e: &anyhow::Error) -> String {
    lexflow_dataflow::error_chain(e.as_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_line_says_each_cause_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::from(lexflow_gpu::GpuError::Io {
            path: "/no/ckpt/config.json".into(),
            source: io(),
        })
        .context("train.init_from");
        let doubled = format!("{e:#}");
        let once = super::error_line(&e);
        let n = |s: &str| s.matches(&io().to_string()).count();
        assert_eq!(n(&doubled), 2, "{doubled}");
        assert_eq!(n(&once), 1, "{once}");
        assert!(
            once.starts_with("train.init_from: /no/ckpt/config.json: "),
            "{once}"
        );
        // Causes that add something are kept.
        let e = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(super::error_line(&e), "outer: inner cause");
    }
}
