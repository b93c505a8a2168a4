//! JSON Lines: one JSON object per line, read from the same text stream as CSV (so
//! compressed, zipped and re-encoded files work alike).
//!
//! A row's data is the object itself, its values' JSON types kept; the columns are the
//! union of the keys seen so far, in the order they were first seen (one line's new keys
//! in sorted order), and grow as new keys come. Blank lines are skipped (they still count as lines). A line that is not valid
//! JSON, or not an object, fails the row.

use std::pin::Pin;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::csv::read_error;
use super::{DecodeError, Header, RowProblem};
use crate::import::hash;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// One line with its absolute position (the byte and line of its first character).
#[derive(Clone, Debug, Default)]
pub struct Line {
    pub text: Vec<u8>,
    pub byte: u64,
    pub line: u64,
}

/// Reads lines of text with their positions, each capped in length.
pub struct LineReader {
    reader: BufReader<Pin<Box<dyn AsyncRead + Send>>>,
    file: String,
    next_byte: u64,
    next_line: u64,
    max_line_bytes: u64,
}

impl LineReader {
    /// `input` delivers the text from `byte` (line `line`) on; at the top of the text a
    /// UTF-8 byte order mark is dropped.
    pub async fn open(
        input: Pin<Box<dyn AsyncRead + Send>>,
        file: &str,
        byte: u64,
        line: u64,
        max_line_bytes: u64,
    ) -> Result<Self, DecodeError> {
        let mut reader = BufReader::with_capacity(256 * 1024, input);
        let mut next_byte = byte;
        if byte == 0 {
            let buffer = reader
                .fill_buf()
                .await
                .map_err(|error| read_error(file, 0, error))?;
            if buffer.starts_with(UTF8_BOM) {
                reader.consume(UTF8_BOM.len());
                next_byte = UTF8_BOM.len() as u64;
            }
        }
        Ok(Self {
            reader,
            file: file.to_owned(),
            next_byte,
            next_line: line,
            max_line_bytes,
        })
    }

    /// The next line that is not blank, without its line end; `false` at the end.
    pub async fn read_line(&mut self, line: &mut Line) -> Result<bool, DecodeError> {
        loop {
            line.text.clear();
            line.byte = self.next_byte;
            line.line = self.next_line;
            let read = (&mut self.reader)
                .take(self.max_line_bytes + 1)
                .read_until(b'\n', &mut line.text)
                .await
                .map_err(|error| read_error(&self.file, line.byte, error))?;
            if read == 0 {
                return Ok(false);
            }
            let ended = line.text.last() == Some(&b'\n');
            if !ended && read as u64 > self.max_line_bytes {
                return Err(DecodeError::RecordTooLong {
                    file: self.file.clone(),
                    byte: line.byte,
                    limit: self.max_line_bytes,
                });
            }
            self.next_byte += read as u64;
            if ended {
                self.next_line += 1;
                line.text.pop();
                if line.text.last() == Some(&b'\r') {
                    line.text.pop();
                }
            }
            if !line.text.iter().all(u8::is_ascii_whitespace) {
                return Ok(true);
            }
        }
    }

    /// Absolute offset of the first byte not yet read: where a resume starts.
    pub fn next_byte(&self) -> u64 {
        self.next_byte
    }

    /// Line number at [`Self::next_byte`].
    pub fn next_line(&self) -> u64 {
        self.next_line
    }

    pub fn file(&self) -> &str {
        &self.file
    }
}

/// A parsed line: the object's canonical JSON, ready to hash.
pub struct JsonRow {
    pub object: serde_json::Map<String, Value>,
    pub canonical: Vec<u8>,
}

/// Parses one line into an object, adding its new keys to `header`.
pub fn parse_line(text: &[u8], header: &mut Header) -> Result<JsonRow, RowProblem> {
    let value: Value = serde_json::from_slice(text).map_err(|error| RowProblem::InvalidJson {
        message: error.to_string(),
    })?;
    let Value::Object(object) = value else {
        return Err(RowProblem::NotAnObject {
            found: json_type(&value),
        });
    };
    let value = Value::Object(object);
    let canonical = hash::canonical_json(&value).map_err(|error| RowProblem::InvalidJson {
        message: error.to_string(),
    })?;
    let Value::Object(object) = value else {
        unreachable!("the value was made an object above")
    };
    // PostgreSQL's jsonb cannot hold U+0000 in a string (nor in a key).
    if canonical.windows(6).any(|window| window == b"\\u0000") {
        return Err(RowProblem::InvalidJson {
            message: "it contains a NUL character (\\u0000), which PostgreSQL cannot store \
                      in JSON"
                .to_owned(),
        });
    }
    for key in object.keys() {
        if !header.columns.iter().any(|column| column == key) {
            header.columns.push(key.clone());
        }
    }
    Ok(JsonRow { object, canonical })
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_keep_their_positions_and_blank_lines_are_skipped() {
        let data: &'static [u8] = b"\xEF\xBB\xBF{\"a\":1}\r\n\n  \n{\"b\":2}";
        let mut reader = LineReader::open(Box::pin(data), "t.jsonl", 0, 1, 1 << 20)
            .await
            .unwrap();
        let mut line = Line::default();
        assert!(reader.read_line(&mut line).await.unwrap());
        assert_eq!(
            (line.byte, line.line, &line.text[..]),
            (3, 1, &b"{\"a\":1}"[..])
        );
        assert!(reader.read_line(&mut line).await.unwrap());
        assert_eq!(
            (line.byte, line.line, &line.text[..]),
            (16, 4, &b"{\"b\":2}"[..])
        );
        assert!(!reader.read_line(&mut line).await.unwrap());
        assert_eq!(reader.next_byte(), data.len() as u64);
    }

    #[test]
    fn objects_keep_their_types_and_grow_the_header() {
        let mut header = Header::resolve(&[]);
        let row = parse_line(br#"{"b":1.50,"a":[true,null],"c":{"x":"y"}}"#, &mut header).unwrap();
        assert_eq!(
            String::from_utf8(row.canonical).unwrap(),
            r#"{"a":[true,null],"b":1.5,"c":{"x":"y"}}"#
        );
        parse_line(br#"{"d":"new","a":1}"#, &mut header).unwrap();
        // A line's keys come in sorted order; later keys are added after them.
        assert_eq!(header.columns, vec!["a", "b", "c", "d"]);
        assert_eq!(
            parse_line(b"[1,2]", &mut header).err(),
            Some(RowProblem::NotAnObject { found: "array" })
        );
        assert!(matches!(
            parse_line(b"{\"a\":", &mut header),
            Err(RowProblem::InvalidJson { .. })
        ));
        assert!(matches!(
            parse_line(br#"{"a":"x\u0000"}"#, &mut header),
            Err(RowProblem::InvalidJson { .. })
        ));
    }
}
