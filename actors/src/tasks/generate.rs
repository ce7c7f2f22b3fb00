//! `lexflow generate`: text generation with a checkpoint (raw continuation or the run's Q&A template), decoded by
//! [`crate::tasks::decode`] (greedy, or sampled with temperature, top-k and top-p exactly as Hugging Face's logits
//! warpers filter).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::stages::qa_format::{PromptFormat, QaTemplate};
pub use crate::tasks::decode::{distribution, sample, Sampling};

/// How a prompt is turned into the model's input.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptStyle {
    /// `<|begin_of_text|>` + the text, continued as written (pre-trained models).
    Raw,
    /// A question in a Q&A template (instruction-tuned models).
    Qa(PromptFormat),
}

/// The prompt style of `lexflow generate`: `--template` (`raw`, `plain`, `llama3`), else the run that wrote the
/// checkpoint: its Q&A template when it trained on Q&A pairs (`.jsonl` inputs) or chose `llama3`, else raw text.
pub fn prompt_style(
    model_dir: &Path,
    template: Option<&str>,
    system: Option<String>,
) -> anyhow::Result<PromptStyle> {
    if let Some(t) = template.filter(|t| !["raw", "plain", "llama3"].contains(t)) {
        anyhow::bail!("--template {t:?}: expected `raw`, `plain` or `llama3`");
    }
    if template == Some("raw") {
        anyhow::ensure!(
            system.is_none(),
            "--system needs --template llama3 (raw text has no system turn)"
        );
        return Ok(PromptStyle::Raw);
    }
    if let Some(f) = crate::stages::qa_format::parse_template(template, system)? {
        return Ok(PromptStyle::Qa(f));
    }
    let p = model_dir.join(crate::common::run_dir::RUN_CONFIG_FILE);
    if !p.is_file() {
        return Ok(PromptStyle::Raw);
    }
    let cfg = crate::config::Config::stored_file(&p).map_err(|e| {
        anyhow::anyhow!("{e} (pass --template to choose the prompt format yourself)")
    })?;
    let qa = trained_on_qa_pairs(&cfg.input.paths) || cfg.input.qa_template == QaTemplate::Llama3;
    Ok(match qa {
        true => PromptStyle::Qa(cfg.input.prompt_format()),
        false => PromptStyle::Raw,
    })
}

/// Whether a run's `input.paths` hold Q&A pairs: a `.jsonl` (`.zst`, `.gz`) path, or a directory or glob that
/// expands to one — `docs/QA.md` fine-tunes on `lexflow qa build`'s `train/` directory. Inputs that no longer exist
/// (the checkpoint was copied elsewhere) count as FORMEX: `--template` then chooses.
fn trained_on_qa_pairs(paths: &[String]) -> bool {
    paths
        .iter()
        .any(|p| crate::stages::reader::is_qa_jsonl(Path::new(p)))
        || crate::stages::reader::expand_inputs(paths)
            .is_ok_and(|files| files.iter().any(|f| crate::stages::reader::is_qa_jsonl(f)))
}

/// One prompt of `lexflow generate --prompts FILE` (JSON lines): `{"prompt": …}` or `{"question": …}`, with an
/// optional `id`.
#[derive(Debug, Clone, Deserialize)]
struct PromptLine {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    question: Option<String>,
}

/// One answer of `lexflow generate --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generated {
    pub id: String,
    pub prompt: String,
    pub output: String,
    pub token_ids: Vec<u32>,
}

pub struct GenerateArgs<'a> {
    pub model: &'a Path,
    pub prompts: Vec<String>,
    pub prompts_file: Option<&'a Path>,
    pub template: Option<String>,
    pub system: Option<String>,
    /// None: the checkpoint's own `tokenizer.json`, else the Llama 3 tokenizer.
    pub tokenizer: Option<String>,
    pub device: String,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub sampling: Sampling,
    pub json: bool,
    pub out: Option<&'a Path>,
}

/// The tokenizer to generate with: the given one, else the checkpoint's `tokenizer.json` (lexflow writes it into
/// every checkpoint), else the Llama 3 tokenizer.
pub fn tokenizer_for(model_dir: &Path, given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        let own = model_dir.join("tokenizer.json");
        match own.is_file() {
            true => own.display().to_string(),
            false => "llama3".to_string(),
        }
    })
}

fn read_prompts(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the prompts file", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{}: line {}: {e}; expected one JSON object per line with \"prompt\" (or \"question\") and an optional \"id\"",
                path.display(),
                n + 1
            )
        })?;
        let Some(text) = p.prompt.or(p.question) else {
            anyhow::bail!(
                "{}: line {}: no \"prompt\" or \"question\" field",
                path.display(),
                n + 1
            );
        };
        out.push((p.id.unwrap_or_else(|| (n + 1).to_string()), text));
    }
    Ok(out)
}

/// `lexflow generate`.
pub fn cli_generate(a: GenerateArgs<'_>) -> anyhow::Result<ExitCode> {
    use lexflow_gpu::tch::Kind;
    a.sampling.check()?;
    let mut prompts: Vec<(String, String)> = a
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| ((i + 1).to_string(), p.clone()))
        .collect();
    if let Some(f) = a.prompts_file {
        prompts.extend(read_prompts(f)?);
    }
    anyhow::ensure!(
        !prompts.is_empty(),
        "nothing to generate: give --prompt TEXT (repeatable) or --prompts FILE.jsonl"
    );
    let style = prompt_style(a.model, a.template.as_deref(), a.system.clone())?;
    let tok_spec = tokenizer_for(a.model, a.tokenizer.clone());
    eprintln!(
        "lexflow generate: {}, {}, tokenizer {tok_spec}, {}",
        a.model.display(),
        match &style {
            PromptStyle::Raw => "raw text".to_string(),
            PromptStyle::Qa(f) => format!(
                "Q&A template `{}`{}",
                f.template.as_str(),
                if f.system.is_some() {
                    " with a system turn"
                } else {
                    ""
                }
            ),
        },
        match a.sampling.is_greedy() {
            true => "greedy".to_string(),
            false => format!(
                "sampling (temperature {}, top-k {}, top-p {}, seed {})",
                a.sampling.temperature, a.sampling.top_k, a.sampling.top_p, a.sampling.seed
            ),
        }
    );
    let tok = crate::stages::tokenizer::Tokenizer::load(&tok_spec)?;
    if let PromptStyle::Qa(f) = &style {
        f.check_tokenizer(&tok)?;
    }
    let device = crate::common::device::parse_device(&a.device)?;
    crate::common::device::check_device(device, "--device", "--device cpu")?;
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let model = lexflow_gpu::checkpoint::load_hf(a.model, device, kind)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the model: {e}", a.model.display()))?;
    let vocab = model.cfg.vocab_size as i64;
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|(_, p)| match &style {
            PromptStyle::Qa(f) => crate::tasks::decode::prompt_ids(&tok, f, p),
            PromptStyle::Raw => {
                let mut v = tok.encode(p);
                if let Some(b) = tok.bos_id() {
                    v.insert(0, b);
                }
                v.into_iter().map(i64::from).collect()
            }
        })
        .collect();
    for ((id, _), p) in prompts.iter().zip(&ids) {
        if let Some(&bad) = p.iter().find(|&&t| t >= vocab) {
            anyhow::bail!(
                "{tok_spec}: prompt {id:?} has token id {bad}, but {} has {vocab} embeddings: pass the tokenizer the \
                 model was trained with (--tokenizer)",
                a.model.display()
            );
        }
    }
    let stops = crate::tasks::decode::stop_ids(&tok);
    let mut w: Box<dyn Write> = match a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let bs = a.batch_size.max(1);
    for (c, chunk) in ids.chunks(bs).enumerate() {
        let rows: Vec<u64> = (0..chunk.len()).map(|r| (c * bs + r) as u64).collect();
        let gen = crate::tasks::decode::decode_batch(
            &model,
            chunk,
            &stops,
            a.max_new_tokens,
            &a.sampling,
            &rows,
        )?;
        for (r, g) in rows.iter().zip(gen) {
            let (id, prompt) = &prompts[*r as usize];
            let text = tok.decode(&g);
            if a.json || a.out.is_some() {
                let line = Generated {
                    id: id.clone(),
                    prompt: prompt.clone(),
                    output: text,
                    token_ids: g,
                };
                writeln!(w, "{}", serde_json::to_string(&line)?)?;
            } else {
                if prompts.len() > 1 {
                    writeln!(w, "--- {id}")?;
                }
                writeln!(w, "{text}")?;
            }
        }
        w.flush()?;
    }
    if let Some(p) = a.out {
        eprintln!(
            "lexflow generate: {} answers in {}",
            prompts.len(),
            p.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `lexflow generate` looks for the model: a checkpoint directory, or a run directory (its newest checkpoint).
/// [`resolve_model_dir`], or with `best` the run directory's best checkpoint (`run.dir/best`, `train.keep_best`).
pub fn resolve_model_dir_best(p: &Path, best: bool) -> anyhow::Result<PathBuf> {
    if !best {
        return Ok(resolve_model_dir(p));
    }
    let b = p.join(crate::train::BEST_LINK);
    if b.join("config.json").is_file() {
        return Ok(b);
    }
    anyhow::bail!(
        "{}: no best checkpoint here ({} is written by a run with train.keep_best; give the run directory)",
        p.display(),
        b.display()
    )
}

pub fn resolve_model_dir(p: &Path) -> PathBuf {
    if p.join("config.json").is_file() {
        return p.to_path_buf();
    }
    crate::common::run_dir::list_checkpoints(p)
        .into_iter()
        .last()
        .map_or_else(|| p.to_path_buf(), |(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 3,
        }
    }

    #[test]
    fn greedy_is_the_argmax_with_ties_to_the_lower_id() {
        let l = [0.5f32, 2.0, -1.0, 2.0, f32::NEG_INFINITY];
        assert_eq!(distribution(&l, &Sampling::default()), vec![(1, 1.0)]);
        let mut rng = Sampling::default().rng(0);
        assert_eq!(sample(&l, &Sampling::default(), &mut rng), 1);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_smallest_nucleus() {
        let l = [3.0f32, 1.0, 2.0, 2.0, 0.0];
        let ids = |d: Vec<(u32, f64)>| d.into_iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(
            ids(distribution(&l, &s(1.0, 2, 1.0))),
            vec![0, 2, 3],
            "k-th tied"
        );
        assert_eq!(ids(distribution(&l, &s(1.0, 1, 1.0))), vec![0]);
        // softmax(3,2,2,1,0) ≈ .521 .191 .191 .070 .026; from the least likely, tokens go while their cumulative
        // probability is ≤ 1 − top_p: 0.6 keeps the first two (.026 + .070 + .191 ≤ .4), 0.5 the first only.
        assert_eq!(ids(distribution(&l, &s(1.0, 0, 0.6))), vec![0, 2]);
        assert_eq!(ids(distribution(&l, &s(1.0, 0, 0.5))), vec![0]);
        let d = distribution(&l, &s(0.7, 4, 0.9));
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(distribution(&[f32::NAN, f32::NEG_INFINITY], &s(1.0, 0, 1.0)).is_empty());
    }

    #[test]
    fn draws_follow_the_distribution() {
        // 40,000 draws from 5 tokens: every frequency within 4.5 standard deviations of its probability.
        let l = [1.0f32, 0.2, -0.5, 0.9, 0.0];
        let st = s(0.8, 0, 0.9);
        let d = distribution(&l, &st);
        let mut rng = st.rng(7);
        let n = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[sample(&l, &st, &mut rng) as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let p = d.iter().find(|x| x.0 == i as u32).map_or(0.0, |x| x.1);
            let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1e-9);
            let z = (*c as f64 - n as f64 * p) / sd;
            assert!(
                (p == 0.0 && *c == 0) || z.abs() < 4.5,
                "token {i}: {c} draws, expected {:.0} (z = {z:.1})",
                n as f64 * p
            );
        }
        // softmax(l / 0.8) ≈ .372 .137 .057 .328 .106: top-p 0.9 drops token 2 (.057 ≤ .1) only.
        assert_eq!(d.len(), 4, "{d:?}");
        assert_eq!(counts[2], 0);
    }

    #[test]
    fn streams_depend_on_seed_and_row_only() {
        let l: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |st: &Sampling, row: u64| {
            let mut r = st.rng(row);
            (0..20).map(|_| sample(&l, st, &mut r)).collect::<Vec<_>>()
        };
        let a = s(1.0, 0, 1.0);
        assert_eq!(draw(&a, 2), draw(&a, 2));
        assert_ne!(draw(&a, 2), draw(&a, 3));
        let mut b = a.clone();
        b.seed = 4;
        assert_ne!(draw(&a, 2), draw(&b, 2));
    }

    /// A checkpoint directory holding only a `run_config.toml` with these input paths.
    fn checkpoint_with_inputs(dir: &Path, paths: &[String]) -> PathBuf {
        let ckpt = dir.join("checkpoints/step-000003");
        std::fs::create_dir_all(&ckpt).unwrap();
        let toml = format!(
            "[run]\nname = \"sft\"\ndir = {:?}\n\n[input]\npaths = {:?}\n",
            dir.display().to_string(),
            paths
        );
        std::fs::write(ckpt.join(crate::common::run_dir::RUN_CONFIG_FILE), toml).unwrap();
        ckpt
    }

    #[test]
    fn a_run_fine_tuned_on_a_directory_of_pairs_answers_in_its_template() {
        // docs/QA.md fine-tunes with `paths = ["runs/qa/train"]`: a directory of `<lang>.jsonl` files.
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("qa/train");
        std::fs::create_dir_all(&train).unwrap();
        std::fs::write(train.join("en.jsonl"), "").unwrap();
        let plain = PromptStyle::Qa(PromptFormat::default());
        for paths in [
            vec![train.display().to_string()],
            vec![format!("{}/*.jsonl", train.display())],
            vec![train.join("en.jsonl").display().to_string()],
            vec!["gone/fr.jsonl.zst".to_string()],
        ] {
            let ckpt = checkpoint_with_inputs(dir.path(), &paths);
            assert_eq!(prompt_style(&ckpt, None, None).unwrap(), plain, "{paths:?}");
        }
        // FORMEX inputs: raw text; `--template` overrides either way.
        let formex = dir.path().join("formex");
        std::fs::create_dir_all(&formex).unwrap();
        std::fs::write(formex.join("L_2016119EN.01000101.xml"), "").unwrap();
        let ckpt = checkpoint_with_inputs(dir.path(), &[formex.display().to_string()]);
        assert_eq!(prompt_style(&ckpt, None, None).unwrap(), PromptStyle::Raw);
        assert_eq!(prompt_style(&ckpt, Some("plain"), None).unwrap(), plain);
    }

    #[test]
    fn bad_settings_name_the_option() {
        assert!(s(-1.0, 0, 1.0)
            .check()
            .unwrap_err()
            .to_string()
            .contains("--temperature"));
        assert!(s(1.0, 0, 0.0)
            .check()
            .unwrap_err()
            .to_string()
            .contains("--top-p"));
        assert!(s(0.0, 5, 1.0)
            .check()
            .unwrap_err()
            .to_string()
            .contains("--temperature > 0"));
        assert!(s(0.7, 40, 0.9).check().is_ok());
    }
}
