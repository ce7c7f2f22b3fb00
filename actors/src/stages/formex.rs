//! Streaming FORMEX 4 parser (quick-xml events over the whole buffer, no DOM).
//!
//! [`parse_bytes`] turns one file's bytes into zero or more [`Document`]s:
//! * one per document root (`ACT`, `ANNEX`, `CONS.ACT`, `CORR`, `JUDGMENT`, `ORDER`, `CONCLUSION`, …);
//! * repo-made wrappers (`COMBINED.FMX`, `LEXP.COMBINED`, any unknown root whose children are document roots) yield
//!   one document per contained root; an unknown root without such children yields one generic document;
//! * manifests (`DOC`, `PUBLICATION`) yield a [`DocType::Manifest`] document with empty text, whose metadata the
//!   reader attaches to the body/annex files of the same package (see [`crate::stages::reader::read_files_with_manifests`]).
//!
//! Text rendering: block elements are separated by newlines, inline elements (`HT`, `DATE`, `REF.DOC.OJ`, …) keep the
//! spacing of the source, whitespace runs collapse to one space, `QUOT.START`/`QUOT.END` render their `CODE`
//! character, footnotes (`NOTE`) render inline in brackets, table rows render as `cell | cell` lines, images are
//! skipped but not their caption and text content (`INCL.ELEMENT` › `CAPTION`, `IMG.CNT`), and the metadata blocks
//! (`BIB.INSTANCE`, `FAM.COMP`, `INFO.*`, `BIB.JUDGMENT`, …) are not training text. No other text is dropped
//! (`tests/text_coverage.rs` checks every word of the real corpus).
//!
//! [`Document::articles`] are the act's own articles: `ARTICLE`s in its `ENACTING.TERMS`, not inside `QUOT.S`
//! (articles quoted by amending text) nor inside an annex (`ANNEX`/`CONS.ANNEX`: Annex I of a consolidated
//! regulation can have an "Article 1" of its own). Their text stays in the document's text.
//!
//! Safety: input must be UTF-8 (a UTF-16 BOM, NUL bytes, invalid UTF-8 or a declared non-UTF-8 encoding on non-ASCII
//! content are errors), a DOCTYPE declaring entities is rejected (no entity is ever expanded or resolved), unknown
//! entity references are errors, nesting is bounded, and no input panics (fuzzed, see `docs/FUZZING.md`).

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::types::{Article, DocType, Document};

/// Maximum element nesting accepted (real files reach 29).
pub const MAX_DEPTH: usize = 1024;

/// A parse failure with its position in the (decompressed) input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column} (byte {byte_offset}): {reason}")]
pub struct FormexError {
    /// 1-based line.
    pub line: u64,
    /// 1-based column, in bytes.
    pub column: u64,
    /// 0-based byte offset in the decompressed input.
    pub byte_offset: u64,
    pub reason: String,
    /// What to do about it.
    pub hint: &'static str,
}

impl FormexError {
    pub fn at(bytes: &[u8], offset: u64, reason: impl Into<String>, hint: &'static str) -> Self {
        let off = (offset as usize).min(bytes.len());
        let before = &bytes[..off];
        let line = before.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        FormexError {
            line,
            column: (off - line_start) as u64 + 1,
            byte_offset: off as u64,
            reason: reason.into(),
            hint,
        }
    }
}

const HINT_MALFORMED: &str =
    "the file is not well-formed XML (damaged or truncated?): re-download or re-extract it";
const HINT_TRUNCATED: &str = "the file ends early (truncated download or copy): re-download it";
const HINT_ENCODING: &str =
    "FORMEX is UTF-8: re-encode the file (e.g. `iconv -f LATIN1 -t UTF-8`) or drop it";
const HINT_UTF16: &str = "FORMEX is UTF-8: convert it (`iconv -f UTF-16 -t UTF-8`) or drop it";
const HINT_BINARY: &str = "this is not a text/XML file: remove it from the inputs";
const HINT_NOT_FORMEX: &str =
    "only FORMEX 4 XML is accepted (roots like ACT, ANNEX, CONS.ACT, CORR, JUDGMENT, DOC): remove it from the inputs";
const HINT_DTD: &str = "FORMEX files have no DTD: entity declarations are refused (never expanded); remove the DOCTYPE";

/// Where the CELEX number of a document came from (stronger sources win when manifest metadata is attached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum CelexSource {
    #[default]
    None,
    /// Derived from `NO.DOC` + the title's act kind (weakest).
    Heuristic,
    /// Derived from a manifest (`NO.DOC` + `LEGAL.VALUE`).
    Manifest,
    /// Parsed from the file name.
    FileName,
    /// `NO.CELEX` / `CONSLEG.REF` in the document itself.
    Explicit,
}

/// Package metadata that is not part of [`Document`] but links files of one publication.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DocMeta {
    /// `BIB.INSTANCE/DOCUMENT.REF/@FILE`: the manifest this body/annex belongs to.
    pub manifest_ref: Option<String>,
    /// Manifests: `REF.PHYS/@FILE` of the body and annexes, in order.
    pub parts: Vec<String>,
    /// `LEGAL.VALUE` (manifest) or `INFO.CONSLEG/@LEG.VAL` (consolidated texts), e.g. `REG`.
    pub legal_value: Option<String>,
    pub celex_source: CelexSource,
}

/// A document plus its package metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub doc: Document,
    pub meta: DocMeta,
}

/// Parse one FORMEX file (already decompressed). `path` is recorded in each document and used for file-name
/// fallbacks (language, CELEX).
pub fn parse_bytes(path: &str, bytes: &[u8]) -> Result<Vec<Document>, FormexError> {
    Ok(parse_detailed(path, bytes)?
        .into_iter()
        .map(|p| p.doc)
        .collect())
}

/// Like [`parse_bytes`], with the package metadata used to attach manifests.
pub fn parse_detailed(path: &str, bytes: &[u8]) -> Result<Vec<Parsed>, FormexError> {
    let text = check_bytes(bytes)?;
    let base = bytes.len() - text.len(); // UTF-8 BOM
    let mut p = Parser::new(path, text);
    p.run().map_err(|mut e| {
        if base > 0 {
            e = FormexError::at(bytes, e.byte_offset + base as u64, e.reason, e.hint);
        }
        e
    })?;
    Ok(p.out)
}

/// Encoding and binary checks; returns the text without a UTF-8 BOM.
fn check_bytes(bytes: &[u8]) -> Result<&str, FormexError> {
    if bytes.is_empty() || bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(FormexError::at(bytes, 0, "empty file", HINT_TRUNCATED));
    }
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(FormexError::at(
            bytes,
            0,
            "UTF-16 encoded file (byte order mark)",
            HINT_UTF16,
        ));
    }
    if bytes.len() >= 2
        && ((bytes[0] == b'<' && bytes[1] == 0) || (bytes[0] == 0 && bytes[1] == b'<'))
    {
        return Err(FormexError::at(
            bytes,
            0,
            "UTF-16 encoded file (no byte order mark)",
            HINT_UTF16,
        ));
    }
    let body = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
    if let Some(p) = body.iter().position(|&b| b == 0) {
        let off = (p + bytes.len() - body.len()) as u64;
        return Err(FormexError::at(
            bytes,
            off,
            "binary data (NUL byte)",
            HINT_BINARY,
        ));
    }
    match std::str::from_utf8(body) {
        Ok(s) => Ok(s),
        Err(e) => {
            let p = e.valid_up_to();
            let off = (p + bytes.len() - body.len()) as u64;
            let b = body[p];
            let control = body
                .iter()
                .take(4096)
                .filter(|&&c| c < 0x09 || (0x0E..0x20).contains(&c))
                .count();
            if control > 8 {
                Err(FormexError::at(
                    bytes,
                    off,
                    "binary data (not UTF-8 text)",
                    HINT_BINARY,
                ))
            } else {
                Err(FormexError::at(
                    bytes,
                    off,
                    format!(
                        "invalid UTF-8 (byte 0x{b:02X}); the file is probably Latin-1/Windows-1252"
                    ),
                    HINT_ENCODING,
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Element classification

/// Elements with a role beyond rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum K {
    Other,
    BibInstance,
    BibDoc,
    BibOj,
    DocMainPub,
    NoDoc,
    Date,
    LgDoc,
    LgOj,
    NoCelex,
    Year,
    NoCurrent,
    LegalValue,
    Title,
    /// `ENACTING.TERMS` (`.CJT` too): where an act's own articles are.
    EnactingTerms,
    /// `ANNEX`/`CONS.ANNEX` inside a document: its articles (if any) are not the act's.
    Annex,
    Article,
    TiArt,
    StiArt,
    /// `KEYWORD` of case law's `INDEX`: a subject keyword ([`Document::keywords`]).
    Keyword,
    QuotS,
    QuotMark,
    Note,
    Row,
    Cell,
    DocumentRef,
    RefPhys,
    InfoConsleg,
    Glue,
    Br,
    /// `OP.CMP` / `OP.MATH` (empty, operator in `TYPE`).
    MathOp,
    /// `DIVISOR` (rendered after a `/`).
    Divisor,
    /// `SUM` (rendered as `Σ`).
    Sum,
}

/// How an element renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disp {
    /// Newline before and after.
    Block,
    /// Nothing: spacing comes from the text.
    Inline,
    /// At least a space before and after (unknown elements).
    Soft,
    /// Not training text (metadata).
    Hidden,
}

fn classify(name: &[u8]) -> (K, Disp) {
    use Disp::*;
    match name {
        b"BIB.INSTANCE" => (K::BibInstance, Hidden),
        b"BIB.DOC" => (K::BibDoc, Hidden),
        b"BIB.OJ" => (K::BibOj, Hidden),
        b"DOC.MAIN.PUB" => (K::DocMainPub, Hidden),
        b"NO.DOC" => (K::NoDoc, Hidden),
        b"DATE" => (K::Date, Inline),
        b"LG.DOC" => (K::LgDoc, Hidden),
        b"LG.OJ" => (K::LgOj, Hidden),
        b"NO.CELEX" => (K::NoCelex, Hidden),
        b"YEAR" => (K::Year, Hidden),
        b"NO.CURRENT" => (K::NoCurrent, Hidden),
        b"LEGAL.VALUE" => (K::LegalValue, Hidden),
        b"TITLE" => (K::Title, Block),
        b"ENACTING.TERMS" | b"ENACTING.TERMS.CJT" => (K::EnactingTerms, Block),
        b"ANNEX" | b"CONS.ANNEX" => (K::Annex, Block),
        b"ARTICLE" => (K::Article, Block),
        b"TI.ART" => (K::TiArt, Block),
        b"STI.ART" => (K::StiArt, Block),
        b"KEYWORD" => (K::Keyword, Block),
        b"QUOT.S" => (K::QuotS, Block),
        b"QUOT.START" | b"QUOT.END" => (K::QuotMark, Inline),
        b"NOTE" => (K::Note, Inline),
        b"ROW" => (K::Row, Block),
        b"CELL" => (K::Cell, Inline),
        b"DOCUMENT.REF" => (K::DocumentRef, Hidden),
        b"REF.PHYS" => (K::RefPhys, Hidden),
        b"INFO.CONSLEG" => (K::InfoConsleg, Hidden),
        b"NO.P" | b"NO.PARAG" | b"PREFIX" | b"TERM" | b"NO.GR.SEQ" | b"NO.ITEM" => {
            (K::Glue, Inline)
        }
        b"BR" => (K::Br, Inline),
        b"OP.CMP" | b"OP.MATH" => (K::MathOp, Inline),
        b"DIVISOR" => (K::Divisor, Inline),
        b"SUM" => (K::Sum, Inline),
        // metadata, running heads, the list of image files
        b"BIB.INSTANCE.CONS" | b"FAM.COMP" | b"INFO.PROD" | b"BIB.JUDGMENT" | b"BIB.ORDER"
        | b"BIB.CONCLUSION" | b"BIB.OPINION" | b"BIB.RULING" | b"BIB.DECISION.ECR"
        | b"BIB.CASE" | b"BIB.ECR" | b"BIB.DATA" | b"BIB.VOLUME" | b"BIB.SE" | b"CURR.TITLE"
        | b"PAGE.HEADER" | b"INCLUSIONS" | b"GR.MOD.ACT" | b"GR.CORRIG" | b"PUBLICATION.REF"
        | b"PAPER" | b"PDF" | b"FMX" | b"DOC.SUB.PUB" | b"REF.ORIGINAL" | b"INFO.MOD"
        | b"INFO.ERROR" | b"INFO.FILTER" | b"JOB.CONSLEG" => (K::Other, Hidden),
        // An image (the file itself is not read), inline or between blocks: a word boundary. Its `CAPTION` ("Figure 1
        // …") and `IMG.CNT` (the text of a form or diagram reproduced as an image) are text of the act.
        b"INCL.ELEMENT" => (K::Other, Soft),
        b"IMG.CNT" => (K::Other, Block),
        // inline markup (t_btx content and formulas)
        b"HT" | b"FT" | b"IE" | b"LINK" | b"REF.DOC" | b"REF.DOC.OJ" | b"REF.DOC.ECR"
        | b"REF.DOC.SE" | b"REF.NP.ECR" | b"NO.CASE" | b"NO.ECLI" | b"NAME.CASE" | b"TXT"
        | b"DEFINITION" | b"FORMULA" | b"EXPR" | b"IND" | b"EXPONENT" | b"FRACTION"
        | b"DIVIDEND" | b"OVER" | b"UNDER" | b"OVERLINE" | b"ROOT" | b"DEGREE" | b"FMT.VALUE"
        | b"VECTOR" | b"FUNCTION" | b"ANONYMOUS" | b"ADDR" | b"REF.NOTE" | b"MARGIN"
        | b"QUALIF" | b"ITEM.REF" => (K::Other, Inline),
        // A language version (a name in one language, next to its other versions): a word boundary, as two
        // versions can be adjacent (CL1992L0013: `<LV LG="FI">… teollisuusministeriö</LV><LV LG="SV">Handels- …`).
        b"LV" => (K::Other, Soft),
        // block structure
        b"TI"
        | b"STI"
        | b"P"
        | b"PREAMBLE"
        | b"PREAMBLE.INIT"
        | b"PREAMBLE.FINAL"
        | b"PREAMBLE.GEN"
        | b"GR.VISA"
        | b"GR.VISA.INIT"
        | b"VISA"
        | b"GR.CONSID"
        | b"GR.CONSID.INIT"
        | b"CONSID"
        | b"DIV.CONSID"
        | b"NP"
        | b"DIVISION"
        | b"PARAG"
        | b"ALINEA"
        | b"LIST"
        | b"ITEM"
        | b"DLIST"
        | b"DLIST.ITEM"
        | b"FINAL"
        | b"SIGNATURE"
        | b"PL.DATE"
        | b"SIGNATORY"
        | b"CONTENTS"
        | b"GR.SEQ"
        | b"TBL"
        | b"CORPUS"
        | b"GR.TBL"
        | b"GR.NOTES"
        | b"CORRECTION"
        | b"DESCRIPTION"
        | b"OLD.CORR"
        | b"NEW.CORR"
        | b"CONTENTS.CORR"
        | b"JUDGMENT.INIT"
        | b"PARTIES"
        | b"PLAINTIFS"
        | b"AGAINST"
        | b"DEFENDANTS"
        | b"PARTY.STATUS"
        | b"INTERVENERS"
        | b"INTERMEDIATE"
        | b"INDEX"
        | b"CONTENTS.JUDGMENT"
        | b"CONTENTS.ORDER"
        | b"CONTENTS.CONCLUSION"
        | b"CONTENTS.OPINION"
        | b"NP.ECR"
        | b"JURISDICTION"
        | b"INTRO"
        | b"SIGNATURE.CASE"
        | b"ORDER.INIT"
        | b"OPINION.INIT"
        | b"CONS.DOC"
        | b"CONS.OTH.DOC"
        | b"ACT.GEN"
        | b"ADDR.S"
        | b"ANNOTATION"
        | b"GR.ANNOTATION"
        | b"BLK"
        | b"TI.BLK"
        | b"STI.BLK"
        | b"TOC"
        | b"TI.CJT"
        | b"GR.AMEND"
        | b"AMEND"
        | b"LIST.AMEND"
        | b"FULL.POWER"
        | b"FULL.POWER.INIT"
        | b"FULL.POWER.FINAL"
        | b"PLENIPOTENTIARY"
        | b"LETTER"
        | b"COMMENT"
        | b"PRESENCE"
        | b"PRESENCE.INIT"
        | b"ARGUMENTS"
        | b"SUMMARY"
        | b"SUBDIV"
        | b"HEADER.LIST.AMEND"
        | b"SECTION"
        | b"SUBSECTION"
        | b"OJ"
        | b"VOLUME"
        | b"ITEM.PUB"
        | b"DECISION"
        | b"DECISION.ECR.INIT"
        | b"CONTENTS.DECISION.ECR"
        | b"CONTENTS.RULING"
        | b"COMPETITION.INIT"
        | b"TXT.COL"
        | b"TXT.ROW"
        | b"CAPTION"
        | b"INTRO.OPINION"
        | b"CONS.LIST"
        | b"GR.CORRECTION"
        | b"CORR.ACTION" => (K::Other, Block),
        _ => (K::Other, Soft),
    }
}

/// Document roots (a wrapper's children with these names become documents of their own).
fn is_doc_root(name: &[u8]) -> bool {
    matches!(
        name,
        b"ACT"
            | b"ANNEX"
            | b"CONS.ACT"
            | b"CONS.ANNEX"
            | b"CONS.OTH"
            | b"CORR"
            | b"DOC"
            | b"PUBLICATION"
            | b"JUDGMENT"
            | b"ORDER"
            | b"CONCLUSION"
            | b"OPINION"
            | b"GENERAL"
            | b"CJT"
            | b"AGR"
            | b"COMPETITION"
            | b"DECISION.ECR"
            | b"NOTICE"
            | b"SUMMARY.JUDGMENT"
            | b"RULING"
            | b"REPORT.HEARING"
            | b"LSEU"
    )
}

/// FORMEX element names are upper case ASCII with dots; `<html>`, `<svg>`, namespaced roots are not FORMEX.
fn is_formex_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name[0].is_ascii_uppercase()
        && name.iter().all(|&b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        })
}

// ---------------------------------------------------------------------------------------------------------------------
// Parser state

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Sep {
    None,
    Space,
    Line,
}

struct Frame {
    k: K,
    d: Disp,
    /// Byte range of the name in the input (for error messages).
    name: (u32, u16),
    /// This element opened a document.
    opens_doc: bool,
}

struct ArtState {
    /// Stack depth of the ARTICLE frame.
    depth: usize,
    art: Article,
    /// Direct child being captured: kind and start offset in the text.
    child: Option<(K, usize)>,
    /// Footnotes inside that child: their byte ranges in the text (brackets included), and the start of the one
    /// being read.
    notes: Vec<(usize, usize)>,
    note_start: Option<usize>,
}

#[derive(Default)]
struct TitleCap {
    depth: usize,
    buf: String,
    space: bool,
    notes: u32,
}

struct DocState {
    doc: Document,
    meta: DocMeta,
    manifest: bool,
    pending: Sep,
    /// Set after NO.P/NO.PARAG/…: the next block boundary becomes a space ("1. Text", "(a) text").
    glue: bool,
    hidden: u32,
    notes: u32,
    cells: u32,
    quot: u32,
    /// Open `ENACTING.TERMS` elements, and open annexes (the root of an annex document counts as one).
    enacting: u32,
    annex: u32,
    cell_index: u32,
    art: Option<ArtState>,
    title: Option<TitleCap>,
    title_done: bool,
    leaf: Option<(K, usize)>,
    leaf_buf: String,
    /// Parent kind of the NO.DOC being read (BIB.INSTANCE/BIB.DOC only).
    in_no_doc: Option<usize>,
    no_doc_done: bool,
    lg_doc: Option<String>,
    lg_oj: Option<String>,
    no_celex: Option<String>,
    consleg_ref: Option<String>,
    year: Option<String>,
    number: Option<String>,
    date_main: Option<String>,
    date_any: Option<String>,
}

impl DocState {
    fn new(path: &str, root: &str, cap: usize) -> Self {
        let manifest = matches!(root, "DOC" | "PUBLICATION");
        DocState {
            doc: Document {
                path: path.to_string(),
                root: root.to_string(),
                text: String::with_capacity(if manifest { 0 } else { cap }),
                ..Default::default()
            },
            meta: DocMeta::default(),
            manifest,
            pending: Sep::None,
            glue: false,
            hidden: if manifest { 1 } else { 0 },
            notes: 0,
            cells: 0,
            quot: 0,
            enacting: 0,
            annex: u32::from(matches!(root, "ANNEX" | "CONS.ANNEX")),
            cell_index: 0,
            art: None,
            title: None,
            title_done: false,
            leaf: None,
            leaf_buf: String::new(),
            in_no_doc: None,
            no_doc_done: false,
            lg_doc: None,
            lg_oj: None,
            no_celex: None,
            consleg_ref: None,
            year: None,
            number: None,
            date_main: None,
            date_any: None,
        }
    }

    #[inline]
    fn want(&mut self, mut sep: Sep) {
        if sep == Sep::Line && (self.notes > 0 || self.cells > 0 || self.glue) {
            sep = Sep::Space;
        }
        if sep > self.pending {
            self.pending = sep;
        }
    }

    #[inline]
    fn flush(&mut self) {
        let t = &mut self.doc.text;
        match self.pending {
            Sep::None => {}
            Sep::Space => {
                if !t.is_empty() && !t.ends_with([' ', '\n', '[']) {
                    t.push(' ');
                }
            }
            Sep::Line => {
                while t.ends_with(' ') {
                    t.pop();
                }
                if !t.is_empty() && !t.ends_with('\n') {
                    t.push('\n');
                }
            }
        }
        self.pending = Sep::None;
        self.glue = false;
    }

    /// Render text content (whitespace runs collapse to one space).
    fn text(&mut self, s: &str) {
        if let Some((_, _)) = self.leaf {
            self.leaf_buf.push_str(s);
        }
        if let Some(t) = self.title.as_mut() {
            if t.notes == 0 {
                title_push(t, s);
            }
        }
        if self.hidden > 0 {
            return;
        }
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if is_ws(b[i]) {
                while i < b.len() && is_ws(b[i]) {
                    i += 1;
                }
                self.want(Sep::Space);
                continue;
            }
            let st = i;
            while i < b.len() && !is_ws(b[i]) {
                i += 1;
            }
            self.flush();
            self.doc.text.push_str(&s[st..i]);
        }
    }

    fn push_char(&mut self, c: char) {
        if let Some(t) = self.title.as_mut() {
            if t.notes == 0 {
                if t.space && !t.buf.is_empty() {
                    t.buf.push(' ');
                }
                t.space = false;
                t.buf.push(c);
            }
        }
        if self.hidden == 0 {
            self.flush();
            self.doc.text.push(c);
        }
    }
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn title_push(t: &mut TitleCap, s: &str) {
    for (i, w) in s.split([' ', '\t', '\n', '\r']).enumerate() {
        if i > 0 {
            t.space = true;
        }
        if !w.is_empty() {
            if t.space && !t.buf.is_empty() {
                t.buf.push(' ');
            }
            t.space = false;
            t.buf.push_str(w);
        }
    }
}

struct Parser<'a> {
    path: &'a str,
    input: &'a str,
    stack: Vec<Frame>,
    docs: Vec<DocState>,
    out: Vec<Parsed>,
    root_done: bool,
    root_seen: bool,
    /// The root is an unknown element (wrapper or generic document).
    wrapper: bool,
    wrapper_children: usize,
}

impl<'a> Parser<'a> {
    fn new(path: &'a str, input: &'a str) -> Self {
        Parser {
            path,
            input,
            stack: Vec::with_capacity(64),
            docs: Vec::with_capacity(2),
            out: Vec::new(),
            root_done: false,
            root_seen: false,
            wrapper: false,
            wrapper_children: 0,
        }
    }

    fn err(&self, off: u64, reason: impl Into<String>, hint: &'static str) -> FormexError {
        FormexError::at(self.input.as_bytes(), off, reason, hint)
    }

    fn name_of(&self, f: &Frame) -> &'a str {
        let (s, l) = (f.name.0 as usize, f.name.1 as usize);
        self.input.get(s..s + l).unwrap_or("?")
    }

    fn run(&mut self) -> Result<(), FormexError> {
        let input = self.input;
        let mut r = Reader::from_str(input);
        {
            let c = r.config_mut();
            c.check_end_names = true;
            c.expand_empty_elements = false;
            c.trim_text(false);
        }
        loop {
            let before = r.buffer_position();
            let ev = match r.read_event() {
                Ok(ev) => ev,
                Err(e) => {
                    let reason = format!("malformed XML: {e}");
                    let off = r.error_position().max(before);
                    return Err(self.err(off, reason, HINT_MALFORMED));
                }
            };
            match ev {
                Event::Start(e) => self.start(&e, before, false)?,
                Event::Empty(e) => {
                    self.start(&e, before, true)?;
                    self.end(before)?;
                }
                Event::End(_) => self.end(before)?,
                Event::Text(t) => {
                    let s = t.unescape().map_err(|e| {
                        self.err(
                            before,
                            format!("bad character or entity reference: {e}"),
                            HINT_MALFORMED,
                        )
                    })?;
                    self.text(&s, before)?;
                }
                Event::CData(c) => {
                    let raw = c.into_inner();
                    let s = String::from_utf8_lossy(&raw);
                    self.text(&s, before)?;
                }
                Event::DocType(d) => {
                    let raw: &[u8] = &d;
                    if find(raw, b"ENTITY").is_some() {
                        return Err(self.err(
                            before,
                            "DOCTYPE declares entities (refused, never expanded)",
                            HINT_DTD,
                        ));
                    }
                }
                Event::Decl(d) => {
                    if let Some(Ok(enc)) = d.encoding() {
                        let enc = enc.to_ascii_lowercase();
                        let utf8 = enc == b"utf-8" || enc == b"utf8";
                        if !utf8 && !input.is_ascii() {
                            let name = String::from_utf8_lossy(&enc).into_owned();
                            return Err(self.err(
                                before,
                                format!("declared encoding `{name}` is not UTF-8"),
                                HINT_ENCODING,
                            ));
                        }
                    }
                }
                Event::PI(_) | Event::Comment(_) => {}
                Event::Eof => break,
            }
        }
        if let Some(f) = self.stack.last() {
            let name = self.name_of(f);
            let open = self.stack.len();
            return Err(self.err(
                input.len() as u64,
                format!("truncated: end of file inside <{name}> ({open} element(s) still open)"),
                HINT_TRUNCATED,
            ));
        }
        if !self.root_seen {
            return Err(self.err(
                input.len() as u64,
                "no root element: not an XML document",
                HINT_NOT_FORMEX,
            ));
        }
        Ok(())
    }

    fn text(&mut self, s: &str, off: u64) -> Result<(), FormexError> {
        if self.stack.is_empty() {
            if s.bytes().all(is_ws) {
                return Ok(());
            }
            let what = if self.root_done {
                "text after the root element"
            } else {
                "text before the root element"
            };
            let hint = if self.root_done {
                HINT_MALFORMED
            } else {
                HINT_NOT_FORMEX
            };
            return Err(self.err(off, what, hint));
        }
        if let Some(d) = self.docs.last_mut() {
            d.text(s);
        }
        Ok(())
    }

    fn start(&mut self, e: &BytesStart<'_>, off: u64, _empty: bool) -> Result<(), FormexError> {
        let qname = e.name();
        let name: &[u8] = qname.as_ref();
        // every attribute must parse (catches broken quoting)
        for a in e.attributes() {
            if let Err(err) = a {
                return Err(self.err(off, format!("malformed attribute: {err}"), HINT_MALFORMED));
            }
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.err(
                off,
                format!("elements nested deeper than {MAX_DEPTH}"),
                HINT_MALFORMED,
            ));
        }
        let name_range = {
            let start = name.as_ptr() as usize;
            let base = self.input.as_ptr() as usize;
            if start >= base
                && start + name.len() <= base + self.input.len()
                && name.len() <= u16::MAX as usize
            {
                ((start - base) as u32, name.len() as u16)
            } else {
                (0, 0)
            }
        };
        let depth = self.stack.len();
        let name_str = std::str::from_utf8(name).unwrap_or("?");
        if depth == 0 {
            if self.root_done {
                return Err(self.err(
                    off,
                    format!("second root element <{name_str}>"),
                    HINT_MALFORMED,
                ));
            }
            self.root_seen = true;
            if !is_formex_name(name) {
                return Err(self.err(
                    off,
                    format!("not a FORMEX document: root element <{name_str}>"),
                    HINT_NOT_FORMEX,
                ));
            }
            self.wrapper = !is_doc_root(name);
            let cap = self.input.len() / 2;
            self.docs.push(DocState::new(self.path, name_str, cap));
            self.stack.push(Frame {
                k: K::Other,
                d: Disp::Block,
                name: name_range,
                opens_doc: true,
            });
            self.root_attrs(e);
            return Ok(());
        }
        if depth == 1 && self.wrapper && is_doc_root(name) {
            self.wrapper_children += 1;
            let cap = 1024;
            self.docs.push(DocState::new(self.path, name_str, cap));
            self.stack.push(Frame {
                k: K::Other,
                d: Disp::Block,
                name: name_range,
                opens_doc: true,
            });
            self.root_attrs(e);
            return Ok(());
        }
        let (k, d) = classify(name);
        let parent = self.stack.last().map(|f| f.k).unwrap_or(K::Other);
        self.stack.push(Frame {
            k,
            d,
            name: name_range,
            opens_doc: false,
        });
        let depth = self.stack.len();
        let Some(ds) = self.docs.last_mut() else {
            return Ok(());
        };
        // rendering
        if let Some(t) = ds.title.as_mut() {
            if matches!(d, Disp::Block | Disp::Soft) {
                t.space = true;
            }
        }
        match d {
            Disp::Block => ds.want(Sep::Line),
            Disp::Soft => ds.want(Sep::Space),
            Disp::Hidden => ds.hidden += 1,
            Disp::Inline => {}
        }
        match k {
            K::Other | K::BibInstance | K::BibDoc | K::BibOj | K::DocMainPub | K::Glue => {}
            K::Br => ds.want(Sep::Line),
            K::NoDoc => {
                if !ds.no_doc_done && matches!(parent, K::BibInstance | K::BibDoc) {
                    ds.in_no_doc = Some(depth);
                }
            }
            K::Date => {
                if let Ok(Some(a)) = e.try_get_attribute(b"ISO") {
                    if let Some(date) = iso_date(&a.value) {
                        if ds.date_main.is_none()
                            && matches!(parent, K::BibInstance | K::DocMainPub | K::BibOj)
                        {
                            ds.date_main = Some(date.clone());
                        }
                        if ds.date_any.is_none() && ds.quot == 0 && ds.notes == 0 {
                            ds.date_any = Some(date);
                        }
                    }
                }
            }
            K::LgDoc | K::LgOj | K::NoCelex | K::LegalValue => {
                if ds.leaf.is_none() {
                    ds.leaf = Some((k, depth));
                    ds.leaf_buf.clear();
                }
            }
            K::Keyword => {
                if ds.leaf.is_none() && ds.quot == 0 {
                    ds.leaf = Some((k, depth));
                    ds.leaf_buf.clear();
                }
            }
            K::Year | K::NoCurrent => {
                if ds.in_no_doc.is_some() && ds.leaf.is_none() {
                    ds.leaf = Some((k, depth));
                    ds.leaf_buf.clear();
                }
            }
            K::Title => {
                if !ds.title_done && ds.title.is_none() && ds.quot == 0 && ds.notes == 0 {
                    ds.title = Some(TitleCap {
                        depth,
                        ..Default::default()
                    });
                }
            }
            K::EnactingTerms => ds.enacting += 1,
            K::Annex => ds.annex += 1,
            K::Article => {
                // The act's own articles: in its enacting terms, not quoted (amending text) nor in an annex (annexes of
                // consolidated acts, and annexed agreements, have articles of their own).
                if ds.enacting > 0
                    && ds.annex == 0
                    && ds.quot == 0
                    && ds.notes == 0
                    && ds.hidden == 0
                    && ds.art.is_none()
                {
                    let id = match e.try_get_attribute(b"IDENTIFIER") {
                        Ok(Some(a)) => a
                            .unescape_value()
                            .map(|v| v.into_owned())
                            .unwrap_or_default(),
                        _ => String::new(),
                    };
                    ds.art = Some(ArtState {
                        depth,
                        art: Article {
                            id,
                            ..Default::default()
                        },
                        child: None,
                        notes: Vec::new(),
                        note_start: None,
                    });
                }
            }
            K::TiArt | K::StiArt => {}
            K::QuotS => ds.quot += 1,
            K::QuotMark => {
                if let Ok(Some(a)) = e.try_get_attribute(b"CODE") {
                    if let Some(c) = std::str::from_utf8(&a.value)
                        .ok()
                        .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
                        .and_then(char::from_u32)
                    {
                        ds.push_char(c);
                    }
                }
            }
            K::Note => {
                if let Some(t) = ds.title.as_mut() {
                    t.notes += 1;
                }
                if ds.hidden == 0 {
                    ds.want(Sep::Space);
                    ds.flush();
                    if ds.notes == 0 {
                        if let Some(a) = ds.art.as_mut().filter(|a| a.child.is_some()) {
                            a.note_start = Some(ds.doc.text.len());
                        }
                    }
                    ds.doc.text.push('[');
                }
                ds.notes += 1;
            }
            K::MathOp => {
                if let Ok(Some(a)) = e.try_get_attribute(b"TYPE") {
                    let op = match &*a.value {
                        b"EQ" => "=",
                        b"NE" => "≠",
                        b"LT" => "<",
                        b"GT" => ">",
                        b"LE" => "≤",
                        b"GE" => "≥",
                        b"PLUS" => "+",
                        b"MINUS" => "−",
                        b"PLUSMINUS" => "±",
                        b"MULT" => "×",
                        b"DIV" => "÷",
                        b"CARTPROD" => "×",
                        _ => "",
                    };
                    if !op.is_empty() {
                        ds.want(Sep::Space);
                        for c in op.chars() {
                            ds.push_char(c);
                        }
                        ds.want(Sep::Space);
                    }
                }
            }
            K::Divisor => ds.push_char('/'),
            K::Sum => ds.push_char('Σ'),
            K::Row => ds.cell_index = 0,
            K::Cell => {
                if ds.cell_index > 0 && ds.hidden == 0 {
                    ds.flush();
                    while ds.doc.text.ends_with(' ') {
                        ds.doc.text.pop();
                    }
                    ds.doc.text.push_str(" |");
                    ds.pending = Sep::Space;
                }
                ds.cell_index += 1;
                ds.cells += 1;
            }
            K::DocumentRef => {
                if ds.meta.manifest_ref.is_none() && parent == K::BibInstance {
                    if let Ok(Some(a)) = e.try_get_attribute(b"FILE") {
                        ds.meta.manifest_ref = a.unescape_value().ok().map(|v| v.into_owned());
                    }
                }
            }
            K::RefPhys => {
                if ds.manifest {
                    if let Ok(Some(a)) = e.try_get_attribute(b"FILE") {
                        if let Ok(v) = a.unescape_value() {
                            ds.meta.parts.push(v.into_owned());
                        }
                    }
                }
            }
            K::InfoConsleg => {
                if let Ok(Some(a)) = e.try_get_attribute(b"CONSLEG.REF") {
                    ds.consleg_ref = a.unescape_value().ok().map(|v| v.trim().to_string());
                }
                if let Ok(Some(a)) = e.try_get_attribute(b"LEG.VAL") {
                    ds.meta.legal_value = a.unescape_value().ok().map(|v| v.trim().to_string());
                }
            }
        }
        // article direct children
        if let Some(a) = ds.art.as_mut() {
            if depth == a.depth + 1 && a.child.is_none() {
                a.child = Some((k, ds.doc.text.len()));
            }
        }
        Ok(())
    }

    /// Attributes of a document root (none needed today; hook for LG attributes of future roots).
    fn root_attrs(&mut self, _e: &BytesStart<'_>) {}

    fn end(&mut self, off: u64) -> Result<(), FormexError> {
        let Some(f) = self.stack.pop() else {
            return Err(self.err(off, "closing tag without an open element", HINT_MALFORMED));
        };
        let depth = self.stack.len() + 1;
        if f.opens_doc {
            if let Some(ds) = self.docs.pop() {
                let keep = !(self.wrapper
                    && depth == 1
                    && self.wrapper_children > 0
                    && ds.doc.text.trim().is_empty());
                if keep {
                    self.out.push(finish(ds));
                }
            }
            if self.stack.is_empty() {
                self.root_done = true;
            }
            return Ok(());
        }
        let Some(ds) = self.docs.last_mut() else {
            return Ok(());
        };
        // article direct children first (the slice must not include the closing separator)
        if let Some(a) = ds.art.as_mut() {
            if depth == a.depth + 1 {
                if let Some((ck, st)) = a.child.take() {
                    let raw = ds.doc.text.get(st..).unwrap_or("");
                    let txt = raw.trim().to_string();
                    // Headings without their footnotes (what a reader calls the article's title).
                    let heading = || {
                        let mut plain = String::with_capacity(raw.len());
                        let mut at = st;
                        for &(a0, a1) in &a.notes {
                            plain.push_str(ds.doc.text.get(at.max(st)..a0.max(at)).unwrap_or(""));
                            plain.push(' ');
                            at = at.max(a1);
                        }
                        plain.push_str(ds.doc.text.get(at.max(st)..).unwrap_or(""));
                        plain.split_whitespace().collect::<Vec<_>>().join(" ")
                    };
                    match ck {
                        K::TiArt => {
                            a.art.title = heading();
                            a.art.title_in_text = txt;
                        }
                        K::StiArt => a.art.subtitle = Some(heading()),
                        _ => {
                            if !txt.is_empty() {
                                a.art.paragraphs.push(txt)
                            }
                        }
                    }
                    a.notes.clear();
                    a.note_start = None;
                }
            } else if depth == a.depth {
                if let Some(a) = ds.art.take() {
                    ds.doc.articles.push(a.art);
                }
            }
        }
        if let Some(t) = ds.title.as_mut() {
            if matches!(f.d, Disp::Block | Disp::Soft) || f.k == K::Glue {
                t.space = true;
            }
        }
        match f.d {
            Disp::Block => ds.want(Sep::Line),
            Disp::Soft => ds.want(Sep::Space),
            Disp::Hidden => ds.hidden = ds.hidden.saturating_sub(1),
            Disp::Inline => {}
        }
        match f.k {
            K::Glue => {
                ds.want(Sep::Space);
                ds.glue = true;
            }
            K::Br => ds.want(Sep::Line),
            K::NoDoc if ds.in_no_doc == Some(depth) => {
                ds.in_no_doc = None;
                ds.no_doc_done = true;
            }
            K::Keyword if ds.leaf == Some((K::Keyword, depth)) => {
                ds.leaf = None;
                let v = ds.leaf_buf.split_whitespace().collect::<Vec<_>>().join(" ");
                if !v.is_empty() {
                    ds.doc.keywords.push(v);
                }
            }
            K::LgDoc | K::LgOj | K::NoCelex | K::LegalValue | K::Year | K::NoCurrent => {
                if let Some((lk, ld)) = ds.leaf {
                    if ld == depth && lk == f.k {
                        ds.leaf = None;
                        let v = ds.leaf_buf.trim().to_string();
                        if !v.is_empty() {
                            let slot = match lk {
                                K::LgDoc => &mut ds.lg_doc,
                                K::LgOj => &mut ds.lg_oj,
                                K::NoCelex => &mut ds.no_celex,
                                K::LegalValue => &mut ds.meta.legal_value,
                                K::Year => &mut ds.year,
                                _ => &mut ds.number,
                            };
                            if slot.is_none() {
                                *slot = Some(v);
                            }
                        }
                    }
                }
            }
            K::Title => {
                if let Some(t) = ds.title.as_ref() {
                    if t.depth == depth {
                        let t = ds.title.take().unwrap_or_default();
                        let v = t.buf.trim();
                        if !v.is_empty() {
                            ds.doc.title = Some(v.to_string());
                            ds.title_done = true;
                        }
                    }
                }
            }
            K::QuotS => ds.quot = ds.quot.saturating_sub(1),
            K::EnactingTerms => ds.enacting = ds.enacting.saturating_sub(1),
            K::Annex => ds.annex = ds.annex.saturating_sub(1),
            K::Note => {
                ds.notes = ds.notes.saturating_sub(1);
                if let Some(t) = ds.title.as_mut() {
                    t.notes = t.notes.saturating_sub(1);
                }
                if ds.hidden == 0 {
                    let t = &mut ds.doc.text;
                    while t.ends_with([' ', '\n']) {
                        t.pop();
                    }
                    if t.ends_with('[') {
                        t.pop(); // empty note
                    } else {
                        t.push(']');
                    }
                    let end = t.len();
                    if ds.notes == 0 {
                        if let Some(a) = ds.art.as_mut() {
                            if let Some(st) = a.note_start.take() {
                                a.notes.push((st, end.max(st)));
                            }
                        }
                    }
                    ds.pending = Sep::None;
                }
            }
            K::Cell => ds.cells = ds.cells.saturating_sub(1),
            _ => {}
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `YYYYMMDD` → `YYYY-MM-DD`; `99999999` and impossible dates → `None`.
pub fn iso_date(v: &[u8]) -> Option<String> {
    let v = v.trim_ascii();
    if v.len() != 8 || !v.iter().all(u8::is_ascii_digit) || v == b"99999999" {
        return None;
    }
    let s = std::str::from_utf8(v).ok()?;
    let m: u32 = s[4..6].parse().ok()?;
    let d: u32 = s[6..8].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || &s[..4] == "0000" {
        return None;
    }
    Some(format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..8]))
}

fn finish(ds: DocState) -> Parsed {
    let DocState {
        mut doc,
        mut meta,
        lg_doc,
        lg_oj,
        no_celex,
        consleg_ref,
        year,
        number,
        date_main,
        date_any,
        ..
    } = ds;
    // text: trim trailing blanks
    let t = doc.text.trim_end().len();
    doc.text.truncate(t);
    // language
    doc.lang = lg_doc
        .as_deref()
        .and_then(norm_lang)
        .or_else(|| lg_oj.as_deref().and_then(norm_lang))
        .or_else(|| lang_from_filename(&doc.path));
    // CELEX
    let mut src = CelexSource::None;
    let mut celex = None;
    if let Some(c) = no_celex.filter(|c| is_celex(c)) {
        celex = Some(c);
        src = CelexSource::Explicit;
    } else if let Some(c) = consleg_ref.map(|r| format!("3{r}")).filter(|c| is_celex(c)) {
        celex = Some(c);
        src = CelexSource::Explicit;
    } else if let Some(c) = celex_from_filename(&doc.path) {
        celex = Some(c);
        src = CelexSource::FileName;
    } else if let (Some(y), Some(n)) = (year.as_deref(), number.as_deref()) {
        let letter = match doc.root.as_str() {
            "DOC" => meta
                .legal_value
                .as_deref()
                .and_then(letter_from_legal_value)
                .map(|l| (l, CelexSource::Manifest)),
            "ACT" => doc
                .title
                .as_deref()
                .and_then(letter_from_title)
                .map(|l| (l, CelexSource::Heuristic)),
            _ => None,
        };
        if let Some((l, s)) = letter {
            if let Some(c) = celex_from_parts(y, l, n) {
                celex = Some(c);
                src = s;
            }
        }
    }
    doc.celex = celex;
    meta.celex_source = src;
    doc.doc_type = doc_type_for(&doc.root, doc.celex.as_deref(), doc.title.as_deref());
    doc.date = date_main.or(date_any);
    Parsed { doc, meta }
}

/// Document type from root, CELEX and (ACT only, without CELEX) the title's first act word.
pub fn doc_type_for(root: &str, celex: Option<&str>, title: Option<&str>) -> DocType {
    match root {
        "DOC" | "PUBLICATION" => return DocType::Manifest,
        "ANNEX" | "CONS.ANNEX" => return DocType::Annex,
        "CORR" => return DocType::Corrigendum,
        "JUDGMENT" => return DocType::Judgment,
        "ORDER" => return DocType::Order,
        "CONCLUSION" => return DocType::Opinion,
        _ => {}
    }
    if let Some(t) = celex.and_then(doc_type_from_celex) {
        return t;
    }
    if root == "ACT" {
        match title.and_then(letter_from_title) {
            Some('R') => return DocType::Regulation,
            Some('L') => return DocType::Directive,
            Some('D') => return DocType::Decision,
            _ => {}
        }
    }
    DocType::Other
}

/// Type from a CELEX number: sector 3 + R/L/D, `R(nn)` = corrigendum; sector 6 + CJ/TJ/FJ, CO/TO/FO, CC/TC/CV.
pub fn doc_type_from_celex(c: &str) -> Option<DocType> {
    let b = c.as_bytes();
    if b.len() < 10 {
        return None;
    }
    let letters: String = c[5..]
        .chars()
        .take_while(|ch| ch.is_ascii_uppercase())
        .collect();
    let rest = &c[5 + letters.len()..];
    let num_end = rest
        .find(|ch: char| !ch.is_ascii_digit())
        .unwrap_or(rest.len());
    let suffix = &rest[num_end..];
    match b[0] {
        b'3' | b'2' | b'4' | b'0' => {
            if suffix.starts_with("R(") {
                return Some(DocType::Corrigendum);
            }
            match letters.as_str() {
                "R" => Some(DocType::Regulation),
                "L" => Some(DocType::Directive),
                "D" => Some(DocType::Decision),
                _ => None,
            }
        }
        b'6' => match letters.as_str() {
            "CJ" | "TJ" | "FJ" => Some(DocType::Judgment),
            "CO" | "TO" | "FO" => Some(DocType::Order),
            "CC" | "TC" | "CV" => Some(DocType::Opinion),
            _ => None,
        },
        _ => None,
    }
}

/// Loose CELEX shape check: sector, 4-digit year, 1–2 type letters, a number, optional `(nn)`/`R(nn)` suffix.
pub fn is_celex(c: &str) -> bool {
    celex_prefix_len(c.as_bytes()) == Some(c.len())
}

/// Length of the CELEX number at the start of `b`, if any.
fn celex_prefix_len(b: &[u8]) -> Option<usize> {
    if b.len() < 10 || !(b[0].is_ascii_digit() || b[0] == b'C' || b[0] == b'E') {
        return None;
    }
    if !b[1..5].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut i = 5;
    while i < b.len() && i < 7 && b[i].is_ascii_uppercase() {
        i += 1;
    }
    if i == 5 {
        return None;
    }
    let ns = i;
    while i < b.len() && b[i].is_ascii_digit() && i - ns < 5 {
        i += 1;
    }
    if i - ns < 4 {
        return None;
    }
    // optional (nn) or R(nn)
    let rest = &b[i..];
    let suf = if rest.len() >= 5 && rest[0] == b'R' && rest[1] == b'(' && rest[4] == b')' {
        if rest[2].is_ascii_digit() && rest[3].is_ascii_digit() {
            5
        } else {
            0
        }
    } else if rest.len() >= 4
        && rest[0] == b'('
        && rest[3] == b')'
        && rest[1].is_ascii_digit()
        && rest[2].is_ascii_digit()
    {
        4
    } else {
        0
    };
    Some(i + suf)
}

fn celex_from_parts(year: &str, letter: char, number: &str) -> Option<String> {
    let y = year.trim();
    let y = match y.len() {
        4 if y.bytes().all(|b| b.is_ascii_digit()) => y.to_string(),
        2 if y.bytes().all(|b| b.is_ascii_digit()) => {
            let v: u32 = y.parse().ok()?;
            format!("{}{y}", if v > 50 { "19" } else { "20" })
        }
        _ => return None,
    };
    let n: u32 = number.trim().parse().ok()?;
    if n == 0 || n > 9999 {
        return None;
    }
    Some(format!("3{y}{letter}{n:04}"))
}

fn letter_from_legal_value(v: &str) -> Option<char> {
    let v = v.trim().to_ascii_uppercase();
    if v.starts_with("REG") {
        Some('R')
    } else if v.starts_with("DIR") {
        Some('L')
    } else if v.starts_with("DEC") {
        Some('D')
    } else {
        None
    }
}

/// The act kind named first in the title's opening words, in any of the 24 EU languages.
fn letter_from_title(title: &str) -> Option<char> {
    const WORDS: &[(&str, char)] = &[
        // regulation
        ("regulation", 'R'),
        ("règlement", 'R'),
        ("verordnung", 'R'),
        ("reglamento", 'R'),
        ("regolamento", 'R'),
        ("regulamento", 'R'),
        ("verordening", 'R'),
        ("rozporządzenie", 'R'),
        ("регламент", 'R'),
        ("nařízení", 'R'),
        ("uredba", 'R'),
        ("förordning", 'R'),
        ("forordning", 'R'),
        ("asetus", 'R'),
        ("määrus", 'R'),
        ("regula", 'R'),
        ("reglamentas", 'R'),
        ("rendelet", 'R'),
        ("nariadenie", 'R'),
        ("regulamentul", 'R'),
        ("regolament", 'R'),
        ("κανονισμός", 'R'),
        ("rialachán", 'R'),
        // directive
        ("directive", 'L'),
        ("richtlinie", 'L'),
        ("directiva", 'L'),
        ("direttiva", 'L'),
        ("diretiva", 'L'),
        ("richtlijn", 'L'),
        ("dyrektywa", 'L'),
        ("директива", 'L'),
        ("směrnice", 'L'),
        ("direktiv", 'L'),
        ("direktiiv", 'L'),
        ("direktīva", 'L'),
        ("direktyva", 'L'),
        ("irányelv", 'L'),
        ("smernica", 'L'),
        ("οδηγία", 'L'),
        ("treoir", 'L'),
        // decision
        ("decision", 'D'),
        ("décision", 'D'),
        ("beschluss", 'D'),
        ("entscheidung", 'D'),
        ("decisión", 'D'),
        ("decisione", 'D'),
        ("decisão", 'D'),
        ("besluit", 'D'),
        ("decyzja", 'D'),
        ("решение", 'D'),
        ("rozhodnutí", 'D'),
        ("odluka", 'D'),
        ("beslut", 'D'),
        ("afgørelse", 'D'),
        ("päätös", 'D'),
        ("otsus", 'D'),
        ("lēmums", 'D'),
        ("sprendimas", 'D'),
        ("határozat", 'D'),
        ("rozhodnutie", 'D'),
        ("sklep", 'D'),
        ("decizia", 'D'),
        ("deċiżjoni", 'D'),
        ("απόφαση", 'D'),
        ("cinneadh", 'D'),
    ];
    let head: String = title.chars().take(120).collect::<String>().to_lowercase();
    let mut best: Option<(usize, char)> = None;
    for (w, l) in WORDS {
        if let Some(p) = head.find(w) {
            if best.map(|(bp, _)| p < bp).unwrap_or(true) {
                best = Some((p, *l));
            }
        }
    }
    best.map(|(_, l)| l)
}

/// The 24 official EU languages (ISO 639-1).
pub const EU_LANGS: &[&str] = &[
    "bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "ga", "hr", "hu", "it", "lt", "lv",
    "mt", "nl", "pl", "pt", "ro", "sk", "sl", "sv",
];

/// `EN` → `en`; 3-letter ISO 639-2 codes of EU languages map to 639-1.
pub fn norm_lang(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_lowercase()) {
        return Some(s);
    }
    let m = match s.as_str() {
        "bul" => "bg",
        "ces" | "cze" => "cs",
        "dan" => "da",
        "deu" | "ger" => "de",
        "ell" | "gre" => "el",
        "eng" => "en",
        "spa" => "es",
        "est" => "et",
        "fin" => "fi",
        "fra" | "fre" => "fr",
        "gle" => "ga",
        "hrv" => "hr",
        "hun" => "hu",
        "ita" => "it",
        "lit" => "lt",
        "lav" => "lv",
        "mlt" => "mt",
        "nld" | "dut" => "nl",
        "pol" => "pl",
        "por" => "pt",
        "ron" | "rum" => "ro",
        "slk" | "slo" => "sk",
        "slv" => "sl",
        "swe" => "sv",
        _ => return None,
    };
    Some(m.to_string())
}

/// The file name of a path (`a/b.zip!m/x.xml` → `x.xml`).
pub fn base_name(path: &str) -> &str {
    let p = path.rsplit('!').next().unwrap_or(path);
    p.rsplit(['/', '\\']).next().unwrap_or(p)
}

fn eu_lang(code: &str) -> Option<String> {
    let c = code.to_ascii_lowercase();
    EU_LANGS.contains(&c.as_str()).then_some(c)
}

/// Language from a file name: `L_2016119EN.…`, `L_202401689EN.…`, `CL2016R0679FR…`, `62018CJ0311.lv.fmx.xml`,
/// `…-es.xml`.
/// Byte offset of the two-letter language code in an OJ file name (`L_2016119EN.01000101.xml`,
/// `L_202401689EN.000101.fmx.xml`: collection `_` then at least 7 digits then the code).
pub fn oj_lang_offset(name: &str) -> Option<usize> {
    let b = name.as_bytes();
    let us = name.find('_')?;
    if !(us > 0 && us <= 3 && b[..us].iter().all(u8::is_ascii_uppercase)) {
        return None;
    }
    let mut i = us + 1;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    (i - us > 7 && i + 2 <= b.len() && b[i].is_ascii_uppercase() && b[i + 1].is_ascii_uppercase())
        .then_some(i)
}

pub fn lang_from_filename(path: &str) -> Option<String> {
    let name = base_name(path);
    lang_offset_in_name(name).and_then(|i| eu_lang(&name[i..i + 2]))
}

/// A file's base name with its language code replaced by `__` (`L_2016119EN.01000101.xml` and
/// `L_2016119FR.01000101.xml` → `L_2016119__.01000101.xml`): the same key for every language version of an act.
pub fn lang_neutral_name(path: &str) -> String {
    let name = base_name(path);
    let mut s = name.to_string();
    if let Some(i) = lang_offset_in_name(name) {
        s.replace_range(i..i + 2, "__");
    }
    s
}

/// Byte offset of the two-letter EU language code in a FORMEX file name (see [`lang_from_filename`]).
fn lang_offset_in_name(name: &str) -> Option<usize> {
    let b = name.as_bytes();
    let is_lang = |i: usize| name.get(i..i + 2).and_then(eu_lang).is_some();
    // CL + year + type letters + number + LANG
    if b.len() > 14 && name.starts_with("CL") && b[2..6].iter().all(u8::is_ascii_digit) {
        let mut i = 6;
        while i < b.len() && b[i].is_ascii_uppercase() && i < 8 {
            i += 1;
        }
        let ns = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i - ns >= 4
            && i + 2 <= b.len()
            && b[i].is_ascii_uppercase()
            && b[i + 1].is_ascii_uppercase()
            && is_lang(i)
        {
            return Some(i);
        }
    }
    // OJ: COLL_ + digits + LANG
    if let Some(i) = oj_lang_offset(name).filter(|&i| is_lang(i)) {
        return Some(i);
    }
    // a `.xx.` segment
    let mut at = 0;
    for (k, seg) in name.split('.').enumerate() {
        if k > 0 && seg.len() == 2 && seg.bytes().all(|c| c.is_ascii_lowercase()) && is_lang(at) {
            return Some(at);
        }
        at += seg.len() + 1;
    }
    // stem ending in -xx / _xx
    let stem = name.split('.').next().unwrap_or(name);
    if stem.len() > 3 && stem.is_char_boundary(stem.len() - 2) {
        let (head, _) = stem.split_at(stem.len() - 2);
        if head.ends_with(['-', '_']) && is_lang(stem.len() - 2) {
            return Some(stem.len() - 2);
        }
    }
    None
}

/// CELEX from a file name: `32022R1925-formex.xml`, `62018CJ0311.en.fmx.xml`, `CL2016R0679FR….xml` (→ `32016R0679`).
/// OJ names (`L_2016119EN.01000101.xml`) carry none.
pub fn celex_from_filename(path: &str) -> Option<String> {
    let name = base_name(path);
    let b = name.as_bytes();
    if name.starts_with("CL") && b.len() > 12 {
        if b[2..6].iter().all(u8::is_ascii_digit) {
            let mut i = 6;
            while i < b.len() && i < 8 && b[i].is_ascii_uppercase() {
                i += 1;
            }
            let ns = i;
            if ns > 6 {
                let mut j = i;
                while j < b.len() && b[j].is_ascii_digit() && j - ns < 4 {
                    j += 1;
                }
                if j - ns == 4 {
                    return Some(format!("3{}", &name[2..j]));
                }
            }
        }
        return None;
    }
    let n = celex_prefix_len(b)?;
    if n < b.len() && b[n].is_ascii_alphanumeric() {
        return None;
    }
    Some(name[..n].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(xml: &str) -> Document {
        let mut v = parse_bytes("t.xml", xml.as_bytes()).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    const ACT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ACT><BIB.INSTANCE><DOCUMENT.REF FILE="L_2016119EN.01000101.doc.xml"><COLL>L</COLL></DOCUMENT.REF><DATE ISO="20160427">20160427</DATE><LG.DOC>EN</LG.DOC><NO.DOC FORMAT="YN" TYPE="OJ"><NO.CURRENT>679</NO.CURRENT><YEAR>2016</YEAR></NO.DOC></BIB.INSTANCE><TITLE><TI><P><HT TYPE="UC">Regulation</HT> (EU) 2016/679 <HT TYPE="UC">of the Council</HT></P><P>of <DATE ISO="20160427">27 April 2016</DATE><NOTE NOTE.ID="E1"><P>fn</P></NOTE></P></TI></TITLE><PREAMBLE><GR.VISA><VISA>Having regard to the opinion<NOTE NOTE.ID="E0001"><P><REF.DOC.OJ>OJ C 229, p. 90</REF.DOC.OJ>.</P></NOTE>,</VISA></GR.VISA><GR.CONSID><CONSID><NP><NO.P>(1)</NO.P><TXT>The (the <QUOT.START CODE="2018"/>Charter<QUOT.END CODE="2019"/>) text.</TXT></NP></CONSID></GR.CONSID></PREAMBLE><ENACTING.TERMS><DIVISION><TITLE><TI><P>CHAPTER I</P></TI></TITLE><ARTICLE IDENTIFIER="001"><TI.ART>Article 1</TI.ART><STI.ART>Subject-matter</STI.ART><PARAG IDENTIFIER="001.001"><NO.PARAG>1.</NO.PARAG><ALINEA>This Regulation lays down rules.</ALINEA></PARAG><PARAG><NO.PARAG>2.</NO.PARAG><ALINEA>It protects <HT TYPE="ITALIC">rights</HT>.</ALINEA></PARAG></ARTICLE></DIVISION><ARTICLE IDENTIFIER="002"><TI.ART>Article 2</TI.ART><ALINEA>Article 5 is replaced:<QUOT.S LEVEL="1"><ARTICLE IDENTIFIER="005"><TI.ART>Article 5</TI.ART><ALINEA>Quoted.</ALINEA></ARTICLE></QUOT.S></ALINEA><ALINEA><TBL><CORPUS><ROW><CELL>a</CELL><CELL><IE/></CELL><CELL>c <P>d</P></CELL></ROW><ROW><CELL>e</CELL></ROW></CORPUS></TBL></ALINEA></ARTICLE></ENACTING.TERMS></ACT>"#;

    #[test]
    fn formex_act_metadata_and_articles() {
        let d = one(ACT);
        assert_eq!(d.root, "ACT");
        assert_eq!(d.lang.as_deref(), Some("en"));
        assert_eq!(d.date.as_deref(), Some("2016-04-27"));
        assert_eq!(d.celex.as_deref(), Some("32016R0679"));
        assert_eq!(d.doc_type, DocType::Regulation);
        assert_eq!(
            d.title.as_deref(),
            Some("Regulation (EU) 2016/679 of the Council of 27 April 2016")
        );
        assert_eq!(d.articles.len(), 2);
        let a = &d.articles[0];
        assert_eq!(a.id, "001");
        assert_eq!(a.title, "Article 1");
        assert_eq!(a.subtitle.as_deref(), Some("Subject-matter"));
        assert_eq!(
            a.paragraphs,
            vec![
                "1. This Regulation lays down rules.",
                "2. It protects rights."
            ]
        );
        assert_eq!(d.articles[1].id, "002");
        assert!(
            !d.text.contains("20160427"),
            "BIB.INSTANCE stripped: {}",
            d.text
        );
    }

    #[test]
    fn formex_articles_are_the_enacting_terms_not_annexes() {
        // A consolidated act whose Annex I has an "Article 1" of its own (as CL2014R0651: "An enterprise is
        // considered to be …"), an annexed agreement with enacting terms, and an annex document with articles.
        let cons = r#"<CONS.ACT><CONS.DOC><TITLE><TI><P>Commission Regulation (EU) No 651/2014</P></TI></TITLE><ENACTING.TERMS><ARTICLE IDENTIFIER="001"><TI.ART>Article 1</TI.ART><ALINEA>This Regulation shall apply to aid.</ALINEA></ARTICLE><ARTICLE IDENTIFIER="002"><TI.ART>Article 2</TI.ART><ALINEA>Definitions.</ALINEA></ARTICLE></ENACTING.TERMS><CONS.ANNEX><TITLE><TI><P>ANNEX I</P></TI></TITLE><CONTENTS><ARTICLE IDENTIFIER="001"><TI.ART>Article 1</TI.ART><ALINEA>An enterprise is any entity.</ALINEA></ARTICLE></CONTENTS></CONS.ANNEX><CONS.ANNEX><CONTENTS><ENACTING.TERMS><ARTICLE IDENTIFIER="003"><TI.ART>Article 3</TI.ART><ALINEA>Agreement.</ALINEA></ARTICLE></ENACTING.TERMS></CONTENTS></CONS.ANNEX></CONS.DOC></CONS.ACT>"#;
        let d = one(cons);
        let arts: Vec<(&str, &str)> = d
            .articles
            .iter()
            .map(|a| (a.id.as_str(), a.paragraphs[0].as_str()))
            .collect();
        assert_eq!(
            arts,
            [
                ("001", "This Regulation shall apply to aid."),
                ("002", "Definitions.")
            ]
        );
        // The annexes' text is still the document's text.
        assert!(
            d.text.contains("An enterprise is any entity."),
            "{}",
            d.text
        );
        let annex = r#"<ANNEX><CONTENTS><ENACTING.TERMS><ARTICLE IDENTIFIER="001"><TI.ART>Article 1</TI.ART><ALINEA>x</ALINEA></ARTICLE></ENACTING.TERMS></CONTENTS></ANNEX>"#;
        assert!(one(annex).articles.is_empty());
        // Articles outside any enacting terms (a bare list, a preamble) are not the act's either.
        let bare = r#"<ACT><PREAMBLE><ARTICLE IDENTIFIER="001"><TI.ART>Article 1</TI.ART><ALINEA>x</ALINEA></ARTICLE></PREAMBLE></ACT>"#;
        assert!(one(bare).articles.is_empty());
    }

    #[test]
    fn formex_text_rendering() {
        let d = one(ACT);
        let t = &d.text;
        assert!(
            t.starts_with("Regulation (EU) 2016/679 of the Council\nof 27 April 2016 [fn]\n"),
            "{t}"
        );
        assert!(
            t.contains("Having regard to the opinion [OJ C 229, p. 90.],\n"),
            "{t}"
        );
        assert!(
            t.contains("(1) The (the \u{2018}Charter\u{2019}) text."),
            "{t}"
        );
        assert!(
            t.contains("Article 1\nSubject-matter\n1. This Regulation lays down rules.\n2. It protects rights."),
            "{t}"
        );
        assert!(t.contains("Article 5\nQuoted."), "{t}");
        assert!(t.contains("a | | c d\ne"), "{t}");
        assert!(!t.contains("  "), "{t}");
    }

    #[test]
    fn formex_image_caption_and_content_are_text() {
        // Images are skipped, not their text: a figure's caption (CL2018R0858), a form reproduced as an image with
        // its text in IMG.CNT (CL2007R1393: 681 words were lost), and an inline character image (CL2009L0138)
        // that separates the words around it instead of gluing them.
        let d = one(
            r#"<ACT><TITLE><TI><P>Act</P></TI></TITLE><P>See:<INCL.ELEMENT CONTENT="OTHER" FILEREF="a.tif" TYPE="TIFF"><CAPTION><TITLE><TI><P><HT TYPE="ITALIC">Figure 1</HT></P></TI><STI><P>The bodies involved</P></STI></TITLE></CAPTION></INCL.ELEMENT></P><INCL.ELEMENT CONTENT="FORM" FILEREF="b.tif" TYPE="TIFF"><IMG.CNT><P>REQUEST FOR SERVICE</P><P>1.1. identity</P></IMG.CNT></INCL.ELEMENT><P>max(min<INCL.ELEMENT CONTENT="CHARACTER" FILEREF="c.tif" TYPE="TIFF"/>(((x</P></ACT>"#,
        );
        assert_eq!(
            d.text,
            "Act\nSee:\nFigure 1\nThe bodies involved\nREQUEST FOR SERVICE\n1.1. identity\nmax(min (((x"
        );
        assert_eq!(d.title.as_deref(), Some("Act"));
    }

    #[test]
    fn formex_language_versions_are_separate_words() {
        // CL1992L0013 (Finland's authority in Finnish and Swedish) and CL1977L0799 (taxes named in two languages).
        let d = one(
            r#"<ACT><P><LV LG="FI">Kauppa- ja teollisuusministeriö</LV><LV LG="SV">Handels- och industriministeriet</LV></P><P><LV LG="FR">Impôt des sociétés</LV>—<LV LG="NL">Vennootschapsbelasting</LV></P></ACT>"#,
        );
        assert_eq!(
            d.text,
            "Kauppa- ja teollisuusministeriö Handels- och industriministeriet\nImpôt des sociétés — Vennootschapsbelasting"
        );
    }

    #[test]
    fn formex_wrapper_and_manifest() {
        let xml = r#"<COMBINED.FMX>
<PUBLICATION><OJ><BIB.OJ><TITLE><TI><P>Official Journal</P></TI></TITLE><DATE ISO="20240712">12 July</DATE><LG.OJ>EN</LG.OJ></BIB.OJ></OJ></PUBLICATION>
<ACT><BIB.INSTANCE><LG.DOC>EN</LG.DOC></BIB.INSTANCE><TITLE><TI><P>Directive 2024/1</P></TI></TITLE></ACT>
<ANNEX><BIB.INSTANCE><LG.DOC>FR</LG.DOC></BIB.INSTANCE><TITLE><TI><P>ANNEXE</P></TI></TITLE><CONTENTS><P>x</P></CONTENTS></ANNEX>
</COMBINED.FMX>"#;
        let v = parse_bytes("aia.fmx.xml", xml.as_bytes()).unwrap();
        let roots: Vec<_> = v.iter().map(|d| d.root.as_str()).collect();
        assert_eq!(roots, ["PUBLICATION", "ACT", "ANNEX"]);
        assert_eq!(v[0].doc_type, DocType::Manifest);
        assert_eq!(v[0].text, "");
        assert_eq!(v[0].date.as_deref(), Some("2024-07-12"));
        assert_eq!(v[0].lang.as_deref(), Some("en"));
        assert_eq!(v[1].doc_type, DocType::Directive);
        assert_eq!(v[2].doc_type, DocType::Annex);
        assert_eq!(v[2].lang.as_deref(), Some("fr"));
        assert_eq!(v[2].text, "ANNEXE\nx");
    }

    #[test]
    fn formex_manifest_parts_and_celex() {
        let xml = r#"<DOC><BIB.DOC><NO.DOC FORMAT="YN"><NO.CURRENT>1689</NO.CURRENT><YEAR>2024</YEAR></NO.DOC></BIB.DOC><FMX><DOC.MAIN.PUB><LG.DOC>EN</LG.DOC><LEGAL.VALUE>REG</LEGAL.VALUE><DATE ISO="20240613">x</DATE><REF.PHYS FILE="a.xml"/></DOC.MAIN.PUB><DOC.SUB.PUB><REF.PHYS FILE="b.xml"/></DOC.SUB.PUB></FMX></DOC>"#;
        let p = parse_detailed("L_202401689EN.doc.fmx.xml", xml.as_bytes()).unwrap();
        assert_eq!(p[0].doc.celex.as_deref(), Some("32024R1689"));
        assert_eq!(p[0].meta.parts, ["a.xml", "b.xml"]);
        assert_eq!(p[0].meta.celex_source, CelexSource::Manifest);
        assert_eq!(p[0].doc.date.as_deref(), Some("2024-06-13"));
    }

    #[test]
    fn formex_generic_root_and_case_law() {
        let d = one("<NEWROOT><X>alpha</X><Y>beta</Y></NEWROOT>");
        assert_eq!(d.text, "alpha beta");
        assert_eq!(d.doc_type, DocType::Other);
        let v = parse_bytes(
            "dir/62018CJ0311.lv.fmx.xml",
            br#"<JUDGMENT><BIB.JUDGMENT><NO.CELEX>62018CJ0311</NO.CELEX></BIB.JUDGMENT><TITLE><TI><P>Judgment <DATE ISO="20200716">16 July 2020</DATE></P></TI></TITLE></JUDGMENT>"#,
        )
        .unwrap();
        assert_eq!(v[0].lang.as_deref(), Some("lv"));
        assert_eq!(v[0].celex.as_deref(), Some("62018CJ0311"));
        assert_eq!(v[0].doc_type, DocType::Judgment);
        assert_eq!(v[0].date.as_deref(), Some("2020-07-16"));
    }

    #[test]
    fn formex_case_law_keywords_are_subject_metadata_and_text() {
        let d = one(
            r#"<JUDGMENT><INDEX><KEYWORD>Reference for a preliminary ruling</KEYWORD><KEYWORD>Protection of   <HT TYPE="ITALIC">personal data</HT></KEYWORD></INDEX><P>Body <QUOT.S><KEYWORD>quoted</KEYWORD></QUOT.S></P></JUDGMENT>"#,
        );
        assert_eq!(
            d.keywords,
            [
                "Reference for a preliminary ruling",
                "Protection of personal data"
            ]
        );
        assert!(d.text.contains("Protection of personal data"), "{}", d.text);
        assert!(one("<ACT><P>x</P></ACT>").keywords.is_empty());
    }

    #[test]
    fn formex_formula_operators() {
        let d = one(
            r#"<ACT><P>so <FORMULA><EXPR>h</EXPR><OP.CMP TYPE="EQ"/><EXPR><SUM><UNDER>i</UNDER></SUM>H<IND>i</IND><OP.MATH TYPE="MULT"/><FRACTION><DIVIDEND>l</DIVIDEND><DIVISOR>L</DIVISOR></FRACTION></EXPR></FORMULA>.</P></ACT>"#,
        );
        assert_eq!(d.text, "so h = \u{3a3}iHi \u{d7} l/L.");
    }

    #[test]
    fn formex_filename_helpers() {
        assert_eq!(
            lang_from_filename("x/L_2016119EN.01000101.xml").as_deref(),
            Some("en")
        );
        assert_eq!(
            lang_from_filename("L_202401689EN.000101.fmx.xml").as_deref(),
            Some("en")
        );
        assert_eq!(
            lang_from_filename("CL2016R0679FR0000020.0001.xml").as_deref(),
            Some("fr")
        );
        assert_eq!(
            lang_from_filename("a.zip!62018CJ0311.lv.fmx.xml").as_deref(),
            Some("lv")
        );
        assert_eq!(
            lang_from_filename("gdpr-consolidated-es.xml").as_deref(),
            Some("es")
        );
        assert_eq!(lang_from_filename("aia.fmx.xml"), None);
        assert_eq!(
            celex_from_filename("32022R1925-formex.xml").as_deref(),
            Some("32022R1925")
        );
        assert_eq!(
            celex_from_filename("CL2016R0679FR0000020.0001.xml").as_deref(),
            Some("32016R0679")
        );
        assert_eq!(
            celex_from_filename("62018CJ0311.en.fmx.xml").as_deref(),
            Some("62018CJ0311")
        );
        assert_eq!(celex_from_filename("L_2016119EN.01000101.xml"), None);
        assert_eq!(
            doc_type_from_celex("32016R0679R(02)"),
            Some(DocType::Corrigendum)
        );
        assert_eq!(doc_type_from_celex("62023CO0786"), Some(DocType::Order));
        assert_eq!(doc_type_from_celex("62019CC0001"), Some(DocType::Opinion));
        assert_eq!(iso_date(b"99999999"), None);
        assert_eq!(iso_date(b"20240101").as_deref(), Some("2024-01-01"));
        assert_eq!(norm_lang("ENG").as_deref(), Some("en"));
    }

    #[test]
    fn formex_bad_inputs_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"<ACT><P>x</ACT>", "malformed"),
            (b"<ACT><P>x</P>", "truncated"),
            (b"<html><body>x</body></html>", "not a FORMEX"),
            (b"\xff\xfe<\0A\0", "UTF-16"),
            (b"<ACT>caf\xe9</ACT>", "UTF-8"),
            (b"\x00\x01\x02garbage", "binary"),
            (
                b"<!DOCTYPE ACT [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><ACT>&x;</ACT>",
                "DOCTYPE",
            ),
            (b"<ACT>&unknown;</ACT>", "entity"),
            (b"<ACT></ACT><ACT></ACT>", "second root"),
            (b"just text", "text before"),
            (b"<ACT A=\"1></ACT>", "malformed"),
        ];
        for (bytes, want) in cases {
            let e = parse_bytes("bad.xml", bytes).expect_err(want);
            assert!(e.reason.contains(want), "{want}: {e}");
            assert!(e.line >= 1 && e.byte_offset <= bytes.len() as u64);
        }
        let e = parse_bytes("bad.xml", b"<ACT>\n<P>\n\xe9</P></ACT>").unwrap_err();
        assert_eq!((e.line, e.column, e.byte_offset), (3, 1, 10));
    }

    #[test]
    fn formex_never_panics_on_prefixes() {
        for cut in 0..ACT.len() {
            if ACT.is_char_boundary(cut) {
                let _ = parse_bytes("t.xml", &ACT.as_bytes()[..cut]);
            }
        }
    }
}
