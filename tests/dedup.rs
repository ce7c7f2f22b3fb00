//! Document deduplication (`[dedup]`, `docs/DEDUP.md`), end to end:
//! * on the real FORMEX corpus (which holds the AI Act's English body and annexes twice) plus near-duplicate
//!   variants of real acts, `lexflow dedup` decides exactly what datasketch's MinHash + MinHashLSH decide
//!   (`scripts/dedup_ref.py`: same MinHash values, same verdicts), and `lexflow run` drops exactly those documents;
//! * a copy of a held-out document is dropped from training;
//! * a training run cut and resumed trains bit for bit the batches of the whole run, in the first epoch and in the
//!   second (`on_exhausted = "cycle"`), and no trained piece comes from a dropped document.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use lexflow_tests::{json_lines, lexflow_ok, lexflow_output, step_hashes, venv_python};
use serde_json::Value;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/formex");

/// `text` with the first `n` occurrences of `from` replaced (an edited copy of an act).
fn edit(text: &str, from: &str, to: &str, n: usize) -> String {
    text.replacen(from, to, n)
}

/// The real corpus plus edited copies, in `dir`: near copies (a few words changed) of two English acts and a French
/// one, a heavily edited one (every "the" and "shall" changed: not near), named to sort after their originals.
fn corpus_with_variants(dir: &Path) -> PathBuf {
    let c = dir.join("corpus");
    std::fs::create_dir_all(&c).unwrap();
    for e in std::fs::read_dir(CORPUS).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "xml") {
            std::fs::copy(&p, c.join(p.file_name().unwrap())).unwrap();
        }
    }
    let read = |n: &str| std::fs::read_to_string(c.join(n)).unwrap();
    let gdpr = read("L_2016119EN.01000101.xml");
    std::fs::write(
        c.join("L_2099119EN.01000101.xml"),
        edit(&gdpr, " the ", " a ", 40),
    )
    .unwrap();
    std::fs::write(
        c.join("L_2099120EN.01000101.xml"),
        edit(
            &edit(&gdpr, " the ", " a ", usize::MAX),
            "shall",
            "must",
            usize::MAX,
        ),
    )
    .unwrap();
    let tm = read("L_2017154EN.01000101.xml");
    std::fs::write(
        c.join("L_2099154EN.01000101.xml"),
        edit(&tm, "Regulation", "Act", 12),
    )
    .unwrap();
    let fr = read("CL2016R0679FR0000020.0001.xml");
    std::fs::write(
        c.join("CL2099R0679FR0000020.0001.xml"),
        edit(&fr, " les ", " des ", 25),
    )
    .unwrap();
    c
}

fn config(dir: &Path, inputs: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "dedup"
dir = {run:?}
[input]
paths = [{inputs:?}]
[sampler]
on_exhausted = "renormalize"  # every lane to its end: the run decides for every document the audit decides for
[packer]
seq_len = 512
[shards]
ranks = 1
[dedup]
mode = "near"
{extra}
[metrics]
enabled = false
"#,
        run = dir.join("run").display().to_string(),
        inputs = inputs.display().to_string(),
    );
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("dedup.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn real_corpus_matches_datasketch_and_the_run_drops_what_the_audit_finds() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_with_variants(tmp.path());
    let cfg = config(tmp.path(), &corpus, "");
    let audit_path = tmp.path().join("audit.jsonl");
    let report: Value = serde_json::from_str(&lexflow_ok(&[
        "dedup",
        cfg.to_str().unwrap(),
        "--texts",
        "--out",
        audit_path.to_str().unwrap(),
    ]))
    .unwrap();

    // 1. datasketch agrees on every MinHash value and every verdict.
    let o = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/dedup_ref.py"
        ))
        .arg(&audit_path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("dedup_ref: {out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "datasketch disagrees: {out}");
    let reference: Value = serde_json::from_str(out.trim()).unwrap();
    // Every document that is not an exact repeat had its MinHash values compared.
    let c = &reference["counts"];
    assert_eq!(
        reference["minhash_checked"].as_u64().unwrap(),
        reference["documents"].as_u64().unwrap() - c["exact"].as_u64().unwrap(),
        "{reference}"
    );

    // 2. What was found: the AI Act's 14 English documents inside aia.fmx.xml repeat L_202401689EN.* exactly; the
    //    three lightly edited copies are near duplicates of their originals; the heavily edited one is kept.
    let docs: Vec<Value> = json_lines(&audit_path).into_iter().skip(1).collect();
    let by = |verdict: &str| -> Vec<&Value> {
        docs.iter().filter(|d| d["verdict"] == verdict).collect()
    };
    let exact = by("exact");
    assert_eq!(exact.len(), 14, "{exact:?}");
    for d in &exact {
        assert!(d["path"].as_str().unwrap().ends_with("aia.fmx.xml"), "{d}");
        assert!(
            d["of_path"].as_str().unwrap().contains("L_202401689EN."),
            "{d}"
        );
    }
    let near: BTreeSet<(String, String)> = by("near")
        .iter()
        .map(|d| {
            let name = |k: &str| {
                Path::new(d[k].as_str().unwrap())
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_string()
            };
            (name("path"), name("of_path"))
        })
        .collect();
    let expect: BTreeSet<(String, String)> = [
        ("L_2099119EN.01000101.xml", "L_2016119EN.01000101.xml"),
        ("L_2099154EN.01000101.xml", "L_2017154EN.01000101.xml"),
        (
            "CL2099R0679FR0000020.0001.xml",
            "CL2016R0679FR0000020.0001.xml",
        ),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(near, expect);
    let heavy = docs
        .iter()
        .find(|d| {
            d["path"]
                .as_str()
                .unwrap()
                .ends_with("L_2099120EN.01000101.xml")
        })
        .unwrap();
    assert_eq!(heavy["verdict"], "kept", "{heavy}");
    // A kept document repeats nothing: its line names no other document (was `"of_path": "", "of_ordinal": 0`).
    assert!(
        heavy.get("of_path").is_none() && heavy.get("of_ordinal").is_none(),
        "{heavy}"
    );

    // 3. The run (preprocessing only) drops exactly these documents and reports the same counts.
    let (good, so, se) = lexflow_output(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(good, "{so}\n{se}");
    let run = tmp.path().join("run");
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["dedup"]["per_lang"], report["per_lang"]);
    let key = |d: &Value| {
        (
            d["lang"].to_string(),
            d["file"].as_u64().unwrap(),
            d["ordinal"].as_u64().unwrap(),
            d["verdict"].to_string(),
            d["of_path"].to_string(),
        )
    };
    let dropped_audit: BTreeSet<_> = docs
        .iter()
        .filter(|d| d["verdict"] != "kept")
        .map(key)
        .collect();
    let dropped_run: BTreeSet<_> = json_lines(&run.join("dedup.jsonl"))
        .iter()
        .map(key)
        .collect();
    assert_eq!(dropped_run, dropped_audit);
    // Kept documents are what the sampler took.
    for l in stats["sampler"]["languages"].as_array().unwrap() {
        let lang = l["lang"].as_str().unwrap();
        let kept = report["per_lang"][lang]["kept"].as_u64().unwrap();
        assert_eq!(l["documents"].as_u64().unwrap(), kept, "{lang}: {l}");
    }
    let documents_off = {
        let cfg_off = config(&tmp.path().join("off"), &corpus, "");
        let text = std::fs::read_to_string(&cfg_off)
            .unwrap()
            .replace("mode = \"near\"", "mode = \"off\"");
        std::fs::write(&cfg_off, text).unwrap();
        let (good, so, se) = lexflow_output(&["run", cfg_off.to_str().unwrap(), "--quiet"]);
        assert!(good, "{so}\n{se}");
        let s: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("off/run/stats.json")).unwrap(),
        )
        .unwrap();
        assert!(s.get("dedup").is_none());
        s["input"]["documents"].as_u64().unwrap()
    };
    // Off reads the same documents (dedup does not hide input), it just trains on all of them.
    assert_eq!(stats["input"]["documents"].as_u64().unwrap(), documents_off);
}

#[test]
fn copies_of_held_out_documents_are_not_trained_on() {
    let tmp = tempfile::tempdir().unwrap();
    let held = tmp.path().join("held");
    std::fs::create_dir_all(&held).unwrap();
    // The Trade Mark Regulation, held out under another name: its corpus copy must not be trained on.
    std::fs::copy(
        Path::new(CORPUS).join("L_2017154EN.01000101.xml"),
        held.join("L_2030154EN.01000101.xml"),
    )
    .unwrap();
    let extra = format!(
        "[train]\ndevices = [\"cpu\"]\nsteps = 1\n[eval]\npaths = [{:?}]\n",
        held.display().to_string()
    );
    let cfg = config(tmp.path(), Path::new(CORPUS), &extra);
    let out = tmp.path().join("audit.jsonl");
    let report: Value = serde_json::from_str(&lexflow_ok(&[
        "dedup",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(report["held_out_documents"], 1, "{report}");
    let docs = json_lines(&out);
    let hit: Vec<&Value> = docs.iter().filter(|d| d["verdict"] == "heldout").collect();
    assert_eq!(hit.len(), 1, "{hit:?}");
    assert!(hit[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("L_2017154EN.01000101.xml"));
    assert!(hit[0]["of_path"]
        .as_str()
        .unwrap()
        .ends_with("L_2030154EN.01000101.xml"));
    // Switched off, the same document is trained on.
    let off = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[dedup]\n", "[dedup]\nagainst_heldout = false\n");
    std::fs::write(&cfg, off).unwrap();
    lexflow_ok(&[
        "dedup",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(json_lines(&out).iter().all(|d| d["verdict"] != "heldout"));
}

/// A generated English corpus whose first act body is repeated, exactly and edited, by the last files of the lane.
fn corpus_with_late_copies(dir: &Path) -> PathBuf {
    let c = dir.join("corpus");
    lexflow_ok(&[
        "gen-sample",
        c.to_str().unwrap(),
        "--acts-per-language",
        "2",
        "--seed",
        "3",
    ]);
    let en = c.join("en");
    let body = std::fs::read_to_string(en.join("L_2023100EN.01000101.xml")).unwrap();
    std::fs::write(en.join("L_2099100EN.01000101.xml"), &body).unwrap();
    std::fs::write(
        en.join("L_2099200EN.01000101.xml"),
        edit(&body, " the ", " a ", 2),
    )
    .unwrap();
    c
}

fn train_config(dir: &Path, corpus: &Path, steps: u64, checkpoint_every: u64) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "dedup-train"
dir = {run:?}
seed = 5
[input]
paths = [{corpus:?}]
[sampler]
mix = {{ en = 1.0 }}
on_exhausted = "cycle"
[packer]
seq_len = 128
[shards]
count = 4
[edges]
capacity = 2
[dedup]
mode = "near"
[train]
devices = ["cpu"]
model = "tiny"
micro_batch = 2
steps = {steps}
lr = 1e-3
min_lr = 1e-3
checkpoint_every = {checkpoint_every}
keep_checkpoints = 20
[metrics]
enabled = false
"#,
        run = dir.display().to_string(),
        corpus = format!("{}/en", corpus.display()),
    );
    let p = dir.with_extension("toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_resumed_run_drops_what_the_whole_run_drops_in_every_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_with_late_copies(tmp.path());
    let steps = 50;
    let whole = tmp.path().join("whole");
    lexflow_ok(&[
        "run",
        train_config(&whole, &corpus, steps, 10).to_str().unwrap(),
        "--quiet",
    ]);
    let drops = json_lines(&whole.join("dedup.jsonl"));
    let n_files = std::fs::read_dir(corpus.join("en")).unwrap().count() as u64;
    // Both copies are dropped in the first epoch and again in the next ones (file indices count on across epochs).
    let first: Vec<&Value> = drops
        .iter()
        .filter(|d| d["file"].as_u64().unwrap() < n_files)
        .collect();
    assert_eq!(first.len(), 2, "{drops:?}");
    assert!(
        first.iter().any(|d| d["verdict"] == "exact")
            && first.iter().any(|d| d["verdict"] == "near")
    );
    assert!(
        drops.len() >= 4,
        "the run must reach the copies in a second epoch: {drops:?}"
    );
    for d in &drops {
        assert!(
            d["of_path"]
                .as_str()
                .unwrap()
                .ends_with("L_2023100EN.01000101.xml"),
            "{d}"
        );
    }
    // No trained piece comes from a dropped document (replay of every step).
    let ckpt = whole.join(format!("checkpoints/step-{steps:06}"));
    let replayed = tmp.path().join("replay.jsonl");
    lexflow_ok(&[
        "replay",
        ckpt.to_str().unwrap(),
        "--steps",
        &format!("1..={steps}"),
        "--out",
        replayed.to_str().unwrap(),
    ]);
    let dropped: BTreeSet<(u64, u64)> = drops
        .iter()
        .map(|d| (d["file"].as_u64().unwrap(), d["ordinal"].as_u64().unwrap()))
        .collect();
    let mut pieces = 0;
    for s in json_lines(&replayed) {
        for p in s["pieces"].as_array().unwrap() {
            pieces += 1;
            let id = (
                p["doc"]["file"].as_u64().unwrap(),
                p["doc"]["ordinal"].as_u64().unwrap(),
            );
            assert!(
                !dropped.contains(&id),
                "step {}: trained on dropped document {id:?}",
                s["step"]
            );
        }
    }
    assert!(pieces > 0);
    // Replaying the last steps starts from a checkpoint (step 40) and its dedup.bin: the same sequences.
    let tail = tmp.path().join("tail.jsonl");
    lexflow_ok(&[
        "replay",
        ckpt.to_str().unwrap(),
        "--steps",
        &format!("41..={steps}"),
        "--out",
        tail.to_str().unwrap(),
    ]);
    let whole_records = json_lines(&whole.join("steps.jsonl"));
    let mut checked = 0;
    for s in json_lines(&tail) {
        let rec = whole_records
            .iter()
            .find(|r| r["step"] == s["step"])
            .unwrap();
        let trained: Vec<&str> = rec["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x[1].as_str().unwrap())
            .collect();
        assert!(
            trained.contains(&s["hash"].as_str().unwrap()),
            "step {}",
            s["step"]
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * (steps - 40) as usize);
    // Cut at step 12 (the original is behind, the copies ahead: only the checkpoint's dedup state knows the
    // original) and at step 35 (second epoch), resumed: the same batches as the whole run, bit for bit.
    let whole_hashes = step_hashes(&whole);
    assert_eq!(whole_hashes.len() as u64, steps);
    for cut in [12, 35] {
        let d = tmp.path().join(format!("cut{cut}"));
        lexflow_ok(&[
            "run",
            train_config(&d, &corpus, cut, cut).to_str().unwrap(),
            "--quiet",
        ]);
        assert!(d
            .join(format!("checkpoints/step-{cut:06}/dedup.bin"))
            .exists());
        lexflow_ok(&[
            "run",
            train_config(&d, &corpus, steps, 10).to_str().unwrap(),
            "--quiet",
            "--resume",
        ]);
        assert_eq!(step_hashes(&d), whole_hashes, "cut at {cut}");
    }
}

#[test]
fn parallel_acts_are_different_law_and_kept() {
    // The bench corpus: 610 real consolidated acts (EN, FR). The founding regulations of the three European
    // Supervisory Authorities (EBA 1093/2010, EIOPA 1094/2010, ESMA 1095/2010) and the trade mark regulations
    // 207/2009 and 2017/1001 share most of their wording (n-gram Jaccard 0.60–0.84) and share LSH bands, but they are
    // different acts: none may be dropped at the default threshold. datasketch agrees on all 610 MinHash signatures.
    let bench = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/bench");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), Path::new(bench), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[sampler]\n", "[sampler]\nmix = { en = 0.5, fr = 0.5 }\n");
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.path().join("bench.jsonl");
    lexflow_ok(&[
        "dedup",
        cfg.to_str().unwrap(),
        "--texts",
        "--out",
        out.to_str().unwrap(),
    ]);
    let o = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/dedup_ref.py"
        ))
        .arg(&out)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "datasketch disagrees: {so}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let reference: Value = serde_json::from_str(so.trim()).unwrap();
    assert_eq!(reference["minhash_checked"], 610, "{reference}");
    let docs: Vec<Value> = json_lines(&out).into_iter().skip(1).collect();
    assert_eq!(docs.len(), 610);
    let sig = |name: &str| -> Vec<u64> {
        let d = docs
            .iter()
            .find(|d| d["path"].as_str().unwrap().contains(name))
            .unwrap_or_else(|| panic!("{name} not in the bench corpus"));
        assert_eq!(d["verdict"], "kept", "{name}");
        d["minhash"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let sim = |a: &[u64], b: &[u64]| {
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
    };
    for (a, b) in [
        ("CL2010R1093EN", "CL2010R1094EN"),
        ("CL2010R1093EN", "CL2010R1095EN"),
        ("CL2010R1094FR", "CL2010R1095FR"),
        ("CL2009R0207EN", "CL2017R1001EN"),
    ] {
        let s = sim(&sig(a), &sig(b));
        eprintln!("{a} ~ {b}: estimated Jaccard {s:.3}");
        assert!(s > 0.5 && s < 0.9, "{a} ~ {b}: {s}");
    }
    assert!(docs.iter().all(|d| d["verdict"] == "kept"));
}
