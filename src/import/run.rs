//! What an import run is: its parameters, where it reads from, its checkpoint, its lease
//! and the lineage its commit records. Every stage shares these types, so they live below
//! all of them and import nothing from a stage but the decoded header.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::import::hash::TreeHasher;
use crate::import::order::KeyTrail;

/// What an import run was asked to do; stored as the run's `run_parameters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportParameters {
    pub source: SourceLocation,
    /// The ETag the requester saw; the run fails if the object has another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_etag: Option<String>,
    /// How the file becomes a version; stored flat beside the source.
    #[serde(flatten)]
    pub options: ImportOptions,
}

/// The options every entry point takes for an import (the command line, import
/// requests, `submit`, and whatever else hands files over), defined once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOptions {
    /// Put rows that cannot be decoded into `dsa_jobs.rejected_rows` instead of failing.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// The commit message; a default naming the source is used when absent.
    #[serde(default)]
    pub message: Option<String>,
    /// For spreadsheets: the worksheets to import (all of them when absent). A name
    /// the file does not have fails the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sheets: Option<Vec<String>>,
    /// Columns whose values identify a row (`{sheet}:{value}`), instead of its position.
    /// Absent: the dataset's remembered key, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    /// How the file's rows combine with the parent commit.
    #[serde(default, skip_serializing_if = "ImportMode::is_replace")]
    pub mode: ImportMode,
    /// `append` with a key: what a key the parent has already does.
    #[serde(default, skip_serializing_if = "OnConflict::is_fail")]
    pub on_conflict: OnConflict,
    /// `replace` only: give the dataset a new key (or none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rekey: bool,
    /// The `{sheet}` of a single-table file's rows (default: the parent's one sheet, or
    /// the file's base name for a dataset's first import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sheet_name: Option<String>,
    /// Delimited text: the field delimiter, one byte (`\t` or `tab` for a tab). Absent:
    /// a tab for `.tsv` and `.tab` files, otherwise sniffed from the first lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// Delimited text: the quote character, one byte (default `"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<String>,
    /// Delimited text: a byte that escapes a quote inside a quoted field (`\`), besides
    /// the doubled quote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<String>,
    /// Delimited text: the first line is data; columns are named `column_1`, ...
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_header: bool,
    /// The text's character encoding, any WHATWG label (`windows-1252`, `shift_jis`,
    /// ...). Absent: UTF-8, or UTF-16 when the text starts with its byte order mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// A zip of several files: the member to import, by its full name in the zip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// How to read a file that is not a spreadsheet. Absent: JSON Lines for names
    /// ending in `.jsonl` or `.ndjson` (also before a compression suffix), else CSV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TextFormat>,
}

/// The formats a file that is not a spreadsheet can be read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TextFormat {
    /// Delimited text (CSV, TSV, ...).
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl TextFormat {
    /// The format `options` ask for, or the one the name says (`.jsonl`, `.ndjson`).
    pub fn of(options: &ImportOptions, file_name: &str) -> Self {
        options.format.unwrap_or_else(|| {
            let json_lines = file_name.split('.').skip(1).any(|extension| {
                extension.eq_ignore_ascii_case("jsonl") || extension.eq_ignore_ascii_case("ndjson")
            });
            if json_lines {
                TextFormat::Jsonl
            } else {
                TextFormat::Csv
            }
        })
    }
}

impl ImportOptions {
    /// The option names, as requests spell them (a request with another is refused).
    pub const FIELDS: &'static [&'static str] = &[
        "skip_bad_rows",
        "message",
        "sheets",
        "key",
        "mode",
        "on_conflict",
        "rekey",
        "sheet_name",
        "delimiter",
        "quote",
        "escape",
        "no_header",
        "encoding",
        "member",
        "format",
    ];

    /// Refuses combinations that no import can honour, before a run is created.
    pub fn check(&self) -> Result<(), String> {
        if let Some(key) = &self.key {
            if key.is_empty() || key.iter().any(|column| column.is_empty()) {
                return Err("key must name one or more columns".to_owned());
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(repeated) = key.iter().find(|column| !seen.insert(column.as_str())) {
                return Err(format!("key names column {repeated:?} twice"));
            }
        }
        if self.rekey && self.mode != ImportMode::Replace {
            return Err(format!(
                "rekey is for mode replace only, not {}",
                self.mode.as_str()
            ));
        }
        if self.on_conflict != OnConflict::Fail && self.mode != ImportMode::Append {
            return Err(format!(
                "on_conflict is for mode append only, not {}",
                self.mode.as_str()
            ));
        }
        if matches!(&self.sheet_name, Some(name) if name.is_empty()) {
            return Err("sheet_name must not be empty".to_owned());
        }
        let delimiter = dialect_byte("delimiter", self.delimiter.as_deref())?;
        let quote = dialect_byte("quote", self.quote.as_deref())?;
        let escape = dialect_byte("escape", self.escape.as_deref())?;
        for (name, byte) in [
            ("delimiter", delimiter),
            ("quote", quote),
            ("escape", escape),
        ] {
            if matches!(byte, Some(b'\n' | b'\r')) {
                return Err(format!("{name} cannot be a line end"));
            }
        }
        if delimiter.is_some() && delimiter == quote.or(Some(b'"')) {
            return Err("delimiter and quote must differ".to_owned());
        }
        if matches!(&self.member, Some(name) if name.is_empty()) {
            return Err("member must not be empty".to_owned());
        }
        if let Some(label) = &self.encoding {
            if encoding_rs::Encoding::for_label(label.trim().as_bytes()).is_none() {
                return Err(format!(
                    "encoding {label:?} is not a known label (windows-1252, iso-8859-15, \
                     shift_jis, utf-16le, ...)"
                ));
            }
        }
        Ok(())
    }

    /// The delimiter asked for, if any (checked by [`Self::check`]).
    pub fn delimiter_byte(&self) -> Option<u8> {
        dialect_byte("delimiter", self.delimiter.as_deref())
            .ok()
            .flatten()
    }

    /// The quote byte (default `"`).
    pub fn quote_byte(&self) -> u8 {
        dialect_byte("quote", self.quote.as_deref())
            .ok()
            .flatten()
            .unwrap_or(b'"')
    }

    /// The escape byte asked for, if any.
    pub fn escape_byte(&self) -> Option<u8> {
        dialect_byte("escape", self.escape.as_deref())
            .ok()
            .flatten()
    }
}

/// One byte of a CSV dialect as options spell it: the character itself, or `\t` /
/// `tab` for a tab (a tab is awkward to type in a shell).
fn dialect_byte(name: &str, value: Option<&str>) -> Result<Option<u8>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value {
        "\\t" | "tab" | "\t" => Ok(Some(b'\t')),
        text if text.len() == 1 => Ok(Some(text.as_bytes()[0])),
        text => Err(format!(
            "{name} must be a single byte (or \\t for a tab), not {text:?}"
        )),
    }
}

/// How an import's rows combine with the parent commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ImportMode {
    /// The file is the new version.
    #[default]
    Replace,
    /// The parent's rows stay and the file's rows are added.
    Append,
    /// Rows whose key exists are replaced by the file's, new keys added, others kept.
    Upsert,
    /// The rows of the file's keys are removed; other columns of the file are ignored.
    Delete,
}

impl ImportMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportMode::Replace => "replace",
            ImportMode::Append => "append",
            ImportMode::Upsert => "upsert",
            ImportMode::Delete => "delete",
        }
    }

    fn is_replace(&self) -> bool {
        *self == ImportMode::Replace
    }
}

/// `append` with a key: what happens to a row whose key the parent has already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// The row fails (with `--skip-bad-rows`, it is rejected).
    #[default]
    Fail,
    /// The parent's row is kept.
    Ignore,
    /// The file's row replaces it.
    Update,
}

impl OnConflict {
    pub fn as_str(self) -> &'static str {
        match self {
            OnConflict::Fail => "fail",
            OnConflict::Ignore => "ignore",
            OnConflict::Update => "update",
        }
    }

    fn is_fail(&self) -> bool {
        *self == OnConflict::Fail
    }
}

/// Where a run continues after a crash; written in the same transaction as each batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The commit this run is filling; created before the first batch.
    pub commit_id: String,
    /// The ETag the run started with; a resume against another object fails.
    pub etag: Option<String>,
    /// The `{sheet}` of the logical row ids being written.
    pub sheet: String,
    /// Absolute offset of the first byte not yet loaded (0 until the header is read).
    pub byte_offset: u64,
    /// Line number of the line that starts at `byte_offset`.
    pub line: u64,
    /// Data records consumed so far, loaded or rejected; the next row is `records + 1`.
    pub records: u64,
    /// Rows written to the commit so far.
    pub loaded_rows: u64,
    /// Of those, rows that were not stored before.
    pub new_rows: u64,
    pub rejected_rows: u64,
    /// The tree hash state after the last loaded row.
    pub tree_state: String,
    /// The header, once read; a resume does not read it again. For a spreadsheet,
    /// the header of the sheet being read, which a resume checks against the file.
    pub header: Option<Header>,
    /// Spreadsheets: the position of the sheet being read in the run's list of sheets.
    /// `byte_offset` is then only an estimate of progress; the resume point is this
    /// sheet and `sheet_records`.
    #[serde(default)]
    pub sheet_index: usize,
    /// Spreadsheets: data rows of the current sheet consumed so far (loaded, rejected,
    /// or empty rows between them); the next row is `sheet_records + 1`.
    #[serde(default)]
    pub sheet_records: u64,
    /// Spreadsheets: the sheets read to their end, for the commit's lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_sheets: Vec<SheetLineage>,
    /// The parent, the key and the sheet naming, decided when the run started.
    #[serde(default)]
    pub plan: ImportPlan,
    /// Keyed runs: what the loaded keys said about their order (see `order.rs`).
    #[serde(default)]
    pub key_trail: KeyTrail,
    /// Delimited text: the dialect decided when the header was read (a sniffed
    /// delimiter is not sniffed again on resume). Absent in older checkpoints: the
    /// default dialect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialect: Option<CsvDialect>,
    /// Decoded text (see [`CsvDialect::transformed`]): bytes of the object read when
    /// the batch was cut, for progress; `byte_offset` then counts the decoded text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_offset: Option<u64>,
    /// Batches committed so far in this run. A batch's checkpoint replaces only the
    /// one of the batch before it (see `load::save_checkpoint`): a batch committed
    /// without waiting for its flush and lost in a database crash is then never
    /// built on by the batches after it. Absent in older checkpoints: 0.
    #[serde(default)]
    pub batches: u64,
}

impl Checkpoint {
    /// The state of a run whose commit exists but whose file has not been read yet.
    pub fn start(commit_id: String, etag: Option<String>, sheet: String) -> Self {
        Self {
            commit_id,
            etag,
            sheet,
            byte_offset: 0,
            line: 1,
            records: 0,
            loaded_rows: 0,
            new_rows: 0,
            rejected_rows: 0,
            tree_state: TreeHasher::new().to_hex(),
            header: None,
            sheet_index: 0,
            sheet_records: 0,
            completed_sheets: Vec::new(),
            plan: ImportPlan::default(),
            key_trail: KeyTrail::new(),
            dialect: None,
            object_offset: None,
            batches: 0,
        }
    }
}

/// The right to write one run's batches, valid while `token` is the run's lease token.
#[derive(Clone, Debug)]
pub struct Lease {
    pub run_id: Uuid,
    pub token: i64,
    pub owner: String,
    pub duration: std::time::Duration,
}

/// What the import reads: a file on this machine or an object in a bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceLocation {
    Local { path: PathBuf },
    S3 { bucket: String, key: String },
}

impl SourceLocation {
    /// The object's base name, used for the `{sheet}` part of logical row ids.
    pub fn file_name(&self) -> &str {
        match self {
            SourceLocation::Local { path } => path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or_default(),
            SourceLocation::S3 { key, .. } => key.rsplit('/').next().unwrap_or(key),
        }
    }
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceLocation::Local { path } => write!(f, "{}", path.display()),
            SourceLocation::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

impl FromStr for SourceLocation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("s3://") {
            Some(rest) => match rest.split_once('/') {
                Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => {
                    Ok(SourceLocation::S3 {
                        bucket: bucket.to_owned(),
                        key: key.to_owned(),
                    })
                }
                _ => Err(format!("{text:?} is not of the form s3://bucket/key")),
            },
            None if text.is_empty() => Err("the source is empty".to_owned()),
            None => Ok(SourceLocation::Local {
                path: PathBuf::from(text),
            }),
        }
    }
}

/// What the commit's lineage records about one sheet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SheetLineage {
    pub name: String,
    /// `visible`, `hidden` or `very_hidden`: hidden sheets are imported too.
    pub visibility: String,
    /// Data rows in the commit from this sheet (empty rows between data included).
    pub rows: u64,
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_changes: Vec<HeaderChange>,
}

/// The commit's `source`: where the bytes came from and how they were read. Stored as
/// `dsa_core.commits.source` and in the run's summary; other systems read it, so its
/// JSON form (the location's fields, then these) is part of the contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    #[serde(flatten)]
    pub location: SourceLocation,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    pub size: u64,
    /// `csv`, or the spreadsheet format recognised from the content.
    pub format: Option<String>,
    #[serde(flatten)]
    pub layout: Layout,
    /// This program and the parser that read the file, with their versions.
    pub parser: String,
    /// How the file's rows were combined with the parent (absent: `replace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ImportMode>,
    /// The key columns that identify the rows (absent: rows are identified by position).
    /// Named apart from the object's `key`, which sits beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_key: Option<Vec<String>>,
    /// Every sheet of the commit in logical order, carried-over sheets included (absent
    /// in commits made before it was recorded: then the layout's sheets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sheet_order: Vec<String>,
    /// Keyed commits: the sheets whose keys are all numbers, which sort as numbers;
    /// the keys of other sheets sort bytewise (UTF-8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numeric_key_sheets: Vec<String>,
}

/// How the file's rows were laid out: one CSV table, or a workbook's sheets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layout {
    Csv {
        dialect: CsvDialect,
        columns: Vec<String>,
        /// The `{sheet}` of the file's row ids (absent in older commits: the file's
        /// base name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sheet: Option<String>,
    },
    Sheets {
        sheets: Vec<SheetLineage>,
        /// The sheets the run asked for, when it did not take them all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sheets_requested: Option<Vec<String>>,
    },
    /// JSON Lines: the columns are the union of the objects' keys, in the order first
    /// seen.
    JsonLines {
        text: TextLineage,
        columns: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sheet: Option<String>,
    },
}

/// How a JSON Lines file's text was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextLineage {
    pub encoding: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// The CSV dialect a file was read with, and what it took to get at its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsvDialect {
    pub delimiter: String,
    pub quote: String,
    pub header: bool,
    /// The WHATWG name of the encoding the text was decoded from (`utf-8`, `utf-16le`,
    /// `windows-1252`, ...).
    pub encoding: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<String>,
    /// Whether the delimiter was sniffed from the first lines rather than given or
    /// implied by the name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delimiter_sniffed: bool,
    /// The compression the content was found in (`gzip`, `zstd`, `bzip2`, `zip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// A zip: the member that was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

impl CsvDialect {
    /// Whether the parser reads other bytes than the object's own: then positions count
    /// the decoded UTF-8 text, and a resume decodes from the top and skips to them.
    pub fn transformed(&self) -> bool {
        self.compression.is_some() || self.encoding != "utf-8"
    }
}

impl Default for CsvDialect {
    fn default() -> Self {
        Self {
            delimiter: ",".to_owned(),
            quote: "\"".to_owned(),
            header: true,
            encoding: "utf-8".to_owned(),
            escape: None,
            delimiter_sniffed: false,
            compression: None,
            member: None,
        }
    }
}

impl Lineage {
    /// For an import that merges into `parent` (upsert, append, delete): the new
    /// commit holds the parent's rows too, so its readers (an export's header, above
    /// all) need the parent's columns, then the file's new ones; a delete file's other
    /// columns add nothing. A parent's sheet the file does not have keeps its entry.
    /// Layouts that differ (a CSV upsert into a spreadsheet's dataset) stay as read.
    pub fn keep_parent_columns(&mut self, parent: &Lineage, deleting: bool) {
        let merged = |kept: &[String], read: &[String]| {
            let mut columns = kept.to_vec();
            if !deleting {
                for column in read {
                    if !columns.contains(column) {
                        columns.push(column.clone());
                    }
                }
            }
            columns
        };
        let same_sheets = self.sheet_names() == parent.sheet_names();
        match (&mut self.layout, &parent.layout) {
            (
                Layout::Csv { columns, .. } | Layout::JsonLines { columns, .. },
                Layout::Csv { columns: kept, .. } | Layout::JsonLines { columns: kept, .. },
            ) if same_sheets => *columns = merged(kept, columns),
            (Layout::Sheets { sheets, .. }, Layout::Sheets { sheets: kept, .. }) => {
                let mut result = Vec::with_capacity(kept.len() + sheets.len());
                for parent_sheet in kept {
                    match sheets
                        .iter()
                        .position(|sheet| sheet.name == parent_sheet.name)
                    {
                        Some(index) => {
                            let mut sheet = sheets.remove(index);
                            sheet.columns = merged(&parent_sheet.columns, &sheet.columns);
                            result.push(sheet);
                        }
                        None => result.push(parent_sheet.clone()),
                    }
                }
                result.append(sheets);
                *sheets = result;
            }
            _ => {}
        }
    }

    /// The format for metrics labels and messages: `csv` unless a spreadsheet said more.
    pub fn format(&self) -> &str {
        self.format.as_deref().unwrap_or("other")
    }

    /// The commit's sheets in logical order.
    pub fn sheet_names(&self) -> Vec<String> {
        if !self.sheet_order.is_empty() {
            return self.sheet_order.clone();
        }
        match &self.layout {
            Layout::Csv {
                sheet: Some(sheet), ..
            }
            | Layout::JsonLines {
                sheet: Some(sheet), ..
            } => vec![sheet.clone()],
            Layout::Csv { sheet: None, .. } | Layout::JsonLines { sheet: None, .. } => {
                vec![sheet_name(self.location.file_name())]
            }
            Layout::Sheets { sheets, .. } => {
                sheets.iter().map(|sheet| sheet.name.clone()).collect()
            }
        }
    }

    /// The sheets of a spreadsheet's commit (none for CSV).
    pub fn sheets(&self) -> &[SheetLineage] {
        match &self.layout {
            Layout::Sheets { sheets, .. } => sheets,
            Layout::Csv { .. } | Layout::JsonLines { .. } => &[],
        }
    }
}

/// Bytes-based progress, as people and dashboards read it from `analysis_runs.progress`.
/// Fields a writer left out read as zero: finalise completes a run whose progress was
/// never written with only `percentage` and `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    pub bytes_processed: u64,
    pub total_bytes: u64,
    pub percentage: f64,
    pub rows_processed: u64,
    pub rows_per_second: f64,
    pub status: String,
}

impl Progress {
    pub fn new(
        checkpoint: &Checkpoint,
        total_bytes: u64,
        rows_this_attempt: u64,
        elapsed: Duration,
    ) -> Self {
        let bytes_processed = checkpoint.object_offset.unwrap_or(checkpoint.byte_offset);
        let percentage = if total_bytes == 0 {
            100.0
        } else {
            (bytes_processed as f64 / total_bytes as f64 * 10_000.0).round() / 100.0
        };
        let rows_per_second = if elapsed.as_secs_f64() > 0.0 {
            (rows_this_attempt as f64 / elapsed.as_secs_f64()).round()
        } else {
            0.0
        };
        Self {
            bytes_processed,
            total_bytes,
            percentage,
            rows_processed: checkpoint.records,
            rows_per_second,
            status: format!(
                "Processing: {percentage:.1}% ({} rows, {} bytes of {})",
                checkpoint.records, bytes_processed, total_bytes
            ),
        }
    }
}

/// The header after empty and duplicate names were made unique, deterministically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Column names in file order, as they appear as JSON keys in every row.
    pub columns: Vec<String>,
    /// Every name that differs from the file, for the run's summary.
    pub changes: Vec<HeaderChange>,
    /// Whether the header line ends in CRLF; a resumed read needs it to number lines.
    #[serde(default)]
    pub crlf: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderChange {
    /// 1-based column number.
    pub column: usize,
    pub original: String,
    pub name: String,
    pub reason: HeaderChangeReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderChangeReason {
    Empty,
    Duplicate,
}

/// The `{sheet}` of a CSV object's logical row ids: its base name up to the first dot.
pub fn sheet_name(file_name: &str) -> String {
    match file_name.split('.').next() {
        Some(stem) if !stem.is_empty() => stem.to_owned(),
        _ => file_name.to_owned(),
    }
}

/// What a run will make of its file, decided when it starts (see `plan.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportPlan {
    /// What `main` pointed at when the run started; the new commit's parent. A mode
    /// other than `replace` fails at finalise if `main` moved meanwhile.
    pub parent: Option<String>,
    /// The key columns rows are identified by; none for positional ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    /// Whether finalise records `key` as the dataset's key (its first keyed import, or
    /// a replace with `rekey`).
    #[serde(default)]
    pub set_key: bool,
    /// The sheets of the parent commit, in its order.
    #[serde(default)]
    pub parent_sheets: Vec<String>,
    /// `append` with positional ids: the parent's highest row number per sheet, after
    /// which the file's rows continue.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub append_after: BTreeMap<String, u64>,
    /// The parent's sheets whose keys are all numbers (its `numeric_key_sheets`);
    /// `None` when that is not known (a run planned before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_numeric_key_sheets: Option<Vec<String>>,
}
