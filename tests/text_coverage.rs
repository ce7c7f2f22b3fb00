//! The FORMEX parser never silently drops text: for every real file of `shared/corpus` (the 68 files of `formex/`,
//! the 610 consolidated acts of `bench/`), every word of the file's text content is in the extracted text of its
//! documents (as a multiset: a word that occurs n times in the XML occurs at least n times in the output).
//!
//! Reference: `scripts/formex_words.py` renders each file with lxml, independently of `actors/src/formex.rs`: all text
//! nodes in document order, a word boundary at every element that is not inline markup, and only the metadata blocks
//! left out (its `EXCLUDED`, each with its reason: `BIB.INSTANCE` and the other bibliographic records, the
//! consolidation family `FAM.COMP`, production data `INFO.PROD`/`INFO.CONSLEG`, the running page head `CURR.TITLE`
//! of case law; manifests `DOC` and `PUBLICATION` whole). Its `INLINE` list names the markup that does not separate
//! words (`HT`, `FT`, `DATE`, `REF.DOC.OJ`, quotation marks, formula parts, …). It writes out the characters the markup stands for (`QUOT.START`/`QUOT.END` → their `CODE`
//! character, `DIVISOR` → `/`, `SUM` → `Σ`).
//!
//! Words: split on XML white space (space, tab, CR, LF; not U+00A0, which FORMEX uses inside "Article 1"), and on the
//! characters the parser adds around text — `[`/`]` around footnotes, `|` between table cells — on both sides alike.
//! Extra words in the output (operators of formulas, those separators) are not a failure; a missing word is, and so
//! is a glued one: `<P>word1</P><P>word2</P>` rendered as `word1word2` misses both words.
//!
//! On failure, the report gives per file the missing words, their context in the reference, and the output words
//! that contain them (which shows glued words). The corpus and the project venv (lxml, zstandard) are required.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use lexflow_actors::reader::{expand_inputs, read_file};
use lexflow_tests::venv_python;

fn corpus() -> PathBuf {
    lexflow_tests::real_corpus()
}

/// Characters the parser adds around text (footnote brackets, cell separators): word separators on both sides.
const ADDED: [char; 3] = ['[', ']', '|'];

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r') || ADDED.contains(&c))
        .filter(|w| !w.is_empty())
}

/// A reference word the output has fewer times than the XML.
#[derive(Debug)]
struct Missing {
    word: String,
    want: usize,
    got: usize,
    /// The words around one of its occurrences in the reference (one whose neighbours differ in the output, if any).
    context: String,
    /// Output words containing it (a glued word shows here).
    glued: Vec<String>,
}

/// The reference words missing from `output` (multiset difference), most frequent first.
fn missing_words<'a>(reference: &'a str, output: &'a str) -> Vec<Missing> {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for w in words(reference) {
        counts.entry(w).or_default().0 += 1;
    }
    for w in words(output) {
        if let Some(c) = counts.get_mut(w) {
            c.1 += 1;
        }
    }
    let mut short: Vec<(&str, usize, usize)> = counts
        .into_iter()
        .filter(|(_, (want, got))| got < want)
        .map(|(w, (want, got))| (w, want, got))
        .collect();
    if short.is_empty() {
        return Vec::new();
    }
    short.sort_by(|a, b| (b.1 - b.2).cmp(&(a.1 - a.2)).then(a.0.cmp(b.0)));
    short.truncate(12);
    let ref_words: Vec<&str> = words(reference).collect();
    let out_words: Vec<&str> = words(output).collect();
    let neighbours = |v: &[&'a str], i: usize| {
        let prev = if i > 0 { v[i - 1] } else { "" };
        (prev, v.get(i + 1).copied().unwrap_or(""))
    };
    short
        .into_iter()
        .map(|(w, want, got)| {
            // Show an occurrence whose neighbours in the reference are not its neighbours anywhere in the output
            // (likely the lost one), else the first.
            let in_output: HashSet<(&str, &str)> = (0..out_words.len())
                .filter(|&i| out_words[i] == w)
                .map(|i| neighbours(&out_words, i))
                .collect();
            let occurrences = || (0..ref_words.len()).filter(|&i| ref_words[i] == w);
            let at = occurrences()
                .find(|&i| !in_output.contains(&neighbours(&ref_words, i)))
                .or_else(|| occurrences().next())
                .unwrap_or(0);
            let context = ref_words[at.saturating_sub(8)..(at + 9).min(ref_words.len())].join(" ");
            let mut glued: Vec<String> = out_words
                .iter()
                .filter(|o| **o != w && o.contains(w))
                .take(3)
                .map(|o| o.to_string())
                .collect();
            glued.dedup();
            Missing {
                word: w.to_string(),
                want,
                got,
                context,
                glued,
            }
        })
        .collect()
}

/// The reference text of each file, by `scripts/formex_words.py`, in `out` (`<n>.txt` for the n-th path).
fn spawn_reference(files: &[PathBuf], out: &Path) -> std::process::Child {
    let mut child = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/formex_words.py"
        ))
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/formex_words.py with the venv python");
    let mut stdin = child.stdin.take().unwrap();
    for f in files {
        writeln!(stdin, "{}", f.display()).unwrap();
    }
    drop(stdin);
    child
}

/// Runs `f(i)` for every index on a few threads; results in index order.
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(2)
        .clamp(2, 8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = f(i);
                out.lock().unwrap()[i] = Some(r);
            });
        }
    });
    out.into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every index done"))
        .collect()
}

#[test]
fn text_coverage_every_word_of_the_real_corpus_is_extracted() {
    let c = corpus();
    let formex = expand_inputs(&[c.join("formex").display().to_string()]).unwrap();
    let bench = expand_inputs(&[c.join("bench").display().to_string()]).unwrap();
    assert_eq!(formex.len(), 68, "corpus/formex files");
    assert_eq!(bench.len(), 610, "corpus/bench files");
    let files: Vec<PathBuf> = formex.into_iter().chain(bench).collect();

    let tmp = tempfile::tempdir().unwrap();
    let reference = spawn_reference(&files, tmp.path());
    // (extracted text of the file's documents, whether the file is only a manifest)
    let outputs: Vec<(String, bool)> = par_map(files.len(), |i| {
        let docs = read_file(&files[i])
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", files[i].display()));
        assert!(!docs.is_empty(), "{}: no document", files[i].display());
        let manifest = docs
            .iter()
            .all(|d| d.root == "DOC" || d.root == "PUBLICATION");
        let text = docs
            .iter()
            .map(|d| d.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        (text, manifest)
    });
    let o = reference.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "scripts/formex_words.py failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let results: Vec<(usize, Vec<Missing>)> = par_map(files.len(), |i| {
        let r = std::fs::read_to_string(tmp.path().join(format!("{i}.txt"))).unwrap();
        let (out, manifest) = &outputs[i];
        let n = words(&r).count();
        // A check that compares nothing proves nothing: every non-manifest file has text.
        assert!(
            *manifest || n > 0,
            "{}: empty reference text",
            files[i].display()
        );
        (n, missing_words(&r, out))
    });

    let total: usize = results.iter().map(|(n, _)| n).sum();
    let mut report = String::new();
    let mut bad = 0;
    let mut lost = 0;
    for (f, (n, miss)) in files.iter().zip(&results) {
        if miss.is_empty() {
            continue;
        }
        bad += 1;
        let short: usize = miss.iter().map(|m| m.want - m.got).sum();
        lost += short;
        if bad > 40 {
            continue;
        }
        report += &format!(
            "\n{}: {} of {n} words missing (12 most frequent shown)\n",
            f.display(),
            short
        );
        for m in miss {
            report += &format!(
                "  {:?} ×{} (output ×{}) in «{}»{}\n",
                m.word,
                m.want,
                m.got,
                m.context,
                if m.glued.is_empty() {
                    String::new()
                } else {
                    format!("; output has {:?}", m.glued)
                }
            );
        }
    }
    eprintln!(
        "text coverage: {} files, {total} reference words, {bad} file(s) with missing words",
        files.len()
    );
    assert!(total > 10_000_000, "reference too small: {total} words");
    assert!(
        bad == 0,
        "{bad} file(s) lose text (at least {lost} words in the files shown):{report}"
    );
}

#[test]
fn text_coverage_check_catches_dropped_and_glued_words() {
    let reference = " a  footnote x  b  cell1  cell2  one two ";
    assert!(missing_words(reference, "a [footnote x] b\ncell1 | cell2\none two").is_empty());
    // A word dropped, and a count short.
    let m = missing_words(reference, "a b cell1 | cell2 one two");
    let lost: Vec<&str> = m.iter().map(|m| m.word.as_str()).collect();
    assert_eq!(lost, ["footnote", "x"]);
    assert_eq!(missing_words(" a a ", "a")[0].got, 1);
    // Two block elements glued: both words are missing, and the report shows the glued word.
    let m = missing_words(reference, "a [footnote x] b cell1 | cell2 onetwo");
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].glued, ["onetwo"]);
    assert!(m[0].context.contains("cell2 one two"), "{m:?}");
}
