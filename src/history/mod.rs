//! The read side of the versioned dataset: `log`, `diff`, `export`, `verify` and `gc`.
//!
//! Every command reads commits by name ([`resolve`]) and rows in logical row order
//! ([`order`]). Rows are streamed from the server, sorted and merged there; this
//! process never holds a commit's rows, whatever its size.

pub mod diff;
pub mod export;
pub mod gc;
pub mod log;
pub mod resolve;
pub mod verify;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use sqlx::PgPool;
use thiserror::Error;

use crate::config::Settings;
use crate::db::DatasetError;

/// The history commands, flattened into the top level of the command line.
#[derive(Debug, Subcommand)]
pub enum HistoryCommand {
    /// Show the commits reachable from `main`, newest first.
    Log(LogArgs),
    /// Show what changed between two commits, row by row in logical row order.
    Diff(DiffArgs),
    /// Write a commit's rows as CSV or JSON Lines to a file, stdout or s3://bucket/key.
    Export(ExportArgs),
    /// Recompute commits' tree hashes, row counts and row hashes from the database.
    Verify(VerifyArgs),
    /// Remove failed or abandoned imports' leftovers and rows no commit references.
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct LogArgs {
    pub dataset: String,
    /// Show at most this many commits.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print one JSON array of commits.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    pub dataset: String,
    /// The older commit (default: the parent of TO; a root commit is compared with nothing).
    pub from: Option<String>,
    /// The newer commit (default: main).
    pub to: Option<String>,
    /// Print the counts only.
    #[arg(long)]
    pub summary: bool,
    /// JSON Lines: one object per changed row, then one summary line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Jsonl,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    pub dataset: String,
    /// The commit to export (default: main).
    #[arg(long)]
    pub commit: Option<String>,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ExportFormat,
    /// A local path or s3://bucket/key (default: stdout). For CSV of a commit with
    /// several sheets and no --sheet, a directory or s3:// prefix ending in `/` that
    /// receives `{sheet}.csv` per sheet.
    #[arg(long)]
    pub output: Option<String>,
    /// For CSV: only this sheet of a spreadsheet commit.
    #[arg(long)]
    pub sheet: Option<String>,
    /// Prefix `'` to fields starting with =, +, -, @, tab or carriage return, for files
    /// meant to be opened in a spreadsheet program.
    #[arg(long)]
    pub safe_formulas: bool,
    /// Print what was written as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub dataset: String,
    /// The commit to verify (default: main).
    #[arg(long, conflicts_with = "all")]
    pub commit: Option<String>,
    /// Verify every finalised commit of the dataset.
    #[arg(long)]
    pub all: bool,
    /// Print one JSON object per commit, one per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// A `running` import whose lease expired more than IMPORT_LEASE_SECONDS plus this
    /// long ago counts as abandoned: it is marked failed and its commit removed.
    #[arg(long, default_value_t = 3600)]
    pub grace_seconds: u64,
    /// Count what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Error)]
pub enum HistoryError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("dataset {0:?} has no commits yet")]
    NoCommits(String),
    #[error("no commit {name:?} in dataset {dataset:?}")]
    UnknownCommit { name: String, dataset: String },
    #[error("commit {commit_id} belongs to dataset {other:?}, not {dataset:?}")]
    OtherDataset {
        commit_id: String,
        dataset: String,
        other: String,
    },
    #[error("commit prefix {prefix:?} is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousPrefix {
        prefix: String,
        candidates: Vec<String>,
    },
    #[error(
        "commit name {0:?} is too short: give the full id, a prefix of at least {min} \
         characters, main or main~N", min = resolve::MIN_PREFIX
    )]
    PrefixTooShort(String),
    #[error("{0:?} is not a commit name: give an id, a prefix, main or main~N")]
    BadName(String),
    #[error(
        "{name} goes back further than the history of dataset {dataset:?} ({commits} commits)"
    )]
    HistoryTooShort {
        name: String,
        dataset: String,
        commits: u64,
    },
    #[error(
        "commit {commit_id}: row {logical_row_id} has row hash {row_hash}, which dsa_core.rows \
         does not hold (run `dsa-ingest verify`)"
    )]
    MissingRow {
        commit_id: String,
        logical_row_id: String,
        row_hash: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("writing {target}: {source}")]
    Write {
        target: String,
        source: std::io::Error,
    },
    #[error("S3 {action} for s3://{bucket}/{key}: {message}")]
    S3 {
        action: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Runs one history command; the exit code is 1 when `verify` finds a problem.
pub async fn run(
    command: HistoryCommand,
    settings: &Settings,
    pool: PgPool,
) -> Result<ExitCode, HistoryError> {
    let outcome = match command {
        HistoryCommand::Log(args) => log::command(&pool, args).await,
        HistoryCommand::Diff(args) => diff::command(&pool, args).await,
        HistoryCommand::Export(args) => export::command(&pool, settings, args).await,
        HistoryCommand::Verify(args) => return verify::command(&pool, args).await,
        HistoryCommand::Gc(args) => gc::command(&pool, settings, args).await,
    };
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A reader that went away (`| head`) has what it wanted.
        Err(HistoryError::Write { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => Err(error),
    }
}

/// Standard output, buffered, with errors that say where they happened.
pub(crate) struct Stdout(std::io::BufWriter<std::io::StdoutLock<'static>>);

impl Stdout {
    pub fn new() -> Self {
        Self(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout().lock(),
        ))
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), HistoryError> {
        self.0.write_all(bytes).map_err(stdout_error)
    }

    pub fn flush(&mut self) -> Result<(), HistoryError> {
        self.0.flush().map_err(stdout_error)
    }
}

pub(crate) fn stdout_error(source: std::io::Error) -> HistoryError {
    HistoryError::Write {
        target: "stdout".to_owned(),
        source,
    }
}

/// How many bytes a [`ChannelWriter`] gathers before it hands them on: large enough
/// that a row is not a message of its own, small enough that a response holds little.
pub const CHANNEL_CHUNK: usize = 64 * 1024;

/// What a streamed command's reader receives: bytes, or the error that ended it.
pub type Chunk = Result<bytes::Bytes, HistoryError>;

/// A writer into a bounded channel, which an HTTP response body reads. A full channel
/// makes the writer wait, so a slow reader slows the query rather than filling memory;
/// a reader that went away is a broken pipe, as on stdout.
pub struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<Chunk>,
    buffer: Vec<u8>,
    bytes: u64,
}

impl ChannelWriter {
    pub fn new(sender: tokio::sync::mpsc::Sender<Chunk>) -> Self {
        Self {
            sender,
            buffer: Vec::with_capacity(CHANNEL_CHUNK),
            bytes: 0,
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), HistoryError> {
        self.bytes += bytes.len() as u64;
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHANNEL_CHUNK {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<(), HistoryError> {
        let chunk = bytes::Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHANNEL_CHUNK),
        ));
        self.sender
            .send(Ok(chunk))
            .await
            .map_err(|_| HistoryError::Write {
                target: "the response".to_owned(),
                source: std::io::ErrorKind::BrokenPipe.into(),
            })
    }

    /// Hands on what is left; returns how many bytes were written in all.
    pub async fn finish(mut self) -> Result<u64, HistoryError> {
        if !self.buffer.is_empty() {
            self.send().await?;
        }
        Ok(self.bytes)
    }
}

/// Where `diff` writes: standard output, or a channel for an HTTP response.
pub enum Output {
    /// Buffered; unlike [`Stdout`] it takes the lock per flush, so it can be held
    /// across an await on any thread.
    Stdout(std::io::BufWriter<std::io::Stdout>),
    Channel(ChannelWriter),
}

impl Output {
    pub fn stdout() -> Self {
        Self::Stdout(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ))
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), HistoryError> {
        match self {
            Self::Stdout(out) => out.write_all(bytes).map_err(stdout_error),
            Self::Channel(writer) => writer.write(bytes).await,
        }
    }

    pub async fn finish(self) -> Result<(), HistoryError> {
        match self {
            Self::Stdout(mut out) => out.flush().map_err(stdout_error),
            Self::Channel(writer) => writer.finish().await.map(|_| ()),
        }
    }
}

/// `text` as a JSON string literal.
pub(crate) fn json_string(text: &str, out: &mut Vec<u8>) {
    crate::import::hash::write_json_string(text, out);
}
