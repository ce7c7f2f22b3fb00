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

/// `input.documents` and `input.documents_per_lang` count the same thing (documents read, read-ahead included); what
/// the sampler passed on is `sampler.languages[].documents`.
#[test]
fn documents_per_language_add_up_to_the_documents_read() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = base_config(d.path(), &[], 1, "");
    cfg.run.max_sequences = Some(6);
    let s = run(&cfg, &opts()).unwrap();
    let per_lang: u64 = s.input.documents_per_lang.values().sum();
    assert_eq!(per_lang, s.input.documents, "{:?}", s.input);
    assert_eq!(s.input.documents_per_lang.len(), 5, "every lane's language");
    let sampled: u64 = s.sampler.languages.iter().map(|l| l.documents).sum();
    assert!(
        sampled < s.input.documents,
        "the test needs read-ahead: {sampled} sampled of {}",
        s.input.documents
    );
    assert!(s.tokenizer_tokens_per_busy_second > 0.0);
    assert!(!s.paced_by_training);
}

fn tiny_train(dir: &Path, steps: u64) -> Config {
    Config::from_file(&lexflow_tests::tiny_run_config(dir, &["cpu"], 2, steps, "")).unwrap()
}

fn checkpoints_on_disk(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

/// After `--resume`, `train.checkpoints` lists the checkpoints on disk, the earlier session's included.
#[test]
fn train_checkpoints_lists_the_checkpoints_on_disk_after_a_resume() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    run(&tiny_train(&dir, 4), &opts()).unwrap(); // checkpoints at 2 and 4
    let resume = RunOptions {
        resume: true,
        ..opts()
    };
    let s = run(&tiny_train(&dir, 6), &resume).unwrap(); // writes 6; keep_checkpoints = 2 keeps 4 and 6
    let on_disk = checkpoints_on_disk(&dir);
    assert_eq!(on_disk.len(), 2, "{on_disk:?}");
    let listed: Vec<String> = s.train.as_ref().unwrap()["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, on_disk);
    assert!(s
        .summary()
        .contains(&format!("last checkpoint {}", on_disk[1])));
}

/// A run whose checkpoint cannot be written fails with that error and its stats.json says how far it got; when
/// stats.json cannot be written either, the run's error still comes first (and no temporary file is left).
#[test]
fn a_failed_run_reports_its_error_first_and_how_far_it_trained() {
    let d = tempfile::tempdir().unwrap();
    // `checkpoints` is a file: the checkpoint of step 2 fails.
    let dir = d.path().join("f");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("checkpoints"), b"not a directory").unwrap();
    let e = format!("{:#}", run(&tiny_train(&dir, 4), &opts()).unwrap_err());
    assert!(e.contains("checkpoints"), "{e}");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(st["outcome"], "failed");
    assert_eq!(st["train"]["complete"], false, "{}", st["train"]);
    assert_eq!(st["train"]["steps"], 2, "{}", st["train"]);
    assert_eq!(st["train"]["losses"].as_array().unwrap().len(), 2);

    // And stats.json cannot be written (a non-empty directory in its place).
    let dir = d.path().join("g");
    std::fs::create_dir_all(dir.join("stats.json/x")).unwrap();
    std::fs::write(dir.join("checkpoints"), b"not a directory").unwrap();
    let e = format!("{:#}", run(&tiny_train(&dir, 4), &opts()).unwrap_err());
    let (cause, stats) = (e.find("checkpoints"), e.find("stats.json"));
    assert!(
        cause.is_some() && stats.is_some() && cause < stats,
        "the run's error must come first, then the stats.json failure: {e}"
    );
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Waits until `dir`'s run trained a step (steps.jsonl has a line), then sends `signals` (`kill -<SIG>`) back to back;
/// returns the exit code and stderr.
fn signal_a_training_run(d: &Path, signals: &[&str]) -> (Option<i32>, String, PathBuf) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let name = "run";
    let dir = d.join(name);
    let cfg = lexflow_tests::tiny_run_config(&dir, &["cpu"], 1, 1_000_000, "");
    let log = d.join(format!("{name}.log"));
    let mut child = Command::new(lexflow_tests::lexflow_bin())
        .args(["run", cfg.to_str().unwrap(), "--quiet"])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::fs::metadata(dir.join("steps.jsonl")).map_or(true, |m| m.len() == 0) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if t.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("no training step");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let script: Vec<String> = signals
        .iter()
        .map(|s| format!("kill -{s} {}", child.id()))
        .collect();
    let ok = Command::new("sh")
        .args(["-c", &script.join("; ")])
        .status()
        .unwrap();
    assert!(ok.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the run did not stop after {signals:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
        dir,
    )
}

/// SIGTERM stops a run cleanly with exit code 143 (128 + 15, as for SIGINT 130), and stats.json says `interrupted`.
#[test]
fn sigterm_stops_cleanly_with_exit_code_143() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, log, dir) = signal_a_training_run(tmp.path(), &["TERM"]);
    assert_eq!(code, Some(143), "{log}");
    assert_eq!(log.matches("send again to force").count(), 1, "{log}");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(st["outcome"], "interrupted");
}

/// A second signal forces the exit, with its own exit code and its own message (not "send again to force" again).
/// The process is stopped while both arrive (two different signals: pending ones of the same kind merge), so the
/// second one is always there before the clean stop could finish.
#[test]
fn a_second_signal_forces_the_exit_with_its_own_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, log, dir) = signal_a_training_run(tmp.path(), &["STOP", "INT", "TERM", "CONT"]);
    let code = code.expect("an exit code");
    assert!(code == 130 || code == 143, "exit code {code}: {log}");
    // The first signal's message comes from another thread, which the forced exit may beat; never a second one.
    assert!(log.matches("send again to force").count() <= 1, "{log}");
    assert!(log.contains(&format!("forced exit (code {code})")), "{log}");
    assert!(
        !dir.join("stats.json").exists(),
        "a forced exit writes no stats.json"
    );
}
