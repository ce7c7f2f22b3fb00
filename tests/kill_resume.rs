//! Exact resume: a run killed with SIGKILL at random moments (and once inside a checkpoint write) and resumed each
//! time — fully sharded, so every checkpoint gathers the ranks' slices — trains on bit-identical batches and ends
//! with bit-identical weights, compared with an uninterrupted replicated run.
//! Also: elastic resume (world size 2 → 1) keeps the global sequence stream, and resume seeks instead of replaying.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lexflow_actors::trainer::{read_step_records, StepRecord};
use lexflow_tests::{lexflow_bin, tiny_run_config};

fn config(dir: &Path, devices: &[&str], micro_batch: usize, steps: u64) -> PathBuf {
    tiny_run_config(dir, devices, micro_batch, steps, "")
}

/// [`config`] with the Arrow tee in `<dir>/tee`.
fn config_with_tee(dir: &Path, devices: &[&str], micro_batch: usize, steps: u64) -> PathBuf {
    let cfg = config(dir, devices, micro_batch, steps);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[shards]\ncount = 4",
        &format!(
            "[shards]\ncount = 4\narrow_dir = {:?}",
            dir.join("tee").display().to_string()
        ),
    );
    assert!(
        text.contains("arrow_dir"),
        "the test config has a [shards] table"
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn run(cfg: &Path, resume: bool, env: &[(&str, &str)]) -> std::process::ExitStatus {
    let mut c = Command::new(lexflow_bin());
    c.arg("run")
        .arg(cfg)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if resume {
        c.arg("--resume");
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.status().unwrap()
}

fn final_weights(run_dir: &Path, step: u64) -> Vec<u8> {
    let p = run_dir.join(format!("checkpoints/step-{step:06}/model.safetensors"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The global batch of each step: sequence index → hash, over all ranks.
fn global_batches(
    recs: &BTreeMap<(u64, usize), StepRecord>,
) -> BTreeMap<u64, BTreeMap<u64, String>> {
    let mut out: BTreeMap<u64, BTreeMap<u64, String>> = BTreeMap::new();
    for ((step, _), r) in recs {
        out.entry(*step)
            .or_default()
            .extend(r.sequences.iter().cloned());
    }
    out
}

#[test]
fn kill_9_at_random_moments_then_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 30;
    let ref_dir = tmp.path().join("reference");
    let ref_cfg = config_with_tee(&ref_dir, &["cpu", "cpu"], 2, steps);
    assert!(run(&ref_cfg, false, &[]).success());
    let want = read_step_records(&ref_dir);
    assert_eq!(
        want.len(),
        (steps * 2) as usize,
        "one record per rank and step"
    );

    // The killed run is fully sharded (ZeRO-3: every rank holds slices of the weights and the optimizer state,
    // gathered into each checkpoint): it must still follow the replicated reference bit for bit.
    let dir = tmp.path().join("killed");
    let cfg = config_with_tee(&dir, &["cpu", "cpu"], 2, steps);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[train]\n", "[train]\nshard = \"full\"\n"),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("shard = \"full\""));
    // First: crash inside the checkpoint write of step 6 (model written, state not yet).
    let st = run(&cfg, false, &[("LEXFLOW_CRASH_IN_CHECKPOINT", "6")]);
    assert!(!st.success(), "the injected crash must kill the run");
    // Then SIGKILL at pseudo-random moments, resuming each time.
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut kills = 0;
    while kills < 10 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let frac = (rng % 1000) as f64 / 1000.0;
        // Between 0.8 s (still starting up) and 4 s (a few steps in, often mid-checkpoint: one every 2 steps).
        let delay = Duration::from_secs_f64(0.8 + frac * 3.2);
        let mut child = Command::new(lexflow_bin())
            .args(["run", cfg.to_str().unwrap(), "--quiet", "--resume"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let mut finished = false;
        while t.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if finished {
            break; // the run completed before we got to kill it again
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills == 10,
        "only {kills} kills happened: the run is too short for the test to mean anything"
    );
    assert!(run(&cfg, true, &[]).success(), "final resume must complete");

    let got = read_step_records(&dir);
    assert_eq!(got.len(), want.len(), "steps recorded");
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!(
            g.sequences, w.sequences,
            "step {} rank {}: different batch",
            k.0, k.1
        );
        assert_eq!(
            g.loss.to_bits(),
            w.loss.to_bits(),
            "step {} rank {}: loss {} vs {}",
            k.0,
            k.1,
            g.loss,
            w.loss
        );
    }
    assert!(
        final_weights(&dir, steps) == final_weights(&ref_dir, steps),
        "final weights differ"
    );
    // The Arrow tee: the unfinished parts the kills left were recovered, and over all parts it holds every trained
    // sequence, as the uninterrupted run's tee does.
    let left: Vec<_> = std::fs::read_dir(dir.join("tee"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".arrow"))
        .collect();
    assert!(left.is_empty(), "unfinished tee files left: {left:?}");
    let trained = steps * 2 * 2;
    let under = |m: BTreeMap<u64, Vec<u32>>| -> BTreeMap<u64, Vec<u32>> {
        m.into_iter().filter(|(i, _)| *i < trained).collect()
    };
    let want = under(tee_sequences(&ref_dir.join("tee")));
    let got = under(tee_sequences(&dir.join("tee")));
    assert_eq!(want.len(), trained as usize);
    let missing: Vec<_> = want.keys().filter(|i| !got.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "trained sequences missing from the killed run's tee: {missing:?}"
    );
    assert!(got == want, "the killed run's tee holds other sequences");
}

#[test]
fn elastic_resume_from_two_ranks_to_one_keeps_the_global_stream() {
    let tmp = tempfile::tempdir().unwrap();
    // Reference: 2 ranks × micro-batch 2 for 12 steps.
    let ref_dir = tmp.path().join("w2");
    assert!(run(&config(&ref_dir, &["cpu", "cpu"], 2, 12), false, &[]).success());
    // Elastic: 2 ranks for 6 steps, then 1 rank × micro-batch 4 (same global batch) from the checkpoint.
    let dir = tmp.path().join("w2w1");
    assert!(run(&config(&dir, &["cpu", "cpu"], 2, 6), false, &[]).success());
    assert!(run(&config(&dir, &["cpu"], 4, 12), true, &[]).success());
    let want = global_batches(&read_step_records(&ref_dir));
    let got = global_batches(&read_step_records(&dir));
    assert_eq!(want.len(), 12);
    assert_eq!(
        got, want,
        "the global sequence stream changed with the world size"
    );
}

#[test]
fn resuming_twice_with_another_global_batch_trains_every_sequence_once() {
    // 4 steps on 2 ranks × 1 (global batch 2), resumed on 1 rank × 1 (global batch 1) to step 8, resumed again to 10:
    // the second resume must start after the 12 sequences consumed (8 + 4), not after 8 × 1.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    assert!(run(&config(&dir, &["cpu", "cpu"], 1, 4), false, &[]).success());
    assert!(run(&config(&dir, &["cpu"], 1, 8), true, &[]).success());
    assert!(run(&config(&dir, &["cpu"], 1, 10), true, &[]).success());
    let trained = read_step_records(&dir);
    let mut indices: Vec<u64> = trained
        .values()
        .flat_map(|r| r.sequences.iter().map(|(i, _)| *i))
        .collect();
    indices.sort_unstable();
    assert_eq!(
        indices,
        (0..14).collect::<Vec<u64>>(),
        "every sequence of the stream trained exactly once, in order, across the three runs"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("checkpoints/step-000010/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["sequences_consumed"], 14);
    // Replay from the last checkpoint maps steps of both global batches back to what each rank trained.
    let out = tmp.path().join("replay.jsonl");
    let st = Command::new(lexflow_bin())
        .args([
            "replay",
            dir.join("checkpoints/step-000010").to_str().unwrap(),
            "--steps",
            "1..=10",
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let want: BTreeMap<(u64, usize), Vec<(u64, String)>> = trained
        .iter()
        .map(|(k, r)| (*k, r.sequences.clone()))
        .collect();
    assert_eq!(
        replayed(&out),
        want,
        "replay across a change of global batch"
    );
}

/// Every sequence in the Arrow tee files of `tee` (all parts): index → tokens; an index in two parts must hold the
/// same sequence.
fn tee_sequences(tee: &Path) -> BTreeMap<u64, Vec<u32>> {
    let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for e in std::fs::read_dir(tee).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "arrow") {
            for s in lexflow_actors::arrow_tee::read_sequences(&p).unwrap() {
                if let Some(t) = out.insert(s.index, s.tokens.clone()) {
                    assert_eq!(
                        t, s.tokens,
                        "sequence {} differs between tee parts",
                        s.index
                    );
                }
            }
        }
    }
    out
}

#[test]
fn a_resumed_run_adds_to_its_arrow_tee_instead_of_replacing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let with_tee = |dir: &Path, steps: u64| {
        let cfg = config(dir, &["cpu"], 2, steps);
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "[shards]\ncount = 4",
            &format!(
                "[shards]\ncount = 4\narrow_dir = {:?}",
                dir.join("tee").display().to_string()
            ),
        );
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let ref_dir = tmp.path().join("whole");
    assert!(run(&with_tee(&ref_dir, 8), false, &[]).success());
    let dir = tmp.path().join("resumed");
    assert!(run(&with_tee(&dir, 4), false, &[]).success());
    assert!(run(&with_tee(&dir, 8), true, &[]).success());
    let trained = 8 * 2;
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["train"]["sequences_consumed"].as_u64(), Some(trained));
    assert_eq!(
        stats["shards"]["arrow_tee"]["first_index"].as_u64(),
        Some(4 * 2)
    );
    let want: BTreeMap<u64, Vec<u32>> = tee_sequences(&ref_dir.join("tee"))
        .into_iter()
        .filter(|(i, _)| *i < trained)
        .collect();
    let got: BTreeMap<u64, Vec<u32>> = tee_sequences(&dir.join("tee"))
        .into_iter()
        .filter(|(i, _)| *i < trained)
        .collect();
    assert_eq!(want.len(), trained as usize);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "sequences missing from the resumed run's tee"
    );
    assert!(got == want, "the resumed run's tee holds other sequences");
}

#[test]
fn a_fresh_run_over_an_earlier_one_sets_it_aside_and_resume_of_a_finished_run_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    assert!(run(&config(&dir, &["cpu"], 2, 4), false, &[]).success());
    let stats = std::fs::read(dir.join("stats.json")).unwrap();
    // Finished: --resume says so and leaves the run as it is.
    assert!(run(&config(&dir, &["cpu"], 2, 4), true, &[]).success());
    assert_eq!(
        std::fs::read(dir.join("stats.json")).unwrap(),
        stats,
        "stats.json rewritten"
    );
    // Starting from this run's own checkpoint without --resume would set it aside before reading it: refused.
    let own = dir.join("checkpoints/step-000004");
    let cfg = tiny_run_config(
        &dir,
        &["cpu"],
        2,
        6,
        &format!("init_from = {:?}", own.display().to_string()),
    );
    assert!(!run(&cfg, false, &[]).success());
    assert!(own.is_dir(), "the refused run moved the checkpoint");
    // A fresh run: the earlier one's checkpoints and step records go to previous/, nothing is lost or mixed.
    let before = final_weights(&dir, 4);
    assert!(run(&config(&dir, &["cpu"], 2, 2), false, &[]).success());
    assert_eq!(
        std::fs::read(dir.join("previous/checkpoints/step-000004/model.safetensors")).unwrap(),
        before
    );
    let steps: Vec<u64> = read_step_records(&dir).keys().map(|(s, _)| *s).collect();
    assert_eq!(
        steps,
        vec![1, 2],
        "the new run's step records hold only its own steps"
    );
}

/// `(step, rank) → sequences` from `lexflow replay` JSON lines.
fn replayed(out: &Path) -> BTreeMap<(u64, usize), Vec<(u64, String)>> {
    let mut m: BTreeMap<(u64, usize), Vec<(u64, String)>> = BTreeMap::new();
    for line in std::fs::read_to_string(out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            v["step"].as_u64().unwrap(),
            v["rank"].as_u64().unwrap() as usize,
        );
        m.entry(key).or_default().push((
            v["index"].as_u64().unwrap(),
            v["hash"].as_str().unwrap().to_string(),
        ));
    }
    m
}

#[test]
fn replay_and_provenance_regenerate_what_was_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    assert!(run(&config(&dir, &["cpu", "cpu"], 2, 12), false, &[]).success());
    let trained = read_step_records(&dir);
    let ckpt = dir.join("checkpoints/step-000012");
    assert!(ckpt.is_dir());
    // Steps after a kept checkpoint (10) and steps before any kept checkpoint (from the stream's start).
    for (steps, range) in [("11..=12", 11..=12u64), ("3..5", 3..=4u64)] {
        let out = tmp.path().join(format!("replay-{}.jsonl", range.start()));
        let st = Command::new(lexflow_bin())
            .args([
                "replay",
                ckpt.to_str().unwrap(),
                "--steps",
                steps,
                "--out",
                out.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "lexflow replay --steps {steps}");
        let got = replayed(&out);
        let want: BTreeMap<(u64, usize), Vec<(u64, String)>> = trained
            .iter()
            .filter(|((s, _), _)| range.contains(s))
            .map(|(k, r)| (*k, r.sequences.clone()))
            .collect();
        assert_eq!(want.len(), 2 * (range.end() - range.start() + 1) as usize);
        assert_eq!(
            got, want,
            "replay of steps {steps} differs from what was trained"
        );
    }
    // Provenance of step 5: every piece belongs to a sequence of step 5 and names its document.
    let out = Command::new(lexflow_bin())
        .args(["provenance", dir.to_str().unwrap(), "--step", "5", "--json"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let step5: std::collections::BTreeSet<u64> = trained
        .iter()
        .filter(|((s, _), _)| *s == 5)
        .flat_map(|(_, r)| r.sequences.iter().map(|(i, _)| *i))
        .collect();
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for p in &lines {
        assert!(step5.contains(&p["index"].as_u64().unwrap()), "{p}");
        assert!(
            ["en", "fr", "de", "es", "pt"].contains(&p["lang"].as_str().unwrap()),
            "{p}"
        );
        assert!(
            std::path::Path::new(p["path"].as_str().unwrap()).exists(),
            "{p}"
        );
        assert!(p["token_end"].as_u64() > p["token_start"].as_u64(), "{p}");
    }
    assert!(
        lines.iter().any(|p| p["celex"].is_string()),
        "no CELEX in any piece of step 5"
    );
}

/// A copy of the real corpus's small files (under 40 KB: manifests, annexes, tables of contents, short acts) in
/// `corpus`, and a [`config`] that trains on their English files with `eval.holdout = holdout`.
fn small_corpus_config(dir: &Path, corpus: &Path, steps: u64, holdout: f64) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/formex");
    if !corpus.is_dir() {
        std::fs::create_dir_all(corpus).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "xml") && p.metadata().unwrap().len() < 40_000 {
                std::fs::copy(&p, corpus.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    let cfg = config(dir, &["cpu"], 2, steps);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[input.generate]\nacts_per_language = 8",
        &format!(
            "[input]\npaths = [{:?}]\n[eval]\nholdout = {holdout}\n[sampler]\nmix = {{ en = 1.0 }}",
            corpus.display().to_string()
        ),
    );
    assert!(
        text.contains("holdout"),
        "the test config generates its corpus"
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `lexflow run` (or any subcommand) with its stderr.
fn lexflow(args: &[&str]) -> (bool, String) {
    let o = Command::new(lexflow_bin())
        .args(args)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn inputs_record(ckpt: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(ckpt.join("inputs.json")).unwrap()).unwrap()
}

/// A 2-step run on [`small_corpus_config`]'s corpus under `tmp`: (run dir, corpus dir, the English lane's files
/// in its checkpoint's `inputs.json`).
fn two_step_run(tmp: &Path) -> (PathBuf, PathBuf, Vec<serde_json::Value>) {
    let (dir, corpus) = (tmp.join("run"), tmp.join("in"));
    let cfg = small_corpus_config(&dir, &corpus, 2, 0.0);
    let (ok, err) = lexflow(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{err}");
    let rec = inputs_record(&dir.join("checkpoints/step-000002"));
    let en = rec["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lang"] == "en")
        .unwrap();
    let files = en["files"].as_array().unwrap().clone();
    assert!(files.len() > 3, "{en}");
    (dir, corpus, files)
}

#[test]
fn resume_and_replay_refuse_input_files_that_changed_since_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, corpus, en_files) = two_step_run(tmp.path());
    let ckpt = dir.join("checkpoints/step-000002");
    let rec = inputs_record(&ckpt);
    let second = PathBuf::from(en_files[1]["path"].as_str().unwrap());
    let original = std::fs::read(&second).unwrap();
    let cfg4 = small_corpus_config(&dir, &corpus, 4, 0.0);
    let resume = || lexflow(&["run", cfg4.to_str().unwrap(), "--quiet", "--resume"]);
    let replay = || {
        lexflow(&[
            "replay",
            ckpt.to_str().unwrap(),
            "--steps",
            "3",
            "--out",
            tmp.path().join("r.jsonl").to_str().unwrap(),
        ])
    };

    // A file rewritten with another size: refused, naming the lane, the file and both sizes.
    let mut longer = original.clone();
    longer.extend_from_slice(b"\n<!-- edited -->\n");
    std::fs::write(&second, &longer).unwrap();
    for (what, (ok, err)) in [("resume", resume()), ("replay", replay())] {
        assert!(!ok, "{what} over a changed file succeeded");
        let name = second.file_name().unwrap().to_str().unwrap();
        assert!(
            err.contains("lane en: file #2 changed size"),
            "{what}: {err}"
        );
        assert!(err.contains(name), "{what}: {err}");
        assert!(
            err.contains(&format!("({} bytes)", original.len()))
                && err.contains(&format!("({} bytes)", longer.len())),
            "{what}: {err}"
        );
    }
    assert!(
        !dir.join("checkpoints/step-000004").exists(),
        "the refused resume trained"
    );
    // A file added to the corpus (it sorts last in its lane).
    std::fs::write(&second, &original).unwrap();
    let added = corpus.join("L_2099999EN.01000101.xml");
    std::fs::copy(corpus.join("L_2018127EN.01000201.xml"), &added).unwrap();
    let (ok, err) = resume();
    assert!(
        !ok && err.contains("L_2099999EN.01000101.xml") && err.contains("this run finds 37"),
        "{err}"
    );
    std::fs::remove_file(&added).unwrap();
    // The same files again: the resume goes on and records the same inputs.
    let (ok, err) = resume();
    assert!(ok, "{err}");
    let rec4 = inputs_record(&dir.join("checkpoints/step-000004"));
    assert_eq!(rec4["lanes"], rec["lanes"]);
    assert_eq!(rec4["holdout_split"], "package");
}

#[test]
fn a_checkpoint_without_an_inputs_record_keeps_the_file_holdout_split_it_was_written_with() {
    use lexflow_actors::heldout::{split_files, HoldoutSplit};
    let tmp = tempfile::tempdir().unwrap();
    let (dir, corpus) = (tmp.path().join("run"), tmp.path().join("in"));
    small_corpus_config(&dir, &corpus, 2, 0.0);
    let files = lexflow_actors::reader::expand_inputs(&[corpus.display().to_string()]).unwrap();
    let index = lexflow_actors::reader::ManifestIndex::build(&files);
    let names = |v: Vec<PathBuf>| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    // A fraction at which the two splits hold out different files, both some English text to evaluate, and files
    // remain to train on.
    let text = |v: &[PathBuf]| {
        v.iter().any(|p| {
            let n = p.to_string_lossy();
            lexflow_actors::formex::lang_from_filename(&n).as_deref() == Some("en")
                && !lexflow_actors::reader::looks_like_manifest(p)
        })
    };
    let (fraction, by_file, by_package) = (1..80)
        .map(|i| i as f64 / 80.0)
        .find_map(|f| {
            let (train, p) = split_files(files.clone(), f, &index, HoldoutSplit::Package);
            let (_, h) = split_files(files.clone(), f, &index, HoldoutSplit::File);
            (p != h && text(&p) && text(&h) && train.len() > 20).then(|| (f, names(h), names(p)))
        })
        .expect("a fraction where the splits differ");
    let recorded_held = |ckpt: &Path| -> (String, Vec<String>) {
        let r = inputs_record(ckpt);
        let held = r["held_out"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let p = PathBuf::from(f["path"].as_str().unwrap());
                p.file_name().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        (r["holdout_split"].as_str().unwrap().to_string(), held)
    };
    let cfg = small_corpus_config(&dir, &corpus, 2, fraction);
    let (ok, err) = lexflow(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{err}");
    let step2 = dir.join("checkpoints/step-000002");
    assert_eq!(recorded_held(&step2), ("package".to_string(), by_package));

    // Make step 2 a checkpoint of a lexflow that recorded no inputs (and split by file): drop the record and its
    // manifest entry.
    std::fs::remove_file(step2.join("inputs.json")).unwrap();
    let mpath = step2.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    assert!(m["files"]
        .as_object_mut()
        .unwrap()
        .remove("inputs.json")
        .is_some());
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let cfg = small_corpus_config(&dir, &corpus, 4, fraction);
    let (ok, err) = lexflow(&["run", cfg.to_str().unwrap(), "--quiet", "--resume"]);
    assert!(ok, "{err}");
    assert_eq!(
        recorded_held(&dir.join("checkpoints/step-000004")),
        ("file".to_string(), by_file),
        "the resumed run changed the held-out split of its checkpoint"
    );
}

#[test]
fn resume_names_the_file_removed_from_the_middle_of_a_lane() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, corpus, files) = two_step_run(tmp.path());
    let (second, third) = (
        PathBuf::from(files[1]["path"].as_str().unwrap()),
        PathBuf::from(files[2]["path"].as_str().unwrap()),
    );
    std::fs::remove_file(&second).unwrap();
    let cfg4 = small_corpus_config(&dir, &corpus, 4, 0.0);
    let (ok, err) = lexflow(&["run", cfg4.to_str().unwrap(), "--quiet", "--resume"]);
    assert!(!ok, "a resume without a file of its stream succeeded");
    // The file that is gone is named as missing, not the next one as "another file".
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains("lane en: file #2 is missing"), "{err}");
    assert!(
        err.contains(&format!(
            "{} ({} bytes), this run does not find it",
            name(&second),
            files[1]["bytes"]
        )) && err.contains(&name(&third)),
        "{err}"
    );
}

#[test]
fn resume_refuses_changed_eval_files_when_dedup_drops_their_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, corpus, held) = (
        tmp.path().join("run"),
        tmp.path().join("in"),
        tmp.path().join("held"),
    );
    std::fs::create_dir_all(&held).unwrap();
    let eval_file = held.join("L_2030154EN.01000101.xml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/corpus/formex/L_2018127EN.01000201.xml"),
        &eval_file,
    )
    .unwrap();
    let with_eval = |steps: u64| {
        let cfg = small_corpus_config(&dir, &corpus, steps, 0.0);
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "[eval]\n",
            &format!(
                "[eval]\npaths = [{:?}]\nmax_sequences = 2\n",
                held.display().to_string()
            ),
        ) + "[dedup]\nmode = \"exact\"\n";
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let (ok, err) = lexflow(&["run", with_eval(2).to_str().unwrap(), "--quiet"]);
    assert!(ok, "{err}");
    let rec = inputs_record(&dir.join("checkpoints/step-000002"));
    assert_eq!(rec["eval_files"].as_array().unwrap().len(), 1, "{rec}");
    // The held-out act edited: with dedup.against_heldout (default) it decides what the stream drops.
    let mut text = std::fs::read(&eval_file).unwrap();
    text.extend_from_slice(b"\n");
    std::fs::write(&eval_file, text).unwrap();
    let (ok, err) = lexflow(&["run", with_eval(4).to_str().unwrap(), "--quiet", "--resume"]);
    assert!(!ok, "resumed over a changed eval.paths file");
    assert!(
        err.contains("eval.paths files: file #1 changed size")
            && err.contains("L_2030154EN.01000101.xml")
            && err.contains("dedup.against_heldout"),
        "{err}"
    );
}

#[test]
fn resume_and_replay_refuse_a_checkpoint_tokenized_by_another_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, corpus, _) = two_step_run(tmp.path());
    let ckpt = dir.join("checkpoints/step-000002");
    let tok = ckpt.join("tokenizer.json");
    let ours = std::fs::read(&tok).unwrap();
    // What a checkpoint of the former "llama3" holds: the same vocabulary and merges with "ignore_merges": false.
    let mut j: serde_json::Value = serde_json::from_slice(&ours).unwrap();
    assert_eq!(j["model"]["ignore_merges"], true);
    j["model"]["ignore_merges"] = false.into();
    set_checkpoint_file(&ckpt, "tokenizer.json", &serde_json::to_vec(&j).unwrap());
    let cfg4 = small_corpus_config(&dir, &corpus, 4, 0.0);
    let (ok, err) = lexflow(&["run", cfg4.to_str().unwrap(), "--quiet", "--resume"]);
    assert!(!ok, "a resume over another tokenizer succeeded");
    assert!(
        err.contains("--resume: checkpoint")
            && err.contains("was tokenized with another tokenizer"),
        "{err}"
    );
    assert!(err.contains("\"ignore_merges\": false"), "{err}");
    assert!(
        !dir.join("checkpoints/step-000004").exists(),
        "the refused resume trained"
    );
    let out = tmp.path().join("r.jsonl");
    let (ok, err) = lexflow(&[
        "replay",
        ckpt.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("replay: checkpoint"), "{err}");
    // The checkpoint's own tokenizer again: the resume goes on.
    set_checkpoint_file(&ckpt, "tokenizer.json", &ours);
    let (ok, err) = lexflow(&["run", cfg4.to_str().unwrap(), "--quiet", "--resume"]);
    assert!(ok, "{err}");
    assert!(dir.join("checkpoints/step-000004").exists());
}

/// Replaces a file of a checkpoint and its entry in `manifest.json` (size, sha256), as if the checkpoint had been
/// written with it.
fn set_checkpoint_file(ckpt: &Path, name: &str, bytes: &[u8]) {
    use sha2::Digest;
    std::fs::write(ckpt.join(name), bytes).unwrap();
    let m = ckpt.join("manifest.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    let e = &mut j["files"][name];
    assert!(e.is_object(), "{name} not in {}", m.display());
    e["bytes"] = bytes.len().into();
    e["sha256"] = hex::encode(sha2::Sha256::digest(bytes)).into();
    std::fs::write(&m, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
}
