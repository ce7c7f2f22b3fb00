//! Held-out evaluation during training (`[eval]`, `docs/EVAL_LOSS.md`), end to end through `lexflow run`:
//! * evaluating does not change training (losses and final weights bit-identical to a run without `[eval]`);
//! * the losses equal transformers' on the same checkpoint and the same sequences (`lexflow heldout --out`,
//!   `scripts/hf_eval_loss.py`), per language;
//! * they do not depend on the number of ranks, and a cut and resumed run evaluates bit for bit like a whole one;
//! * `eval.holdout` takes whole acts (every language) out of training: provenance never shows one.

use std::path::{Path, PathBuf};
use std::process::Command;

use lexflow_tests::{lexflow_bin, tiny_run_config, venv_python};
use serde_json::Value;

fn lexflow(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(lexflow_bin()).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn run(cfg: &Path, resume: bool) -> Value {
    let mut a = vec!["run", cfg.to_str().unwrap(), "--quiet"];
    if resume {
        a.push("--resume");
    }
    let (ok, stdout, stderr) = lexflow(&a);
    assert!(ok, "{}: {stdout}\n{stderr}", cfg.display());
    let text = std::fs::read_to_string(cfg.with_extension("").join("stats.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn eval_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn lang_losses(e: &Value) -> Vec<(String, f64)> {
    e["languages"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn final_weights(dir: &Path, step: u64) -> Vec<u8> {
    std::fs::read(dir.join(format!("checkpoints/step-{step:06}/model.safetensors"))).unwrap()
}

fn eval_table(corpus: &Path, extra: &str) -> String {
    format!(
        "min_lr = 1e-3\n[eval]\npaths = [{:?}]\nevery = 2\nmax_sequences = 3\n{extra}",
        corpus.display().to_string()
    )
}

#[test]
fn eval_leaves_training_alone_matches_transformers_and_any_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    // A held-out corpus of its own: other acts (another generator seed), the five mix languages.
    let corpus = tmp.path().join("heldout_corpus");
    let (ok, so, se) = lexflow(&[
        "gen-sample",
        corpus.to_str().unwrap(),
        "--acts-per-language",
        "2",
        "--seed",
        "99",
    ]);
    assert!(ok, "{so}\n{se}");

    let a = tmp.path().join("a");
    let cfg_a = tiny_run_config(&a, &["cpu"], 2, 4, &eval_table(&corpus, ""));
    let sa = run(&cfg_a, false);
    let b = tmp.path().join("b");
    let sb = run(&tiny_run_config(&b, &["cpu"], 2, 4, "min_lr = 1e-3"), false);

    // 1. Training is untouched: same losses (bit for bit as JSON numbers), same final weights.
    assert_eq!(sa["train"]["losses"], sb["train"]["losses"]);
    assert_eq!(sa["train"]["losses"].as_array().unwrap().len(), 4);
    assert!(
        final_weights(&a, 4) == final_weights(&b, 4),
        "evaluating changed the weights"
    );
    assert!(sb.get("eval_set").is_none() && sb["train"].get("evals").is_none());

    // 2. Evaluations at steps 2 and 4 (every = 2), in stats.json and eval.jsonl alike, every language present.
    let evals = sa["train"]["evals"].as_array().unwrap().clone();
    assert_eq!(
        evals
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4]
    );
    assert_eq!(eval_lines(&a), evals);
    // `lexflow evals`: the same numbers as a table, one row per step.
    let (ok, table, se) = lexflow(&["evals", a.to_str().unwrap()]);
    assert!(ok, "{se}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| 2 |") || l.starts_with("| 4 |"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    for (row, e) in rows.iter().zip(&evals) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(
            cells[1],
            format!("{:.4}", e["loss"].as_f64().unwrap()),
            "{table}"
        );
        assert_eq!(
            cells[2],
            format!("{:.4}", e["languages"]["de"]["loss"].as_f64().unwrap()),
            "{table}"
        );
    }
    assert!(table.lines().next().unwrap().contains("loss de"), "{table}");
    let set = &sa["eval_set"];
    let langs: Vec<&str> = set["languages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lang"].as_str().unwrap())
        .collect();
    assert_eq!(langs, ["de", "en", "es", "fr", "pt"]);
    for l in set["languages"].as_array().unwrap() {
        let n = l["sequences"].as_u64().unwrap();
        assert!((1..=3).contains(&n), "{l}");
        assert!(l["target_tokens"].as_u64().unwrap() > 0, "{l}");
    }
    for e in &evals {
        assert_eq!(lang_losses(e).len(), 5, "{e}");
        // The overall loss is the token-weighted mean of the languages'.
        let (mut s, mut n) = (0.0, 0.0);
        for v in e["languages"].as_object().unwrap().values() {
            let t = v["tokens"].as_f64().unwrap();
            s += v["loss"].as_f64().unwrap() * t;
            n += t;
        }
        assert!(rel(e["loss"].as_f64().unwrap(), s / n) < 1e-12, "{e}");
    }

    // 3. Oracle: transformers on the final checkpoint and the sequences `lexflow heldout` rebuilds from the config.
    let seqs = tmp.path().join("heldout.jsonl");
    let (ok, so, se) = lexflow(&[
        "heldout",
        cfg_a.to_str().unwrap(),
        "--out",
        seqs.to_str().unwrap(),
    ]);
    assert!(ok, "{so}\n{se}");
    let summary: Value = serde_json::from_str(&so).unwrap();
    assert_eq!(summary["hash"], set["hash"], "heldout rebuilt another set");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/hf_eval_loss.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(a.join("checkpoints/step-000004"))
        .arg(&seqs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hf_eval_loss.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hf: Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = &evals[1];
    for (lang, loss) in lang_losses(last) {
        let h = &hf[&lang];
        assert_eq!(
            h["tokens"].as_u64(),
            last["languages"][&lang]["tokens"].as_u64(),
            "{lang}: target count"
        );
        let r = rel(loss, h["loss"].as_f64().unwrap());
        eprintln!(
            "{lang}: lexflow {loss:.6} transformers {:.6} rel {r:.2e}",
            h["loss"]
        );
        assert!(
            r < 1e-5,
            "{lang}: lexflow {loss} vs transformers {h}: rel {r:.2e}"
        );
    }
    assert!(
        rel(
            last["loss"].as_f64().unwrap(),
            hf["all"]["loss"].as_f64().unwrap()
        ) < 1e-5
    );

    // 4. Two ranks of one sequence each (same global batch): the same evaluations up to the rounding of training.
    let c = tmp.path().join("c");
    let sc = run(
        &tiny_run_config(&c, &["cpu", "cpu"], 1, 4, &eval_table(&corpus, "")),
        false,
    );
    assert_eq!(sc["eval_set"]["hash"], set["hash"]);
    let ec = sc["train"]["evals"].as_array().unwrap();
    for (x, y) in evals.iter().zip(ec) {
        for ((l1, a1), (l2, a2)) in lang_losses(x).into_iter().zip(lang_losses(y)) {
            assert_eq!(l1, l2);
            eprintln!("step {} {l1}: 1 rank {a1:.6}, 2 ranks {a2:.6}", x["step"]);
            assert!(rel(a1, a2) < 1e-4, "step {}: {l1} {a1} vs {a2}", x["step"]);
        }
    }
    // 5. Cut after 2 steps, resumed to 4: the evaluations are those of the whole run, bit for bit.
    let d = tmp.path().join("d");
    run(
        &tiny_run_config(&d, &["cpu"], 2, 2, &eval_table(&corpus, "")),
        false,
    );
    run(
        &tiny_run_config(&d, &["cpu"], 2, 4, &eval_table(&corpus, "")),
        true,
    );
    let ed = eval_lines(&d);
    assert_eq!(ed.len(), 2, "{ed:?}");
    for (x, y) in evals.iter().zip(&ed) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(lang_losses(x), lang_losses(y), "step {}", x["step"]);
        assert_eq!(x["loss"], y["loss"]);
    }
}

#[test]
fn holdout_takes_whole_acts_out_of_training() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("h");
    let cfg = tiny_run_config(
        &dir,
        &["cpu"],
        2,
        3,
        "[eval]\nholdout = 0.25\nmax_sequences = 2",
    );
    let s = run(&cfg, false);
    let input = &s["input"];
    let held = input["files_held_out"].as_u64().unwrap();
    assert!(held > 0, "{input}");
    let in_lanes: u64 = input["files_per_lang"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        input["files"].as_u64().unwrap(),
        held + in_lanes + input["files_outside_mix"].as_u64().unwrap(),
        "{input}"
    );
    assert_eq!(s["eval_set"]["files"].as_u64(), Some(held));
    // every = 0: one evaluation, after the last step.
    let evals = s["train"]["evals"].as_array().unwrap();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0]["step"], 3);

    // Whole acts: every file and language version of an act package is on the same side.
    let files =
        lexflow_actors::reader::expand_inputs(&[dir.join("corpus").display().to_string()]).unwrap();
    let keys = lexflow_actors::reader::ManifestIndex::build(&files).package_keys();
    let (_, held_files) = lexflow_actors::heldout::split_files(
        files.clone(),
        0.25,
        &lexflow_actors::reader::ManifestIndex::build(&files),
        lexflow_actors::heldout::HoldoutSplit::Package,
    );
    let mut by_act: std::collections::BTreeMap<String, Vec<(String, bool)>> = Default::default();
    for f in &files {
        let lang = lexflow_actors::formex::lang_from_filename(&f.to_string_lossy()).unwrap();
        by_act
            .entry(keys.key_of(f))
            .or_default()
            .push((lang, held_files.contains(f)));
    }
    let counted: usize = by_act
        .values()
        .map(|v| v.iter().filter(|x| x.1).count())
        .sum();
    assert_eq!(counted as u64, held);
    let langs = |v: &[(String, bool)]| {
        v.iter()
            .map(|x| x.0.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    // Packages in several languages, and packages of several files in one language (manifest, body, annexes).
    let multi_lang = by_act.values().filter(|v| langs(v) > 1).count();
    let multi_file = by_act.values().filter(|v| v.len() > langs(v)).count();
    assert!(
        multi_lang >= 6 && multi_file >= 4,
        "acts in several languages: {multi_lang}, of several files: {multi_file}"
    );
    for (k, v) in &by_act {
        assert!(v.iter().all(|x| x.1 == v[0].1), "{k}: {v:?}");
    }

    // Provenance: no document of any step comes from a held-out file.
    for step in 1..=3u64 {
        let (ok, so, se) = lexflow(&[
            "provenance",
            dir.to_str().unwrap(),
            "--step",
            &step.to_string(),
            "--json",
        ]);
        assert!(ok, "{so}\n{se}");
        let mut n = 0;
        for l in so.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            let p = v["path"].as_str().unwrap();
            let file = p.split('!').next().unwrap();
            assert!(
                !lexflow_actors::heldout::is_held_out(Path::new(file), 0.25),
                "step {step} trained on held-out {p}"
            );
            n += 1;
        }
        assert!(n > 0, "step {step}: no provenance");
    }
}

/// `lexflow_packer_*` count the training stream only: the held-out set is packed with packers of its own that leave
/// them alone, and a resumed run's carry-over restore counts nothing. In-process (the metrics registry is this test
/// process's; no other test of this file runs a pipeline in it).
#[test]
fn packer_metrics_count_the_training_stream_only_also_across_a_resume() {
    use lexflow_actors::pipeline::RunOptions;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let m = lexflow_metrics::global();
    let opts = |resume| RunOptions {
        resume,
        progress: false,
        origin: "test".into(),
        replay: None,
    };
    let extra = "[eval]\nholdout = 0.25\nmax_sequences = 4";
    for (steps, resume) in [(3, false), (5, true)] {
        let cfg = lexflow_actors::config::Config::from_file(&tiny_run_config(
            &dir,
            &["cpu"],
            2,
            steps,
            extra,
        ))
        .unwrap();
        let (seqs, pad) = (m.packer_sequences.get(), m.packer_padding_tokens.get());
        let s = lexflow_actors::pipeline::run(&cfg, &opts(resume)).unwrap();
        assert_eq!(s.outcome, "completed");
        let held: u64 = s.eval_set.as_ref().unwrap()["languages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["sequences"].as_u64().unwrap())
            .sum();
        assert!(held > 0, "the test needs held-out sequences");
        assert_eq!(
            m.packer_sequences.get() - seqs,
            s.packer.sequences,
            "lexflow_packer_sequences_total vs stats.json packer.sequences ({held} held-out sequences; resume: {resume})"
        );
        assert_eq!(m.packer_padding_tokens.get() - pad, s.packer.padding_tokens);
        assert_eq!(m.packer_fill_efficiency.get(), s.packer.fill_efficiency);
        if resume {
            assert_eq!(
                s.train.as_ref().unwrap()["resumed_from_step"].as_u64(),
                Some(3)
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The series lines (no comments) of `http://127.0.0.1:port/metrics`.
fn scrape(port: u16) -> Vec<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(String::from)
        .collect()
}

/// One process per rank: each process exports the trainer series of its own rank only (no zero series for rank 0 in
/// rank 1's process, which Grafana would draw as a second loss at 0), and only the process that records evaluations
/// (rank 0) exports `lexflow_eval_step`; rank 0's packer counter equals its stats.json.
#[test]
fn a_process_of_one_rank_exports_only_its_own_rank() {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mp");
    std::fs::create_dir_all(&dir).unwrap();
    // Metrics on `port` (rank 0) and `port + 1` (LOCAL_RANK 1).
    let port = loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let cfg = tmp.path().join("mp.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
name = "mp"
dir = {dir:?}
seed = 5
[input.generate]
acts_per_language = 8
[packer]
seq_len = 64
mode = "best-fit"
lookahead = 8
[shards]
count = 4
[edges]
capacity = 2
[train]
devices = ["cpu"]
model = "tiny"
micro_batch = 1
steps = 4
lr = 1e-3
checkpoint_every = 2
[eval]
holdout = 0.25
max_sequences = 2
every = 2
[metrics]
enabled = true
listen = "127.0.0.1:{port}"
linger_seconds = 120
"#,
            dir = dir.display().to_string()
        ),
    )
    .unwrap();
    let master = free_port();
    let logs: Vec<_> = (0..2)
        .map(|r| tmp.path().join(format!("r{r}.log")))
        .collect();
    /// The lingering processes are stopped however the test ends.
    struct Kids(Vec<Child>);
    impl Drop for Kids {
        fn drop(&mut self) {
            for k in &mut self.0 {
                let _ = k.kill();
                let _ = k.wait();
            }
        }
    }
    let mut kids = Kids(
        (0..2)
            .map(|r| {
                Command::new(lexflow_bin())
                    .args(["run", cfg.to_str().unwrap(), "--quiet"])
                    .env("RANK", r.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", master.to_string())
                    .env("OMP_NUM_THREADS", "1")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&logs[r]).unwrap())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    // Both finished (stats written) and linger: scrape, then stop them.
    let t = Instant::now();
    while !(dir.join("stats.json").exists() && dir.join("stats.rank1.json").exists()) {
        for (r, k) in kids.0.iter_mut().enumerate() {
            if let Some(st) = k.try_wait().unwrap() {
                panic!(
                    "rank {r} exited ({st}) before lingering: {}",
                    std::fs::read_to_string(&logs[r]).unwrap_or_default()
                );
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the run did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (r0, r1) = (scrape(port), scrape(port + 1));
    drop(kids);
    let has = |lines: &[String], family: &str, rank: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(family) && l.contains(&format!("rank=\"{rank}\"")))
    };
    for (lines, own, other) in [(&r0, "0", "1"), (&r1, "1", "0")] {
        assert!(has(lines, "lexflow_trainer_loss{", own), "{lines:#?}");
        assert!(
            has(lines, "lexflow_trainer_steps_total{", own),
            "{lines:#?}"
        );
        let foreign: Vec<&String> = lines
            .iter()
            .filter(|l| {
                l.starts_with("lexflow_trainer_") && l.contains(&format!("rank=\"{other}\""))
            })
            .collect();
        assert!(
            foreign.is_empty(),
            "the process of rank {own} exports series of rank {other}: {foreign:#?}"
        );
    }
    let eval_step = |lines: &[String]| {
        lines
            .iter()
            .find(|l| l.starts_with("lexflow_eval_step "))
            .cloned()
    };
    assert_eq!(eval_step(&r0).as_deref(), Some("lexflow_eval_step 4"));
    assert_eq!(eval_step(&r1), None, "rank 1 records no evaluation");
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    let packed = r0
        .iter()
        .find_map(|l| l.strip_prefix("lexflow_packer_sequences_total "))
        .unwrap();
    assert_eq!(
        packed.parse::<u64>().ok(),
        stats["packer"]["sequences"].as_u64(),
        "held-out sequences counted as packed training sequences"
    );
    // stats.json says whose throughput its tokens/s is.
    let s1: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stats.rank1.json")).unwrap())
            .unwrap();
    assert_eq!(s1["train"]["process_ranks"], serde_json::json!([1]));
    assert_eq!(s1["train"]["world_size"], 2);
}
