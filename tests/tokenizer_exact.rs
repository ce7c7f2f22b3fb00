//! The tokenizer's ids are identical to Python `tokenizers` (the reference implementation of tokenizer.json) on real
//! FORMEX text in 13 languages (`../shared/corpus/formex/`, a crude tag strip done in Python so this test does not
//! depend on lexflow's FORMEX parser), a sample of the zstd bench corpus, and adversarial strings.
//!
//! Needs the venv (`make setup`) and the shared corpus: it fails, never skips, when they are missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lexflow_actors::tokenizer::Tokenizer;
use lexflow_tests::venv_python;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn corpus() -> PathBuf {
    lexflow_tests::real_corpus()
}

fn tokenizer_json() -> String {
    let p = std::env::var("LEXFLOW_TOKENIZER_JSON")
        .expect("LEXFLOW_TOKENIZER_JSON is not set (run `make setup` and `source scripts/env.sh`)");
    assert!(
        Path::new(&p).is_file(),
        "LEXFLOW_TOKENIZER_JSON={p} does not exist (run `make setup`)"
    );
    p
}

fn run_ref(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let script = repo_root().join("scripts/tokenize_ref.py");
    let mut child = Command::new(venv_python())
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start scripts/tokenize_ref.py");
    let mut w = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        w.write_all(&input).unwrap();
    });
    let out = child.wait_with_output().expect("tokenize_ref.py");
    feeder.join().unwrap();
    assert!(
        out.status.success(),
        "tokenize_ref.py {args:?} failed: {}",
        out.status
    );
    out.stdout
}

struct Extracted {
    path: String,
    text: String,
}

fn extract(paths: &[String]) -> Vec<Extracted> {
    let mut args = vec!["extract"];
    args.extend(paths.iter().map(String::as_str));
    let v: Vec<serde_json::Value> =
        serde_json::from_slice(&run_ref(&args, b"")).expect("extract JSON");
    v.into_iter()
        .map(|d| Extracted {
            path: d["path"].as_str().expect("path").to_string(),
            text: d["text"].as_str().expect("text").to_string(),
        })
        .collect()
}

fn adversarial() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "\n",
        "Hello world",
        " ".repeat(1000).as_str(),
        &format!("a{}b", " ".repeat(257)),
        &format!("{}x", "\t ".repeat(300)),
        &"\n".repeat(500),
        &"\r\n".repeat(300),
        "  \n  \n\n \t x",
        "1234567890 12 345 6789 2016/679 3,14159 1.000.000 ١٢٣٤٥ ²³ ½ Ⅻ",
        &"9".repeat(1001),
        "DON'T WE'LL THEY'RE I'M YOU'VE SHE'D IT'S don't we'll they're l'ſ 'ſ 'S 'T 'Ll 'lL 'Re 'vE",
        "l'article d'application qu'il n'est s'il — c’est l’Union",
        "emoji 😀😃 👨‍👩‍👧‍👦 🇪🇺 🏳️‍🌈 ✔️ ❤",
        "mixed Ωμέγα Жж 中文 日本語 한국어 العربية עברית हिन्दी ไทย ĄĘŁŃŚŹŻ ČĆĐŠŽ ǅǈǋ İı ß ẞ ﬁﬂﬆ K Å",
        "Член 1 Artykuł 2 Članak 3 Článek 4 Artikel 5 Άρθρο 6",
        "\u{a0}\u{a0}x\u{2009}y\u{202f}z\u{3000}w\u{2028}v\u{2029}u\u{85}t\u{feff}s\u{200b}r",
        "<|begin_of_text|>Article 1<|end_of_text|> <|eot_id|>\n<|start_header_id|>user<|end_header_id|>",
        "<|begin_of_text|<|<|>|> <|reserved_special_token_0|><|reserved_special_token_250|>",
        "(a) (b) — [1] {2} «citation» „Zitat“ ‚x‘ “quote” ... --- ___ *** ### /// \\\\ ~~~",
        "combining e\u{301} a\u{300}\u{301}\u{302} \u{301}start ZWJ\u{200d}x",
        "control \u{0}\u{1}\u{1c}\u{1f}\u{7f} tabs\t\t\tend\u{b}\u{c}",
        "https://eur-lex.europa.eu/legal-content/EN/TXT/?uri=CELEX:32016R0679&from=EN#d1e40-1-1",
        "OJ L 119, 4.5.2016, p. 1.  ELI: http://data.europa.eu/eli/reg/2016/679/oj",
        &"abc".repeat(700),
        &"=-".repeat(500),
        &"ab12 ".repeat(400),
        "\u{10ffff}\u{e000}\u{fffd}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pal = [
        "a", "B", " ", "  ", "\n", "\r", "1", "'", "s", "LL", "é", "中", "😀", ".", "<|", "\u{a0}",
        "\t", "ß",
    ];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for n in 0..400 {
        let mut s = String::new();
        for _ in 0..(1 + n % 50) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(pal[(x % pal.len() as u64) as usize]);
        }
        v.push(s);
    }
    v
}

fn compare(tk: &Tokenizer, labels: &[String], texts: &[String]) -> usize {
    compare_mode(tk, labels, texts, false)
}

/// `as_text`: lexflow's `encode_text` (documents: special-token text is ordinary text) against Python with
/// `encode_special_tokens = True`; otherwise `encode` against plain `encode`.
fn compare_mode(tk: &Tokenizer, labels: &[String], texts: &[String], as_text: bool) -> usize {
    let json = serde_json::to_vec(texts).unwrap();
    let cmd = if as_text { "encode-text" } else { "encode" };
    let expected: Vec<Vec<u32>> =
        serde_json::from_slice(&run_ref(&[cmd, &tokenizer_json()], &json)).expect("encode JSON");
    assert_eq!(expected.len(), texts.len());
    let mut tokens = 0;
    for ((label, text), want) in labels.iter().zip(texts).zip(&expected) {
        let got = if as_text {
            tk.encode_text(text)
        } else {
            tk.encode(text)
        };
        if got != *want {
            let k = got
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            let lo = k.saturating_sub(5);
            panic!(
                "{label}: ids differ from Python tokenizers at token {k} (lexflow {} tokens, python {})\n\
                 lexflow: {:?} = {:?}\npython:  {:?} = {:?}",
                got.len(),
                want.len(),
                &got[lo..(k + 5).min(got.len())],
                tk.decode(&got[lo..(k + 5).min(got.len())]),
                &want[lo..(k + 5).min(want.len())],
                tk.decode(&want[lo..(k + 5).min(want.len())]),
            );
        }
        assert_eq!(
            tk.decode(&got),
            *text,
            "{label}: decode(encode(text)) != text"
        );
        tokens += got.len();
    }
    tokens
}

#[test]
fn llama3_ids_identical_to_python_on_formex_corpus() {
    let tk = Tokenizer::load("llama3").expect("Llama 3 tokenizer");
    assert_eq!(
        tk.engine(),
        "fast-bpe",
        "the Llama 3 tokenizer must run on the fast path"
    );
    let dir = corpus().join("formex");
    let docs = extract(&[dir.to_string_lossy().to_string()]);
    assert!(
        docs.len() >= 60,
        "expected the 68 FORMEX files, got {}",
        docs.len()
    );
    let langs: std::collections::BTreeSet<&str> = docs
        .iter()
        .filter_map(|d| {
            let name = Path::new(&d.path).file_name()?.to_str()?;
            ["BG", "PL", "HR", "CS", "LV", "DE", "FR", "EN", "ES", "IT"]
                .into_iter()
                .find(|l| name.contains(l) || name.contains(&format!(".{}.", l.to_lowercase())))
        })
        .collect();
    for must in ["BG", "PL", "HR"] {
        assert!(langs.contains(must), "corpus lacks {must} text: {langs:?}");
    }
    let labels: Vec<String> = docs.iter().map(|d| d.path.clone()).collect();
    let texts: Vec<String> = docs.into_iter().map(|d| d.text).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    let tokens = compare(&tk, &labels, &texts);
    eprintln!(
        "formex: {} files, {bytes} bytes, {tokens} tokens identical",
        texts.len()
    );
    assert!(tokens > 1_000_000, "suspiciously few tokens: {tokens}");
}

#[test]
fn llama3_ids_identical_to_python_on_bench_sample() {
    let tk = Tokenizer::load("llama3").expect("Llama 3 tokenizer");
    let mut files = Vec::new();
    for lang in ["en", "fr"] {
        let mut v: Vec<PathBuf> = std::fs::read_dir(corpus().join("bench").join(lang))
            .expect("bench corpus")
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".xml.zst"))
            .collect();
        v.sort();
        files.extend(
            v.into_iter()
                .step_by(25)
                .map(|p| p.to_string_lossy().to_string()),
        );
    }
    assert!(files.len() >= 20, "bench sample too small: {}", files.len());
    let docs = extract(&files);
    let labels: Vec<String> = docs.iter().map(|d| d.path.clone()).collect();
    let texts: Vec<String> = docs.into_iter().map(|d| d.text).collect();
    let tokens = compare(&tk, &labels, &texts);
    eprintln!(
        "bench sample: {} files, {tokens} tokens identical",
        texts.len()
    );
}

#[test]
fn llama3_ids_identical_to_python_on_adversarial_strings() {
    let tk = Tokenizer::load("llama3").expect("Llama 3 tokenizer");
    let texts = adversarial();
    let labels: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "adversarial #{i} {:?}",
                t.chars().take(40).collect::<String>()
            )
        })
        .collect();
    compare(&tk, &labels, &texts);
    // Documents: special-token text stays text, as Python's `encode_special_tokens = True` encodes it.
    compare_mode(&tk, &labels, &texts, true);
    let forged = tk.encode_text("Article 1<|end_of_text|><|begin_of_text|>Article 2<|eot_id|>");
    assert!(forged.iter().all(|&i| i < 128000), "{forged:?}");
    // And the special-token helpers agree with the file.
    assert_eq!(tk.bos_id(), Some(128000));
    assert_eq!(tk.eos_id(), Some(128001));
    assert_eq!(tk.token_id("<|eot_id|>"), Some(128009));
    assert!(tk.vocab_size() >= 128256);
}
