//! The messages that travel on lexflow's edges. Every message is a batch (many documents, or one packed sequence of
//! thousands of tokens); single tokens never travel alone.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Kind of legal document, from the root element and CELEX (sector 3: R/L/D; sector 6: CJ/TJ/CO/TO/CC; `R(nn)` =
/// corrigendum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DocType {
    Regulation,
    Directive,
    Decision,
    Corrigendum,
    Judgment,
    Order,
    /// Advocate General's opinion (`CONCLUSION`, CELEX `6xxxxCC`).
    Opinion,
    Annex,
    Consolidated,
    /// Manifests (`DOC`, `PUBLICATION`): metadata only, never training text.
    Manifest,
    #[default]
    Other,
}

impl DocType {
    pub fn as_str(&self) -> &'static str {
        match self {
            DocType::Regulation => "regulation",
            DocType::Directive => "directive",
            DocType::Decision => "decision",
            DocType::Corrigendum => "corrigendum",
            DocType::Judgment => "judgment",
            DocType::Order => "order",
            DocType::Opinion => "opinion",
            DocType::Annex => "annex",
            DocType::Consolidated => "consolidated",
            DocType::Manifest => "manifest",
            DocType::Other => "other",
        }
    }
}

/// One article of an act (not those quoted inside amending text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Article {
    /// `IDENTIFIER` attribute, e.g. `"001"`, `"008A"`.
    pub id: String,
    /// `TI.ART`, e.g. "Article 1", without footnotes, whitespace collapsed.
    pub title: String,
    /// `STI.ART` when present, e.g. "Subject-matter and objectives", without footnotes, whitespace collapsed.
    pub subtitle: Option<String>,
    /// `TI.ART` exactly as it stands in the document's text (footnotes in brackets, no-break spaces): where
    /// provenance finds the heading.
    #[serde(default)]
    pub title_in_text: String,
    /// Paragraph texts (`PARAG`, or the article's `ALINEA`s).
    pub paragraphs: Vec<String>,
}

/// One parsed FORMEX document: metadata plus its full readable text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Document {
    /// Source path; members of archives are `archive.zip!member.xml`.
    pub path: String,
    /// Root element name (`ACT`, `ANNEX`, `CONS.ACT`, …).
    pub root: String,
    pub celex: Option<String>,
    /// ISO 639-1, lower case (`en`).
    pub lang: Option<String>,
    pub doc_type: DocType,
    /// Main date (`DATE ISO` of the document reference) as `YYYY-MM-DD`.
    pub date: Option<String>,
    pub title: Option<String>,
    pub articles: Vec<Article>,
    /// Subject keywords where the document has them (case law's `INDEX/KEYWORD`), whitespace collapsed: what the
    /// quality filter's subject terms are matched against besides the title and the headings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// Full text with readable whitespace (training text).
    pub text: String,
    /// Instruction data: byte offset in `text` where the answer starts. The text before it (the prompt) is context
    /// only: its tokens are never training targets. None: every token is trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_start: Option<usize>,
}

/// Where a document sits in the deterministic input order: lane (language), file index within the lane's sorted file
/// list, and ordinal of the document within that file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct DocId {
    pub lane: u16,
    pub file: u32,
    pub ordinal: u32,
}

/// Reader → tokenizer message: the documents of one input file (in order).
#[derive(Debug, Clone)]
pub struct DocBatch {
    pub lane: u16,
    pub file: u32,
    pub docs: Vec<Document>,
    /// Dedup keys per document, computed by the reader workers when `[dedup]` is on (else empty).
    pub signatures: Vec<Option<Signature>>,
}

/// The dedup keys of one document (computed by the reader workers, decided on by `stages::dedup`): the exact hash, and one hash per LSH band (empty for exact mode and Q&A pairs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub exact: u128,
    pub bands: Vec<u128>,
    /// The MinHash values (near mode, ordinary documents): a band match is a duplicate only if the share of equal
    /// values (the estimated Jaccard similarity) reaches `dedup.threshold`.
    pub minhash: Option<Box<[u32]>>,
}

/// A tokenized document with what provenance needs.
#[derive(Debug, Clone)]
pub struct TokenizedDoc {
    pub id: DocId,
    pub celex: Option<Arc<str>>,
    pub tokens: Vec<u32>,
    /// UTF-8 bytes of the text that was encoded.
    pub text_bytes: usize,
    /// Tokens `[0, loss_from)` are prompt: never training targets (0 for ordinary documents).
    pub loss_from: u32,
}

/// Tokenizer → sampler message.
#[derive(Debug, Clone)]
pub struct TokenizedBatch {
    pub lane: u16,
    pub file: u32,
    pub docs: Vec<TokenizedDoc>,
}

/// A contiguous piece of one document inside a packed sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub doc: DocId,
    /// Token range `[start, end)` within the document's tokens.
    pub start: u32,
    pub end: u32,
    /// Position of the piece's first token within the sequence.
    pub offset: u32,
    /// The document's [`TokenizedDoc::loss_from`] (prompt tokens, never targets).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub loss_from: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A fixed-length training sequence: `seq_len + 1` tokens (inputs are `[..seq_len]`, labels `[1..]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedSequence {
    /// Global index in the packer's output stream (assigned to ranks after the fact).
    pub index: u64,
    pub tokens: Vec<u32>,
    /// Positions where a new document starts (for document-masked attention); always starts with 0.
    pub doc_starts: Vec<u32>,
    pub pieces: Vec<Piece>,
    /// Padding tokens at the end (their labels are ignored by the loss).
    pub padding: u32,
    /// Input positions `[a, b)` whose target is a prompt token of instruction data (ignored by the loss, like
    /// padding). Empty for ordinary documents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_loss: Vec<[u32; 2]>,
    /// Logical shard (0..shards) the sequence was routed to.
    pub shard: u32,
    /// Where the dataflow stood right before the document whose packing emitted this sequence: resuming from it and
    /// skipping the sequences already consumed regenerates the rest of the stream exactly. Not stored in Arrow files.
    #[serde(skip)]
    pub resume: Option<Arc<ResumePoint>>,
}

impl PackedSequence {
    pub fn seq_len(&self) -> usize {
        self.tokens.len().saturating_sub(1)
    }
}

/// A consistent snapshot of the preprocessing dataflow (readers, sampler, packer), small enough to store with every
/// checkpoint: resuming from it re-reads only the files of the next documents and of the documents that are partly
/// packed, never the corpus from the start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResumePoint {
    /// Global index the packer gives its next sequence.
    pub next_index: u64,
    /// Per lane: the next document the sampler will take.
    pub lanes: Vec<LanePosition>,
    pub sampler: SamplerState,
    pub packer: PackerState,
}

/// Position in a lane: file index in the lane's sorted file list (counting on across cycles: `epoch * files + i`) and
/// the ordinal of the document inside that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LanePosition {
    pub file: u32,
    pub ordinal: u32,
}

/// The language sampler's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SamplerState {
    pub emitted_tokens: Vec<u64>,
    pub documents: Vec<u64>,
    pub active: Vec<bool>,
}

/// The packer's carry-over: sequences still open, as document pieces (their tokens are re-read on resume); positions
/// not covered by a piece are end-of-text tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PackerState {
    pub born: u64,
    pub open: Vec<OpenSequence>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OpenSequence {
    pub born: u64,
    pub len: u32,
    pub pieces: Vec<Piece>,
}

/// A document as the sampler emits it, with the dataflow position right before it.
#[derive(Debug, Clone)]
pub struct SampledDoc {
    pub doc: TokenizedDoc,
    pub lanes: Arc<Vec<LanePosition>>,
    pub sampler: Arc<SamplerState>,
}
