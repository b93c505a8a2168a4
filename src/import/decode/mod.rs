//! Stage `decode`: file bytes become rows of canonical JSON, with the header resolved once.
//!
//! `csv` reads CSV (async, over the fetch stream); `sheet` reads spreadsheets through
//! calamine. What both share lives here: the header and its renamed columns, the
//! canonical key order every row encoder writes in, and the problems a row can have.
//! Turning a record into canonical JSON is plain CPU work, done off the async executor.
//! Positions are kept absolute (bytes from the start of the object, lines from its
//! first line) so errors and checkpoints mean the same thing whether or not the run
//! was resumed.

pub mod archive;
pub mod csv;
pub mod lines;
pub mod sheet;
pub mod sniff;
pub mod text;

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use crate::import::fetch::FetchError;
use crate::import::hash::{jcs_key_cmp, write_json_string};
pub use crate::import::run::{sheet_name, Header, HeaderChange, HeaderChangeReason};

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("{file}: line {line}, byte {byte}: {problem}")]
    BadRow {
        file: String,
        line: u64,
        byte: u64,
        problem: RowProblem,
    },
    #[error(
        "{file}: the content is {found}, not CSV; name it with its format's extension \
         (.xlsx, .xlsb, .xls, .ods) to import it as a spreadsheet"
    )]
    NotCsv { file: String, found: &'static str },
    #[error(
        "{file}: the content is {found}, which is not read here: text is read as CSV, TSV or \
         JSON Lines, plain or compressed (gzip, zstd, bzip2, or one member of a zip \
         archive), and workbooks as xlsx, xlsb, xls or ods"
    )]
    Unreadable { file: String, found: &'static str },
    #[error("{file}: the file is empty; a CSV needs a header row")]
    MissingHeader { file: String },
    #[error("{file}: header (line 1): {problem}")]
    BadHeader { file: String, problem: RowProblem },
    #[error(
        "{file}: the header has {columns} columns, more than the limit of {limit} \
         (IMPORT_MAX_COLUMNS)"
    )]
    TooManyColumns {
        file: String,
        columns: usize,
        limit: u64,
    },
    #[error(transparent)]
    Source(#[from] FetchError),
    #[error(
        "{file}: the data ended at byte {read} of {size}; was the file changed while it was read?"
    )]
    Truncated { file: String, read: u64, size: u64 },
    #[error(
        "{file}: the record starting at byte {byte} is longer than {limit} bytes \
         (IMPORT_MAX_RECORD_BYTES); is a quote left open there?"
    )]
    RecordTooLong { file: String, byte: u64, limit: u64 },
    #[error(
        "{file}: line {line}, byte {byte}: a quoted field in this record is never closed; \
         the parser would take the rest of the file as its value (is a quote left open?)"
    )]
    UnterminatedQuote { file: String, line: u64, byte: u64 },
    #[error("{file}: the zip {problem}")]
    Archive { file: String, problem: String },
    #[error("{file}: {problem}")]
    Text {
        file: String,
        problem: text::TextError,
    },
    #[error("{file}: reading CSV near byte {byte}: {message}")]
    Read {
        file: String,
        byte: u64,
        message: String,
    },
}

/// What is wrong with one record; also stored with rows a run chose to skip.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RowProblem {
    #[error("expected {expected} fields as in the header, found {found}")]
    Ragged { expected: usize, found: usize },
    #[error("column {column} is not valid UTF-8 (at byte {byte} of the file)")]
    InvalidUtf8 { column: usize, byte: u64 },
    /// Bytes invalid in the encoding the text was decoded from; `byte` counts the text
    /// after decoding (and decompression), where the parser found it.
    #[error("column {column} is not valid {encoding} (near byte {byte} of the decoded text)")]
    InvalidEncoding {
        column: usize,
        byte: u64,
        encoding: String,
    },
    #[error("column {column} contains a NUL character, which PostgreSQL cannot store in JSON")]
    NulCharacter { column: usize },
    /// JSON Lines: a line that is not valid JSON (or not storable).
    #[error("the line is not valid JSON: {message}")]
    InvalidJson { message: String },
    /// JSON Lines: valid JSON whose data would not be stored as written (a key twice in
    /// one object, an integer whose canonical form is another number).
    #[error("the line cannot be stored as written: {message}")]
    NotStorable { message: String },
    /// JSON Lines: a line that is JSON but not an object.
    #[error("the line is a JSON {found}, not an object")]
    NotAnObject { found: &'static str },
    /// A spreadsheet cell with a value beyond the columns its header names; refused
    /// rather than dropped or given a made-up name.
    #[error("cell {cell} has a value outside the header's columns {columns}")]
    OutsideHeader { cell: String, columns: String },
    /// A key column that is empty (or a null cell): the row has no identity.
    #[error("key column {name:?} is empty")]
    EmptyKey { column: usize, name: String },
    /// A key column whose value is a JSON array or object (`found` names which).
    #[error("key column {name:?} holds {found}; a key is a string, a number or a boolean")]
    NestedKey {
        column: usize,
        name: String,
        found: &'static str,
    },
    /// A key that an earlier row of the same file has already (at `first_line` when
    /// that row was in the same batch).
    #[error("key {key} repeats the key of {}", earlier(*.first_line))]
    RepeatedKey {
        key: String,
        first_line: Option<u64>,
    },
    /// `append` with `on_conflict fail`: a key the parent commit has already.
    #[error("key {key} exists in the dataset already (mode append, on_conflict fail)")]
    ExistingKey { key: String },
}

impl RowProblem {
    /// The 1-based column the problem is in, when it is in one.
    pub fn column(&self) -> Option<usize> {
        match self {
            RowProblem::Ragged { .. }
            | RowProblem::InvalidJson { .. }
            | RowProblem::NotStorable { .. }
            | RowProblem::NotAnObject { .. }
            | RowProblem::OutsideHeader { .. }
            | RowProblem::RepeatedKey { .. }
            | RowProblem::ExistingKey { .. } => None,
            RowProblem::InvalidUtf8 { column, .. }
            | RowProblem::InvalidEncoding { column, .. }
            | RowProblem::NulCharacter { column }
            | RowProblem::EmptyKey { column, .. }
            | RowProblem::NestedKey { column, .. } => Some(*column),
        }
    }
}

fn earlier(line: Option<u64>) -> String {
    match line {
        Some(line) => format!("line {line}"),
        None => "an earlier row".to_owned(),
    }
}

/// Header resolution lives here, with the rest of decoding; the [`Header`] type itself
/// is in `run.rs` because the checkpoint carries it.
impl Header {
    /// Names an empty header cell `column_N` (its 1-based position) and a repeated name
    /// `name_2`, `name_3`, ... in file order, skipping any candidate that is already taken,
    /// so the same header always gives the same names.
    ///
    /// Linear in the header's length: each base name remembers the next suffix to try,
    /// so a header of one name repeated n times costs n probes, not n²/2 (a 1 MB
    /// header `a,a,a,...` would otherwise be ~10^11 probes). A probe fails only on a
    /// name that is taken, and each taken name `base_k` is the candidate of one base
    /// and one suffix, so failed probes are bounded by the names too.
    pub fn resolve(raw: &[String]) -> Self {
        let mut taken: HashSet<String> = raw
            .iter()
            .filter(|name| !name.trim().is_empty())
            .cloned()
            .collect();
        let mut seen = HashSet::new();
        let mut next_suffix: HashMap<String, usize> = HashMap::new();
        let mut columns = Vec::with_capacity(raw.len());
        let mut changes = Vec::new();
        for (index, original) in raw.iter().enumerate() {
            let column = index + 1;
            let (name, reason) = if original.trim().is_empty() {
                let base = format!("column_{column}");
                (
                    unique_name(&base, &mut taken, &mut next_suffix, 1),
                    Some(HeaderChangeReason::Empty),
                )
            } else if !seen.insert(original.clone()) {
                (
                    unique_name(original, &mut taken, &mut next_suffix, 2),
                    Some(HeaderChangeReason::Duplicate),
                )
            } else {
                (original.clone(), None)
            };
            if let Some(reason) = reason {
                seen.insert(name.clone());
                changes.push(HeaderChange {
                    column,
                    original: original.clone(),
                    name: name.clone(),
                    reason,
                });
            }
            columns.push(name);
        }
        Self {
            columns,
            changes,
            crlf: false,
        }
    }
}

/// `base` itself when free (for `first_suffix` 1), else `base_2`, `base_3`, ...,
/// starting where the last call for the same base stopped.
fn unique_name(
    base: &str,
    taken: &mut HashSet<String>,
    next_suffix: &mut HashMap<String, usize>,
    first_suffix: usize,
) -> String {
    let suffix = next_suffix.entry(base.to_owned()).or_insert(first_suffix);
    loop {
        let candidate = if *suffix == 1 {
            base.to_owned()
        } else {
            format!("{base}_{suffix}")
        };
        *suffix += 1;
        #[cfg(test)]
        tests::PROBES.with(|probes| probes.set(probes.get() + 1));
        if taken.insert(candidate.clone()) {
            return candidate;
        }
    }
}

/// A header's keys in canonical (RFC 8785) order, each with its escaped JSON prefix:
/// what every row encoder needs to write a row straight into canonical form without
/// building a map per row. The CSV and the spreadsheet encoders share it.
#[derive(Clone, Debug)]
pub struct CanonicalKeys {
    /// Column index for each key, in canonical key order.
    order: Vec<usize>,
    /// `{"key":` for the first key and `,"key":` for the others, already escaped.
    prefixes: Vec<Vec<u8>>,
}

impl CanonicalKeys {
    pub fn new(header: &Header) -> Self {
        let mut order: Vec<usize> = (0..header.columns.len()).collect();
        order.sort_by(|&a, &b| jcs_key_cmp(&header.columns[a], &header.columns[b]));
        let prefixes = order
            .iter()
            .enumerate()
            .map(|(position, &column)| {
                let mut prefix = vec![if position == 0 { b'{' } else { b',' }];
                write_json_string(&header.columns[column], &mut prefix);
                prefix.push(b':');
                prefix
            })
            .collect();
        Self { order, prefixes }
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Each key's prefix with the column it takes its value from, in canonical order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], usize)> {
        self.prefixes
            .iter()
            .map(Vec::as_slice)
            .zip(self.order.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Candidate names `unique_name` tried on this thread.
        pub(super) static PROBES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn names(raw: &[&str]) -> Vec<String> {
        Header::resolve(&raw.iter().map(|s| s.to_string()).collect::<Vec<_>>()).columns
    }

    #[test]
    fn empty_and_duplicate_header_names_are_made_unique_deterministically() {
        assert_eq!(
            names(&["a", "", "a", "a_2", "b", "a"]),
            vec!["a", "column_2", "a_3", "a_2", "b", "a_4"]
        );
        assert_eq!(names(&["column_2", ""]), vec!["column_2", "column_2_2"]);
        let header = Header::resolve(&["x".into(), "x".into()]);
        assert_eq!(header.changes.len(), 1);
        assert_eq!(header.changes[0].reason, HeaderChangeReason::Duplicate);
    }

    #[test]
    fn a_header_of_one_name_repeated_is_renamed_in_linear_time() {
        let raw = vec!["a".to_owned(); 200_000];
        PROBES.with(|probes| probes.set(0));
        let header = Header::resolve(&raw);
        // One candidate name tried per repeated column, not one per earlier column.
        assert_eq!(PROBES.with(|probes| probes.get()), 199_999);
        assert_eq!(header.columns[0], "a");
        assert_eq!(header.columns[1], "a_2");
        assert_eq!(header.columns[199_999], "a_200000");
        assert_eq!(header.changes.len(), 199_999);
    }

    #[test]
    fn sheet_is_the_base_name_up_to_the_first_dot() {
        assert_eq!(sheet_name("data.csv.gz"), "data");
        assert_eq!(sheet_name("data"), "data");
        assert_eq!(sheet_name(".hidden"), ".hidden");
    }
}
