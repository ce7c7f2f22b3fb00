//! FORMEX reader: input expansion, decompression, archives, manifest metadata, quarantine, `lexflow parse`.
//!
//! * [`expand_inputs`]: files, directories (recursive), globs → sorted paths, one per regular file (symlink loops
//!   and repeats skipped with a warning; FIFOs, sockets, devices are errors).
//! * [`read_file`]: one input (plain `.xml`, `.xml.zst`, `.xml.gz` — detected by magic bytes — or a `.zip` of xml
//!   members, also `.xml.gz`/`.xml.zst` ones, read in name order, member paths `archive.zip!member.xml`) → its
//!   documents. Other members (images, PDFs) are skipped with a warning; a zip with no xml member is an error. Inside a
//!   zip, manifests are attached to the members of the same package.
//! * Manifest metadata across files, deterministically: [`ManifestIndex::build`] parses only the manifests (`DOC`
//!   roots, found by name or by sniffing the root) among the *whole* sorted input list, before any reader thread starts;
//!   each reader then calls [`read_file_indexed`], which attaches the metadata of the manifest of the same package
//!   (same directory; the manifest lists the file in `REF.PHYS`, or the file's `DOCUMENT.REF FILE` names the manifest;
//!   a manifest of another language of the same OJ document gives CELEX/date but not the title). The result depends
//!   only on the input list, never on thread timing. [`read_files_with_manifests`] does both steps for a whole list.
//! * [`sniff_lang`]: cheap language guess for lane assignment (file name, else the first `<LG.DOC>` of the first 64 KB).
//! * [`Quarantine`]: one JSON line per bad file + the `lexflow_reader_quarantined_files_total` counter.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::stages::formex::{self, base_name, CelexSource, FormexError, Parsed};
use crate::types::{DocType, Document};

/// Decompressed size limit per file or archive member (zip/zstd bombs).
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

/// A bad input: always carries the path and, where known, the position.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: cannot read: {source} — {hint}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{path}: line {line}, column {column} (byte {byte_offset}): {reason} — {hint}")]
    Parse {
        path: String,
        line: u64,
        column: u64,
        byte_offset: u64,
        reason: String,
        hint: &'static str,
    },
    #[error("{path}: byte {byte_offset} of the decompressed data: {reason} — {hint}")]
    Decompress {
        path: String,
        byte_offset: u64,
        reason: String,
        hint: &'static str,
    },
    #[error("{path}: no input matches this path or pattern — check the spelling (globs: `dir/**/*.xml`)")]
    NoMatch { path: String },
    /// The path exists but holds nothing to read: not a regular file (a FIFO would block forever), or a zip without
    /// a FORMEX member.
    #[error("{path}: {reason} — {hint}")]
    Unusable {
        path: String,
        reason: String,
        hint: &'static str,
    },
}

impl ReadError {
    /// An I/O failure that persisted through the reader's retries but may pass (not a missing file, a denied
    /// permission): the run stops on it rather than quarantine the file, which would change its stream.
    pub fn is_transient_io(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if !lasting_io(source))
    }

    pub fn path(&self) -> &str {
        match self {
            ReadError::Io { path, .. }
            | ReadError::Parse { path, .. }
            | ReadError::Decompress { path, .. }
            | ReadError::NoMatch { path }
            | ReadError::Unusable { path, .. } => path,
        }
    }
    /// 1-based line (0 when unknown).
    pub fn line(&self) -> u64 {
        match self {
            ReadError::Parse { line, .. } => *line,
            _ => 0,
        }
    }
    pub fn column(&self) -> u64 {
        match self {
            ReadError::Parse { column, .. } => *column,
            _ => 0,
        }
    }
    pub fn byte_offset(&self) -> u64 {
        match self {
            ReadError::Parse { byte_offset, .. } | ReadError::Decompress { byte_offset, .. } => {
                *byte_offset
            }
            _ => 0,
        }
    }
    pub fn reason(&self) -> String {
        match self {
            ReadError::Io { source, .. } => format!("cannot read: {source}"),
            ReadError::Parse { reason, .. }
            | ReadError::Decompress { reason, .. }
            | ReadError::Unusable { reason, .. } => reason.clone(),
            ReadError::NoMatch { .. } => "no input matches".into(),
        }
    }
    pub fn hint(&self) -> &'static str {
        match self {
            ReadError::Io { hint, .. }
            | ReadError::Parse { hint, .. }
            | ReadError::Decompress { hint, .. }
            | ReadError::Unusable { hint, .. } => hint,
            ReadError::NoMatch { .. } => "check the spelling of the path or glob",
        }
    }
    /// `{path, line, column, byte_offset, reason, hint}` (the quarantine record).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path(),
            "line": self.line(),
            "column": self.column(),
            "byte_offset": self.byte_offset(),
            "reason": self.reason(),
            "hint": self.hint(),
        })
    }
    fn parse(path: &str, e: FormexError) -> Self {
        ReadError::Parse {
            path: path.to_string(),
            line: e.line,
            column: e.column,
            byte_offset: e.byte_offset,
            reason: e.reason,
            hint: e.hint,
        }
    }
    fn io(path: &Path, source: std::io::Error) -> Self {
        ReadError::Io {
            path: path.display().to_string(),
            source,
            hint: "check that the file exists and is readable",
        }
    }
    fn not_regular(path: &Path, ft: &std::fs::FileType) -> Self {
        ReadError::Unusable {
            path: path.display().to_string(),
            reason: format!("not a regular file ({})", file_kind(ft)),
            hint: "remove it from the input, or replace it by the FORMEX file it stands for (reading it could \
                   block forever)",
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Input expansion

/// Whether a file name has an accepted input extension.
pub fn is_supported(path: &Path) -> bool {
    let n = path
        .file_name()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".xml")
        || n.ends_with(".xml.zst")
        || n.ends_with(".xml.gz")
        || n.ends_with(".zip")
        || is_qa_jsonl(path)
}

/// Instruction data: JSON lines of Q&A pairs (`lexflow qa build`'s `train/<lang>.jsonl`), plain or compressed.
pub fn is_qa_jsonl(path: &Path) -> bool {
    let n = path.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".jsonl") || n.ends_with(".jsonl.zst") || n.ends_with(".jsonl.gz")
}

/// How Q&A inputs are read (FORMEX files do not care).
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Prompt and answer text of each pair (`input.qa_template`).
    pub qa: crate::stages::qa_format::PromptFormat,
    /// A Q&A file may mix languages (held-out sets such as `eval.jsonl`); else one language per file.
    pub mixed_languages: bool,
}

/// The documents of a Q&A JSON-lines file: per pair, the prompt ([`crate::stages::qa_format::PromptFormat::prompt`]) followed by
/// the answer, with `answer_start` at the boundary (the prompt is context, the answer the training target). One
/// language per file (it is one sampler lane) unless `opts.mixed_languages`; a bad line is an error naming the line.
fn parse_qa_jsonl(path: &str, bytes: &[u8], opts: &ReadOptions) -> Result<Vec<Parsed>, ReadError> {
    let bad = |line: usize, offset: usize, reason: String| ReadError::Parse {
        path: path.to_string(),
        line: line as u64,
        column: 1,
        byte_offset: offset as u64,
        reason,
        hint:
            "each line must be one Q&A pair as `lexflow qa build` writes them (train/<lang>.jsonl)",
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        bad(line, at, "not UTF-8".into())
    })?;
    let mut out = Vec::new();
    let mut lang: Option<String> = None;
    let mut offset = 0usize;
    for (i, l) in text.split('\n').enumerate() {
        let here = offset;
        offset += l.len() + 1;
        if l.trim().is_empty() {
            continue;
        }
        let p: crate::stages::qa_format::QaPair = serde_json::from_str(l).map_err(|e| {
            // serde_json counts within the line: report the column (and the byte in the file), not its "line 1".
            let col = e.column().max(1);
            let msg = e.to_string();
            let msg = msg
                .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
                .unwrap_or(&msg);
            let mut err = bad(i + 1, here + col - 1, format!("not a Q&A pair: {msg}"));
            if let ReadError::Parse { column, .. } = &mut err {
                *column = col as u64;
            }
            err
        })?;
        match &lang {
            _ if opts.mixed_languages => {}
            None => lang = Some(p.lang.clone()),
            Some(l0) if *l0 != p.lang => {
                return Err(bad(
                    i + 1,
                    here,
                    format!(
                        "language {:?} in a file of {:?}: one language per file (one sampler lane)",
                        p.lang, l0
                    ),
                ))
            }
            _ => {}
        }
        let prompt = opts.qa.prompt(&p.question);
        let answer = opts.qa.answer(&p.answer);
        let doc = Document {
            path: path.to_string(),
            root: "QA".into(),
            celex: Some(p.celex.clone()),
            lang: Some(p.lang.clone()),
            title: Some(p.question.clone()),
            answer_start: Some(prompt.len()),
            text: prompt + &answer,
            ..Default::default()
        };
        out.push(Parsed {
            doc,
            meta: Default::default(),
        });
    }
    Ok(out)
}

/// Files, directories (walked recursively, accepted extensions only) and globs → sorted, deduplicated paths. An
/// explicit file is taken whatever its extension. A path or pattern matching nothing is an error.
///
/// Invariants: only regular files (after following symlinks) are inputs — a FIFO, socket or device that is named
/// explicitly or carries an input extension is an error (reading it would block forever); no directory is walked
/// twice (symlink loops, a directory reached by two paths), and no file is listed twice: of the paths that reach the
/// same file (symlinks, hard links), the first in sorted order is kept. Every skip is logged at warn level.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>, ReadError> {
    let mut walk = InputWalk::default();
    for p in patterns {
        let path = Path::new(p);
        let meta = std::fs::metadata(path);
        match &meta {
            Ok(m) if m.is_dir() => walk.dir(path, m)?,
            Ok(m) if m.is_file() => walk.file(path, m),
            Ok(m) => return Err(ReadError::not_regular(path, &m.file_type())),
            Err(_) if p.contains(['*', '?', '[']) => {
                let bad = |e: glob::PatternError| ReadError::Parse {
                    path: p.clone(),
                    line: 1,
                    column: e.pos as u64 + 1,
                    byte_offset: e.pos as u64,
                    reason: format!("bad glob pattern: {}", e.msg),
                    hint: "fix the pattern (e.g. `corpus/**/*.xml`)",
                };
                let mut matched = false;
                if p.contains("**") {
                    // The glob crate follows symlinked directories under `**` without loop detection (a
                    // `self -> .` link makes it run forever): walk the literal base here, each directory once.
                    matched = walk.recursive_glob(p, &glob::Pattern::new(p).map_err(bad)?)?;
                } else {
                    // Without `**` every match has as many components as the pattern: finite, even through loops.
                    for entry in glob::glob(p).map_err(bad)? {
                        let pb = entry.map_err(|e| {
                            ReadError::io(e.path(), std::io::Error::other(e.to_string()))
                        })?;
                        matched |= walk.entry(&pb)?;
                    }
                }
                if !matched {
                    return Err(ReadError::NoMatch { path: p.clone() });
                }
            }
            Err(_) => return Err(ReadError::NoMatch { path: p.clone() }),
        }
    }
    Ok(walk.finish())
}

/// Identity of a file or directory, the same for every path that reaches it.
#[cfg(unix)]
type FileId = (u64, u64);
#[cfg(not(unix))]
type FileId = PathBuf;

#[cfg(unix)]
fn file_id(_path: &Path, meta: &std::fs::Metadata) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}
#[cfg(not(unix))]
fn file_id(path: &Path, _meta: &std::fs::Metadata) -> Option<FileId> {
    std::fs::canonicalize(path).ok()
}

/// What a non-regular file is, for error messages.
fn file_kind(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        } else if ft.is_socket() {
            return "a socket";
        } else if ft.is_char_device() {
            return "a character device";
        } else if ft.is_block_device() {
            return "a block device";
        }
    }
    let _ = ft;
    "a special file"
}

/// State of one [`expand_inputs`] call: the candidate paths (with their file identity) and the directories walked.
#[derive(Default)]
struct InputWalk {
    /// Path → identity (`None`: no metadata, e.g. a dangling symlink; the reader reports it).
    found: BTreeMap<PathBuf, Option<FileId>>,
    /// Directory identity → the path it was first walked through.
    dirs: HashMap<FileId, PathBuf>,
}

impl InputWalk {
    fn file(&mut self, path: &Path, meta: &std::fs::Metadata) {
        self.found.insert(path.to_path_buf(), file_id(path, meta));
    }

    /// A glob match: a directory is walked, a regular file with an input extension taken. Whether it was either
    /// (a pattern matching neither matches nothing).
    fn entry(&mut self, path: &Path) -> Result<bool, ReadError> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => self.dir(path, &m).map(|()| true),
            Ok(m) if m.is_file() => {
                if is_supported(path) {
                    self.file(path, &m);
                }
                Ok(is_supported(path))
            }
            Ok(m) if is_supported(path) => Err(ReadError::not_regular(path, &m.file_type())),
            Ok(_) => Ok(false),
            Err(_) => {
                if is_supported(path) {
                    self.found.insert(path.to_path_buf(), None); // dangling symlink: the reader names it
                }
                Ok(is_supported(path))
            }
        }
    }

    /// Expand a pattern with `**`: walk its literal base (the components before the first wildcard) depth-first in
    /// sorted order, each directory once, and take the paths `pattern` matches (`*` stays within one component, as
    /// with the glob crate). A directory reached by several paths is seen through the first.
    fn recursive_glob(&mut self, p: &str, pattern: &glob::Pattern) -> Result<bool, ReadError> {
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let base: PathBuf = Path::new(p)
            .components()
            .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
            .collect();
        // An empty base is the current directory; its paths are then relative (`a/b.xml`, not `./a/b.xml`).
        let read_path = |d: &Path| -> PathBuf {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        };
        let mut matched = false;
        let mut seen: std::collections::HashSet<FileId> = std::collections::HashSet::new();
        let mut stack = vec![base];
        while let Some(path) = stack.pop() {
            if pattern.matches_path_with(&path, opts) {
                matched |= self.entry(&path)?;
            }
            let Ok(meta) = std::fs::metadata(read_path(&path)) else {
                continue;
            };
            if !meta.is_dir()
                || file_id(&read_path(&path), &meta).is_some_and(|id| !seen.insert(id))
            {
                continue;
            }
            let rd = std::fs::read_dir(read_path(&path)).map_err(|e| ReadError::io(&path, e))?;
            let mut children = Vec::new();
            for entry in rd {
                children.push(path.join(entry.map_err(|e| ReadError::io(&path, e))?.file_name()));
            }
            children.sort();
            stack.extend(children.into_iter().rev());
        }
        Ok(matched)
    }

    /// Walk a directory depth-first in sorted order, iteratively (no recursion limit, no stack overflow).
    fn dir(&mut self, root: &Path, meta: &std::fs::Metadata) -> Result<(), ReadError> {
        // Stack of entries still to visit, in reverse sorted order (so popping yields sorted DFS order).
        let mut stack: Vec<(PathBuf, Option<std::fs::Metadata>)> =
            vec![(root.to_path_buf(), Some(meta.clone()))];
        while let Some((path, meta)) = stack.pop() {
            let Some(meta) = meta.or_else(|| std::fs::metadata(&path).ok()) else {
                if is_supported(&path) {
                    self.found.insert(path, None); // dangling symlink: the reader names it
                }
                continue;
            };
            if meta.is_file() {
                if is_supported(&path) {
                    self.file(&path, &meta);
                }
                continue;
            }
            if !meta.is_dir() {
                if is_supported(&path) {
                    return Err(ReadError::not_regular(&path, &meta.file_type()));
                }
                continue;
            }
            if let Some(id) = file_id(&path, &meta) {
                if let Some(first) = self.dirs.get(&id) {
                    if *first == path {
                        continue; // the same directory given twice
                    }
                    tracing::warn!(
                        target: "lexflow::reader",
                        "{}: skipped: the same directory as {} (a symlink loop or a directory reached twice); \
                         its files are read once, through {}",
                        path.display(),
                        first.display(),
                        first.display()
                    );
                    continue;
                }
                self.dirs.insert(id, path.clone());
            }
            let rd = std::fs::read_dir(&path).map_err(|e| ReadError::io(&path, e))?;
            let mut children = Vec::new();
            for entry in rd {
                children.push(entry.map_err(|e| ReadError::io(&path, e))?.path());
            }
            children.sort();
            stack.extend(children.into_iter().rev().map(|c| (c, None)));
        }
        Ok(())
    }

    /// The sorted paths, one per file: a file reached by several paths keeps the first.
    fn finish(self) -> Vec<PathBuf> {
        let mut seen: HashMap<FileId, PathBuf> = HashMap::new();
        let mut out = Vec::with_capacity(self.found.len());
        for (path, id) in self.found {
            if let Some(id) = id {
                if let Some(first) = seen.get(&id) {
                    tracing::warn!(
                        target: "lexflow::reader",
                        "{}: skipped: the same file as {} (a symlink or hard link); read once, as {}",
                        path.display(),
                        first.display(),
                        first.display()
                    );
                    continue;
                }
                seen.insert(id, path.clone());
            }
            out.push(path);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Decompression

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Plain,
    Zstd,
    Gzip,
    Zip,
}

fn container(head: &[u8], path: &Path) -> Container {
    if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Container::Zstd
    } else if head.starts_with(&[0x1F, 0x8B]) {
        Container::Gzip
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Container::Zip
    } else {
        let n = path.to_string_lossy().to_ascii_lowercase();
        if n.ends_with(".zip") {
            Container::Zip
        } else {
            Container::Plain
        }
    }
}

fn read_limited(mut r: impl Read, path: &str, limit: u64) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    match r.by_ref().take(limit + 1).read_to_end(&mut buf) {
        Ok(_) if buf.len() as u64 > limit => Err(ReadError::Decompress {
            path: path.to_string(),
            byte_offset: limit,
            reason: format!("decompresses to more than {limit} bytes"),
            hint: "a decompression bomb or a huge file: split it or drop it",
        }),
        Ok(_) => Ok(buf),
        Err(e) => Err(ReadError::Decompress {
            path: path.to_string(),
            byte_offset: buf.len() as u64,
            reason: format!("corrupt or truncated compressed data: {e}"),
            hint: "re-download or re-compress the file",
        }),
    }
}

/// The decompressed bytes of a plain/zstd/gzip file.
fn decompress(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, ReadError> {
    let p = path.display().to_string();
    match container(&raw, path) {
        Container::Plain | Container::Zip => Ok(raw),
        Container::Zstd => {
            let dec =
                zstd::stream::read::Decoder::new(&raw[..]).map_err(|e| ReadError::Decompress {
                    path: p.clone(),
                    byte_offset: 0,
                    reason: format!("bad zstd stream: {e}"),
                    hint: "re-download or re-compress the file",
                })?;
            read_limited(dec, &p, MAX_DECOMPRESSED)
        }
        Container::Gzip => read_limited(
            flate2::read::MultiGzDecoder::new(&raw[..]),
            &p,
            MAX_DECOMPRESSED,
        ),
    }
}

/// Whether a zip member is a FORMEX file this reader takes: `.xml` (incl. `.fmx.xml`, `.doc.xml`), or one compressed
/// as `.xml.gz` / `.xml.zst`. A EUR-Lex FORMEX package also holds images (`.tif`, `.jpg`, `.png`, …) and sometimes a
/// PDF rendition: those are not text and are skipped (with a warning naming them).
fn is_zip_formex_member(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !n.ends_with('/') && (n.ends_with(".xml") || n.ends_with(".xml.gz") || n.ends_with(".xml.zst"))
}

/// At most this many skipped member names are quoted in an error or a warning (the count is always given).
const SKIPPED_NAMES_SHOWN: usize = 10;

fn name_list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(SKIPPED_NAMES_SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SKIPPED_NAMES_SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SKIPPED_NAMES_SHOWN));
    }
    s
}

/// `(member path, decompressed bytes)` of the FORMEX members of a zip ([`is_zip_formex_member`]), in name order.
/// A zip without any is an error naming what it holds; other members next to FORMEX ones are logged and skipped.
fn zip_members(path: &Path, raw: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ReadError> {
    let p = path.display().to_string();
    let bad = |e: zip::result::ZipError| ReadError::Decompress {
        path: p.clone(),
        byte_offset: 0,
        reason: format!("bad zip archive: {e}"),
        hint: "re-download the EUR-Lex package",
    };
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(raw)).map_err(bad)?;
    let mut names: Vec<(String, usize)> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for i in 0..z.len() {
        let Some(n) = z.name_for_index(i) else {
            continue;
        };
        if is_zip_formex_member(n) {
            names.push((n.to_string(), i));
        } else if !n.ends_with('/') {
            skipped.push(n.to_string());
        }
    }
    names.sort();
    skipped.sort();
    if names.is_empty() {
        let reason = if skipped.is_empty() {
            "a zip archive with no file in it: nothing to read".to_string()
        } else {
            format!(
                "a zip archive with no FORMEX member (`.xml`, `.xml.gz`, `.xml.zst`): its {} member(s) were \
                 skipped: {}",
                skipped.len(),
                name_list(&skipped)
            )
        };
        return Err(ReadError::Unusable {
            path: p,
            reason,
            hint: "give a EUR-Lex FORMEX package (a zip of `.xml` files), extract nested archives first, or \
                   remove this file from the input",
        });
    }
    if !skipped.is_empty() {
        tracing::warn!(
            target: "lexflow::reader",
            "{p}: skipped {} zip member(s) that are not FORMEX XML (images, PDFs, nested archives are not read): {}",
            skipped.len(),
            name_list(&skipped)
        );
    }
    let mut out = Vec::with_capacity(names.len());
    for (name, i) in names {
        let mpath = format!("{p}!{name}");
        let f = z.by_index(i).map_err(bad)?;
        let bytes = read_limited(f, &mpath, MAX_DECOMPRESSED)?;
        // `.xml.gz` / `.xml.zst` members: detected by magic bytes, like top-level files.
        let bytes = decompress(Path::new(&mpath), bytes)?;
        out.push((mpath, bytes));
    }
    Ok(out)
}

fn parse_one(path: &str, bytes: &[u8], opts: &ReadOptions) -> Result<Vec<Parsed>, ReadError> {
    if is_qa_jsonl(Path::new(path)) {
        return parse_qa_jsonl(path, bytes, opts);
    }
    formex::parse_detailed(path, bytes).map_err(|e| ReadError::parse(path, e))
}

/// Parse one input with package metadata (no cross-file manifest attachment, except inside a zip).
pub fn read_file_detailed(path: &Path) -> Result<Vec<Parsed>, ReadError> {
    read_file_opts(path, &ReadOptions::default())
}

/// An I/O failure that will not pass by retrying: the same on a resume or a replay (so a quarantine keeps the
/// stream reproducible).
fn lasting_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::NotFound | K::PermissionDenied | K::IsADirectory | K::InvalidInput
    )
}

/// Reads a whole input file, retrying an I/O failure that may pass (not a missing file, a denied permission, a
/// directory) three times over about 5 s: an NFS or object-store hiccup should not cost a run.
fn read_with_retries(path: &Path) -> Result<Vec<u8>, ReadError> {
    let mut delays = [200u64, 1_000, 4_000].into_iter();
    loop {
        match std::fs::read(path) {
            Ok(b) => return Ok(b),
            Err(e) => {
                let lasting = lasting_io(&e);
                match delays.next() {
                    Some(ms) if !lasting => {
                        tracing::warn!(file = %path.display(), retry_in_ms = ms, "cannot read: {e}; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                    }
                    _ => return Err(ReadError::io(path, e)),
                }
            }
        }
    }
}

fn read_file_opts(path: &Path, opts: &ReadOptions) -> Result<Vec<Parsed>, ReadError> {
    let raw = read_with_retries(path)?;
    if container(&raw, path) == Container::Zip {
        let members = zip_members(path, &raw)?;
        let mut all = Vec::new();
        for (mpath, bytes) in &members {
            all.extend(parse_one(mpath, bytes, opts)?);
        }
        let idx = ManifestIndex::from_parsed(all.iter().map(|p| (path.to_path_buf(), p)));
        for p in all.iter_mut() {
            idx.attach_one(path, p);
        }
        return Ok(all);
    }
    let bytes = decompress(path, raw)?;
    parse_one(&path.display().to_string(), &bytes, opts)
}

/// Parse one input file (plain, zstd, gzip or zip) into its documents.
pub fn read_file(path: &Path) -> Result<Vec<Document>, ReadError> {
    Ok(read_file_detailed(path)?
        .into_iter()
        .map(|p| p.doc)
        .collect())
}

/// [`read_file`] plus the metadata of the file's manifest from `index` (see the module docs).
pub fn read_file_indexed(path: &Path, index: &ManifestIndex) -> Result<Vec<Document>, ReadError> {
    read_file_with(path, index, &ReadOptions::default())
}

/// [`read_file_indexed`] with Q&A options (prompt format, mixed languages).
pub fn read_file_with(
    path: &Path,
    index: &ManifestIndex,
    opts: &ReadOptions,
) -> Result<Vec<Document>, ReadError> {
    let mut v = read_file_opts(path, opts)?;
    for p in v.iter_mut() {
        index.attach_one(path, p);
    }
    Ok(v.into_iter().map(|p| p.doc).collect())
}

/// Read every path (in the given order) and attach manifest metadata within each package. Deterministic.
pub fn read_files_with_manifests(
    paths: &[PathBuf],
) -> Vec<(PathBuf, Result<Vec<Document>, ReadError>)> {
    let parsed: Vec<(PathBuf, Result<Vec<Parsed>, ReadError>)> = paths
        .iter()
        .map(|p| (p.clone(), read_file_detailed(p)))
        .collect();
    let index = ManifestIndex::from_parsed(
        parsed
            .iter()
            .filter_map(|(p, r)| r.as_ref().ok().map(|v| (p, v)))
            .flat_map(|(p, v)| v.iter().map(move |d| (p.clone(), d))),
    );
    parsed
        .into_iter()
        .map(|(path, r)| {
            let r = r.map(|mut v| {
                for d in v.iter_mut() {
                    index.attach_one(&path, d);
                }
                v.into_iter().map(|p| p.doc).collect()
            });
            (path, r)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------------
// Manifests

#[derive(Debug, Clone)]
struct ManifestInfo {
    /// File name of the manifest itself.
    name: String,
    /// Names it lists (`REF.PHYS`) and the conventional manifest names derived from them.
    names: Vec<String>,
    /// The files it lists (`REF.PHYS` base names), in its order: the act's body first, then its annexes.
    parts: Vec<String>,
    lang: Option<String>,
    celex: Option<String>,
    celex_source: CelexSource,
    date: Option<String>,
    title: Option<String>,
}

/// Manifest metadata per package scope (the directory of a file; a zip is its own scope).
#[derive(Debug, Default, Clone)]
pub struct ManifestIndex {
    by_scope: HashMap<PathBuf, Vec<ManifestInfo>>,
}

/// Whether a file name looks like a manifest (`….doc.xml`, `….doc.fmx.xml`, `DOC_1.xml`-style Cellar names).
pub fn looks_like_manifest(path: &Path) -> bool {
    let n = path
        .file_name()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.contains(".doc.") || n.contains(".toc.") || n.contains("-toc-") || n.contains("doc_1.")
}

fn scope_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Replace the language code of an OJ/consolidated file name by `__` (cross-language package key).
fn lang_neutral(name: &str) -> String {
    let mut s = name.to_string();
    if let Some(i) = crate::stages::formex::oj_lang_offset(name) {
        s.replace_range(i..i + 2, "__");
    }
    s
}

impl ManifestIndex {
    /// Parse the manifests among `paths` (by name, or any small file whose root is `DOC`). Cheap: manifests are a few
    /// KB; other files are not parsed.
    pub fn build(paths: &[PathBuf]) -> Self {
        let mut found: Vec<(PathBuf, Parsed)> = Vec::new();
        for p in paths {
            let candidate = looks_like_manifest(p)
                || (std::fs::metadata(p)
                    .map(|m| m.len() < 64 * 1024)
                    .unwrap_or(false)
                    && sniff_root(p).as_deref() == Some("DOC"));
            if !candidate {
                continue;
            }
            if let Ok(v) = read_file_detailed(p) {
                found.extend(
                    v.into_iter()
                        .filter(|d| d.doc.root == "DOC")
                        .map(|d| (p.clone(), d)),
                );
            }
        }
        Self::from_parsed(found.iter().map(|(p, d)| (p.clone(), d)))
    }

    fn from_parsed<'a>(it: impl Iterator<Item = (PathBuf, &'a Parsed)>) -> Self {
        let mut by_scope: HashMap<PathBuf, Vec<ManifestInfo>> = HashMap::new();
        for (path, p) in it {
            if p.doc.root != "DOC" {
                continue;
            }
            let name = base_name(&p.doc.path).to_string();
            let mut names = Vec::new();
            let parts: Vec<String> = p
                .meta
                .parts
                .iter()
                .map(|s| base_name(s).to_string())
                .collect();
            for part in &parts {
                let part = part.clone();
                if let Some(stem) = part.strip_suffix(".fmx.xml") {
                    let head = stem.split('.').next().unwrap_or(stem);
                    names.push(format!("{head}.doc.fmx.xml"));
                } else if let Some(stem) = part.strip_suffix(".xml") {
                    names.push(format!("{stem}.doc.xml"));
                }
                names.push(part);
            }
            let info = ManifestInfo {
                name,
                names,
                parts,
                lang: p.doc.lang.clone(),
                celex: p.doc.celex.clone(),
                celex_source: if p.doc.celex.is_some() {
                    p.meta.celex_source.max(CelexSource::Manifest)
                } else {
                    CelexSource::None
                },
                date: p.doc.date.clone(),
                title: p.doc.title.clone(),
            };
            by_scope.entry(scope_of(&path)).or_default().push(info);
        }
        for v in by_scope.values_mut() {
            v.sort_by(|a, b| a.name.cmp(&b.name));
        }
        ManifestIndex { by_scope }
    }

    pub fn is_empty(&self) -> bool {
        self.by_scope.is_empty()
    }

    /// Which act package each file belongs to ([`PackageKeys`]).
    pub fn package_keys(&self) -> PackageKeys {
        let mut k = PackageKeys::default();
        // Scopes in sorted order: the cross-directory maps below keep the first claim, so that which manifest wins a
        // name claimed in two directories does not depend on the hash map's iteration order.
        let mut scopes: Vec<(&PathBuf, &Vec<ManifestInfo>)> = self.by_scope.iter().collect();
        scopes.sort_by(|a, b| a.0.cmp(b.0));
        for (scope, list) in scopes {
            // `list` is sorted by manifest name: where two manifests claim a file, the first one wins, always.
            for m in list {
                let key = formex::lang_neutral_name(uncompressed(
                    m.parts.first().map_or(m.name.as_str(), String::as_str),
                ));
                for name in std::iter::once(&m.name).chain(&m.parts) {
                    let name = uncompressed(name);
                    k.exact
                        .entry((scope.clone(), name.to_string()))
                        .or_insert_with(|| key.clone());
                    let neutral = formex::lang_neutral_name(name);
                    k.neutral_any
                        .entry(neutral.clone())
                        .or_insert_with(|| key.clone());
                    k.neutral
                        .entry((scope.clone(), neutral))
                        .or_insert_with(|| key.clone());
                }
                if let Some(prefix) = cellar_prefix(uncompressed(&m.name)) {
                    k.cellar
                        .entry((scope.clone(), prefix.to_ascii_lowercase()))
                        .or_insert_with(|| key.clone());
                }
                if let Some(stem) = manifest_stem(uncompressed(&m.name)) {
                    let stem = formex::lang_neutral_name(stem);
                    k.stems_any
                        .entry(stem.clone())
                        .or_insert_with(|| key.clone());
                    k.stems
                        .entry((scope.clone(), stem))
                        .or_insert_with(|| key.clone());
                }
            }
        }
        k
    }

    fn find(&self, path: &Path, d: &Parsed, neutral: bool) -> Option<&ManifestInfo> {
        let list = self.by_scope.get(&scope_of(path))?;
        let key = |s: &str| {
            if neutral {
                lang_neutral(s)
            } else {
                s.to_string()
            }
        };
        let own = key(base_name(&d.doc.path));
        let r = d.meta.manifest_ref.as_deref().map(|r| key(base_name(r)));
        list.iter().find(|m| {
            m.names.iter().any(|n| key(n) == own)
                || r.as_ref()
                    .is_some_and(|r| *r == key(&m.name) || m.names.iter().any(|n| key(n) == *r))
        })
    }

    /// Fill CELEX/date/title (and the type, when unknown) of a body/annex from its package's manifest.
    pub fn attach_one(&self, path: &Path, p: &mut Parsed) {
        if p.doc.doc_type == DocType::Manifest || self.by_scope.is_empty() {
            return;
        }
        let same = self.find(path, p, false);
        let m = match same {
            Some(m) => Some((m, true)),
            None => self.find(path, p, true).map(|m| (m, false)),
        };
        let Some((m, same_lang)) = m else { return };
        if let Some(c) = &m.celex {
            if p.meta.celex_source < m.celex_source && p.doc.root != "CORR" {
                p.doc.celex = Some(c.clone());
                p.meta.celex_source = m.celex_source;
            }
        }
        if p.doc.date.is_none() {
            p.doc.date = m.date.clone();
        }
        if same_lang {
            if p.doc.title.is_none() {
                p.doc.title = m.title.clone();
            }
            if p.doc.lang.is_none() {
                p.doc.lang = m.lang.clone();
            }
        }
        if matches!(
            p.doc.doc_type,
            DocType::Other | DocType::Regulation | DocType::Directive | DocType::Decision
        ) {
            p.doc.doc_type =
                formex::doc_type_for(&p.doc.root, p.doc.celex.as_deref(), p.doc.title.as_deref());
        }
    }
}

/// The act package of every input file, for `eval.holdout`: a manifest and the files it lists (`REF.PHYS`: body,
/// annexes) form one package, whose key is its first part's name with the language code blanked, so that every
/// language version of an act (each with its own manifest, or a translation without one in the same directory)
/// has the same key. A manifest of the file's own directory decides first; a file none of them claims goes with the
/// manifest of another directory that lists it in some language (a corpus with a directory per language where a
/// language version has no manifest of its own, or a manifest listing files kept elsewhere: its annexes would
/// otherwise be packages of their own, and land on the other side from their act). A file no manifest claims is its
/// own package, keyed by its own language-neutral name, which for an act's body is the key its package would have.
#[derive(Debug, Default, Clone)]
pub struct PackageKeys {
    exact: HashMap<(PathBuf, String), String>,
    neutral: HashMap<(PathBuf, String), String>,
    /// Manifest names without their `.doc.…` ending (`L_202401689__`): tables of contents (`….toc.fmx.xml`) are not
    /// listed by manifests but are named after them.
    stems: HashMap<(PathBuf, String), String>,
    /// `neutral` and `stems` over every directory (the first directory in path order wins a name).
    neutral_any: HashMap<String, String>,
    stems_any: HashMap<String, String>,
    /// Manifests with Cellar names (`DOC_1.xml`, `<id>__DOC_1.xml` flattened), by the name's part before `DOC_`
    /// (lower case): Cellar renames an act's files `DOC_1.xml`, `DOC_2.xml`, … (one directory per act and language),
    /// so its manifest lists names the files do not have, and the files' own names are the same for every act.
    cellar: HashMap<(PathBuf, String), String>,
}

impl PackageKeys {
    pub fn key_of(&self, path: &Path) -> String {
        // A zip is one package: the key of the manifest inside (as its files would have, unpacked).
        if container_by_name(path) == Container::Zip {
            if let Some(k) = zip_package_key(path) {
                return k;
            }
        }
        let scope = scope_of(path);
        let full = path.to_string_lossy();
        let name = uncompressed(base_name(&full));
        if let Some(k) = self.exact.get(&(scope.clone(), name.to_string())) {
            return k.clone();
        }
        let neutral = formex::lang_neutral_name(name);
        if let Some(k) = self.neutral.get(&(scope.clone(), neutral.clone())) {
            return k.clone();
        }
        if let Some(prefix) = cellar_prefix(name) {
            if let Some(k) = self
                .cellar
                .get(&(scope.clone(), prefix.to_ascii_lowercase()))
            {
                return k.clone();
            }
        }
        let stem = manifest_stem(name).map(formex::lang_neutral_name);
        if let Some(k) = stem
            .as_ref()
            .and_then(|s| self.stems.get(&(scope, s.clone())))
        {
            return k.clone();
        }
        if let Some(k) = self.neutral_any.get(&neutral) {
            return k.clone();
        }
        if let Some(stem) = stem {
            if let Some(k) = self.stems_any.get(&stem) {
                return k.clone();
            }
            // `32024R2847-toc-formex.xml` belongs with `32024R2847-formex.xml`.
            for (marker, with) in [(".toc.", "."), ("-toc-", "-")] {
                if let Some(i) = neutral.find(marker) {
                    let mut s = neutral.clone();
                    s.replace_range(i..i + marker.len(), with);
                    return s;
                }
            }
        }
        neutral
    }
}

/// The package key of a zip package ([`PackageKeys`]): its manifest's first part, language-neutral, so that a zip of
/// one language version and the unpacked files of another have the same key; without a manifest, its first FORMEX
/// member's name. Reads the zip's directory and its (small) manifest members only. None when it is not a readable
/// zip (the zip's own name is the key then; the reader reports the file).
fn zip_package_key(path: &Path) -> Option<String> {
    let f = File::open(path).ok()?;
    let mut z = zip::ZipArchive::new(std::io::BufReader::new(f)).ok()?;
    let mut names: Vec<(String, usize)> = (0..z.len())
        .filter_map(|i| z.name_for_index(i).map(|n| (n.to_string(), i)))
        .filter(|(n, _)| is_zip_formex_member(n))
        .collect();
    names.sort();
    for (n, i) in &names {
        if !looks_like_manifest(Path::new(n)) {
            continue;
        }
        let mpath = format!("{}!{n}", path.display());
        let Ok(member) = z.by_index(*i) else { continue };
        let Ok(bytes) =
            read_limited(member, &mpath, 16 << 20).and_then(|b| decompress(Path::new(&mpath), b))
        else {
            continue;
        };
        let first = formex::parse_detailed(&mpath, &bytes).ok().and_then(|v| {
            v.into_iter()
                .find(|p| p.doc.root == "DOC")
                .and_then(|p| p.meta.parts.first().cloned())
        });
        if let Some(first) = first {
            return Some(formex::lang_neutral_name(uncompressed(base_name(&first))));
        }
    }
    names
        .iter()
        .map(|(n, _)| base_name(n))
        .find(|n| !looks_like_manifest(Path::new(n)))
        .map(|n| formex::lang_neutral_name(uncompressed(n)))
}

/// A file name without its compression suffix (`x.xml.zst` and `x.xml` are the same file of an act).
fn uncompressed(name: &str) -> &str {
    [".zst", ".gz"]
        .iter()
        .find_map(|e| name.strip_suffix(e))
        .unwrap_or(name)
}

/// The part of a Cellar file name before its `DOC_<n>.xml` ending (`""` for `DOC_2.xml`, `x__` for `x__DOC_2.xml`).
fn cellar_prefix(name: &str) -> Option<&str> {
    let lower = name.to_ascii_lowercase();
    let i = lower.rfind("doc_")?;
    let n = lower[i + 4..].strip_suffix(".xml")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| &name[..i])
}

/// The part of a manifest's or table of contents' name before its `.doc.`/`.toc.`/`-toc-` marker.
fn manifest_stem(name: &str) -> Option<&str> {
    let lower = name.to_ascii_lowercase();
    [".doc.", ".toc.", "-toc-"]
        .iter()
        .filter_map(|m| lower.find(m))
        .min()
        .map(|i| &name[..i])
}

// ---------------------------------------------------------------------------------------------------------------------
// Sniffing

/// Up to `n` decompressed bytes from the start of a file (first xml member for a zip), with the member's path.
fn head_bytes(path: &Path, n: usize) -> Option<(String, Vec<u8>)> {
    let mut f = File::open(path).ok()?;
    let mut magic = [0u8; 4];
    let got = f.read(&mut magic).ok()?;
    let kind = container(&magic[..got], path);
    drop(f);
    let take = |r: &mut dyn Read| -> Vec<u8> {
        let mut buf = Vec::with_capacity(n);
        let _ = r.take(n as u64).read_to_end(&mut buf);
        buf
    };
    let p = path.display().to_string();
    match kind {
        Container::Plain => Some((p, take(&mut File::open(path).ok()?))),
        Container::Zstd => Some((
            p,
            take(&mut zstd::stream::read::Decoder::new(File::open(path).ok()?).ok()?),
        )),
        Container::Gzip => Some((
            p,
            take(&mut flate2::read::MultiGzDecoder::new(
                File::open(path).ok()?,
            )),
        )),
        Container::Zip => {
            let mut z = zip::ZipArchive::new(File::open(path).ok()?).ok()?;
            let mut names: Vec<(String, usize)> = (0..z.len())
                .filter_map(|i| z.name_for_index(i).map(|s| (s.to_string(), i)))
                .filter(|(s, _)| is_zip_formex_member(s))
                .collect();
            names.sort();
            let (name, i) = names.into_iter().next()?;
            let mut m = z.by_index(i).ok()?;
            let lower = name.to_ascii_lowercase();
            let head = if lower.ends_with(".gz") {
                take(&mut flate2::read::MultiGzDecoder::new(m))
            } else if lower.ends_with(".zst") {
                take(&mut zstd::stream::read::Decoder::new(m).ok()?)
            } else {
                take(&mut m)
            };
            Some((format!("{p}!{name}"), head))
        }
    }
}

fn tag_text<'a>(hay: &'a str, tag: &str) -> Option<&'a str> {
    let i = hay.find(tag)? + tag.len();
    let rest = &hay[i..];
    let j = rest.find('<')?;
    Some(rest[..j].trim())
}

/// Cheap language guess for lane assignment: the file (or first zip member) name, else the first `<LG.DOC>` (then
/// `<LG.OJ>`) in the first 64 KB. Lower-case ISO 639-1.
pub fn sniff_lang(path: &Path) -> Option<String> {
    if is_qa_jsonl(path) {
        // The first pair's language (the reader checks that every line has it).
        let raw = std::fs::read(path).ok()?;
        let bytes = decompress(path, raw).ok()?;
        let first = bytes
            .split(|&b| b == b'\n')
            .find(|l| !l.iter().all(u8::is_ascii_whitespace))?;
        let v: serde_json::Value = serde_json::from_slice(first).ok()?;
        return v.get("lang")?.as_str().and_then(formex::norm_lang);
    }
    if let Some(l) = formex::lang_from_filename(&path.display().to_string()) {
        if container_by_name(path) != Container::Zip {
            return Some(l);
        }
    }
    let (name, head) = head_bytes(path, 64 * 1024)?;
    if let Some(l) = formex::lang_from_filename(&name) {
        return Some(l);
    }
    let s = String::from_utf8_lossy(&head);
    tag_text(&s, "<LG.DOC>")
        .and_then(formex::norm_lang)
        .or_else(|| tag_text(&s, "<LG.OJ>").and_then(formex::norm_lang))
}

fn container_by_name(path: &Path) -> Container {
    if path
        .to_string_lossy()
        .to_ascii_lowercase()
        .ends_with(".zip")
    {
        Container::Zip
    } else {
        Container::Plain
    }
}

/// The root element name of a file (first 4 KB), if any.
pub fn sniff_root(path: &Path) -> Option<String> {
    let (_, head) = head_bytes(path, 4096)?;
    let s = String::from_utf8_lossy(&head);
    let mut rest: &str = &s;
    loop {
        let i = rest.find('<')?;
        rest = &rest[i + 1..];
        if rest.starts_with('?') || rest.starts_with('!') {
            continue;
        }
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(rest.len());
        return Some(rest[..end].to_string());
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Quarantine

/// Records bad inputs: one JSON line `{path, line, column, byte_offset, reason, hint}` per file (when a file is
/// given), and increments `lexflow_reader_quarantined_files_total`. Shareable between reader threads.
pub struct Quarantine {
    out: Option<Mutex<BufWriter<File>>>,
    count: AtomicU64,
}

impl Quarantine {
    /// Append to `path` (created with its parent directories).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        if let Some(d) = path.parent() {
            if !d.as_os_str().is_empty() {
                std::fs::create_dir_all(d)?;
            }
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Quarantine {
            out: Some(Mutex::new(BufWriter::new(f))),
            count: AtomicU64::new(0),
        })
    }

    /// Count only (no file).
    pub fn counting() -> Self {
        Quarantine {
            out: None,
            count: AtomicU64::new(0),
        }
    }

    pub fn record(&self, e: &ReadError) {
        self.count.fetch_add(1, Ordering::Relaxed);
        lexflow_metrics::global().reader_quarantined.inc();
        tracing::warn!(target: "lexflow::reader", "quarantined {e}");
        if let Some(out) = &self.out {
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(w, "{}", e.to_json());
            let _ = w.flush();
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// CLI

/// The JSON line `lexflow parse --jsonl` prints for a document.
pub fn doc_json(d: &Document) -> serde_json::Value {
    serde_json::json!({
        "path": d.path,
        "root": d.root,
        "celex": d.celex,
        "lang": d.lang,
        "doc_type": d.doc_type.as_str(),
        "date": d.date,
        "title": d.title,
        "articles": d.articles.len(),
        "chars": d.text.chars().count(),
    })
}

/// `lexflow parse --jsonl PATH...`: one JSON object per document, `{path, error, …}` per bad file; exit 0 unless the
/// command was misused (a path matching nothing → exit 2).
pub fn cli_parse(paths: &[String]) -> anyhow::Result<ExitCode> {
    let files = match expand_inputs(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lexflow parse: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let stdout = std::io::stdout();
    let mut w = BufWriter::new(stdout.lock());
    let q = Quarantine::counting();
    for (_, r) in read_files_with_manifests(&files) {
        let lines: Vec<serde_json::Value> = match r {
            Ok(docs) => docs.iter().map(doc_json).collect(),
            Err(e) => {
                q.record(&e);
                let mut j = e.to_json();
                j["error"] = serde_json::Value::String(e.to_string());
                vec![j]
            }
        };
        for j in lines {
            if writeln!(w, "{j}").is_err() {
                return Ok(ExitCode::SUCCESS); // closed pipe
            }
        }
    }
    let _ = w.flush();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"<ACT><BIB.INSTANCE><DOCUMENT.REF FILE="L_2099001EN.01000101.doc.xml"/><LG.DOC>EN</LG.DOC></BIB.INSTANCE><TITLE><TI><P>Act</P></TI></TITLE><ENACTING.TERMS><ARTICLE IDENTIFIER="001"><TI.ART>Article 1</TI.ART><ALINEA>x</ALINEA></ARTICLE></ENACTING.TERMS></ACT>"#;
    const ANNEX: &str = r#"<ANNEX><BIB.INSTANCE><DOCUMENT.REF FILE="L_2099001EN.01000101.doc.xml"/><LG.DOC>EN</LG.DOC></BIB.INSTANCE><TITLE><TI><P>ANNEX</P></TI></TITLE><CONTENTS><P>y</P></CONTENTS></ANNEX>"#;
    const MANIFEST: &str = r#"<DOC><BIB.DOC><NO.DOC><NO.CURRENT>12</NO.CURRENT><YEAR>2099</YEAR></NO.DOC></BIB.DOC><FMX><DOC.MAIN.PUB><LG.DOC>EN</LG.DOC><LEGAL.VALUE>DIR</LEGAL.VALUE><DATE ISO="20990102">x</DATE><REF.PHYS FILE="L_2099001EN.01000101.xml"/></DOC.MAIN.PUB><DOC.SUB.PUB><REF.PHYS FILE="L_2099001EN.01000201.xml"/></DOC.SUB.PUB></FMX></DOC>"#;

    #[test]
    fn reader_manifest_attachment_dir_and_zip() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("L_2099001EN.01000101.xml"), BODY).unwrap();
        std::fs::write(d.join("L_2099001EN.01000201.xml"), ANNEX).unwrap();
        std::fs::write(d.join("L_2099001EN.01000101.doc.xml"), MANIFEST).unwrap();
        std::fs::write(
            d.join("L_2099001DE.01000201.xml"),
            ANNEX.replace("EN", "DE"),
        )
        .unwrap();
        let files = expand_inputs(&[d.display().to_string()]).unwrap();
        assert_eq!(files.len(), 4);
        let r = read_files_with_manifests(&files);
        let docs: Vec<Document> = r.into_iter().flat_map(|(_, r)| r.unwrap()).collect();
        let by = |n: &str| docs.iter().find(|x| x.path.ends_with(n)).unwrap();
        assert_eq!(by("01000101.xml").celex.as_deref(), Some("32099L0012"));
        assert_eq!(by("01000101.xml").doc_type, DocType::Directive);
        assert_eq!(by("EN.01000201.xml").celex.as_deref(), Some("32099L0012"));
        assert_eq!(by("EN.01000201.xml").doc_type, DocType::Annex);
        assert_eq!(by("EN.01000201.xml").date.as_deref(), Some("2099-01-02"));
        assert_eq!(
            by("DE.01000201.xml").celex.as_deref(),
            Some("32099L0012"),
            "cross-language manifest"
        );
        assert_eq!(by("DE.01000201.xml").lang.as_deref(), Some("de"));
        assert_eq!(by("doc.xml").doc_type, DocType::Manifest);
        // the index built up front gives the same result
        let idx = ManifestIndex::build(&files);
        let a = read_file_indexed(&d.join("L_2099001EN.01000201.xml"), &idx).unwrap();
        assert_eq!(a[0].celex.as_deref(), Some("32099L0012"));

        // zip package, compressed singles
        let zpath = d.join("pkg.zip");
        {
            let mut z = zip::ZipWriter::new(File::create(&zpath).unwrap());
            let o = zip::write::SimpleFileOptions::default();
            for (n, c) in [
                ("L_2099001EN.01000201.xml", ANNEX),
                ("L_2099001EN.01000101.doc.xml", MANIFEST),
                ("readme.txt", "x"),
            ] {
                z.start_file(n, o).unwrap();
                z.write_all(c.as_bytes()).unwrap();
            }
            z.finish().unwrap();
        }
        let v = read_file(&zpath).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[1].path,
            format!("{}!L_2099001EN.01000201.xml", zpath.display())
        );
        assert_eq!(v[1].celex.as_deref(), Some("32099L0012"));
        assert_eq!(sniff_lang(&zpath).as_deref(), Some("en"));

        let zst = d.join("x.xml.zst");
        std::fs::write(&zst, zstd::encode_all(BODY.as_bytes(), 3).unwrap()).unwrap();
        assert_eq!(read_file(&zst).unwrap()[0].articles.len(), 1);
        assert_eq!(sniff_lang(&zst).as_deref(), Some("en"));
        let gz = d.join("y.xml.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(BODY.as_bytes()).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        assert_eq!(read_file(&gz).unwrap()[0].title.as_deref(), Some("Act"));
        let trunc = d.join("t.xml.zst");
        let full = zstd::encode_all(BODY.as_bytes(), 3).unwrap();
        std::fs::write(&trunc, &full[..full.len() / 2]).unwrap();
        assert!(matches!(
            read_file(&trunc),
            Err(ReadError::Decompress { .. }) | Err(ReadError::Parse { .. })
        ));
    }

    #[test]
    fn reader_expand_inputs_rules() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for n in [
            "b.xml",
            "a.xml.zst",
            "sub/c.fmx.xml",
            "sub/notes.md",
            "z.zip",
            "w.xml.gz",
        ] {
            std::fs::write(d.join(n), "x").unwrap();
        }
        let all = expand_inputs(&[
            d.display().to_string(),
            d.join("b.xml").display().to_string(),
        ])
        .unwrap();
        let names: Vec<_> = all
            .iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            ["a.xml.zst", "b.xml", "sub/c.fmx.xml", "w.xml.gz", "z.zip"]
        );
        let g = expand_inputs(&[format!("{}/**/*.xml", d.display())]).unwrap();
        assert_eq!(g.len(), 2);
        assert!(matches!(
            expand_inputs(&[format!("{}/nothing*.xml", d.display())]),
            Err(ReadError::NoMatch { .. })
        ));
        assert!(matches!(
            expand_inputs(&[d.join("missing.xml").display().to_string()]),
            Err(ReadError::NoMatch { .. })
        ));
    }

    #[test]
    fn reader_quarantine_writes_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.xml");
        std::fs::write(&bad, "<ACT>\n<P>oops</ACT>").unwrap();
        let e = read_file(&bad).unwrap_err();
        assert_eq!(e.line(), 2);
        let qp = dir.path().join("run/quarantine.jsonl");
        let q = Quarantine::create(&qp).unwrap();
        let before = lexflow_metrics::global().reader_quarantined.get();
        q.record(&e);
        assert!(lexflow_metrics::global().reader_quarantined.get() > before);
        let line = std::fs::read_to_string(&qp).unwrap();
        let j: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(j["path"], bad.display().to_string());
        assert_eq!(j["line"], 2);
        assert!(j["reason"].as_str().unwrap().contains("malformed"));
        assert!(!j["hint"].as_str().unwrap().is_empty());
    }

    /// `expand_inputs` in a thread, failing (instead of hanging the test run) when it does not finish in time.
    fn expand_within(patterns: Vec<String>) -> Result<Vec<PathBuf>, ReadError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(expand_inputs(&patterns));
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("expand_inputs did not finish in 30 s (a symlink loop walked again and again?)")
    }

    fn rel(d: &Path, v: &[PathBuf]) -> Vec<String> {
        v.iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect()
    }

    fn zip_of(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut z = zip::ZipWriter::new(File::create(path).unwrap());
        for (n, c) in members {
            z.start_file(*n, zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(c).unwrap();
        }
        z.finish().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn reader_expand_inputs_symlink_loop_lists_each_file_once() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("a.xml"), BODY).unwrap();
        std::fs::write(d.join("sub/b.xml"), BODY).unwrap();
        symlink(".", d.join("self")).unwrap();
        symlink("..", d.join("sub/up")).unwrap();
        symlink("a.xml", d.join("alias.xml")).unwrap(); // one file, two paths: the first in sorted order is kept
        let files = expand_within(vec![d.display().to_string()]).unwrap();
        assert_eq!(rel(d, &files), ["a.xml", "sub/b.xml"]);
        // the same file through a directory and an explicit path, a glob reaching through the loop
        let files = expand_within(vec![
            d.join("self/sub/b.xml").display().to_string(),
            d.display().to_string(),
            format!("{}/*/*.xml", d.display()),
        ])
        .unwrap();
        assert_eq!(rel(d, &files), ["a.xml", "self/sub/b.xml"]);
    }

    #[cfg(unix)]
    #[test]
    fn reader_expand_inputs_two_self_links_terminate() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.xml"), BODY).unwrap();
        symlink(".", d.join("s1")).unwrap();
        symlink(".", d.join("s2")).unwrap();
        let files = expand_within(vec![d.display().to_string()]).unwrap();
        assert_eq!(rel(d, &files), ["a.xml"]);
        // `**` through the links (the glob crate alone never returns here); a pattern matching only files already
        // found is not "no match"
        let files = expand_within(vec![
            d.display().to_string(),
            format!("{}/**/*.xml", d.display()),
            format!("{}/*.xml", d.display()),
            format!("{}/s*", d.display()),
        ])
        .unwrap();
        assert_eq!(rel(d, &files), ["a.xml"]);
    }

    #[cfg(unix)]
    #[test]
    fn reader_expand_inputs_fifo_is_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let mkfifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("in");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("a.xml"), BODY).unwrap();
        let fifo = d.join("pipe.xml");
        mkfifo(&fifo);
        for pattern in [
            d.display().to_string(),
            fifo.display().to_string(),
            format!("{}/*.xml", d.display()),
        ] {
            let e = expand_within(vec![pattern.clone()]).unwrap_err();
            assert!(matches!(e, ReadError::Unusable { .. }), "{pattern}: {e}");
            assert_eq!(e.path(), fifo.display().to_string(), "{pattern}");
            let msg = e.to_string();
            assert!(msg.contains("not a regular file (a FIFO)"), "{msg}");
            assert!(msg.contains("remove it from the input"), "{msg}");
        }
        // a FIFO without an input extension inside a directory is not an input: ignored like `notes.md`
        let d2 = dir.path().join("other");
        std::fs::create_dir(&d2).unwrap();
        std::fs::write(d2.join("a.xml"), BODY).unwrap();
        mkfifo(&d2.join("control.fifo"));
        let files = expand_within(vec![d2.display().to_string()]).unwrap();
        assert_eq!(rel(&d2, &files), ["a.xml"]);
    }

    #[test]
    fn reader_zip_without_xml_member_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let only_txt = d.join("only_txt.zip");
        zip_of(
            &only_txt,
            &[("a.txt", b"x".to_vec()), ("img/p1.tif", b"x".to_vec())],
        );
        let empty = d.join("empty.zip");
        zip_of(&empty, &[]);
        let nested = d.join("nested.zip");
        let mut inner = Vec::new();
        {
            let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut inner));
            z.start_file("x.xml", zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(BODY.as_bytes()).unwrap();
            z.finish().unwrap();
        }
        zip_of(&nested, &[("inner.zip", inner)]);
        for (zpath, names) in [
            (&only_txt, &["a.txt", "img/p1.tif"][..]),
            (&empty, &[][..]),
            (&nested, &["inner.zip"][..]),
        ] {
            let e = read_file(zpath).unwrap_err();
            assert!(matches!(e, ReadError::Unusable { .. }), "{e}");
            assert_eq!(e.path(), zpath.display().to_string());
            let msg = e.to_string();
            for n in names {
                assert!(msg.contains(n), "{msg} should name {n}");
            }
            assert!(msg.contains("zip"), "{msg}");
            assert!(!e.hint().is_empty());
        }
        // `lexflow parse` (read_files_with_manifests) reports it as a bad file, not as nothing at all
        let r = read_files_with_manifests(std::slice::from_ref(&only_txt));
        assert!(r[0].1.is_err());
    }

    #[test]
    fn reader_zip_mixed_members_reads_xml_and_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let zpath = dir.path().join("pkg.zip");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(BODY.as_bytes()).unwrap();
        zip_of(
            &zpath,
            &[
                ("doc.xml", BODY.as_bytes().to_vec()),
                ("a.txt", b"x".to_vec()),
                ("b.fmx", b"x".to_vec()),
                ("c.xml.gz", gz.finish().unwrap()),
                ("d.xml.zst", zstd::encode_all(BODY.as_bytes(), 3).unwrap()),
            ],
        );
        let v = read_file(&zpath).unwrap();
        let members: Vec<_> = v
            .iter()
            .map(|d| d.path.rsplit('!').next().unwrap())
            .collect();
        assert_eq!(members, ["c.xml.gz", "d.xml.zst", "doc.xml"]);
        assert!(v.iter().all(|d| d.title.as_deref() == Some("Act")));
        assert!(v.iter().all(|d| d.articles.len() == 1));
        // sniffing sees the first member, decompressed
        assert_eq!(sniff_root(&zpath).as_deref(), Some("ACT"));
    }
}
