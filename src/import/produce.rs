//! Stage `produce`: the tasks that read the file and hand batches to the loader.
//!
//! CSV is read on the async executor and each batch's CPU work (canonical JSON, sha256,
//! COPY encoding) is done on the blocking pool; a spreadsheet is read whole on the blocking
//! pool, sheet by sheet. Between the producer and the loader, a look-up task drops the
//! content of rows that are stored already. Bounded channels keep memory constant.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csv_async::ByteRecord;
use tokio::sync::mpsc;

use super::decode::csv::{CsvDecoder, CsvStart, RowEncoder};
use super::decode::lines::{parse_line, Line, LineReader};
use super::decode::sheet::cells::CellValue;
use super::decode::sheet::rows::{Flow, SheetEvent, TypedRowEncoder};
use super::decode::sheet::{inspect::inspect, workbook::Workbook};
use super::decode::sheet::{SheetError, SheetFormat};
use super::decode::{DecodeError, Header, RowProblem};
use super::hash::{self, RowHash, TreeHasher};
use super::load::{Batch, BatchWriter, Lookup, RejectedRow};
use super::plan::{write_key, KeyValue};
use super::run::{Checkpoint, SheetLineage};
use super::ImportError;
use crate::config::ImportSettings;

/// How the rows of one sheet get their logical ids (see `plan.rs`).
#[derive(Clone, Debug, Default)]
pub(super) struct RowIdentity {
    /// Positional ids: added to each row's number (`append` continues the parent's).
    pub(super) offset: u64,
    /// Keyed ids: the key columns' positions in the header, and their names.
    pub(super) key: Option<(Vec<usize>, Vec<String>)>,
    /// `delete` mode: rows become deletions of their keys.
    pub(super) delete: bool,
}

impl RowIdentity {
    /// Adds one decoded row to `writer`, or says why it cannot be: an empty key, or a
    /// key an earlier row of the batch had (`seen` maps the batch's keys to lines).
    /// Returns whether the row is a keyed row of the version (not a deletion); its key
    /// is then in `seen.last`.
    #[allow(clippy::too_many_arguments)]
    fn push<'v>(
        &self,
        writer: &mut BatchWriter,
        seen: &mut BatchKeys,
        n: u64,
        line: u64,
        values: impl Fn(usize) -> KeyValue<'v>,
        row_hash: &RowHash,
        json: &[u8],
    ) -> Result<bool, RowProblem> {
        let Some((columns, names)) = &self.key else {
            writer.push(self.offset + n, row_hash, json);
            return Ok(false);
        };
        let mut key = String::new();
        write_key(columns.iter().map(|&column| values(column)), &mut key).map_err(|index| {
            let (column, name) = (columns[index] + 1, names[index].clone());
            match values(columns[index]) {
                KeyValue::Nested(found) => RowProblem::NestedKey {
                    column,
                    name,
                    found,
                },
                _ => RowProblem::EmptyKey { column, name },
            }
        })?;
        match seen.lines.entry(key) {
            std::collections::hash_map::Entry::Occupied(first) => Err(RowProblem::RepeatedKey {
                key: first.key().clone(),
                first_line: Some(*first.get()),
            }),
            std::collections::hash_map::Entry::Vacant(slot) => {
                if self.delete {
                    writer.push_tombstone(slot.key(), line);
                    slot.insert(line);
                    return Ok(false);
                }
                writer.push_keyed(slot.key(), line, row_hash, json);
                seen.last.clear();
                seen.last.push_str(slot.key());
                slot.insert(line);
                Ok(true)
            }
        }
    }

    /// Chains a row [`push`](Self::push) took into the tree hash under its logical id
    /// (`key` is `seen.last` when `push` said the row is keyed), and notes a key in the
    /// checkpoint's trail. A deletion is not part of the version and is not chained.
    /// The tree streams in file order: logical row order for positional ids; for keyed
    /// ids, finalise uses it when the trail shows the keys came in order, and reads the
    /// version back in order otherwise.
    fn chain(
        &self,
        key: Option<&str>,
        n: u64,
        cursor: &mut Checkpoint,
        tree: &mut TreeHasher,
        logical_row_id: &mut String,
        row_hash: &RowHash,
    ) {
        logical_row_id.clear();
        match key {
            Some(key) => {
                cursor.key_trail.see(&cursor.sheet, key);
                let _ = write!(logical_row_id, "{}:{}", cursor.sheet, key);
            }
            None if self.key.is_none() => {
                let _ = write!(logical_row_id, "{}:{}", cursor.sheet, self.offset + n);
            }
            None => return,
        }
        tree.push(logical_row_id, row_hash);
    }
}

/// The keys of one batch: the line of each (a key must not repeat), and the key of the
/// row pushed last.
#[derive(Default)]
pub(super) struct BatchKeys {
    lines: HashMap<String, u64>,
    last: String,
}

/// How a CSV's records become rows: their canonical JSON and their ids.
pub(super) struct CsvRows {
    pub(super) encoder: RowEncoder,
    pub(super) identity: RowIdentity,
}

/// What flows from the producer through the look-up stage to the loader. The end of
/// the file is said explicitly, so a stage that stops for any other reason (a panic)
/// can never pass for a complete file.
pub(super) enum Produced {
    Batch(Box<Batch>),
    End,
}

pub(super) type Pipe = mpsc::Sender<Result<Produced, ImportError>>;

/// Where the object's bytes stand while its text is parsed.
pub(super) struct ObjectBytes {
    /// Where they must end: the object's size, or the end of a zip member's data.
    pub(super) end: u64,
    /// Decoded text (see `decode::text`): the object's bytes read so far, since the
    /// parser's positions count the text. `None` when the parser reads the object's
    /// own bytes.
    pub(super) read: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl ObjectBytes {
    fn read(&self) -> Option<u64> {
        self.read
            .as_ref()
            .map(|count| count.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Record buffers larger than this are not kept for reuse.
pub(super) const LARGE_RECORD_BYTES: usize = 1024 * 1024;

/// A batch is cut at this many bytes of records even before `IMPORT_BATCH_SIZE` rows,
/// so memory is bounded for wide rows too.
pub(super) const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Reads records into batches and encodes each on the blocking pool, in file order.
/// An error ends the stream: the batch it interrupted is not sent, so every checkpoint
/// that reaches the loader sits on a record boundary.
pub(super) async fn produce_batches(
    decoder: CsvDecoder,
    rows: Arc<CsvRows>,
    cursor: Checkpoint,
    batch_size: usize,
    skip_bad_rows: bool,
    object: ObjectBytes,
    sender: Pipe,
) {
    let start = decoder.start();
    let encode = move |records: &[ByteRecord], file: &str, next: Checkpoint| {
        encode_batch(
            records,
            start,
            &rows.encoder,
            &rows.identity,
            file,
            skip_bad_rows,
            next,
        )
    };
    produce_text_batches(decoder, encode, cursor, batch_size, object, sender).await;
}

/// What the text producers read batches from (CSV records, JSON lines), each record
/// into a buffer that is reused batch after batch.
pub(super) trait TextReader: Send + 'static {
    type Record: Default + Send + 'static;

    /// Reads the next record into `record`; false at the end of the file.
    fn read_into(
        &mut self,
        record: &mut Self::Record,
    ) -> impl std::future::Future<Output = Result<bool, DecodeError>> + Send;

    /// The bytes a record read holds, counted toward [`MAX_BATCH_BYTES`].
    fn record_bytes(record: &Self::Record) -> usize;

    /// The bytes a buffer keeps allocated; one past [`LARGE_RECORD_BYTES`] is let go.
    fn buffer_bytes(record: &Self::Record) -> usize;

    fn next_byte(&self) -> u64;
    fn next_line(&self) -> u64;
    fn file(&self) -> &str;
}

impl TextReader for CsvDecoder {
    type Record = ByteRecord;

    fn read_into(
        &mut self,
        record: &mut ByteRecord,
    ) -> impl std::future::Future<Output = Result<bool, DecodeError>> + Send {
        self.read_record(record)
    }

    fn record_bytes(record: &ByteRecord) -> usize {
        record.as_slice().len()
    }

    fn buffer_bytes(record: &ByteRecord) -> usize {
        record.as_slice().len()
    }

    fn next_byte(&self) -> u64 {
        CsvDecoder::next_byte(self)
    }

    fn next_line(&self) -> u64 {
        CsvDecoder::next_line(self)
    }

    fn file(&self) -> &str {
        CsvDecoder::file(self)
    }
}

impl TextReader for LineReader {
    type Record = Line;

    fn read_into(
        &mut self,
        line: &mut Line,
    ) -> impl std::future::Future<Output = Result<bool, DecodeError>> + Send {
        self.read_line(line)
    }

    fn record_bytes(line: &Line) -> usize {
        line.text.len()
    }

    fn buffer_bytes(line: &Line) -> usize {
        line.text.capacity()
    }

    fn next_byte(&self) -> u64 {
        LineReader::next_byte(self)
    }

    fn next_line(&self) -> u64 {
        LineReader::next_line(self)
    }

    fn file(&self) -> &str {
        LineReader::file(self)
    }
}

/// The loop both text producers share: fills a batch of records (up to `batch_size`
/// and [`MAX_BATCH_BYTES`]), has `encode` turn it into a [`Batch`] on the blocking pool
/// (with the file's name and the checkpoint after the batch), and forwards it. At the
/// end of the records, the end of the file, or a source that delivered less than HEAD
/// promised.
async fn produce_text_batches<R, E>(
    mut reader: R,
    encode: E,
    mut cursor: Checkpoint,
    batch_size: usize,
    object: ObjectBytes,
    sender: Pipe,
) where
    R: TextReader,
    E: Fn(&[R::Record], &str, Checkpoint) -> Result<Batch, ImportError> + Send + Sync + 'static,
{
    let size = object.end;
    let object_read = || object.read();
    let encode = Arc::new(encode);
    // Record buffers travel to the blocking pool and back, so their allocations are
    // reused batch after batch.
    let mut records: Vec<R::Record> = Vec::new();
    loop {
        records.resize_with(batch_size, R::Record::default);
        let mut filled = 0;
        let mut bytes = 0;
        while filled < batch_size && bytes < MAX_BATCH_BYTES {
            match reader.read_into(&mut records[filled]).await {
                Ok(true) => {
                    bytes += R::record_bytes(&records[filled]);
                    filled += 1;
                }
                Ok(false) => break,
                Err(error) => {
                    let _ = sender.send(Err(error.into())).await;
                    return;
                }
            }
        }
        if filled == 0 {
            // The parser ends exactly at the object's last byte; anywhere else, the
            // source delivered less than HEAD promised (a local file cut short).
            let read = object_read().unwrap_or(reader.next_byte());
            let end = if read == size {
                Ok(Produced::End)
            } else {
                Err(DecodeError::Truncated {
                    file: reader.file().to_owned(),
                    read,
                    size,
                }
                .into())
            };
            let _ = sender.send(end).await;
            return;
        }
        records.truncate(filled);
        let file = reader.file().to_owned();
        let mut next = cursor.clone();
        next.byte_offset = reader.next_byte();
        next.line = reader.next_line();
        next.object_offset = object_read();
        let encode = Arc::clone(&encode);
        let encoded = tokio::task::spawn_blocking(move || {
            let result = encode(&records, &file, next);
            (result, records)
        })
        .await;
        let batch = match encoded {
            Ok((result, returned)) => {
                records = returned;
                // A slot that once held a huge record would keep its allocation for the
                // rest of the import; let it go.
                for record in records.iter_mut() {
                    if R::buffer_bytes(record) > LARGE_RECORD_BYTES {
                        *record = R::Record::default();
                    }
                }
                result
            }
            Err(panic) => {
                let message = format!("batch encoding panicked: {panic}");
                let _ = sender.send(Err(ImportError::Internal(message))).await;
                return;
            }
        };
        match forward(batch, &sender).await {
            Some(checkpoint) => cursor = checkpoint,
            None => return,
        }
    }
}

/// Sends an encoded batch (or the error that ended the file) down the pipe; returns
/// the checkpoint after the batch, or `None` when the producer must stop (an error was
/// sent, or the loader is gone).
async fn forward(batch: Result<Batch, ImportError>, sender: &Pipe) -> Option<Checkpoint> {
    match batch {
        Ok(batch) => {
            let checkpoint = batch.checkpoint.clone();
            sender
                .send(Ok(Produced::Batch(Box::new(batch))))
                .await
                .ok()
                .map(|()| checkpoint)
        }
        Err(error) => {
            let _ = sender.send(Err(error)).await;
            None
        }
    }
}

/// The look-up stage: drops the content of rows already stored from each batch, ahead
/// of the loader, on a connection of its own.
pub(super) async fn drop_known_rows(
    mut lookup: Lookup,
    mut encoded: mpsc::Receiver<Result<Produced, ImportError>>,
    sender: Pipe,
) {
    while let Some(next) = encoded.recv().await {
        let forwarded = match next {
            Ok(Produced::Batch(mut batch)) => match lookup.drop_known(&mut batch.rows).await {
                Ok(duration) => {
                    batch.lookup_duration = duration;
                    Ok(Produced::Batch(batch))
                }
                Err(error) => Err(error.into()),
            },
            other => other,
        };
        let last = !matches!(forwarded, Ok(Produced::Batch(_)));
        if last {
            tracing::debug!(
                rows = lookup.rows_found_in_parent(),
                "look-up: rows found stored through the parent's entries"
            );
        }
        if sender.send(forwarded).await.is_err() || last {
            return;
        }
    }
}

/// The CPU part of a batch: canonical JSON, row hash, tree hash and COPY encoding for
/// each record, or the record's rejection. `next` is the checkpoint before the batch with
/// the reader's position after it; it comes back complete.
pub(super) fn encode_batch(
    records: &[ByteRecord],
    start: CsvStart,
    encoder: &RowEncoder,
    identity: &RowIdentity,
    file: &str,
    skip_bad_rows: bool,
    mut next: Checkpoint,
) -> Result<Batch, ImportError> {
    let started = Instant::now();
    let mut tree = TreeHasher::from_hex(&next.tree_state)
        .map_err(|error| ImportError::Resume(format!("checkpoint tree hash: {error}")))?;
    let mut writer = BatchWriter::new(&next.commit_id, &next.sheet, records.len());
    let mut rejected = Vec::new();
    let mut json = Vec::with_capacity(512);
    let mut logical_row_id = String::with_capacity(next.sheet.len() + 12);
    let mut seen = BatchKeys::default();
    for record in records {
        next.records += 1;
        let n = next.records;
        let (byte, line) = start.position_of(record);
        json.clear();
        let pushed = encoder.encode(record, byte, &mut json).and_then(|()| {
            let row_hash = hash::row_hash(&json);
            // Fields are valid UTF-8 once the encoder accepted the record.
            let field = |column: usize| {
                KeyValue::Text(std::str::from_utf8(&record[column]).unwrap_or_default())
            };
            let keyed = identity.push(&mut writer, &mut seen, n, line, field, &row_hash, &json)?;
            let key = keyed.then_some(seen.last.as_str());
            identity.chain(key, n, &mut next, &mut tree, &mut logical_row_id, &row_hash);
            Ok(())
        });
        match pushed {
            Ok(()) => {}
            Err(problem) if skip_bad_rows => rejected.push(RejectedRow {
                line,
                byte,
                raw: raw_record(record),
                problem,
            }),
            Err(problem) => {
                return Err(DecodeError::BadRow {
                    file: file.to_owned(),
                    line,
                    byte,
                    problem,
                }
                .into())
            }
        }
    }
    next.loaded_rows += writer.rows();
    next.rejected_rows += rejected.len() as u64;
    next.tree_state = tree.to_hex();
    Ok(Batch {
        rows: writer.finish(),
        rejected,
        checkpoint: next,
        encode_duration: started.elapsed(),
        lookup_duration: Duration::ZERO,
    })
}

/// Reads JSON Lines into batches and encodes each on the blocking pool, in file order,
/// as [`produce_batches`] does for CSV.
pub(super) async fn produce_json_batches(
    reader: LineReader,
    identity: Arc<RowIdentity>,
    cursor: Checkpoint,
    batch_size: usize,
    skip_bad_rows: bool,
    object: ObjectBytes,
    sender: Pipe,
) {
    let encode = move |lines: &[Line], file: &str, next: Checkpoint| {
        encode_json_batch(lines, &identity, file, skip_bad_rows, next)
    };
    produce_text_batches(reader, encode, cursor, batch_size, object, sender).await;
}

/// The CPU part of a JSON Lines batch: each line parsed, its canonical JSON hashed and
/// pushed like a CSV row; new keys grow the checkpoint's header. Keyed ids take the key
/// columns by name from each object (a missing or null key is an empty key).
fn encode_json_batch(
    lines: &[Line],
    identity: &RowIdentity,
    file: &str,
    skip_bad_rows: bool,
    mut next: Checkpoint,
) -> Result<Batch, ImportError> {
    use serde_json::Value;
    let started = Instant::now();
    let mut tree = TreeHasher::from_hex(&next.tree_state)
        .map_err(|error| ImportError::Resume(format!("checkpoint tree hash: {error}")))?;
    let mut writer = BatchWriter::new(&next.commit_id, &next.sheet, lines.len());
    let mut rejected = Vec::new();
    let mut header = next.header.take().unwrap_or_else(|| Header::resolve(&[]));
    let mut logical_row_id = String::with_capacity(next.sheet.len() + 12);
    let mut seen = BatchKeys::default();
    let key_names = identity.key.as_ref().map(|(_, names)| names.as_slice());
    for line in lines {
        next.records += 1;
        let n = next.records;
        let pushed = parse_line(&line.text, &mut header).and_then(|row| {
            let row_hash = hash::row_hash(&row.canonical);
            let field =
                |column: usize| match key_names.and_then(|names| row.object.get(&names[column])) {
                    Some(Value::String(text)) => KeyValue::Text(text),
                    Some(Value::Number(number)) => {
                        KeyValue::Number(number.as_f64().unwrap_or_default())
                    }
                    Some(Value::Bool(flag)) => KeyValue::Bool(*flag),
                    Some(Value::Array(_)) => KeyValue::Nested("an array"),
                    Some(Value::Object(_)) => KeyValue::Nested("an object"),
                    Some(Value::Null) | None => KeyValue::Null,
                };
            let keyed = identity.push(
                &mut writer,
                &mut seen,
                n,
                line.line,
                field,
                &row_hash,
                &row.canonical,
            )?;
            let key = keyed.then_some(seen.last.as_str());
            identity.chain(key, n, &mut next, &mut tree, &mut logical_row_id, &row_hash);
            Ok(())
        });
        match pushed {
            Ok(()) => {}
            Err(problem) if skip_bad_rows => rejected.push(RejectedRow {
                line: line.line,
                byte: line.byte,
                raw: line.text.clone(),
                problem,
            }),
            Err(problem) => {
                return Err(DecodeError::BadRow {
                    file: file.to_owned(),
                    line: line.line,
                    byte: line.byte,
                    problem,
                }
                .into())
            }
        }
    }
    next.header = Some(header);
    next.loaded_rows += writer.rows();
    next.rejected_rows += rejected.len() as u64;
    next.tree_state = tree.to_hex();
    Ok(Batch {
        rows: writer.finish(),
        rejected,
        checkpoint: next,
        encode_duration: started.elapsed(),
        lookup_duration: Duration::ZERO,
    })
}

/// A rejected record's fields joined back with commas, for a person to inspect.
pub(super) fn raw_record(record: &ByteRecord) -> Vec<u8> {
    let mut raw = Vec::new();
    for (index, field) in record.iter().enumerate() {
        if index > 0 {
            raw.push(b',');
        }
        raw.extend_from_slice(field);
    }
    raw
}

/// What the spreadsheet producer needs; it runs on the blocking pool, since calamine
/// reads synchronously.
pub(super) struct SheetJob {
    /// The spooled object, rewound.
    pub(super) file: std::fs::File,
    /// Counts the spooled file in the metrics for as long as it is read.
    pub(super) spool_usage: crate::metrics::SpoolUsage,
    pub(super) file_name: String,
    pub(super) wanted: Option<Vec<String>>,
    /// The checkpoint to continue from (a fresh one for a new run).
    pub(super) cursor: Checkpoint,
    pub(super) settings: ImportSettings,
    pub(super) skip_bad_rows: bool,
    /// `delete` mode: rows become deletions of their keys.
    pub(super) delete: bool,
    pub(super) size: u64,
    /// The format found in the content, for the commit's lineage.
    pub(super) format: Arc<std::sync::OnceLock<SheetFormat>>,
}

/// Reads every planned sheet from the checkpoint's sheet and row on, and sends batches
/// (each within one sheet) down the same pipe as the CSV producer. A final batch
/// without rows carries the checkpoint that names every completed sheet.
pub(super) fn produce_sheet_batches(job: SheetJob, sender: Pipe) {
    let result = read_sheets(job, &sender);
    let last = match result {
        Ok(true) => Ok(Produced::End),
        // The receiver is gone: the import is being torn down.
        Ok(false) => return,
        Err(error) => Err(error),
    };
    let _ = sender.blocking_send(last);
}

/// Returns `Ok(false)` when the loader went away mid-way.
pub(super) fn read_sheets(job: SheetJob, sender: &Pipe) -> Result<bool, ImportError> {
    let SheetJob {
        mut file,
        spool_usage: _spool_usage,
        file_name,
        wanted,
        mut cursor,
        settings,
        skip_bad_rows,
        delete,
        size,
        format,
    } = job;
    let started = Instant::now();
    let found = inspect(&mut file, &file_name, &settings)?;
    let _ = format.set(found);
    let mut workbook = Workbook::open(found, file, &file_name)?;
    let plan = workbook.plan(wanted.as_deref(), &file_name, settings.max_sheets)?;
    tracing::info!(
        format = found.name(),
        sheets = plan.len(),
        duration_ms = started.elapsed().as_millis() as u64,
        "spreadsheet opened"
    );
    let mut tree = TreeHasher::from_hex(&cursor.tree_state)
        .map_err(|error| ImportError::Resume(format!("checkpoint tree hash: {error}")))?;
    let sheet_count = plan.len().max(1) as f64;
    for (index, planned) in plan.iter().enumerate().skip(cursor.sheet_index) {
        if index > cursor.sheet_index || cursor.sheet != planned.name {
            if cursor.sheet_records > 0 && cursor.sheet != planned.name {
                return Err(ImportError::Resume(format!(
                    "the checkpoint is in sheet {:?}, but sheet {} of {file_name} is {:?}",
                    cursor.sheet,
                    index + 1,
                    planned.name
                )));
            }
            cursor.sheet_index = index;
            cursor.sheet = planned.name.clone();
            cursor.sheet_records = 0;
            cursor.header = None;
        }
        let mut encoder: Option<TypedRowEncoder> = None;
        let mut identity = RowIdentity {
            offset: cursor.plan.row_offset(&planned.name),
            key: None,
            delete,
        };
        let mut seen = BatchKeys::default();
        let mut writer = BatchWriter::new(&cursor.commit_id, &cursor.sheet, settings.batch_size);
        let mut rejected: Vec<RejectedRow> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut batch_started = Instant::now();
        let mut json = Vec::with_capacity(512);
        let mut logical_row_id = String::with_capacity(planned.name.len() + 12);
        let mut height = 0u64;
        let mut gone = false;
        let flush = |cursor: &mut Checkpoint,
                     writer: &mut BatchWriter,
                     rejected: &mut Vec<RejectedRow>,
                     tree: &TreeHasher,
                     progress: f64,
                     batch_started: Instant|
         -> bool {
            let full = std::mem::replace(
                writer,
                BatchWriter::new(&cursor.commit_id, &cursor.sheet, settings.batch_size),
            );
            cursor.loaded_rows += full.rows();
            cursor.rejected_rows += rejected.len() as u64;
            cursor.tree_state = tree.to_hex();
            cursor.byte_offset = ((size as f64) * progress / sheet_count) as u64;
            let batch = Batch {
                rows: full.finish(),
                rejected: std::mem::take(rejected),
                checkpoint: cursor.clone(),
                encode_duration: batch_started.elapsed(),
                lookup_duration: Duration::ZERO,
            };
            sender
                .blocking_send(Ok(Produced::Batch(Box::new(batch))))
                .is_ok()
        };
        let mut visit = |event: SheetEvent<'_>| -> Result<Flow, SheetError> {
            match event {
                SheetEvent::Header(header) => {
                    match &cursor.header {
                        Some(known) if known != header => {
                            return Err(SheetError::Read {
                                file: file_name.clone(),
                                sheet: planned.name.clone(),
                                message: "its header differs from the one the run started with"
                                    .to_owned(),
                            })
                        }
                        Some(_) => {}
                        None => cursor.header = Some(header.clone()),
                    }
                    let columns = cursor
                        .plan
                        .key_columns(header, &file_name, Some(&planned.name))
                        .map_err(|error| SheetError::Read {
                            file: file_name.clone(),
                            sheet: planned.name.clone(),
                            message: error.to_string(),
                        })?;
                    identity.key = columns.map(|columns| {
                        let names = columns.iter().map(|&c| header.columns[c].clone()).collect();
                        (columns, names)
                    });
                    encoder = Some(TypedRowEncoder::new(header));
                }
                SheetEvent::Progress {
                    height: declared, ..
                } => height = declared,
                SheetEvent::Row {
                    n,
                    sheet_row,
                    values,
                } => {
                    if n <= cursor.sheet_records {
                        // Loaded before the resume.
                        return Ok(Flow::Continue);
                    }
                    cursor.records += 1;
                    cursor.sheet_records = n;
                    let pushed = values.and_then(|values| {
                        let encoder = encoder.as_ref().expect("the header comes first");
                        json.clear();
                        encoder.encode(values, &mut json);
                        let row_hash = hash::row_hash(&json);
                        let cell = |column: usize| match values.get(column) {
                            Some(CellValue::Text(text)) => KeyValue::Text(text),
                            Some(CellValue::Number(number)) => KeyValue::Number(*number),
                            Some(CellValue::Bool(flag)) => KeyValue::Bool(*flag),
                            Some(CellValue::Null) | None => KeyValue::Null,
                        };
                        let keyed = identity.push(
                            &mut writer,
                            &mut seen,
                            n,
                            sheet_row,
                            cell,
                            &row_hash,
                            &json,
                        )?;
                        let key = keyed.then_some(seen.last.as_str());
                        identity.chain(
                            key,
                            n,
                            &mut cursor,
                            &mut tree,
                            &mut logical_row_id,
                            &row_hash,
                        );
                        batch_bytes += json.len();
                        Ok(())
                    });
                    match pushed {
                        Ok(()) => {}
                        Err(problem) if skip_bad_rows => rejected.push(RejectedRow {
                            line: sheet_row,
                            byte: 0,
                            raw: Vec::new(),
                            problem,
                        }),
                        Err(problem) => {
                            return Err(SheetError::BadRow {
                                file: file_name.clone(),
                                sheet: planned.name.clone(),
                                row: sheet_row,
                                problem,
                            })
                        }
                    }
                    let pending = writer.rows() as usize + rejected.len();
                    if pending >= settings.batch_size || batch_bytes >= MAX_BATCH_BYTES {
                        let within = if height > 0 {
                            (n as f64 / height as f64).min(1.0)
                        } else {
                            0.0
                        };
                        if !flush(
                            &mut cursor,
                            &mut writer,
                            &mut rejected,
                            &tree,
                            index as f64 + within,
                            batch_started,
                        ) {
                            gone = true;
                            return Ok(Flow::Stop);
                        }
                        batch_bytes = 0;
                        batch_started = Instant::now();
                        // Repeats across batches are caught by the loader.
                        seen.lines.clear();
                    }
                }
            }
            Ok(Flow::Continue)
        };
        workbook.read_sheet(&planned.name, &file_name, &settings, &mut visit)?;
        if gone {
            return Ok(false);
        }
        if writer.rows() > 0 || !rejected.is_empty() {
            let progress = index as f64 + 1.0;
            if !flush(
                &mut cursor,
                &mut writer,
                &mut rejected,
                &tree,
                progress,
                batch_started,
            ) {
                return Ok(false);
            }
        }
        let header = cursor.header.take().unwrap_or_else(|| Header::resolve(&[]));
        cursor.completed_sheets.push(SheetLineage {
            name: planned.name.clone(),
            visibility: planned.visibility.to_owned(),
            rows: cursor.sheet_records,
            columns: header.columns,
            header_changes: header.changes,
        });
        cursor.sheet_index = index + 1;
        cursor.sheet_records = 0;
        tracing::info!(sheet = %planned.name, rows = cursor.completed_sheets.last().map(|s| s.rows).unwrap_or(0), "sheet read");
    }
    // The last word: a batch without rows whose checkpoint lists every sheet.
    cursor.byte_offset = size;
    let batch = Batch {
        rows: BatchWriter::new(&cursor.commit_id, &cursor.sheet, 0).finish(),
        rejected: Vec::new(),
        checkpoint: cursor,
        encode_duration: Duration::ZERO,
        lookup_duration: Duration::ZERO,
    };
    Ok(sender
        .blocking_send(Ok(Produced::Batch(Box::new(batch))))
        .is_ok())
}
