//! `train.shard_optimizer = true` (ZeRO-2 over the CPU collectives) trains bit-identically to the replicated
//! optimizer — same batches, same loss bits, same final weights and optimizer state — and its checkpoints resume
//! sharded, replicated, or on one rank.

use std::path::Path;
use std::process::Command;

use lexflow_actors::trainer::read_step_records;
use lexflow_gpu::checkpoint::read_safetensors;
use lexflow_tests::{lexflow_bin, tiny_run_config};

/// A constant learning rate after warmup (`min_lr = lr`), so a run cut at step 4 of a 4-step config and resumed
/// with an 8-step config follows the same schedule as an uninterrupted 8-step run.
const REPL: &str = "min_lr = 1e-3";
const SHARD: &str = "min_lr = 1e-3\nshard_optimizer = true";

fn run(cfg: &Path, resume: bool) -> String {
    let mut c = Command::new(lexflow_bin());
    c.arg("run").arg(cfg);
    if resume {
        c.arg("--resume");
    }
    let out = c.output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{} failed:\n{log}", cfg.display());
    log
}

fn checkpoint_file(dir: &Path, step: u64, name: &str) -> std::path::PathBuf {
    dir.join(format!("checkpoints/step-{step:06}/{name}"))
}

/// Same step records (batches and loss bits) and the same final model and optimizer state.
fn assert_same_run(got: &Path, want: &Path, steps: u64, what: &str) {
    let (g, w) = (read_step_records(got), read_step_records(want));
    assert_eq!(g.len(), w.len(), "{what}: steps recorded");
    for (k, wr) in &w {
        let gr = &g[k];
        assert_eq!(
            gr.sequences, wr.sequences,
            "{what}: step {} rank {}: batch",
            k.0, k.1
        );
        assert_eq!(
            gr.loss.to_bits(),
            wr.loss.to_bits(),
            "{what}: step {} rank {}: loss {} vs {}",
            k.0,
            k.1,
            gr.loss,
            wr.loss
        );
    }
    let model = |d: &Path| std::fs::read(checkpoint_file(d, steps, "model.safetensors")).unwrap();
    assert!(model(got) == model(want), "{what}: final weights differ");
    let (go, gm) = read_safetensors(&checkpoint_file(got, steps, "optimizer.safetensors")).unwrap();
    let (wo, wm) =
        read_safetensors(&checkpoint_file(want, steps, "optimizer.safetensors")).unwrap();
    assert_eq!(gm, wm, "{what}: optimizer metadata");
    assert_eq!(go.len(), 3);
    for ((gn, gt), (wn, wt)) in go.iter().zip(&wo) {
        assert!(gn == wn && gt.equal(wt), "{what}: optimizer {gn} differs");
    }
}

#[test]
fn sharded_optimizer_trains_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 8;
    let two = ["cpu", "cpu"];
    let rep = tmp.path().join("replicated");
    run(&tiny_run_config(&rep, &two, 2, steps, REPL), false);

    let sh = tmp.path().join("sharded");
    let log = run(&tiny_run_config(&sh, &two, 2, steps, SHARD), false);
    assert!(
        log.contains("sharded across ranks"),
        "the trainer must say it shards:\n{log}"
    );
    assert_same_run(&sh, &rep, steps, "sharded vs replicated");

    // Cut after 4 steps and resume, sharded both times.
    let cut = tmp.path().join("cut");
    run(&tiny_run_config(&cut, &two, 2, 4, SHARD), false);
    run(&tiny_run_config(&cut, &two, 2, steps, SHARD), true);
    assert_same_run(&cut, &rep, steps, "sharded, cut and resumed");

    // A sharded checkpoint resumed by a replicated run (and the reverse).
    let cross = tmp.path().join("cross");
    run(&tiny_run_config(&cross, &two, 2, 4, SHARD), false);
    run(&tiny_run_config(&cross, &two, 2, steps, REPL), true);
    assert_same_run(&cross, &rep, steps, "sharded then replicated");
    let back = tmp.path().join("back");
    run(&tiny_run_config(&back, &two, 2, 4, REPL), false);
    run(&tiny_run_config(&back, &two, 2, steps, SHARD), true);
    assert_same_run(&back, &rep, steps, "replicated then sharded");

    // Elastic: the sharded 2-rank checkpoint on one rank with the same global batch.
    let one = tmp.path().join("one");
    run(&tiny_run_config(&one, &two, 2, 4, SHARD), false);
    let log = run(&tiny_run_config(&one, &["cpu"], 4, steps, SHARD), true);
    let recs = read_step_records(&one);
    assert!(
        recs.keys().any(|&(s, r)| s == steps && r == 0)
            && !recs.keys().any(|&(s, r)| s > 4 && r == 1),
        "one rank must finish the run:\n{log}"
    );
}
