//! CSV: csv-async over the fetch stream (with a cap on record length), absolute byte and
//! line positions for errors and checkpoints, and records written straight into
//! canonical JSON by [`RowEncoder`].

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use csv_async::{AsyncReader, AsyncReaderBuilder, ByteRecord};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::text::TextError;
use super::{CanonicalKeys, DecodeError, Header, RowProblem};
use crate::import::fetch::FetchError;
use crate::import::hash::write_json_string;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// How much of the text's top is read before parsing: enough lines to sniff the
/// delimiter from.
const SNIFF_BYTES: usize = 64 * 1024;

/// Lines the delimiter is sniffed from, at most.
const SNIFF_LINES: usize = 50;

/// The delimiters sniffed for, in the order that breaks a tie.
const SNIFFED_DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// How records are split: the dialect options, with the delimiter left to sniffing
/// when none was given or implied by the name.
#[derive(Clone, Copy, Debug)]
pub struct CsvFormat {
    pub delimiter: Option<u8>,
    pub quote: u8,
    pub escape: Option<u8>,
    /// Whether the first record is the header (otherwise columns are `column_N`).
    pub header: bool,
}

impl Default for CsvFormat {
    fn default() -> Self {
        Self {
            delimiter: Some(b','),
            quote: b'"',
            escape: None,
            header: true,
        }
    }
}

/// Picks the delimiter of `sample` (the text's first lines) among `,` `;` tab and `|`:
/// the one that splits the most lines into as many fields as the first line, then the
/// one that gives the first line more fields, then the first in that order. Delimiters
/// inside quotes do not count; a candidate the first line lacks is not one. Without
/// any, the text is one column and `,` is as good as another.
pub fn sniff_delimiter(sample: &[u8], quote: u8, complete: bool) -> u8 {
    let mut lines: Vec<[usize; 4]> = Vec::new();
    let mut counts = [0usize; 4];
    let mut length = 0usize;
    let mut quoted = false;
    for &byte in sample {
        if byte == quote {
            quoted = !quoted;
            length += 1;
            continue;
        }
        match byte {
            // A line end inside quotes is part of a value, not the end of a record.
            b'\n' if !quoted => {
                if length > 0 {
                    lines.push(counts);
                }
                counts = [0; 4];
                length = 0;
                if lines.len() == SNIFF_LINES {
                    break;
                }
            }
            b'\r' => {}
            _ => {
                length += 1;
                if !quoted {
                    if let Some(index) = SNIFFED_DELIMITERS.iter().position(|&c| c == byte) {
                        counts[index] += 1;
                    }
                }
            }
        }
    }
    // A last line cut off by the sample's end would count short.
    if complete && length > 0 && lines.len() < SNIFF_LINES {
        lines.push(counts);
    }
    let Some(first) = lines.first() else {
        return b',';
    };
    (0..SNIFFED_DELIMITERS.len())
        .filter(|&index| first[index] > 0)
        .max_by_key(|&index| {
            let matching = lines
                .iter()
                .filter(|line| line[index] == first[index])
                .count();
            (matching, first[index], std::cmp::Reverse(index))
        })
        .map_or(b',', |index| SNIFFED_DELIMITERS[index])
}

/// Turns records into canonical JSON objects (RFC 8785) with the header's names as keys.
#[derive(Clone, Debug)]
pub struct RowEncoder {
    keys: CanonicalKeys,
    /// The encoding the text was decoded from, when not UTF-8: invalid bytes are then
    /// the decoder's mark for a sequence invalid in it.
    encoding: Option<String>,
}

impl RowEncoder {
    pub fn new(header: &Header) -> Self {
        Self {
            keys: CanonicalKeys::new(header),
            encoding: None,
        }
    }

    /// For text decoded from another encoding than UTF-8 (its lineage name).
    pub fn decoded_from(mut self, encoding: &str) -> Self {
        if encoding != "utf-8" {
            self.encoding = Some(encoding.to_owned());
        }
        self
    }

    /// Appends the record's canonical JSON to `out`; on error `out` is left as it was.
    /// `record_byte` is the record's absolute byte offset, used to place a UTF-8 error.
    pub fn encode(
        &self,
        record: &ByteRecord,
        record_byte: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), RowProblem> {
        if record.len() != self.keys.len() {
            return Err(RowProblem::Ragged {
                expected: self.keys.len(),
                found: record.len(),
            });
        }
        let start = out.len();
        if self.keys.is_empty() {
            out.extend_from_slice(b"{}");
            return Ok(());
        }
        for (prefix, column) in self.keys.fields() {
            let field = &record[column];
            let text = match std::str::from_utf8(field) {
                Ok(text) => text,
                Err(error) => {
                    out.truncate(start);
                    let column = column + 1;
                    let byte =
                        record_byte + field_offset(record, column - 1) + error.valid_up_to() as u64;
                    return Err(match &self.encoding {
                        Some(encoding) => RowProblem::InvalidEncoding {
                            column,
                            byte,
                            encoding: encoding.clone(),
                        },
                        None => RowProblem::InvalidUtf8 { column, byte },
                    });
                }
            };
            if field.contains(&0) {
                out.truncate(start);
                return Err(RowProblem::NulCharacter { column: column + 1 });
            }
            out.extend_from_slice(prefix);
            write_json_string(text, out);
        }
        out.push(b'}');
        Ok(())
    }
}

/// Approximate offset of a field inside its record: the lengths of the fields before it
/// plus their delimiters. Quoting makes the true offset larger; the line and the record's
/// own byte offset stay exact, which is what a person needs to find the field.
fn field_offset(record: &ByteRecord, column: usize) -> u64 {
    (0..column)
        .map(|index| record[index].len() as u64 + 1)
        .sum()
}

/// Where a CSV read starts: the top of the object, or a checkpoint after the header.
///
/// The CSV parser ends a CRLF record after its `\r` and consumes the `\n` as the start
/// of the next record, counting lines at each `\n`. Checkpoints keep the parser's own
/// positions (resuming there reads the same records), while [`Self::position_of`]
/// corrects them for people when the file's lines end in CRLF.
#[derive(Clone, Copy, Debug)]
pub struct CsvStart {
    pub byte: u64,
    /// The parser's line number at `byte`.
    pub line: u64,
    /// Whether the file's first line ends in CRLF.
    pub crlf: bool,
    /// Whether `byte` is the top of the object (after a byte order mark, if any), where
    /// the first record starts on its own first byte rather than on a pending `\n`.
    pub at_top: bool,
}

impl CsvStart {
    /// Absolute byte offset and line number of the first character of `record`, read
    /// from here, as a person opening the file would count them.
    pub fn position_of(&self, record: &ByteRecord) -> (u64, u64) {
        let relative = record
            .position()
            .map(|position| position.byte())
            .unwrap_or(0);
        let (byte, line) = match record.position() {
            Some(position) => (self.byte + position.byte(), self.line + position.line() - 1),
            None => (self.byte, self.line),
        };
        if self.crlf && !(self.at_top && relative == 0) {
            (byte + 1, line + 1)
        } else {
            (byte, line)
        }
    }
}

/// The delimiter a first line `sep=X` names (any case of `sep`), and the length of
/// that line with its line end.
fn separator_line(buffer: &[u8]) -> Option<(u8, usize)> {
    let (name, rest) = buffer.split_at_checked(4)?;
    if !name.eq_ignore_ascii_case(b"sep=") {
        return None;
    }
    let (&delimiter, end) = rest.split_first()?;
    if delimiter == b'\r' || delimiter == b'\n' {
        return None;
    }
    let line_end = match end {
        [] => 0,
        [b'\n', ..] => 1,
        [b'\r', b'\n', ..] => 2,
        [b'\r', ..] => 1,
        _ => return None,
    };
    Some((delimiter, 5 + line_end))
}

/// Whether the first line in `buffer` ends in CRLF.
fn first_line_ends_in_crlf(buffer: &[u8]) -> bool {
    buffer
        .iter()
        .position(|&byte| byte == b'\n')
        .is_some_and(|newline| newline > 0 && buffer[newline - 1] == b'\r')
}

/// Fails the read once more than `limit` bytes were delivered without a record
/// completing; the decoder resets the count after each record. A record that long is
/// almost always an unterminated quote, which would otherwise make the parser read the
/// rest of the file into one record.
struct RecordLimit {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    since_record: Arc<AtomicU64>,
    limit: u64,
}

#[derive(Debug, Error)]
#[error("record longer than {0} bytes")]
struct RecordTooLong(u64);

impl AsyncRead for RecordLimit {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.since_record.load(Ordering::Relaxed) > self.limit {
            let limit = self.limit;
            return std::task::Poll::Ready(Err(std::io::Error::other(RecordTooLong(limit))));
        }
        let before = buf.filled().len();
        let poll = self.inner.as_mut().poll_read(cx, buf);
        let added = (buf.filled().len() - before) as u64;
        self.since_record.fetch_add(added, Ordering::Relaxed);
        poll
    }
}

/// Where the parser's quoting stands after the bytes seen so far. It follows the
/// parser's rules (RFC 4180 with doubled quotes, an optional escape byte, a quote
/// special only at the start of a field) closely enough to tell one thing: whether a
/// quoted field is still open when the text ends. The parser ends such a field at the
/// end of the input without a word, so a quote left open would silently make the rest
/// of the file one value of the last record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quoting {
    /// At the start of a field (or of a record): a quote here opens a quoted field.
    FieldStart,
    /// In an unquoted field, where quotes are ordinary bytes.
    Unquoted,
    Quoted,
    /// In a quoted field, just after a quote: a second one is a quote in the value,
    /// anything else ends the quoting.
    QuoteInQuoted,
    /// In a quoted field, just after the escape byte.
    Escaped,
}

#[derive(Clone, Copy)]
struct QuoteRules {
    delimiter: u8,
    quote: u8,
    escape: Option<u8>,
}

impl Quoting {
    /// The state after `bytes`. Outside quotes only a quote can change what follows,
    /// and inside them only a quote or the escape byte, so the scan jumps from one to
    /// the next: most text has few quotes, and this costs little more than reading it.
    fn after(mut self, bytes: &[u8], rules: QuoteRules) -> Self {
        let ends_field = |byte: u8| byte == rules.delimiter || byte == b'\n' || byte == b'\r';
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            match self {
                Quoting::FieldStart | Quoting::Unquoted => {
                    let Some(quote) = memchr::memchr(rules.quote, rest) else {
                        // Whether the next byte starts a field is up to the last one.
                        let last = bytes[bytes.len() - 1];
                        return if ends_field(last) {
                            Quoting::FieldStart
                        } else {
                            Quoting::Unquoted
                        };
                    };
                    let at_field_start = if quote == 0 {
                        self == Quoting::FieldStart
                    } else {
                        ends_field(rest[quote - 1])
                    };
                    // A quote inside an unquoted field is an ordinary byte.
                    self = if at_field_start {
                        Quoting::Quoted
                    } else {
                        Quoting::Unquoted
                    };
                    at += quote + 1;
                }
                Quoting::Quoted => {
                    let next = match rules.escape {
                        Some(escape) => memchr::memchr2(rules.quote, escape, rest),
                        None => memchr::memchr(rules.quote, rest),
                    };
                    let Some(next) = next else {
                        return self;
                    };
                    self = if rest[next] == rules.quote {
                        Quoting::QuoteInQuoted
                    } else {
                        Quoting::Escaped
                    };
                    at += next + 1;
                }
                Quoting::QuoteInQuoted => {
                    self = if rest[0] == rules.quote {
                        Quoting::Quoted
                    } else if ends_field(rest[0]) {
                        Quoting::FieldStart
                    } else {
                        Quoting::Unquoted
                    };
                    at += 1;
                }
                Quoting::Escaped => {
                    self = Quoting::Quoted;
                    at += 1;
                }
            }
        }
        self
    }

    fn is_open(self) -> bool {
        matches!(self, Quoting::Quoted | Quoting::Escaped)
    }
}

/// Passes the text through unchanged, following its quoting (see [`Quoting`]); at the
/// end of the text it records whether a quoted field was left open.
struct QuoteWatch {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    quoting: Quoting,
    rules: QuoteRules,
    open_at_end: Arc<AtomicBool>,
}

impl AsyncRead for QuoteWatch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = self.inner.as_mut().poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &poll {
            let added = &buf.filled()[before..];
            if added.is_empty() {
                if buf.remaining() > 0 {
                    self.open_at_end
                        .store(self.quoting.is_open(), Ordering::Relaxed);
                }
            } else {
                let rules = self.rules;
                self.quoting = self.quoting.after(added, rules);
            }
        }
        poll
    }
}

/// Turns an I/O error under the parser into a decode error, keeping a failed fetch
/// (object changed, store down) and a decompression problem visible as what they are.
pub fn read_error(file: &str, byte: u64, error: std::io::Error) -> DecodeError {
    let message = error.to_string();
    if let Some(inner) = error.into_inner() {
        let inner = match inner.downcast::<TextError>() {
            Ok(problem) => {
                return DecodeError::Text {
                    file: file.to_owned(),
                    problem: *problem,
                }
            }
            Err(inner) => inner,
        };
        match inner.downcast::<FetchError>() {
            Ok(fetch) => return DecodeError::Source(*fetch),
            Err(inner) => {
                if let Some(RecordTooLong(limit)) = inner.downcast_ref::<RecordTooLong>() {
                    return DecodeError::RecordTooLong {
                        file: file.to_owned(),
                        byte,
                        limit: *limit,
                    };
                }
            }
        }
    }
    DecodeError::Read {
        file: file.to_owned(),
        byte,
        message,
    }
}

/// The header's names, each checked (UTF-8, no NUL) and made unique.
fn resolve_header(first: &PositionedRecord, file: &str) -> Result<Header, DecodeError> {
    let mut names = Vec::with_capacity(first.record.len());
    for (index, field) in first.record.iter().enumerate() {
        if field.contains(&0) {
            return Err(DecodeError::BadHeader {
                file: file.to_owned(),
                problem: RowProblem::NulCharacter { column: index + 1 },
            });
        }
        let name = std::str::from_utf8(field).map_err(|error| DecodeError::BadHeader {
            file: file.to_owned(),
            problem: RowProblem::InvalidUtf8 {
                column: index + 1,
                byte: first.byte + field_offset(&first.record, index) + error.valid_up_to() as u64,
            },
        })?;
        names.push(name.to_owned());
    }
    Ok(Header::resolve(&names))
}

/// One record with its absolute position.
pub struct PositionedRecord {
    pub record: ByteRecord,
    pub byte: u64,
    pub line: u64,
}

/// Reads CSV records with RFC 4180 quoting, embedded newlines and CRLF line ends.
pub struct CsvDecoder {
    reader: AsyncReader<Pin<Box<dyn AsyncRead + Send>>>,
    file: String,
    start: CsvStart,
    /// Bytes delivered to the parser since the last complete record (see [`RecordLimit`]).
    since_record: Arc<AtomicU64>,
    format: CsvFormat,
    /// Whether the delimiter was sniffed.
    sniffed: bool,
    /// Without a header: the first record, read to count the columns and returned
    /// again as the first data row.
    pending: Option<ByteRecord>,
    /// Set at the end of the text when a quoted field was still open (see [`Quoting`]).
    quote_open_at_end: Arc<AtomicBool>,
    /// Where the last record read started (byte, line): a quote left open is in it.
    last_record: (u64, u64),
}

impl CsvDecoder {
    /// `input` must deliver the text from `start.byte` on. At the top of the text a
    /// UTF-8 byte order mark is skipped (before the parser sees it, so a quoted first
    /// header cell stays quoted), `start.crlf` is found out and a missing delimiter is
    /// sniffed from the first lines; a resumed read takes them from the checkpoint.
    /// Records longer than `max_record_bytes` are refused.
    pub async fn open(
        mut input: Pin<Box<dyn AsyncRead + Send>>,
        file: &str,
        mut start: CsvStart,
        max_record_bytes: u64,
        mut format: CsvFormat,
    ) -> Result<Self, DecodeError> {
        let mut sniffed = false;
        if start.byte == 0 {
            start.at_top = true;
            let mut top = Vec::with_capacity(SNIFF_BYTES);
            while top.len() < SNIFF_BYTES {
                let wanted = (SNIFF_BYTES - top.len()) as u64;
                let read = (&mut input)
                    .take(wanted)
                    .read_to_end(&mut top)
                    .await
                    .map_err(|error| read_error(file, top.len() as u64, error))?;
                if read == 0 {
                    break;
                }
            }
            let complete = top.len() < SNIFF_BYTES;
            // A spreadsheet under a CSV name would otherwise fail later, on a line that
            // means nothing to the person who uploaded it.
            let found = if top.starts_with(b"PK\x03\x04") {
                Some("a zip archive (xlsx, xlsb or ods?)")
            } else if top.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
                Some("an OLE2 compound file (xls?)")
            } else {
                None
            };
            if let Some(found) = found {
                return Err(DecodeError::NotCsv {
                    file: file.to_owned(),
                    found,
                });
            }
            if top.starts_with(UTF8_BOM) {
                top.drain(..UTF8_BOM.len());
                start.byte = UTF8_BOM.len() as u64;
            }
            // Excel, and tools that write for it, may name the delimiter on a first
            // line of its own, `sep=;`: a directive, not the header. A delimiter given
            // with the import still wins.
            if let Some((delimiter, length)) = separator_line(&top) {
                top.drain(..length);
                start.byte += length as u64;
                start.line += 1;
                format.delimiter.get_or_insert(delimiter);
            }
            start.crlf = first_line_ends_in_crlf(&top);
            if format.delimiter.is_none() {
                format.delimiter = Some(sniff_delimiter(&top, format.quote, complete));
                sniffed = true;
            }
            input = Box::pin(std::io::Cursor::new(top).chain(input));
        }
        let since_record = Arc::new(AtomicU64::new(0));
        let limited = RecordLimit {
            inner: input,
            since_record: since_record.clone(),
            limit: max_record_bytes,
        };
        // A resumed read starts at a record's first byte, where no quote is open.
        let quote_open_at_end = Arc::new(AtomicBool::new(false));
        let watched = QuoteWatch {
            inner: Box::pin(limited),
            quoting: Quoting::FieldStart,
            rules: QuoteRules {
                delimiter: format.delimiter.unwrap_or(b','),
                quote: format.quote,
                escape: format.escape,
            },
            open_at_end: quote_open_at_end.clone(),
        };
        let mut decoder = Self::new(Box::pin(watched), file, start, format);
        decoder.since_record = since_record;
        decoder.quote_open_at_end = quote_open_at_end;
        decoder.sniffed = sniffed;
        Ok(decoder)
    }

    fn new(
        input: Pin<Box<dyn AsyncRead + Send>>,
        file: &str,
        start: CsvStart,
        format: CsvFormat,
    ) -> Self {
        let reader = AsyncReaderBuilder::new()
            // After an I/O error every further read must fail too, never look like the
            // end of the file.
            .end_on_io_error(false)
            .has_headers(false)
            .flexible(true)
            .delimiter(format.delimiter.unwrap_or(b','))
            .quote(format.quote)
            .escape(format.escape)
            .buffer_capacity(256 * 1024)
            .create_reader(input);
        Self {
            reader,
            file: file.to_owned(),
            start,
            since_record: Arc::new(AtomicU64::new(0)),
            format,
            sniffed: false,
            pending: None,
            quote_open_at_end: Arc::new(AtomicBool::new(false)),
            last_record: (start.byte, start.line),
        }
    }

    /// The delimiter the decoder splits on, and whether it was sniffed.
    pub fn delimiter(&self) -> (u8, bool) {
        (self.format.delimiter.unwrap_or(b','), self.sniffed)
    }

    /// Reads the header row; only valid at the top of the object. A header wider than
    /// `max_columns` is refused before its names are looked at, and the names are
    /// checked and made unique on the blocking pool: a hostile header is CPU work that
    /// must not hold an async worker (lease renewals and `/healthz` run there).
    ///
    /// Without a header (`--no-header`) the first record only counts the columns,
    /// named `column_1`, `column_2`, ..., and is the first data row.
    pub async fn read_header(&mut self, max_columns: u64) -> Result<Header, DecodeError> {
        let Some(first) = self.next_record().await? else {
            return Err(DecodeError::MissingHeader {
                file: self.file.clone(),
            });
        };
        if first.record.len() as u64 > max_columns {
            return Err(DecodeError::TooManyColumns {
                file: self.file.clone(),
                columns: first.record.len(),
                limit: max_columns,
            });
        }
        if !self.format.header {
            let header = Header {
                columns: (1..=first.record.len())
                    .map(|column| format!("column_{column}"))
                    .collect(),
                changes: Vec::new(),
                crlf: self.start.crlf,
            };
            self.pending = Some(first.record);
            return Ok(header);
        }
        let file = self.file.clone();
        let crlf = self.start.crlf;
        tokio::task::spawn_blocking(move || {
            let mut header = resolve_header(&first, &file)?;
            header.crlf = crlf;
            Ok(header)
        })
        .await
        .map_err(|panic| DecodeError::Read {
            file: self.file.clone(),
            byte: 0,
            message: format!("resolving the header panicked: {panic}"),
        })?
    }

    /// The next record, or `None` at the end of the object.
    pub async fn next_record(&mut self) -> Result<Option<PositionedRecord>, DecodeError> {
        let mut record = ByteRecord::new();
        if !self.read_record(&mut record).await? {
            return Ok(None);
        }
        let (byte, line) = self.start.position_of(&record);
        Ok(Some(PositionedRecord { record, byte, line }))
    }

    /// Reads the next record into `record`, reusing its allocation; `false` at the end.
    pub async fn read_record(&mut self, record: &mut ByteRecord) -> Result<bool, DecodeError> {
        if let Some(pending) = self.pending.take() {
            *record = pending;
            return Ok(true);
        }
        let record_start = self.next_byte();
        match self.reader.read_byte_record(record).await {
            Ok(more) => {
                // The parser reads ahead by at most its buffer, so counting from here on
                // bounds the next record's length.
                self.since_record.store(0, Ordering::Relaxed);
                if more {
                    self.last_record = self.start.position_of(record);
                } else if self.quote_open_at_end.load(Ordering::Relaxed) {
                    let (byte, line) = self.last_record;
                    return Err(DecodeError::UnterminatedQuote {
                        file: self.file.clone(),
                        line,
                        byte,
                    });
                }
                Ok(more)
            }
            Err(error) => Err(match error.into_kind() {
                csv_async::ErrorKind::Io(io) => read_error(&self.file, record_start, io),
                other => DecodeError::Read {
                    file: self.file.clone(),
                    byte: record_start,
                    message: format!("{other:?}"),
                },
            }),
        }
    }

    /// Where this decoder started reading; positions in records are relative to it.
    pub fn start(&self) -> CsvStart {
        self.start
    }

    /// Absolute offset of the first byte not yet consumed: where a resume would start.
    pub fn next_byte(&self) -> u64 {
        self.start.byte + self.reader.position().byte()
    }

    /// Absolute line number at [`Self::next_byte`].
    pub fn next_line(&self) -> u64 {
        self.start.line + self.reader.position().line() - 1
    }

    pub fn file(&self) -> &str {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_written_in_canonical_key_order() {
        let header = Header::resolve(&["b".into(), "a".into(), "\u{20ac}".into()]);
        let encoder = RowEncoder::new(&header);
        let mut out = Vec::new();
        let record = ByteRecord::from(vec!["1", "x\"y\n", "€"]);
        encoder.encode(&record, 0, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"a\":\"x\\\"y\\n\",\"b\":\"1\",\"€\":\"€\"}"
        );
    }

    #[test]
    fn ragged_and_invalid_rows_are_refused_without_output() {
        let header = Header::resolve(&["a".into(), "b".into()]);
        let encoder = RowEncoder::new(&header);
        let mut out = b"keep".to_vec();
        let ragged = ByteRecord::from(vec!["1"]);
        assert_eq!(
            encoder.encode(&ragged, 0, &mut out),
            Err(RowProblem::Ragged {
                expected: 2,
                found: 1
            })
        );
        let invalid = ByteRecord::from(vec![&b"ok"[..], &b"\xff"[..]]);
        assert_eq!(
            encoder.encode(&invalid, 100, &mut out),
            Err(RowProblem::InvalidUtf8 {
                column: 2,
                byte: 103
            })
        );
        assert_eq!(out, b"keep");
    }

    async fn read_all(data: &'static [u8], start: CsvStart) -> (Vec<PositionedRecord>, u64) {
        let mut decoder = CsvDecoder::open(
            Box::pin(&data[start.byte as usize..]),
            "t.csv",
            start,
            1 << 20,
            CsvFormat::default(),
        )
        .await
        .unwrap();
        let mut records = Vec::new();
        while let Some(record) = decoder.next_record().await.unwrap() {
            records.push(record);
        }
        let end = decoder.next_byte();
        (records, end)
    }

    /// A decoder over the whole of `data`, from its top.
    async fn open_at_top(data: &'static [u8], format: CsvFormat) -> CsvDecoder {
        CsvDecoder::open(Box::pin(data), "t.csv", top(), 1 << 20, format)
            .await
            .unwrap()
    }

    fn top() -> CsvStart {
        CsvStart {
            byte: 0,
            line: 1,
            crlf: false,
            at_top: false,
        }
    }

    #[tokio::test]
    async fn positions_are_absolute_and_resumable_with_bom_crlf_and_embedded_newlines() {
        let data: &'static [u8] = b"\xEF\xBB\xBFh1,h2\r\n\"a\nb\",c\r\nd,e\r\n";
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        let header = decoder.read_header(4096).await.unwrap();
        assert_eq!(header.columns, vec!["h1", "h2"]);
        assert!(header.crlf);
        let first = decoder.next_record().await.unwrap().unwrap();
        // People count the record's first character: byte 10 (after BOM, header, CRLF), line 2.
        assert_eq!((first.byte, first.line), (10, 2));
        assert_eq!(&first.record[0], b"a\nb");
        let resume = CsvStart {
            byte: decoder.next_byte(),
            line: decoder.next_line(),
            crlf: header.crlf,
            at_top: false,
        };
        let (rest, end) = read_all(data, resume).await;
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].byte, rest[0].line), (19, 4));
        assert_eq!(&rest[0].record[1], b"e");
        assert_eq!(end, data.len() as u64);
    }

    #[tokio::test]
    async fn an_excel_separator_line_names_the_delimiter_and_is_not_the_header() {
        let data: &'static [u8] = b"\xEF\xBB\xBFsep=;\r\nid;name\r\n1;\"a;b\"\r\n2;c\r\n";
        let mut decoder = open_at_top(
            data,
            CsvFormat {
                delimiter: None,
                ..CsvFormat::default()
            },
        )
        .await;
        assert_eq!(decoder.delimiter(), (b';', false));
        let header = decoder.read_header(4096).await.unwrap();
        assert_eq!(header.columns, vec!["id", "name"]);
        assert!(header.crlf);
        let first = decoder.next_record().await.unwrap().unwrap();
        // The file's own lines and bytes: BOM 3, `sep=;` line 7, header 9.
        assert_eq!((first.byte, first.line), (19, 3));
        assert_eq!(&first.record[1], b"a;b");
        let second = decoder.next_record().await.unwrap().unwrap();
        assert_eq!((second.byte, second.line), (28, 4));
        assert!(decoder.next_record().await.unwrap().is_none());

        // Lines that only look like one, and a delimiter given with the import.
        assert_eq!(separator_line(b"SEP=|\nx"), Some((b'|', 6)));
        assert_eq!(separator_line(b"sep=\t"), Some((b'\t', 5)));
        assert_eq!(separator_line(b"sep=;;\n"), None);
        assert_eq!(separator_line(b"sep=\n"), None);
        assert_eq!(separator_line(b"separator\n"), None);
        let data: &'static [u8] = b"sep=;\na,b\n1,2\n";
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        assert_eq!(decoder.delimiter(), (b',', false));
        assert_eq!(
            decoder.read_header(4096).await.unwrap().columns,
            vec!["a", "b"]
        );
    }

    #[tokio::test]
    async fn a_byte_order_mark_before_a_quoted_header_cell_is_not_part_of_it() {
        let data: &'static [u8] = b"\xEF\xBB\xBF\"id, with comma\",b\r\n1,2\r\n";
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        let header = decoder.read_header(4096).await.unwrap();
        assert_eq!(header.columns, vec!["id, with comma", "b"]);
        let first = decoder.next_record().await.unwrap().unwrap();
        assert_eq!((first.byte, first.line), (23, 2));
    }

    #[tokio::test]
    async fn a_nul_in_a_header_name_is_refused_naming_the_column() {
        let data: &'static [u8] = b"a,b\x00\n1,2\n";
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        let error = decoder.read_header(4096).await.unwrap_err().to_string();
        assert_eq!(
            error,
            "t.csv: header (line 1): column 2 contains a NUL character, which PostgreSQL cannot store in JSON"
        );
    }

    #[tokio::test]
    async fn an_unterminated_quote_is_refused_once_the_record_passes_the_limit() {
        let mut data = b"a,b\n1,2\n3,\"open".to_vec();
        data.extend(std::iter::repeat_n(b'x', 4 << 20));
        let data: &'static [u8] = Box::leak(data.into_boxed_slice());
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        decoder.read_header(4096).await.unwrap();
        let mut record = ByteRecord::new();
        assert!(decoder.read_record(&mut record).await.unwrap());
        let error = decoder.read_record(&mut record).await.unwrap_err();
        assert!(
            matches!(error, DecodeError::RecordTooLong { byte: 8, .. }),
            "{error}"
        );
    }

    /// Reads every record of `data` with `format`; how many there were, or the first
    /// error.
    async fn read_to_end(data: &'static [u8], format: CsvFormat) -> Result<usize, DecodeError> {
        let mut decoder = open_at_top(data, format).await;
        let mut records = 0;
        while decoder.next_record().await?.is_some() {
            records += 1;
        }
        Ok(records)
    }

    #[tokio::test]
    async fn a_quote_left_open_to_the_end_is_refused_naming_the_record_it_opens_in() {
        // Without the check the parser gives three records, the last one "2" and the
        // rest of the file as its value.
        let data: &'static [u8] = b"id,name\n1,a\n2,\"open\n3,c\n4,d\n";
        let error = read_to_end(data, CsvFormat::default()).await.unwrap_err();
        assert!(
            matches!(
                error,
                DecodeError::UnterminatedQuote {
                    line: 3,
                    byte: 12,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "t.csv: line 3, byte 12: a quoted field in this record is never closed; \
             the parser would take the rest of the file as its value (is a quote left open?)"
        );
        // In the header, and with CRLF line ends and an escape byte before the end.
        for (data, escape) in [
            (&b"\"id,name\n1,a\n"[..], None),
            (b"id,name\r\n1,\"a\r\n", None),
            (b"id,name\n1,\"a\\\"", Some(b'\\')),
        ] {
            let format = CsvFormat {
                escape,
                ..CsvFormat::default()
            };
            let error = read_to_end(data, format).await.unwrap_err();
            assert!(
                matches!(error, DecodeError::UnterminatedQuote { .. }),
                "{:?}: {error}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn the_quoting_is_the_same_however_the_text_is_split_into_reads() {
        let rules = QuoteRules {
            delimiter: b',',
            quote: b'"',
            escape: Some(b'\\'),
        };
        for data in [
            &b"a,b\n1,\"x,\"\"y\"\n"[..],
            b"a,\"b\n5\" x,\"\\\"\"\r\n\"",
            b"\"\",\"\"\"\",x\"\"\n\"open",
            b"x\"y,\"z\\",
        ] {
            let whole = Quoting::FieldStart.after(data, rules);
            for split in 0..=data.len() {
                let (head, tail) = data.split_at(split);
                let parts = Quoting::FieldStart.after(head, rules).after(tail, rules);
                assert_eq!(
                    parts,
                    whole,
                    "{:?} split at {split}",
                    String::from_utf8_lossy(data)
                );
            }
            let bytewise = data.iter().fold(Quoting::FieldStart, |state, byte| {
                state.after(&[*byte], rules)
            });
            assert_eq!(bytewise, whole, "{:?}", String::from_utf8_lossy(data));
        }
    }

    #[tokio::test]
    async fn closed_doubled_escaped_and_mid_field_quotes_are_not_taken_for_open_ones() {
        for (data, escape, records) in [
            (&b"a,b\n1,\"x\"\n"[..], None, 2),
            (b"a,b\n1,\"x\"", None, 2),
            (b"a,b\n1,\"say \"\"hi\"\"\"\n", None, 2),
            (b"a,b\n1,\"x\"\"\"", None, 2),
            (b"a,b\n5\" pipe,\"ok\"\n", None, 2),
            (b"a,b\n1,x\"\n2,\"y\"z\n", None, 3),
            (b"a,b\r\n\"1\r\n2\",\"\"\r\n", None, 2),
            (b"a,b\n1,\"x\\\"y\"\n", Some(b'\\'), 2),
            (b"a,b\n1,\"x\\\\\"", Some(b'\\'), 2),
        ] {
            let format = CsvFormat {
                escape,
                ..CsvFormat::default()
            };
            let read = read_to_end(data, format).await;
            assert_eq!(
                read.map_err(|error| error.to_string()),
                Ok(records),
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[tokio::test]
    async fn the_end_position_is_the_size_whatever_the_file_ends_with() {
        for data in [
            &b"a,b\n1,2"[..],
            b"a,b\n1,2\n",
            b"a,b\n1,2\n\n\n",
            b"a,b\r\n1,2\r\n",
            b"a,b\r\n1,2\r\n\r\n",
            b"a,b\n1,\"2\"",
            b"\xEF\xBB\xBFa,b\n",
        ] {
            let data: &'static [u8] = Box::leak(data.to_vec().into_boxed_slice());
            let (_, end) = read_all(data, top()).await;
            assert_eq!(
                end,
                data.len() as u64,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn the_delimiter_is_sniffed_from_the_lines_it_splits_alike() {
        // European numbers: the comma is inside values, the semicolon splits.
        assert_eq!(
            sniff_delimiter(b"name;price\nfoo;1,5\nbar;2,25\n", b'"', true),
            b';'
        );
        assert_eq!(sniff_delimiter(b"a\tb\tc\n1\t2,5\t3\n", b'"', true), b'\t');
        assert_eq!(sniff_delimiter(b"a|b\n\"x|y\"|2\n", b'"', true), b'|');
        // Delimiters inside quotes, even across lines, do not count.
        assert_eq!(
            sniff_delimiter(b"a,b\n\"1;2\n3;4\",5\n6,7\n", b'"', true),
            b','
        );
        // A tie on every line: more fields wins, then the order , ; tab |.
        assert_eq!(sniff_delimiter(b"a;b;c,d\n1;2;3,4\n", b'"', true), b';');
        assert_eq!(sniff_delimiter(b"a;b,c\n1;2,3\n", b'"', true), b',');
        // One column, or nothing at all.
        assert_eq!(sniff_delimiter(b"name\nx\n", b'"', true), b',');
        assert_eq!(sniff_delimiter(b"", b'"', true), b',');
        // A cut-off last line does not count against a delimiter.
        assert_eq!(sniff_delimiter(b"a;b;c\n1;2;3\n4;5", b'"', false), b';');
    }

    #[tokio::test]
    async fn without_a_header_the_first_line_is_data_and_columns_are_numbered() {
        let data: &'static [u8] = b"1;x\n2;y\n";
        let format = CsvFormat {
            delimiter: None,
            header: false,
            ..CsvFormat::default()
        };
        let mut decoder = open_at_top(data, format).await;
        assert_eq!(decoder.delimiter(), (b';', true));
        let header = decoder.read_header(4096).await.unwrap();
        assert_eq!(header.columns, vec!["column_1", "column_2"]);
        let first = decoder.next_record().await.unwrap().unwrap();
        assert_eq!((first.byte, first.line), (0, 1));
        assert_eq!(&first.record[0], b"1");
        let second = decoder.next_record().await.unwrap().unwrap();
        assert_eq!((second.byte, second.line), (4, 2));
        assert!(decoder.next_record().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn lf_files_number_lines_as_they_are() {
        let data: &'static [u8] = b"h1,h2\n\"a\nb\",c\nd,e";
        let (records, end) = read_all(data, top()).await;
        let positions: Vec<_> = records.iter().map(|r| (r.byte, r.line)).collect();
        assert_eq!(positions, vec![(0, 1), (6, 2), (14, 4)]);
        assert_eq!(end, data.len() as u64);
    }
}
