//! Decoding with a checkpoint, shared by `lexflow generate`, `lexflow qa eval --model` and the trainer's Q&A
//! evaluation: the prompt's token ids, the stop tokens, the choice of the next token (greedy, or sampled with
//! temperature, top-k and top-p exactly as Hugging Face's logits warpers filter) and batched KV-cache decoding.
//!
//! Sampling is reproducible: every prompt has its own random stream (ChaCha8 seeded with `seed`, stream = the
//! prompt's index in the input), so its answer depends on the seed and its own logits only — not on which other
//! prompts share its batch or how many there are. `scripts/hf_sampling_ref.py` checks the filtered distribution
//! against transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (`tests/generate.rs`).

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::stages::qa_format::PromptFormat;
use crate::stages::tokenizer::Tokenizer;

/// How the next token is chosen. `temperature = 0`: greedy (the most likely token, ties to the lowest id). Otherwise
/// the softmax of `logits / temperature`, restricted to the `top_k` most likely tokens (0: all; tokens tied with the
/// k-th are kept) and then to the most likely tokens whose probability adds up to `top_p` (1: all) — the order and
/// the tie rules of transformers' `generate` with `do_sample=True`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The errors of a setting, naming the option and what it accepts.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature {}: must be a finite number ≥ 0 (0: greedy decoding)",
            self.temperature
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p {}: must be in (0, 1] (1: no nucleus filtering)",
            self.top_p
        );
        anyhow::ensure!(
            !self.is_greedy() || (self.top_k == 0 && self.top_p == 1.0),
            "--top-k/--top-p need --temperature > 0 (temperature 0 is greedy decoding)"
        );
        Ok(())
    }

    /// The random stream of prompt number `row` of the input.
    pub fn rng(&self, row: u64) -> rand_chacha::ChaCha8Rng {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        r.set_stream(row);
        r
    }
}

/// The distribution the next token is drawn from: `(id, probability)` of every token left after temperature, top-k
/// and top-p, most likely first (ties: lower id first), probabilities summing to 1. Greedy: the argmax alone.
/// Non-finite logits (−∞ masks) never survive.
pub fn distribution(logits: &[f32], s: &Sampling) -> Vec<(u32, f64)> {
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize].is_finite())
        .collect();
    if order.is_empty() {
        return Vec::new();
    }
    let t = if s.is_greedy() { 1.0 } else { s.temperature };
    let scaled = |i: u32| logits[i as usize] as f64 / t;
    order.sort_by(|&a, &b| scaled(b).total_cmp(&scaled(a)).then(a.cmp(&b)));
    if s.is_greedy() {
        return vec![(order[0], 1.0)];
    }
    if s.top_k > 0 && s.top_k < order.len() {
        let kth = scaled(order[s.top_k - 1]);
        let keep = order.iter().take_while(|&&i| scaled(i) >= kth).count();
        order.truncate(keep);
    }
    let max = scaled(order[0]);
    let mut probs: Vec<f64> = order.iter().map(|&i| (scaled(i) - max).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        // transformers: in ascending order, drop the tokens whose cumulative probability is ≤ 1 − top_p; the most
        // likely token always stays.
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate().rev() {
            cum += p;
            if cum <= 1.0 - s.top_p && k > 0 {
                keep = k;
            } else {
                break;
            }
        }
        order.truncate(keep);
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    order.into_iter().zip(probs).collect()
}

/// Draws the next token from [`distribution`] with `rng` (one uniform number per draw, inverse CDF).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let d = distribution(logits, s);
    if d.len() <= 1 {
        return d.first().map_or(0, |x| x.0);
    }
    let u: f64 = rng.gen();
    let mut cum = 0.0;
    for &(id, p) in &d {
        cum += p;
        if u < cum {
            return id;
        }
    }
    d[d.len() - 1].0
}

/// The token ids a model is prompted with: BOS once (the `llama3` template writes it itself), then the prompt.
pub fn prompt_ids(tok: &Tokenizer, format: &PromptFormat, question: &str) -> Vec<i64> {
    let mut ids = tok.encode(&format.prompt(question));
    if let Some(bos) = tok.bos_id() {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids.into_iter().map(i64::from).collect()
}

/// Tokens that end an answer: end of text, end of turn.
pub fn stop_ids(tok: &Tokenizer) -> Vec<u32> {
    [tok.eos_id(), tok.eot_id()].into_iter().flatten().collect()
}

/// Greedy decoding of a batch of prompts with a KV cache: one prompt as a plain causal prefill, several left-padded
/// with each row masked to its own tokens. A row ends at a stop token (not included), after `max_new` tokens, or
/// at the model's context length. No graph is built.
pub fn greedy_batch(
    model: &lexflow_gpu::Llama,
    prompts: &[Vec<i64>],
    stops: &[u32],
    max_new: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    decode_batch(model, prompts, stops, max_new, &Sampling::default(), &[])
}

/// [`greedy_batch`] with a choice of the next token ([`Sampling`]); `rows[r]`: the random stream
/// of prompt `r` (its index in the whole input, so that a sampled answer does not depend on its batch).
pub fn decode_batch(
    model: &lexflow_gpu::Llama,
    prompts: &[Vec<i64>],
    stops: &[u32],
    max_new: usize,
    sampling: &Sampling,
    rows: &[u64],
) -> anyhow::Result<Vec<Vec<u32>>> {
    use lexflow_gpu::tch::{self, Kind, Tensor};
    let _ng = tch::no_grad_guard();
    let device = model.device();
    let vocab = model.cfg.vocab_size as i64;
    let max_len = model.cfg.max_position_embeddings;
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut gen: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut rngs: Vec<rand_chacha::ChaCha8Rng> = (0..b)
        .map(|r| sampling.rng(rows.get(r).copied().unwrap_or(r as u64)))
        .collect();
    let mut finished = vec![false; b];
    let mut cache = lexflow_gpu::KvCache::new();
    let (mut feed, mut valid) = if b == 1 {
        (Tensor::from_slice(&prompts[0]).view([1, -1]), None)
    } else {
        let mut ids = Vec::with_capacity(b * l);
        let mut v = Vec::with_capacity(b * l);
        for p in prompts {
            ids.extend(std::iter::repeat_n(0i64, l - p.len()).chain(p.iter().copied()));
            v.extend((0..l).map(|j| j >= l - p.len()));
        }
        (
            Tensor::from_slice(&ids).view([b as i64, l as i64]),
            Some(Tensor::from_slice(&v).view([b as i64, l as i64])),
        )
    };
    let mut step = 0;
    while step < max_new && finished.iter().any(|f| !f) {
        if l + step >= max_len {
            break;
        }
        let logits = match &valid {
            None => model.forward_cached(&feed.to_device(device), &mut cache),
            Some(v) => model.forward_cached_padded(
                &feed.to_device(device),
                &v.to_device(device),
                &mut cache,
            ),
        };
        let last = logits.select(1, -1).narrow(-1, 0, vocab);
        let next: Vec<i64> = if sampling.is_greedy() {
            Vec::<i64>::try_from(last.argmax(-1, false).to_device(tch::Device::Cpu))?
        } else {
            let flat = Vec::<f32>::try_from(
                last.to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu)
                    .reshape([-1]),
            )?;
            flat.chunks(vocab as usize)
                .zip(rngs.iter_mut())
                .map(|(row, rng)| sample(row, sampling, rng) as i64)
                .collect()
        };
        for (r, &t) in next.iter().enumerate() {
            if finished[r] {
                continue;
            }
            if stops.contains(&(t as u32)) {
                finished[r] = true;
            } else {
                gen[r].push(t as u32);
            }
        }
        feed = Tensor::from_slice(&next).view([b as i64, 1]);
        if valid.is_some() {
            valid = Some(Tensor::ones([b as i64, 1], (Kind::Bool, tch::Device::Cpu)));
        }
        step += 1;
    }
    Ok(gen)
}
