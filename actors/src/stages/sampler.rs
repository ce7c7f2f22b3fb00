//! The language sampler: merges the per-language lanes into one stream whose **token** shares follow the configured mix.
//!
//! Rule: emit the next document of the language with the largest token deficit `target_l · total − emitted_l`
//! (ties: the language listed first). The chosen language is never above its target, so after emitting a document of
//! `n` tokens it overshoots by less than `n`; the deficits sum to zero, so no language falls behind by more than a
//! document either. The property test at the bottom checks `|emitted_l − target_l · total| ≤ longest document` at every
//! prefix of random streams. The rule is a pure function of the token counts: the output does not depend on thread
//! counts or timing, only on each lane's (deterministic) document order.
//!
//! Lanes are independent edges, so waiting on the language that is due never deadlocks: the others fill up and block
//! their own readers (backpressure) until they are due.

use std::collections::{BTreeMap, VecDeque};

use lexflow_dataflow::{ActorContext, ActorError, EdgeReceiver, EdgeSender};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::types::{LanePosition, SampledDoc, SamplerState, TokenizedBatch, TokenizedDoc};

/// What the sampler does when a language's input runs out.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExhaustedPolicy {
    /// End the stream as soon as any language runs out (the mix stays exact).
    #[default]
    Stop,
    /// Start that language's input again from its first file.
    Cycle,
    /// Drop the language and renormalize the remaining targets.
    Renormalize,
}

/// The default `sampler.mix`: target token shares of the five sample languages.
pub fn default_mix() -> BTreeMap<String, f64> {
    [
        ("en", 0.35),
        ("fr", 0.25),
        ("de", 0.20),
        ("es", 0.12),
        ("pt", 0.08),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Deficit-driven choice among languages with target shares.
#[derive(Debug, Clone)]
pub struct LanguageSampler {
    langs: Vec<String>,
    targets: Vec<f64>,
    emitted: Vec<u64>,
    docs: Vec<u64>,
    active: Vec<bool>,
    total: u64,
}

impl LanguageSampler {
    /// `mix`: (language, share) in lane order; shares sum to 1.
    pub fn new(mix: &[(String, f64)]) -> Self {
        let n = mix.len();
        LanguageSampler {
            langs: mix.iter().map(|(l, _)| l.clone()).collect(),
            targets: mix.iter().map(|(_, s)| *s).collect(),
            emitted: vec![0; n],
            docs: vec![0; n],
            active: vec![true; n],
            total: 0,
        }
    }

    /// The lane due next (None when every lane is exhausted). Deficits are taken over the active lanes only (their
    /// renormalized shares of the tokens they emitted), so after a lane runs out (`renormalize`) the others stay in
    /// their relative proportions, counted over the whole run: the tokens of the exhausted lane owe nobody anything.
    pub fn choose(&self) -> Option<usize> {
        let (norm, active_total) = (0..self.langs.len())
            .filter(|&i| self.active[i])
            .fold((0.0f64, 0u64), |(n, t), i| {
                (n + self.targets[i], t + self.emitted[i])
            });
        let mut best: Option<(usize, f64)> = None;
        for i in 0..self.langs.len() {
            if !self.active[i] {
                continue;
            }
            let deficit = self.targets[i] / norm * active_total as f64 - self.emitted[i] as f64;
            if best.is_none_or(|(_, d)| deficit > d + 1e-9) {
                best = Some((i, deficit));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Continues from a checkpointed state (same lanes, same order).
    pub fn restore(&mut self, st: &SamplerState) {
        if st.emitted_tokens.len() == self.langs.len() {
            self.emitted.clone_from(&st.emitted_tokens);
            self.docs.clone_from(&st.documents);
            self.active.clone_from(&st.active);
            self.total = self.emitted.iter().sum();
        }
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            emitted_tokens: self.emitted.clone(),
            documents: self.docs.clone(),
            active: self.active.clone(),
        }
    }

    pub fn record(&mut self, lane: usize, tokens: u64) {
        self.emitted[lane] += tokens;
        self.docs[lane] += 1;
        self.total += tokens;
    }

    /// Removes a lane from the mix; the remaining targets are renormalized.
    pub fn deactivate(&mut self, lane: usize) {
        self.active[lane] = false;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn report(&self) -> SamplerReport {
        let total = self.total.max(1) as f64;
        SamplerReport {
            total_tokens: self.total,
            languages: (0..self.langs.len())
                .map(|i| LangReport {
                    lang: self.langs[i].clone(),
                    target_share: self.targets[i],
                    realized_share: self.emitted[i] as f64 / total,
                    tokens: self.emitted[i],
                    documents: self.docs[i],
                    exhausted: !self.active[i],
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SamplerReport {
    pub total_tokens: u64,
    pub languages: Vec<LangReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LangReport {
    pub lang: String,
    pub target_share: f64,
    pub realized_share: f64,
    pub tokens: u64,
    pub documents: u64,
    pub exhausted: bool,
}

/// Documents per message from the sampler to the packer (at most).
pub const OUT_BATCH_DOCS: usize = 64;

/// Tokens per message from the sampler to the packer (a message is sent once it holds this many): edges are bounded
/// in messages, and whole acts run to 100k tokens, so 64 of them per message would let a sampler→packer edge of
/// capacity 16 hold ~1,000 acts read ahead of training. 256 Ki tokens (1 MiB of ids) keep it to a few MiB.
pub const OUT_BATCH_TOKENS: usize = 1 << 18;

/// Where the sampler starts: fresh, or from a checkpoint's lane positions and counters.
#[derive(Debug, Clone, Default)]
pub struct SamplerStart {
    pub lanes: Vec<LanePosition>,
    pub state: Option<SamplerState>,
    /// Files per lane: under `cycle`, a lane that goes through more files than this without one document to train
    /// on would cycle forever (every file unreadable, every document a duplicate): that is an error.
    pub lane_files: Vec<u64>,
    /// `packer.max_doc_tokens`: the packer keeps only this many tokens of a document, so the mix counts only those
    /// (counting the whole document would skew the trained mix towards languages with long documents).
    pub max_doc_tokens: Option<usize>,
}

/// The sampler actor body. `lanes[i]` carries the tokenized documents of language `mix[i]`. Documents with zero tokens
/// are passed over (they carry no text: manifests, empty files, documents skipped on resume). Every emitted document
/// carries the lane positions and counters right before it (the resume point of what it ends up in).
pub fn run_sampler(
    ctx: &ActorContext,
    mix: &[(String, f64)],
    policy: ExhaustedPolicy,
    start: SamplerStart,
    lanes: Vec<EdgeReceiver<TokenizedBatch>>,
    out: EdgeSender<Vec<SampledDoc>>,
    report: &std::sync::Mutex<SamplerReport>,
) -> Result<(), ActorError> {
    let mut s = LanguageSampler::new(mix);
    if let Some(st) = &start.state {
        s.restore(st);
    }
    let mut positions: Vec<LanePosition> = if start.lanes.len() == lanes.len() {
        start.lanes.clone()
    } else {
        vec![LanePosition::default(); lanes.len()]
    };
    let mut pending: Vec<VecDeque<TokenizedDoc>> = vec![VecDeque::new(); lanes.len()];
    // Files in a row that gave a lane nothing to train on.
    let mut barren = vec![0u64; lanes.len()];
    let mut batch = Vec::with_capacity(OUT_BATCH_DOCS);
    let mut batch_tokens = 0usize;
    let m = lexflow_metrics::global();
    let am = lexflow_metrics::actor("sampler");
    let lat = lexflow_metrics::latency("sampler");
    for (l, t) in mix {
        m.sampler_target_share.with_label_values(&[l]).set(*t);
    }
    let publish = |s: &LanguageSampler| {
        let r = s.report();
        for l in &r.languages {
            m.sampler_realized_share
                .with_label_values(&[&l.lang])
                .set(l.realized_share);
        }
        if let Ok(mut g) = report.lock() {
            *g = r;
        }
    };
    'outer: while let Some(lane) = s.choose() {
        // Next non-empty document of the due lane.
        let doc = loop {
            if let Some(d) = pending[lane].pop_front() {
                if d.tokens.is_empty() {
                    continue;
                }
                break d;
            }
            match lanes[lane].recv() {
                Ok(b) => {
                    if b.docs.iter().any(|d| !d.tokens.is_empty()) {
                        barren[lane] = 0;
                    } else {
                        barren[lane] += 1;
                        // More than a whole pass (the resume file may have been skipped over): nothing will come.
                        let n = start.lane_files.get(lane).copied().unwrap_or(u64::MAX);
                        if policy == ExhaustedPolicy::Cycle && barren[lane] > n {
                            return Err(format!(
                                "language {}: a whole pass over its {n} input files gave no document to train on \
                                 (every file unreadable or empty, or every document dropped as a duplicate): with \
                                 sampler.on_exhausted = \"cycle\" it would repeat forever. See quarantine.jsonl and \
                                 dedup.jsonl in the run directory; fix the inputs or remove the language from \
                                 sampler.mix",
                                mix[lane].0
                            )
                            .into());
                        }
                    }
                    pending[lane].extend(b.docs)
                }
                Err(_) => match policy {
                    // Cycling lanes never close (their reader restarts); a closed lane means its input was empty or
                    // the run is stopping. Either way the exact mix can no longer be kept.
                    ExhaustedPolicy::Stop | ExhaustedPolicy::Cycle => {
                        tracing::info!(lang = %mix[lane].0, "language exhausted: ending the stream (on_exhausted = {:?})", policy);
                        s.deactivate(lane);
                        break 'outer;
                    }
                    ExhaustedPolicy::Renormalize => {
                        tracing::info!(lang = %mix[lane].0, "language exhausted: renormalizing the mix over the others");
                        s.deactivate(lane);
                        continue 'outer;
                    }
                },
            }
        };
        let t = std::time::Instant::now();
        ctx.set_input(format!("lane {} ({}) doc {:?}", lane, mix[lane].0, doc.id));
        let before_lanes = Arc::new(positions.clone());
        let before_state = Arc::new(s.state());
        positions[lane] = LanePosition {
            file: doc.id.file,
            ordinal: doc.id.ordinal + 1,
        };
        let trained = doc
            .tokens
            .len()
            .min(start.max_doc_tokens.unwrap_or(usize::MAX)) as u64;
        s.record(lane, trained);
        m.sampler_tokens
            .with_label_values(&[&mix[lane].0])
            .inc_by(trained);
        am.items_in.inc();
        am.items_out.inc();
        am.bytes_out.inc_by(doc.tokens.len() as u64 * 4);
        batch.push(SampledDoc {
            doc,
            lanes: before_lanes,
            sampler: before_state,
        });
        lat.record(t.elapsed());
        am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
        batch_tokens += batch.last().map_or(0, |d| d.doc.tokens.len());
        if batch.len() == OUT_BATCH_DOCS || batch_tokens >= OUT_BATCH_TOKENS {
            batch_tokens = 0;
            publish(&s);
            if out
                .send(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(OUT_BATCH_DOCS),
                ))
                .is_err()
            {
                publish(&s);
                return Ok(()); // downstream finished (e.g. training reached its step count)
            }
        }
    }
    if !batch.is_empty() {
        let _ = out.send(batch);
    }
    publish(&s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mix() -> Vec<(String, f64)> {
        default_mix().into_iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// At every prefix, each language's emitted tokens are within one (the longest) document of its target.
        #[test]
        fn every_prefix_within_one_document_of_target(
            lens in proptest::collection::vec(proptest::collection::vec(1u64..5000, 50..200), 5),
        ) {
            let mix = mix();
            let mut s = LanguageSampler::new(&mix);
            let mut next = [0usize; 5];
            let mut longest = 0u64;
            for _ in 0..400 {
                let lane = s.choose().unwrap();
                let n = lens[lane][next[lane] % lens[lane].len()];
                next[lane] += 1;
                longest = longest.max(n);
                s.record(lane, n);
                let total = s.total() as f64;
                for (i, (_, t)) in mix.iter().enumerate() {
                    let dev = (s.emitted[i] as f64 - t * total).abs();
                    prop_assert!(dev <= longest as f64 + 1e-6,
                        "lang {i}: emitted {} target {} dev {dev} > longest {longest}", s.emitted[i], t * total);
                }
            }
        }
    }

    #[test]
    fn converges_to_mix_with_unequal_document_sizes() {
        let mix = mix();
        let mut s = LanguageSampler::new(&mix);
        let sizes = [900u64, 50, 3000, 7, 400];
        for _ in 0..20_000 {
            let lane = s.choose().unwrap();
            s.record(lane, sizes[lane]);
        }
        let r = s.report();
        for l in &r.languages {
            let dev = (l.tokens as f64 - l.target_share * r.total_tokens as f64).abs();
            assert!(dev <= 3000.0, "{l:?}: {dev} tokens off target");
            assert!((l.realized_share - l.target_share).abs() < 0.005, "{l:?}");
        }
    }

    #[test]
    fn renormalizes_after_deactivation() {
        let mix = vec![
            ("en".to_string(), 0.5),
            ("fr".to_string(), 0.25),
            ("de".to_string(), 0.25),
        ];
        let mut s = LanguageSampler::new(&mix);
        s.deactivate(0);
        for _ in 0..1000 {
            let lane = s.choose().unwrap();
            assert_ne!(lane, 0);
            s.record(lane, 10);
        }
        let r = s.report();
        assert!((r.languages[1].realized_share - 0.5).abs() < 0.01);
    }

    #[test]
    fn after_a_lane_runs_out_the_others_keep_their_relative_shares() {
        // en runs out after 10,000 tokens; fr and de (2 : 1) must stay within two documents of 2/3 and 1/3 of what
        // they emitted together, at every prefix — the exhausted lane's tokens must not shift them.
        let mix = vec![
            ("en".to_string(), 0.4),
            ("fr".to_string(), 0.4),
            ("de".to_string(), 0.2),
        ];
        let mut s = LanguageSampler::new(&mix);
        let doc = 10u64;
        while s.total() < 10_000 {
            let lane = s.choose().unwrap();
            s.record(lane, doc);
        }
        s.deactivate(0);
        for _ in 0..500 {
            let lane = s.choose().unwrap();
            assert_ne!(lane, 0);
            s.record(lane, doc);
            let st = s.state();
            let active = st.emitted_tokens[1] + st.emitted_tokens[2];
            for (lane, share) in [(1, 2.0 / 3.0), (2, 1.0 / 3.0)] {
                let dev = (st.emitted_tokens[lane] as f64 - share * active as f64).abs();
                assert!(
                    dev <= 2.0 * doc as f64,
                    "lane {lane}: {dev} tokens off after {active}"
                );
            }
        }
    }
}
