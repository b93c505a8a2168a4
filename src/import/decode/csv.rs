//! CSV: csv-async over the fetch stream (with a cap on record length), absolute byte and
//! line positions for errors and checkpoints, and records written straight into
//! canonical JSON by [`RowEncoder`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use csv_async::{AsyncReader, AsyncReaderBuilder, ByteRecord, Position};
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
    // A last line cut off by the sample's end would count short; unless it is the
    // first, a header longer than the sample, whose delimiters are all there is to go by.
    if (complete || lines.is_empty()) && length > 0 && lines.len() < SNIFF_LINES {
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
    /// `record_byte` is the record's absolute byte offset, used to place a UTF-8 error
    /// (see [`not_utf8`]).
    pub fn encode(
        &self,
        record: &ByteRecord,
        record_byte: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), RowProblem> {
        if record.len() != self.keys.len() {
            // Bytes the encoding does not have come first: they are often why the fields
            // do not add up (a UTF-16 file with an odd byte at its end, say).
            if let Some((column, byte)) = not_utf8(record, record_byte) {
                return Err(self.not_in_encoding(column, byte));
            }
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
            let Ok(text) = std::str::from_utf8(field) else {
                out.truncate(start);
                let (column, byte) =
                    not_utf8(record, record_byte).unwrap_or((column + 1, record_byte));
                return Err(self.not_in_encoding(column, byte));
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

    /// Column `column`'s bytes from file byte `byte` on are not text in the encoding read.
    fn not_in_encoding(&self, column: usize, byte: u64) -> RowProblem {
        match &self.encoding {
            Some(encoding) => RowProblem::InvalidEncoding {
                column,
                byte,
                encoding: encoding.clone(),
            },
            None => RowProblem::InvalidUtf8 { column, byte },
        }
    }
}

/// A record position's record number when the record is all UTF-8, or the marks were
/// given up on (see [`CsvDecoder::place`]).
const NO_NOT_UTF8: u64 = u64::MAX;

/// Where a record the decoder read has its first byte that is not UTF-8, from the
/// record's first byte.
fn not_utf8_offset(record: &ByteRecord) -> Option<u64> {
    let offset = record.position()?.record();
    (offset != NO_NOT_UTF8).then_some(offset)
}

/// The record's first field (in the file's order, 1-based) that is not UTF-8, and the
/// file byte where it goes wrong; `record_byte` is where the record starts.
///
/// The byte is exact for a record the decoder read: it noted where the first byte that
/// is not UTF-8 lies in the text itself (see [`MarkWatch`]), quotes and all. Otherwise
/// (a record made up, or the decoder's marks given up on) it is counted from the values,
/// which misses quotes: see [`field_offset`].
fn not_utf8(record: &ByteRecord, record_byte: u64) -> Option<(usize, u64)> {
    let (column, error) = record
        .iter()
        .enumerate()
        .find_map(|(column, field)| Some((column, std::str::from_utf8(field).err()?)))?;
    let byte = match not_utf8_offset(record) {
        Some(offset) => record_byte + offset,
        None => record_byte + field_offset(record, column) + error.valid_up_to() as u64,
    };
    Some((column + 1, byte))
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
/// of the next record, skips empty lines before a record as part of reading it, ends
/// records at a lone `\r` too and counts lines at each `\n` only. Checkpoints keep the
/// parser's own positions (resuming there reads the same records), while the decoder
/// gives each record the position a person counts (see [`CsvDecoder::read_record`]),
/// which [`Self::position_of`] makes absolute.
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
    /// from here by a [`CsvDecoder`], as a person opening the file would count them.
    pub fn position_of(&self, record: &ByteRecord) -> (u64, u64) {
        match record.position() {
            Some(position) => (self.byte + position.byte(), self.line + position.line() - 1),
            None => (self.byte, self.line),
        }
    }

    /// The line end the parser's lines are assumed to end in where no mark says
    /// otherwise (see [`Marks`]).
    fn usual_line_end(&self) -> LineEnd {
        if self.crlf {
            LineEnd::CrLf
        } else {
            LineEnd::Lf
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
        let (poll, passed) = poll_through(self.inner.as_mut(), cx, buf);
        match passed {
            Passed::Bytes(added) => {
                let rules = self.rules;
                self.quoting = self.quoting.after(&buf.filled()[added], rules);
            }
            Passed::End => self
                .open_at_end
                .store(self.quoting.is_open(), Ordering::Relaxed),
            Passed::Nothing => {}
        }
        poll
    }
}

/// What one read of a text that a watching reader passes through brought.
enum Passed {
    /// These bytes of the read buffer.
    Bytes(std::ops::Range<usize>),
    /// The end of the text: nothing, though there was room.
    End,
    /// Not ready, an error, or no room to read into.
    Nothing,
}

/// Reads from `inner` into `buf` for a reader that watches the text go by (the quoting,
/// the marks), and says what the read brought.
fn poll_through(
    inner: Pin<&mut (dyn AsyncRead + Send)>,
    cx: &mut std::task::Context<'_>,
    buf: &mut tokio::io::ReadBuf<'_>,
) -> (std::task::Poll<std::io::Result<()>>, Passed) {
    let before = buf.filled().len();
    let poll = inner.poll_read(cx, buf);
    let passed = match &poll {
        std::task::Poll::Ready(Ok(())) if buf.filled().len() > before => {
            Passed::Bytes(before..buf.filled().len())
        }
        std::task::Poll::Ready(Ok(())) if buf.remaining() > 0 => Passed::End,
        _ => Passed::Nothing,
    };
    (poll, passed)
}

/// The most marks kept for text the parser has not finished reading (its buffer, and
/// the record it is in): two a line at most, and none for the lines of a plain LF or
/// CRLF file, but one for each empty line or lone `\r`, so a single read of very
/// short such lines can pass it. Past it the marks are given up on for the rest of the
/// text (see [`Marks::given_up`]; positions are then counted as the parser counts
/// them), which bounds the memory whatever the text.
const MAX_MARKS: usize = 1 << 16;

/// What ends a line, as an editor counts lines: `\r\n`, `\n`, or a lone `\r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineEnd {
    Lf,
    CrLf,
    Cr,
}

impl LineEnd {
    fn len(self) -> u64 {
        match self {
            LineEnd::CrLf => 2,
            LineEnd::Lf | LineEnd::Cr => 1,
        }
    }
}

/// Something in the text at an absolute byte that the parser's positions do not tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    /// A line end starting here that is not simply the file's usual one after a line
    /// with something on it: another kind (a lone `\r` always is), or the end of an empty
    /// line.
    LineEnd(u64, LineEnd),
    /// The first byte of a sequence that is not UTF-8, the first such on its line.
    NotUtf8(u64),
}

impl Mark {
    fn byte(self) -> u64 {
        match self {
            Mark::LineEnd(byte, _) | Mark::NotUtf8(byte) => byte,
        }
    }
}

/// The marks [`MarkWatch`] made in the text the parser was given and the decoder has
/// not placed records in yet, in the text's order. A plain LF or CRLF file has none.
#[derive(Debug, Default)]
struct Marks {
    queue: VecDeque<Mark>,
    /// Set when more than [`MAX_MARKS`] were waiting: none are kept after, and records
    /// are placed as if there were none.
    given_up: bool,
}

/// Where a record the parser read starts for a person, and what is in it.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    /// The record's first byte.
    first: u64,
    /// `\n`s between where the parser started reading and `first` (the parser's line
    /// number at `first` is its line number where it started plus these).
    newlines: u64,
    /// Lone `\r`s before `first`, since the previous record.
    lone_crs_before: u64,
    /// Lone `\r`s inside the record (in quoted values).
    lone_crs_inside: u64,
    /// The record's first byte that is not UTF-8.
    not_utf8: Option<u64>,
}

impl Marks {
    /// Places a record the parser read from `from` to `end` (absolute bytes) and lets go
    /// of its marks. `after` is the line end the record follows, `None` for the first
    /// record at the top of the text: a mark there says otherwise, and the empty lines
    /// that follow it (the parser skips them) are marked.
    fn take(&mut self, from: u64, end: u64, after: Option<LineEnd>) -> Span {
        let (first, newlines, lone_crs_before, used) = self.gap(from, after);
        // Marks before `from`'s line end were left by records not read (empty lines at
        // the end of the text, a failed read).
        while self
            .queue
            .front()
            .is_some_and(|mark| mark.byte() + 1 < from)
        {
            self.queue.pop_front();
        }
        self.queue.drain(..used);
        let mut span = Span {
            first,
            newlines,
            lone_crs_before,
            lone_crs_inside: 0,
            not_utf8: None,
        };
        while let Some(&mark) = self.queue.front() {
            match mark {
                // The record's own line end is the next record's `after`.
                Mark::LineEnd(byte, _) if byte + 1 >= end => break,
                Mark::NotUtf8(byte) if byte >= end => break,
                Mark::LineEnd(_, kind) => span.lone_crs_inside += u64::from(kind == LineEnd::Cr),
                Mark::NotUtf8(byte) => {
                    span.not_utf8.get_or_insert(byte);
                }
            }
            self.queue.pop_front();
        }
        span
    }

    /// Where the record the parser started reading at `from` starts (see [`Self::take`]):
    /// its first byte, the `\n`s and lone `\r`s before it, and how many marks say so.
    fn gap(&self, from: u64, after: Option<LineEnd>) -> (u64, u64, u64, usize) {
        let mut marks = self
            .queue
            .iter()
            .skip_while(|mark| mark.byte() + 1 < from)
            .peekable();
        let (mut at, mut newlines, mut lone_crs, mut used) = (from, 0, 0, 0);
        if let Some(usual) = after {
            let kind = match marks.peek() {
                Some(&&Mark::LineEnd(byte, kind)) if byte + 1 == from => {
                    marks.next();
                    used += 1;
                    kind
                }
                _ => usual,
            };
            // The parser ended the previous record after a `\r` or `\n`; a CRLF's `\n`
            // is left, and read as part of this record.
            match kind {
                LineEnd::Lf => {}
                LineEnd::Cr => lone_crs += 1,
                LineEnd::CrLf => {
                    newlines += 1;
                    at += 1;
                }
            }
        }
        while let Some(&&Mark::LineEnd(byte, kind)) = marks.peek() {
            if byte != at {
                break;
            }
            marks.next();
            used += 1;
            match kind {
                LineEnd::Lf | LineEnd::CrLf => newlines += 1,
                LineEnd::Cr => lone_crs += 1,
            }
            at += kind.len();
        }
        (at, newlines, lone_crs, used)
    }
}

/// Passes the text through unchanged, marking what the parser's positions leave out
/// (see [`Mark`]): the line ends a person counts that the parser does not (a lone `\r`),
/// the empty lines it skips without a trace, and bytes that are not UTF-8, which the
/// values alone cannot place once quotes were taken out of them.
///
/// The cost on plain text is a look at each line end and a UTF-8 check of each read.
struct MarkWatch {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    marks: Arc<Mutex<Marks>>,
    /// The line end not marked after a line with something on it.
    usual: LineEnd,
    /// The absolute byte the next byte read is.
    next: u64,
    /// Where the current line starts: a line end there ends an empty line.
    line_start: u64,
    /// A `\r` last in a read, which the next byte makes a CRLF or a lone `\r`; and
    /// whether it is only assumed (a resumed CRLF read starts on the `\n`).
    pending_cr: Option<(u64, bool)>,
    /// A UTF-8 sequence cut off by the end of a read: its first byte and its bytes.
    partial: Option<(u64, [u8; 4], usize)>,
    /// Whether a byte on the current line was marked not UTF-8.
    marked_on_line: bool,
    /// At the end of the text, or the marks were given up on.
    done: bool,
}

impl MarkWatch {
    fn new(
        inner: Pin<Box<dyn AsyncRead + Send>>,
        marks: Arc<Mutex<Marks>>,
        start: CsvStart,
    ) -> Self {
        Self {
            inner,
            marks,
            usual: start.usual_line_end(),
            next: start.byte,
            line_start: start.byte,
            // Resumed in a CRLF file, the text starts after the `\r` of the line end the
            // last record read ended on.
            pending_cr: (start.crlf && !start.at_top && start.byte > 0)
                .then(|| (start.byte - 1, true)),
            partial: None,
            marked_on_line: false,
            done: false,
        }
    }

    /// Marks `bytes`, the next read, and hands the marks to the decoder.
    fn scan(&mut self, bytes: &[u8]) {
        let base = self.next;
        self.next += bytes.len() as u64;
        if self.done {
            return;
        }
        let mut not_utf8 = Vec::new();
        self.scan_utf8(bytes, base, &mut not_utf8);
        let mut line_ends = Vec::new();
        self.scan_line_ends(bytes, base, &mut line_ends);
        self.publish(not_utf8, line_ends);
    }

    /// At the end of the text: a `\r` or a UTF-8 sequence left open is what it is.
    fn finish(&mut self) {
        if self.done {
            return;
        }
        let mut not_utf8 = Vec::new();
        if let Some((byte, ..)) = self.partial.take() {
            self.not_utf8(byte, &mut not_utf8);
        }
        let mut line_ends = Vec::new();
        self.resolve_cr(false, &mut line_ends);
        self.publish(not_utf8, line_ends);
        self.done = true;
    }

    fn scan_utf8(&mut self, bytes: &[u8], base: u64, out: &mut Vec<Mark>) {
        let mut at = 0;
        if let Some((byte, mut sequence, length)) = self.partial.take() {
            let width = match sequence[0] {
                0xF0.. => 4,
                0xE0.. => 3,
                _ => 2,
            };
            let more = (width - length).min(bytes.len());
            sequence[length..length + more].copy_from_slice(&bytes[..more]);
            match std::str::from_utf8(&sequence[..length + more]) {
                Ok(_) => at = more,
                Err(error) => match error.error_len() {
                    // Still cut off: the read was shorter than the rest of the sequence.
                    None => {
                        self.partial = Some((byte, sequence, length + more));
                        return;
                    }
                    Some(bad) => {
                        self.not_utf8(byte, out);
                        at = bad.saturating_sub(length);
                    }
                },
            }
        }
        // Only the first byte not UTF-8 on a line is marked (a record starts on a line of
        // its own); `checked` is how far the bytes were looked at for a line end since.
        let mut checked = at;
        while let Err(error) = std::str::from_utf8(&bytes[at..]) {
            let bad = at + error.valid_up_to();
            if self.marked_on_line && memchr::memchr2(b'\n', b'\r', &bytes[checked..bad]).is_some()
            {
                self.marked_on_line = false;
            }
            checked = bad;
            match error.error_len() {
                Some(length) => {
                    self.not_utf8(base + bad as u64, out);
                    at = bad + length;
                }
                None => {
                    let mut sequence = [0; 4];
                    sequence[..bytes.len() - bad].copy_from_slice(&bytes[bad..]);
                    self.partial = Some((base + bad as u64, sequence, bytes.len() - bad));
                    return;
                }
            }
        }
        if self.marked_on_line && memchr::memchr2(b'\n', b'\r', &bytes[checked..]).is_some() {
            self.marked_on_line = false;
        }
    }

    fn not_utf8(&mut self, byte: u64, out: &mut Vec<Mark>) {
        if !self.marked_on_line {
            out.push(Mark::NotUtf8(byte));
            self.marked_on_line = true;
        }
    }

    fn scan_line_ends(&mut self, bytes: &[u8], base: u64, out: &mut Vec<Mark>) {
        let Some(&first) = bytes.first() else {
            return;
        };
        // The `\n` of a CRLF whose `\r` ended the last read.
        let mut taken = None;
        if self.pending_cr.is_some() {
            self.resolve_cr(first == b'\n', out);
            taken = (first == b'\n').then_some(0);
        }
        for index in memchr::memchr2_iter(b'\n', b'\r', bytes) {
            if taken == Some(index) {
                continue;
            }
            let byte = base + index as u64;
            if bytes[index] == b'\n' {
                self.line_end(byte, LineEnd::Lf, out);
            } else {
                match bytes.get(index + 1) {
                    Some(b'\n') => {
                        self.line_end(byte, LineEnd::CrLf, out);
                        taken = Some(index + 1);
                    }
                    Some(_) => self.line_end(byte, LineEnd::Cr, out),
                    None => self.pending_cr = Some((byte, false)),
                }
            }
        }
    }

    /// Ends the line a pending `\r` is in, now that it is known whether a `\n` follows.
    fn resolve_cr(&mut self, lf_follows: bool, out: &mut Vec<Mark>) {
        let Some((byte, assumed)) = self.pending_cr.take() else {
            return;
        };
        let kind = match (lf_follows, assumed) {
            (true, _) => LineEnd::CrLf,
            // A resumed read's last line end was not a CRLF after all, and whatever it
            // was is behind the text's start.
            (false, true) => LineEnd::Lf,
            (false, false) => LineEnd::Cr,
        };
        self.line_end(byte, kind, out);
    }

    fn line_end(&mut self, byte: u64, kind: LineEnd, out: &mut Vec<Mark>) {
        if kind != self.usual || byte == self.line_start {
            out.push(Mark::LineEnd(byte, kind));
        }
        self.line_start = byte + kind.len();
    }

    /// Adds the marks of a read, in the text's order, to those the decoder takes.
    fn publish(&mut self, not_utf8: Vec<Mark>, line_ends: Vec<Mark>) {
        if not_utf8.is_empty() && line_ends.is_empty() {
            return;
        }
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        if marks.given_up {
            self.done = true;
            return;
        }
        let (mut a, mut b) = (
            not_utf8.into_iter().peekable(),
            line_ends.into_iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.byte() <= y.byte() => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, _) => b.next(),
            };
            let Some(mark) = next else { break };
            marks.queue.push_back(mark);
        }
        if marks.queue.len() > MAX_MARKS {
            marks.given_up = true;
            marks.queue = VecDeque::new();
            self.done = true;
        }
    }
}

impl AsyncRead for MarkWatch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let (poll, passed) = poll_through(self.inner.as_mut(), cx, buf);
        match passed {
            Passed::Bytes(added) => self.scan(&buf.filled()[added]),
            Passed::End => self.finish(),
            Passed::Nothing => {}
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
        let Ok(name) = std::str::from_utf8(field) else {
            let (column, byte) =
                not_utf8(&first.record, first.byte).unwrap_or((index + 1, first.byte));
            return Err(DecodeError::BadHeader {
                file: file.to_owned(),
                problem: RowProblem::InvalidUtf8 { column, byte },
            });
        };
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
    /// What the text has that the parser's positions do not tell (see [`MarkWatch`]).
    marks: Arc<Mutex<Marks>>,
    /// Lone `\r`s before the next record: line ends for a person, not for the parser.
    lone_crs: u64,
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
            // Other binary formats (an image, a PDF, xz or tar, say) would fail on a NUL
            // or a byte that is not UTF-8 somewhere in the header, which does not say
            // what the file is.
            if let Some(found) = super::sniff::binary_kind_of_text(&top) {
                return Err(DecodeError::Unreadable {
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
        let marks = Arc::new(Mutex::new(Marks::default()));
        let marked = MarkWatch::new(Box::pin(watched), marks.clone(), start);
        let mut decoder = Self::new(Box::pin(marked), file, start, format);
        decoder.since_record = since_record;
        decoder.quote_open_at_end = quote_open_at_end;
        decoder.sniffed = sniffed;
        decoder.marks = marks;
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
            marks: Arc::new(Mutex::new(Marks::default())),
            lone_crs: 0,
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
    ///
    /// The record's position is where a person finds it, for [`CsvStart::position_of`]
    /// (see [`Self::place`]).
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
                    self.place(record);
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
            Err(error) => {
                // Past the empty lines the parser skipped, if it got that far.
                let record_start = self
                    .marks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .gap(record_start, self.line_end_before(record_start))
                    .0;
                Err(match error.into_kind() {
                    csv_async::ErrorKind::Io(io) => read_error(&self.file, record_start, io),
                    other => DecodeError::Read {
                        file: self.file.clone(),
                        byte: record_start,
                        message: format!("{other:?}"),
                    },
                })
            }
        }
    }

    /// Gives a record just read the position a person counts, in place of the parser's:
    /// the byte of its first character rather than of the empty lines before it (or the
    /// `\n` of a CRLF), and its line with lone `\r`s counted as line ends, as editors
    /// count them. Both stay relative to [`Self::start`].
    ///
    /// The position's record number becomes the offset of the record's first byte that
    /// is not UTF-8 from its first byte, or `u64::MAX` (see [`not_utf8_offset`]): the
    /// record is all the encoder is given, and nothing but [`not_utf8_offset`] reads
    /// the record number (csv-async would, in its unequal-lengths error, which the
    /// decoder's flexible reader never raises).
    fn place(&mut self, record: &mut ByteRecord) {
        let Some(parsed) = record.position() else {
            return;
        };
        let from = self.start.byte + parsed.byte();
        let span = self
            .marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(from, self.next_byte(), self.line_end_before(from));
        let line = parsed.line() + span.newlines + self.lone_crs + span.lone_crs_before;
        self.lone_crs += span.lone_crs_before + span.lone_crs_inside;
        let mut position = Position::new();
        position
            .set_byte(span.first - self.start.byte)
            .set_line(line)
            .set_record(
                span.not_utf8
                    .map_or(NO_NOT_UTF8, |byte| byte.saturating_sub(span.first)),
            );
        record.set_position(Some(position));
    }

    /// The line end a record the parser starts reading at `from` follows, unless marked
    /// otherwise: none for the first at the top of the text.
    fn line_end_before(&self, from: u64) -> Option<LineEnd> {
        (!(self.start.at_top && from == self.start.byte)).then(|| self.start.usual_line_end())
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
        // A record that is short and holds a byte that is not UTF-8 is named for the
        // byte, which is often why it is short.
        let short = ByteRecord::from(vec![&b"\xff"[..]]);
        assert_eq!(
            encoder.encode(&short, 7, &mut out),
            Err(RowProblem::InvalidUtf8 { column: 1, byte: 7 })
        );
        let decoded = RowEncoder::new(&header).decoded_from("utf-16le");
        assert_eq!(
            decoded.encode(&short, 7, &mut out),
            Err(RowProblem::InvalidEncoding {
                column: 1,
                byte: 7,
                encoding: "utf-16le".to_owned()
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
        // A first line longer than the sample is sniffed from what the sample has.
        let long: Vec<u8> = (0..3_000)
            .flat_map(|n| format!("column_name_number_{n:06};").into_bytes())
            .collect();
        assert_eq!(sniff_delimiter(&long[..SNIFF_BYTES], b'"', false), b';');
    }

    #[tokio::test]
    async fn binary_files_under_a_text_name_are_named() {
        for (data, found) in [
            (
                &b"\xFD7zXZ\x00\x00\x04\xE6\xD6\xB4\x46"[..],
                "xz-compressed data",
            ),
            (&b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"[..], "a PNG image"),
            (
                &b"%PDF-1.7\n%\xE2\xE3\xCF\xD3\n1 0 obj"[..],
                "a PDF document",
            ),
        ] {
            let opened = CsvDecoder::open(
                Box::pin(data),
                "f.csv",
                top(),
                1 << 20,
                CsvFormat::default(),
            )
            .await;
            let message = opened.err().expect("refused").to_string();
            assert!(
                message.starts_with(&format!(
                    "f.csv: the content is {found}, which is not read here"
                )),
                "{message}"
            );
        }
        // A header that happens to start like a magic number is a header, in a Latin-1
        // file too.
        for data in [
            &b"MZ_code,name\n1,x\n"[..],
            b"PAR1,PAR2\n1,2\n",
            b"MZ_code,name\n1,M\xfcller\n",
        ] {
            let mut decoder = open_at_top(data, CsvFormat::default()).await;
            assert_eq!(decoder.read_header(100).await.unwrap().columns.len(), 2);
        }
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

    /// Gives its text `step` bytes a read, so every boundary between reads is tried.
    struct Trickle {
        data: &'static [u8],
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let length = self.step.min(self.data.len()).min(buf.remaining());
            let (head, tail) = self.data.split_at(length);
            buf.put_slice(head);
            self.data = tail;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Every record of `data` from `start` read `step` bytes at a time: its position,
    /// and the column and byte of its first field that is not UTF-8.
    async fn places(
        data: &'static [u8],
        start: CsvStart,
        step: usize,
    ) -> Vec<((u64, u64), Option<(usize, u64)>)> {
        let input = Trickle {
            data: &data[start.byte as usize..],
            step,
        };
        let mut decoder = CsvDecoder::open(
            Box::pin(input),
            "t.csv",
            start,
            1 << 20,
            CsvFormat::default(),
        )
        .await
        .unwrap();
        let mut places = Vec::new();
        while let Some(record) = decoder.next_record().await.unwrap() {
            places.push((
                (record.byte, record.line),
                not_utf8(&record.record, record.byte),
            ));
        }
        places
    }

    /// The positions of every record of `data`, read from its top.
    async fn positions(data: &'static [u8]) -> Vec<(u64, u64)> {
        let (records, _) = read_all(data, top()).await;
        records.iter().map(|r| (r.byte, r.line)).collect()
    }

    /// The problem `encoder` finds in `record`, placed where the decoder put it.
    fn problem(header: &[&str], record: &PositionedRecord) -> RowProblem {
        let names: Vec<String> = header.iter().map(|name| name.to_string()).collect();
        let encoder = RowEncoder::new(&Header::resolve(&names));
        encoder
            .encode(&record.record, record.byte, &mut Vec::new())
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_record_after_empty_lines_is_placed_on_its_own_line() {
        // The parser skips the empty lines as part of reading the record, and started
        // reading it at line 3, byte 8.
        let data: &'static [u8] = b"a,b\n1,2\n\n\n3\n";
        let (records, _) = read_all(data, top()).await;
        let places: Vec<_> = records.iter().map(|r| (r.byte, r.line)).collect();
        assert_eq!(places, vec![(0, 1), (4, 2), (10, 5)]);
        assert_eq!(
            problem(&["a", "b"], &records[2]),
            RowProblem::Ragged {
                expected: 2,
                found: 1
            }
        );

        let data: &'static [u8] = b"a,b\n\n\n1,x\xff\n";
        let (records, _) = read_all(data, top()).await;
        assert_eq!((records[1].byte, records[1].line), (6, 4));
        assert_eq!(
            problem(&["a", "b"], &records[1]),
            RowProblem::InvalidUtf8 { column: 2, byte: 9 }
        );

        // CRLF empty lines, empty lines before the header, and both.
        assert_eq!(
            positions(b"a,b\r\n\r\n\r\n1,2\r\n3,4\r\n").await,
            vec![(0, 1), (9, 4), (14, 5)]
        );
        assert_eq!(positions(b"\n\na,b\n1,2\n").await, vec![(2, 3), (6, 4)]);
        assert_eq!(
            positions(b"\xEF\xBB\xBF\r\n\r\na,b\r\n1,2\r\n\n3,4\r\n").await,
            vec![(7, 3), (12, 4), (18, 6)]
        );
        // A line that only has spaces is a record, not an empty line.
        assert_eq!(
            positions(b"a\n \n\n1\n").await,
            vec![(0, 1), (2, 2), (5, 4)]
        );

        // Errors that name the record's start name its first byte too.
        let error = read_to_end(b"id,name\n1,a\n\n\n2,\"open\n3,c\n", CsvFormat::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                DecodeError::UnterminatedQuote {
                    line: 5,
                    byte: 14,
                    ..
                }
            ),
            "{error}"
        );
        let mut data = b"a,b\n1,2\n\n\n3,\"open".to_vec();
        data.extend(std::iter::repeat_n(b'x', 4 << 20));
        let data: &'static [u8] = Box::leak(data.into_boxed_slice());
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        decoder.read_header(4096).await.unwrap();
        let mut record = ByteRecord::new();
        assert!(decoder.read_record(&mut record).await.unwrap());
        let error = decoder.read_record(&mut record).await.unwrap_err();
        assert!(
            matches!(error, DecodeError::RecordTooLong { byte: 10, .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_byte_not_utf8_in_a_quoted_value_is_placed_exactly() {
        // The values alone would put each one byte (or more) early: they lost the opening
        // quote and one of each doubled quote.
        for (data, byte) in [
            (&b"a,b\n1,\"x\"\"y\"\"z\xff\"\n"[..], 14),
            (b"a,b\n1,\"xy\xff\"\n", 9),
            (b"a,b\n1,\"x\ny\xff\"\n", 10),
            (b"a,b\n\"\",\"\xe2\x82\xac\xe2\x82\"\n", 11),
            (b"a,b\r\n\"1\",\"\"\"\xc3\xa9\xfe\"\r\n", 14),
        ] {
            let data: &'static [u8] = Box::leak(data.to_vec().into_boxed_slice());
            let (records, _) = read_all(data, top()).await;
            assert_eq!(
                problem(&["a", "b"], &records[1]),
                RowProblem::InvalidUtf8 { column: 2, byte },
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
        // With several, the first in the file, whatever the order of the keys.
        let (records, _) = read_all(b"b,a\n\"x\xfe\",\xff\n", top()).await;
        assert_eq!(
            problem(&["b", "a"], &records[1]),
            RowProblem::InvalidUtf8 { column: 1, byte: 6 }
        );
        // In the header.
        let mut decoder = open_at_top(b"a,\"\"\"b\xff\"\n1,2\n", CsvFormat::default()).await;
        let error = decoder.read_header(4096).await.unwrap_err();
        assert!(
            matches!(
                error,
                DecodeError::BadHeader {
                    problem: RowProblem::InvalidUtf8 { column: 2, byte: 6 },
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn lone_cr_line_ends_count_as_lines() {
        // The parser ends records at a lone `\r` but counts lines at `\n` only.
        let data: &'static [u8] = b"a,b\r1,2\r3\r";
        let mut decoder = open_at_top(data, CsvFormat::default()).await;
        let mut places = Vec::new();
        while let Some(record) = decoder.next_record().await.unwrap() {
            places.push((record.byte, record.line));
        }
        assert_eq!(places, vec![(0, 1), (4, 2), (8, 3)]);
        // Checkpoints keep the parser's own count.
        assert_eq!((decoder.next_byte(), decoder.next_line()), (10, 1));

        // In a quoted value too, and in files of CRLF or LF lines.
        assert_eq!(
            positions(b"a,b\r1,\"x\ry\"\r2,3\r").await,
            vec![(0, 1), (4, 2), (12, 4)]
        );
        assert_eq!(
            positions(b"a,b\r\n1,2\r3,4\r\n5,6\r\n").await,
            vec![(0, 1), (5, 2), (9, 3), (14, 4)]
        );
        assert_eq!(
            positions(b"a,b\n1,2\r\n3,4\n5\r6\n").await,
            vec![(0, 1), (4, 2), (9, 3), (13, 4), (15, 5)]
        );
        // An empty line of a lone `\r`.
        assert_eq!(positions(b"a,b\n\r1,2\n").await, vec![(0, 1), (5, 3)]);
    }

    #[tokio::test]
    async fn resumed_reads_place_records_after_empty_lines() {
        for data in [
            &b"a,b\n1,2\n\n\n3,4\n"[..],
            b"a,b\r\n1,2\r\n\r\n\r\n3,4\r\n",
            b"a,b\r\n1,2\n\n\n3,\"\xff\"\r\n",
        ] {
            let data: &'static [u8] = Box::leak(data.to_vec().into_boxed_slice());
            let mut decoder = open_at_top(data, CsvFormat::default()).await;
            let header = decoder.read_header(4096).await.unwrap();
            let after_header = CsvStart {
                byte: decoder.next_byte(),
                line: decoder.next_line(),
                crlf: header.crlf,
                at_top: false,
            };
            let first = decoder.next_record().await.unwrap().unwrap();
            let resume = CsvStart {
                byte: decoder.next_byte(),
                line: decoder.next_line(),
                crlf: header.crlf,
                at_top: false,
            };
            let last = decoder.next_record().await.unwrap().unwrap();
            let whole = vec![
                ((first.byte, first.line), None),
                ((last.byte, last.line), not_utf8(&last.record, last.byte)),
            ];
            assert_eq!(whole[1].0 .1, 5, "{:?}", String::from_utf8_lossy(data));
            // Whatever the reads, and from either checkpoint.
            for step in [1, 2, 3, 64] {
                assert_eq!(places(data, after_header, step).await, whole);
                assert_eq!(places(data, resume, step).await, whole[1..]);
            }
        }
    }

    #[tokio::test]
    async fn marks_are_the_same_however_the_text_is_split_into_reads() {
        for (data, crlf) in [
            (&b"a\r\n\r\nb\n\nc\rd\r\r\n\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80,x\xff\xfe\n\xe2\x82\n\xe2\r"[..], true),
            (b"\n\r\n\xf0\x9f\x98\n\xc3\xc3\xa9\xed\xa0\x80\r", false),
            (b"x\xe2\x82\xac\xe2\x82\xac\xf0\x9f\x98", false),
        ] {
            let start = CsvStart {
                byte: 0,
                line: 1,
                crlf,
                at_top: true,
            };
            let mut all = Vec::new();
            for step in 1..=data.len() {
                let marks = Arc::new(Mutex::new(Marks::default()));
                let mut watch =
                    MarkWatch::new(Box::pin(Trickle { data, step }), marks.clone(), start);
                let mut text = Vec::new();
                watch.read_to_end(&mut text).await.unwrap();
                assert_eq!(text, data);
                let marks: Vec<Mark> = marks.lock().unwrap().queue.iter().copied().collect();
                all.push(marks);
            }
            let whole = all.last().unwrap().clone();
            for (step, marks) in all.iter().enumerate() {
                assert_eq!(marks, &whole, "{:?} in reads of {}", String::from_utf8_lossy(data), step + 1);
            }
        }
        // One text spelled out: what is marked, and what is not.
        let data: &'static [u8] = b"a\r\n\r\nb\n\nc\rd\xff\xfe\r\ne\xe2\x82";
        let marks = Arc::new(Mutex::new(Marks::default()));
        let start = CsvStart {
            byte: 100,
            line: 1,
            crlf: true,
            at_top: false,
        };
        let mut watch = MarkWatch::new(Box::pin(data), marks.clone(), start);
        watch.read_to_end(&mut Vec::new()).await.unwrap();
        let marks: Vec<Mark> = marks.lock().unwrap().queue.iter().copied().collect();
        assert_eq!(
            marks,
            vec![
                // The resumed read's first line end was not the CRLF assumed.
                Mark::LineEnd(99, LineEnd::Lf),
                Mark::LineEnd(103, LineEnd::CrLf),
                Mark::LineEnd(106, LineEnd::Lf),
                Mark::LineEnd(107, LineEnd::Lf),
                Mark::LineEnd(109, LineEnd::Cr),
                Mark::NotUtf8(111),
                Mark::NotUtf8(116),
            ]
        );
    }
}
