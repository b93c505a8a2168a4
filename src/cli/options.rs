//! Options that several commands share.

use clap::Args;

use crate::import::run::{ImportMode, ImportOptions, OnConflict};

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
        };
        options.check()?;
        Ok(options)
    }
}
