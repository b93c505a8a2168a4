//! `dsa-ingest submit`: hand a file to the import consumers and, if asked, follow it.
//!
//! A local file is uploaded to `S3_BUCKET` first (the consumers may run on other
//! machines and read only from the object store); an `s3://` source is used where it is.
//! Then a pending run is created and `{"analysis_run_id": ...}` is published to the
//! import exchange with publisher confirms. From there the run belongs to whichever
//! consumer takes the message; `--wait` only watches the run in the database.
//!
//! Steps that can fail for reasons a person must fix (no bucket, file too large, broker
//! away) run before the upload, so a large file is not sent only to be refused after.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{AmqpSettings, Settings};
use crate::db::{DatasetError, DatasetName};
use crate::import::fetch::{FetchError, Fetcher};
use crate::import::run::{ImportOptions, ImportParameters, SourceLocation};
use crate::import::{ImportError, ImportSummary};
use crate::queue::amqp::{self, AmqpError};
use crate::queue::messages::RunReference;
use crate::runs::{self, RunStatus};

/// The arguments of `dsa-ingest submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The dataset to import into; created if it does not exist.
    #[arg(long)]
    dataset: String,
    /// A local path (uploaded to S3_BUCKET first) or s3://bucket/key (used in place).
    source: SourceLocation,
    /// Follow the run until it completes or fails, then print its summary.
    #[arg(long)]
    wait: bool,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    options: super::options::RunOptions,
}

#[derive(Debug, Error)]
pub enum SubmitError {
    #[error(
        "S3_BUCKET is not set: submit uploads local files to that bucket \
         (or give the source as s3://bucket/key)"
    )]
    NoBucket,
    /// Missing, too large, or refused by the store; checked before any upload.
    #[error(transparent)]
    Source(#[from] FetchError),
    #[error("{path} is not a regular file")]
    NotAFile { path: String },
    #[error("reading {path} at byte {offset} failed: {source}")]
    Read {
        path: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error(
        "{path} changed while it was being uploaded (it had {expected} bytes when the \
         upload started); the upload was aborted and nothing was submitted"
    )]
    FileChanged { path: String, expected: u64 },
    #[error("uploading to s3://{bucket}/{key} failed while {action}: {message}")]
    Upload {
        bucket: String,
        key: String,
        action: &'static str,
        message: String,
    },
    #[error(
        "interrupted while uploading to s3://{bucket}/{key}; the upload was aborted and \
         nothing was submitted"
    )]
    UploadInterrupted { bucket: String, key: String },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    CreateRun(#[from] ImportError),
    /// The broker could not be reached or set up; no run exists yet.
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error(
        "run {run_id} was created but never queued, so it is marked failed \
         (submit the file again): {source}"
    )]
    NotQueued { run_id: Uuid, source: AmqpError },
    #[error("run {run_id} no longer exists")]
    RunVanished { run_id: Uuid },
    #[error("run {run_id} completed but its summary cannot be read: {message}")]
    BadSummary { run_id: Uuid, message: String },
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What to import, as `submit` was asked.
#[derive(Clone, Debug)]
pub struct SubmitRequest {
    pub dataset: DatasetName,
    pub source: SourceLocation,
    pub user: Option<String>,
    pub options: ImportOptions,
}

/// A run that is created and queued.
#[derive(Clone, Debug, Serialize)]
pub struct Submission {
    pub run_id: Uuid,
    pub dataset: String,
    /// Where the consumer reads the file: the upload, or the `s3://` source as given.
    pub source: String,
    /// Always `pending`: nothing has taken the run when `submit` returns.
    pub status: &'static str,
    /// The object's size, for the progress display.
    #[serde(skip)]
    pub bytes: u64,
}

/// How a followed run ended.
#[derive(Debug)]
pub enum RunOutcome {
    Completed(Box<ImportSummary>),
    /// Failed or cancelled, with the run's error message.
    Failed {
        status: String,
        message: String,
    },
    /// Ctrl-C or SIGTERM while waiting; the run goes on in the consumer.
    Interrupted,
}

/// Exit code when `--wait` was interrupted while the run goes on.
const EXIT_INTERRUPTED: u8 = 2;

/// How often `--wait` reads the run. Progress is written every few batches, so faster
/// polling would mostly read the same row again.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often `--wait` prints a progress line when stderr is not a terminal.
const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

/// `dsa-ingest submit`: prints the run id (or the summary with `--wait`) and returns
/// the exit code: 0 submitted or completed, 1 failed, 2 interrupted while waiting.
pub async fn command(
    settings: Settings,
    pool: PgPool,
    args: SubmitArgs,
) -> Result<ExitCode, SubmitError> {
    let request = SubmitRequest {
        dataset: DatasetName::parse(&args.dataset)?,
        source: args.source,
        options: args
            .options
            .import_options()
            .map_err(SubmitError::Options)?,
        user: args.options.user,
    };
    let stop = crate::shutdown::on_signals();
    let s3 = crate::s3::client(&settings.s3).await;
    let submission = submit(&settings, &pool, &s3, &request, &stop).await?;

    if !args.wait {
        if args.json {
            println!("{}", serde_json::json!(submission));
        } else {
            println!("{}", submission.run_id);
            eprintln!(
                "queued run {} importing {} into {:?}; follow it with `dsa-ingest status {}`",
                submission.run_id, submission.source, submission.dataset, submission.run_id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut display = ProgressDisplay::new(submission.run_id, submission.bytes);
    let outcome = follow_run(&pool, submission.run_id, &stop, |run| display.show(run)).await;
    display.finish();
    match outcome? {
        RunOutcome::Completed(summary) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("a summary serialises")
                );
            } else {
                super::output::print_summary(&summary);
            }
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::Failed { status, message } => {
            eprintln!("error: run {} {status}: {message}", submission.run_id);
            Ok(ExitCode::FAILURE)
        }
        RunOutcome::Interrupted => {
            eprintln!(
                "stopped waiting; run {} goes on in the consumer (see `dsa-ingest status {}`)",
                submission.run_id, submission.run_id
            );
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
    }
}

/// Uploads the source when it is local, creates the run and publishes its message.
///
/// The broker is reached and its topology declared before the upload, so a broker that
/// is away costs nothing. If the publish fails after the run was created, the run is
/// marked failed (it would otherwise stay pending with no message to start it).
pub async fn submit(
    settings: &Settings,
    pool: &PgPool,
    s3: &aws_sdk_s3::Client,
    request: &SubmitRequest,
    stop: &CancellationToken,
) -> Result<Submission, SubmitError> {
    let limit = settings.import.max_file_size;
    let fetcher = Fetcher::new(request.source.clone(), Some(s3.clone()), &settings.import);
    // For a local file this is a stat; for an s3:// source a HEAD. Either way the size
    // limit is checked before a byte is sent or a run is created.
    let info = fetcher.head(limit).await?;
    let bucket = match &request.source {
        SourceLocation::Local { path } => {
            if !tokio::fs::metadata(path)
                .await
                .map(|metadata| metadata.is_file())
                .unwrap_or(false)
            {
                return Err(SubmitError::NotAFile {
                    path: path.display().to_string(),
                });
            }
            Some(settings.s3.bucket.clone().ok_or(SubmitError::NoBucket)?)
        }
        SourceLocation::S3 { .. } => None,
    };

    let connection = amqp::connect(&settings.amqp, "submit").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    amqp::declare_import_topology(&channel, &settings.amqp).await?;

    let (source, object) = match (&request.source, bucket) {
        (SourceLocation::Local { path }, Some(bucket)) => {
            let key = upload_key(
                &request.dataset,
                request.source.file_name(),
                chrono::Utc::now().date_naive(),
                Uuid::new_v4(),
            );
            let started = Instant::now();
            upload_file(
                s3,
                path,
                info.size,
                &bucket,
                &key,
                settings.submit.part_size,
                stop,
            )
            .await?;
            tracing::info!(
                bucket = %bucket,
                key = %key,
                bytes = info.size,
                duration_ms = started.elapsed().as_millis() as u64,
                "uploaded"
            );
            let uploaded = SourceLocation::S3 { bucket, key };
            // The ETag the store gives the new object pins the run to these bytes.
            let object = Fetcher::new(uploaded.clone(), Some(s3.clone()), &settings.import)
                .head(limit)
                .await?;
            (uploaded, object)
        }
        (source, _) => (source.clone(), info),
    };

    let parameters = ImportParameters {
        source: source.clone(),
        expected_etag: object.etag.clone(),
        options: request.options.clone(),
    };
    let (run_id, _) =
        runs::create_for_dataset(pool, &request.dataset, request.user.as_deref(), &parameters)
            .await?;
    queue_run(&channel, &settings.amqp, pool, run_id).await?;
    // Closing says goodbye to the broker; a failure here cannot undo the confirmed
    // publish, so it is not an error of the submission.
    let _ = connection.close(200, "submitted".into()).await;
    tracing::info!(run.id = %run_id, source = %source, "run queued");
    Ok(Submission {
        run_id,
        dataset: request.dataset.as_str().to_owned(),
        source: source.to_string(),
        status: "pending",
        bytes: object.size,
    })
}

/// Publishes `{"analysis_run_id": run_id}` (message id: the run id) to the import
/// exchange and waits for the broker's confirm. When that fails the run is marked
/// failed, since no consumer would ever start it; `channel` must be in confirm mode.
pub async fn queue_run(
    channel: &lapin::Channel,
    settings: &AmqpSettings,
    pool: &PgPool,
    run_id: Uuid,
) -> Result<(), SubmitError> {
    let id = run_id.to_string();
    let published = amqp::publish_json(
        channel,
        &settings.import_exchange,
        &settings.import_routing_key,
        &RunReference {
            analysis_run_id: run_id,
        },
        Some(&id),
    )
    .await;
    let Err(error) = published else {
        return Ok(());
    };
    let message = format!(
        "never queued: publishing the import message to exchange {:?} failed: {error}",
        settings.import_exchange
    );
    if let Err(record) = runs::fail_run(pool, run_id, None, &message).await {
        tracing::error!(run.id = %run_id, error = %record, "could not mark the unqueued run failed");
    }
    Err(SubmitError::NotQueued {
        run_id,
        source: error,
    })
}

/// `uploads/{dataset}/{yyyy-mm-dd}/{upload id}/{file name}`.
///
/// The upload id keeps two submits of the same name apart; it is a folder rather than
/// a prefix of the file name because the file's base name becomes the `{sheet}` of
/// every logical row id, which must not change with each upload. A `/` in a dataset
/// name would add a folder level, so it becomes `_` here (the dataset itself keeps it).
pub fn upload_key(
    dataset: &DatasetName,
    file_name: &str,
    date: chrono::NaiveDate,
    upload_id: Uuid,
) -> String {
    let folder: String = dataset
        .as_str()
        .chars()
        .map(|c| if c == '/' || c == '\\' { '_' } else { c })
        .collect();
    let file_name = if file_name.is_empty() {
        "upload"
    } else {
        file_name
    };
    format!(
        "uploads/{folder}/{}/{upload_id}/{file_name}",
        date.format("%Y-%m-%d")
    )
}

/// Uploads `size` bytes of the file at `path` to `bucket`/`key`.
///
/// Up to one part it is a single `PutObject`; beyond, a multipart upload whose parts
/// are read one at a time, so memory holds one part whatever the file's size. Any
/// failure, and `stop` firing, aborts the multipart upload, so the store keeps no
/// orphaned parts. A file that grows or shrinks meanwhile is refused rather than
/// uploaded half old, half new.
pub async fn upload_file(
    s3: &aws_sdk_s3::Client,
    path: &Path,
    size: u64,
    bucket: &str,
    key: &str,
    part_size: u64,
    stop: &CancellationToken,
) -> Result<(), SubmitError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| SubmitError::Read {
            path: path.display().to_string(),
            offset: 0,
            source,
        })?;
    let upload_error = |action: &'static str, message: String| SubmitError::Upload {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        action,
        message,
    };
    let interrupted = || SubmitError::UploadInterrupted {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
    };

    if size <= part_size {
        let body = read_part(&mut file, path, 0, size).await?;
        ensure_at_end(&mut file, path, size).await?;
        // A single PUT that is cut off creates no object, so dropping it is enough.
        return tokio::select! {
            result = s3.put_object().bucket(bucket).key(key).body(ByteStream::from(body)).send() => {
                result.map(|_| ()).map_err(|error| upload_error("uploading the file", DisplayErrorContext(&error).to_string()))
            }
            _ = stop.cancelled() => Err(interrupted()),
        };
    }

    // S3 allows 10,000 parts; a file that would need more gets larger parts.
    let part_size = part_size.max(size.div_ceil(MAX_PARTS));
    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|error| {
            upload_error(
                "starting the multipart upload",
                DisplayErrorContext(&error).to_string(),
            )
        })?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| {
            upload_error(
                "starting the multipart upload",
                "the store returned no upload id".to_owned(),
            )
        })?
        .to_owned();

    let parts_and_complete = async {
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut part_number = 1;
        while offset < size {
            let length = part_size.min(size - offset);
            let body = read_part(&mut file, path, offset, length).await?;
            let uploaded = s3
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(part_number)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|error| {
                    upload_error("uploading a part", DisplayErrorContext(&error).to_string())
                })?;
            let e_tag = uploaded.e_tag().ok_or_else(|| {
                upload_error(
                    "uploading a part",
                    format!("the store returned no ETag for part {part_number}"),
                )
            })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(part_number)
                    .e_tag(e_tag)
                    .build(),
            );
            tracing::debug!(part = part_number, bytes = length, "uploaded part");
            offset += length;
            part_number += 1;
        }
        ensure_at_end(&mut file, path, size).await?;
        s3.complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| {
                upload_error(
                    "completing the multipart upload",
                    DisplayErrorContext(&error).to_string(),
                )
            })?;
        Ok(())
    };
    let result = tokio::select! {
        // Stop first: once it fired, no further part is sent.
        biased;
        _ = stop.cancelled() => Err(interrupted()),
        result = parts_and_complete => result,
    };
    if result.is_err() {
        // The parts uploaded so far are stored (and billed) until the upload is aborted.
        if let Err(error) = s3
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .send()
            .await
        {
            tracing::warn!(
                bucket,
                key,
                upload_id = %upload_id,
                error = %DisplayErrorContext(&error),
                "could not abort the multipart upload; a bucket lifecycle rule or \
                 `AbortMultipartUpload` with this id removes its parts"
            );
        }
    }
    result
}

/// Reads exactly `length` bytes that start at `offset`; a shorter file has changed.
async fn read_part(
    file: &mut tokio::fs::File,
    path: &Path,
    offset: u64,
    length: u64,
) -> Result<Bytes, SubmitError> {
    let mut buffer = Vec::with_capacity(length as usize);
    file.take(length)
        .read_to_end(&mut buffer)
        .await
        .map_err(|source| SubmitError::Read {
            path: path.display().to_string(),
            offset: offset + buffer.len() as u64,
            source,
        })?;
    if (buffer.len() as u64) < length {
        return Err(SubmitError::FileChanged {
            path: path.display().to_string(),
            expected: offset + length,
        });
    }
    Ok(Bytes::from(buffer))
}

/// Fails when the file has more than `size` bytes now.
async fn ensure_at_end(
    file: &mut tokio::fs::File,
    path: &Path,
    size: u64,
) -> Result<(), SubmitError> {
    let mut probe = [0u8; 1];
    let read = file
        .read(&mut probe)
        .await
        .map_err(|source| SubmitError::Read {
            path: path.display().to_string(),
            offset: size,
            source,
        })?;
    if read == 0 {
        Ok(())
    } else {
        Err(SubmitError::FileChanged {
            path: path.display().to_string(),
            expected: size,
        })
    }
}

/// Reads the run every [`POLL_INTERVAL`] until it completes or fails, or `stop` fires;
/// `on_poll` sees every reading of a run still pending or running.
pub async fn follow_run(
    pool: &PgPool,
    run_id: Uuid,
    stop: &CancellationToken,
    mut on_poll: impl FnMut(&RunStatus),
) -> Result<RunOutcome, SubmitError> {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reading = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(RunOutcome::Interrupted),
            reading = async {
                ticker.tick().await;
                runs::run_status(pool, run_id).await
            } => reading?,
        };
        let run = reading.ok_or(SubmitError::RunVanished { run_id })?;
        match run.status.as_str() {
            "completed" => {
                let summary = run
                    .output_summary
                    .ok_or_else(|| "the run has no output summary".to_owned())
                    .and_then(|value| {
                        serde_json::from_value(value).map_err(|error| error.to_string())
                    })
                    .map_err(|message| SubmitError::BadSummary { run_id, message })?;
                return Ok(RunOutcome::Completed(Box::new(summary)));
            }
            "failed" | "cancelled" => {
                return Ok(RunOutcome::Failed {
                    message: run
                        .error_message
                        .unwrap_or_else(|| "no error message was recorded".to_owned()),
                    status: run.status,
                })
            }
            // Parked: the consumers gave up retrying and dead-lettered its message. It
            // stays resumable, but nothing moves it until the message is replayed.
            "pending" if run.started_at.is_some() && run.error_message.is_some() => {
                return Ok(RunOutcome::Failed {
                    message: run.error_message.unwrap_or_default(),
                    status: "pending (parked)".to_owned(),
                })
            }
            _ => on_poll(&run),
        }
    }
}

/// Where a run is, from its progress (written every few batches) and its checkpoint
/// (written every batch, so it moves between progress updates).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgressReading {
    pub status: String,
    pub bytes_processed: u64,
    pub total_bytes: u64,
    pub rows_processed: u64,
    pub rows_per_second: f64,
}

impl ProgressReading {
    /// `total_bytes` is the object's size as `submit` saw it, used until the run has
    /// written its own.
    pub fn from_run(run: &RunStatus, total_bytes: u64) -> Self {
        let progress = run.progress.as_deref().cloned().unwrap_or_default();
        let (checkpoint_bytes, checkpoint_rows) =
            run.checkpoint.as_deref().map_or((0, 0), |checkpoint| {
                (
                    checkpoint.object_offset.unwrap_or(checkpoint.byte_offset),
                    checkpoint.records,
                )
            });
        Self {
            status: run.status.clone(),
            bytes_processed: progress.bytes_processed.max(checkpoint_bytes),
            total_bytes: if progress.total_bytes > 0 {
                progress.total_bytes
            } else {
                total_bytes
            },
            rows_processed: progress.rows_processed.max(checkpoint_rows),
            rows_per_second: progress.rows_per_second,
        }
    }

    pub fn percentage(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            (self.bytes_processed as f64 / self.total_bytes as f64 * 100.0).min(100.0)
        }
    }

    /// `[#######-------------]  35.0%  4.2 MB of 12.0 MB  40000 rows  52000 rows/s`.
    pub fn bar(&self, width: usize) -> String {
        let filled = ((self.percentage() / 100.0) * width as f64).round() as usize;
        let mut line = String::with_capacity(width + 80);
        line.push('[');
        line.extend(std::iter::repeat_n('#', filled.min(width)));
        line.extend(std::iter::repeat_n('-', width - filled.min(width)));
        line.push(']');
        let _ = write!(line, " {:5.1}%  {}", self.percentage(), self.amounts());
        line
    }

    /// `running 35.0% (4.2 MB of 12.0 MB, 40000 rows, 52000 rows/s)`.
    pub fn plain(&self) -> String {
        format!(
            "{} {:.1}% ({})",
            self.status,
            self.percentage(),
            self.amounts().replace("  ", ", ")
        )
    }

    fn amounts(&self) -> String {
        let mut text = format!(
            "{} of {}  {} rows",
            megabytes(self.bytes_processed),
            megabytes(self.total_bytes),
            self.rows_processed
        );
        if self.rows_per_second > 0.0 {
            let _ = write!(text, "  {:.0} rows/s", self.rows_per_second);
        }
        text
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

/// Shows a followed run on stderr: a bar redrawn in place on a terminal, a plain line
/// every few seconds in a log.
struct ProgressDisplay {
    run_id: Uuid,
    total_bytes: u64,
    terminal: bool,
    /// Whether a bar is on screen and must be cleared before other output.
    drawn: bool,
    last_plain: Option<Instant>,
}

impl ProgressDisplay {
    fn new(run_id: Uuid, total_bytes: u64) -> Self {
        Self {
            run_id,
            total_bytes,
            terminal: std::io::stderr().is_terminal(),
            drawn: false,
            last_plain: None,
        }
    }

    fn show(&mut self, run: &RunStatus) {
        let reading = ProgressReading::from_run(run, self.total_bytes);
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let line = if reading.status == "pending" {
                format!("run {}: pending, waiting for a consumer", self.run_id)
            } else {
                reading.bar(30)
            };
            // \r returns to the start of the line and \x1b[K clears what a longer line
            // before it left behind.
            let _ = write!(stderr, "\r{line}\x1b[K");
            let _ = stderr.flush();
            self.drawn = true;
        } else if self
            .last_plain
            .is_none_or(|last| last.elapsed() >= PLAIN_PROGRESS_INTERVAL)
        {
            let _ = writeln!(stderr, "run {}: {}", self.run_id, reading.plain());
            self.last_plain = Some(Instant::now());
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[K");
            let _ = stderr.flush();
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::run::{Checkpoint, Progress};

    #[test]
    fn upload_keys_keep_the_file_name_as_the_last_segment() {
        let id = Uuid::parse_str("6f1c8d2e-0000-4000-8000-000000000001").unwrap();
        let date = chrono::NaiveDate::from_ymd_opt(2026, 3, 7).unwrap();
        assert_eq!(
            upload_key(&DatasetName::parse("sales").unwrap(), "q1.csv", date, id),
            "uploads/sales/2026-03-07/6f1c8d2e-0000-4000-8000-000000000001/q1.csv"
        );
        assert_eq!(
            upload_key(&DatasetName::parse("a/b").unwrap(), "", date, id),
            "uploads/a_b/2026-03-07/6f1c8d2e-0000-4000-8000-000000000001/upload"
        );
    }

    fn run(progress: Progress, checkpoint: Checkpoint) -> RunStatus {
        RunStatus {
            run_id: Uuid::nil(),
            run_type: "import".into(),
            status: "running".into(),
            dataset: None,
            created_at: chrono::Utc::now(),
            started_at: None,
            completed_at: None,
            attempts: 1,
            lease_owner: None,
            lease_expires_at: None,
            progress: Some(sqlx::types::Json(progress)),
            checkpoint: Some(sqlx::types::Json(checkpoint)),
            output_summary: None,
            error_message: None,
        }
    }

    #[test]
    fn the_checkpoint_moves_the_bar_between_progress_updates() {
        let reading = ProgressReading::from_run(
            &run(
                Progress {
                    bytes_processed: 1_000_000,
                    total_bytes: 4_000_000,
                    rows_processed: 9_000,
                    rows_per_second: 52_000.0,
                    ..Progress::default()
                },
                Checkpoint {
                    byte_offset: 2_000_000,
                    records: 18_000,
                    ..Checkpoint::start(String::new(), None, String::new())
                },
            ),
            1,
        );
        assert_eq!(reading.percentage(), 50.0);
        assert_eq!(
            reading.bar(10),
            "[#####-----]  50.0%  2.0 MB of 4.0 MB  18000 rows  52000 rows/s"
        );
        assert_eq!(
            reading.plain(),
            "running 50.0% (2.0 MB of 4.0 MB, 18000 rows, 52000 rows/s)"
        );
    }

    #[test]
    fn a_run_without_progress_uses_the_size_submit_saw() {
        let mut pending = run(
            Progress::default(),
            Checkpoint::start(String::new(), None, String::new()),
        );
        pending.progress = None;
        pending.checkpoint = None;
        let reading = ProgressReading::from_run(&pending, 3_000_000);
        assert_eq!(reading.total_bytes, 3_000_000);
        assert_eq!(reading.bar(4), "[----]   0.0%  0.0 MB of 3.0 MB  0 rows");
    }
}
