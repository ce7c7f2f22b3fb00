//! The Arrow tee read by an independent implementation: sequences written with `ArrowTee` (seeded, random) are read
//! back by pyarrow (`scripts/check_arrow.py`, `pyarrow.ipc.open_file`), exported as JSON and compared value by value.
//! Python with pyarrow is required (the venv from `scripts/setup.sh`); the test fails, never skips, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use lexflow_actors::arrow_tee::{read_sequences, shard_file_name, ArrowTee, TeeMeta, META_KEY};
use lexflow_actors::types::{DocId, PackedSequence, Piece};
use serde_json::Value;

/// splitmix64: a seeded generator without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The venv's python (`$LEXFLOW_VENV`, else `~/.cache/lexflow/venv`), else `python3` on PATH.
fn python() -> PathBuf {
    let venv = std::env::var_os("LEXFLOW_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lexflow/venv")));
    if let Some(v) = venv {
        let p = v.join("bin/python");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("python3")
}

/// Sequences shaped like the packer's: doc_starts at piece boundaries, padding at the end, varied pieces.
fn sequences(rng: &mut Rng, n: usize, seq_len: usize, shards: u32) -> Vec<PackedSequence> {
    (0..n)
        .map(|i| {
            let total = seq_len + 1;
            let padding = if rng.below(4) == 0 {
                rng.below(total as u64 / 2) as usize
            } else {
                0
            };
            let mut tokens: Vec<u32> = (0..total - padding)
                .map(|_| rng.below(128_256) as u32)
                .collect();
            tokens.extend(std::iter::repeat_n(128_001, padding));
            let (mut pieces, mut doc_starts, mut off) = (Vec::new(), Vec::new(), 0usize);
            while off < total - padding {
                let len = 1 + rng.below((total - padding - off).min(300) as u64) as usize;
                let start = if pieces.is_empty() {
                    rng.below(5000) as u32
                } else {
                    0
                };
                doc_starts.push(off as u32);
                pieces.push(Piece {
                    doc: DocId {
                        lane: rng.below(5) as u16,
                        file: rng.next() as u32,
                        ordinal: rng.below(8) as u32,
                    },
                    start,
                    end: start + len as u32,
                    offset: off as u32,
                    loss_from: 0,
                });
                off += len;
            }
            if doc_starts.is_empty() {
                doc_starts.push(0);
            }
            // Spread indices over the whole u64 range to catch any precision loss (JSON, doubles).
            let index = if i % 7 == 3 {
                u64::MAX - i as u64
            } else {
                i as u64 * 1_000_003
            };
            // Some sequences carry prompt masks (instruction data).
            let no_loss = if i % 3 == 1 {
                let a = rng.below(seq_len as u64 / 2) as u32;
                vec![[a, a + 1 + rng.below(40) as u32], [a + 60, a + 61]]
            } else {
                Vec::new()
            };
            PackedSequence {
                index,
                tokens,
                doc_starts,
                pieces,
                padding: padding as u32,
                no_loss,
                shard: rng.below(shards as u64) as u32,
                resume: None,
            }
        })
        .collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| u(x) as u32)
        .collect()
}

fn seq_from_json(row: &Value) -> PackedSequence {
    let pieces = row["pieces"]
        .as_array()
        .expect("pieces is a list")
        .iter()
        .map(|p| Piece {
            doc: DocId {
                lane: u(&p["lane"]) as u16,
                file: u(&p["file"]) as u32,
                ordinal: u(&p["ordinal"]) as u32,
            },
            start: u(&p["start"]) as u32,
            end: u(&p["end"]) as u32,
            offset: u(&p["offset"]) as u32,
            loss_from: 0,
        })
        .collect();
    PackedSequence {
        index: u(&row["index"]),
        tokens: u32s(&row["tokens"]),
        doc_starts: u32s(&row["doc_starts"]),
        pieces,
        padding: u(&row["padding"]) as u32,
        no_loss: u32s(&row["no_loss"])
            .chunks(2)
            .map(|c| [c[0], c[1]])
            .collect(),
        shard: u(&row["shard"]) as u32,
        resume: None,
    }
}

#[test]
fn pyarrow_reads_every_value_the_tee_wrote() {
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import pyarrow, sys; print(pyarrow.__version__)"])
        .output();
    match &probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{} cannot import pyarrow (run scripts/setup.sh or `source scripts/env.sh`): {}",
            py.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {} (python with pyarrow is required for this test): {e}",
            py.display()
        ),
    }

    let dir = tempfile::tempdir().unwrap();
    let (seq_len, shards) = (255usize, 5usize);
    let meta = TeeMeta {
        seq_len,
        tokenizer: "llama3".into(),
        run: "pyarrow-check ✓".into(),
    };
    let mut rng = Rng(0x1e8f_10e5);
    // 400 rows over 5 shards: every shard gets several full 64-row batches and a partial one.
    let written = sequences(&mut rng, 400, seq_len, shards as u32 - 1);
    let mut tee = ArrowTee::create(dir.path(), shards, meta.clone()).unwrap();
    for s in &written {
        tee.write(s).unwrap();
    }
    let summary = tee.finish().unwrap();
    assert_eq!(summary.sequences, 400);

    let script = repo_root().join("scripts/check_arrow.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("run check_arrow.py");
    assert!(
        out.status.success(),
        "check_arrow.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("check_arrow.py prints JSON");
    let files = report["files"].as_object().expect("files object");
    assert_eq!(
        files.len(),
        shards,
        "one file per shard (the last shard is empty but present): {:?}",
        files.keys()
    );

    let mut seen = 0;
    for shard in 0..shards {
        let name = shard_file_name(shard);
        let f = &files[&name];
        let want: Vec<PackedSequence> = written
            .iter()
            .filter(|s| s.shard as usize == shard)
            .cloned()
            .collect();
        let got: Vec<PackedSequence> = f["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(seq_from_json)
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: row count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                g, w,
                "{name}: sequence {} differs as read by pyarrow",
                w.index
            );
        }
        // The Rust reader agrees too.
        assert_eq!(
            read_sequences(&dir.path().join(&name)).unwrap(),
            want,
            "{name}: Rust reader"
        );
        seen += got.len();

        // Schema and metadata, as pyarrow sees them.
        let schema: Vec<(String, String)> = f["schema"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c[0].as_str().unwrap().to_string(),
                    c[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let names: Vec<&str> = schema.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "index",
                "shard",
                "tokens",
                "doc_starts",
                "padding",
                "pieces",
                "no_loss"
            ],
            "{name}"
        );
        assert_eq!(schema[0].1, "uint64");
        assert_eq!(schema[1].1, "uint32");
        assert!(
            schema[2].1.starts_with("list<item: uint32"),
            "{}",
            schema[2].1
        );
        assert!(
            schema[5].1.contains("lane: uint16") && schema[5].1.contains("offset: uint32"),
            "{}",
            schema[5].1
        );
        let m: Value = serde_json::from_str(
            f["metadata"][META_KEY]
                .as_str()
                .expect("lexflow metadata key"),
        )
        .unwrap();
        assert_eq!(u(&m["seq_len"]), seq_len as u64);
        assert_eq!(m["tokenizer"], "llama3");
        assert_eq!(m["run"], meta.run.as_str());
        assert_eq!(u(&m["shard"]), shard as u64);
        assert_eq!(u(&m["shards"]), shards as u64);

        let rows = want.len() as u64;
        assert_eq!(
            u(&f["num_batches"]),
            rows.div_ceil(64),
            "{name}: one batch per 64 rows"
        );
        assert_eq!(
            u(&f["bytes"]),
            std::fs::metadata(dir.path().join(&name)).unwrap().len()
        );
        if rows > 0 {
            // Padding runs compress; pyarrow's uncompressed rewrite of the same table is larger.
            let (b, raw) = (u(&f["bytes"]), u(&f["uncompressed_bytes"]));
            assert!(
                b < raw,
                "{name}: not compressed: {b} bytes vs {raw} uncompressed"
            );
        }
    }
    assert_eq!(seen, 400);
    assert_eq!(summary.rows_per_shard[shards - 1], 0);
}

/// A `no_loss` list of odd length (not `[start, end)` pairs) is refused with the file named, never half-read: pyarrow
/// rewrites one row of a file the tee wrote (schema and metadata kept), and `read_sequences` must say what is wrong.
#[test]
fn odd_no_loss_list_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let meta = TeeMeta {
        seq_len: 31,
        tokenizer: "llama3".into(),
        run: "odd-no-loss".into(),
    };
    let mut rng = Rng(7);
    let mut written = sequences(&mut rng, 10, 31, 1);
    for s in written.iter_mut() {
        s.no_loss = vec![[1, 3]];
        s.shard = 0;
    }
    let mut tee = ArrowTee::create(dir.path(), 1, meta).unwrap();
    for s in &written {
        tee.write(s).unwrap();
    }
    tee.finish().unwrap();
    let file = dir.path().join(shard_file_name(0));
    assert_eq!(
        read_sequences(&file).unwrap().len(),
        10,
        "the intact file reads"
    );
    let script = r#"
import sys, pyarrow as pa, pyarrow.ipc as ipc
path = sys.argv[1]
with ipc.open_file(path) as r:
    schema = r.schema
    table = r.read_all()
rows = table.column("no_loss").to_pylist()
rows[4] = [1, 3, 5]
i = schema.get_field_index("no_loss")
table = table.set_column(i, schema.field(i), pa.array(rows, type=schema.field(i).type))
with ipc.new_file(path, schema) as w:
    w.write_table(table)
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = read_sequences(&file).unwrap_err().to_string();
    assert!(
        e.contains(&file.display().to_string())
            && e.contains("`no_loss` has 3 values")
            && e.contains("pairs"),
        "{e}"
    );
}
