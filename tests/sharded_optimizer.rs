//! `train.shard_optimizer = true` (ZeRO-2 over the CPU collectives) trains bit-identically to the replicated
//! optimizer — same batches, same loss bits, same final weights and optimizer state — and its checkpoints resume
//! sharded, replicated, or on one rank.

use std::path::Path;
use std::process::Command;

use lexflow_actors::trainer::read_step_records;
use lexflow_gpu::read_optimizer_state;
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
    // The optimizer state, whether one file (replicated) or one part per rank (sharded), in the global layout.
    let state = |d: &Path| {
        let (t, mut m) = read_optimizer_state(&checkpoint_file(d, steps, "")).unwrap();
        m.remove("format");
        (t, m)
    };
    let ((go, gm), (wo, wm)) = (state(got), state(want));
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

const FULL: &str = "min_lr = 1e-3\nshard = \"full\"";

/// `train.shard = "full"` (ZeRO-3 over the CPU collectives) trains bit-identically to the replicated run — with and
/// without recomputation, on 2 and 4 ranks — and its checkpoints resume at another world size (2→1, 1→2, 4→2) or
/// in another mode, continuing the uninterrupted run's loss curve exactly.
#[test]
fn full_sharding_trains_and_reshards_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 8;
    let two = ["cpu", "cpu"];
    let rep = tmp.path().join("replicated");
    run(&tiny_run_config(&rep, &two, 2, steps, REPL), false);

    let full = tmp.path().join("full");
    let log = run(&tiny_run_config(&full, &two, 2, steps, FULL), false);
    assert!(
        log.contains("weights, gradients and AdamW state sharded across ranks"),
        "the trainer must say it shards the weights:\n{log}"
    );
    assert_same_run(&full, &rep, steps, "full vs replicated");

    // CPU optimizer offload: the same bits (on a CPU device the host is the device; the master is a copy).
    let off = tmp.path().join("offload");
    let log = run(
        &tiny_run_config(
            &off,
            &two,
            2,
            steps,
            &format!("{FULL}\noffload_optimizer = true"),
        ),
        false,
    );
    assert!(
        log.contains("offloaded to host memory"),
        "the trainer must say it offloads:\n{log}"
    );
    assert_same_run(&off, &rep, steps, "full + offload vs replicated");

    // Recomputation on: the same steps as a replicated run with recomputation.
    let rep_rc = tmp.path().join("replicated-recompute");
    run(
        &tiny_run_config(
            &rep_rc,
            &two,
            2,
            steps,
            &format!("{REPL}\nrecompute = true"),
        ),
        false,
    );
    let full_rc = tmp.path().join("full-recompute");
    run(
        &tiny_run_config(
            &full_rc,
            &two,
            2,
            steps,
            &format!("{FULL}\nrecompute = true"),
        ),
        false,
    );
    assert_same_run(
        &full_rc,
        &rep_rc,
        steps,
        "full vs replicated, recomputation on",
    );

    // Cut after 4 steps and resume fully sharded; then the same checkpoint replicated.
    let cut = tmp.path().join("cut");
    run(&tiny_run_config(&cut, &two, 2, 4, FULL), false);
    run(&tiny_run_config(&cut, &two, 2, steps, FULL), true);
    assert_same_run(&cut, &rep, steps, "full, cut and resumed");
    let cross = tmp.path().join("cross");
    run(&tiny_run_config(&cross, &two, 2, 4, FULL), false);
    run(&tiny_run_config(&cross, &two, 2, steps, SHARD), true);
    assert_same_run(&cross, &rep, steps, "full then ZeRO-2");

    // Resharding: 2 ranks → 1 rank with the same global batch (2 × 2 = 1 × 4), and 1 → 2. The loss curve of the
    // resumed run continues the uninterrupted one (same batches, same optimizer state; the sums over ranks
    // happen in another order, so the losses agree to rounding, not to the bit).
    let one = ["cpu"];
    let rep1 = tmp.path().join("replicated-1");
    run(&tiny_run_config(&rep1, &one, 4, steps, REPL), false);
    let down = tmp.path().join("down");
    run(&tiny_run_config(&down, &two, 2, 4, FULL), false);
    run(&tiny_run_config(&down, &one, 4, steps, FULL), true);
    assert_close_curves(&down, &rep, steps, "full, 2 ranks then 1");
    let up = tmp.path().join("up");
    run(&tiny_run_config(&up, &one, 4, 4, FULL), false);
    run(&tiny_run_config(&up, &two, 2, steps, FULL), true);
    assert_close_curves(&up, &rep1, steps, "full, 1 rank then 2");
}

/// Four ranks, fully sharded, against four replicated ranks; then 4 → 2 ranks.
#[test]
fn full_sharding_on_four_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 6;
    let four = ["cpu", "cpu", "cpu", "cpu"];
    let rep = tmp.path().join("replicated");
    run(&tiny_run_config(&rep, &four, 1, steps, REPL), false);
    let full = tmp.path().join("full");
    run(&tiny_run_config(&full, &four, 1, steps, FULL), false);
    assert_same_run(&full, &rep, steps, "full vs replicated, 4 ranks");
    let down = tmp.path().join("down");
    run(&tiny_run_config(&down, &four, 1, 2, FULL), false);
    run(
        &tiny_run_config(&down, &["cpu", "cpu"], 2, steps, FULL),
        true,
    );
    assert_close_curves(&down, &rep, steps, "full, 4 ranks then 2");
}

/// The global loss of every step, as rank 0 recorded it.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    let mut v: Vec<(u64, f64)> = read_step_records(dir)
        .into_iter()
        .filter(|((_, r), _)| *r == 0)
        .map(|((s, _), rec)| (s, rec.loss))
        .collect();
    v.sort_by_key(|x| x.0);
    v
}

/// Same global batches at every step and the same loss curve to fp32 rounding (the runs differ in world size, so
/// the cross-rank sums associate differently).
fn assert_close_curves(got: &Path, want: &Path, steps: u64, what: &str) {
    let (g, w) = (losses(got), losses(want));
    assert_eq!(g.len(), steps as usize, "{what}: steps recorded: {g:?}");
    assert_eq!(
        g.iter().map(|x| x.0).collect::<Vec<_>>(),
        w.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    let batch = |d: &Path| {
        let mut b: Vec<(u64, Vec<u64>)> = read_step_records(d)
            .into_iter()
            .map(|((s, _), r)| (s, r.sequences.iter().map(|q| q.0).collect::<Vec<_>>()))
            .fold(std::collections::BTreeMap::new(), |mut m, (s, q)| {
                m.entry(s).or_insert_with(Vec::new).extend(q);
                m
            })
            .into_iter()
            .collect();
        for (_, q) in b.iter_mut() {
            q.sort_unstable();
        }
        b
    };
    assert_eq!(batch(got), batch(want), "{what}: global batches");
    for ((s, a), (_, b)) in g.iter().zip(&w) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{what}: step {s}: loss {a} vs {b}"
        );
    }
}
