//! The import core: claim → fetch → decode → hash → load → finalise, for one run.
//!
//! It takes plain inputs (a pool, an optional S3 client, settings) and knows nothing of
//! AMQP, so the CLI, a queue consumer and the tests all drive it the same way.
//!
//! Two tasks run side by side: a producer reads and decodes the object and hands each
//! batch's CPU work (canonical JSON, sha256, COPY encoding) to the blocking pool, while
//! the loader writes the batches before to PostgreSQL (one storing its rows while the
//! one before it commits, see `load`). Bounded channels between them keep memory
//! constant whatever the file's size.

pub mod decode;
pub mod fetch;
pub mod finalise;
pub mod hash;
pub mod load;
pub mod order;
pub mod plan;
mod produce;
pub mod run;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::ImportSettings;
use crate::db::{self, DatasetError, DatasetName};
use crate::metrics::{CompletedImport, FailureReason};
use crate::runs::{self, ClaimError, ClaimedRun};
use decode::csv::{read_error, CsvDecoder, CsvFormat, CsvStart, RowEncoder};
use decode::lines::LineReader;
use decode::sheet::{self, SheetError, SheetFormat};
use decode::{DecodeError, Header, HeaderChange};
use fetch::{FetchError, Fetcher, ObjectInfo};
use finalise::{CommitFacts, FinaliseError, Finalised, Merge};
use load::{Batch, LoadError, Loader, Lookup, Staged};
use plan::PlanError;
use produce::{
    drop_known_rows, produce_batches, produce_json_batches, produce_sheet_batches, CsvRows,
    ObjectBytes, Pipe, Produced, RowIdentity, SheetJob,
};
use run::{
    Checkpoint, CsvDialect, ImportMode, ImportParameters, ImportPlan, Layout, Lineage, OnConflict,
    Progress, TextFormat,
};
use tokio::io::AsyncReadExt;

/// Decoded batches waiting for the look-up, plus the batches the loader stages: with
/// one staging, two wait, which keeps both sides busy without piling up; each batch
/// staged beyond the first takes one of those places, down to one.
const BATCHES_IN_FLIGHT: usize = 3;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Sheet(#[from] SheetError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Finalise(#[from] FinaliseError),
    #[error("{0}")]
    Resume(String),
    /// Shutdown asked the import to stop after its last committed batch; the run stays
    /// resumable from that checkpoint.
    #[error("the import was stopped by shutdown; it resumes from its last checkpoint")]
    Interrupted,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for ImportError {
    fn from(error: sqlx::Error) -> Self {
        ImportError::Load(LoadError::Database(error))
    }
}

/// Backoff for retrying a transient import failure from the run's checkpoint (the
/// consumer and `dsa-ingest import` both retry), built at the first failure of a
/// streak so that `budget` counts from there.
pub fn retry_backoff(budget: Duration) -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(500))
        .with_max_interval(Duration::from_secs(30))
        .with_max_elapsed_time(Some(budget))
        .build()
}

/// What an import error means for whoever ran the import. The import core, the queue
/// consumer and the command line all decide from this one classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The run was completed or failed before; there is nothing to do.
    AlreadyFinished,
    /// No run has this id.
    NoSuchRun,
    /// Another live worker holds the run's lease.
    HeldElsewhere,
    /// Shutdown stopped the import after its last batch; the run resumes from its
    /// checkpoint.
    Interrupted,
    /// The lease ran out and another worker took the run over; its writes count, ours
    /// roll back.
    TakenOver,
    /// The store or the database was away; the same run may succeed when tried again.
    Transient,
    /// The run cannot succeed as asked (a bad or too large file, a changed object, ...).
    Permanent,
}

impl ImportError {
    pub fn outcome(&self) -> Outcome {
        match self {
            ImportError::Claim(ClaimError::NotFound(_)) => Outcome::NoSuchRun,
            ImportError::Claim(ClaimError::Finished { .. }) => Outcome::AlreadyFinished,
            ImportError::Claim(ClaimError::Held { .. }) => Outcome::HeldElsewhere,
            ImportError::Interrupted => Outcome::Interrupted,
            ImportError::Load(LoadError::LeaseLost { .. })
            | ImportError::Finalise(FinaliseError::Load(LoadError::LeaseLost { .. })) => {
                Outcome::TakenOver
            }
            error if error.is_transient() => Outcome::Transient,
            _ => Outcome::Permanent,
        }
    }

    /// Whether the run itself should be marked failed (when nobody retries it). Claim
    /// problems and a lost lease belong to someone else's run state, so they leave the
    /// run alone.
    pub fn fails_the_run(&self) -> bool {
        matches!(self.outcome(), Outcome::Transient | Outcome::Permanent)
            && !matches!(self, ImportError::Claim(_))
    }

    /// Why a run that failed for good failed, from a fixed list, for the metrics.
    pub fn failure_reason(&self) -> FailureReason {
        match self {
            ImportError::Fetch(error) | ImportError::Decode(DecodeError::Source(error)) => {
                fetch_failure_reason(error)
            }
            ImportError::Sheet(SheetError::Source { error, .. }) => fetch_failure_reason(error),
            ImportError::Decode(error) => match error {
                DecodeError::TooManyColumns { .. } | DecodeError::RecordTooLong { .. } => {
                    FailureReason::TooLarge
                }
                DecodeError::Truncated { .. } => FailureReason::ObjectChanged,
                _ => FailureReason::BadInput,
            },
            ImportError::Sheet(error) => match error {
                SheetError::Uncompressed { .. }
                | SheetError::SharedStringsTooLarge { .. }
                | SheetError::Unstreamed { .. }
                | SheetError::TooWide { .. }
                | SheetError::TooManyRows { .. }
                | SheetError::TooManySheets { .. }
                | SheetError::CellTooLarge { .. }
                | SheetError::TooManyCells { .. } => FailureReason::TooLarge,
                SheetError::CompressionRatio { .. }
                | SheetError::SharedStringsCount { .. }
                | SheetError::XmlDoctype { .. }
                | SheetError::XmlProlog { .. }
                | SheetError::SparseSheet { .. } => FailureReason::HostileFile,
                SheetError::Truncated { .. } => FailureReason::ObjectChanged,
                SheetError::Spool { .. } => FailureReason::Other,
                _ => FailureReason::BadInput,
            },
            ImportError::Load(LoadError::BadRow { .. })
            | ImportError::Finalise(FinaliseError::Conflict { .. })
            | ImportError::Dataset(DatasetError::InvalidName(_) | DatasetError::NotFound(_)) => {
                FailureReason::BadInput
            }
            ImportError::Plan(PlanError::Database(_)) => FailureReason::Other,
            ImportError::Plan(_) => FailureReason::BadInput,
            _ => FailureReason::Other,
        }
    }

    /// Whether trying again later may succeed (the store or the database was away).
    fn is_transient(&self) -> bool {
        match self {
            ImportError::Fetch(error) | ImportError::Decode(DecodeError::Source(error)) => {
                error.is_transient()
            }
            ImportError::Load(LoadError::Database(error))
            | ImportError::Plan(PlanError::Database(error))
            | ImportError::Finalise(FinaliseError::Load(LoadError::Database(error)))
            | ImportError::Claim(ClaimError::Database(error)) => db::is_transient(error),
            ImportError::Sheet(error) => error.is_transient(),
            // gc removed rows a batch relied on; the batch is read again.
            ImportError::Load(LoadError::RowsCollected { .. }) => true,
            // Two imports waited on each other's rows; this one steps back.
            ImportError::Load(LoadError::RowsHeld { .. }) => true,
            // Another session held a table lock (a schema change, say) too long.
            ImportError::Load(LoadError::TableLocked { .. }) => true,
            // A batch committed without its flush was lost in a crash; resume.
            ImportError::Load(LoadError::CheckpointLost { .. })
            | ImportError::Finalise(FinaliseError::Load(LoadError::CheckpointLost { .. })) => true,
            _ => false,
        }
    }
}

fn fetch_failure_reason(error: &FetchError) -> FailureReason {
    match error {
        FetchError::NotFound { .. } => FailureReason::BadInput,
        FetchError::TooLarge { .. } => FailureReason::TooLarge,
        FetchError::ObjectChanged { .. } => FailureReason::ObjectChanged,
        FetchError::Refused { .. } | FetchError::Unreadable { .. } => FailureReason::Refused,
        FetchError::Io { .. } | FetchError::NoS3Client => FailureReason::Other,
    }
}

/// The `format` label of a run that did not get far enough to learn its format from
/// the content: what its file name says (a name that is not a spreadsheet's is CSV).
pub fn format_of_file_name(file_name: &str) -> &'static str {
    SheetFormat::from_file_name(file_name).map_or("csv", SheetFormat::name)
}

/// Time spent per stage in this attempt, from the service's own clocks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageTimings {
    /// Loader waiting for the next batch with nothing left to commit: fetch, decode
    /// and look-up not keeping up.
    pub wait_for_batch_ms: u64,
    /// Canonical JSON, sha256 and COPY encoding, on the blocking pool.
    pub decode_hash_ms: u64,
    /// Looking up which rows are stored already, on a connection of its own (overlaps
    /// the load of the batch before).
    pub lookup_ms: u64,
    /// COPY of the rows not found into `dsa_core.rows` (the dedup insert).
    pub insert_rows_ms: u64,
    /// COPY of the batch's entries into `dsa_core.commit_rows`.
    pub commit_rows_ms: u64,
    /// Checkpoint update and COMMIT of each batch.
    pub checkpoint_commit_ms: u64,
    pub finalise_ms: u64,
}

/// What an import did; printed by the CLI and stored as the run's `output_summary`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImportSummary {
    pub run_id: Uuid,
    pub dataset_id: i64,
    pub commit_id: String,
    pub parent_commit_id: Option<String>,
    /// Rows in the commit.
    pub rows: u64,
    /// Rows stored for the first time by this run.
    pub new_rows: u64,
    pub rejected_rows: u64,
    /// Size of the object.
    pub bytes: u64,
    /// Bytes read from the source by this attempt (less than `bytes` after a resume).
    pub bytes_read: u64,
    /// Where this attempt started reading (0 unless resumed).
    pub resumed_from_byte: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    pub tree_hash: String,
    /// `delete` mode: the dataset's rows removed, and the file's keys it did not have.
    #[serde(default)]
    pub deleted_rows: u64,
    #[serde(default)]
    pub keys_not_found: u64,
    pub columns: Vec<String>,
    pub header_changes: Vec<HeaderChange>,
    pub source: Lineage,
    pub timings: StageTimings,
    /// Peak resident memory of this process so far.
    pub peak_rss_bytes: u64,
}

/// Runs imports; one per process or many, sharing the pool.
#[derive(Clone)]
pub struct Importer {
    pool: PgPool,
    s3: Option<aws_sdk_s3::Client>,
    settings: ImportSettings,
    owner: String,
    /// Whether a transient failure (database or store away) leaves the run resumable
    /// for a retry instead of failing it (the queue consumer and `dsa-ingest import`
    /// retry).
    keep_runs_on_transient_failure: bool,
    /// Cancelled at shutdown: the import stops after the batch it is committing (at
    /// once before the first, see [`Importer::unless_stopped`]).
    stop: Option<tokio_util::sync::CancellationToken>,
    /// Leases this importer (and its clones) gave up on a pause but could not release,
    /// the database being away: run id to fencing token. Its own live lease would keep
    /// the retry out of the run until it expired, since this process is alive; the
    /// retry releases it first, which the token makes a no-op if anyone claimed since.
    /// The note is the pause's reason, which the release records on the run. An entry
    /// older than the lease's duration is dropped: that lease has run out by then, and
    /// a claim takes its own expired lease back without a release.
    unreleased: Arc<std::sync::Mutex<std::collections::HashMap<Uuid, GivenUpLease>>>,
}

/// A lease an import gave up on a pause but could not release (see
/// [`Importer::unreleased`]).
#[derive(Clone)]
struct GivenUpLease {
    token: i64,
    note: String,
    at: Instant,
}

impl Importer {
    pub fn new(pool: PgPool, s3: Option<aws_sdk_s3::Client>, settings: ImportSettings) -> Self {
        Self {
            pool,
            s3,
            settings,
            owner: crate::process::worker_identity(),
            keep_runs_on_transient_failure: false,
            stop: None,
            unreleased: Arc::default(),
        }
    }

    /// For callers that retry: a transient failure releases the lease and leaves the
    /// run resumable from its checkpoint instead of failing it.
    pub fn keep_runs_on_transient_failure(mut self) -> Self {
        self.keep_runs_on_transient_failure = true;
        self
    }

    /// Imports stop between batches once `stop` is cancelled (and before the first,
    /// while a spreadsheet is spooled, a text's top is read for its header, or a
    /// compressed or encoded text is opened and skipped to a checkpoint).
    pub fn stop_on(mut self, stop: tokio_util::sync::CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Resolves once the stop signal given to [`Importer::stop_on`] fires (never without
    /// one).
    pub async fn stopped(&self) {
        match &self.stop {
            Some(stop) => stop.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Runs `work` unless the stop signal fires first. For the steps before the first
    /// batch that can take minutes on a slow store (spooling a large spreadsheet, reading
    /// a text's top for its delimiter and header, opening a compressed text and skipping
    /// it to its checkpoint), where the loader does not look for the stop yet.
    async fn unless_stopped<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, ImportError>>,
    ) -> Result<T, ImportError> {
        tokio::select! {
            biased;
            () = self.stopped() => Err(ImportError::Interrupted),
            result = work => result,
        }
    }

    /// Whether the stop signal given to [`Importer::stop_on`] has fired.
    pub fn is_stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|stop| stop.is_cancelled())
    }

    /// Creates the dataset when missing and a pending run importing `parameters.source`.
    pub async fn create_run(
        &self,
        dataset: &DatasetName,
        user_id: Option<&str>,
        parameters: &ImportParameters,
    ) -> Result<(Uuid, i64), ImportError> {
        Ok(runs::create_for_dataset(&self.pool, dataset, user_id, parameters).await?)
    }

    /// Claims the run and imports it (from its checkpoint, if it has one). On an error
    /// that belongs to the run, the run is marked failed before the error is returned.
    pub async fn run(&self, run_id: Uuid) -> Result<ImportSummary, ImportError> {
        self.release_given_up_lease(run_id).await?;
        let claimed = runs::claim(
            &self.pool,
            run_id,
            &self.owner,
            self.settings.lease_duration,
        )
        .await?;
        let token = claimed.lease.token;
        // Renewed on a timer while the import runs, not only when a batch commits.
        let _renewal = runs::keep_lease_alive(self.pool.clone(), claimed.lease.clone());
        let span = tracing::info_span!(
            "import",
            run.id = %run_id,
            dataset.id = claimed.dataset_id,
            source = %claimed.parameters.source,
        );
        let result = self.execute(claimed).instrument(span).await;
        if let Err(error) = &result {
            let retry_later = match error.outcome() {
                Outcome::Interrupted => true,
                Outcome::Transient => self.keep_runs_on_transient_failure,
                _ => false,
            };
            if retry_later {
                tracing::warn!(run.id = %run_id, error = %error, "import paused; the run stays resumable");
                if let Err(release) =
                    runs::release(&self.pool, run_id, token, &error.to_string()).await
                {
                    tracing::warn!(run.id = %run_id, error = %release, "could not release the lease; a retry here releases it first, elsewhere it expires on its own");
                    self.remember_unreleased(run_id, token, error.to_string());
                }
            } else if error.fails_the_run() {
                tracing::error!(run.id = %run_id, error = %error, "import failed");
                // The import's own error is what a person needs; a failure to record it
                // (often the same database outage) is logged, not put in its place.
                if let Err(record) =
                    runs::fail_run(&self.pool, run_id, Some(token), &error.to_string()).await
                {
                    tracing::error!(run.id = %run_id, error = %record, "could not mark the run failed");
                    // A caller that retries must not take the failure as recorded: the
                    // run would stay `running` with nobody left to finish it. The retry
                    // runs into the same failure and records it then.
                    // Its lease is still live: the retry gives it back first, or it
                    // would find this process's own lease and wait for it to run out.
                    if self.keep_runs_on_transient_failure && db::is_transient(&record) {
                        self.remember_unreleased(run_id, token, error.to_string());
                        return Err(record.into());
                    }
                }
            }
        }
        result
    }

    /// Notes a lease this importer gave up on but could not give back (see
    /// [`Importer::unreleased`]).
    fn remember_unreleased(&self, run_id: Uuid, token: i64, note: String) {
        let lease_duration = self.settings.lease_duration;
        let mut unreleased = self.unreleased.lock().unwrap();
        unreleased.retain(|_, given_up| given_up.at.elapsed() < lease_duration);
        unreleased.insert(
            run_id,
            GivenUpLease {
                token,
                note,
                at: Instant::now(),
            },
        );
    }

    /// Releases the lease an earlier attempt of this importer gave up on `run_id` but
    /// could not release. While it still cannot, the attempt stops there with the
    /// database's error (a transient one, retried like a failed claim): claiming would
    /// find this process's own lease live and wait for it to expire.
    async fn release_given_up_lease(&self, run_id: Uuid) -> Result<(), ImportError> {
        let Some(GivenUpLease { token, note, .. }) =
            self.unreleased.lock().unwrap().get(&run_id).cloned()
        else {
            return Ok(());
        };
        let released = runs::release(&self.pool, run_id, token, &note)
            .await
            .map_err(|error| ImportError::Claim(ClaimError::Database(error)))?;
        tracing::info!(run.id = %run_id, released, "gave up the lease of the paused attempt");
        self.unreleased.lock().unwrap().remove(&run_id);
        Ok(())
    }

    async fn execute(&self, claimed: ClaimedRun) -> Result<ImportSummary, ImportError> {
        let started = Instant::now();
        let ClaimedRun {
            lease,
            dataset_id,
            parameters,
            checkpoint,
            user_id,
            ..
        } = claimed;
        let fetcher = Fetcher::new(parameters.source.clone(), self.s3.clone(), &self.settings);
        let info = fetcher.head(self.settings.max_file_size).await?;
        if let Some(expected) = &parameters.expected_etag {
            if info.etag.as_deref().map(|etag| etag.trim_matches('"'))
                != Some(expected.trim_matches('"'))
            {
                return Err(FetchError::ObjectChanged {
                    source_location: parameters.source.to_string(),
                    expected: expected.clone(),
                }
                .into());
            }
        }
        let mut loader = Loader::new(&self.pool, lease.clone())
            .skip_bad_rows(parameters.options.skip_bad_rows)
            .bound_row_waits((self.settings.staging_batches > 1).then_some(load::ROW_WAIT_LIMIT));
        let file_name = parameters.source.file_name().to_owned();
        // Spreadsheets are recognised by their content once spooled; the name only
        // decides which reader gets the bytes (and must agree with the content).
        let spreadsheet = SheetFormat::from_file_name(&file_name).is_some();

        let mut checkpoint = match checkpoint {
            Some(checkpoint) => {
                if checkpoint.etag != info.etag {
                    return Err(FetchError::ObjectChanged {
                        source_location: parameters.source.to_string(),
                        expected: checkpoint.etag.clone().unwrap_or_default(),
                    }
                    .into());
                }
                tracing::info!(
                    byte = checkpoint.byte_offset,
                    rows = checkpoint.loaded_rows,
                    "resuming from checkpoint"
                );
                checkpoint
            }
            None => {
                let commit_id = Uuid::new_v4().simple().to_string();
                let plan =
                    ImportPlan::decide(&mut *loader.connection().await?, dataset_id, &parameters)
                        .await?;
                // A spreadsheet's `{sheet}` is each worksheet's name, set as it is read.
                let sheet = if spreadsheet {
                    String::new()
                } else {
                    plan.single_sheet_name(&parameters)
                };
                let mut checkpoint = Checkpoint::start(commit_id, info.etag.clone(), sheet);
                checkpoint.plan = plan;
                let message = parameters
                    .options
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("Import {}", parameters.source));
                loader
                    .begin_commit(dataset_id, &message, user_id.as_deref(), &checkpoint)
                    .await?;
                checkpoint
            }
        };
        if parameters.options.mode == ImportMode::Append
            && parameters.options.on_conflict == OnConflict::Fail
            && checkpoint.plan.keyed()
        {
            loader.refuse_keys_of(checkpoint.plan.parent.clone());
        }
        let loader = Arc::new(loader);
        let resumed_from_byte = checkpoint.byte_offset;

        let sheet_format = Arc::new(std::sync::OnceLock::new());
        let mut json_lines = false;
        let (producer, looker, mut receiver, header) = if spreadsheet {
            let (spooled, spool_usage) = self
                .unless_stopped(async {
                    let input = fetcher.reader_from(&info, 0).await?;
                    Ok(sheet::spool::spool(
                        input,
                        &self.settings.spool_dir,
                        &file_name,
                        info.size,
                        self.settings.max_file_size,
                    )
                    .await?)
                })
                .await?;
            let job = SheetJob {
                file: spooled,
                spool_usage,
                file_name: file_name.clone(),
                wanted: parameters.options.sheets.clone(),
                cursor: checkpoint.clone(),
                settings: self.settings.clone(),
                skip_bad_rows: parameters.options.skip_bad_rows,
                delete: parameters.options.mode == ImportMode::Delete,
                size: info.size,
                format: Arc::clone(&sheet_format),
            };
            let span = tracing::Span::current();
            let (producer, looker, receiver) = self
                .start_pipeline(checkpoint.plan.parent.clone(), |sender| {
                    tokio::task::spawn_blocking(move || {
                        let _entered = span.enter();
                        produce_sheet_batches(job, sender)
                    })
                })
                .await?;
            (producer, looker, receiver, None)
        } else {
            let file = parameters.source.file_name();
            let resuming = checkpoint.header.is_some();
            // Older checkpoints have no dialect: they were read with the default one.
            let recorded = resuming.then(|| checkpoint.dialect.clone().unwrap_or_default());
            let text = match &recorded {
                Some(dialect) if !dialect.transformed() => None,
                // Compressed or encoded text is read from the top on every attempt: a
                // stream cannot be entered in the middle.
                _ => Some(
                    self.unless_stopped(open_text(
                        &fetcher,
                        &info,
                        file,
                        &parameters.options,
                        self.settings.max_decompressed_size,
                    ))
                    .await?,
                ),
            };
            let transformed = text.as_ref().is_some_and(|(text, _)| text.transformed());
            let (input, object_bytes, end) = match text {
                None => (
                    fetcher.reader_from(&info, checkpoint.byte_offset).await?,
                    None,
                    info.size,
                ),
                Some((mut text, member)) => {
                    if resuming {
                        // Skipped, not parsed: these rows are in the commit already.
                        let skipped = self
                            .unless_stopped(async {
                                tokio::io::copy(
                                    &mut (&mut text.reader).take(checkpoint.byte_offset),
                                    &mut tokio::io::sink(),
                                )
                                .await
                                .map_err(|error| read_error(file, 0, error).into())
                            })
                            .await?;
                        if skipped != checkpoint.byte_offset {
                            return Err(ImportError::Resume(format!(
                                "{file}: the decoded text ends at byte {skipped}, before the \
                                 checkpoint's byte {}",
                                checkpoint.byte_offset
                            )));
                        }
                    }
                    let object_bytes = transformed.then(|| Arc::clone(&text.object_bytes));
                    let compression = text.compression.map(|c| c.name().to_owned());
                    let encoding = decode::text::encoding_name(text.encoding);
                    let end = member.as_ref().map_or(info.size, |member| {
                        member.data_offset + member.compressed_size
                    });
                    if !resuming {
                        checkpoint.dialect = Some(CsvDialect {
                            encoding,
                            compression,
                            member: member.map(|member| member.name),
                            ..CsvDialect::default()
                        });
                    }
                    (text.reader, object_bytes, end)
                }
            };
            let read_from = checkpoint
                .dialect
                .as_ref()
                .and_then(|dialect| dialect.member.as_deref())
                .unwrap_or(file);
            if TextFormat::of(&parameters.options, read_from) == TextFormat::Jsonl {
                json_lines = true;
                let reader = self
                    .unless_stopped(async {
                        Ok(LineReader::open(
                            input,
                            file,
                            checkpoint.byte_offset,
                            checkpoint.line,
                            self.settings.max_record_bytes,
                        )
                        .await?)
                    })
                    .await?;
                if checkpoint.header.is_none() {
                    checkpoint.byte_offset = reader.next_byte();
                    checkpoint.header = Some(Header::resolve(&[]));
                    checkpoint.dialect = Some(checkpoint.dialect.take().unwrap_or_default());
                }
                // Keys are looked up by name in each object: the columns grow as the
                // file is read, so there is no header to find them in first.
                let identity = RowIdentity {
                    offset: checkpoint.plan.row_offset(&checkpoint.sheet),
                    key: checkpoint
                        .plan
                        .key
                        .clone()
                        .map(|names| ((0..names.len()).collect(), names)),
                    delete: parameters.options.mode == ImportMode::Delete,
                };
                let (producer, looker, receiver) = self
                    .start_pipeline(checkpoint.plan.parent.clone(), |sender| {
                        tokio::spawn(
                            produce_json_batches(
                                reader,
                                Arc::new(identity),
                                checkpoint.clone(),
                                self.settings.batch_size,
                                parameters.options.skip_bad_rows,
                                ObjectBytes {
                                    end,
                                    read: object_bytes,
                                },
                                sender,
                            )
                            .in_current_span(),
                        )
                    })
                    .await?;
                (producer, looker, receiver, checkpoint.header.clone())
            } else {
                let format = match &recorded {
                    Some(dialect) => csv_format(dialect),
                    None => CsvFormat {
                        delimiter: parameters
                            .options
                            .delimiter_byte()
                            .or_else(|| tab_separated(read_from).then_some(b'\t')),
                        quote: parameters.options.quote_byte(),
                        escape: parameters.options.escape_byte(),
                        header: !parameters.options.no_header,
                    },
                };
                let start = CsvStart {
                    byte: checkpoint.byte_offset,
                    line: checkpoint.line,
                    crlf: checkpoint.header.as_ref().is_some_and(|header| header.crlf),
                    at_top: false,
                };
                // The top of the text is read here (64 KiB, for the delimiter), which a
                // slow store can stretch to minutes.
                let mut decoder = self
                    .unless_stopped(async {
                        Ok(CsvDecoder::open(
                            input,
                            file,
                            start,
                            self.settings.max_record_bytes,
                            format,
                        )
                        .await?)
                    })
                    .await?;
                let header = match checkpoint.header.clone() {
                    Some(header) => header,
                    None => {
                        let header = self
                            .unless_stopped(async {
                                Ok(decoder.read_header(self.settings.max_sheet_columns).await?)
                            })
                            .await?;
                        if format.header {
                            checkpoint.byte_offset = decoder.next_byte();
                            checkpoint.line = decoder.next_line();
                        }
                        checkpoint.header = Some(header.clone());
                        let (delimiter, sniffed) = decoder.delimiter();
                        let read = checkpoint.dialect.take().unwrap_or_default();
                        checkpoint.dialect = Some(CsvDialect {
                            delimiter: char::from(delimiter).to_string(),
                            quote: char::from(format.quote).to_string(),
                            header: format.header,
                            escape: format.escape.map(|escape| char::from(escape).to_string()),
                            delimiter_sniffed: sniffed,
                            ..read
                        });
                        header
                    }
                };
                let dialect = checkpoint.dialect.clone().unwrap_or_default();

                // The look-up's connection is taken before any task starts, so a pool that
                // cannot give it fails here, with nothing left running.
                let key = checkpoint
                    .plan
                    .key_columns(&header, parameters.source.file_name(), None)?
                    .map(|columns| {
                        let names = columns.iter().map(|&c| header.columns[c].clone()).collect();
                        (columns, names)
                    });
                let identity = RowIdentity {
                    offset: checkpoint.plan.row_offset(&checkpoint.sheet),
                    key,
                    delete: parameters.options.mode == ImportMode::Delete,
                };
                let rows = Arc::new(CsvRows {
                    encoder: RowEncoder::new(&header).decoded_from(&dialect.encoding),
                    identity,
                });
                let (producer, looker, receiver) = self
                    .start_pipeline(checkpoint.plan.parent.clone(), |sender| {
                        tokio::spawn(
                            produce_batches(
                                decoder,
                                rows,
                                checkpoint.clone(),
                                self.settings.batch_size,
                                parameters.options.skip_bad_rows,
                                ObjectBytes {
                                    end,
                                    read: object_bytes,
                                },
                                sender,
                            )
                            .in_current_span(),
                        )
                    })
                    .await?;
                (producer, looker, receiver, Some(header))
            }
        };
        // Dropping the guards aborts both tasks on every way out of this function (a
        // blocking producer stops at its next send, which finds the channel closed).
        let _guards = (
            AbortOnDropHandle::new(producer),
            AbortOnDropHandle::new(looker),
        );

        let mut batches = BatchCommitter {
            loader: &loader,
            checkpoint,
            timings: StageTimings::default(),
            counted_to_byte: resumed_from_byte,
            rows_this_attempt: 0,
            batches: 0,
            repeated_rows: 0,
            progress_every: self.settings.progress_update_interval,
            object_size: info.size,
            started,
        };
        self.load_batches(&loader, &mut receiver, &mut batches)
            .await?;
        let BatchCommitter {
            checkpoint,
            timings,
            rows_this_attempt,
            ..
        } = batches;

        let finalise_started = Instant::now();
        // JSON Lines: the columns grew with the file; the last checkpoint has them all.
        let header = if json_lines {
            checkpoint.header.clone()
        } else {
            header
        };
        let source = match &header {
            Some(header) => lineage(&parameters, &info, header, &checkpoint, json_lines),
            None => sheet_lineage(&parameters, &info, sheet_format.get().copied(), &checkpoint),
        };
        let elapsed = started.elapsed();
        let mut summary = ImportSummary {
            run_id: lease.run_id,
            dataset_id,
            commit_id: checkpoint.commit_id.clone(),
            parent_commit_id: None,
            rows: checkpoint.loaded_rows,
            new_rows: checkpoint.new_rows,
            rejected_rows: checkpoint.rejected_rows,
            bytes: info.size,
            bytes_read: fetcher.bytes_read(),
            resumed_from_byte,
            seconds: elapsed.as_secs_f64(),
            rows_per_second: rows_this_attempt as f64 / elapsed.as_secs_f64().max(1e-9),
            tree_hash: checkpoint.tree_state.clone(),
            deleted_rows: 0,
            keys_not_found: 0,
            columns: header
                .as_ref()
                .map(|header| header.columns.clone())
                .unwrap_or_default(),
            header_changes: header
                .as_ref()
                .map(|header| header.changes.clone())
                .unwrap_or_default(),
            source: source.clone(),
            timings,
            peak_rss_bytes: crate::process::peak_rss_bytes(),
        };
        let facts = CommitFacts {
            dataset_id,
            commit_id: &checkpoint.commit_id,
            row_count: checkpoint.loaded_rows,
            tree_hash: &checkpoint.tree_state,
            batches: checkpoint.batches,
            source,
            merge: Merge {
                mode: parameters.options.mode,
                on_conflict: parameters.options.on_conflict,
                skip_bad_rows: parameters.options.skip_bad_rows,
                plan: &checkpoint.plan,
                key_trail: &checkpoint.key_trail,
            },
        };
        let complete = |summary: &mut ImportSummary, done: &Finalised| {
            summary.parent_commit_id = done.parent.clone();
            summary.rows = done.row_count;
            summary.tree_hash = done.tree_hash.clone();
            summary.deleted_rows = done.deleted_rows;
            summary.keys_not_found = done.keys_not_found;
            summary.rejected_rows += done.conflicting_rows;
            if let Some(source) = &done.source {
                summary.source = source.clone();
            }
        };
        let done = finalise::finalise(&mut *loader.connection().await?, &lease, facts, |done| {
            let mut output = summary.clone();
            complete(&mut output, done);
            serde_json::to_value(output).unwrap_or_else(|_| json!({}))
        })
        .await?;
        complete(&mut summary, &done);
        summary.timings.finalise_ms = finalise_started.elapsed().as_millis() as u64;
        summary.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            commit.id = %summary.commit_id,
            rows = summary.rows,
            new_rows = summary.new_rows,
            duration_ms = started.elapsed().as_millis() as u64,
            "import completed"
        );
        Ok(summary)
    }

    /// Starts a producer (`start_producer` gets the pipe its batches go into) and the
    /// look-up task behind it, which reads `parent`'s entries first (see
    /// [`Lookup::following`]); returns both tasks and the receiver the loader reads.
    ///
    /// Decoded batches wait for the look-up in a channel that is shorter the more
    /// batches the loader stages (`staging_batches`), down to one: the loader's batches
    /// are buffered work too, and each holds its rows in memory, so an import holds as
    /// many batches with one or two staging (each one beyond two adds a batch).
    async fn start_pipeline(
        &self,
        parent: Option<String>,
        start_producer: impl FnOnce(Pipe) -> tokio::task::JoinHandle<()>,
    ) -> Result<
        (
            tokio::task::JoinHandle<()>,
            tokio::task::JoinHandle<()>,
            mpsc::Receiver<Result<Produced, ImportError>>,
        ),
        ImportError,
    > {
        let staging_batches = self.settings.staging_batches;
        let lookup = Lookup::new(&self.pool, staging_batches)
            .await?
            .following(parent);
        let decoded_ahead = BATCHES_IN_FLIGHT.saturating_sub(staging_batches).max(1);
        let (sender, encoded) = mpsc::channel(decoded_ahead);
        let producer = start_producer(sender);
        let (sender, receiver) = mpsc::channel(1);
        let looker = tokio::spawn(drop_known_rows(lookup, encoded, sender).in_current_span());
        Ok((producer, looker, receiver))
    }

    /// Loads the batches `receiver` brings, each in one transaction of its own: up to
    /// `staging_batches` store their rows at once, each on its own connection, while
    /// the batch before them commits; batches commit one at a time, in the file's
    /// order. Their rows never overlap (the look-up leaves a row to the batch ahead that
    /// has it, see [`Lookup`]), so the staging batches never wait for one another.
    /// Each batch's transaction is opened here, in file order, and only its rows (and
    /// positional entries, whose ids no other batch has) are stored in a task of its
    /// own (see [`Loader::open`]); with more than one storing, a wait for another
    /// import's rows is bounded ([`Loader::bound_row_waits`]).
    ///
    /// A stop, the end of the file or a failure of the decoding pipeline reaches the
    /// committing side after the batches before it, which commit first: they are whole,
    /// and the resume starts after them. When a commit fails, the batches still staging
    /// finish storing and roll back; when the import itself is dropped, their tasks are
    /// aborted.
    async fn load_batches(
        &self,
        loader: &Arc<Loader>,
        receiver: &mut mpsc::Receiver<Result<Produced, ImportError>>,
        batches: &mut BatchCommitter<'_>,
    ) -> Result<(), ImportError> {
        let staging_batches = self.settings.staging_batches.max(1);
        // A slot per batch from its arrival to its commit: those staging, and the one
        // committing. They bound the memory and the connections the import holds.
        let slots = Arc::new(Semaphore::new(staging_batches + 1));
        // A permit per batch storing its rows: with one, a batch stores only once the
        // batch before it has stored, as it commits.
        let storing = Arc::new(Semaphore::new(staging_batches));
        let (fed, mut to_commit) = mpsc::unbounded_channel::<Fed>();
        let feed = async {
            loop {
                if self.is_stopping() {
                    let _ = fed.send(Fed::Stopped);
                    break;
                }
                let slot = tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => {
                        slot.expect("the loader's slots are never closed")
                    }
                    () = self.stopped() => continue,
                };
                // Taken before the next batch, which meanwhile waits in the look-up's
                // channel, where it holds back the stages before instead of adding to
                // what they hold.
                let permit = tokio::select! {
                    permit = Arc::clone(&storing).acquire_owned() => {
                        permit.expect("the loader's permits are never closed")
                    }
                    () = self.stopped() => continue,
                };
                let next = tokio::select! {
                    next = receiver.recv() => next,
                    () = self.stopped() => continue,
                };
                let arrived = Instant::now();
                let last = match next {
                    Some(Ok(Produced::Batch(batch))) => {
                        // Opened here, one after another, so batches take gc's fence
                        // in file order (see `Loader::open`).
                        let opened = match loader.open(&batch).await {
                            Ok(opened) => opened,
                            Err(error) => {
                                let _ = fed.send(Fed::Failed(error.into()));
                                break;
                            }
                        };
                        let loader = Arc::clone(loader);
                        let staging = AbortOnDropHandle::new(tokio::spawn(
                            async move {
                                let mut batch = *batch;
                                let staged = loader.store(opened, &mut batch).await?;
                                drop(permit);
                                Ok((batch, staged))
                            }
                            .in_current_span(),
                        ));
                        let _ = fed.send(Fed::Batch {
                            arrived,
                            staging,
                            _slot: slot,
                        });
                        continue;
                    }
                    Some(Ok(Produced::End)) => Fed::End,
                    Some(Err(error)) => Fed::Failed(error),
                    None => Fed::Failed(ImportError::Internal(
                        "the decoding pipeline stopped before the end of the file".to_owned(),
                    )),
                };
                let _ = fed.send(last);
                break;
            }
            // The committing side decides when loading ends.
            std::future::pending::<()>().await;
        };
        let commit = async {
            // The loader waited for a batch from the moment it had nothing to commit.
            let mut idle_from = Instant::now();
            while let Some(next) = to_commit.recv().await {
                match next {
                    Fed::Batch {
                        arrived, staging, ..
                    } => {
                        batches.timings.wait_for_batch_ms +=
                            arrived.saturating_duration_since(idle_from).as_millis() as u64;
                        let (batch, staged) = staging.await.map_err(|error| {
                            ImportError::Internal(format!("storing a batch's rows: {error}"))
                        })??;
                        batches.commit(batch, staged).await?;
                        idle_from = Instant::now();
                    }
                    Fed::End => return Ok(()),
                    Fed::Stopped => return Err(ImportError::Interrupted),
                    Fed::Failed(error) => return Err(error),
                }
            }
            Err(ImportError::Internal(
                "the loader stopped feeding batches".to_owned(),
            ))
        };
        let result = tokio::select! {
            result = commit => result,
            () = feed => unreachable!("feeding batches never ends on its own"),
        };
        if result.is_err() {
            // The batches still storing finish their COPY and are then dropped, which
            // rolls them back; aborting one inside its COPY would leave its pooled
            // connection out of step with the server.
            while let Ok(next) = to_commit.try_recv() {
                if let Fed::Batch { staging, .. } = next {
                    let _ = staging.await;
                }
            }
        }
        result
    }
}

/// What the loader hands on to be committed, in the file's order.
enum Fed {
    /// A batch whose rows are being stored in its own transaction, and its place
    /// among the batches in flight (given back once it has committed).
    Batch {
        arrived: Instant,
        staging: AbortOnDropHandle<Result<(Batch, Staged), LoadError>>,
        _slot: OwnedSemaphorePermit,
    },
    /// The end of the file.
    End,
    /// The stop signal, before another batch came.
    Stopped,
    /// The decoding pipeline failed, or a batch's transaction could not be opened; the
    /// batches before commit first.
    Failed(ImportError),
}

/// Commits an attempt's batches in order and keeps its running checkpoint and counts.
struct BatchCommitter<'a> {
    loader: &'a Loader,
    /// The checkpoint of the last batch committed.
    checkpoint: Checkpoint,
    timings: StageTimings,
    counted_to_byte: u64,
    rows_this_attempt: u64,
    batches: u64,
    /// Keyed rows the loader found repeated in earlier batches of this attempt; the
    /// producer counted them as loaded.
    repeated_rows: u64,
    progress_every: u64,
    object_size: u64,
    started: Instant,
}

impl BatchCommitter<'_> {
    /// Commits a staged batch, its checkpoint first brought up to date with what the
    /// batches committed before it learnt (the producer cannot know those counts).
    async fn commit(&mut self, mut batch: Batch, staged: Staged) -> Result<(), ImportError> {
        batch.checkpoint.new_rows = self.checkpoint.new_rows;
        batch.checkpoint.batches = self.checkpoint.batches + 1;
        batch.checkpoint.loaded_rows -= self.repeated_rows;
        batch.checkpoint.rejected_rows += self.repeated_rows;
        self.batches += 1;
        let progress = self.batches.is_multiple_of(self.progress_every).then(|| {
            Progress::new(
                &batch.checkpoint,
                self.object_size,
                self.rows_this_attempt + batch.rows.len(),
                self.started.elapsed(),
            )
        });
        let outcome = self
            .loader
            .commit(staged, &batch, progress.as_ref())
            .await?;
        self.rows_this_attempt += batch.rows.len();
        let timings = &mut self.timings;
        timings.decode_hash_ms += batch.encode_duration.as_millis() as u64;
        timings.lookup_ms += batch.lookup_duration.as_millis() as u64;
        timings.insert_rows_ms += outcome.insert_duration.as_millis() as u64;
        timings.commit_rows_ms += outcome.commit_rows_duration.as_millis() as u64;
        timings.checkpoint_commit_ms += outcome.commit_duration.as_millis() as u64;
        let rows_before = self.checkpoint.loaded_rows;
        let checkpoint = &mut self.checkpoint;
        *checkpoint = batch.checkpoint;
        checkpoint.new_rows += outcome.new_rows;
        checkpoint.loaded_rows -= outcome.repeated_rows;
        checkpoint.rejected_rows += outcome.repeated_rows;
        self.repeated_rows += outcome.repeated_rows;
        // Counted as each batch commits, so a long import moves the rates steadily;
        // a resumed run counts from its checkpoint, so no batch is counted twice.
        // The first batch's bytes include the header's, read before the loop.
        crate::metrics::metrics().record_batch_loaded(
            checkpoint.loaded_rows.saturating_sub(rows_before),
            checkpoint.byte_offset.saturating_sub(self.counted_to_byte),
        );
        self.counted_to_byte = self.counted_to_byte.max(checkpoint.byte_offset);
        tracing::debug!(
            rows = checkpoint.loaded_rows,
            byte = checkpoint.byte_offset,
            new_rows = outcome.new_rows,
            "batch committed"
        );
        Ok(())
    }
}

/// The text of a file that may be compressed, encoded or zipped: the decoding thread's
/// output when it is any of those, otherwise the object's own stream (from byte 0), and
/// the zip member read, if any.
async fn open_text(
    fetcher: &Fetcher,
    info: &ObjectInfo,
    file: &str,
    options: &run::ImportOptions,
    max_decompressed: u64,
) -> Result<(decode::text::Text, Option<decode::archive::Member>), ImportError> {
    let declared = options.encoding.as_deref();
    let mut input = fetcher.reader_from(info, 0).await?;
    let mut magic = Vec::with_capacity(10);
    (&mut input)
        .take(10)
        .read_to_end(&mut magic)
        .await
        .map_err(|error| read_error(file, 0, error))?;
    if magic.starts_with(decode::archive::ZIP_MAGIC) {
        drop(input);
        let member =
            decode::archive::locate(fetcher, info, file, options.member.as_deref()).await?;
        let data = fetcher
            .reader_from(info, member.data_offset)
            .await?
            .take(member.compressed_size);
        let compression = decode::text::Compression::Zip {
            deflated: member.deflated,
        };
        let text = decode::text::open(
            Box::pin(data),
            declared,
            max_decompressed,
            Some(compression),
            member.data_offset,
        )
        .await
        .map_err(|error| read_error(file, member.data_offset, error))?;
        return Ok((text, Some(member)));
    }
    let input: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> =
        Box::pin(std::io::Cursor::new(magic.clone()).chain(input));
    let text = if decode::text::needs_decoding(&magic, declared) {
        decode::text::open(input, declared, max_decompressed, None, 0)
            .await
            .map_err(|error| read_error(file, 0, error))?
    } else {
        decode::text::Text {
            reader: input,
            compression: None,
            encoding: encoding_rs::UTF_8,
            object_bytes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    };
    Ok((text, None))
}

/// How a resumed run splits records: as the dialect its checkpoint recorded.
fn csv_format(dialect: &CsvDialect) -> CsvFormat {
    let byte = |text: &str| text.chars().next().map(|c| c as u32 as u8);
    CsvFormat {
        delimiter: Some(byte(&dialect.delimiter).unwrap_or(b',')),
        quote: byte(&dialect.quote).unwrap_or(b'"'),
        escape: dialect.escape.as_deref().and_then(byte),
        header: dialect.header,
    }
}

/// Whether the name (the object's, or a zip member's) says tab-separated values (`.tsv`,
/// `.tab`, also before a compression suffix: `data.tsv.gz`).
fn tab_separated(file_name: &str) -> bool {
    file_name.split('.').skip(1).any(|extension| {
        extension.eq_ignore_ascii_case("tsv") || extension.eq_ignore_ascii_case("tab")
    })
}

/// The commit's `source` for a CSV file.
fn lineage(
    parameters: &ImportParameters,
    info: &ObjectInfo,
    header: &Header,
    checkpoint: &Checkpoint,
    json_lines: bool,
) -> Lineage {
    let dialect = checkpoint.dialect.clone().unwrap_or_default();
    let (format, layout, parser) = if json_lines {
        let text = run::TextLineage {
            encoding: dialect.encoding,
            compression: dialect.compression,
            member: dialect.member,
        };
        let layout = Layout::JsonLines {
            text,
            columns: header.columns.clone(),
            sheet: Some(checkpoint.sheet.clone()),
        };
        ("jsonl", layout, "serde_json")
    } else {
        let layout = Layout::Csv {
            dialect,
            columns: header.columns.clone(),
            sheet: Some(checkpoint.sheet.clone()),
        };
        ("csv", layout, "csv-async")
    };
    Lineage {
        location: parameters.source.clone(),
        etag: info.etag.clone(),
        version_id: info.version_id.clone(),
        size: info.size,
        format: Some(format.to_owned()),
        layout,
        parser: format!("dsa-ingest {} ({parser})", env!("CARGO_PKG_VERSION")),
        mode: Some(parameters.options.mode),
        row_key: checkpoint.plan.key.clone(),
        sheet_order: vec![checkpoint.sheet.clone()],
        numeric_key_sheets: Vec::new(),
    }
}

/// The commit's `source` for a spreadsheet: where it came from, its format, and each
/// sheet with its visibility, columns and row count.
fn sheet_lineage(
    parameters: &ImportParameters,
    info: &ObjectInfo,
    format: Option<SheetFormat>,
    checkpoint: &Checkpoint,
) -> Lineage {
    Lineage {
        location: parameters.source.clone(),
        etag: info.etag.clone(),
        version_id: info.version_id.clone(),
        size: info.size,
        format: format.map(|format| format.name().to_owned()),
        layout: Layout::Sheets {
            sheets: checkpoint.completed_sheets.clone(),
            sheets_requested: parameters.options.sheets.clone(),
        },
        parser: format!("dsa-ingest {} (calamine 0.38)", env!("CARGO_PKG_VERSION")),
        mode: Some(parameters.options.mode),
        row_key: checkpoint.plan.key.clone(),
        sheet_order: checkpoint
            .completed_sheets
            .iter()
            .map(|sheet| sheet.name.clone())
            .collect(),
        numeric_key_sheets: Vec::new(),
    }
}

impl From<&ImportSummary> for CompletedImport {
    fn from(summary: &ImportSummary) -> Self {
        Self {
            rows: summary.rows,
            new_rows: summary.new_rows,
            rejected_rows: summary.rejected_rows,
            object_bytes: summary.bytes,
            seconds: summary.seconds,
        }
    }
}
