//! The packer: turns the sampler's document stream into fixed-length [`PackedSequence`]s of `seq_len + 1` tokens
//! (inputs `[..seq_len]`, labels `[1..]`), with an end-of-text token after every document.
//!
//! * `concat`: concatenate and chunk. Never pads except the very last sequence; a document that crosses a boundary is
//!   split (its pieces say so).
//! * `best-fit`: online best-fit over at most `lookahead` open sequences. A document (plus its EOT) goes into the open
//!   sequence with the least room that still fits; if none fits and all slots are taken, the fullest open sequence is
//!   closed with padding. Documents longer than a whole sequence are cut into full sequences first and only their tail
//!   is placed. Fewer documents are split than with `concat`, at the cost of a little padding.
//!
//! Invariant (tested): every token of every document appears exactly once, in order, across the pieces of the output,
//! except tokens dropped by `max_doc_tokens` truncation, which are counted.

use std::collections::VecDeque;

use lexflow_dataflow::{ActorContext, ActorError, EdgeReceiver, EdgeSender};
use serde::{Deserialize, Serialize};

use std::num::NonZeroUsize;
use std::sync::Arc;

use crate::types::{
    DocId, LanePosition, OpenSequence, PackedSequence, PackerState, Piece, ResumePoint, SampledDoc,
    SamplerState, TokenizedDoc,
};

/// `[packer]`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PackMode {
    /// Concatenate documents with an end-of-text token between them and cut every `seq_len + 1` tokens.
    #[default]
    Concat,
    /// Online best-fit over a bounded lookahead buffer of open sequences: fewer documents are split.
    BestFit,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackerConfig {
    #[serde(default = "default_seq_len")]
    pub seq_len: NonZeroUsize,
    #[serde(default)]
    pub mode: PackMode,
    /// best-fit: number of open sequences kept while searching for a fit.
    #[serde(default = "default_lookahead")]
    pub lookahead: NonZeroUsize,
    /// Token placed after every document (name in the tokenizer's vocabulary).
    #[serde(default = "default_eot")]
    pub eot_token: String,
    /// Token used for padding (labels of padding are ignored).
    #[serde(default = "default_eot")]
    pub pad_token: String,
    /// Documents longer than this many tokens are truncated (None: split across sequences).
    #[serde(default)]
    pub max_doc_tokens: Option<NonZeroUsize>,
}

fn default_seq_len() -> NonZeroUsize {
    NonZeroUsize::new(4096).expect("non-zero")
}

fn default_lookahead() -> NonZeroUsize {
    NonZeroUsize::new(64).expect("non-zero")
}

fn default_eot() -> String {
    "<|end_of_text|>".into()
}

impl Default for PackerConfig {
    fn default() -> Self {
        PackerConfig {
            seq_len: default_seq_len(),
            mode: PackMode::Concat,
            lookahead: default_lookahead(),
            eot_token: default_eot(),
            pad_token: default_eot(),
            max_doc_tokens: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PackerReport {
    pub sequences: u64,
    pub documents: u64,
    pub document_tokens: u64,
    pub eot_tokens: u64,
    pub padding_tokens: u64,
    /// Documents cut across two or more sequences.
    pub split_documents: u64,
    /// Documents shortened by `max_doc_tokens`, and the tokens dropped.
    pub truncated_documents: u64,
    pub truncated_tokens: u64,
    /// Non-padding share of all emitted tokens.
    pub fill_efficiency: f64,
}

struct Open {
    tokens: Vec<u32>,
    pieces: Vec<Piece>,
    /// Creation order, to flush deterministically.
    born: u64,
}

/// The packing state machine (pure: no channels), so that invariants can be tested directly.
pub struct Packer {
    cap: usize,
    mode: PackMode,
    lookahead: usize,
    eot: u32,
    pad: u32,
    max_doc_tokens: Option<usize>,
    open: Vec<Open>,
    born: u64,
    next_index: u64,
    ready: VecDeque<PackedSequence>,
    /// Resume point attached to the sequences emitted by the current `push`/`flush`.
    current_resume: Option<Arc<ResumePoint>>,
    /// Records into the process's `lexflow_packer_*` metrics (the training packer); false for the held-out set's
    /// packers ([`Packer::unmetered`]), whose sequences are never trained on.
    metered: bool,
    pub report: PackerReport,
}

/// Input positions whose target is a prompt token: doc token `j` of a piece sits at `offset + j − start` and is the
/// target of the position before it, so the prompt tokens `[start, min(end, loss_from))` are the targets of
/// positions `[offset − 1, offset + min(end, loss_from) − start − 1)` (clamped at 0: a piece's first token at position
/// 0 is an input only). Adjacent ranges are merged.
pub fn no_loss_ranges(pieces: &[Piece]) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for p in pieces {
        let lim = p.end.min(p.loss_from);
        if lim <= p.start {
            continue;
        }
        let a = p.offset.saturating_sub(1);
        let b = (p.offset + lim - p.start).saturating_sub(1);
        if b <= a {
            continue;
        }
        match out.last_mut() {
            Some(last) if last[1] >= a => last[1] = last[1].max(b),
            _ => out.push([a, b]),
        }
    }
    out
}

impl Packer {
    /// The training stream's packer: its sequences, padding, truncation and fill efficiency go into the process's
    /// `lexflow_packer_*` metrics (and its [`PackerReport`]).
    pub fn new(cfg: &PackerConfig, eot: u32, pad: u32) -> Self {
        Packer {
            cap: cfg.seq_len.get() + 1,
            mode: cfg.mode,
            lookahead: cfg.lookahead.get(),
            eot,
            pad,
            max_doc_tokens: cfg.max_doc_tokens.map(|n| n.get()),
            open: Vec::new(),
            born: 0,
            next_index: 0,
            ready: VecDeque::new(),
            current_resume: None,
            metered: true,
            report: PackerReport::default(),
        }
    }

    /// A packer that leaves the process's `lexflow_packer_*` metrics alone (the held-out evaluation set: packed once,
    /// never trained on, so it must not count in the training stream's sequences, padding or fill efficiency). Its
    /// own [`PackerReport`] is kept as usual.
    pub fn unmetered(cfg: &PackerConfig, eot: u32, pad: u32) -> Self {
        Packer {
            metered: false,
            ..Packer::new(cfg, eot, pad)
        }
    }

    /// The carry-over (open sequences as pieces) and the next global index.
    pub fn state(&self) -> (PackerState, u64) {
        let open = self
            .open
            .iter()
            .map(|o| OpenSequence {
                born: o.born,
                len: o.tokens.len() as u32,
                pieces: o.pieces.clone(),
            })
            .collect();
        (
            PackerState {
                born: self.born,
                open,
            },
            self.next_index,
        )
    }

    /// Continues from a checkpointed carry-over. `fetch(doc)` returns a document's tokens (re-read and re-tokenized:
    /// only the documents that were partly packed).
    /// Nothing is counted here (report or metrics): the open sequences were not emitted by the stopped run, and
    /// count once, when this packer closes them.
    pub fn restore<E>(
        &mut self,
        st: &PackerState,
        next_index: u64,
        mut fetch: impl FnMut(DocId) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        self.born = st.born;
        self.next_index = next_index;
        self.open.clear();
        let mut cache: std::collections::HashMap<DocId, Vec<u32>> = Default::default();
        for o in &st.open {
            let mut tokens = vec![self.eot; o.len as usize];
            for p in &o.pieces {
                if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(p.doc) {
                    let t = fetch(p.doc)?;
                    e.insert(t);
                }
                let doc = &cache[&p.doc];
                let (a, b) = (p.start as usize, (p.end as usize).min(doc.len()));
                let at = p.offset as usize;
                if a <= b && at + (b - a) <= tokens.len() {
                    tokens[at..at + (b - a)].copy_from_slice(&doc[a..b]);
                }
            }
            self.open.push(Open {
                tokens,
                pieces: o.pieces.clone(),
                born: o.born,
            });
        }
        Ok(())
    }

    /// Sets the resume point that sequences emitted from now on carry.
    pub fn set_resume(&mut self, rp: Option<Arc<ResumePoint>>) {
        self.current_resume = rp;
    }

    /// Adds one document; completed sequences become available from [`pop`](Self::pop).
    pub fn push(&mut self, doc: &TokenizedDoc) {
        let mut tokens: &[u32] = &doc.tokens;
        if let Some(max) = self.max_doc_tokens {
            if tokens.len() > max {
                self.report.truncated_documents += 1;
                self.report.truncated_tokens += (tokens.len() - max) as u64;
                if self.metered {
                    let m = lexflow_metrics::global();
                    m.packer_truncated_documents.inc();
                    m.packer_truncated_tokens
                        .inc_by((tokens.len() - max) as u64);
                }
                tokens = &tokens[..max];
            }
        }
        self.report.documents += 1;
        self.report.document_tokens += tokens.len() as u64;
        match self.mode {
            PackMode::Concat => self.push_concat(doc.id, tokens, doc.loss_from),
            PackMode::BestFit => self.push_best_fit(doc.id, tokens, doc.loss_from),
        }
    }

    fn push_concat(&mut self, id: DocId, tokens: &[u32], loss_from: u32) {
        if self.open.is_empty() {
            self.open_new();
        }
        let mut start = 0usize;
        let mut pieces_of_doc = 0;
        // `need_eot`: the EOT still has to be placed after the document's last token.
        let mut need_eot = true;
        while start < tokens.len() || need_eot {
            let room = self.cap - self.open[0].tokens.len();
            if room == 0 {
                self.close(0);
                self.open_new();
                continue;
            }
            let take = room.min(tokens.len() - start);
            if take > 0 {
                let s = &mut self.open[0];
                s.pieces.push(Piece {
                    doc: id,
                    start: start as u32,
                    end: (start + take) as u32,
                    offset: s.tokens.len() as u32,
                    loss_from,
                });
                s.tokens.extend_from_slice(&tokens[start..start + take]);
                start += take;
                pieces_of_doc += 1;
            }
            if start == tokens.len() && self.open[0].tokens.len() < self.cap {
                self.open[0].tokens.push(self.eot);
                self.report.eot_tokens += 1;
                need_eot = false;
            }
        }
        if pieces_of_doc > 1 {
            self.report.split_documents += 1;
        }
        if self.open[0].tokens.len() == self.cap {
            self.close(0);
        }
    }

    fn push_best_fit(&mut self, id: DocId, tokens: &[u32], loss_from: u32) {
        let cap = self.cap;
        let total = tokens.len() + 1; // + EOT
        let mut start = 0usize;
        // Cut full sequences off the front of documents longer than one sequence. The last piece keeps at least one
        // token of the document, so that its EOT follows it: when exactly `cap` tokens remain (they cannot fit with
        // the EOT), the cut takes `cap - 1` and that sequence ends with one pad.
        if total > cap {
            self.report.split_documents += 1;
            while tokens.len() + 1 - start > cap {
                let take = if tokens.len() - start == cap {
                    cap - 1
                } else {
                    cap
                };
                let mut s = self.new_open();
                s.pieces.push(Piece {
                    doc: id,
                    start: start as u32,
                    end: (start + take) as u32,
                    offset: 0,
                    loss_from,
                });
                s.tokens.extend_from_slice(&tokens[start..start + take]);
                start += take;
                self.finish(s);
            }
        }
        let need = tokens.len() - start + 1;
        // Best fit: the open sequence with the least room that still fits.
        let mut best: Option<(usize, usize)> = None;
        for (i, o) in self.open.iter().enumerate() {
            let room = cap - o.tokens.len();
            if room >= need && best.is_none_or(|(_, r)| room < r) {
                best = Some((i, room));
            }
        }
        let slot = match best {
            Some((i, _)) => i,
            None => {
                if self.open.len() >= self.lookahead {
                    // Close the fullest (least room; oldest on ties) to make space.
                    let (i, _) = self
                        .open
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, o)| (cap - o.tokens.len(), o.born))
                        .expect("lookahead >= 1");
                    self.close(i);
                }
                self.open_new();
                self.open.len() - 1
            }
        };
        let o = &mut self.open[slot];
        if start < tokens.len() {
            o.pieces.push(Piece {
                doc: id,
                start: start as u32,
                end: tokens.len() as u32,
                offset: o.tokens.len() as u32,
                loss_from,
            });
            o.tokens.extend_from_slice(&tokens[start..]);
        }
        o.tokens.push(self.eot);
        self.report.eot_tokens += 1;
        if o.tokens.len() == cap {
            self.close(slot);
        }
    }

    fn new_open(&mut self) -> Open {
        self.born += 1;
        Open {
            tokens: Vec::with_capacity(self.cap),
            pieces: Vec::new(),
            born: self.born,
        }
    }

    fn open_new(&mut self) {
        let o = self.new_open();
        self.open.push(o);
    }

    fn close(&mut self, i: usize) {
        let o = self.open.remove(i);
        self.finish(o);
    }

    fn finish(&mut self, mut o: Open) {
        let padding = self.cap - o.tokens.len();
        o.tokens.resize(self.cap, self.pad);
        let mut doc_starts: Vec<u32> = Vec::with_capacity(o.pieces.len() + 1);
        if o.pieces.first().is_none_or(|p| p.offset != 0) {
            doc_starts.push(0);
        }
        doc_starts.extend(o.pieces.iter().map(|p| p.offset));
        let no_loss = no_loss_ranges(&o.pieces);
        let seq = PackedSequence {
            index: self.next_index,
            tokens: o.tokens,
            doc_starts,
            pieces: o.pieces,
            padding: padding as u32,
            no_loss,
            shard: 0,
            resume: self.current_resume.clone(),
        };
        self.next_index += 1;
        self.report.sequences += 1;
        self.report.padding_tokens += padding as u64;
        let all = self.report.sequences * self.cap as u64;
        self.report.fill_efficiency = 1.0 - self.report.padding_tokens as f64 / all as f64;
        if self.metered {
            let m = lexflow_metrics::global();
            m.packer_sequences.inc();
            m.packer_padding_tokens.inc_by(padding as u64);
            m.packer_fill_efficiency.set(self.report.fill_efficiency);
        }
        self.ready.push_back(seq);
    }

    /// Closes every open sequence (in creation order), padding them.
    pub fn flush(&mut self) {
        let mut open = std::mem::take(&mut self.open);
        open.sort_by_key(|o| o.born);
        for o in open {
            if !o.tokens.is_empty() {
                self.finish(o);
            }
        }
    }

    pub fn pop(&mut self) -> Option<PackedSequence> {
        self.ready.pop_front()
    }
}

/// The packer actor body. Before each document it records the resume point (sampler positions and counters from the
/// document, its own carry-over and next index); every sequence emitted while packing that document carries it.
pub fn run_packer(
    ctx: &ActorContext,
    mut packer: Packer,
    input: EdgeReceiver<Vec<SampledDoc>>,
    out: EdgeSender<PackedSequence>,
    report: &std::sync::Mutex<PackerReport>,
    start_lanes: Vec<LanePosition>,
    start_sampler: SamplerState,
) -> Result<(), ActorError> {
    let publish = |p: &Packer| {
        if let Ok(mut g) = report.lock() {
            *g = p.report.clone();
        }
    };
    let lat = lexflow_metrics::latency("packer");
    let am = lexflow_metrics::actor("packer");
    // Positions and counters after the last document (for the resume point of the final flush).
    let mut lanes_after = start_lanes;
    let mut sampler_after = start_sampler;
    let mut published = std::time::Instant::now();
    for batch in input.iter() {
        am.items_in.inc_by(batch.len() as u64);
        for sd in &batch {
            // Latency and busy time of packing one document (the blocking sends below are backpressure, not work).
            let t = std::time::Instant::now();
            let doc = &sd.doc;
            ctx.set_input(format!("document {:?}", doc.id));
            let (pst, next_index) = packer.state();
            packer.set_resume(Some(Arc::new(ResumePoint {
                next_index,
                lanes: (*sd.lanes).clone(),
                sampler: (*sd.sampler).clone(),
                packer: pst,
            })));
            packer.push(doc);
            lanes_after = (*sd.lanes).clone();
            sampler_after = (*sd.sampler).clone();
            let lane = doc.id.lane as usize;
            if let Some(p) = lanes_after.get_mut(lane) {
                *p = LanePosition {
                    file: doc.id.file,
                    ordinal: doc.id.ordinal + 1,
                };
            }
            if lane < sampler_after.emitted_tokens.len() {
                sampler_after.emitted_tokens[lane] += doc.tokens.len() as u64;
                sampler_after.documents[lane] += 1;
            }
            lat.record(t.elapsed());
            am.busy_seconds.inc_by(t.elapsed().as_secs_f64());
            while let Some(seq) = packer.pop() {
                am.items_out.inc();
                am.bytes_out.inc_by(seq.tokens.len() as u64 * 4);
                if out.send(seq).is_err() {
                    publish(&packer);
                    return Ok(()); // downstream finished
                }
                // Every 16 sequences, and at least every 200 ms (the progress line reads it while a send blocks).
                if packer.report.sequences.is_multiple_of(16)
                    || published.elapsed() > std::time::Duration::from_millis(200)
                {
                    publish(&packer);
                    published = std::time::Instant::now();
                }
            }
        }
        publish(&packer);
    }
    let (pst, next_index) = packer.state();
    packer.set_resume(Some(Arc::new(ResumePoint {
        next_index,
        lanes: lanes_after,
        sampler: sampler_after,
        packer: pst,
    })));
    packer.flush();
    while let Some(seq) = packer.pop() {
        if out.send(seq).is_err() {
            break;
        }
    }
    publish(&packer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::num::NonZeroUsize;

    const EOT: u32 = 1_000_000;
    const PAD: u32 = 1_000_001;

    fn cfg(seq_len: usize, mode: PackMode, lookahead: usize) -> PackerConfig {
        PackerConfig {
            seq_len: NonZeroUsize::new(seq_len).unwrap(),
            mode,
            lookahead: NonZeroUsize::new(lookahead).unwrap(),
            ..Default::default()
        }
    }

    fn docs(lens: &[usize]) -> Vec<TokenizedDoc> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| TokenizedDoc {
                id: DocId {
                    lane: 0,
                    file: i as u32,
                    ordinal: 0,
                },
                celex: None,
                // Distinct token values per document so misplacements are visible.
                tokens: (0..n as u32).map(|t| i as u32 * 10_000 + t).collect(),
                text_bytes: n,
                loss_from: 0,
            })
            .collect()
    }

    fn pack(c: &PackerConfig, ds: &[TokenizedDoc]) -> (Vec<PackedSequence>, PackerReport) {
        let mut p = Packer::new(c, EOT, PAD);
        let mut out = Vec::new();
        for d in ds {
            p.push(d);
            while let Some(s) = p.pop() {
                out.push(s);
            }
        }
        p.flush();
        while let Some(s) = p.pop() {
            out.push(s);
        }
        (out, p.report.clone())
    }

    /// Checks the invariants; returns the number of split documents seen in the pieces.
    fn check(c: &PackerConfig, ds: &[TokenizedDoc], seqs: &[PackedSequence], rep: &PackerReport) {
        let cap = c.seq_len.get() + 1;
        let mut per_doc: std::collections::BTreeMap<DocId, Vec<(u32, u32)>> = Default::default();
        let mut pad = 0u64;
        let mut eots = 0u64;
        for (k, s) in seqs.iter().enumerate() {
            assert_eq!(s.index, k as u64, "indices are dense and ordered");
            assert_eq!(s.tokens.len(), cap);
            assert_eq!(s.doc_starts[0], 0);
            assert!(s.doc_starts.windows(2).all(|w| w[0] < w[1]));
            for p in &s.pieces {
                let doc = &ds[p.doc.file as usize];
                let got = &s.tokens[p.offset as usize..(p.offset + p.end - p.start) as usize];
                assert_eq!(
                    got,
                    &doc.tokens[p.start as usize..p.end as usize],
                    "piece content"
                );
                per_doc.entry(p.doc).or_default().push((p.start, p.end));
                if p.end as usize == doc.tokens.len() {
                    // The document's EOT follows its last token: in the same sequence, or (concat only, when the
                    // document fills the sequence) as the next sequence's first token.
                    let at = (p.offset + p.end - p.start) as usize;
                    let eot = if at < cap {
                        s.tokens[at]
                    } else {
                        assert_eq!(
                            c.mode,
                            PackMode::Concat,
                            "best-fit: EOT of {:?} not after it",
                            p.doc
                        );
                        seqs[k + 1].tokens[0]
                    };
                    assert_eq!(eot, EOT, "doc {:?}: its EOT does not follow it", p.doc);
                }
            }
            assert!(s.tokens[cap - s.padding as usize..]
                .iter()
                .all(|&t| t == PAD));
            pad += s.padding as u64;
            eots += s.tokens.iter().filter(|&&t| t == EOT).count() as u64;
        }
        for d in ds {
            let mut ranges = per_doc.remove(&d.id).unwrap_or_default();
            if d.tokens.is_empty() {
                assert!(ranges.is_empty());
                continue;
            }
            ranges.sort();
            // Exactly once, in order, contiguous.
            let mut at = 0u32;
            for (a, b) in &ranges {
                assert_eq!(*a, at, "doc {:?}: gap or overlap", d.id);
                at = *b;
            }
            assert_eq!(at as usize, d.tokens.len(), "doc {:?}: tokens lost", d.id);
        }
        assert_eq!(rep.padding_tokens, pad);
        assert_eq!(eots, ds.len() as u64, "one EOT per document");
        assert_eq!(
            rep.document_tokens + rep.eot_tokens + rep.padding_tokens,
            (seqs.len() * cap) as u64
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn concat_keeps_every_token_once_in_order(lens in proptest::collection::vec(0usize..300, 1..60), seq in 2usize..128) {
            let c = cfg(seq, PackMode::Concat, 1);
            let ds = docs(&lens);
            let (seqs, rep) = pack(&c, &ds);
            check(&c, &ds, &seqs, &rep);
            prop_assert!(seqs.iter().rev().skip(1).all(|s| s.padding == 0), "concat pads only the last sequence");
        }

        #[test]
        fn best_fit_keeps_every_token_once_in_order(lens in proptest::collection::vec(0usize..300, 1..60), seq in 2usize..128, look in 1usize..16) {
            let c = cfg(seq, PackMode::BestFit, look);
            let ds = docs(&lens);
            let (seqs, rep) = pack(&c, &ds);
            check(&c, &ds, &seqs, &rep);
        }
    }

    #[test]
    fn best_fit_keeps_the_eot_with_documents_of_a_multiple_of_the_sequence_length() {
        // cap = 10: documents of 10, 20, 30 tokens end exactly on a cut.
        let c = cfg(9, PackMode::BestFit, 4);
        let ds = docs(&[10, 3, 20, 5, 30, 1, 9, 10]);
        let (seqs, rep) = pack(&c, &ds);
        check(&c, &ds, &seqs, &rep);
        // Every document longer than 9 tokens is split (its EOT cannot share its only sequence), the others not.
        assert_eq!(rep.split_documents, 4);
    }

    #[test]
    fn best_fit_splits_fewer_documents_than_concat() {
        let mut rng = 12345u64;
        let lens: Vec<usize> = (0..2000)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng >> 33) % 700) as usize + 1
            })
            .collect();
        let ds = docs(&lens);
        let (_, concat) = pack(&cfg(1024, PackMode::Concat, 1), &ds);
        let (_, bf) = pack(&cfg(1024, PackMode::BestFit, 32), &ds);
        assert!(
            bf.split_documents * 4 < concat.split_documents,
            "best-fit {} vs concat {}",
            bf.split_documents,
            concat.split_documents
        );
        assert!(
            bf.fill_efficiency > 0.97,
            "best-fit wastes too much: {}",
            bf.fill_efficiency
        );
    }

    /// Stopping anywhere, restoring the carry-over from `state()` and continuing gives the same sequences.
    #[test]
    fn restore_from_state_continues_identically() {
        for mode in [PackMode::Concat, PackMode::BestFit] {
            let c = cfg(64, mode, 6);
            let lens: Vec<usize> = (0..80).map(|i| (i * 37) % 150 + 1).collect();
            let mut ds = docs(&lens);
            // Every third document is instruction data: its prompt masks must survive the restore.
            for (i, d) in ds.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
                d.loss_from = (d.tokens.len() as u32 / 2).max(1) + (i as u32 % 5);
            }
            let (want, _) = pack(&c, &ds);
            assert!(want.iter().any(|s| !s.no_loss.is_empty()));
            for cut in [1usize, 7, 33, 79] {
                let mut p = Packer::new(&c, EOT, PAD);
                let mut got = Vec::new();
                for d in &ds[..cut] {
                    p.push(d);
                    while let Some(s) = p.pop() {
                        got.push(s);
                    }
                }
                let (st, next) = p.state();
                let mut q = Packer::new(&c, EOT, PAD);
                q.restore(&st, next, |id| {
                    Ok::<_, ()>(ds[id.file as usize].tokens.clone())
                })
                .unwrap();
                for d in &ds[cut..] {
                    q.push(d);
                    while let Some(s) = q.pop() {
                        got.push(s);
                    }
                }
                q.flush();
                while let Some(s) = q.pop() {
                    got.push(s);
                }
                assert_eq!(got.len(), want.len(), "{mode:?} cut {cut}");
                for (a, b) in got.iter().zip(&want) {
                    assert_eq!(
                        (a.index, &a.tokens, &a.pieces, a.padding, &a.no_loss),
                        (b.index, &b.tokens, &b.pieces, b.padding, &b.no_loss),
                        "{mode:?} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn truncation_is_counted() {
        let mut c = cfg(16, PackMode::Concat, 1);
        c.max_doc_tokens = NonZeroUsize::new(10);
        let ds = docs(&[25, 5]);
        let (seqs, rep) = pack(&c, &ds);
        assert_eq!(rep.truncated_documents, 1);
        assert_eq!(rep.truncated_tokens, 15);
        let total: u32 = seqs
            .iter()
            .flat_map(|s| &s.pieces)
            .map(|p| p.end - p.start)
            .sum();
        assert_eq!(total, 15);
    }

    /// Instruction data: the targets that are prompt tokens (here: ids 500_000.. mark prompt tokens) are exactly the
    /// ignored labels of the batches built from the packed sequences, in both modes, with documents split across
    /// sequences, and nothing else is ignored but padding.
    #[test]
    fn prompt_tokens_are_never_targets() {
        let lens = [7usize, 30, 3, 12, 19, 5, 26, 9, 4];
        let ds: Vec<TokenizedDoc> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let prompt = (i * 3 + 1) % (n + 1); // 0 (no prompt) .. n (all prompt)
                TokenizedDoc {
                    id: DocId {
                        lane: 0,
                        file: i as u32,
                        ordinal: 0,
                    },
                    celex: None,
                    tokens: (0..n as u32)
                        .map(|t| {
                            if (t as usize) < prompt {
                                500_000 + t
                            } else {
                                1000 * i as u32 + t
                            }
                        })
                        .collect(),
                    text_bytes: n,
                    loss_from: prompt as u32,
                }
            })
            .collect();
        let mut masked = 0;
        for mode in [PackMode::Concat, PackMode::BestFit] {
            let c = cfg(16, mode, 3);
            let (seqs, rep) = pack(&c, &ds);
            check(&c, &ds, &seqs, &rep);
            for s in &seqs {
                let row = lexflow_gpu::SequenceRef {
                    tokens: &s.tokens,
                    padding: s.padding,
                    doc_starts: &s.doc_starts,
                    no_loss: &s.no_loss,
                };
                let b = lexflow_gpu::Batch::new(&[row], lexflow_gpu::tch::Device::Cpu).unwrap();
                let labels = Vec::<i64>::try_from(b.labels.view([-1])).unwrap();
                let t = s.tokens.len() - 1;
                for (p, &label) in labels.iter().enumerate().take(t) {
                    let target = s.tokens[p + 1];
                    let prompt = (500_000..600_000).contains(&target);
                    let want_ignored = p >= t - s.padding as usize || prompt;
                    assert_eq!(
                        label == lexflow_gpu::IGNORE_INDEX,
                        want_ignored,
                        "{mode:?} seq {} pos {p}: target {target}, no_loss {:?}",
                        s.index,
                        s.no_loss
                    );
                    masked += prompt as usize;
                }
                assert_eq!(
                    lexflow_gpu::valid_targets(&row) as usize,
                    labels
                        .iter()
                        .filter(|&&l| l != lexflow_gpu::IGNORE_INDEX)
                        .count()
                );
            }
        }
        assert!(masked > 20, "the test must mask something ({masked})");
    }
}
