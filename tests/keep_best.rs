//! `train.keep_best`: the best checkpoint by an evaluation metric is never pruned, `run.dir/best` points to it,
//! `stats.json` names it, and `lexflow generate --best` uses it. A run trains 6 steps, then resumes with a learning
//! rate that wrecks the model: the held-out loss rises, `keep_checkpoints = 2` keeps only the two newest
//! checkpoints, and the best one (from the first part) must survive.

use std::path::Path;
use std::process::Command;

use lexflow_tests::{lexflow_bin, tiny_run_config};
use serde_json::Value;

fn run(cfg: &Path, resume: bool) {
    let mut c = Command::new(lexflow_bin());
    c.arg("run").arg(cfg).arg("--quiet");
    if resume {
        c.arg("--resume");
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{}:\n{}",
        cfg.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn steps_on_disk(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_prefix("step-").and_then(|s| s.parse().ok())
        })
        .collect();
    v.sort_unstable();
    v
}

const EVAL: &str =
    "keep_best = \"heldout_loss\"\n[eval]\nholdout = 0.25\nevery = 2\nmax_sequences = 2";

#[test]
fn the_best_checkpoint_is_never_pruned_and_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("best");
    let cfg = tiny_run_config(&dir, &["cpu"], 2, 6, &format!("min_lr = 1e-3\n{EVAL}"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("lr = 1e-3", "lr = 5e-2")).unwrap();
    run(&cfg, false);
    // Resume with a learning rate 200 times higher: the weights are thrown around, the held-out loss goes up.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 6", "steps = 12")
        .replace("lr = 5e-2", "lr = 10.0");
    std::fs::write(&cfg, text).unwrap();
    run(&cfg, true);

    // The best step, from the evaluations themselves (every checkpoint step is evaluated).
    let evals: Vec<Value> = std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scored: Vec<(u64, f64)> = evals
        .iter()
        .map(|e| (e["step"].as_u64().unwrap(), e["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        scored.iter().map(|x| x.0).collect::<Vec<_>>(),
        [2, 4, 6, 8, 10, 12]
    );
    eprintln!("held-out losses: {scored:?}");
    let (best_step, best_loss) = scored
        .iter()
        .copied()
        .reduce(|a, b| if b.1 < a.1 { b } else { a })
        .unwrap();
    assert!(
        best_step <= 6,
        "the premise: the wrecked second part must not improve on the first ({scored:?})"
    );
    // Kept: the two newest and the best; `best` points to it; stats.json names it.
    assert_eq!(steps_on_disk(&dir), [best_step, 10, 12], "{scored:?}");
    let link = std::fs::read_link(dir.join("best")).unwrap();
    assert_eq!(link, Path::new(&format!("checkpoints/step-{best_step:06}")));
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    let b = &stats["train"]["best"];
    assert_eq!(b["step"], best_step, "{b}");
    assert_eq!(b["metric"], "heldout_loss");
    assert_eq!(b["value"].as_f64().unwrap().to_bits(), best_loss.to_bits());
    // The checkpoints after it carry it in their trainer state (a later resume keeps protecting it).
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("checkpoints/step-000012/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["best"]["step"], best_step);

    // `generate --best` decodes with it; without keep_best there is nothing to pick, said so.
    let g = |args: &[&str]| {
        Command::new(lexflow_bin())
            .arg("generate")
            .args(args)
            .args(["--prompt", "Article 1", "--max-new-tokens", "2"])
            .output()
            .unwrap()
    };
    let o = g(&[dir.to_str().unwrap(), "--best"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plain = tmp.path().join("plain");
    run(&tiny_run_config(&plain, &["cpu"], 2, 2, ""), false);
    let o = g(&[plain.to_str().unwrap(), "--best"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("no best checkpoint")
            && err.contains("train.keep_best"),
        "{err}"
    );
}
