//! CSV: csv-async over the fetch stream (with a cap on record length), absolute byte and
//! line positions for errors and checkpoints, and records written straight into
//! canonical JSON by [`RowEncoder`].

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use csv_async::{AsyncReader, AsyncReaderBuilder, ByteRecord};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead};

use super::{CanonicalKeys, DecodeError, Header, RowProblem};
use crate::import::fetch::FetchError;
use crate::import::hash::write_json_string;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Turns records into canonical JSON objects (RFC 8785) with the header's names as keys.
#[derive(Clone, Debug)]
pub struct RowEncoder {
    keys: CanonicalKeys,
}

impl RowEncoder {
    pub fn new(header: &Header) -> Self {
        Self {
            keys: CanonicalKeys::new(header),
        }
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
                    return Err(RowProblem::InvalidUtf8 {
                        column: column + 1,
                        byte: record_byte
                            + field_offset(record, column)
                            + error.valid_up_to() as u64,
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

/// Turns an I/O error under the parser into a decode error, keeping a failed fetch
/// (object changed, store down) visible as what it is.
fn read_error(file: &str, byte: u64, error: std::io::Error) -> DecodeError {
    let message = error.to_string();
    if let Some(inner) = error.into_inner() {
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
}

impl CsvDecoder {
    /// `input` must deliver the object's bytes from `start.byte` on. At the top of the
    /// object a UTF-8 byte order mark is skipped (before the parser sees it, so a quoted
    /// first header cell stays quoted) and `start.crlf` is found out; a resumed read
    /// takes it from the header.
    /// Records longer than `max_record_bytes` are refused.
    pub async fn open(
        input: Pin<Box<dyn AsyncRead + Send>>,
        file: &str,
        mut start: CsvStart,
        max_record_bytes: u64,
    ) -> Result<Self, DecodeError> {
        let since_record = Arc::new(AtomicU64::new(0));
        let limited = RecordLimit {
            inner: input,
            since_record: since_record.clone(),
            limit: max_record_bytes,
        };
        let mut input = tokio::io::BufReader::with_capacity(256 * 1024, limited);
        if start.byte == 0 {
            start.at_top = true;
            let buffer = input
                .fill_buf()
                .await
                .map_err(|error| read_error(file, 0, error))?;
            // A spreadsheet under a CSV name would otherwise fail later, on a line that
            // means nothing to the person who uploaded it.
            let found = if buffer.starts_with(b"PK\x03\x04") {
                Some("a zip archive (xlsx, xlsb or ods?)")
            } else if buffer.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
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
            if buffer.starts_with(UTF8_BOM) {
                input.consume(UTF8_BOM.len());
                start.byte = UTF8_BOM.len() as u64;
            }
            let buffer = input
                .fill_buf()
                .await
                .map_err(|error| read_error(file, start.byte, error))?;
            start.crlf = first_line_ends_in_crlf(buffer);
        }
        let mut decoder = Self::new(Box::pin(input), file, start);
        decoder.since_record = since_record;
        Ok(decoder)
    }

    fn new(input: Pin<Box<dyn AsyncRead + Send>>, file: &str, start: CsvStart) -> Self {
        let reader = AsyncReaderBuilder::new()
            // After an I/O error every further read must fail too, never look like the
            // end of the file.
            .end_on_io_error(false)
            .has_headers(false)
            .flexible(true)
            .buffer_capacity(256 * 1024)
            .create_reader(input);
        Self {
            reader,
            file: file.to_owned(),
            start,
            since_record: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reads the header row; only valid at the top of the object. A header wider than
    /// `max_columns` is refused before its names are looked at, and the names are
    /// checked and made unique on the blocking pool: a hostile header is CPU work that
    /// must not hold an async worker (lease renewals and `/healthz` run there).
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
        let record_start = self.next_byte();
        match self.reader.read_byte_record(record).await {
            Ok(more) => {
                // The parser reads ahead by at most its buffer, so counting from here on
                // bounds the next record's length.
                self.since_record.store(0, Ordering::Relaxed);
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
        let mut decoder = CsvDecoder::open(Box::pin(data), "t.csv", top(), 1 << 20)
            .await
            .unwrap();
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
    async fn a_byte_order_mark_before_a_quoted_header_cell_is_not_part_of_it() {
        let data: &'static [u8] = b"\xEF\xBB\xBF\"id, with comma\",b\r\n1,2\r\n";
        let mut decoder = CsvDecoder::open(Box::pin(data), "t.csv", top(), 1 << 20)
            .await
            .unwrap();
        let header = decoder.read_header(4096).await.unwrap();
        assert_eq!(header.columns, vec!["id, with comma", "b"]);
        let first = decoder.next_record().await.unwrap().unwrap();
        assert_eq!((first.byte, first.line), (23, 2));
    }

    #[tokio::test]
    async fn a_nul_in_a_header_name_is_refused_naming_the_column() {
        let data: &'static [u8] = b"a,b\x00\n1,2\n";
        let mut decoder = CsvDecoder::open(Box::pin(data), "t.csv", top(), 1 << 20)
            .await
            .unwrap();
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
        let mut decoder = CsvDecoder::open(Box::pin(data), "t.csv", top(), 1 << 20)
            .await
            .unwrap();
        decoder.read_header(4096).await.unwrap();
        let mut record = ByteRecord::new();
        assert!(decoder.read_record(&mut record).await.unwrap());
        let error = decoder.read_record(&mut record).await.unwrap_err();
        assert!(
            matches!(error, DecodeError::RecordTooLong { byte: 8, .. }),
            "{error}"
        );
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

    #[tokio::test]
    async fn lf_files_number_lines_as_they_are() {
        let data: &'static [u8] = b"h1,h2\n\"a\nb\",c\nd,e";
        let (records, end) = read_all(data, top()).await;
        let positions: Vec<_> = records.iter().map(|r| (r.byte, r.line)).collect();
        assert_eq!(positions, vec![(0, 1), (6, 2), (14, 4)]);
        assert_eq!(end, data.len() as u64);
    }
}
