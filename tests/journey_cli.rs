//! The commands a user runs after a training run, as the README and `docs/RESUME.md` describe them: `lexflow replay`
//! given the run directory, and the listing commands (`lexflow evals`) piped into a reader that stops early.

use std::process::{Command, Stdio};

use lexflow_tests::{json_lines_of, lexflow_bin, tiny_run_config};

/// `(step, rank) → [(index, hash)]` of a run's `steps.jsonl`, or of replayed sequences.
fn batches(
    records: impl IntoIterator<Item = serde_json::Value>,
    from_steps_jsonl: bool,
) -> std::collections::BTreeMap<(u64, u64), Vec<(u64, String)>> {
    let mut m = std::collections::BTreeMap::<(u64, u64), Vec<(u64, String)>>::new();
    for r in records {
        let key = (r["step"].as_u64().unwrap(), r["rank"].as_u64().unwrap());
        if from_steps_jsonl {
            let seqs = r["sequences"].as_array().unwrap();
            m.insert(
                key,
                seqs.iter()
                    .map(|s| (s[0].as_u64().unwrap(), s[1].as_str().unwrap().to_string()))
                    .collect(),
            );
        } else {
            m.entry(key).or_default().push((
                r["index"].as_u64().unwrap(),
                r["hash"].as_str().unwrap().to_string(),
            ));
        }
    }
    m
}

#[test]
fn replay_takes_the_run_directory_as_it_takes_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = tiny_run_config(&run, &["cpu"], 2, 4, "");
    let o = Command::new(lexflow_bin())
        .args(["run", "--quiet"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trained = batches(
        std::fs::read_to_string(run.join("steps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap()),
        true,
    );
    assert_eq!(trained.len(), 4, "{trained:?}");
    let replay = |target: &std::path::Path| {
        let o = Command::new(lexflow_bin())
            .arg("replay")
            .arg(target)
            .args(["--steps", "1..5"])
            .output()
            .unwrap();
        batches(json_lines_of(&o), false)
    };
    // A run directory stands for its newest checkpoint; the replay starts before step 1 either way.
    let from_dir = replay(&run);
    assert_eq!(from_dir, trained);
    assert_eq!(replay(&run.join("checkpoints/step-000004")), trained);

    // Neither a checkpoint nor a run: the error says what to pass, not that a manifest is missing.
    let o = Command::new(lexflow_bin())
        .arg("replay")
        .arg(tmp.path())
        .args(["--steps", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("neither a checkpoint") && err.contains("run directory"),
        "{err}"
    );
}

#[test]
fn listing_into_a_reader_that_stops_early_is_not_a_panic() {
    // `lexflow evals RUN --json | head -1`: more output than a pipe holds, and the reader gone before it is written.
    let tmp = tempfile::tempdir().unwrap();
    let line = r#"{"step":STEP,"loss":2.5,"tokens":100,"seconds":0.1,"languages":{"en":{"loss":2.5,"perplexity":12.18,"tokens":100,"sequences":1}}}"#;
    let text: String = (1..=2000)
        .map(|s| line.replace("STEP", &s.to_string()) + "\n")
        .collect();
    std::fs::write(tmp.path().join("eval.jsonl"), text).unwrap();
    for args in [vec!["--json"], vec![]] {
        let mut child = Command::new(lexflow_bin())
            .arg("evals")
            .arg(tmp.path())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !err.contains("panicked"),
            "lexflow evals {args:?} into a closed pipe: {:?}\n{err}",
            o.status
        );
    }
}
