//! The input files a run's stream is made of, recorded in every checkpoint (`inputs.json`) and checked when a run is
//! resumed or replayed from one.
//!
//! A checkpoint's dataflow position is a file index in each lane's sorted file list and a document ordinal in that
//! file ([`crate::types::LanePosition`]). That position means the same documents only over the same files: a file
//! added, removed, renamed or rewritten between a run and its `--resume` would silently resume another stream (and
//! `lexflow replay` would print batches the run never trained). So every checkpoint records each lane's files (path
//! and size, in stream order) and the held-out files, and a resume or replay whose files differ is refused, naming
//! the lane and the first file that differs.
//!
//! Files are compared by base name and size, not by full path, so a corpus moved to another directory (or the
//! per-rank copies of the generated corpus) still resumes; contents are not hashed (a corpus may be terabytes), so a
//! file rewritten to exactly the same size is not detected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tasks::heldout::HoldoutSplit;

/// File name of the record inside a checkpoint directory.
pub use crate::common::run_dir::INPUTS_FILE;

/// One input file as a stream saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: String,
    /// Size in bytes; `None` when it could not be read (the reader quarantines such a file).
    pub bytes: Option<u64>,
}

impl InputFile {
    fn of(path: &Path) -> Self {
        InputFile {
            path: path.display().to_string(),
            bytes: std::fs::metadata(path).ok().map(|m| m.len()),
        }
    }

    fn key(&self) -> (&str, Option<u64>) {
        (crate::stages::formex::base_name(&self.path), self.bytes)
    }

    fn describe(&self) -> String {
        match self.bytes {
            Some(b) => format!("{} ({b} bytes)", self.path),
            None => format!("{} (unreadable)", self.path),
        }
    }
}

/// One language lane's files, in the order the lane reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneInputs {
    pub lang: String,
    pub files: Vec<InputFile>,
}

/// What a checkpoint's stream was read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputsRecord {
    pub version: u32,
    /// How `eval.holdout` chose the held-out files.
    pub holdout_split: HoldoutSplit,
    pub holdout_fraction: f64,
    pub lanes: Vec<LaneInputs>,
    /// Files held out of training (`eval.holdout`), in input order.
    pub held_out: Vec<InputFile>,
    /// The FORMEX files of `eval.paths` (with `dedup.against_heldout`, training copies of their documents are dropped
    /// from the stream).
    #[serde(default)]
    pub eval_files: Vec<InputFile>,
}

impl InputsRecord {
    pub const VERSION: u32 = 1;

    pub fn new<'a>(
        lanes: impl IntoIterator<Item = (&'a str, &'a [PathBuf])>,
        held_out: &[PathBuf],
        holdout_split: HoldoutSplit,
        holdout_fraction: f64,
    ) -> Self {
        InputsRecord {
            version: Self::VERSION,
            holdout_split,
            holdout_fraction,
            lanes: lanes
                .into_iter()
                .map(|(lang, files)| LaneInputs {
                    lang: lang.to_string(),
                    files: files.iter().map(|f| InputFile::of(f)).collect(),
                })
                .collect(),
            held_out: held_out.iter().map(|f| InputFile::of(f)).collect(),
            eval_files: Vec::new(),
        }
    }

    /// With the FORMEX files of `eval.paths` (Q&A `.jsonl` files are left out: they never act on the stream).
    pub fn with_eval_files(mut self, files: &[PathBuf]) -> Self {
        self.eval_files = files
            .iter()
            .filter(|f| !f.to_string_lossy().ends_with(".jsonl"))
            .map(|f| InputFile::of(f))
            .collect();
        self
    }

    /// The record of checkpoint `dir`: `None` for a checkpoint written before records existed.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Self>> {
        let p = dir.join(INPUTS_FILE);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", p.display())),
        };
        let damaged = |e: serde_json::Error| {
            anyhow::anyhow!(
                "{}: not a lexflow inputs record ({e}); the checkpoint is damaged: resume from an earlier one \
                 (move this step directory away)",
                p.display()
            )
        };
        // The version first: a newer lexflow's record may not parse here, and is not damaged.
        let v: serde_json::Value = serde_json::from_str(&text).map_err(damaged)?;
        let version = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0);
        anyhow::ensure!(
            version <= u64::from(Self::VERSION),
            "{}: inputs record version {version} is newer than this lexflow reads ({}): use the lexflow that wrote \
             the checkpoint",
            p.display(),
            Self::VERSION
        );
        Ok(Some(serde_json::from_value(v).map_err(damaged)?))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("inputs record is JSON")
    }

    /// The first difference between the training lanes of `then` (a checkpoint's) and `self` (this run's), in words.
    pub fn lanes_differ(&self, then: &InputsRecord) -> Option<String> {
        if then.lanes.len() != self.lanes.len() {
            return Some(format!(
                "the checkpoint's stream has {} language lanes, this run {}",
                then.lanes.len(),
                self.lanes.len()
            ));
        }
        for (a, b) in then.lanes.iter().zip(&self.lanes) {
            if a.lang != b.lang {
                return Some(format!(
                    "the checkpoint's lanes are {}, this run's {}",
                    langs(&then.lanes),
                    langs(&self.lanes)
                ));
            }
            if let Some(d) = first_difference(&a.files, &b.files) {
                return Some(format!("lane {}: {d}", a.lang));
            }
        }
        None
    }

    /// The first difference between the held-out files of `then` and `self`, in words.
    pub fn held_out_differs(&self, then: &InputsRecord) -> Option<String> {
        first_difference(&then.held_out, &self.held_out)
            .map(|d| format!("held-out files (eval.holdout): {d}"))
    }

    /// The first difference between the `eval.paths` FORMEX files of `then` and `self`, in words.
    pub fn eval_files_differ(&self, then: &InputsRecord) -> Option<String> {
        first_difference(&then.eval_files, &self.eval_files)
            .map(|d| format!("eval.paths files: {d}"))
    }
}

fn langs(l: &[LaneInputs]) -> String {
    l.iter()
        .map(|l| l.lang.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn first_difference(then: &[InputFile], now: &[InputFile]) -> Option<String> {
    let counts = || {
        format!(
            "the checkpoint's stream read {} files, this run finds {}",
            then.len(),
            now.len()
        )
    };
    for (i, pair) in then.iter().zip(now).enumerate() {
        let (a, b) = pair;
        if a.key() != b.key() {
            // A file removed (or added) shifts every later one: name it, not the file that moved into its place.
            let missing = !now[i..].iter().any(|f| f.key() == a.key())
                && then[i..].iter().any(|f| f.key() == b.key());
            let new = !then[i..].iter().any(|f| f.key() == b.key())
                && now[i..].iter().any(|f| f.key() == a.key());
            let mut s = if missing {
                format!(
                    "file #{} is missing: the checkpoint's stream read {}, this run does not find it (it finds {} \
                     in its place)",
                    i + 1,
                    a.describe(),
                    b.describe()
                )
            } else if new {
                format!(
                    "file #{} is new: this run finds {}, which the checkpoint's stream did not read (it read {} \
                     there)",
                    i + 1,
                    b.describe(),
                    a.describe()
                )
            } else {
                let what = if crate::stages::formex::base_name(&a.path)
                    == crate::stages::formex::base_name(&b.path)
                {
                    "changed size"
                } else {
                    "is another file"
                };
                format!(
                    "file #{} {what}: the checkpoint's stream read {}, this run finds {}",
                    i + 1,
                    a.describe(),
                    b.describe()
                )
            };
            if then.len() != now.len() {
                s.push_str(&format!(" ({})", counts()));
            }
            return Some(s);
        }
    }
    match then.len().cmp(&now.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(format!(
            "{}: {} is new",
            counts(),
            now[then.len()].describe()
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "{}: {} is missing",
            counts(),
            then[now.len()].describe()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(dir: &Path, lanes: &[(&str, &[&str])], held: &[&str]) -> InputsRecord {
        let paths: Vec<(String, Vec<PathBuf>)> = lanes
            .iter()
            .map(|(l, fs)| (l.to_string(), fs.iter().map(|f| dir.join(f)).collect()))
            .collect();
        let held: Vec<PathBuf> = held.iter().map(|f| dir.join(f)).collect();
        InputsRecord::new(
            paths.iter().map(|(l, f)| (l.as_str(), f.as_slice())),
            &held,
            HoldoutSplit::Package,
            0.1,
        )
    }

    #[test]
    fn differences_name_the_lane_and_the_first_file() {
        let d = std::env::temp_dir().join(format!("lexflow-inputs-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for (f, n) in [("a.xml", 10), ("b.xml", 20), ("c.xml", 30), ("h.xml", 5)] {
            std::fs::write(d.join(f), vec![b'x'; n]).unwrap();
        }
        let then = rec(
            &d,
            &[("en", &["a.xml", "b.xml"]), ("fr", &["c.xml"])],
            &["h.xml"],
        );
        // The same files elsewhere (a moved corpus) are the same inputs.
        let moved = d.join("moved");
        std::fs::create_dir_all(&moved).unwrap();
        for f in ["a.xml", "b.xml", "c.xml", "h.xml"] {
            std::fs::copy(d.join(f), moved.join(f)).unwrap();
        }
        let now = rec(
            &moved,
            &[("en", &["a.xml", "b.xml"]), ("fr", &["c.xml"])],
            &["h.xml"],
        );
        assert_eq!(now.lanes_differ(&then), None);
        assert_eq!(now.held_out_differs(&then), None);
        // Round trip through the checkpoint file.
        std::fs::write(d.join(INPUTS_FILE), then.to_json()).unwrap();
        assert_eq!(InputsRecord::read(&d).unwrap(), Some(then.clone()));
        assert_eq!(InputsRecord::read(&moved).unwrap(), None);

        // A file grew.
        std::fs::write(moved.join("b.xml"), vec![b'x'; 21]).unwrap();
        let now = rec(
            &moved,
            &[("en", &["a.xml", "b.xml"]), ("fr", &["c.xml"])],
            &["h.xml"],
        );
        let e = now.lanes_differ(&then).unwrap();
        assert!(e.starts_with("lane en: file #2 changed size"), "{e}");
        assert!(e.contains("(20 bytes)") && e.contains("(21 bytes)"), "{e}");
        // A file was added (same count in no lane: the list is longer).
        let now = rec(
            &d,
            &[("en", &["a.xml", "b.xml"]), ("fr", &["c.xml", "h.xml"])],
            &[],
        );
        let e = now.lanes_differ(&then).unwrap();
        assert!(
            e.starts_with("lane fr: the checkpoint's stream read 1 files, this run finds 2"),
            "{e}"
        );
        assert!(e.contains("h.xml (5 bytes) is new"), "{e}");
        assert!(now
            .held_out_differs(&then)
            .unwrap()
            .contains("h.xml (5 bytes) is missing"));
        // A rename with the same count.
        std::fs::rename(d.join("c.xml"), d.join("d.xml")).unwrap();
        let now = rec(
            &d,
            &[("en", &["a.xml", "b.xml"]), ("fr", &["d.xml"])],
            &["h.xml"],
        );
        let e = now.lanes_differ(&then).unwrap();
        assert!(e.starts_with("lane fr: file #1 is another file"), "{e}");
        // A file removed from (or added to) the middle of a lane is named, not the file that took its place.
        let now = rec(&d, &[("en", &["b.xml"]), ("fr", &["d.xml"])], &["h.xml"]);
        let e = now.lanes_differ(&then).unwrap();
        assert!(e.starts_with("lane en: file #1 is missing"), "{e}");
        assert!(
            e.contains("a.xml (10 bytes), this run does not find it"),
            "{e}"
        );
        let e = then.lanes_differ(&now).unwrap();
        assert!(
            e.starts_with("lane en: file #1 is new: this run finds "),
            "{e}"
        );
        assert!(
            e.contains("a.xml (10 bytes), which the checkpoint's stream did not read"),
            "{e}"
        );
        // A file that vanished is recorded as unreadable, not skipped.
        let now = rec(
            &d,
            &[("en", &["a.xml", "b.xml"]), ("fr", &["c.xml"])],
            &["h.xml"],
        );
        assert!(now.lanes_differ(&then).unwrap().contains("(unreadable)"));
        // eval.paths files: recorded (Q&A files left out), compared on their own.
        let with_eval = |r: InputsRecord, names: &[&str]| {
            r.with_eval_files(&names.iter().map(|n| d.join(n)).collect::<Vec<_>>())
        };
        std::fs::write(d.join("e.xml"), b"xx").unwrap();
        let a = with_eval(then.clone(), &["e.xml", "q.jsonl"]);
        assert_eq!(a.eval_files.len(), 1);
        assert_eq!(
            with_eval(then.clone(), &["e.xml"]).eval_files_differ(&a),
            None
        );
        std::fs::write(d.join("e.xml"), b"xxx").unwrap();
        let b = with_eval(then.clone(), &["e.xml"]);
        assert!(b
            .eval_files_differ(&a)
            .unwrap()
            .starts_with("eval.paths files: file #1 changed size"));
        assert_eq!(b.lanes_differ(&a), None);
        // Another mix.
        let now = rec(
            &d,
            &[("en", &["a.xml", "b.xml"]), ("de", &["c.xml"])],
            &["h.xml"],
        );
        assert!(now.lanes_differ(&then).unwrap().contains("en, fr"));

        // A newer lexflow's record is not called damaged, even when it does not parse here.
        std::fs::write(
            d.join(INPUTS_FILE),
            r#"{"version": 99, "holdout_split": "by_chapter"}"#,
        )
        .unwrap();
        let e = InputsRecord::read(&d).unwrap_err().to_string();
        assert!(e.contains("version 99 is newer"), "{e}");
        // A damaged record is an error naming the file, not "no record".
        std::fs::write(d.join(INPUTS_FILE), "{").unwrap();
        let e = InputsRecord::read(&d).unwrap_err().to_string();
        assert!(e.contains(INPUTS_FILE) && e.contains("damaged"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
