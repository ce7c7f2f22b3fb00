//! Dedup cost benchmark (used by `bench/dedup.sh`): on one thread, over the same parsed documents in the same run,
//! times FORMEX parsing, Llama 3 tokenization (the fast path the tokenizer actors use), the exact key and the
//! near-duplicate keys (MinHash, `bands × rows` permutations) the reader workers compute with `[dedup]`, and the
//! lane decisions. Prints one JSON object with MB/s of text per stage and the dedup stages' cost relative to
//! parsing and to tokenizing.
//!
//!   dedup_bench [--tokenizer SPEC] [--bands B] [--rows R] PATH...

use std::time::Instant;

use lexflow_actors::dedup::{DedupConfig, DedupIndex, DedupMode, MinHasher};
use lexflow_actors::tokenizer::Tokenizer;

fn main() -> anyhow::Result<()> {
    let mut spec = "llama3".to_string();
    let mut cfg = DedupConfig {
        mode: DedupMode::Near,
        ..Default::default()
    };
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokenizer" => spec = args.next().expect("--tokenizer SPEC"),
            "--bands" => cfg.bands = args.next().expect("--bands B").parse()?,
            "--rows" => cfg.rows = args.next().expect("--rows R").parse()?,
            _ => paths.push(a),
        }
    }
    anyhow::ensure!(
        !paths.is_empty(),
        "usage: dedup_bench [--tokenizer SPEC] [--bands B] [--rows R] PATH..."
    );
    let files = lexflow_actors::reader::expand_inputs(&paths)?;
    let manifests = lexflow_actors::reader::ManifestIndex::build(&files);

    let t = Instant::now();
    let mut docs = Vec::new();
    for f in &files {
        if let Ok(d) = lexflow_actors::reader::read_file_with(f, &manifests, &Default::default()) {
            docs.extend(d.into_iter().filter(|d| !d.text.is_empty()));
        }
    }
    let parse_s = t.elapsed().as_secs_f64();
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();

    let tk = Tokenizer::load(&spec)?;
    let t = Instant::now();
    let mut tokens = 0usize;
    for d in &docs {
        tokens += tk.encode_document(d).0.len();
    }
    let tokenize_s = t.elapsed().as_secs_f64();

    let exact = MinHasher::new(&DedupConfig {
        mode: DedupMode::Exact,
        ..cfg.clone()
    });
    let t = Instant::now();
    let exact_sigs: Vec<_> = docs.iter().map(|d| exact.signature(d)).collect();
    let exact_s = t.elapsed().as_secs_f64();

    let near = MinHasher::new(&cfg);
    let t = Instant::now();
    let near_sigs: Vec<_> = docs.iter().map(|d| near.signature(d)).collect();
    let near_s = t.elapsed().as_secs_f64();

    let idx = DedupIndex::new(&cfg, vec![docs.len() as u32]);
    let t = Instant::now();
    let mut dropped = 0;
    for (i, s) in near_sigs.iter().enumerate() {
        if idx.decide(0, i as u32, 0, s) != lexflow_actors::dedup::Verdict::Keep {
            dropped += 1;
        }
    }
    let decide_s = t.elapsed().as_secs_f64();
    drop(exact_sigs);

    let mbs = |s: f64| bytes as f64 / 1e6 / s.max(1e-12);
    let out = serde_json::json!({
        "files": files.len(),
        "documents": docs.len(),
        "text_bytes": bytes,
        "tokens": tokens,
        "permutations": cfg.bands * cfg.rows,
        "dropped_near_or_exact": dropped,
        "seconds": {"parse": parse_s, "tokenize": tokenize_s, "exact_keys": exact_s, "near_keys": near_s, "decide": decide_s},
        "text_mb_per_s": {"parse": mbs(parse_s), "tokenize": mbs(tokenize_s), "exact_keys": mbs(exact_s), "near_keys": mbs(near_s)},
        "near_keys_vs_parse": near_s / parse_s,
        "near_keys_vs_tokenize": near_s / tokenize_s,
        "exact_keys_vs_tokenize": exact_s / tokenize_s,
    });
    println!("{out}");
    Ok(())
}
