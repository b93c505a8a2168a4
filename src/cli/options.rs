//! Options that several commands share.

use clap::Args;

use crate::import::run::{ImportMode, ImportOptions, OnConflict, TextFormat};

/// What a new run is asked to do, the same for `import` and `submit`.
#[derive(Debug, Args)]
pub struct RunOptions {
    /// Put rows that cannot be decoded into dsa_jobs.rejected_rows instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// The commit message (default: "Import <source>").
    #[arg(long)]
    pub message: Option<String>,
    /// Who asked for the import, recorded on the run and as the commit's author.
    #[arg(long)]
    pub user: Option<String>,
    /// For a spreadsheet: import only this worksheet (repeat for several; default: all).
    #[arg(long = "sheet", value_name = "NAME")]
    pub sheets: Vec<String>,
    /// Identify rows by these columns (COL or COL,COL,...) instead of by position; the
    /// dataset remembers its key.
    #[arg(long, value_name = "COLUMNS", value_delimiter = ',')]
    pub key: Option<Vec<String>>,
    /// How the file's rows combine with the dataset's current version.
    #[arg(long, value_enum, default_value_t = ImportMode::Replace)]
    pub mode: ImportMode,
    /// With --mode append and a key: what a key the dataset has already does.
    #[arg(long, value_enum, default_value_t = OnConflict::Fail)]
    pub on_conflict: OnConflict,
    /// With --mode replace: give the dataset this new key (or none).
    #[arg(long)]
    pub rekey: bool,
    /// The {sheet} part of a CSV's row ids (default: the dataset's one sheet, or the
    /// file's base name for its first import).
    #[arg(long, value_name = "NAME")]
    pub sheet_name: Option<String>,
    /// Delimited text: the field delimiter, one byte (`\t` or `tab` for a tab; default:
    /// a tab for .tsv and .tab, otherwise sniffed among , ; tab |).
    #[arg(long, value_name = "BYTE")]
    pub delimiter: Option<String>,
    /// Delimited text: the quote character (default `"`).
    #[arg(long, value_name = "BYTE")]
    pub quote: Option<String>,
    /// Delimited text: a byte that escapes a quote inside quotes (such as `\`).
    #[arg(long, value_name = "BYTE")]
    pub escape: Option<String>,
    /// Delimited text: the first line is data; columns are named column_1, column_2, ...
    #[arg(long)]
    pub no_header: bool,
    /// The text's encoding, any WHATWG label such as windows-1252 or shift_jis
    /// (default: UTF-8, or UTF-16 by its byte order mark).
    #[arg(long, value_name = "NAME")]
    pub encoding: Option<String>,
    /// A zip of several files: the member to import (its full name in the zip).
    #[arg(long, value_name = "NAME")]
    pub member: Option<String>,
    /// Read a file that is not a spreadsheet as CSV or JSON Lines (default: JSON Lines
    /// for .jsonl and .ndjson, CSV otherwise).
    #[arg(long, value_enum)]
    pub format: Option<TextFormat>,
}

impl RunOptions {
    /// The import options these flags stand for, checked.
    pub fn import_options(&self) -> Result<ImportOptions, String> {
        let options = ImportOptions {
            skip_bad_rows: self.skip_bad_rows,
            message: self.message.clone(),
            sheets: (!self.sheets.is_empty()).then(|| self.sheets.clone()),
            key: self.key.clone(),
            mode: self.mode,
            on_conflict: self.on_conflict,
            rekey: self.rekey,
            sheet_name: self.sheet_name.clone(),
            delimiter: self.delimiter.clone(),
            quote: self.quote.clone(),
            escape: self.escape.clone(),
            no_header: self.no_header,
            encoding: self.encoding.clone(),
            member: self.member.clone(),
            format: self.format,
        };
        options.check()?;
        Ok(options)
    }
}
