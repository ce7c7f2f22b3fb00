//! End-to-end preprocessing runs (no training): generated corpus and the real FORMEX corpus, determinism across thread
//! counts, exact language mix, stats.json, and clear failures.

use std::path::{Path, PathBuf};

use lexflow_actors::arrow_tee::read_sequences;
use lexflow_actors::config::Config;
use lexflow_actors::pipeline::{run, RunOptions};
use lexflow_actors::types::PackedSequence;

fn opts() -> RunOptions {
    RunOptions {
        resume: false,
        progress: false,
        origin: "test".into(),
        replay: None,
    }
}

fn base_config(dir: &Path, inputs: &[String], threads: usize, extra: &str) -> Config {
    let paths = inputs
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let t = format!(
        r#"
[run]
name = "t"
dir = {dir:?}
[input]
paths = [{paths}]
[input.generate]
acts_per_language = 6
[reader]
threads = {threads}
[tokenizer]
threads = {threads}
[packer]
seq_len = 128
mode = "best-fit"
lookahead = 8
[shards]
count = 4
ranks = 2
arrow_dir = {arrow:?}
[edges]
capacity = 2
[metrics]
enabled = false
{extra}
"#,
        dir = dir.display().to_string(),
        arrow = dir.join("arrow").display().to_string(),
    );
    Config::from_toml(&t, "test").unwrap_or_else(|e| panic!("{e}\n{t}"))
}

fn all_sequences(dir: &Path) -> Vec<PackedSequence> {
    let mut v = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("arrow"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        v.extend(read_sequences(&f).unwrap());
    }
    v.sort_by_key(|s| s.index);
    v
}

#[test]
fn generated_corpus_same_sequences_with_1_and_4_threads() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let sa = run(&base_config(a.path(), &[], 1, ""), &opts()).unwrap();
    let sb = run(&base_config(b.path(), &[], 4, ""), &opts()).unwrap();
    assert_eq!(sb.packer.sequences, sa.packer.sequences);
    assert_eq!(sa.outcome, "completed");
    let (qa, qb) = (all_sequences(a.path()), all_sequences(b.path()));
    assert!(qa.len() > 20, "too few sequences: {}", qa.len());
    assert_eq!(qa.len() as u64, sa.packer.sequences);
    assert!(
        qa == qb,
        "1 and 4 reader/tokenizer threads gave different sequences"
    );
    // Dense global indices, all routed.
    for (i, s) in qa.iter().enumerate() {
        assert_eq!(s.index, i as u64);
        assert_eq!(s.shard as u64, s.index % 4);
    }
    assert_eq!(sa.shards.per_rank.iter().sum::<u64>(), qa.len() as u64);
    // stats.json exists and agrees.
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("stats.json")).unwrap())
            .unwrap();
    assert_eq!(
        js["packer"]["sequences"].as_u64(),
        Some(sa.packer.sequences)
    );
    assert!(js["sampler"]["languages"].as_array().unwrap().len() == 5);
}

#[test]
fn realized_mix_is_within_one_document_of_target() {
    let d = tempfile::tempdir().unwrap();
    let s = run(&base_config(d.path(), &[], 1, ""), &opts()).unwrap();
    let total = s.sampler.total_tokens as f64;
    assert!(total > 0.0);
    // The stream stops when the first language runs out, so every language was live throughout.
    let seqs = all_sequences(d.path());
    let mut per_doc = std::collections::HashMap::new();
    for p in seqs.iter().flat_map(|q| &q.pieces) {
        *per_doc.entry(p.doc).or_insert(0u64) += (p.end - p.start) as u64;
    }
    let longest = per_doc.values().copied().max().unwrap_or(0) as f64;
    for l in &s.sampler.languages {
        let dev = (l.tokens as f64 - l.target_share * total).abs();
        assert!(
            dev <= longest,
            "{}: deviation {dev} tokens exceeds the longest document ({longest})",
            l.lang
        );
    }
}

#[test]
fn real_corpus_streams_end_to_end() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/formex");
    assert!(
        corpus.is_dir(),
        "the real FORMEX corpus is missing at {}",
        corpus.display()
    );
    let d = tempfile::tempdir().unwrap();
    let cfg = base_config(d.path(), &[corpus.display().to_string()], 2, "");
    let mut cfg = cfg;
    cfg.sampler.on_exhausted = lexflow_actors::config::ExhaustedPolicy::Renormalize;
    let s = run(&cfg, &opts()).unwrap();
    assert_eq!(s.outcome, "completed");
    assert!(
        s.input.files_outside_mix > 0,
        "BG/IT/PL… files are outside the default mix"
    );
    assert!(s.input.documents > 30);
    assert!(s.packer.sequences > 100);
    assert_eq!(s.input.quarantined_files, 0, "every real file parses");
}

#[test]
fn bad_tokenizer_path_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = base_config(d.path(), &[], 1, "");
    cfg.tokenizer.path = "/nonexistent/tokenizer.json".into();
    let e = format!("{:#}", run(&cfg, &opts()).unwrap_err());
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
}

#[test]
fn the_mix_counts_only_the_tokens_max_doc_tokens_keeps() {
    // Real acts run to hundreds of thousands of tokens; truncated to 1,000 each, the trained mix must still be the
    // configured one (the sampler counts what the packer keeps, not the whole document).
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/formex");
    let d = tempfile::tempdir().unwrap();
    let max_doc = 1000u64;
    let mut cfg = base_config(d.path(), &[corpus.display().to_string()], 1, "");
    cfg.sampler.mix = [("en".to_string(), 0.5), ("fr".to_string(), 0.5)].into();
    cfg.sampler.on_exhausted = lexflow_actors::config::ExhaustedPolicy::Cycle;
    cfg.packer.mode = lexflow_actors::config::PackMode::Concat;
    cfg.packer.max_doc_tokens = std::num::NonZeroUsize::new(max_doc as usize);
    cfg.run.max_sequences = Some(600);
    let s = run(&cfg, &opts()).unwrap();
    assert!(
        s.packer.truncated_documents > 10,
        "the test needs truncated documents"
    );
    let mut per_lane = [0u64; 2];
    for p in all_sequences(d.path()).iter().flat_map(|q| &q.pieces) {
        per_lane[p.doc.lane as usize] += (p.end - p.start) as u64;
    }
    let total = per_lane.iter().sum::<u64>();
    let slack = max_doc + cfg.packer.seq_len.get() as u64 + 1;
    for (lane, l) in s.sampler.languages.iter().enumerate() {
        let dev = (per_lane[lane] as f64 - l.target_share * total as f64).abs();
        assert!(
            dev <= slack as f64,
            "{}: {} of {total} trained tokens, {dev} away from its share {} (at most {slack})",
            l.lang,
            per_lane[lane],
            l.target_share
        );
    }
}
