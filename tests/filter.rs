//! The quality filter (`[filter]`, `docs/FILTER.md`), end to end:
//! * on the real FORMEX corpus, `lexflow filter` lists every document the run would decide on (checked against
//!   `lexflow parse`), keeps `round(keep_fraction · n)` per language, ranks by score; a planted weight change (length
//!   only, recency only) keeps what that criterion alone says (the longest documents by `lexflow parse`'s count, the
//!   newest ones) and changes the verdicts; `lexflow run` trains exactly the documents it keeps, at the token-exact
//!   mix;
//! * the stream's decisions and sequences are the same for any thread count;
//! * a training run cut and resumed trains bit for bit the batches of the whole run (the cut comes from the
//!   checkpoint's `filter.json`), a resume with another `[filter]` is refused, a replay trains no dropped document.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use lexflow_actors::pipeline::{run, RunOptions};
use lexflow_tests::{json_lines, lexflow_ok, lexflow_output, step_hashes};
use serde_json::Value;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/formex");

/// A preprocessing config over `inputs` (three languages of the real corpus; `renormalize`, so that every document
/// of every lane is sampled) with `filter` as its `[filter]` body.
fn config(dir: &Path, inputs: &str, filter: &str, threads: usize) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "filter"
dir = {run:?}
[input]
paths = [{inputs:?}]
[reader]
threads = {threads}
[tokenizer]
threads = {threads}
[sampler]
mix = {{ en = 0.5, fr = 0.3, es = 0.2 }}
on_exhausted = "renormalize"
[packer]
seq_len = 512
[shards]
count = 4
arrow_dir = {arrow:?}
[edges]
capacity = 2
[metrics]
enabled = false
[filter]
{filter}
"#,
        run = dir.join("run").display().to_string(),
        arrow = dir.join("run/arrow").display().to_string(),
    );
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn audit(cfg: &Path, out: &Path) -> (Value, Vec<Value>) {
    let report: Value = serde_json::from_str(&lexflow_ok(&[
        "filter",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]))
    .unwrap();
    (report, json_lines(out))
}

/// (path, ordinal) of the kept documents of a listing.
fn kept(docs: &[Value]) -> BTreeSet<(String, u64)> {
    docs.iter()
        .filter(|d| d["verdict"] == "kept")
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["ordinal"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn by_lang(docs: &[Value]) -> BTreeMap<String, Vec<&Value>> {
    let mut m: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for d in docs {
        m.entry(d["lang"].as_str().unwrap().to_string())
            .or_default()
            .push(d);
    }
    m
}

#[test]
fn the_listing_keeps_the_best_share_per_language_and_a_weight_change_flips_verdicts() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), CORPUS, "keep_fraction = 0.4", 1);
    let (report, docs) = audit(&cfg, &tmp.path().join("v.jsonl"));

    // Every document with text of the three languages, as `lexflow parse` reads them (manifests have none).
    let mut files: Vec<String> = std::fs::read_dir(CORPUS)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".xml"))
        .collect();
    files.sort();
    let mut args = vec!["parse"];
    args.extend(files.iter().map(String::as_str));
    let parsed: Vec<Value> = lexflow_ok(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (file, ordinal in the file, language) → characters.
    type Key = (String, u64, String);
    let mut ordinals: BTreeMap<String, u64> = BTreeMap::new();
    let mut chars: BTreeMap<Key, u64> = BTreeMap::new();
    for d in &parsed {
        let path = d["path"].as_str().unwrap().to_string();
        let o = ordinals.entry(path.clone()).or_insert(0);
        let n = d["chars"].as_u64().unwrap_or(0);
        if n > 0 {
            chars.insert((path, *o, d["lang"].as_str().unwrap_or("").to_string()), n);
        }
        *o += 1;
    }
    let listed: BTreeMap<Key, u64> = docs
        .iter()
        .map(|d| {
            (
                (
                    d["path"].as_str().unwrap().to_string(),
                    d["ordinal"].as_u64().unwrap(),
                    d["lang"].as_str().unwrap().to_string(),
                ),
                d["chars"].as_u64().unwrap(),
            )
        })
        .collect();
    let wanted: BTreeMap<Key, u64> = chars
        .into_iter()
        .filter(|((_, _, l), _)| ["en", "fr", "es"].contains(&l.as_str()))
        .collect();
    assert_eq!(listed, wanted, "the listing vs lexflow parse");

    // Per language: round(0.4 n) kept (within one document), each kept one scoring at least every dropped one, the
    // report's counts those of the listing.
    let langs = by_lang(&docs);
    assert_eq!(langs.keys().collect::<Vec<_>>(), ["en", "es", "fr"]);
    for (lang, ds) in &langs {
        let n = ds.len() as f64;
        let k = ds.iter().filter(|d| d["verdict"] == "kept").count() as f64;
        assert!((k - 0.4 * n).abs() <= 1.0, "{lang}: {k} of {n}");
        let min_kept = ds
            .iter()
            .filter(|d| d["verdict"] == "kept")
            .map(|d| d["score"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        let max_dropped = ds
            .iter()
            .filter(|d| d["verdict"] != "kept")
            .map(|d| d["score"].as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(min_kept >= max_dropped, "{lang}");
        let r = &report["per_lang"][lang];
        assert_eq!(r["kept"].as_f64().unwrap(), k, "{lang}: {r}");
        let dropped: u64 = r["dropped"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(dropped as f64, n - k, "{lang}: {r}");
        for d in ds.iter().filter(|d| d["verdict"] == "dropped") {
            assert!(
                ["recency", "type", "length"].contains(&d["reason"].as_str().unwrap()),
                "{d}"
            );
        }
    }

    // Planted weight changes. Length only: the kept documents are the longest ones (lexflow parse's counts).
    let only = |w: &str| {
        let d = tmp.path().join(w);
        let c = config(
            &d,
            CORPUS,
            &format!(
                // length_full beyond every document: no two lengths tie at the cap.
                "keep_fraction = 0.4\nlength_full = 1000000000\n\
                 weights = {{ recency = {}, type = 0, length = {}, subject = 0 }}",
                u8::from(w == "recency"),
                u8::from(w == "length")
            ),
            1,
        );
        audit(&c, &d.join("v.jsonl")).1
    };
    let long = only("length");
    for (lang, ds) in by_lang(&long) {
        let mut lens: Vec<u64> = ds
            .iter()
            .map(|d| {
                wanted[&(
                    d["path"].as_str().unwrap().to_string(),
                    d["ordinal"].as_u64().unwrap(),
                    lang.clone(),
                )]
            })
            .collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let k = ds.iter().filter(|d| d["verdict"] == "kept").count();
        let shortest_kept = ds
            .iter()
            .filter(|d| d["verdict"] == "kept")
            .map(|d| d["chars"].as_u64().unwrap())
            .min()
            .unwrap();
        // The k-th longest length (ties at the cut may go either way, lengths above it may not).
        assert!(shortest_kept >= lens[k - 1], "{lang}");
        assert!(
            ds.iter()
                .filter(|d| d["verdict"] != "kept")
                .all(|d| d["chars"].as_u64().unwrap() <= lens[k - 1]),
            "{lang}"
        );
    }
    // Recency only: no dropped document is newer than a kept one.
    let new = only("recency");
    for (lang, ds) in by_lang(&new) {
        let year = |d: &Value| {
            d["date"]
                .as_str()
                .map_or(0, |s| s[..4].parse::<u32>().unwrap())
        };
        let oldest_kept = ds
            .iter()
            .filter(|d| d["verdict"] == "kept")
            .map(|d| year(d))
            .min()
            .unwrap();
        let scale_step = |y: u32| {
            [2020, 2015, 2010, 2000, 1990, 1950]
                .iter()
                .position(|s| y >= *s)
        };
        for d in ds.iter().filter(|d| d["verdict"] != "kept") {
            // Years within one step of the scale score the same: ranked by the tie-break, not by year.
            assert!(
                scale_step(year(d)) >= scale_step(oldest_kept) || scale_step(year(d)).is_none(),
                "{lang}: dropped {d} is newer than a kept document of {oldest_kept}"
            );
        }
    }
    let (a, b, c) = (kept(&docs), kept(&long), kept(&new));
    assert_ne!(a, b, "a length-only filter keeps what the default keeps");
    assert_ne!(a, c, "a recency-only filter keeps what the default keeps");
    assert_ne!(b, c);

    // The run trains exactly the kept documents (every lane is read to its end under renormalize), at the mix.
    let (good, so, se) = lexflow_output(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(good, "{so}\n{se}");
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run/stats.json")).unwrap())
            .unwrap();
    for l in stats["sampler"]["languages"].as_array().unwrap() {
        let lang = l["lang"].as_str().unwrap();
        let k = langs[lang]
            .iter()
            .filter(|d| d["verdict"] == "kept")
            .count() as u64;
        assert_eq!(l["documents"].as_u64().unwrap(), k, "{lang}: {l}");
        assert_eq!(stats["filter"]["per_lang"][lang]["kept"].as_u64(), Some(k));
        assert_eq!(
            stats["filter"]["per_lang"][lang]["documents"].as_u64(),
            Some(langs[lang].len() as u64)
        );
    }
    assert_eq!(stats["filter"]["cuts"], {
        let mut m = serde_json::Map::new();
        for (l, r) in report["per_lang"].as_object().unwrap() {
            m.insert(l.clone(), r["cut"].clone());
        }
        Value::Object(m)
    });
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run/filter.json")).unwrap())
            .unwrap();
    assert_eq!(state["lanes"].as_array().unwrap().len(), 3);
    assert!(stats["filter"]["first_pass_seconds"].as_f64().unwrap() > 0.0);
}

fn opts() -> RunOptions {
    RunOptions {
        resume: false,
        progress: false,
        origin: "test".into(),
        replay: None,
    }
}

fn sequences(dir: &Path) -> Vec<lexflow_actors::types::PackedSequence> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("run/arrow"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut v: Vec<_> = files
        .iter()
        .flat_map(|f| lexflow_actors::arrow_tee::read_sequences(f).unwrap())
        .collect();
    v.sort_by_key(|s| s.index);
    v
}

#[test]
fn decisions_and_sequences_do_not_depend_on_thread_counts_and_the_mix_stays_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    lexflow_ok(&[
        "gen-sample",
        corpus.to_str().unwrap(),
        "--acts-per-language",
        "8",
        "--languages",
        "en,fr,es",
    ]);
    // `stop`: the stream ends when the first language runs out, so every language is live throughout and the mix
    // is exact over the whole stream.
    let run_with = |threads: usize, filter: &str| {
        let d = tmp.path().join(format!("t{threads}-{}", filter.len()));
        let c = config(&d, corpus.to_str().unwrap(), filter, threads);
        let mut cfg = lexflow_actors::config::Config::from_file(&c).unwrap();
        cfg.sampler.on_exhausted = lexflow_actors::config::ExhaustedPolicy::Stop;
        let stats = run(&cfg, &opts()).unwrap();
        (stats, sequences(&d))
    };
    let (s1, q1) = run_with(1, "keep_fraction = 0.5");
    let (s4, q4) = run_with(4, "keep_fraction = 0.5");
    assert!(q1.len() > 5, "{}", q1.len());
    assert!(q1 == q4, "1 and 4 threads gave different sequences");
    let (f1, f4) = (s1.filter.clone().unwrap(), s4.filter.unwrap());
    assert_eq!(f1.cuts, f4.cuts);
    for (lang, c) in &f1.cuts {
        let lexflow_actors::stages::filter::LaneCut::Fraction {
            documents, keep, ..
        } = c
        else {
            panic!("{lang}: {c:?}")
        };
        assert!(
            (*keep as f64 - 0.5 * *documents as f64).abs() <= 1.0,
            "{lang}: {c:?}"
        );
        assert!(*documents > 10, "{lang}: {c:?}");
    }
    // Threshold 0 keeps every document.
    let (s0, _) = run_with(1, "threshold = 0");
    let f0 = s0.filter.as_ref().unwrap();
    assert!(f0
        .per_lang
        .values()
        .all(|r| r.kept == r.documents && r.documents > 0));
    // No trained piece comes from a document the listing drops (lanes in the mix's order: en, es, fr).
    let c = config(
        &tmp.path().join("audit"),
        corpus.to_str().unwrap(),
        "keep_fraction = 0.5",
        1,
    );
    let (_, verdicts) = audit(&c, &tmp.path().join("audit/v.jsonl"));
    let dropped: BTreeSet<(String, u64, u64)> = verdicts
        .iter()
        .filter(|d| d["verdict"] == "dropped")
        .map(|d| {
            (
                d["lang"].as_str().unwrap().to_string(),
                d["file"].as_u64().unwrap(),
                d["ordinal"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(!dropped.is_empty());
    let lanes = ["en", "es", "fr"];
    for p in q1.iter().flat_map(|s| &s.pieces) {
        let id = (
            lanes[p.doc.lane as usize].to_string(),
            p.doc.file as u64,
            p.doc.ordinal as u64,
        );
        assert!(!dropped.contains(&id), "trained on dropped {id:?}");
    }
    // The language mix is token-exact over the kept documents: within the longest document of the target.
    let total = s1.sampler.total_tokens as f64;
    let mut per_doc = BTreeMap::new();
    for p in q1.iter().flat_map(|s| &s.pieces) {
        *per_doc.entry(p.doc).or_insert(0u64) += (p.end - p.start) as u64;
    }
    let longest = per_doc.values().copied().max().unwrap() as f64;
    for l in &s1.sampler.languages {
        let dev = (l.tokens as f64 - l.target_share * total).abs();
        assert!(
            dev <= longest,
            "{}: {dev} tokens off the target (longest document {longest})",
            l.lang
        );
    }
}

/// A generated English corpus and a training config over it with `[filter]` `filter`.
fn train_config(
    dir: &Path,
    corpus: &Path,
    steps: u64,
    checkpoint_every: u64,
    filter: &str,
) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "filter-train"
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
[filter]
{filter}
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
fn a_resumed_run_keeps_the_checkpoints_cut_and_trains_what_the_whole_run_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    lexflow_ok(&[
        "gen-sample",
        corpus.to_str().unwrap(),
        "--acts-per-language",
        "3",
        "--languages",
        "en",
        "--seed",
        "3",
    ]);
    let filter = "keep_fraction = 0.5";
    let steps = 40;
    let whole = tmp.path().join("whole");
    let wcfg = train_config(&whole, &corpus, steps, 8, filter);
    lexflow_ok(&["run", wcfg.to_str().unwrap(), "--quiet"]);
    let ckpt = whole.join(format!("checkpoints/step-{steps:06}"));
    let state = std::fs::read_to_string(ckpt.join("filter.json")).unwrap();
    assert_eq!(
        state,
        std::fs::read_to_string(whole.join("filter.json")).unwrap()
    );

    // The documents the filter drops (its listing) are never trained on (replay of every step).
    let (_, verdicts) = audit(&wcfg, &tmp.path().join("v.jsonl"));
    let dropped: BTreeSet<(u64, u64)> = verdicts
        .iter()
        .filter(|d| d["verdict"] == "dropped")
        .map(|d| (d["file"].as_u64().unwrap(), d["ordinal"].as_u64().unwrap()))
        .collect();
    assert!(!dropped.is_empty());
    let n_files = std::fs::read_dir(corpus.join("en")).unwrap().count() as u64;
    let replayed = tmp.path().join("replay.jsonl");
    lexflow_ok(&[
        "replay",
        ckpt.to_str().unwrap(),
        "--steps",
        &format!("1..={steps}"),
        "--out",
        replayed.to_str().unwrap(),
    ]);
    let mut trained = BTreeSet::new();
    for s in json_lines(&replayed) {
        for p in s["pieces"].as_array().unwrap() {
            let id = (
                p["doc"]["file"].as_u64().unwrap() % n_files,
                p["doc"]["ordinal"].as_u64().unwrap(),
            );
            assert!(
                !dropped.contains(&id),
                "step {}: trained on dropped {id:?}",
                s["step"]
            );
            trained.insert(id);
        }
    }
    assert!(!trained.is_empty());
    assert!(
        json_lines(&replayed)
            .iter()
            .any(|s| s["pieces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["doc"]["file"].as_u64().unwrap() >= n_files)),
        "the run must reach a second epoch"
    );

    // Cut at step 14 and resumed: the same batches as the whole run, bit for bit.
    let whole_hashes = step_hashes(&whole);
    assert_eq!(whole_hashes.len() as u64, steps);
    let d = tmp.path().join("cut");
    lexflow_ok(&[
        "run",
        train_config(&d, &corpus, 14, 14, filter).to_str().unwrap(),
        "--quiet",
    ]);
    // A resume with another [filter] is refused before it trains, naming the key.
    let (good, _, se) = lexflow_output(&[
        "run",
        train_config(&d, &corpus, steps, 8, "keep_fraction = 0.6")
            .to_str()
            .unwrap(),
        "--quiet",
        "--resume",
    ]);
    assert!(!good && se.contains("filter.keep_fraction"), "{se}");
    lexflow_ok(&[
        "run",
        train_config(&d, &corpus, steps, 8, filter)
            .to_str()
            .unwrap(),
        "--quiet",
        "--resume",
    ]);
    assert_eq!(step_hashes(&d), whole_hashes);
}

#[test]
fn misconfigured_filters_are_errors_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(
        tmp.path(),
        CORPUS,
        "keep_fraction = 0\ntypes = { statute = 1.0 }",
        1,
    );
    let (good, _, se) = lexflow_output(&["config", c.to_str().unwrap()]);
    assert!(!good);
    assert!(se.contains("key `filter.keep_fraction`"), "{se}");
    assert!(se.contains("key `filter.types.statute`"), "{se}");
    // `lexflow filter` on a config without [filter] says what to add.
    let text = std::fs::read_to_string(&c).unwrap();
    let (head, _) = text.split_once("[filter]").unwrap();
    std::fs::write(&c, head).unwrap();
    let (good, _, se) = lexflow_output(&["filter", c.to_str().unwrap()]);
    assert!(!good && se.contains("[filter]"), "{se}");
    // … unless --keep-fraction supplies the rule.
    let report: Value = serde_json::from_str(&lexflow_ok(&[
        "filter",
        c.to_str().unwrap(),
        "--keep-fraction",
        "0.25",
    ]))
    .unwrap();
    assert_eq!(report["keep_fraction"], 0.25);
}
