//! One process per rank, launched the torchrun way (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`): two `lexflow run` processes on loopback train exactly what one process with two in-process ranks
//! trains — the same sequences on each rank, bit-identical losses and final weights — and a process that dies or
//! stops answering takes its peer down with an error naming it instead of a hang.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lexflow_actors::trainer::read_step_records;
use lexflow_tests::lexflow_bin;

fn config(dir: &Path, devices: &[&str], steps: u64) -> PathBuf {
    config_with(dir, devices, steps, steps, "", "")
}

/// `run_extra`: more `[run]` lines (e.g. `max_sequences = 16`); `train_extra`: more `[train]` lines.
fn config_with(
    dir: &Path,
    devices: &[&str],
    steps: u64,
    checkpoint_every: u64,
    run_extra: &str,
    train_extra: &str,
) -> PathBuf {
    let devices = devices
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[run]
name = "multi"
dir = {dir:?}
seed = 9
{run_extra}
[input.generate]
acts_per_language = 6
[packer]
seq_len = 64
mode = "best-fit"
lookahead = 8
[shards]
count = 4
[edges]
capacity = 2
[dedup]
mode = "near"
[train]
devices = [{devices}]
model = "tiny"
micro_batch = 2
grad_accum = 2
steps = {steps}
lr = 1e-3
warmup_steps = 2
checkpoint_every = {checkpoint_every}
{train_extra}
[metrics]
enabled = false
"#,
        dir = dir.display().to_string()
    );
    let p = dir.with_extension("toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(cfg: &Path, env: &[(&str, String)], log: &Path) -> Child {
    spawn_args(cfg, &[], env, log)
}

fn spawn_args(cfg: &Path, args: &[&str], env: &[(&str, String)], log: &Path) -> Child {
    let mut c = Command::new(lexflow_bin());
    c.arg("run")
        .arg(cfg)
        .args(args)
        .arg("--quiet")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn wait(mut c: Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            panic!("a lexflow process did not finish within {limit:?} (hang?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rank_env(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("LEXFLOW_RENDEZVOUS_TIMEOUT_S", "60".into()),
    ]
}

/// Starts ranks 0 and 1 as two processes on `cfg` and requires both to succeed.
fn run_two_ranks(cfg: &Path, args: &[&str], port: u16, logs: &[PathBuf], what: &str) {
    let kids: Vec<Child> = (0..2)
        .map(|r| spawn_args(cfg, args, &rank_env(r, 2, port), &logs[r]))
        .collect();
    for (r, k) in kids.into_iter().enumerate() {
        let st = wait(k, Duration::from_secs(300));
        assert!(
            st.success(),
            "rank {r} ({what}) failed: {}",
            std::fs::read_to_string(&logs[r]).unwrap_or_default()
        );
    }
}

#[test]
fn two_processes_train_exactly_what_two_in_process_ranks_train() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 4;
    // Both evaluate a held-out corpus of their own every 2 steps (eval.paths: the training data is unchanged).
    let heldout = tmp.path().join("heldout");
    let g = Command::new(lexflow_bin())
        .args([
            "gen-sample",
            heldout.to_str().unwrap(),
            "--acts-per-language",
            "2",
            "--seed",
            "3",
        ])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let eval = format!(
        "[eval]\npaths = [{:?}]\nevery = 2\nmax_sequences = 3",
        heldout.display().to_string()
    );
    // Reference: one process, two CPU ranks (threads), in-process collective.
    let a_dir = tmp.path().join("inproc");
    let a_cfg = config_with(&a_dir, &["cpu", "cpu"], steps, steps, "", &eval);
    let a = spawn(&a_cfg, &[], &tmp.path().join("inproc.log"));
    assert!(
        wait(a, Duration::from_secs(300)).success(),
        "in-process run failed: {}",
        std::fs::read_to_string(tmp.path().join("inproc.log")).unwrap_or_default()
    );

    // Two processes, one rank each, sharing the run directory (as on a shared filesystem).
    let b_dir = tmp.path().join("procs");
    let b_cfg = config_with(&b_dir, &["cpu"], steps, steps, "", &eval);
    let port = free_port();
    let logs: Vec<PathBuf> = (0..2)
        .map(|r| tmp.path().join(format!("rank{r}.log")))
        .collect();
    run_two_ranks(&b_cfg, &[], port, &logs, "run");

    let w = |d: &Path| {
        std::fs::read(d.join(format!("checkpoints/step-{steps:06}/model.safetensors"))).unwrap()
    };
    let ra = read_step_records(&a_dir);
    let rb = read_step_records(&b_dir);
    assert_eq!(ra.len(), (steps * 2) as usize, "in-process records");
    assert_eq!(
        ra.keys().collect::<Vec<_>>(),
        rb.keys().collect::<Vec<_>>(),
        "the same (step, rank) records"
    );
    for (k, x) in &ra {
        let y = &rb[k];
        assert_eq!(
            x.sequences, y.sequences,
            "step {} rank {}: different sequences",
            k.0, k.1
        );
        assert_eq!(
            x.loss.to_bits(),
            y.loss.to_bits(),
            "step {} rank {}: loss {} vs {}",
            k.0,
            k.1,
            x.loss,
            y.loss
        );
    }
    // The held-out evaluations (losses gathered over TCP between the processes) equal the in-process ones, bit for bit.
    let evals = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v
            })
            .collect()
    };
    let (ea, eb) = (evals(&a_dir), evals(&b_dir));
    assert_eq!(ea.len(), 2, "evaluations at steps 2 and 4: {ea:?}");
    assert_eq!(
        ea, eb,
        "held-out evaluations differ between in-process and two-process ranks"
    );
    // Resumed: the two processes stop after step 2 (the stream is cut at 16 sequences), then resume from the step-2
    // checkpoint and train steps 3-4: the same records as the uninterrupted in-process run.
    let c_dir = tmp.path().join("resumed");
    let first = config_with(&c_dir, &["cpu"], steps, 2, "max_sequences = 16", "");
    let port = free_port();
    run_two_ranks(&first, &[], port, &logs, "first part");
    assert_eq!(
        read_step_records(&c_dir).len(),
        4,
        "two steps x two ranks before the cut"
    );
    let second = config_with(&c_dir, &["cpu"], steps, 2, "", "");
    let port = free_port();
    run_two_ranks(&second, &["--resume"], port, &logs, "resumed");
    for stats in ["stats.json", "stats.rank1.json"] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c_dir.join(stats)).unwrap()).unwrap();
        assert_eq!(
            v["train"]["resumed_from_step"], 2,
            "{stats}: did not resume from step 2"
        );
        assert_eq!(v["train"]["steps"], 4, "{stats}");
    }
    let rc = read_step_records(&c_dir);
    assert_eq!(
        rc.len(),
        ra.len(),
        "steps 1-4 on both ranks after the resume"
    );
    for (k, x) in &ra {
        let y = &rc[k];
        assert_eq!(
            x.sequences, y.sequences,
            "resumed: step {} rank {}: different sequences",
            k.0, k.1
        );
        assert_eq!(
            x.loss.to_bits(),
            y.loss.to_bits(),
            "resumed: step {} rank {}",
            k.0,
            k.1
        );
    }
    assert!(w(&a_dir) == w(&c_dir), "resumed final weights differ");

    // Two processes with the AdamW state sharded across them (ZeRO-2: reduce-scatter / all-gather over TCP, rank 1
    // sends its slices into rank 0's checkpoint), and with everything sharded (ZeRO-3: each block all-gathered for
    // its forward and backward, its gradient reduce-scattered). Both reduce each micro-batch (`grad_accum = 2`), so
    // they take the same steps bit for bit; the replicated run sums the two micro-batches before its one all-reduce,
    // which rounds differently: the same first loss, the later ones to fp32 rounding.
    let sharded_run = |name: &str, extra: &str| {
        let dir = tmp.path().join(name);
        let cfg = config_with(&dir, &["cpu"], steps, steps, "", extra);
        run_two_ranks(&cfg, &[], free_port(), &logs, name);
        let r = read_step_records(&dir);
        assert_eq!(r.len(), ra.len(), "{name}: records");
        for (k, x) in &ra {
            let (a, b) = (x.loss, r[k].loss);
            assert!(
                (a - b).abs() <= 1e-6 * a.abs(),
                "{name}: step {} rank {}: {a} vs {b}",
                k.0,
                k.1
            );
            assert_eq!(
                x.sequences, r[k].sequences,
                "{name}: step {} rank {}",
                k.0, k.1
            );
        }
        assert_eq!(
            ra[&(1, 0)].loss.to_bits(),
            r[&(1, 0)].loss.to_bits(),
            "{name}: first loss"
        );
        (dir, r)
    };
    let (d_dir, rd) = sharded_run("zero2", "shard = \"optimizer\"");
    let (f_dir, rf) = sharded_run("zero3", "shard = \"full\"");
    for (k, x) in &rd {
        assert_eq!(
            x.loss.to_bits(),
            rf[k].loss.to_bits(),
            "full vs optimizer sharding: step {} rank {}",
            k.0,
            k.1
        );
    }
    assert!(
        w(&d_dir) == w(&f_dir),
        "full vs optimizer sharding: final weights differ"
    );

    // Rank 1 saw other sequences than rank 0 (data parallelism, not two copies of one stream).
    assert_ne!(ra[&(1, 0)].sequences, ra[&(1, 1)].sequences);
    assert!(w(&a_dir) == w(&b_dir), "final weights differ");
    // Each process wrote its own stats; the rank-1 process skipped rank 0's sequences.
    let s1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b_dir.join("stats.rank1.json")).unwrap())
            .unwrap();
    assert!(s1["shards"]["sequences_other_processes"].as_u64().unwrap() >= steps * 4);
    // Every process deduplicates the whole stream itself (`[dedup]`), reporting and logging under its own rank.
    assert_eq!(s1["dedup"]["mode"], "near", "{}", s1["dedup"]);
    assert!(s1["dedup"]["per_lang"]["en"]["kept"].as_u64().unwrap() > 0);
    assert!(b_dir.join("dedup.rank1.jsonl").exists() && b_dir.join("dedup.jsonl").exists());
}

#[test]
fn a_dead_rank_stops_its_peer_with_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("procs");
    let cfg = config(&dir, &["cpu"], 200);
    let port = free_port();
    let log0 = tmp.path().join("rank0.log");
    let r0 = spawn(&cfg, &rank_env(0, 2, port), &log0);
    let mut r1 = spawn(&cfg, &rank_env(1, 2, port), &tmp.path().join("rank1.log"));
    // Let them rendezvous and train a little, then kill rank 1 the hard way.
    let t = Instant::now();
    while read_step_records(&dir).len() < 4 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        read_step_records(&dir).len() >= 4,
        "no training steps within 120 s"
    );
    r1.kill().unwrap();
    let _ = r1.wait();
    let st = wait(r0, Duration::from_secs(120));
    assert!(!st.success(), "rank 0 should fail when rank 1 is gone");
    let log = std::fs::read_to_string(&log0).unwrap();
    assert!(
        log.contains("rank 1 closed its connection"),
        "rank 0's log: {log}"
    );
}

/// A rank that stops answering (`SIGSTOP`: hung, not dead, so its sockets stay open) stops its peer after the
/// collective timeout with an error naming it, instead of a hang.
#[test]
fn a_stopped_rank_stops_its_peer_after_the_collective_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("procs");
    let cfg = config(&dir, &["cpu"], 200);
    let port = free_port();
    let env = |r| {
        let mut e = rank_env(r, 2, port);
        e.push(("LEXFLOW_COLLECTIVE_TIMEOUT_S", "10".into()));
        e
    };
    let log0 = tmp.path().join("rank0.log");
    let r0 = spawn(&cfg, &env(0), &log0);
    /// Kills the (stopped) rank 1 however the test ends: SIGKILL ends a stopped process too.
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let r1 = KillOnDrop(spawn(&cfg, &env(1), &tmp.path().join("rank1.log")));
    let t = Instant::now();
    while read_step_records(&dir).len() < 4 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        read_step_records(&dir).len() >= 4,
        "no training steps within 120 s"
    );
    let stop = Command::new("kill")
        .args(["-STOP", &r1.0.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    // Rank 0 fails within the timeout (10 s) plus its own way out, not never; the old code hung here.
    let waited = Instant::now();
    let st = wait(r0, Duration::from_secs(90));
    let took = waited.elapsed();
    drop(r1);
    assert!(
        !st.success(),
        "rank 0 should fail when rank 1 stops answering"
    );
    let log = std::fs::read_to_string(&log0).unwrap();
    assert!(
        log.contains("rank 1 did not answer") && log.contains("LEXFLOW_COLLECTIVE_TIMEOUT_S=10"),
        "rank 0's log: {log}"
    );
    assert!(
        took >= Duration::from_secs(9),
        "failed {took:?} after the stop, before the timeout: {log}"
    );
}

/// Launch variables that do not make a group are errors naming the variable, before anything is written into the
/// (shared) run directory — not a silent single-process run that trains as rank 0 and writes its checkpoints.
#[test]
fn invalid_rank_variables_stop_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let without = |k: &str| -> Vec<(&'static str, String)> {
        rank_env(1, 2, port)
            .into_iter()
            .filter(|(n, _)| *n != k)
            .collect()
    };
    let with = |k: &'static str, v: &str| {
        let mut e = rank_env(1, 2, port);
        e.push((k, v.into()));
        e
    };
    for (i, (env, want)) in [
        (without("RANK"), "WORLD_SIZE=2 is set but RANK is not"),
        (without("WORLD_SIZE"), "RANK=1 is set but WORLD_SIZE is not"),
        (
            with("WORLD_SIZE", "0"),
            "WORLD_SIZE=0 is not a whole number",
        ),
        (with("RANK", "one"), "RANK=one is not a whole number"),
        (rank_env(2, 2, port), "RANK=2 is not below WORLD_SIZE=2"),
        (
            with("LOCAL_RANK", "x"),
            "LOCAL_RANK=x is not a whole number",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("run{i}"));
        let cfg = config(&dir, &["cpu"], 2);
        let log = tmp.path().join(format!("bad{i}.log"));
        let st = wait(spawn(&cfg, &env, &log), Duration::from_secs(120));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !st.success() && text.contains(want),
            "want {want:?} in: {text}"
        );
        let written: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(
            written.is_empty(),
            "{want}: written into run.dir: {written:?}"
        );
    }
}

#[test]
fn launch_mistakes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("procs");
    let cfg = config(&dir, &["cpu"], 2);
    let port = free_port();
    let other = TcpListener::bind("127.0.0.1:0").unwrap(); // accepts connections, never answers
    for (env, want) in [
        (rank_env(2, 2, port), "RANK=2 is not below WORLD_SIZE=2"),
        (
            {
                let mut e = rank_env(1, 2, port);
                e.push(("MASTER_PORT", "http".into()));
                e
            },
            "MASTER_PORT=http is not a port number",
        ),
        (
            {
                let mut e = rank_env(1, 2, port);
                e.push(("LEXFLOW_RENDEZVOUS_TIMEOUT_S", "1".into()));
                e
            },
            "cannot reach rank 0",
        ),
        (
            // MASTER_PORT is some other listener, not rank 0: named within the rendezvous timeout, no hang.
            {
                let mut e = rank_env(1, 2, other.local_addr().unwrap().port());
                e.push(("LEXFLOW_RENDEZVOUS_TIMEOUT_S", "2".into()));
                e
            },
            "did not acknowledge rank 1",
        ),
    ] {
        let log = tmp.path().join("bad.log");
        let st = wait(spawn(&cfg, &env, &log), Duration::from_secs(120));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !st.success() && text.contains(want),
            "want {want:?} in: {text}"
        );
    }
}
