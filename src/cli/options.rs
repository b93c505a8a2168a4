//! Options that several commands share.

use clap::Args;

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
}
