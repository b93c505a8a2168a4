//! Content hashes of imported rows and of whole commits.
//!
//! The hashes computed here are public identities: other systems (verifiers,
//! re-importers written in other languages, auditors) must be able to
//! recompute them from the data alone. They are therefore defined only in
//! terms of published standards and fixed byte layouts:
//!
//! * A row's hash is `sha256(JCS(data))`, where JCS is the JSON
//!   Canonicalization Scheme of [RFC 8785] and `data` is the row as a JSON
//!   object. See [`canonical_json`] and [`row_hash`].
//! * A commit's tree hash chains the row hashes in file order. See
//!   [`TreeHasher`] for the exact definition.
//!
//! Nothing in this module may change its output for a given input without
//! changing the identity of every stored row, so the tests pin the published
//! RFC 8785 vectors and fixed digests.
//!
//! [RFC 8785]: https://www.rfc-editor.org/rfc/rfc8785

use std::cmp::Ordering;
use std::fmt;

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

/// Why a JSON value has no RFC 8785 canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalJsonError {
    /// RFC 8785 (section 3.2.2.3) requires every number to be a finite IEEE 754
    /// double and requires a canonicalizer to fail on anything else.
    ///
    /// A plain `serde_json::Value` cannot hold NaN or an infinity, so this only
    /// happens when serde_json's `arbitrary_precision` feature is enabled
    /// somewhere in the build and a number such as `1e400` overflows `f64`.
    #[error("JSON number {0} is not a finite IEEE 754 double, which RFC 8785 requires")]
    NonFiniteNumber(String),
}

/// Appends the RFC 8785 canonical form of `value` to `out`.
///
/// The output is exactly what RFC 8785 prescribes, encoded as UTF-8:
///
/// * no whitespace between tokens;
/// * `null`, `true` and `false` as themselves;
/// * strings as ECMAScript `JSON.stringify` writes them (see
///   [`write_json_string`]);
/// * numbers as ECMAScript `Number.prototype.toString` writes them, with
///   negative zero written as `0`;
/// * object members sorted by the UTF-16 code units of their names (see
///   [`jcs_key_cmp`]), recursively; array order is kept.
///
/// Integers are converted to `f64` before they are written, because JCS
/// defines every JSON number as an IEEE 754 double. An integer beyond
/// ±2^53 held exactly by serde_json as a `u64` or `i64` is therefore rounded to
/// the nearest double, as JavaScript would: `9007199254740993` is written as
/// `9007199254740992` and `u64::MAX` as `18446744073709552000`. Callers who
/// need such values exactly must store them as JSON strings (RFC 8785,
/// appendix D).
///
/// This function is exact for the `Value` it is given, but it cannot repair a
/// `Value` whose numbers were misread. serde_json's default float parser may
/// be off by one unit in the last place (it reads `333333333.33333329`, from
/// the RFC 8785 example, as `333333333.33333325`), so JSON text that is
/// parsed before hashing needs serde_json's `float_roundtrip` feature.
///
/// Strings need no validation here: a Rust `str` is always well-formed
/// UTF-8, so the lone surrogates that RFC 8785 section 3.2.2.2 forbids cannot
/// occur.
///
/// On error, `out` may hold a partial serialisation and should be discarded.
///
/// # Errors
///
/// Returns [`CanonicalJsonError::NonFiniteNumber`] for a number that is not a
/// finite double (only possible with serde_json's `arbitrary_precision`).
pub fn write_canonical_json(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalJsonError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(number, out)?,
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical_json(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // The map's own order is either byte order (BTreeMap) or insertion
            // order (with `preserve_order`); neither is the UTF-16 order JCS
            // requires, so the members are always sorted here.
            let mut members: Vec<(&str, &Value)> = map
                .iter()
                .map(|(name, member)| (name.as_str(), member))
                .collect();
            write_object(&mut members, out, |member, out| {
                write_canonical_json(member, out)
            })?;
        }
    }
    Ok(())
}

/// Writes an object's members in JCS order (sorted by [`jcs_key_cmp`]), each value
/// by `write_value`.
fn write_object<V, E>(
    members: &mut [(&str, V)],
    out: &mut Vec<u8>,
    mut write_value: impl FnMut(&V, &mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    members.sort_unstable_by(|(a, _), (b, _)| jcs_key_cmp(a, b));
    out.push(b'{');
    for (index, (name, member)) in members.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_json_string(name, out);
        out.push(b':');
        write_value(member, out)?;
    }
    out.push(b'}');
    Ok(())
}

/// Returns the RFC 8785 canonical form of `value` as UTF-8 bytes.
///
/// This is a convenience wrapper around [`write_canonical_json`]; see there
/// for the exact rules, including how large integers are handled.
///
/// # Errors
///
/// Returns [`CanonicalJsonError::NonFiniteNumber`] for a number that is not a
/// finite double (only possible with serde_json's `arbitrary_precision`).
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut out = Vec::new();
    write_canonical_json(value, &mut out)?;
    Ok(out)
}

/// Writes the canonical form of JSON text that is one object of strings, nulls and
/// booleans (what `dsa_core.rows` holds for a CSV row), and
/// returns `true`; returns `false`, with `out` untouched, for any other text, which
/// then needs [`canonical_json`] over the parsed value.
///
/// The same bytes as that path, with few allocations: names and strings are borrowed
/// from `text`, and only a string with an escape is copied.
pub fn write_canonical_flat_json(text: &str, out: &mut Vec<u8>) -> bool {
    let Ok(FlatObject(mut members)) = serde_json::from_str::<FlatObject<'_>>(text) else {
        return false;
    };
    let Ok(()) = write_object::<_, std::convert::Infallible>(&mut members, out, |member, out| {
        match member {
            Flat::Str(text) => write_json_string(text, out),
            Flat::Null => out.extend_from_slice(b"null"),
            Flat::Bool(true) => out.extend_from_slice(b"true"),
            Flat::Bool(false) => out.extend_from_slice(b"false"),
        }
        Ok(())
    });
    true
}

/// The members of a flat object, borrowed from its text.
struct FlatObject<'a>(Vec<(&'a str, Flat<'a>)>);

/// A member value [`write_canonical_flat_json`] writes itself.
enum Flat<'a> {
    /// Borrowed from the text, or copied when it had an escape.
    Str(std::borrow::Cow<'a, str>),
    Null,
    Bool(bool),
}

impl<'de> serde::Deserialize<'de> for FlatObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = FlatObject<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(member) = map.next_entry::<&'de str, Flat<'de>>()? {
                    members.push(member);
                }
                Ok(FlatObject(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

impl<'de> serde::Deserialize<'de> for Flat<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Member;
        impl<'de> serde::de::Visitor<'de> for Member {
            type Value = Flat<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a string, null or a boolean")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Flat::Str(text.into()))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Flat::Str(text.to_owned().into()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Flat::Null)
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Self::Value, E> {
                Ok(Flat::Bool(value))
            }
        }
        deserializer.deserialize_any(Member)
    }
}

/// Writes a JSON number the way ECMAScript's `Number.prototype.toString` does.
fn write_number(number: &Number, out: &mut Vec<u8>) -> Result<(), CanonicalJsonError> {
    // `as_f64` rounds `u64` and `i64` to the nearest double, which is the
    // conversion JCS requires (RFC 8785 section 3.2.2.3); it returns `None`
    // only for out-of-range numbers under `arbitrary_precision`.
    let value = number
        .as_f64()
        .filter(|value| value.is_finite())
        .ok_or_else(|| CanonicalJsonError::NonFiniteNumber(number.to_string()))?;
    write_json_number(value, out);
    Ok(())
}

/// Writes a finite double as RFC 8785 requires (ECMAScript's `Number.prototype.toString`);
/// used directly by the spreadsheet encoder, whose cells hold doubles.
pub fn write_json_number(value: f64, out: &mut Vec<u8>) {
    debug_assert!(value.is_finite());
    if value == 0.0 {
        // ECMAScript prints both zeros as "0"; checking here keeps that rule
        // independent of how the formatter treats the sign of zero.
        out.push(b'0');
    } else {
        out.extend_from_slice(ryu_js::Buffer::new().format_finite(value).as_bytes());
    }
}

/// What each byte turns into inside a JSON string literal.
///
/// `0` means the byte is copied as it is; any other entry is the escape
/// letter (`b`, `t`, `n`, `f`, `r`, `"`, `\`), or `u` for the `\u00XX` form.
/// Bytes of multi-byte UTF-8 sequences are all at least 0x80 and therefore
/// always copied, which is what makes a byte-wise scan correct.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `s` to `out` as one RFC 8785 string literal, including the quotes.
///
/// The escaping is that of ECMAScript `JSON.stringify` (RFC 8785 section
/// 3.2.2.2): `"` and `\` are escaped with a backslash; U+0008, U+0009,
/// U+000A, U+000C and U+000D become `\b`, `\t`, `\n`, `\f` and `\r`; the
/// other characters below U+0020 become `\u00XX` with lowercase hex digits.
/// Everything else, including `/`, U+007F, U+2028, U+2029 and all non-ASCII
/// characters, is copied as literal UTF-8.
///
/// This runs for every field of every imported row, so it copies unescaped
/// runs with one `extend_from_slice` each instead of pushing characters.
pub fn write_json_string(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    // Most fields need no escaping at all, so reserving for the plain case
    // avoids repeated growth of `out` in the common path.
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape = ESCAPE[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[run_start..index]);
        run_start = index + 1;
        if escape == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0x0F)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', escape]);
        }
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

/// Orders object member names as RFC 8785 section 3.2.3 requires: by their
/// UTF-16 code units, compared as unsigned integers.
///
/// This differs from Rust's `str` order (UTF-8 bytes, i.e. code points) only
/// when one name has a character above U+FFFF and the other a character in
/// U+E000..=U+FFFF at the first point where they differ: in UTF-16 the former
/// starts with a surrogate (0xD800..=0xDBFF) and so sorts first, e.g. U+1F600
/// comes before U+FB33.
///
/// The CSV import sorts its header names once with this function and then
/// writes every row's members in that order, so this must agree exactly with
/// the sorting inside [`write_canonical_json`] (it is the same function).
pub fn jcs_key_cmp(a: &str, b: &str) -> Ordering {
    let (a_bytes, b_bytes) = (a.as_bytes(), b.as_bytes());
    let common = a_bytes
        .iter()
        .zip(b_bytes)
        .take_while(|(x, y)| x == y)
        .count();
    if common == a_bytes.len() || common == b_bytes.len() {
        // One name is a prefix of the other. Because both are valid UTF-8,
        // a byte prefix is also a UTF-16 prefix, and the shorter name sorts
        // first.
        return a_bytes.len().cmp(&b_bytes.len());
    }
    // The names share a byte prefix and then differ inside some character.
    // Step back to the start of that character: it is a character boundary
    // in both names, because the bytes before it are identical and form
    // complete characters. Only the first differing characters decide the
    // order, and comparing them as UTF-16 handles the surrogate case.
    let mut start = common;
    while !a.is_char_boundary(start) {
        start -= 1;
    }
    a[start..].encode_utf16().cmp(b[start..].encode_utf16())
}

/// A row's content hash: the SHA-256 digest of its canonical JSON.
pub type RowHash = [u8; 32];

/// Returns `sha256(canonical)`, the row hash of a row whose RFC 8785
/// canonical form is `canonical`.
///
/// The caller supplies the canonical bytes (from [`canonical_json`] or the
/// CSV fast path) so that the exact bytes hashed can also be stored.
pub fn row_hash(canonical: &[u8]) -> RowHash {
    Sha256::digest(canonical).into()
}

/// Why a tree-hash checkpoint could not be resumed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeHashError {
    /// The checkpoint is not 64 hexadecimal digits.
    #[error("tree hash checkpoint is not 64 hexadecimal digits: {0}")]
    InvalidHex(#[from] hex::FromHexError),
}

/// Computes a commit's tree hash incrementally, in constant space.
///
/// # Definition
///
/// This definition is part of the public identity of a commit; changing it
/// changes every tree hash.
///
/// ```text
/// state_0 = 32 zero bytes
/// for each row i = 1..=n, in file order:
///     state_i = sha256(state_{i-1}
///                      || u32_be(byte length of logical_row_id_i)
///                      || logical_row_id_i as UTF-8
///                      || row_hash_i)          // the 32 raw bytes
/// tree_hash = lowercase hex of state_n
/// ```
///
/// For a commit with zero rows the tree hash is therefore 64 `0` digits, not
/// the hex of `sha256("")`.
///
/// The logical row id is length-prefixed so that the boundary between id and
/// row hash is unambiguous. Because the state after a row depends only on the
/// state before it and that row, the result does not depend on how rows are
/// split into batches: an import can stop after any row, store
/// [`to_hex`](Self::to_hex) as a checkpoint, and continue later with
/// [`from_hex`](Self::from_hex).
#[derive(Clone)]
pub struct TreeHasher {
    /// The chain value after the rows pushed so far.
    state: [u8; 32],
    /// A hasher kept between rows so that `push` sets up no new state; it is
    /// always reset (empty) between calls.
    hasher: Sha256,
}

impl TreeHasher {
    /// Starts a tree hash with no rows (state of 32 zero bytes).
    pub fn new() -> Self {
        Self::from_state([0; 32])
    }

    /// Resumes a tree hash from a checkpoint written by
    /// [`to_hex`](Self::to_hex).
    ///
    /// Upper-case hex digits are accepted as well as the lower-case ones that
    /// `to_hex` writes.
    ///
    /// # Errors
    ///
    /// Returns [`TreeHashError::InvalidHex`] unless `checkpoint` is exactly 64
    /// hexadecimal digits.
    pub fn from_hex(checkpoint: &str) -> Result<Self, TreeHashError> {
        let mut state = [0; 32];
        hex::decode_to_slice(checkpoint, &mut state)?;
        Ok(Self::from_state(state))
    }

    fn from_state(state: [u8; 32]) -> Self {
        Self {
            state,
            hasher: Sha256::new(),
        }
    }

    /// Adds the next row, in file order, to the tree hash.
    ///
    /// # Panics
    ///
    /// Panics if `logical_row_id` is 4 GiB or longer, because its length must
    /// fit the 32-bit prefix of the definition.
    pub fn push(&mut self, logical_row_id: &str, row_hash: &RowHash) {
        let id_len = u32::try_from(logical_row_id.len())
            .expect("a logical row id must be shorter than 4 GiB");
        self.hasher.update(self.state);
        self.hasher.update(id_len.to_be_bytes());
        self.hasher.update(logical_row_id.as_bytes());
        self.hasher.update(row_hash);
        self.state = self.hasher.finalize_reset().into();
    }

    /// Returns the tree hash of the rows pushed so far as 64 lowercase hex
    /// digits. This is both the final tree hash and the checkpoint format
    /// accepted by [`from_hex`](Self::from_hex).
    pub fn to_hex(&self) -> String {
        hex::encode(self.state)
    }
}

impl Default for TreeHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TreeHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeHasher")
            .field("state", &self.to_hex())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_flat_object_is_written_as_the_general_path_writes_it() {
        let flat = [
            r#"{"b": "2", "a": "1", "id": null, "ok": true, "no": false}"#,
            r#"{}"#,
            "{\"é\": \"x\", \"e\": \"\", \"\u{10437}\": \"a\", \"\u{fb33}\": \"b\"}",
            "{\"city\": \"Zürich\", \"note\": \"a/b\"}",
            r#"{"a": "line\nbreak \"quoted\" \u00e9\ud83d\ude00", "b": "\u0001"}"#,
        ];
        let general = [
            r#"{"a": 1.50}"#,
            r#"{"a": {"b": "c"}}"#,
            r#"["a"]"#,
            r#""a""#,
            r#"{"a": "x"} trailing"#,
        ];
        for text in flat.iter().chain(&general) {
            let mut fast = Vec::new();
            let took = write_canonical_flat_json(text, &mut fast);
            assert_eq!(took, flat.contains(text), "{text}");
            if took {
                let value: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(fast, canonical_json(&value).unwrap(), "{text}");
            } else {
                assert!(fast.is_empty(), "{text}");
            }
        }
    }

    fn canonical_string(value: &Value) -> String {
        String::from_utf8(canonical_json(value).expect("canonicalizable")).expect("UTF-8")
    }

    fn string_literal(s: &str) -> String {
        let mut out = Vec::new();
        write_json_string(s, &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    fn number_string(value: f64) -> String {
        let number = Number::from_f64(value).expect("finite");
        canonical_string(&Value::Number(number))
    }

    /// RFC 8785 section 3.2.3: the canonical form of the section 3.2.2
    /// sample, with the display line wrap removed.
    const RFC_EXAMPLE_CANONICAL: &str = concat!(
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,"#,
        r#"1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#,
    );

    /// RFC 8785 section 3.2.4: the same canonical form as UTF-8 bytes.
    const RFC_EXAMPLE_UTF8_HEX: &str = "\
        7b 22 6c 69 74 65 72 61 6c 73 22 3a 5b 6e 75 6c 6c 2c 74 72 \
        75 65 2c 66 61 6c 73 65 5d 2c 22 6e 75 6d 62 65 72 73 22 3a \
        5b 33 33 33 33 33 33 33 33 33 2e 33 33 33 33 33 33 33 2c 31 \
        65 2b 33 30 2c 34 2e 35 2c 30 2e 30 30 32 2c 31 65 2d 32 37 \
        5d 2c 22 73 74 72 69 6e 67 22 3a 22 e2 82 ac 24 5c 75 30 30 \
        30 66 5c 6e 41 27 42 5c 22 5c 5c 5c 5c 5c 22 2f 22 7d";

    fn assert_rfc_example_output(value: &Value) {
        let canonical = canonical_json(value).expect("canonicalizable");
        assert_eq!(
            String::from_utf8(canonical.clone()).unwrap(),
            RFC_EXAMPLE_CANONICAL
        );
        let expected_bytes = hex::decode(RFC_EXAMPLE_UTF8_HEX.replace(' ', "")).unwrap();
        assert_eq!(canonical, expected_bytes);
    }

    /// RFC 8785 sections 3.2.2 to 3.2.4, end to end: the sample JSON text of
    /// section 3.2.2, parsed by serde_json, canonicalizes to the text of
    /// section 3.2.3 and the bytes of section 3.2.4.
    ///
    /// This also depends on serde_json reading `333333333.33333329` exactly,
    /// which needs its `float_roundtrip` feature; see
    /// `serde_json_reads_numbers_exactly`.
    #[test]
    fn rfc_8785_section_3_2_canonicalization_example() {
        let input = r#"{
    "numbers": [333333333.33333329, 1E30, 4.50,
                2e-3, 0.000000000000000000000000001],
    "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
    "literals": [null, true, false]
  }"#;
        let value: Value = serde_json::from_str(input).expect("valid JSON");
        assert_rfc_example_output(&value);
    }

    /// The same RFC example, built from Rust literals instead of parsed JSON
    /// text, so that it checks the canonicalizer alone: Rust's own float
    /// literals are always correctly rounded.
    // The literals are copied from the RFC on purpose, digits beyond what an
    // f64 holds included, so the excess precision is intended.
    #[allow(clippy::excessive_precision)]
    #[test]
    fn rfc_8785_section_3_2_example_from_exact_doubles() {
        let value = json!({
            "numbers": [333333333.33333329_f64, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
            "string": "\u{20ac}$\u{f}\u{a}A'\u{42}\u{22}\u{5c}\\\"/",
            "literals": [null, true, false],
        });
        assert_rfc_example_output(&value);
    }

    /// Row hashes of parsed JSON are only reproducible if the parser reads
    /// every number as the nearest double, as JavaScript's `JSON.parse` does.
    /// serde_json guarantees that only with its `float_roundtrip` feature;
    /// without it, this RFC 8785 input is read one unit in the last place too
    /// low (bits 41b3de4355555554).
    #[test]
    fn serde_json_reads_numbers_exactly() {
        let parsed: f64 = serde_json::from_str("333333333.33333329").unwrap();
        assert_eq!(
            parsed.to_bits(),
            0x41b3de4355555555,
            "serde_json needs the \"float_roundtrip\" feature in Cargo.toml"
        );
    }

    /// RFC 8785 section 3.2.3: the property sorting test data and the
    /// expected order of the values after sorting.
    #[test]
    fn rfc_8785_section_3_2_3_sorting_example() {
        let input = r#"{
    "\u20ac": "Euro Sign",
    "\r": "Carriage Return",
    "\ufb33": "Hebrew Letter Dalet With Dagesh",
    "1": "One",
    "\ud83d\ude00": "Emoji: Grinning Face",
    "\u0080": "Control",
    "\u00f6": "Latin Small Letter O With Diaeresis"
  }"#;
        let value: Value = serde_json::from_str(input).expect("valid JSON");
        let text = canonical_string(&value);

        // The RFC's expected order of the values after sorting.
        let expected_order = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small Letter O With Diaeresis",
            "Euro Sign",
            "Emoji: Grinning Face",
            "Hebrew Letter Dalet With Dagesh",
        ];
        let positions: Vec<usize> = expected_order
            .iter()
            .map(|name| text.find(&format!("\"{name}\"")).expect("value present"))
            .collect();
        assert!(
            positions.windows(2).all(|pair| pair[0] < pair[1]),
            "wrong member order in {text}"
        );

        // The full canonical text, derived from the order above.
        let expected = concat!(
            "{\"\\r\":\"Carriage Return\",",
            "\"1\":\"One\",",
            "\"\u{80}\":\"Control\",",
            "\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",",
            "\"\u{20ac}\":\"Euro Sign\",",
            "\"\u{1f600}\":\"Emoji: Grinning Face\",",
            "\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}",
        );
        assert_eq!(text, expected);
    }

    /// RFC 8785 appendix B, table 1 ("ECMAScript-Compatible JSON Number
    /// Serialization Samples"), except the NaN and Infinity rows, which are
    /// covered by `non_finite_numbers_cannot_be_canonicalized`.
    #[test]
    fn rfc_8785_appendix_b_number_samples() {
        const SAMPLES: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for &(bits, expected) in SAMPLES {
            assert_eq!(
                number_string(f64::from_bits(bits)),
                expected,
                "IEEE 754 bits {bits:016x}"
            );
        }
    }

    /// Appendix B lists NaN (7fffffffffffffff) and Infinity
    /// (7ff0000000000000) as not permitted. serde_json refuses to build such
    /// numbers, so they can never reach the canonicalizer.
    #[test]
    fn non_finite_numbers_cannot_be_canonicalized() {
        assert!(Number::from_f64(f64::from_bits(0x7fffffffffffffff)).is_none());
        assert!(Number::from_f64(f64::from_bits(0x7ff0000000000000)).is_none());
        assert!(serde_json::from_str::<Value>("1e400").is_err());
    }

    #[test]
    fn integers_are_serialized_as_doubles() {
        assert_eq!(canonical_string(&json!(0)), "0");
        assert_eq!(canonical_string(&json!(-1)), "-1");
        assert_eq!(
            canonical_string(&json!(9007199254740991_u64)),
            "9007199254740991"
        );
        // 2^53 + 1 is not a double; it rounds to 2^53, as in JavaScript.
        assert_eq!(
            canonical_string(&json!(9007199254740993_u64)),
            "9007199254740992"
        );
        assert_eq!(canonical_string(&json!(u64::MAX)), "18446744073709552000");
        assert_eq!(canonical_string(&json!(i64::MIN)), "-9223372036854776000");
        assert_eq!(canonical_string(&json!(-0.0)), "0");
    }

    #[test]
    fn strings_are_escaped_like_json_stringify() {
        assert_eq!(string_literal(""), r#""""#);
        assert_eq!(string_literal("plain ascii"), r#""plain ascii""#);
        assert_eq!(string_literal("a\"b\\c/d"), r#""a\"b\\c/d""#);
        assert_eq!(
            string_literal("\u{8}\t\n\u{b}\u{c}\r"),
            r#""\b\t\n\u000b\f\r""#
        );
        assert_eq!(
            string_literal("\u{0}\u{1}\u{1f}\u{7f}"),
            "\"\\u0000\\u0001\\u001f\u{7f}\""
        );
        // Line and paragraph separators, and all other non-ASCII, stay literal.
        assert_eq!(
            string_literal("\u{2028}\u{2029}é€😀"),
            "\"\u{2028}\u{2029}é€😀\""
        );
        // Escapes at both ends and in a row exercise the run bookkeeping.
        assert_eq!(string_literal("\"x\"\"\n"), r#""\"x\"\"\n""#);
    }

    #[test]
    fn every_control_character_uses_the_json_stringify_form() {
        for code in 0u8..0x20 {
            let expected = match code {
                0x08 => "\\b".to_owned(),
                0x09 => "\\t".to_owned(),
                0x0A => "\\n".to_owned(),
                0x0C => "\\f".to_owned(),
                0x0D => "\\r".to_owned(),
                _ => format!("\\u{code:04x}"),
            };
            let input = char::from(code).to_string();
            assert_eq!(string_literal(&input), format!("\"{expected}\""));
        }
    }

    #[test]
    fn write_json_string_appends() {
        let mut out = b"prefix:".to_vec();
        write_json_string("v", &mut out);
        assert_eq!(out, b"prefix:\"v\"");
    }

    #[test]
    fn key_order_is_utf16_code_unit_order() {
        // U+1F600 is a surrogate pair starting 0xD83D, below U+FB33 in UTF-16
        // even though it is above it as a code point and in UTF-8.
        assert_eq!(jcs_key_cmp("\u{1f600}", "\u{fb33}"), Ordering::Less);
        assert_eq!("\u{1f600}".cmp("\u{fb33}"), Ordering::Greater);
        assert_eq!(jcs_key_cmp("", "a"), Ordering::Less);
        assert_eq!(jcs_key_cmp("a", "aa"), Ordering::Less);
        assert_eq!(jcs_key_cmp("aa", "ab"), Ordering::Less);
        assert_eq!(jcs_key_cmp("ab", "ab"), Ordering::Equal);

        // Compare against a direct UTF-16 comparison on names that share
        // multi-byte prefixes and differ in every kind of character.
        let pieces = [
            "",
            "a",
            "b",
            "\r",
            "\u{7f}",
            "\u{80}",
            "\u{f6}",
            "\u{7ff}",
            "\u{800}",
            "\u{20ac}",
            "\u{d7ff}",
            "\u{e000}",
            "\u{fb33}",
            "\u{ffff}",
            "\u{10000}",
            "\u{1f600}",
            "\u{1f601}",
            "\u{10ffff}",
        ];
        let mut names = Vec::new();
        for first in pieces {
            for second in pieces {
                names.push(format!("{first}{second}"));
            }
        }
        for a in &names {
            for b in &names {
                assert_eq!(
                    jcs_key_cmp(a, b),
                    a.encode_utf16().cmp(b.encode_utf16()),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn nested_objects_and_arrays_are_canonicalized() {
        let value = json!({
            "b": [3, {"z": 1, "y": [true, null]}, "s"],
            "a": {},
            "c": [],
        });
        assert_eq!(
            canonical_string(&value),
            r#"{"a":{},"b":[3,{"y":[true,null],"z":1},"s"],"c":[]}"#
        );
    }

    /// The expected digest was computed independently with Python:
    /// `hashlib.sha256(b'{"a":"1","b":"x"}').hexdigest()`.
    #[test]
    fn known_row_has_fixed_hash() {
        let canonical = canonical_json(&json!({"b": "x", "a": "1"})).unwrap();
        assert_eq!(canonical, br#"{"a":"1","b":"x"}"#);
        assert_eq!(
            hex::encode(row_hash(&canonical)),
            "6d2349f371a5eb9cf30f59249da29fca7a1a5c25c4b43442dd95be13cd927b87"
        );
    }

    #[test]
    fn empty_tree_hash_is_all_zeros() {
        assert_eq!(TreeHasher::new().to_hex(), "0".repeat(64));
        assert_eq!(TreeHasher::default().to_hex(), "0".repeat(64));
    }

    fn sample_rows() -> Vec<(String, RowHash)> {
        (0..10)
            .map(|i| {
                let canonical = canonical_json(&json!({"n": i.to_string()})).unwrap();
                (format!("row-{i}"), row_hash(&canonical))
            })
            .collect()
    }

    #[test]
    fn tree_hash_is_independent_of_checkpoints() {
        let rows = sample_rows();

        let mut whole = TreeHasher::new();
        for (id, hash) in &rows {
            whole.push(id, hash);
        }

        for split in 0..=rows.len() {
            let mut first = TreeHasher::new();
            for (id, hash) in &rows[..split] {
                first.push(id, hash);
            }
            let mut resumed = TreeHasher::from_hex(&first.to_hex()).unwrap();
            for (id, hash) in &rows[split..] {
                resumed.push(id, hash);
            }
            assert_eq!(resumed.to_hex(), whole.to_hex(), "split at {split}");
        }
    }

    /// Recomputes the documented definition by hand for two rows.
    #[test]
    fn tree_hash_matches_its_definition() {
        let rows = sample_rows();
        let mut state = [0u8; 32];
        for (id, hash) in &rows[..2] {
            let mut message = Vec::new();
            message.extend_from_slice(&state);
            message.extend_from_slice(&u32::try_from(id.len()).unwrap().to_be_bytes());
            message.extend_from_slice(id.as_bytes());
            message.extend_from_slice(hash);
            state = Sha256::digest(&message).into();
        }

        let mut hasher = TreeHasher::new();
        for (id, hash) in &rows[..2] {
            hasher.push(id, hash);
        }
        assert_eq!(hasher.to_hex(), hex::encode(state));
    }

    /// Pins one tree hash so that an accidental change of the definition is
    /// caught. The expected value was computed independently with Python:
    /// `hashlib.sha256(bytes(32) + (1).to_bytes(4, "big") + b"1" + bytes.fromhex(
    /// "6d2349f371a5eb9cf30f59249da29fca7a1a5c25c4b43442dd95be13cd927b87")).hexdigest()`.
    #[test]
    fn known_tree_hash() {
        let row = row_hash(br#"{"a":"1","b":"x"}"#);
        let mut hasher = TreeHasher::new();
        hasher.push("1", &row);
        assert_eq!(hasher.to_hex(), KNOWN_TREE_HASH);
    }

    const KNOWN_TREE_HASH: &str =
        "1ba60722951d4e3c16abc1c3160328d263cda4fa538798a0d4374d665eff2516";

    #[test]
    fn from_hex_rejects_malformed_checkpoints() {
        assert!(TreeHasher::from_hex("").is_err());
        assert!(TreeHasher::from_hex(&"0".repeat(63)).is_err());
        assert!(TreeHasher::from_hex(&"0".repeat(66)).is_err());
        assert!(TreeHasher::from_hex(&"g".repeat(64)).is_err());
        let upper = "AB".repeat(32);
        assert_eq!(
            TreeHasher::from_hex(&upper).unwrap().to_hex(),
            "ab".repeat(32)
        );
    }
}
