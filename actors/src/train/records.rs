//! Step records: `steps.jsonl`, one line per rank and step with the loss and the global index and hash of every
//! sequence the rank trained on (what `lexflow replay` and `provenance` check against), and the JSON-lines appends
//! the trainer writes.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Per-step record of what every rank trained on (one JSON object per rank and step).
pub const STEPS_FILE: &str = "steps.jsonl";

/// One line of `steps.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub rank: usize,
    pub loss: f64,
    /// `(global index, sha256 prefix of the tokens)` of each sequence this rank trained on in this step.
    pub sequences: Vec<(u64, String)>,
}

pub fn sequence_hash(tokens: &[u32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// Reads `steps.jsonl`, keeping the last record of each (step, rank): after a crash and resume, redone steps are
/// written again. Torn last lines (kill -9 mid-write) are ignored.
pub fn read_step_records(run_dir: &Path) -> std::collections::BTreeMap<(u64, usize), StepRecord> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(run_dir.join(STEPS_FILE)) {
        for line in text.lines() {
            if let Ok(r) = serde_json::from_str::<StepRecord>(line) {
                out.insert((r.step, r.rank), r);
            }
        }
    }
    out
}

pub(super) fn append_step_record(run_dir: &Path, rec: &StepRecord) {
    append_json_line(
        &run_dir.join(STEPS_FILE),
        &serde_json::to_string(rec).expect("step record is JSON"),
    );
}

/// Appends one line with one write(2) on an O_APPEND file: lines of different ranks never interleave.
pub(super) fn append_json_line(path: &Path, json: &str) {
    use std::io::Write;
    let line = format!("{json}\n");
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = r {
        tracing::warn!("cannot append to {}: {e}", path.display());
    }
}
