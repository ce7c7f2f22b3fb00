//! The evaluation hook of the step loop: every `eval.every` steps (and after the last) the ranks measure the
//! held-out loss per language and/or answer the Q&A questions; rank 0 records the result (`eval.jsonl`, metrics).

use std::time::Instant;

use lexflow_gpu::{Batch, SequenceRef};

use super::model::Weights;
use super::records::append_json_line;
use super::setup::{EvalSetup, RankResult, TrainerError};
use super::step::Rank;
use crate::common::device::seq_ref;
use crate::tasks::heldout::{EvalResult, HeldOutSet, QaEvalResult, QaProbe};

impl Rank<'_> {
    /// One evaluation: the held-out loss and/or the Q&A scores (every rank takes part; rank 0 records).
    pub(super) fn evaluate(
        &self,
        model: &Weights,
        e: &EvalSetup,
        step: u64,
        result: &mut RankResult,
    ) -> Result<(), TrainerError> {
        let t0 = Instant::now();
        self.ctx.set_input(format!("evaluation at step {step}"));
        let mut r = match &e.set {
            Some(set) => self.held_out_loss(model, set, e.micro_batch, step)?,
            None => EvalResult {
                step,
                loss: None,
                tokens: 0,
                seconds: 0.0,
                languages: Default::default(),
                qa: None,
            },
        };
        if let Some(qa) = &e.qa {
            r.qa = self.qa_scores(model, qa, step)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        r.seconds = secs;
        result.eval_seconds += secs;
        if self.rank != 0 {
            return Ok(());
        }
        record_evaluation(&r, step, secs);
        append_json_line(
            &self.setup.run_dir.join(crate::tasks::heldout::RESULTS_FILE),
            &serde_json::to_string(&r).expect("eval result is JSON"),
        );
        result.evals.push(r);
        Ok(())
    }

    /// Loss on the held-out set: rank r evaluates sequences `k ≡ r (mod world)`, without a graph, each sequence's
    /// cross-entropy sum kept apart; one all-reduce of those sums (every entry comes from one rank, the others add
    /// zeros, so it is exact) and a sum in index order make the result independent of the world size. Fully
    /// sharded, every rank runs as many micro-batches as the busiest one (the units are gathered from all ranks):
    /// one with nothing left to evaluate runs its first sequence again and ignores the result.
    pub(super) fn held_out_loss(
        &self,
        model: &Weights,
        set: &HeldOutSet,
        micro_batch: usize,
        step: u64,
    ) -> Result<EvalResult, TrainerError> {
        let t0 = Instant::now();
        let all = set.sequences();
        let mut sums = vec![0f64; all.len()];
        let mine: Vec<usize> = (self.rank..all.len()).step_by(self.world).collect();
        let mb = micro_batch.max(1);
        let chunks: Vec<&[usize]> = mine.chunks(mb).collect();
        let rounds = match model {
            Weights::Whole(_) => chunks.len(),
            Weights::Sharded(_) => all.len().div_ceil(self.world).div_ceil(mb),
        };
        for r in 0..rounds {
            let (chunk, idle) = match chunks.get(r) {
                Some(c) => (*c, false),
                None => (&[0usize][..], true),
            };
            let rows: Vec<SequenceRef<'_>> = chunk.iter().map(|&k| seq_ref(all[k].1)).collect();
            let batch = Batch::new(&rows, self.device)?;
            let logits = model.logits(&batch, &*self.coll)?;
            if idle {
                continue;
            }
            tch::no_grad(|| {
                for (i, &k) in chunk.iter().enumerate() {
                    let i = i as i64;
                    let l = lexflow_gpu::cross_entropy_sum(
                        &logits.narrow(0, i, 1),
                        &batch.labels.narrow(0, i, 1),
                    );
                    sums[k] = l.double_value(&[]);
                }
            });
        }
        self.coll.all_reduce_sum_f64(&mut sums, self.device)?;
        let r = crate::tasks::heldout::aggregate(set, step, &sums, t0.elapsed().as_secs_f64());
        match r.loss {
            Some(l) if !l.is_finite() => Err(TrainerError::Setup(format!(
                "held-out loss is {l} at step {step}"
            ))),
            _ => Ok(r),
        }
    }

    /// Greedy answers to the Q&A questions: rank r answers questions `k ≡ r (mod world)`, `batch_size` at a time;
    /// the answers' token ids travel to every rank in one all-reduce (each entry from one rank, exact), and rank 0
    /// decodes and scores them (None on the other ranks).
    pub(super) fn qa_scores(
        &self,
        model: &Weights,
        qa: &QaProbe,
        step: u64,
    ) -> Result<Option<QaEvalResult>, TrainerError> {
        let t0 = Instant::now();
        let n = qa.gold.len();
        let w = qa.max_new_tokens + 1;
        let mut buf = vec![0f64; n * w];
        let mine: Vec<usize> = (self.rank..n).step_by(self.world).collect();
        model.with_whole(&*self.coll, |model| -> Result<(), TrainerError> {
            for chunk in mine.chunks(qa.batch_size.max(1)) {
                let prompts: Vec<Vec<i64>> = chunk.iter().map(|&k| qa.prompts[k].clone()).collect();
                let gen = crate::tasks::decode::greedy_batch(
                    model,
                    &prompts,
                    &qa.stops,
                    qa.max_new_tokens,
                )
                .map_err(|e| {
                    TrainerError::Setup(format!("Q&A evaluation at step {step}: {e:#}"))
                })?;
                for (&k, ids) in chunk.iter().zip(gen) {
                    buf[k * w] = ids.len() as f64;
                    for (j, &t) in ids.iter().enumerate() {
                        buf[k * w + 1 + j] = t as f64;
                    }
                }
            }
            Ok(())
        })??;
        self.coll.all_reduce_sum_f64(&mut buf, self.device)?;
        if self.rank != 0 {
            return Ok(None);
        }
        let mut outputs = std::collections::HashMap::new();
        let mut lines = String::new();
        for (k, g) in qa.gold.iter().enumerate() {
            let len = buf[k * w] as usize;
            let ids: Vec<u32> = buf[k * w + 1..k * w + 1 + len]
                .iter()
                .map(|&x| x as u32)
                .collect();
            let text = qa.tokenizer.decode(&ids).trim().to_string();
            lines +=
                &serde_json::json!({"id": g.id, "lang": g.lang, "output": text, "token_ids": ids})
                    .to_string();
            lines.push('\n');
            outputs.insert(g.id.clone(), text);
        }
        let path = self
            .setup
            .run_dir
            .join(crate::tasks::heldout::QA_DIR)
            .join(format!("step-{step:06}.jsonl"));
        if let Err(e) = std::fs::write(&path, lines) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        let rep = crate::tasks::eval::report(&qa.gold, &outputs, &qa.index, &qa.index_source);
        Ok(Some(QaEvalResult {
            overall: rep.overall,
            by_language: rep.by_language,
            seconds: t0.elapsed().as_secs_f64(),
            predictions: path,
        }))
    }
}

/// Rank 0's metrics and log line of an evaluation.
fn record_evaluation(r: &EvalResult, step: u64, secs: f64) {
    let m = lexflow_metrics::global();
    for (lang, l) in &r.languages {
        m.eval_loss.with_label_values(&[lang]).set(l.loss);
        m.eval_tokens
            .with_label_values(&[lang])
            .set(l.tokens as i64);
    }
    if let Some(loss) = r.loss {
        m.eval_loss.with_label_values(&["all"]).set(loss);
        m.eval_tokens
            .with_label_values(&["all"])
            .set(r.tokens as i64);
    }
    if let Some(q) = &r.qa {
        let langs = q.by_language.iter().map(|(k, v)| (k.as_str(), v));
        for (lang, a) in std::iter::once(("all", &q.overall)).chain(langs) {
            for (metric, v) in [
                ("exact_match", a.exact_match),
                ("rouge_l", a.rouge_l),
                ("citation_accuracy", a.citation_accuracy),
                ("hallucination_rate", a.hallucination_rate),
                ("wrong_citation_rate", a.wrong_citation_rate),
            ] {
                m.eval_qa.with_label_values(&[metric, lang]).set(v);
            }
        }
    }
    m.eval_step.set(step as i64);
    m.eval_seconds.observe(secs);
    let per_lang: Vec<String> = r
        .languages
        .iter()
        .map(|(k, v)| format!("{k}={:.4}", v.loss))
        .collect();
    tracing::info!(
        step,
        loss = r.loss.map(|l| format!("{l:.4}")).unwrap_or_default(),
        per_language = per_lang.join(" "),
        qa_citation_accuracy =
            r.qa.as_ref()
                .map(|q| format!("{:.3}", q.overall.citation_accuracy))
                .unwrap_or_default(),
        qa_rouge_l =
            r.qa.as_ref()
                .map(|q| format!("{:.3}", q.overall.rouge_l))
                .unwrap_or_default(),
        seconds = format!("{secs:.2}"),
        "evaluation"
    );
}
