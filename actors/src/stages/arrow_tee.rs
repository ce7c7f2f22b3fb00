//! Arrow IPC tee of packed sequences: one Arrow IPC **file** (random-access format, zstd-compressed buffers) per logical
//! shard, `shard-00007.arrow`, so a run's exact training stream can be inspected or re-read by other tools (pyarrow,
//! polars, DuckDB) without re-running the pipeline.
//!
//! Schema (one row per [`PackedSequence`]):
//!
//! | column       | type                                                                              |
//! |--------------|-----------------------------------------------------------------------------------|
//! | `index`      | `UInt64`                                                                          |
//! | `shard`      | `UInt32`                                                                          |
//! | `tokens`     | `List<UInt32>` (`seq_len + 1` ids)                                                |
//! | `doc_starts` | `List<UInt32>`                                                                    |
//! | `padding`    | `UInt32`                                                                          |
//! | `pieces`     | `List<Struct{lane: UInt16, file: UInt32, ordinal: UInt32, start, end, offset: UInt32}>` |
//! | `no_loss`    | `List<UInt32>`: input positions whose target the loss ignores (prompt tokens of instruction data), as flat `[start, end)` pairs; empty for ordinary documents (format version 2; absent in version-1 files, read as empty) |
//!
//! Schema metadata holds a single key, [`META_KEY`] (`"lexflow"`), whose value is a JSON object
//! `{"format_version", "seq_len", "tokenizer", "run", "shard", "shards"}`. A single key (rather than one key per
//! field) keeps the files byte-for-byte deterministic: arrow-rs serializes schema metadata from a `HashMap`, whose
//! iteration order changes from process to process.
//!
//! Files are written as `shard-NNNNN.arrow.partial` and renamed on [`ArrowTee::finish`]; a tee dropped without
//! `finish` (crash, error) leaves only `.partial` files, never a truncated file under the final name. Before every
//! checkpoint the trainer makes the tee durable up to the checkpoint's position ([`SharedTee::sync`]), and a resumed
//! run turns the `.partial` files a killed run left into complete files ([`recover_partials`]), so the parts of a
//! run that was killed and resumed still hold every sequence it trained.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use arrow_array::builder::{
    ArrayBuilder, ListBuilder, StructBuilder, UInt16Builder, UInt32Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, UInt32Array, UInt64Array};
use arrow_ipc::reader::FileReader;
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_ipc::CompressionType;
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::types::{DocId, PackedSequence, Piece};

/// Rows buffered per shard before a record batch is written.
pub const BATCH_ROWS: usize = 64;
/// The schema-metadata key holding the JSON [`TeeFileMeta`].
pub const META_KEY: &str = "lexflow";
/// Version of the column layout; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 2;

/// Run-level facts recorded in every shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeeMeta {
    /// Sequence length (`tokens` has `seq_len + 1` entries per row).
    pub seq_len: usize,
    /// Tokenizer name or path (what `lexflow inspect --tokenizer` should be given).
    pub tokenizer: String,
    pub run: String,
}

/// What one shard file's metadata says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeeFileMeta {
    pub format_version: u32,
    pub seq_len: usize,
    pub tokenizer: String,
    pub run: String,
    pub shard: u32,
    pub shards: u32,
}

/// What [`ArrowTee::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TeeSummary {
    pub dir: PathBuf,
    /// One file per logical shard, in shard order (shards without rows still get a valid, empty file).
    pub files: Vec<PathBuf>,
    pub rows_per_shard: Vec<u64>,
    pub sequences: u64,
    pub batches: u64,
    /// Total bytes of the finished files.
    pub bytes: u64,
    /// The first sequence index of this part (0, or the resume position).
    pub first_index: u64,
    /// Unfinished parts of an earlier, killed run that this run completed ([`recover_partials`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovered: Vec<Recovered>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArrowTeeError {
    #[error("arrow tee: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("arrow tee: {path}: {source}")]
    Arrow { path: PathBuf, source: ArrowError },
    #[error("arrow tee: shard count must be at least 1")]
    NoShards,
    #[error(
        "arrow tee: sequence {index} is routed to shard {shard}, but the tee has {shards} shards"
    )]
    ShardOutOfRange {
        index: u64,
        shard: u32,
        shards: usize,
    },
    #[error("arrow tee: sequence {index} has {got} tokens, expected seq_len + 1 = {expected}")]
    WrongLength {
        index: u64,
        got: usize,
        expected: usize,
    },
    #[error("arrow tee: {path}: {message}")]
    Format { path: PathBuf, message: String },
}

fn piece_fields() -> Fields {
    Fields::from(vec![
        Field::new("lane", DataType::UInt16, false),
        Field::new("file", DataType::UInt32, false),
        Field::new("ordinal", DataType::UInt32, false),
        Field::new("start", DataType::UInt32, false),
        Field::new("end", DataType::UInt32, false),
        Field::new("offset", DataType::UInt32, false),
    ])
}

fn u32_item() -> FieldRef {
    Arc::new(Field::new("item", DataType::UInt32, false))
}

fn piece_item() -> FieldRef {
    Arc::new(Field::new("item", DataType::Struct(piece_fields()), false))
}

/// The tee's schema (without metadata).
pub fn schema_fields() -> Vec<Field> {
    vec![
        Field::new("index", DataType::UInt64, false),
        Field::new("shard", DataType::UInt32, false),
        Field::new("tokens", DataType::List(u32_item()), false),
        Field::new("doc_starts", DataType::List(u32_item()), false),
        Field::new("padding", DataType::UInt32, false),
        Field::new("pieces", DataType::List(piece_item()), false),
        Field::new("no_loss", DataType::List(u32_item()), false),
    ]
}

/// `dir/shard-00007.arrow`.
pub fn shard_file_name(shard: usize) -> String {
    format!("shard-{shard:05}.arrow")
}

/// The file of a shard's part that starts at sequence `first_index`: [`shard_file_name`] for a run's first part,
/// `shard-00007.from-000000001234.arrow` for the part a resumed run writes (its earlier parts stay).
pub fn part_file_name(shard: usize, first_index: u64) -> String {
    match first_index {
        0 => shard_file_name(shard),
        i => format!("shard-{shard:05}.from-{i:012}.arrow"),
    }
}

/// Column buffers of the rows not yet written.
#[derive(Default)]
struct Rows {
    index: Vec<u64>,
    shard: Vec<u32>,
    tokens: Vec<u32>,
    token_lens: Vec<usize>,
    doc_starts: Vec<u32>,
    doc_start_lens: Vec<usize>,
    padding: Vec<u32>,
    lane: Vec<u16>,
    file: Vec<u32>,
    ordinal: Vec<u32>,
    start: Vec<u32>,
    end: Vec<u32>,
    offset: Vec<u32>,
    piece_lens: Vec<usize>,
    no_loss: Vec<u32>,
    no_loss_lens: Vec<usize>,
}

impl Rows {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn push(&mut self, s: &PackedSequence) {
        self.index.push(s.index);
        self.shard.push(s.shard);
        self.tokens.extend_from_slice(&s.tokens);
        self.token_lens.push(s.tokens.len());
        self.doc_starts.extend_from_slice(&s.doc_starts);
        self.doc_start_lens.push(s.doc_starts.len());
        self.padding.push(s.padding);
        for p in &s.pieces {
            self.lane.push(p.doc.lane);
            self.file.push(p.doc.file);
            self.ordinal.push(p.doc.ordinal);
            self.start.push(p.start);
            self.end.push(p.end);
            self.offset.push(p.offset);
        }
        self.piece_lens.push(s.pieces.len());
        self.no_loss.extend(s.no_loss.iter().flatten());
        self.no_loss_lens.push(2 * s.no_loss.len());
    }

    /// Builds a record batch from the buffered rows and empties the buffers.
    fn take_batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        let r = std::mem::take(self);
        let list_u32 = |values: &[u32], lens: &[usize]| -> ArrayRef {
            let mut b =
                ListBuilder::with_capacity(UInt32Builder::with_capacity(values.len()), lens.len())
                    .with_field(u32_item());
            let mut at = 0;
            for &n in lens {
                b.values().append_slice(&values[at..at + n]);
                b.append(true);
                at += n;
            }
            Arc::new(b.finish())
        };
        let n_pieces = r.lane.len();
        let mut pb = ListBuilder::with_capacity(
            StructBuilder::new(
                piece_fields(),
                vec![
                    Box::new(UInt16Builder::with_capacity(n_pieces)) as Box<dyn ArrayBuilder>,
                    Box::new(UInt32Builder::with_capacity(n_pieces)),
                    Box::new(UInt32Builder::with_capacity(n_pieces)),
                    Box::new(UInt32Builder::with_capacity(n_pieces)),
                    Box::new(UInt32Builder::with_capacity(n_pieces)),
                    Box::new(UInt32Builder::with_capacity(n_pieces)),
                ],
            ),
            r.piece_lens.len(),
        )
        .with_field(piece_item());
        let mut k = 0;
        for &n in &r.piece_lens {
            let sb = pb.values();
            for j in k..k + n {
                field::<UInt16Builder>(sb, 0).append_value(r.lane[j]);
                field::<UInt32Builder>(sb, 1).append_value(r.file[j]);
                field::<UInt32Builder>(sb, 2).append_value(r.ordinal[j]);
                field::<UInt32Builder>(sb, 3).append_value(r.start[j]);
                field::<UInt32Builder>(sb, 4).append_value(r.end[j]);
                field::<UInt32Builder>(sb, 5).append_value(r.offset[j]);
                sb.append(true);
            }
            pb.append(true);
            k += n;
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(r.index)),
            Arc::new(UInt32Array::from(r.shard)),
            list_u32(&r.tokens, &r.token_lens),
            list_u32(&r.doc_starts, &r.doc_start_lens),
            Arc::new(UInt32Array::from(r.padding)),
            Arc::new(pb.finish()),
            list_u32(&r.no_loss, &r.no_loss_lens),
        ];
        RecordBatch::try_new(schema.clone(), columns)
    }
}

fn field<T: ArrayBuilder>(sb: &mut StructBuilder, i: usize) -> &mut T {
    sb.field_builder::<T>(i)
        .expect("pieces struct builder has the declared field types")
}

struct ShardFile {
    partial: PathBuf,
    path: PathBuf,
    writer: FileWriter<BufWriter<File>>,
    schema: SchemaRef,
    rows: Rows,
    written: u64,
    batches: u64,
}

impl ShardFile {
    fn flush(&mut self) -> Result<(), ArrowTeeError> {
        if self.rows.len() == 0 {
            return Ok(());
        }
        let batch = self
            .rows
            .take_batch(&self.schema)
            .map_err(|source| ArrowTeeError::Arrow {
                path: self.path.clone(),
                source,
            })?;
        self.writer
            .write(&batch)
            .map_err(|source| ArrowTeeError::Arrow {
                path: self.partial.clone(),
                source,
            })?;
        self.batches += 1;
        Ok(())
    }
}

/// The tee: buffers rows per shard and writes a zstd-compressed record batch every [`BATCH_ROWS`] rows.
pub struct ArrowTee {
    dir: PathBuf,
    first_index: u64,
    recovered: Vec<Recovered>,
    meta: TeeMeta,
    shards: Vec<ShardFile>,
    batch_rows: usize,
}

impl ArrowTee {
    /// Creates `dir` (and parents) and one `shard-NNNNN.arrow.partial` per logical shard.
    pub fn create(dir: &Path, shards: usize, meta: TeeMeta) -> Result<Self, ArrowTeeError> {
        Self::create_part(dir, shards, meta, 0)
    }

    /// [`Self::create`] for the part of the stream from sequence `first_index` on ([`part_file_name`]): a resumed
    /// run adds its part next to the earlier ones instead of replacing them. The parts may share a few indices
    /// (sequences prepared but not trained before the stop); a given index always holds the same sequence. A fresh
    /// run (`first_index` 0) removes the parts an earlier run left in `dir`.
    pub fn create_part(
        dir: &Path,
        shards: usize,
        meta: TeeMeta,
        first_index: u64,
    ) -> Result<Self, ArrowTeeError> {
        if shards == 0 {
            return Err(ArrowTeeError::NoShards);
        }
        std::fs::create_dir_all(dir).map_err(|source| ArrowTeeError::Io {
            op: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let options = IpcWriteOptions::default()
            .try_with_compression(Some(CompressionType::ZSTD))
            .map_err(|source| ArrowTeeError::Arrow {
                path: dir.to_path_buf(),
                source,
            })?;
        let mut recovered = Vec::new();
        if first_index == 0 {
            // A run from the start rewrites the whole stream: no file of an earlier run may stay next to it.
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if is_tee_file(&name) {
                        tracing::info!(file = %e.path().display(), "removing an earlier run's tee file");
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        } else {
            // Parts this run writes again from the same index are simply rewritten; the others are recovered.
            let mine: Vec<String> = (0..shards)
                .map(|k| part_file_name(k, first_index) + ".partial")
                .collect();
            recovered = recover_partials(dir, &mine)?;
        }
        let mut files = Vec::with_capacity(shards);
        for shard in 0..shards {
            let path = dir.join(part_file_name(shard, first_index));
            let partial = path.with_extension("arrow.partial");
            let file_meta = TeeFileMeta {
                format_version: FORMAT_VERSION,
                seq_len: meta.seq_len,
                tokenizer: meta.tokenizer.clone(),
                run: meta.run.clone(),
                shard: shard as u32,
                shards: shards as u32,
            };
            let json = serde_json::to_string(&file_meta).expect("TeeFileMeta serializes");
            let schema: SchemaRef = Arc::new(
                Schema::new(schema_fields())
                    .with_metadata(HashMap::from([(META_KEY.to_string(), json)])),
            );
            let f = File::create(&partial).map_err(|source| ArrowTeeError::Io {
                op: "create",
                path: partial.clone(),
                source,
            })?;
            let writer = FileWriter::try_new_with_options(
                BufWriter::with_capacity(1 << 20, f),
                &schema,
                options.clone(),
            )
            .map_err(|source| ArrowTeeError::Arrow {
                path: partial.clone(),
                source,
            })?;
            files.push(ShardFile {
                partial,
                path,
                writer,
                schema,
                rows: Rows::default(),
                written: 0,
                batches: 0,
            });
        }
        Ok(ArrowTee {
            dir: dir.to_path_buf(),
            first_index,
            recovered,
            meta,
            shards: files,
            batch_rows: BATCH_ROWS,
        })
    }

    /// Rows per record batch (default [`BATCH_ROWS`]; at least 1).
    pub fn with_batch_rows(mut self, rows: usize) -> Self {
        self.batch_rows = rows.max(1);
        self
    }

    pub fn meta(&self) -> &TeeMeta {
        &self.meta
    }

    /// Buffers one sequence in its shard's file; writes a batch when the shard has [`BATCH_ROWS`] rows.
    pub fn write(&mut self, seq: &PackedSequence) -> Result<(), ArrowTeeError> {
        let n = self.shards.len();
        let Some(sf) = self.shards.get_mut(seq.shard as usize) else {
            return Err(ArrowTeeError::ShardOutOfRange {
                index: seq.index,
                shard: seq.shard,
                shards: n,
            });
        };
        if seq.tokens.len() != self.meta.seq_len + 1 {
            return Err(ArrowTeeError::WrongLength {
                index: seq.index,
                got: seq.tokens.len(),
                expected: self.meta.seq_len + 1,
            });
        }
        sf.rows.push(seq);
        sf.written += 1;
        if sf.rows.len() >= self.batch_rows {
            sf.flush()?;
        }
        Ok(())
    }

    /// Writes every buffered row of every shard as a record batch and makes the files durable (flush + fsync), so
    /// that a `.partial` file left by a kill holds at least the sequences written so far ([`recover_partials`]).
    pub fn sync(&mut self) -> Result<(), ArrowTeeError> {
        for sf in &mut self.shards {
            sf.flush()?;
            sf.writer.flush().map_err(|source| ArrowTeeError::Arrow {
                path: sf.partial.clone(),
                source,
            })?;
            sf.writer
                .get_mut()
                .get_mut()
                .sync_data()
                .map_err(|source| ArrowTeeError::Io {
                    op: "sync",
                    path: sf.partial.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Writes the remaining rows, the footers, syncs and renames every file to its final name.
    pub fn finish(self) -> Result<TeeSummary, ArrowTeeError> {
        let mut summary = TeeSummary {
            dir: self.dir.clone(),
            files: Vec::with_capacity(self.shards.len()),
            rows_per_shard: Vec::with_capacity(self.shards.len()),
            sequences: 0,
            batches: 0,
            bytes: 0,
            first_index: self.first_index,
            recovered: self.recovered,
        };
        for mut sf in self.shards {
            sf.flush()?;
            sf.writer.finish().map_err(|source| ArrowTeeError::Arrow {
                path: sf.partial.clone(),
                source,
            })?;
            let mut bw = sf
                .writer
                .into_inner()
                .map_err(|source| ArrowTeeError::Arrow {
                    path: sf.partial.clone(),
                    source,
                })?;
            bw.flush().map_err(|source| ArrowTeeError::Io {
                op: "write",
                path: sf.partial.clone(),
                source,
            })?;
            let f = bw.into_inner().map_err(|e| ArrowTeeError::Io {
                op: "write",
                path: sf.partial.clone(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(|source| ArrowTeeError::Io {
                op: "sync",
                path: sf.partial.clone(),
                source,
            })?;
            let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
            drop(f);
            std::fs::rename(&sf.partial, &sf.path).map_err(|source| ArrowTeeError::Io {
                op: "rename",
                path: sf.partial.clone(),
                source,
            })?;
            summary.sequences += sf.written;
            summary.batches += sf.batches;
            summary.bytes += bytes;
            summary.rows_per_shard.push(sf.written);
            summary.files.push(sf.path);
        }
        Ok(summary)
    }
}

/// A file the tee writes: `shard-….arrow`, its `.partial`, or a recovery's temporary file.
fn is_tee_file(name: &str) -> bool {
    name.starts_with("shard-")
        && (name.ends_with(".arrow")
            || name.ends_with(".arrow.partial")
            || name.ends_with(".arrow.recovering"))
}

/// What [`recover_partials`] made of one `.partial` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovered {
    pub file: PathBuf,
    /// Rows of the record batches that were complete on disk.
    pub rows: u64,
    /// Smallest and largest sequence index among them.
    pub indices: Option<(u64, u64)>,
}

/// The IPC file format starts with this magic (then zero padding); the IPC *stream* of the batches follows.
const ARROW_FILE_MAGIC: &[u8; 6] = b"ARROW1";

/// Turns the `shard-….arrow.partial` files that a killed run left in `dir` into complete Arrow IPC files under
/// their final names: every record batch that reached the disk whole is kept (the tee made them durable up to the
/// checkpoint the run resumes from: [`SharedTee::sync`]), a torn last batch is dropped. The sequences they hold are
/// the same a rerun would produce (an index always holds the same sequence). Files named in `skip` (the parts the
/// resumed run rewrites from the same index) are left alone. A partial file without a single complete batch is
/// removed. Crash-safe: the new file is written as `….arrow.recovering`, synced and renamed, and only then is the
/// partial file removed; a partial whose final file already exists was recovered before and is removed.
pub fn recover_partials(dir: &Path, skip: &[String]) -> Result<Vec<Recovered>, ArrowTeeError> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut partials: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("shard-")
                    && n.ends_with(".arrow.partial")
                    && !skip.iter().any(|k| k == n)
            })
        })
        .collect();
    partials.sort();
    let mut out = Vec::new();
    for partial in partials {
        let target = partial.with_extension(""); // drops ".partial"
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ArrowTeeError::Io { op, path, source }
        };
        if target.exists() {
            std::fs::remove_file(&partial).map_err(io("remove", &partial))?;
            continue;
        }
        let rec = recover_one(&partial, &target)?;
        match &rec {
            Some(r) => tracing::warn!(
                file = %r.file.display(),
                rows = r.rows,
                first = r.indices.map(|i| i.0),
                last = r.indices.map(|i| i.1),
                "recovered the Arrow tee part a stopped run left unfinished"
            ),
            None => tracing::warn!(
                file = %partial.display(),
                "an unfinished Arrow tee part held no complete record batch: removed"
            ),
        }
        std::fs::remove_file(&partial).map_err(io("remove", &partial))?;
        out.extend(rec);
    }
    Ok(out)
}

fn recover_one(partial: &Path, target: &Path) -> Result<Option<Recovered>, ArrowTeeError> {
    use std::io::{BufRead, Read};
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ArrowTeeError::Io { op, path, source }
    };
    let mut f = BufReader::new(File::open(partial).map_err(io("open", partial))?);
    let mut magic = [0u8; 6];
    if f.read_exact(&mut magic).is_err() || &magic != ARROW_FILE_MAGIC {
        return Ok(None);
    }
    // The writer pads the magic to its alignment (8 in the spec, 64 by default in arrow-rs) with zeros; the
    // stream's first message starts with the continuation marker 0xFFFFFFFF.
    loop {
        match f.fill_buf() {
            Ok([0, ..]) => f.consume(1),
            Ok([_, ..]) => break,
            _ => return Ok(None),
        }
    }
    let Ok(reader) = arrow_ipc::reader::StreamReader::try_new(f, None) else {
        return Ok(None); // not even the schema reached the disk
    };
    let schema = reader.schema();
    let tmp = target.with_extension("arrow.recovering");
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(CompressionType::ZSTD))
        .map_err(|source| ArrowTeeError::Arrow {
            path: tmp.clone(),
            source,
        })?;
    let file = File::create(&tmp).map_err(io("create", &tmp))?;
    let arrow = |source| ArrowTeeError::Arrow {
        path: tmp.clone(),
        source,
    };
    let mut w =
        FileWriter::try_new_with_options(BufWriter::new(file), &schema, options).map_err(arrow)?;
    let mut rows = 0u64;
    let mut indices: Option<(u64, u64)> = None;
    for batch in reader {
        // A batch cut off by the kill ends the readable part.
        let Ok(batch) = batch else { break };
        if let Ok(idx) = column(partial, &batch, "index", &DataType::UInt64) {
            for v in idx.as_primitive::<UInt64Type>().values().iter() {
                indices = Some(indices.map_or((*v, *v), |(a, b)| (a.min(*v), b.max(*v))));
            }
        }
        rows += batch.num_rows() as u64;
        w.write(&batch).map_err(arrow)?;
    }
    if rows == 0 {
        drop(w);
        let _ = std::fs::remove_file(&tmp);
        return Ok(None);
    }
    w.finish().map_err(arrow)?;
    let f = w
        .into_inner()
        .map_err(arrow)?
        .into_inner()
        .map_err(|e| ArrowTeeError::Io {
            op: "write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, target).map_err(io("rename", &tmp))?;
    if let Some(parent) = target.parent() {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(Some(Recovered {
        file: target.to_path_buf(),
        rows,
        indices,
    }))
}

/// The tee shared by the shard writer (which writes every sequence before sending it to its rank) and trainer rank
/// 0 (which makes it durable before each checkpoint: [`SharedTee::sync`]).
pub struct SharedTee {
    slot: std::sync::Mutex<TeeSlot>,
    progress: std::sync::Condvar,
}

impl std::fmt::Debug for SharedTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("SharedTee")
            .field("next", &g.next)
            .field("closed", &g.closed)
            .finish_non_exhaustive()
    }
}

struct TeeSlot {
    tee: Option<ArrowTee>,
    /// Every sequence with an index below this has been written (or was skipped as consumed before a resume).
    next: u64,
    /// The shard writer has finished (or failed): nothing more will be written.
    closed: bool,
}

impl SharedTee {
    /// `first_index`: the first sequence this run writes (the resume position).
    pub fn new(tee: ArrowTee, first_index: u64) -> Self {
        SharedTee {
            slot: std::sync::Mutex::new(TeeSlot {
                tee: Some(tee),
                next: first_index,
                closed: false,
            }),
            progress: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TeeSlot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one sequence (they come in index order).
    pub fn write(&self, seq: &PackedSequence) -> Result<(), ArrowTeeError> {
        let mut g = self.lock();
        if let Some(t) = g.tee.as_mut() {
            t.write(seq)?;
        }
        g.next = g.next.max(seq.index + 1);
        drop(g);
        self.progress.notify_all();
        Ok(())
    }

    /// Finishes the files (footers, final names). Later [`Self::sync`] calls return at once.
    pub fn finish(&self) -> Result<Option<TeeSummary>, ArrowTeeError> {
        let tee = {
            let mut g = self.lock();
            g.closed = true;
            g.tee.take()
        };
        self.progress.notify_all();
        tee.map(ArrowTee::finish).transpose()
    }

    /// Marks the tee closed without finishing it (the shard writer failed): its files stay `.partial`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.progress.notify_all();
    }

    /// Waits until every sequence below `upto` has been written (at most `timeout`: the shard writer writes a
    /// sequence before any rank can train on it, so this only waits for sequences of other processes' ranks), then
    /// makes the files durable. Returns whether every sequence below `upto` is on disk.
    pub fn sync(&self, upto: u64, timeout: std::time::Duration) -> Result<bool, ArrowTeeError> {
        let g = self.lock();
        let (mut g, _) = self
            .progress
            .wait_timeout_while(g, timeout, |s| s.next < upto && !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        let complete = g.next >= upto;
        if let Some(t) = g.tee.as_mut() {
            t.sync()?;
        }
        Ok(complete || g.tee.is_none())
    }
}

fn open_reader(path: &Path) -> Result<FileReader<BufReader<File>>, ArrowTeeError> {
    let format = |message: &str| ArrowTeeError::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(format(
                "is a directory: give one shard file of it (`shard-00000.arrow`, …)",
            ))
        }
        Ok(m) if m.len() == 0 => {
            return Err(format(
                "empty file: not an Arrow IPC file (the tee writes `.arrow.partial` and renames it when complete)",
            ))
        }
        _ => {}
    }
    if path.to_string_lossy().ends_with(".arrow.partial") {
        return Err(format(
            "an unfinished tee file (its run stopped before finishing it): `lexflow run CONFIG --resume` turns it \
             into a complete `.arrow` file holding every record batch that reached the disk",
        ));
    }
    let f = File::open(path).map_err(|source| ArrowTeeError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })?;
    FileReader::try_new(BufReader::new(f), None).map_err(|source| {
        format(&format!(
            "not an Arrow IPC file written by the lexflow tee ({source}); give a `shard-NNNNN.arrow` of `shards.arrow_dir`"
        ))
    })
}

fn file_meta_of(path: &Path, schema: &Schema) -> Result<TeeFileMeta, ArrowTeeError> {
    let json = schema
        .metadata()
        .get(META_KEY)
        .ok_or_else(|| ArrowTeeError::Format {
            path: path.to_path_buf(),
            message: format!("no `{META_KEY}` schema metadata: not a lexflow tee file"),
        })?;
    serde_json::from_str(json).map_err(|e| ArrowTeeError::Format {
        path: path.to_path_buf(),
        message: format!("bad `{META_KEY}` schema metadata: {e}"),
    })
}

/// The metadata of one shard file (reads only the schema).
pub fn read_meta(path: &Path) -> Result<TeeFileMeta, ArrowTeeError> {
    let r = open_reader(path)?;
    file_meta_of(path, &r.schema())
}

/// A column of `batch` by name, checked for type and absence of nulls.
fn column<'a>(
    path: &Path,
    batch: &'a RecordBatch,
    name: &str,
    want: &DataType,
) -> Result<&'a ArrayRef, ArrowTeeError> {
    let fmt = |message: String| ArrowTeeError::Format {
        path: path.to_path_buf(),
        message,
    };
    let c = batch
        .column_by_name(name)
        .ok_or_else(|| fmt(format!("missing column `{name}`")))?;
    if c.data_type() != want {
        return Err(fmt(format!(
            "column `{name}` is {}, expected {want}",
            c.data_type()
        )));
    }
    if c.null_count() > 0 {
        return Err(fmt(format!("column `{name}` has nulls")));
    }
    Ok(c)
}

/// Reads every sequence of one shard file, in the order written.
pub fn read_sequences(path: &Path) -> Result<Vec<PackedSequence>, ArrowTeeError> {
    let reader = open_reader(path)?;
    let fmt = |message: String| ArrowTeeError::Format {
        path: path.to_path_buf(),
        message,
    };
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|source| ArrowTeeError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
        let index = column(path, &batch, "index", &DataType::UInt64)?.as_primitive::<UInt64Type>();
        let shard = column(path, &batch, "shard", &DataType::UInt32)?.as_primitive::<UInt32Type>();
        let tokens = column(path, &batch, "tokens", &DataType::List(u32_item()))?.as_list::<i32>();
        let doc_starts =
            column(path, &batch, "doc_starts", &DataType::List(u32_item()))?.as_list::<i32>();
        let padding =
            column(path, &batch, "padding", &DataType::UInt32)?.as_primitive::<UInt32Type>();
        let pieces =
            column(path, &batch, "pieces", &DataType::List(piece_item()))?.as_list::<i32>();
        // Version-1 files have no `no_loss` column: nothing was masked.
        let no_loss = match batch.schema().column_with_name("no_loss") {
            Some(_) => {
                Some(column(path, &batch, "no_loss", &DataType::List(u32_item()))?.as_list::<i32>())
            }
            None => None,
        };
        let tok_vals = tokens.values().as_primitive::<UInt32Type>();
        let ds_vals = doc_starts.values().as_primitive::<UInt32Type>();
        let pv = pieces.values().as_struct();
        let pc = |name: &str| -> Result<ArrayRef, ArrowTeeError> {
            pv.column_by_name(name)
                .cloned()
                .ok_or_else(|| fmt(format!("missing pieces field `{name}`")))
        };
        let (lane, file, ordinal, start, end, offset) = (
            pc("lane")?,
            pc("file")?,
            pc("ordinal")?,
            pc("start")?,
            pc("end")?,
            pc("offset")?,
        );
        let lane = lane.as_primitive::<UInt16Type>();
        let file = file.as_primitive::<UInt32Type>();
        let ordinal = ordinal.as_primitive::<UInt32Type>();
        let start = start.as_primitive::<UInt32Type>();
        let end = end.as_primitive::<UInt32Type>();
        let offset = offset.as_primitive::<UInt32Type>();
        let slice = |list: &ListArray, vals: &UInt32Array, row: usize| -> Vec<u32> {
            let o = list.value_offsets();
            vals.values()[o[row] as usize..o[row + 1] as usize].to_vec()
        };
        for row in 0..batch.num_rows() {
            let po = pieces.value_offsets();
            let ps = (po[row] as usize..po[row + 1] as usize)
                .map(|k| Piece {
                    doc: DocId {
                        lane: lane.value(k),
                        file: file.value(k),
                        ordinal: ordinal.value(k),
                    },
                    start: start.value(k),
                    end: end.value(k),
                    offset: offset.value(k),
                    loss_from: 0,
                })
                .collect();
            out.push(PackedSequence {
                index: index.value(row),
                tokens: slice(tokens, tok_vals, row),
                doc_starts: slice(doc_starts, ds_vals, row),
                pieces: ps,
                padding: padding.value(row),
                no_loss: match no_loss {
                    Some(l) => {
                        let flat = slice(l, l.values().as_primitive::<UInt32Type>(), row);
                        if flat.len() % 2 == 1 {
                            return Err(fmt(format!(
                                "row {row} of a batch: `no_loss` has {} values, not [start, end) pairs (file not \
                                 written by lexflow, or damaged)",
                                flat.len()
                            )));
                        }
                        flat.chunks(2).map(|c| [c[0], c[1]]).collect()
                    }
                    None => Vec::new(),
                },
                shard: shard.value(row),
                resume: None,
            });
        }
    }
    Ok(out)
}

/// `lexflow inspect FILE`: per sequence its index, shard, padding, document boundaries and the decoded text of each
/// piece.
/// `tokenizer`: what to decode with; None: the tokenizer the file records (the run's `tokenizer.path`).
pub fn cli_inspect(file: &Path, tokenizer: Option<&str>, limit: usize) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let meta = read_meta(file)?;
    let seqs = read_sequences(file)?;
    let tokenizer = tokenizer.unwrap_or(&meta.tokenizer);
    let tok = crate::stages::tokenizer::Tokenizer::load(tokenizer).with_context(|| {
        if tokenizer == meta.tokenizer {
            format!(
                "{} was written with tokenizer `{tokenizer}`, which cannot be loaded here: give the same \
                 tokenizer.json with --tokenizer",
                file.display()
            )
        } else {
            format!("--tokenizer {tokenizer}")
        }
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: run `{}`, shard {}/{}, seq_len {}, tokenizer `{}` (decoding with `{tokenizer}`), {} sequences",
        file.display(),
        meta.run,
        meta.shard,
        meta.shards,
        meta.seq_len,
        meta.tokenizer,
        seqs.len()
    )?;
    for s in seqs.iter().take(limit) {
        writeln!(
            out,
            "\n=== sequence {} (shard {}, padding {}, doc_starts {:?}{})",
            s.index,
            s.shard,
            s.padding,
            s.doc_starts,
            if s.no_loss.is_empty() {
                String::new()
            } else {
                format!(", no loss on positions {:?}", s.no_loss)
            }
        )?;
        for p in &s.pieces {
            let from = (p.offset as usize).min(s.tokens.len());
            let to = (from + (p.end.saturating_sub(p.start)) as usize).min(s.tokens.len());
            writeln!(
                out,
                "--- piece lane {} file {} doc {} tokens [{}, {}) at offset {}",
                p.doc.lane, p.doc.file, p.doc.ordinal, p.start, p.end, p.offset
            )?;
            writeln!(out, "{}", tok.decode(&s.tokens[from..to]))?;
        }
    }
    if seqs.len() > limit {
        writeln!(
            out,
            "\n… {} more sequences (use --limit)",
            seqs.len() - limit
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn meta(seq_len: usize) -> TeeMeta {
        TeeMeta {
            seq_len,
            tokenizer: "llama3".into(),
            run: "unit".into(),
        }
    }

    fn random_seq(
        rng: &mut rand_chacha::ChaCha8Rng,
        index: u64,
        shards: u32,
        seq_len: usize,
    ) -> PackedSequence {
        let tokens: Vec<u32> = (0..=seq_len).map(|_| rng.gen_range(0..128_256)).collect();
        let mut doc_starts = vec![0u32];
        let mut pieces = Vec::new();
        let mut off = 0u32;
        while (off as usize) < seq_len + 1 {
            let len = rng.gen_range(1..=((seq_len + 1) as u32 - off).min(40));
            let start = rng.gen_range(0..1000);
            pieces.push(Piece {
                doc: DocId {
                    lane: rng.gen_range(0..5),
                    file: rng.gen(),
                    ordinal: rng.gen_range(0..3),
                },
                start,
                end: start + len,
                offset: off,
                loss_from: 0,
            });
            off += len;
            if (off as usize) < seq_len + 1 {
                doc_starts.push(off);
            }
        }
        PackedSequence {
            index,
            tokens,
            doc_starts,
            pieces,
            padding: rng.gen_range(0..4),
            no_loss: Vec::new(),
            shard: rng.gen_range(0..shards),
            resume: None,
        }
    }

    /// `lexflow inspect` decodes with the tokenizer the file records unless told otherwise (it used `llama3`
    /// whatever the run's tokenizer was, and so printed another vocabulary's text).
    #[test]
    fn inspect_decodes_with_the_tokenizer_the_file_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = meta(20);
        m.tokenizer = "/no/such/tokenizer.json".into();
        let mut tee = ArrowTee::create(dir.path(), 1, m).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        tee.write(&random_seq(&mut rng, 0, 1, 20)).unwrap();
        tee.finish().unwrap();
        let f = dir.path().join("shard-00000.arrow");
        let e = format!("{:#}", cli_inspect(&f, None, 1).unwrap_err());
        assert!(
            e.contains("tokenizer `/no/such/tokenizer.json`") && e.contains("--tokenizer"),
            "{e}"
        );
        assert!(cli_inspect(&f, Some("llama3"), 1).is_ok());
    }

    #[test]
    fn a_killed_tee_is_recovered_up_to_its_last_sync_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let seqs: Vec<_> = (0..40).map(|i| random_seq(&mut rng, i, 2, 50)).collect();
        let shared = SharedTee::new(ArrowTee::create(dir.path(), 2, meta(50)).unwrap(), 0);
        for s in &seqs[..30] {
            shared.write(s).unwrap();
        }
        // Everything below 30 is written: the sync does not wait.
        assert!(shared.sync(30, std::time::Duration::from_secs(5)).unwrap());
        // Waiting for a sequence never written times out and says so.
        assert!(!shared
            .sync(31, std::time::Duration::from_millis(50))
            .unwrap());
        for s in &seqs[30..] {
            shared.write(s).unwrap(); // buffered, never synced: lost in the "kill" below
        }
        // A kill: the tee is never finished (leak it so nothing is flushed on drop).
        std::mem::forget(shared);
        let p0 = dir.path().join("shard-00000.arrow.partial");
        assert!(p0.exists());
        assert!(
            read_sequences(&p0).is_err(),
            "a .partial file is not readable as it is"
        );
        // A torn tail on shard 1: half a message after the synced batches.
        let p1 = dir.path().join("shard-00001.arrow.partial");
        let mut bytes = std::fs::read(&p1).unwrap();
        let synced = bytes.len();
        let head = bytes[64..64 + 300].to_vec();
        bytes.extend_from_slice(&head);
        std::fs::write(&p1, &bytes).unwrap();
        assert!(synced > 64);
        // A partial file with nothing recoverable.
        std::fs::write(dir.path().join("shard-00005.arrow.partial"), b"ARROW1\0\0").unwrap();
        let rec = recover_partials(dir.path(), &[]).unwrap();
        assert_eq!(rec.len(), 2, "{rec:?}");
        for (shard, r) in rec.iter().enumerate() {
            assert_eq!(r.file, dir.path().join(shard_file_name(shard)));
            let want: Vec<_> = seqs[..30]
                .iter()
                .filter(|s| s.shard as usize == shard)
                .cloned()
                .collect();
            assert_eq!(read_sequences(&r.file).unwrap(), want, "shard {shard}");
            assert_eq!(r.rows, want.len() as u64);
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".arrow"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A resumed part starting at 30 next to them; a fresh run (from 0) removes every earlier file.
        let t = ArrowTee::create_part(dir.path(), 2, meta(50), 30).unwrap();
        assert_eq!(t.finish().unwrap().files.len(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
        drop(ArrowTee::create(dir.path(), 2, meta(50)).unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".partial") && !n.contains(".from-")),
            "{names:?}"
        );
    }

    #[test]
    fn round_trip_all_shards_and_partial_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        let shards = 3;
        let mut tee = ArrowTee::create(dir.path(), shards, meta(100)).unwrap();
        // 4 shards' worth of > BATCH_ROWS rows so full and partial batches both occur; shard 2 stays empty.
        let seqs: Vec<_> = (0..150)
            .map(|i| random_seq(&mut rng, u64::MAX - 200 + i, 2, 100))
            .collect();
        for s in &seqs {
            tee.write(s).unwrap();
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| e
            .unwrap()
            .path()
            .to_string_lossy()
            .ends_with(".partial")));
        let sum = tee.finish().unwrap();
        assert_eq!(sum.sequences, 150);
        assert_eq!(sum.files.len(), 3);
        assert_eq!(sum.rows_per_shard.iter().sum::<u64>(), 150);
        assert_eq!(sum.rows_per_shard[2], 0);
        for (shard, f) in sum.files.iter().enumerate() {
            assert_eq!(
                f.file_name().unwrap().to_str().unwrap(),
                shard_file_name(shard)
            );
            let want: Vec<_> = seqs
                .iter()
                .filter(|s| s.shard as usize == shard)
                .cloned()
                .collect();
            assert_eq!(read_sequences(f).unwrap(), want, "shard {shard}");
            let m = read_meta(f).unwrap();
            assert_eq!(
                (m.seq_len, m.shard, m.shards, m.run.as_str()),
                (100, shard as u32, 3, "unit")
            );
        }
    }

    #[test]
    fn compressed_and_deterministic() {
        let write = |dir: &Path| {
            let mut tee = ArrowTee::create(dir, 1, meta(2047)).unwrap();
            for i in 0..64 {
                let tokens = vec![7u32; 2048];
                let s = PackedSequence {
                    index: i,
                    tokens,
                    doc_starts: vec![0],
                    pieces: vec![Piece {
                        doc: DocId::default(),
                        start: 0,
                        end: 2048,
                        offset: 0,
                        loss_from: 0,
                    }],
                    padding: 0,
                    no_loss: Vec::new(),
                    shard: 0,
                    resume: None,
                };
                tee.write(&s).unwrap();
            }
            tee.finish().unwrap()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = write(a.path());
        write(b.path());
        // 64 × 2048 × 4 bytes raw = 512 KiB; zstd makes the constant tokens nearly free.
        assert!(sa.bytes < 64 * 1024, "not compressed: {} bytes", sa.bytes);
        let fa = std::fs::read(a.path().join(shard_file_name(0))).unwrap();
        let fb = std::fs::read(b.path().join(shard_file_name(0))).unwrap();
        assert!(fa == fb, "tee files differ between identical runs");
    }

    #[test]
    fn rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ArrowTee::create(dir.path(), 0, meta(4)),
            Err(ArrowTeeError::NoShards)
        ));
        let mut tee = ArrowTee::create(dir.path(), 2, meta(4)).unwrap();
        let mut s = PackedSequence {
            index: 9,
            tokens: vec![1; 5],
            doc_starts: vec![0],
            pieces: vec![],
            padding: 0,
            no_loss: Vec::new(),
            shard: 2,
            resume: None,
        };
        assert!(matches!(
            tee.write(&s),
            Err(ArrowTeeError::ShardOutOfRange { shard: 2, .. })
        ));
        s.shard = 1;
        s.tokens.pop();
        assert!(matches!(
            tee.write(&s),
            Err(ArrowTeeError::WrongLength {
                got: 4,
                expected: 5,
                ..
            })
        ));
        let junk = dir.path().join("junk.arrow");
        std::fs::write(&junk, b"not arrow").unwrap();
        assert!(read_sequences(&junk).is_err());
    }
}
