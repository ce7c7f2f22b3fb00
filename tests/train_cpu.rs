//! Training on CPU ranks through the real trainer actors: data-parallel equivalence, learning, checkpoint
//! round-trip and resume, corrupt-checkpoint fallback.

use std::num::NonZeroUsize;
use std::path::Path;

use lexflow_actors::config::TrainConfig;
use lexflow_actors::trainer::{resume_point, spawn_trainers, TrainReport, TrainerSetup};
use lexflow_actors::types::PackedSequence;
use lexflow_dataflow::{edge, Shutdown, Topology};
use lexflow_gpu::checkpoint::read_safetensors;

const VOCAB: usize = 97;
const SEQ_LEN: usize = 16;

/// Sequence `i` of a deterministic synthetic stream: some sequences hold two documents, some end in padding, so the
/// per-rank token counts differ (which the global-count loss normalisation must handle).
#[allow(clippy::manual_is_multiple_of)] // Rust 1.85
fn sequence(i: u64) -> PackedSequence {
    let mut x = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut tokens = Vec::with_capacity(SEQ_LEN + 1);
    for _ in 0..=SEQ_LEN {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokens.push(((x >> 33) % VOCAB as u64) as u32);
    }
    let padding = (i % 4) as u32;
    for t in tokens.iter_mut().rev().take(padding as usize) {
        *t = 0;
    }
    let doc_starts = if i % 3 == 0 {
        vec![0, 5 + (i % 7) as u32]
    } else {
        vec![0]
    };
    PackedSequence {
        index: i,
        tokens,
        doc_starts,
        pieces: Vec::new(),
        padding,
        no_loss: Vec::new(),
        shard: 0,
        resume: None,
    }
}

fn train_cfg(world: usize, micro_batch: usize, steps: u64, checkpoint_every: u64) -> TrainConfig {
    let devices = vec!["\"cpu\""; world].join(", ");
    let mut c: TrainConfig = toml_cfg(&format!(
        "devices = [{devices}]\nmodel = \"tiny\"\nmicro_batch = {micro_batch}\nsteps = {steps}\nlr = 3e-3\nmin_lr = 3e-4\n\
         warmup_steps = 2\ncheckpoint_every = {checkpoint_every}\nkeep_checkpoints = 5\n"
    ));
    c.grad_accum = NonZeroUsize::new(1).unwrap();
    c
}

fn toml_cfg(text: &str) -> TrainConfig {
    // TrainConfig is only deserialised through the run config; wrap it.
    let full = format!("[run]\nname = \"t\"\ndir = \"r\"\n[train]\n{text}");
    lexflow_actors::config::Config::from_toml(&full, "test")
        .expect("valid train config")
        .train
        .expect("train")
}

/// Runs the trainers on sequences `from..to` (dealt `i % world`) and returns the report.
fn run(
    run_dir: &Path,
    cfg: TrainConfig,
    from: u64,
    to: u64,
    resume: bool,
    seqs: impl Fn(u64) -> PackedSequence + Send + 'static,
) -> TrainReport {
    let world = cfg.devices.len();
    let mut topo = Topology::new(Shutdown::new());
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..world)
        .map(|r| edge::<PackedSequence>(&format!("test->rank{r}"), NonZeroUsize::new(4).unwrap()))
        .unzip();
    let setup = TrainerSetup {
        cfg,
        run_dir: run_dir.to_path_buf(),
        vocab_size: VOCAB,
        seq_len: SEQ_LEN,
        seed: 42,
        resume,
        run_config: None,
        inputs: None,
        hf_files: Default::default(),
        eval: None,
        dedup: None,
        tee: None,
    };
    let handle = spawn_trainers(&mut topo, setup, rxs).expect("spawn trainers");
    topo.spawn("feeder", move |_ctx| {
        for i in from..to {
            if txs[(i % world as u64) as usize].send(seqs(i)).is_err() {
                break; // the trainers stopped after `steps`
            }
        }
        Ok(())
    });
    topo.join().expect("training run");
    handle.report().expect("every rank reported")
}

fn params_at(run_dir: &Path, step: u64) -> Vec<(String, lexflow_gpu::tch::Tensor)> {
    let p = run_dir.join(format!("checkpoints/step-{step:06}/model.safetensors"));
    read_safetensors(&p).expect("checkpoint weights").0
}

fn max_abs_diff(
    a: &[(String, lexflow_gpu::tch::Tensor)],
    b: &[(String, lexflow_gpu::tch::Tensor)],
) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_with_b_equal_one_rank_with_2b() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 4;
    let r1 = run(
        one.path(),
        train_cfg(1, 4, steps, 0),
        0,
        1000,
        false,
        sequence,
    );
    let r2 = run(
        two.path(),
        train_cfg(2, 2, steps, 0),
        0,
        1000,
        false,
        sequence,
    );
    assert_eq!((r1.steps, r2.steps), (steps, steps));
    for (a, b) in r1.losses.iter().zip(&r2.losses) {
        assert!(
            (a - b).abs() < 1e-5,
            "losses {:?} vs {:?}",
            r1.losses,
            r2.losses
        );
    }
    let d = max_abs_diff(&params_at(one.path(), steps), &params_at(two.path(), steps));
    eprintln!(
        "data parallel: 2 ranks × 2 vs 1 rank × 4 after {steps} steps: max |Δparam| = {d:.3e}"
    );
    assert!(d <= 1e-5, "parameters differ by {d}");
    // The check has teeth: one more step moves the weights by far more than the tolerance.
    let three = tempfile::tempdir().unwrap();
    run(
        three.path(),
        train_cfg(1, 4, steps + 1, 0),
        0,
        1000,
        false,
        sequence,
    );
    let moved = max_abs_diff(
        &params_at(one.path(), steps),
        &params_at(three.path(), steps + 1),
    );
    eprintln!("one more step moves the weights by {moved:.3e}");
    assert!(moved > 1e-4, "a step moved weights by only {moved}");
    assert_eq!(r2.data_wait_fraction.len(), 2);
    assert!(r1.tokens_per_second > 0.0);
}

#[test]
fn tiny_model_overfits_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = train_cfg(1, 4, 80, 0);
    cfg.lr = 1e-2;
    cfg.min_lr = 1e-3;
    cfg.weight_decay = 0.0;
    let r = run(dir.path(), cfg, 0, 10_000, false, |i| sequence(i % 4));
    let (first, last) = (r.losses[0], r.final_loss);
    eprintln!(
        "overfit: loss {first:.3} -> {last:.3} in {} steps, {:.0} tokens/s",
        r.steps, r.tokens_per_second
    );
    assert!(
        first > 0.8 * (VOCAB as f64).ln(),
        "initial loss {first} should be near ln V"
    );
    assert!(last < 0.1 * first, "loss only went from {first} to {last}");
}

#[test]
fn checkpoint_resume_continues_identically() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (world, mb) = (2, 2);
    let per_step = (world * mb) as u64;
    // Uninterrupted: 6 steps, checkpoints at 3 and 6.
    let full = run(
        a.path(),
        train_cfg(world, mb, 6, 3),
        0,
        1000,
        false,
        sequence,
    );
    assert_eq!(full.steps, 6);
    assert_eq!(full.checkpoints.len(), 2);
    // Interrupted: the input ends one sequence into step 4 (that partial step is discarded).
    let first = run(
        b.path(),
        train_cfg(world, mb, 6, 3),
        0,
        3 * per_step + 1,
        false,
        sequence,
    );
    assert_eq!(first.steps, 3);
    assert_eq!(
        first.losses,
        full.losses[..3].to_vec(),
        "same seed, same data ⇒ same losses"
    );
    // Round trip: the step-3 checkpoints of both runs are bit-identical.
    assert_eq!(
        max_abs_diff(&params_at(a.path(), 3), &params_at(b.path(), 3)),
        0.0
    );

    let rp = resume_point(b.path()).unwrap().expect("a checkpoint");
    assert_eq!((rp.step, rp.sequences_consumed), (3, 3 * per_step));
    // The pipeline skips the consumed sequences; emulate that.
    let second = run(
        b.path(),
        train_cfg(world, mb, 6, 3),
        rp.sequences_consumed,
        1000,
        true,
        sequence,
    );
    assert_eq!(second.resumed_from_step, Some(3));
    assert_eq!(second.steps, 6);
    assert_eq!(
        second.losses,
        full.losses[3..].to_vec(),
        "resumed losses must equal the uninterrupted run's"
    );
    assert_eq!(
        max_abs_diff(&params_at(a.path(), 6), &params_at(b.path(), 6)),
        0.0,
        "weights must be bit-exact"
    );
    let opt = |d: &Path| {
        read_safetensors(&d.join("checkpoints/step-000006/optimizer.safetensors"))
            .unwrap()
            .0
    };
    assert_eq!(
        max_abs_diff(&opt(a.path()), &opt(b.path())),
        0.0,
        "optimizer state must be bit-exact"
    );
}

#[test]
fn corrupt_checkpoint_is_detected_and_previous_one_used() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), train_cfg(1, 2, 4, 2), 0, 1000, false, sequence);
    assert_eq!(resume_point(dir.path()).unwrap().unwrap().step, 4);
    // Flip one byte in the newest weights.
    let p = dir.path().join("checkpoints/step-000004/model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let rp = resume_point(dir.path()).unwrap().expect("falls back");
    assert_eq!(rp.step, 2);
    assert!(
        rp.skipped.len() == 1 && rp.skipped[0].contains("step-000004"),
        "{:?}",
        rp.skipped
    );
    assert!(rp.skipped[0].contains("sha256"), "{:?}", rp.skipped);
    // Resuming from the fallback works and rewrites step 4.
    let r = run(
        dir.path(),
        train_cfg(1, 2, 4, 2),
        rp.sequences_consumed,
        1000,
        true,
        sequence,
    );
    assert_eq!((r.resumed_from_step, r.steps), (Some(2), 4));
    assert_eq!(resume_point(dir.path()).unwrap().unwrap().step, 4);
    // All checkpoints corrupt: an error, not a silent restart.
    for step in [2, 4] {
        std::fs::remove_file(
            dir.path()
                .join(format!("checkpoints/step-{step:06}/trainer_state.json")),
        )
        .unwrap();
    }
    assert!(resume_point(dir.path()).is_err());
}
