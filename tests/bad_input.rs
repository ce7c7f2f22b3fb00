//! Bad inputs: every bad file gives exactly one clear error (path + position + reason + hint), nothing panics, no
//! entity is ever expanded, and `lexflow parse --jsonl` reports bad files next to good ones and exits 0.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use lexflow_actors::formex::parse_bytes;
use lexflow_actors::reader::{expand_inputs, read_files_with_manifests, Quarantine, ReadError};
use lexflow_tests::lexflow_bin;

const SECRET: &str = "TOP-SECRET-4f1c9e";

fn good_xml() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/formex/L_2016119EN.01000101.xml");
    std::fs::read(&p).unwrap_or_else(|e| panic!("real corpus file {} missing: {e}", p.display()))
}

/// (file name, bytes, expected words in the reason)
fn bad_files(dir: &Path) -> Vec<(String, Vec<u8>, &'static str)> {
    let good = good_xml();
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    let mut v: Vec<(String, Vec<u8>, &'static str)> = vec![
        ("malformed.xml".into(), b"<ACT><TITLE><P>x</TITLE></ACT>".to_vec(), "malformed"),
        ("unclosed_attr.xml".into(), b"<ACT><P A=\"1>x</P></ACT>".to_vec(), "malformed"),
        ("html.xml".into(), b"<!DOCTYPE html><html><body><p>hi</p></body></html>".to_vec(), "not a FORMEX"),
        ("xhtml.xml".into(), b"<html xmlns=\"http://www.w3.org/1999/xhtml\"><p>x</p></html>".to_vec(), "not a FORMEX"),
        ("latin1.xml".into(), b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>\n<ACT><P>R\xe8glement</P></ACT>".to_vec(), "UTF-8"),
        ("latin1_undeclared.xml".into(), b"<ACT>\n<P>caf\xe9</P></ACT>".to_vec(), "UTF-8"),
        ("empty.xml".into(), Vec::new(), "empty"),
        ("text.xml".into(), b"hello, this is not xml".to_vec(), "before the root"),
        (
            "xxe.xml".into(),
            format!("<?xml version=\"1.0\"?><!DOCTYPE ACT [<!ENTITY xxe SYSTEM \"file://{}\">]><ACT><P>&xxe;</P></ACT>", secret.display())
                .into_bytes(),
            "DOCTYPE",
        ),
        (
            "laughs.xml".into(),
            br#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;"><!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]><ACT>&lol9;</ACT>"#
                .to_vec(),
            "DOCTYPE",
        ),
        ("undeclared_entity.xml".into(), b"<ACT><P>&nbsp;</P></ACT>".to_vec(), "entity"),
        ("two_roots.xml".into(), b"<ACT></ACT><ACT></ACT>".to_vec(), "second root"),
    ];
    // UTF-16 with and without BOM
    let utf16 = |be: bool, bom: bool| {
        let mut out = Vec::new();
        if bom {
            out.extend(if be { [0xFE, 0xFF] } else { [0xFF, 0xFE] });
        }
        for u in "<ACT><P>x</P></ACT>".encode_utf16() {
            out.extend(if be { u.to_be_bytes() } else { u.to_le_bytes() });
        }
        out
    };
    v.push(("utf16le.xml".into(), utf16(false, true), "UTF-16"));
    v.push(("utf16be.xml".into(), utf16(true, true), "UTF-16"));
    v.push(("utf16_nobom.xml".into(), utf16(false, false), "UTF-16"));
    // binary garbage (deterministic LCG)
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let garbage: Vec<u8> = (0..4096).map(|_| rnd() as u8).collect();
    v.push(("garbage.xml".into(), garbage, "binary"));
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"
        .iter()
        .copied()
        .chain((0..500).map(|_| rnd() as u8))
        .collect();
    v.push(("image.xml".into(), png, ""));
    // truncated real file at pseudo-random offsets
    for i in 0..12 {
        let cut = 100 + (rnd() as usize) % (good.len() - 200);
        let _ = i;
        v.push((format!("truncated_{cut}.xml"), good[..cut].to_vec(), ""));
    }
    v
}

#[test]
fn bad_inputs_give_one_error_each_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let cases = bad_files(dir.path());
    let mut paths = Vec::new();
    for (name, bytes, _) in &cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        paths.push(p);
    }
    let t = Instant::now();
    let results = read_files_with_manifests(&paths);
    assert!(
        t.elapsed().as_secs() < 20,
        "bad inputs must be rejected fast"
    );
    assert_eq!(results.len(), cases.len(), "exactly one result per file");
    let q_path = dir.path().join("run/quarantine.jsonl");
    let q = Quarantine::create(&q_path).unwrap();
    for ((path, r), (name, bytes, want)) in results.iter().zip(&cases) {
        let e = match r {
            Ok(docs) => panic!("{name}: accepted: {docs:?}"),
            Err(e) => e,
        };
        q.record(e);
        let msg = e.to_string();
        assert_eq!(e.path(), path.display().to_string(), "{name}");
        assert!(msg.contains(name.as_str()), "message names the file: {msg}");
        assert!(matches!(e, ReadError::Parse { .. }), "{name}: {msg}");
        assert!(e.line() >= 1 && e.column() >= 1, "{name}: position: {msg}");
        assert!(
            e.byte_offset() <= bytes.len() as u64,
            "{name}: offset in range: {msg}"
        );
        assert!(
            e.reason().contains(want),
            "{name}: reason `{}` lacks `{want}`",
            e.reason()
        );
        assert!(!e.hint().is_empty());
        assert!(
            !msg.contains(SECRET),
            "external entity content leaked: {msg}"
        );
        if name.starts_with("truncated") {
            assert!(
                e.reason().contains("truncated") || e.reason().contains("malformed"),
                "{name}: {msg}"
            );
        }
    }
    let lines = std::fs::read_to_string(&q_path).unwrap();
    assert_eq!(lines.lines().count(), cases.len());
    for l in lines.lines() {
        let j: serde_json::Value = serde_json::from_str(l).unwrap();
        for k in ["path", "line", "column", "byte_offset", "reason", "hint"] {
            assert!(j.get(k).is_some(), "quarantine record lacks {k}: {l}");
        }
    }
    assert_eq!(q.count(), cases.len() as u64);
}

#[test]
fn external_dtd_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.dtd");
    std::fs::write(&secret, format!("<!ENTITY leak \"{SECRET}\">")).unwrap();
    let xml = format!(
        "<!DOCTYPE ACT SYSTEM \"file://{}\"><ACT><P>plain</P></ACT>",
        secret.display()
    );
    let docs = parse_bytes("x.xml", xml.as_bytes()).unwrap();
    assert_eq!(docs[0].text, "plain");
    let xml = format!(
        "<!DOCTYPE ACT SYSTEM \"file://{}\"><ACT><P>&leak;</P></ACT>",
        secret.display()
    );
    let e = parse_bytes("x.xml", xml.as_bytes()).unwrap_err();
    assert!(!e.to_string().contains(SECRET));
}

#[test]
fn every_prefix_and_bitflip_of_a_real_file_is_handled() {
    let good = good_xml();
    let head = &good[..20_000.min(good.len())];
    for cut in (0..head.len()).step_by(97) {
        let _ = parse_bytes("cut.xml", &head[..cut]);
    }
    let mut x: u32 = 12345;
    for _ in 0..300 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let mut m = head.to_vec();
        let i = (x as usize) % m.len();
        m[i] ^= (x >> 16) as u8 | 1;
        let _ = parse_bytes("flip.xml", &m);
    }
}

#[test]
fn cli_parse_mixes_good_and_bad_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("L_2016119EN.01000101.xml");
    std::fs::write(&good, good_xml()).unwrap();
    std::fs::write(dir.path().join("bad.xml"), b"<ACT><P>x</ACT>").unwrap();
    std::fs::write(dir.path().join("page.xml"), b"<html><body/></html>").unwrap();
    let files = expand_inputs(&[dir.path().display().to_string()]).unwrap();
    assert_eq!(files.len(), 3);

    let out = Command::new(lexflow_bin())
        .args(["parse", "--jsonl"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let errors: Vec<_> = lines.iter().filter(|j| j.get("error").is_some()).collect();
    assert_eq!(errors.len(), 2);
    for e in &errors {
        assert!(e["path"].as_str().unwrap().ends_with(".xml"));
        assert!(e["line"].as_u64().unwrap() >= 1);
    }
    let doc = lines.iter().find(|j| j.get("error").is_none()).unwrap();
    assert_eq!(doc["root"], "ACT");
    assert_eq!(doc["lang"], "en");
    assert_eq!(doc["doc_type"], "regulation");
    assert_eq!(doc["celex"], "32016R0679");
    assert_eq!(doc["articles"], 99);
    assert!(doc["chars"].as_u64().unwrap() > 100_000);
    assert_eq!(doc["date"], "2016-04-27");

    // misuse: nothing matches → exit 2
    let out = Command::new(lexflow_bin())
        .args(["parse", "--jsonl"])
        .arg(dir.path().join("nope*.xml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no input matches"));
}

/// `lexflow run` on `inputs` with a mix and policy, no training; returns (exit status, stderr, run dir). Killed (and
/// reported as a hang) after two minutes.
fn run_inputs(dir: &Path, inputs: &[&Path], mix: &str, policy: &str) -> (Option<i32>, String) {
    let run_dir = dir.join(format!("run-{}", inputs.len()));
    let cfg = dir.join(format!("run-{}-{policy}.toml", inputs.len()));
    let paths: Vec<String> = inputs
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"bad\"\ndir = {:?}\nmax_sequences = 2000\n[input]\npaths = [{}]\n[sampler]\nmix = {{ {mix} }}\n\
             on_exhausted = {policy:?}\n[packer]\nseq_len = 256\n[metrics]\nenabled = false\n",
            run_dir.display().to_string(),
            paths.join(", ")
        ),
    )
    .unwrap();
    let mut child = Command::new(lexflow_bin())
        .args(["run", cfg.to_str().unwrap(), "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed().as_secs() > 120 {
            child.kill().unwrap();
            panic!("lexflow run {} hangs", cfg.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_quarantines_broken_files_of_unknown_language_and_fails_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("L_2016119EN.01000101.xml");
    std::fs::write(&good, good_xml()).unwrap();
    // No language in the name and unreadable content: the run used to count them "outside the mix", unread.
    let zip = dir.path().join("package.zip");
    std::fs::write(&zip, b"PK\x03\x04 this is not really a zip archive").unwrap();
    let qa = dir.path().join("pairs.jsonl");
    std::fs::write(&qa, b"{\"id\": \"x\", \"question\": \n").unwrap();

    let (code, err) = run_inputs(dir.path(), &[&good, &zip, &qa], "en = 1.0", "stop");
    assert_eq!(code, Some(0), "{err}");
    let run_dir = dir.path().join("run-3");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["input"]["quarantined_files"], 2, "{}", stats["input"]);
    assert_eq!(stats["input"]["files_outside_mix"], 0, "{}", stats["input"]);
    let quarantine = std::fs::read_to_string(run_dir.join("quarantine.jsonl")).unwrap();
    for f in ["package.zip", "pairs.jsonl"] {
        assert!(quarantine.contains(f), "{f} not quarantined: {quarantine}");
    }

    // Nothing readable at all: an error naming the quarantine report, not a "completed" run of nothing.
    let (code, err) = run_inputs(dir.path(), &[&zip, &qa], "en = 1.0", "stop");
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("no document was read") && err.contains("quarantine.jsonl"),
        "{err}"
    );
}

#[test]
fn a_mix_language_without_files_is_an_error_unless_the_mix_renormalizes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("L_2016119EN.01000101.xml");
    std::fs::write(&good, good_xml()).unwrap();
    // It used to "complete" with 0 sequences (a training run with 0 steps) and exit 0.
    for policy in ["stop", "cycle"] {
        let (code, err) = run_inputs(dir.path(), &[&good], "en = 0.7, de = 0.3", policy);
        assert_ne!(code, Some(0), "{policy}: {err}");
        assert!(
            err.contains("`de` (no input file)")
                && err.contains("en 1")
                && err.contains("remove it from sampler.mix")
                && err.contains("renormalize"),
            "{policy}: {err}"
        );
        assert!(
            !dir.path().join("run-1/stats.json").exists(),
            "{policy}: the run started"
        );
    }
    let (code, err) = run_inputs(dir.path(), &[&good], "en = 0.7, de = 0.3", "renormalize");
    assert_eq!(code, Some(0), "{err}");
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run-1/stats.json")).unwrap(),
    )
    .unwrap();
    assert!(
        stats["packer"]["sequences"].as_u64().unwrap() > 0,
        "{}",
        stats["packer"]
    );
}

#[test]
fn a_training_run_whose_input_ends_before_train_steps_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // A short act: 10 steps of 256 tokens.
    let good = dir.path().join("L_2018127EN.01000201.xml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/corpus/formex/L_2018127EN.01000201.xml"),
        &good,
    )
    .unwrap();
    let run_dir = dir.path().join("run");
    let cfg = dir.path().join("short.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"short\"\ndir = {:?}\n[input]\npaths = [{:?}]\n[sampler]\nmix = {{ en = 1.0 }}\n\
             [packer]\nseq_len = 256\n[train]\ndevices = [\"cpu\"]\nmodel = \"tiny\"\nsteps = 100000\n\
             checkpoint_every = 100000\n[metrics]\nenabled = false\n",
            run_dir.display().to_string(),
            good.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(lexflow_bin())
        .args(["run", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Running out of data is not a failure, but it is said, with the numbers, in the log and the summary.
    assert!(out.status.success(), "{stderr}");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("stats.json")).unwrap())
            .unwrap();
    let steps = stats["train"]["steps"].as_u64().unwrap();
    assert!(steps > 0 && steps < 100000, "{}", stats["train"]);
    assert_eq!(stats["train"]["target_steps"], 100000);
    let said =
        format!("the input ran out after {steps} of train.steps = 100000 steps (exhausted: en)");
    assert_eq!(stderr.matches(&said).count(), 2, "{said}\n{stderr}");
}

#[test]
fn a_cycling_language_whose_files_all_fail_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("L_2016119EN.01000101.xml");
    std::fs::write(&good, good_xml()).unwrap();
    let bad = dir.path().join("L_2099001FR.01000101.xml");
    std::fs::write(&bad, b"<ACT><P>tronqu").unwrap();
    let (code, err) = run_inputs(dir.path(), &[&good, &bad], "en = 0.5, fr = 0.5", "cycle");
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("language fr") && err.contains("repeat forever"),
        "{err}"
    );
}

#[test]
fn an_input_that_cannot_be_read_fails_the_run_instead_of_being_skipped() {
    // A file listed at start that the reader then cannot read (here: /proc/self/mem, whose first page read fails
    // with EIO even for root) is an I/O failure, not bad input: quarantining it would change the run's stream.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("L_2016119EN.01000101.xml");
    std::fs::write(&good, good_xml()).unwrap();
    let broken = dir.path().join("L_2099003EN.01000101.xml");
    std::os::unix::fs::symlink("/proc/self/mem", &broken).unwrap();
    assert!(
        std::fs::read(&broken).is_err(),
        "/proc/self/mem is readable here: the test means nothing"
    );
    let (code, err) = run_inputs(dir.path(), &[&good, &broken], "en = 1.0", "stop");
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("L_2099003EN.01000101.xml")
            && err.contains("cannot read")
            && err.contains("--resume"),
        "{err}"
    );
}

/// `lexflow` with `args` in `dir`: (exit code, stderr).
fn lexflow_in(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(lexflow_bin())
        .args(args)
        .current_dir(dir)
        .env("LEXFLOW_LOG", "json")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bad configs given to `lexflow run`: exit 1 before anything is written into `run.dir`, and every error names the
/// file, the key and its line and says what is wrong — never a panic.
#[test]
fn bad_configs_fail_the_run_up_front_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[run]\nname = \"bad\"\ndir = \"out\"\n";
    let train = "[train]\ndevices = [\"cpu\"]\nsteps = 1\n";
    // (config after `base`, expected pieces of the message)
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "[packer]\nseq_len = 0\n".into(),
            vec!["c.toml:5", "packer.seq_len", "at least 2"],
        ),
        (
            "[edges]\ncapacity = 0\n".into(),
            vec!["c.toml:5", "edges.capacity", "bounded"],
        ),
        (
            "[reader]\nthreads = \"2\"\n".into(),
            vec!["c.toml:5", "reader.threads", "invalid type"],
        ),
        (
            "[packer]\nsequence_len = 4\n".into(),
            vec!["c.toml:5", "sequence_len", "expected one of"],
        ),
        (
            "[sampler]\nmix = { en = 0.5, fr = 0.4 }\n".into(),
            vec!["line 5: key `sampler.mix`", "sum to 0.9"],
        ),
        (
            "[sampler]\nmix = { en = 1.2, fr = -0.2 }\n".into(),
            vec!["line 5: key `sampler.mix.fr`", "(0, 1]"],
        ),
        (
            "[input]\npaths = [\"c\"]\n[sampler]\nmix = { en = 0.5, xx = 0.5 }\n".into(),
            vec!["line 7: key `sampler.mix`", "`xx`", "EU language"],
        ),
        (
            "[sampler]\nmix = { en = 0.5, it = 0.5 }\n".into(),
            vec!["key `input.generate.languages`", "sampler.mix has it"],
        ),
        (
            "[input]\npaths = [\"/no/such/corpus\"]\n".into(),
            vec![
                "line 5: key `input.paths`",
                "/no/such/corpus does not exist",
            ],
        ),
        (
            "[tokenizer]\npath = \"no-tokenizer.json\"\n".into(),
            vec!["line 5: key `tokenizer.path`", "not found"],
        ),
        (
            format!("{train}init_from = \"/no/ckpt\"\n"),
            vec!["line 7: key `train.init_from`", "does not exist"],
        ),
        (
            format!("{train}[eval]\nevery = 5\n"),
            vec!["line 8: key `eval.every`", "nothing to evaluate"],
        ),
        (
            format!("{train}[eval]\nqa_gold = \"/no/g.jsonl\"\n"),
            vec!["line 8: key `eval.qa_gold`", "does not exist"],
        ),
        (
            format!("{train}[eval]\nholdout = 0.9\n"),
            vec!["line 8: key `eval.holdout`", "[0, 0.5]"],
        ),
        (
            format!("{train}[shards]\nranks = 2\n"),
            vec!["line 8: key `shards.ranks`", "train.devices"],
        ),
        (
            "[train]\ndevices = [\"cuda:0\", \"cuda:0\"]\nsteps = 1\n".into(),
            vec!["line 5: key `train.devices`", "twice"],
        ),
        (
            "[train]\ndevices = [\"cpu\"]\n".into(),
            vec!["c.toml:4", "train", "missing field `steps`"],
        ),
        (
            "[dedup]\nmode = \"near\"\nrows = 0\n".into(),
            vec!["line 6: key `dedup.rows`"],
        ),
    ];
    for (body, want) in cases {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, format!("{base}{body}")).unwrap();
        let (code, err) = lexflow_in(dir.path(), &["run", "c.toml"]);
        assert_eq!(code, Some(1), "{body}: {err}");
        assert!(!err.contains("panicked"), "{body}: {err}");
        for w in want {
            assert!(err.contains(w), "{body}: want {w:?} in {err}");
        }
        assert!(
            !dir.path().join("out").exists(),
            "{body}: the run started: {err}"
        );
    }
    // A config that cannot be read: the reason once, and where relative paths start.
    let (code, err) = lexflow_in(dir.path(), &["run", "missing.toml"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(
        err.contains("missing.toml") && err.contains("working directory"),
        "{err}"
    );
}

/// What `lexflow config` prints is a config `lexflow config` (and so `lexflow run`) accepts again.
#[test]
fn printed_config_is_accepted_again() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(lexflow_bin()).arg("config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.path().join("printed.toml"), &out.stdout).unwrap();
    let (code, err) = lexflow_in(dir.path(), &["config", "printed.toml"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Command-line misuse is refused before any work, with exit code 2 and the option named.
#[test]
fn conflicting_or_empty_cli_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g.jsonl"), "").unwrap();
    std::fs::write(dir.path().join("p.jsonl"), "").unwrap();
    for (args, want) in [
        (&["qa", "eval", "--gold", "g.jsonl"][..], "--predictions"),
        (
            &[
                "qa",
                "eval",
                "--gold",
                "g.jsonl",
                "--predictions",
                "p.jsonl",
                "--model",
                "m",
            ][..],
            "cannot be used with",
        ),
        (
            &[
                "qa",
                "eval",
                "--gold",
                "g.jsonl",
                "--predictions",
                "p.jsonl",
                "--temperature",
                "0.7",
            ][..],
            "--temperature",
        ),
        (
            &[
                "qa",
                "eval",
                "--gold",
                "g.jsonl",
                "--predictions",
                "p.jsonl",
                "--template",
                "llama3",
            ][..],
            "--template",
        ),
        (
            &["generate", "m", "--prompt", "x", "--max-new-tokens", "0"][..],
            "--max-new-tokens",
        ),
        (
            &["generate", "m", "--prompt", "x", "--batch-size", "0"][..],
            "--batch-size",
        ),
        (
            &["gen-sample", "out", "--acts-per-language", "0"][..],
            "--acts-per-language",
        ),
    ] {
        let (code, err) = lexflow_in(dir.path(), args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    assert!(!dir.path().join("out").exists());
    // A negative temperature reaches the check that explains it (clap took `-1` for a flag before).
    let (code, err) = lexflow_in(
        dir.path(),
        &["generate", "m", "--prompt", "x", "--temperature", "-1"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--temperature -1: must be"), "{err}");
}
