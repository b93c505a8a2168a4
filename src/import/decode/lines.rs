//! JSON Lines: one JSON object per line, read from the same text stream as CSV (so
//! compressed, zipped and re-encoded files work alike).
//!
//! A row's data is the object itself, its values' JSON types kept; the columns are the
//! union of the keys seen so far, in the order they were first seen (one line's new keys
//! in sorted order), and grow as new keys come. Blank lines are skipped (they still
//! count as lines). A line that is not valid JSON, not an object, or not storable as
//! written (a key twice in one object, an integer no double keeps) fails the row.

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
    let changed = |(column, literal, stored): (usize, &str, String)| RowProblem::NotStorable {
        message: changed_integer(literal, Some(column), &stored),
    };
    let Exact(value) = serde_json::from_slice(text).map_err(|error| {
        if error.classify() != serde_json::error::Category::Data {
            return RowProblem::InvalidJson {
                message: error.to_string(),
            };
        }
        // Refused by `Exact`: named with the column the literal starts at, or the one
        // the parser stopped at.
        match changed_integer_literal(text) {
            Some(found) => changed(found),
            None => {
                let message = error.to_string();
                let place = format!(" at line {} column {}", error.line(), error.column());
                RowProblem::NotStorable {
                    message: match message.strip_suffix(&place) {
                        Some(message) => format!("{message} (column {})", error.column()),
                        None => message,
                    },
                }
            }
        }
    })?;
    if has_large_double(&value) {
        if let Some(found) = changed_integer_literal(text) {
            return Err(changed(found));
        }
    }
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

/// Integers up to 2^53 in magnitude are doubles, written back with all their digits.
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

/// A JSON value as `serde_json::Value` reads it, except that what the stored row could
/// not keep as the line has it is refused: an object that names a key twice (a `Value`
/// keeps the last one), and an integer whose canonical form is another number (RFC 8785
/// numbers are IEEE 754 doubles written with at most 17 significant digits, so
/// `9007199254740993` would be stored as `9007199254740992`). Integers beyond 64 bits
/// reach the visitor as doubles already; [`changed_integer_literal`] finds those in
/// the text.
struct Exact(Value);

impl<'de> serde::Deserialize<'de> for Exact {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ExactVisitor).map(Exact)
    }
}

struct ExactVisitor;

impl ExactVisitor {
    fn integer<E: serde::de::Error>(value: Value, magnitude: u64, double: f64) -> Result<Value, E> {
        if magnitude <= EXACT_INTEGERS as u64 {
            return Ok(value);
        }
        let literal = value.to_string();
        match stored_as(literal.trim_start_matches('-'), double) {
            None => Ok(value),
            Some(stored) => Err(E::custom(changed_integer(&literal, None, &stored))),
        }
    }
}

impl<'de> serde::de::Visitor<'de> for ExactVisitor {
    type Value = Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Value, E> {
        Self::integer(Value::from(value), value, value as f64)
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Value, E> {
        Self::integer(Value::from(value), value.unsigned_abs(), value as f64)
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("the number {value} is not finite")))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        let mut array = Vec::with_capacity(items.size_hint().unwrap_or(0).min(4096));
        while let Some(Exact(item)) = items.next_element()? {
            array.push(item);
        }
        Ok(Value::Array(array))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut members: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = members.next_key::<String>()? {
            let Exact(member) = members.next_value()?;
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the object has the key {} twice",
                    Value::String(key)
                )));
            }
            object.insert(key, member);
        }
        Ok(Value::Object(object))
    }
}

fn changed_integer(literal: &str, column: Option<usize>, stored: &str) -> String {
    let at = column
        .map(|column| format!(" at column {column}"))
        .unwrap_or_default();
    format!(
        "the integer {literal}{at} would be stored as {stored}: JSON numbers are kept as \
         IEEE 754 doubles (RFC 8785), exact for integers up to 9007199254740992; write it \
         as a string to keep its digits"
    )
}

/// The canonical form of `double`, read from an integer literal whose digits (without
/// its sign) are `digits`, when that form is another number; `None` when it is the
/// same number (`10000000000000000000000` is written `1e+22`, and kept).
fn stored_as(digits: &str, double: f64) -> Option<String> {
    let mut canonical = Vec::new();
    hash::write_json_number(double, &mut canonical);
    let canonical = String::from_utf8(canonical).expect("a number is ASCII");
    let unsigned = canonical.trim_start_matches('-');
    // The canonical form as a whole number's digits: `d[.ddd]e+N` shifted, or as is.
    let whole = match unsigned.split_once("e+") {
        Some((mantissa, exponent)) => {
            let (int, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
            let zeros = exponent.parse::<usize>().ok()?.checked_sub(fraction.len());
            zeros.map(|zeros| format!("{int}{fraction}{}", "0".repeat(zeros)))
        }
        None => Some(unsigned.to_owned()),
    };
    let written = match digits.trim_start_matches('0') {
        "" => "0",
        digits => digits,
    };
    (whole.as_deref() != Some(written)).then_some(canonical)
}

/// Whether `value` holds a double beyond 2^53: what an integer literal too long for 64
/// bits reads as (so do exponents such as `1e300`).
fn has_large_double(value: &Value) -> bool {
    match value {
        Value::Number(number) => {
            number.is_f64() && number.as_f64().is_some_and(|d| d.abs() > EXACT_INTEGERS)
        }
        Value::Array(items) => items.iter().any(has_large_double),
        Value::Object(members) => members.values().any(has_large_double),
        _ => false,
    }
}

/// The first integer literal of a JSON text (no fraction, no exponent) whose canonical
/// form is another number: its column (1-based byte in `text`), the literal, and what
/// it would be stored as.
fn changed_integer_literal(text: &[u8]) -> Option<(usize, &str, String)> {
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b'"' => {
                // Past the string, whose escapes may hide a quote.
                at += 1;
                while at < text.len() && text[at] != b'"' {
                    at += if text[at] == b'\\' { 2 } else { 1 };
                }
                at += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = at;
                while at < text.len()
                    && matches!(text[at], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    at += 1;
                }
                let literal = std::str::from_utf8(&text[start..at]).ok()?;
                let digits = literal.trim_start_matches('-');
                if digits.bytes().all(|byte| byte.is_ascii_digit()) {
                    let double: f64 = literal.parse().ok()?;
                    if let Some(stored) = stored_as(digits, double) {
                        return Some((start + 1, literal, stored));
                    }
                }
            }
            _ => at += 1,
        }
    }
    None
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

    fn refusal(line: &str) -> String {
        match parse_line(line.as_bytes(), &mut Header::resolve(&[])) {
            Err(RowProblem::NotStorable { message }) => message,
            other => panic!(
                "{line} was not refused: {:?}",
                other.map(|row| row.canonical)
            ),
        }
    }

    #[test]
    fn a_key_named_twice_is_refused_at_any_depth() {
        let message = refusal(r#"{"a":1,"a":2}"#);
        assert_eq!(message, r#"the object has the key "a" twice (column 13)"#);
        let message = refusal(r#"{"x":[{"k":null,"k":null}]}"#);
        assert!(message.contains(r#"the key "k" twice"#), "{message}");
        // The same name in two objects is no repeat.
        parse_line(
            br#"{"a":{"a":1},"b":[{"a":2},{"a":3}]}"#,
            &mut Header::resolve(&[]),
        )
        .unwrap();
    }

    #[test]
    fn integers_whose_canonical_form_is_another_number_are_refused_not_rounded() {
        for (line, literal, stored) in [
            (
                r#"{"id":9007199254740993}"#,
                "9007199254740993 at column 7",
                "9007199254740992",
            ),
            (
                r#"{"id":-9007199254740993}"#,
                "-9007199254740993 at column 7",
                "-9007199254740992",
            ),
            // 2^60 is a double, but written with 17 digits it is another number.
            (
                r#"{"id":1152921504606846976}"#,
                "1152921504606846976 at column 7",
                "1152921504606847000",
            ),
            (
                r#"{"id":18446744073709551615}"#,
                "18446744073709551615 at column 7",
                "18446744073709552000",
            ),
            (
                r#"{"n":[1,{"id":12345678901234567890123}]}"#,
                "12345678901234567890123 at column 15",
                "1.2345678901234568e+22",
            ),
        ] {
            let message = refusal(line);
            assert!(
                message.contains(&format!(
                    "the integer {literal} would be stored as {stored}:"
                )),
                "{message}"
            );
            assert!(message.contains("write it as a string"), "{message}");
        }
        // Integers whose canonical form is the same number are kept, however long; so
        // are fractions and exponents, decimal approximations by nature, and digits in
        // strings.
        for (line, canonical) in [
            (r#"{"id":9007199254740992}"#, r#"{"id":9007199254740992}"#),
            (r#"{"id":-9007199254740992}"#, r#"{"id":-9007199254740992}"#),
            (r#"{"id":9007199254740994}"#, r#"{"id":9007199254740994}"#),
            (r#"{"id":10000000000000000000000}"#, r#"{"id":1e+22}"#),
            (r#"{"x":1e300,"y":0.1}"#, r#"{"x":1e+300,"y":0.1}"#),
            (
                r#"{"s":"9007199254740993\"","n":1e22}"#,
                r#"{"n":1e+22,"s":"9007199254740993\""}"#,
            ),
        ] {
            let row = parse_line(line.as_bytes(), &mut Header::resolve(&[])).unwrap();
            assert_eq!(
                std::str::from_utf8(&row.canonical).unwrap(),
                canonical,
                "{line}"
            );
        }
    }
}
