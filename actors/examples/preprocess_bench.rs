//! Preprocessing benchmark (used by `bench/run.sh`): read → parse FORMEX → tokenize, on N threads, exactly as the
//! pipeline's reader and tokenizer actors do (`reader::read_file`, `Tokenizer::tokenize_batch`), without the rest of
//! the pipeline. Prints one JSON object: files, docs, tokens, text_bytes, input_bytes (on disk), seconds, threads,
//! engine, tokens_per_s, ids_hash.
//!
//! `ids_hash` = sha256 over, for every document in input order, sha256(ids as little-endian u32); `scripts/
//! tokenize_ref.py hash` computes the same from the texts written by `--dump-texts`, with Python `tokenizers`.
//!
//!   preprocess_bench [--threads N] [--tokenizer SPEC] [--reference] [--dump-texts FILE.jsonl] PATH...
//!   preprocess_bench [--threads N] [--tokenizer SPEC] [--reference] --texts FILE.jsonl
//!
//! `--texts`: the tokenizer alone on texts written by `--dump-texts` (`{"text"}` per line; encoded as documents are,
//! `encode_text`), so that it can be timed against a tokenizer that has no FORMEX parser (tiktoken:
//! `tokenize_ref.py tiktoken-hash`); `seconds` is the encoding time only.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use lexflow_actors::tokenizer::Tokenizer;
use lexflow_actors::types::DocBatch;
use sha2::{Digest, Sha256};

struct FileResult {
    docs: usize,
    tokens: usize,
    text_bytes: usize,
    doc_hashes: Vec<[u8; 32]>,
    texts: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let mut threads = 1usize;
    let mut spec = "llama3".to_string();
    let mut reference = false;
    let mut dump: Option<String> = None;
    let mut texts_file: Option<String> = None;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().expect("--threads N").parse()?,
            "--tokenizer" => spec = args.next().expect("--tokenizer SPEC"),
            "--reference" => reference = true,
            "--dump-texts" => dump = Some(args.next().expect("--dump-texts FILE")),
            "--texts" => texts_file = Some(args.next().expect("--texts FILE")),
            _ => paths.push(a),
        }
    }
    if let Some(f) = texts_file {
        return tokenize_texts(&f, &spec, reference, threads);
    }
    anyhow::ensure!(!paths.is_empty(), "usage: preprocess_bench [--threads N] [--tokenizer SPEC] [--reference] [--dump-texts FILE] PATH...");
    let (tk, load_s) = load_tokenizer(&spec, reference)?;
    let files = lexflow_actors::reader::expand_inputs(&paths)?;
    let input_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let keep_texts = dump.is_some();

    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<FileResult>>> =
        Mutex::new((0..files.len()).map(|_| None).collect());
    let errors = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= files.len() {
                    break;
                }
                let docs = match lexflow_actors::reader::read_file(&files[i]) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("{}: {e}", files[i].display());
                        errors.fetch_add(1, Ordering::Relaxed);
                        Vec::new()
                    }
                };
                let texts: Vec<String> = if keep_texts {
                    docs.iter()
                        .filter(|d| !d.text.is_empty())
                        .map(|d| d.text.clone())
                        .collect()
                } else {
                    Vec::new()
                };
                let out = tk.tokenize_batch(DocBatch {
                    lane: 0,
                    file: i as u32,
                    docs,
                    signatures: Vec::new(),
                });
                let r = FileResult {
                    docs: out.docs.len(),
                    tokens: out.docs.iter().map(|d| d.tokens.len()).sum(),
                    text_bytes: out.docs.iter().map(|d| d.text_bytes).sum(),
                    doc_hashes: out
                        .docs
                        .iter()
                        .map(|d| {
                            let mut h = Sha256::new();
                            for t in &d.tokens {
                                h.update(t.to_le_bytes());
                            }
                            h.finalize().into()
                        })
                        .collect(),
                    texts,
                };
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap();
    let (mut docs, mut tokens, mut text_bytes) = (0usize, 0usize, 0usize);
    let mut all = Sha256::new();
    let mut dump_w = match &dump {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    for r in results.into_iter().flatten() {
        docs += r.docs;
        tokens += r.tokens;
        text_bytes += r.text_bytes;
        for h in &r.doc_hashes {
            all.update(h);
        }
        if let Some(w) = dump_w.as_mut() {
            for t in &r.texts {
                serde_json::to_writer(&mut *w, &serde_json::json!({ "text": t }))?;
                w.write_all(b"\n")?;
            }
        }
    }
    if let Some(mut w) = dump_w {
        w.flush()?;
    }
    let mut out = report(&tk, load_s, seconds, docs, tokens, text_bytes, threads, all);
    out["files"] = files.len().into();
    out["read_errors"] = errors.load(Ordering::Relaxed).into();
    out["input_bytes"] = input_bytes.into();
    println!("{out}");
    Ok(())
}

/// `--texts`: encode each line's text as a document (`encode_text`) on `threads` threads, in order; the same JSON
/// fields as a whole run (files = 0).
fn tokenize_texts(path: &str, spec: &str, reference: bool, threads: usize) -> anyhow::Result<()> {
    let (tk, load_s) = load_tokenizer(spec, reference)?;
    let mut texts = Vec::new();
    for (i, line) in std::fs::read_to_string(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{path}, line {}: {e}", i + 1))?;
        let t = v["text"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{path}, line {}: no \"text\" string", i + 1))?;
        texts.push(t.to_string());
    }
    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let hashes: Mutex<Vec<([u8; 32], usize)>> = Mutex::new(vec![([0; 32], 0); texts.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= texts.len() {
                    break;
                }
                let ids = tk.encode_text(&texts[i]);
                let mut h = Sha256::new();
                for t in &ids {
                    h.update(t.to_le_bytes());
                }
                hashes.lock().unwrap()[i] = (h.finalize().into(), ids.len());
            });
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    let mut all = Sha256::new();
    let mut tokens = 0;
    for (h, n) in hashes.into_inner().unwrap() {
        all.update(h);
        tokens += n;
    }
    let text_bytes: usize = texts.iter().map(String::len).sum();
    let mut out = report(
        &tk,
        load_s,
        seconds,
        texts.len(),
        tokens,
        text_bytes,
        threads,
        all,
    );
    out["files"] = 0.into();
    println!("{out}");
    Ok(())
}

/// The tokenizer (`--reference`: the `tokenizers` crate, no fast path) and its load time in seconds.
fn load_tokenizer(spec: &str, reference: bool) -> anyhow::Result<(Tokenizer, f64)> {
    let t = Instant::now();
    let tk = match reference {
        true => Tokenizer::load_reference(spec)?,
        false => Tokenizer::load(spec)?,
    };
    Ok((tk, t.elapsed().as_secs_f64()))
}

/// The JSON fields both modes print; `all` is the running hash over the documents' id hashes.
#[allow(clippy::too_many_arguments)]
fn report(
    tk: &Tokenizer,
    load_s: f64,
    seconds: f64,
    docs: usize,
    tokens: usize,
    text_bytes: usize,
    threads: usize,
    all: Sha256,
) -> serde_json::Value {
    serde_json::json!({
        "docs": docs,
        "tokens": tokens,
        "text_bytes": text_bytes,
        "threads": threads,
        "engine": tk.engine(),
        "tokenizer_load_s": (load_s * 1000.0).round() / 1000.0,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "tokens_per_s": (tokens as f64 / seconds).round(),
        "text_mb_per_s": ((text_bytes as f64 / seconds / 1e6) * 100.0).round() / 100.0,
        "ids_hash": hex::encode(all.finalize()),
    })
}
