//! The import core: claim → fetch → decode → hash → load → finalise, for one run.
//!
//! It takes plain inputs (a pool, an optional S3 client, settings) and knows nothing of
//! AMQP, so the CLI, a queue consumer and the tests all drive it the same way.
//!
//! Two tasks run side by side: a producer reads and decodes the object and hands each
//! batch's CPU work (canonical JSON, sha256, COPY encoding) to the blocking pool, while
//! the loader writes the previous batch to PostgreSQL. A bounded channel between them
//! keeps memory constant whatever the file's size.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csv_async::ByteRecord;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::claim::{self, Checkpoint, ClaimError, ClaimedRun, ImportParameters};
use crate::config::ImportSettings;
use crate::db::{self, DatasetError, DatasetName};
use crate::decode::{self, CsvDecoder, CsvStart, DecodeError, Header, HeaderChange, RowEncoder};
use crate::fetch::{FetchError, Fetcher, ObjectInfo};
use crate::finalise::{self, CommitFacts};
use crate::hash::{self, TreeHasher};
use crate::load::{Batch, BatchWriter, LoadError, Loader, Lookup, Progress, RejectedRow};
use crate::sheet::{self, SheetError, SheetFormat};

/// Batches decoded ahead of the loader; two keep both sides busy without piling up.
const BATCHES_IN_FLIGHT: usize = 2;

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

impl ImportError {
    /// Whether the run itself should be marked failed. Claim problems and a lost lease
    /// belong to someone else's run state, so they leave the run alone.
    pub fn fails_the_run(&self) -> bool {
        !matches!(
            self,
            ImportError::Claim(_)
                | ImportError::Load(LoadError::LeaseLost { .. })
                | ImportError::Interrupted
        )
    }

    /// Whether trying again later may succeed (the store or the database was away).
    pub fn is_transient(&self) -> bool {
        match self {
            ImportError::Fetch(error) | ImportError::Decode(DecodeError::Source(error)) => {
                error.is_transient()
            }
            ImportError::Load(LoadError::Database(error))
            | ImportError::Claim(ClaimError::Database(error)) => db::is_transient(error),
            ImportError::Sheet(error) => error.is_transient(),
            ImportError::Claim(ClaimError::Held { .. }) => true,
            ImportError::Load(LoadError::RowsCollected { .. }) => true,
            _ => false,
        }
    }
}

/// Time spent per stage in this attempt, from the service's own clocks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageTimings {
    /// Loader waiting for the next batch: fetch and decode not keeping up.
    pub wait_for_batch_ms: u64,
    /// Canonical JSON, sha256 and COPY encoding, on the blocking pool.
    pub decode_hash_ms: u64,
    /// Looking up which rows are stored already, on the second connection (overlaps
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
    pub columns: Vec<String>,
    pub header_changes: Vec<HeaderChange>,
    pub source: serde_json::Value,
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
    /// for a retry instead of failing it; the queue consumer retries, the CLI does not.
    keep_runs_on_transient_failure: bool,
    /// Cancelled at shutdown: the import stops after the batch it is committing.
    stop: Option<tokio_util::sync::CancellationToken>,
}

impl Importer {
    pub fn new(pool: PgPool, s3: Option<aws_sdk_s3::Client>, settings: ImportSettings) -> Self {
        Self {
            pool,
            s3,
            settings,
            owner: claim::worker_identity(),
            keep_runs_on_transient_failure: false,
            stop: None,
        }
    }

    /// For callers that retry: a transient failure releases the lease and leaves the
    /// run resumable from its checkpoint instead of failing it.
    pub fn keep_runs_on_transient_failure(mut self) -> Self {
        self.keep_runs_on_transient_failure = true;
        self
    }

    /// Imports stop between batches once `stop` is cancelled.
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
        let (dataset_id, _) = db::ensure_dataset(&self.pool, dataset, None).await?;
        let run_id = claim::create_import_run(&self.pool, dataset_id, user_id, parameters).await?;
        Ok((run_id, dataset_id))
    }

    /// Claims the run and imports it (from its checkpoint, if it has one). On an error
    /// that belongs to the run, the run is marked failed before the error is returned.
    pub async fn run(&self, run_id: Uuid) -> Result<ImportSummary, ImportError> {
        let claimed = claim::claim(
            &self.pool,
            run_id,
            &self.owner,
            self.settings.lease_duration,
        )
        .await?;
        let token = claimed.lease.token;
        let span = tracing::info_span!(
            "import",
            run.id = %run_id,
            dataset.id = claimed.dataset_id,
            source = %claimed.parameters.source,
        );
        let result = self.execute(claimed).instrument(span).await;
        if let Err(error) = &result {
            let retry_later = matches!(error, ImportError::Interrupted)
                || (self.keep_runs_on_transient_failure && error.is_transient());
            if retry_later && !matches!(error, ImportError::Claim(_)) {
                tracing::warn!(run.id = %run_id, error = %error, "import paused; the run stays resumable");
                if let Err(release) =
                    claim::release(&self.pool, run_id, token, &error.to_string()).await
                {
                    tracing::warn!(run.id = %run_id, error = %release, "could not release the lease; it expires on its own");
                }
            } else if error.fails_the_run() {
                tracing::error!(run.id = %run_id, error = %error, "import failed");
                // The import's own error is what a person needs; a failure to record it
                // (often the same database outage) is logged, not put in its place.
                if let Err(record) =
                    claim::fail_run(&self.pool, run_id, Some(token), &error.to_string()).await
                {
                    tracing::error!(run.id = %run_id, error = %record, "could not mark the run failed");
                    // A caller that retries must not take the failure as recorded: the
                    // run would stay `running` with nobody left to finish it. The retry
                    // runs into the same failure and records it then.
                    if self.keep_runs_on_transient_failure && db::is_transient(&record) {
                        return Err(record.into());
                    }
                }
            }
        }
        result
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
        let mut loader = Loader::new(&self.pool, lease.clone()).await?;
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
                // A spreadsheet's `{sheet}` is each worksheet's name, set as it is read.
                let sheet = if spreadsheet {
                    String::new()
                } else {
                    decode::sheet_name(parameters.source.file_name())
                };
                let checkpoint = Checkpoint::start(commit_id, info.etag.clone(), sheet);
                let message = parameters
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("Import {}", parameters.source));
                loader
                    .begin_commit(dataset_id, &message, user_id.as_deref(), &checkpoint)
                    .await?;
                checkpoint
            }
        };
        let resumed_from_byte = checkpoint.byte_offset;

        let sheet_format = Arc::new(std::sync::OnceLock::new());
        let (producer, looker, mut receiver, header) = if spreadsheet {
            let input = fetcher.reader_from(&info, 0).await?;
            let spooled = sheet::spool(
                input,
                &self.settings.spool_dir,
                &file_name,
                info.size,
                self.settings.max_file_size,
            )
            .await?;
            let lookup = Lookup::new(&self.pool).await?;
            let (sender, encoded) = mpsc::channel(BATCHES_IN_FLIGHT);
            let job = SheetJob {
                file: spooled,
                file_name: file_name.clone(),
                wanted: parameters.sheets.clone(),
                cursor: checkpoint.clone(),
                settings: self.settings.clone(),
                skip_bad_rows: parameters.skip_bad_rows,
                size: info.size,
                format: Arc::clone(&sheet_format),
            };
            let span = tracing::Span::current();
            let producer = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                produce_sheet_batches(job, sender)
            });
            let (sender, receiver) = mpsc::channel(1);
            let looker = tokio::spawn(drop_known_rows(lookup, encoded, sender).in_current_span());
            (producer, looker, receiver, None)
        } else {
            let input = fetcher.reader_from(&info, checkpoint.byte_offset).await?;
            let start = CsvStart {
                byte: checkpoint.byte_offset,
                line: checkpoint.line,
                crlf: checkpoint.header.as_ref().is_some_and(|header| header.crlf),
                at_top: false,
            };
            let mut decoder = CsvDecoder::open(
                input,
                parameters.source.file_name(),
                start,
                self.settings.max_record_bytes,
            )
            .await?;
            let header = match checkpoint.header.clone() {
                Some(header) => header,
                None => {
                    let header = decoder.read_header().await?;
                    checkpoint.byte_offset = decoder.next_byte();
                    checkpoint.line = decoder.next_line();
                    checkpoint.header = Some(header.clone());
                    header
                }
            };

            // Both connections are taken before any task starts, so a pool that cannot give
            // the second fails here, with nothing left running.
            let lookup = Lookup::new(&self.pool).await?;
            let (sender, encoded) = mpsc::channel(BATCHES_IN_FLIGHT);
            let producer = tokio::spawn(
                produce_batches(
                    decoder,
                    Arc::new(RowEncoder::new(&header)),
                    checkpoint.clone(),
                    self.settings.batch_size,
                    parameters.skip_bad_rows,
                    info.size,
                    sender,
                )
                .in_current_span(),
            );
            let (sender, receiver) = mpsc::channel(1);
            let looker = tokio::spawn(drop_known_rows(lookup, encoded, sender).in_current_span());
            (producer, looker, receiver, Some(header))
        };
        // Dropping the guards aborts both tasks on every way out of this function (a
        // blocking producer stops at its next send, which finds the channel closed).
        let _guards = (AbortOnDrop(producer), AbortOnDrop(looker));

        let mut timings = StageTimings::default();
        let mut rows_this_attempt = 0u64;
        let mut batches = 0u64;
        loop {
            if self.is_stopping() {
                return Err(ImportError::Interrupted);
            }
            let waited = Instant::now();
            let Some(next) = receiver.recv().await else {
                return Err(ImportError::Internal(
                    "the decoding pipeline stopped before the end of the file".to_owned(),
                ));
            };
            timings.wait_for_batch_ms += waited.elapsed().as_millis() as u64;
            let mut batch = match next? {
                Produced::Batch(batch) => *batch,
                Produced::End => break,
            };
            batch.checkpoint.new_rows = checkpoint.new_rows;
            batches += 1;
            let progress = batches
                .is_multiple_of(self.settings.progress_update_interval)
                .then(|| {
                    Progress::new(
                        &batch.checkpoint,
                        info.size,
                        rows_this_attempt + batch.rows.len(),
                        started.elapsed(),
                    )
                });
            let outcome = loader.load(&batch, progress.as_ref()).await?;
            rows_this_attempt += batch.rows.len();
            timings.decode_hash_ms += batch.encode_duration.as_millis() as u64;
            timings.lookup_ms += batch.lookup_duration.as_millis() as u64;
            timings.insert_rows_ms += outcome.insert_duration.as_millis() as u64;
            timings.commit_rows_ms += outcome.commit_rows_duration.as_millis() as u64;
            timings.checkpoint_commit_ms += outcome.commit_duration.as_millis() as u64;
            checkpoint = batch.checkpoint;
            checkpoint.new_rows += outcome.new_rows;
            tracing::debug!(
                rows = checkpoint.loaded_rows,
                byte = checkpoint.byte_offset,
                new_rows = outcome.new_rows,
                "batch committed"
            );
        }

        let finalise_started = Instant::now();
        let source = match &header {
            Some(header) => lineage(&parameters, &info, header),
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
            peak_rss_bytes: crate::memory::peak_rss_bytes(),
        };
        let facts = CommitFacts {
            dataset_id,
            commit_id: &checkpoint.commit_id,
            row_count: checkpoint.loaded_rows,
            tree_hash: &checkpoint.tree_state,
            source,
        };
        let parent = finalise::finalise(loader.connection(), &lease, facts, |parent| {
            let mut output = summary.clone();
            output.parent_commit_id = parent.map(str::to_owned);
            serde_json::to_value(output).unwrap_or_else(|_| json!({}))
        })
        .await?;
        summary.parent_commit_id = parent;
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
}

/// The commit's `source`: where the bytes came from and how they were read.
fn lineage(parameters: &ImportParameters, info: &ObjectInfo, header: &Header) -> serde_json::Value {
    let mut source = serde_json::to_value(&parameters.source).unwrap_or_else(|_| json!({}));
    if let Some(object) = source.as_object_mut() {
        object.insert("etag".into(), json!(info.etag));
        object.insert("version_id".into(), json!(info.version_id));
        object.insert("size".into(), json!(info.size));
        object.insert("format".into(), json!("csv"));
        object.insert(
            "dialect".into(),
            json!({"delimiter": ",", "quote": "\"", "header": true, "encoding": "utf-8"}),
        );
        object.insert("columns".into(), json!(header.columns));
        object.insert(
            "parser".into(),
            json!(format!(
                "dsa-ingest {} (csv-async)",
                env!("CARGO_PKG_VERSION")
            )),
        );
    }
    source
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What flows from the producer through the look-up stage to the loader. The end of
/// the file is said explicitly, so a stage that stops for any other reason (a panic)
/// can never pass for a complete file.
enum Produced {
    Batch(Box<Batch>),
    End,
}

type Pipe = mpsc::Sender<Result<Produced, ImportError>>;

/// Record buffers larger than this are not kept for reuse.
const LARGE_RECORD_BYTES: usize = 1024 * 1024;

/// A batch is cut at this many bytes of records even before `IMPORT_BATCH_SIZE` rows,
/// so memory is bounded for wide rows too.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Reads records into batches and encodes each on the blocking pool, in file order.
/// An error ends the stream: the batch it interrupted is not sent, so every checkpoint
/// that reaches the loader sits on a record boundary.
async fn produce_batches(
    mut decoder: CsvDecoder,
    encoder: Arc<RowEncoder>,
    mut cursor: Checkpoint,
    batch_size: usize,
    skip_bad_rows: bool,
    size: u64,
    sender: Pipe,
) {
    // Record buffers travel to the blocking pool and back, so their allocations are
    // reused batch after batch.
    let mut records: Vec<ByteRecord> = Vec::new();
    loop {
        records.resize_with(batch_size, ByteRecord::new);
        let mut filled = 0;
        let mut bytes = 0;
        while filled < batch_size && bytes < MAX_BATCH_BYTES {
            match decoder.read_record(&mut records[filled]).await {
                Ok(true) => {
                    bytes += records[filled].as_slice().len();
                    filled += 1;
                }
                Ok(false) => break,
                Err(error) => {
                    let _ = sender.send(Err(error.into())).await;
                    return;
                }
            }
        }
        if filled == 0 {
            // The parser ends exactly at the object's last byte; anywhere else, the
            // source delivered less than HEAD promised (a local file cut short).
            let end = if decoder.next_byte() == size {
                Ok(Produced::End)
            } else {
                Err(DecodeError::Truncated {
                    file: decoder.file().to_owned(),
                    read: decoder.next_byte(),
                    size,
                }
                .into())
            };
            let _ = sender.send(end).await;
            return;
        }
        records.truncate(filled);
        let start = decoder.start();
        let file = decoder.file().to_owned();
        let mut next = cursor.clone();
        next.byte_offset = decoder.next_byte();
        next.line = decoder.next_line();
        let encoder = Arc::clone(&encoder);
        let encoded = tokio::task::spawn_blocking(move || {
            let result = encode_batch(&records, start, &encoder, &file, skip_bad_rows, next);
            (result, records)
        })
        .await;
        let batch = match encoded {
            Ok((result, returned)) => {
                records = returned;
                // A slot that once held a huge record would keep its allocation for the
                // rest of the import; let it go.
                for record in records.iter_mut() {
                    if record.as_slice().len() > LARGE_RECORD_BYTES {
                        *record = ByteRecord::new();
                    }
                }
                result
            }
            Err(panic) => {
                let message = format!("batch encoding panicked: {panic}");
                let _ = sender.send(Err(ImportError::Internal(message))).await;
                return;
            }
        };
        match batch {
            Ok(batch) => {
                cursor = batch.checkpoint.clone();
                if sender
                    .send(Ok(Produced::Batch(Box::new(batch))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
        }
    }
}

/// The look-up stage: drops the content of rows already stored from each batch, one
/// batch ahead of the loader, on a second connection.
async fn drop_known_rows(
    mut lookup: Lookup,
    mut encoded: mpsc::Receiver<Result<Produced, ImportError>>,
    sender: Pipe,
) {
    while let Some(next) = encoded.recv().await {
        let forwarded = match next {
            Ok(Produced::Batch(mut batch)) => match lookup.drop_known(&mut batch.rows).await {
                Ok(duration) => {
                    batch.lookup_duration = duration;
                    Ok(Produced::Batch(batch))
                }
                Err(error) => Err(error.into()),
            },
            other => other,
        };
        let last = !matches!(forwarded, Ok(Produced::Batch(_)));
        if sender.send(forwarded).await.is_err() || last {
            return;
        }
    }
}

/// The CPU part of a batch: canonical JSON, row hash, tree hash and COPY encoding for
/// each record, or the record's rejection. `next` is the checkpoint before the batch with
/// the reader's position after it; it comes back complete.
fn encode_batch(
    records: &[ByteRecord],
    start: CsvStart,
    encoder: &RowEncoder,
    file: &str,
    skip_bad_rows: bool,
    mut next: Checkpoint,
) -> Result<Batch, ImportError> {
    let started = Instant::now();
    let mut tree = TreeHasher::from_hex(&next.tree_state)
        .map_err(|error| ImportError::Resume(format!("checkpoint tree hash: {error}")))?;
    let mut writer = BatchWriter::new(&next.commit_id, &next.sheet, records.len());
    let mut rejected = Vec::new();
    let mut json = Vec::with_capacity(512);
    let mut logical_row_id = String::with_capacity(next.sheet.len() + 12);
    for record in records {
        next.records += 1;
        let n = next.records;
        let (byte, line) = start.position_of(record);
        json.clear();
        match encoder.encode(record, byte, &mut json) {
            Ok(()) => {
                let row_hash = hash::row_hash(&json);
                logical_row_id.clear();
                let _ = write!(logical_row_id, "{}:{n}", next.sheet);
                tree.push(&logical_row_id, &row_hash);
                writer.push(n, &row_hash, &json);
            }
            Err(problem) if skip_bad_rows => rejected.push(RejectedRow {
                line,
                byte,
                raw: raw_record(record),
                problem,
            }),
            Err(problem) => {
                return Err(DecodeError::BadRow {
                    file: file.to_owned(),
                    line,
                    byte,
                    problem,
                }
                .into())
            }
        }
    }
    next.loaded_rows += writer.rows();
    next.rejected_rows += rejected.len() as u64;
    next.tree_state = tree.to_hex();
    Ok(Batch {
        rows: writer.finish(),
        rejected,
        checkpoint: next,
        encode_duration: started.elapsed(),
        lookup_duration: Duration::ZERO,
    })
}

/// A rejected record's fields joined back with commas, for a person to inspect.
fn raw_record(record: &ByteRecord) -> Vec<u8> {
    let mut raw = Vec::new();
    for (index, field) in record.iter().enumerate() {
        if index > 0 {
            raw.push(b',');
        }
        raw.extend_from_slice(field);
    }
    raw
}

/// What the spreadsheet producer needs; it runs on the blocking pool, since calamine
/// reads synchronously.
struct SheetJob {
    /// The spooled object, rewound.
    file: std::fs::File,
    file_name: String,
    wanted: Option<Vec<String>>,
    /// The checkpoint to continue from (a fresh one for a new run).
    cursor: Checkpoint,
    settings: ImportSettings,
    skip_bad_rows: bool,
    size: u64,
    /// The format found in the content, for the commit's lineage.
    format: Arc<std::sync::OnceLock<SheetFormat>>,
}

/// Reads every planned sheet from the checkpoint's sheet and row on, and sends batches
/// (each within one sheet) down the same pipe as the CSV producer. A final batch
/// without rows carries the checkpoint that names every completed sheet.
fn produce_sheet_batches(job: SheetJob, sender: Pipe) {
    let result = read_sheets(job, &sender);
    let last = match result {
        Ok(true) => Ok(Produced::End),
        // The receiver is gone: the import is being torn down.
        Ok(false) => return,
        Err(error) => Err(error),
    };
    let _ = sender.blocking_send(last);
}

/// Returns `Ok(false)` when the loader went away mid-way.
fn read_sheets(job: SheetJob, sender: &Pipe) -> Result<bool, ImportError> {
    let SheetJob {
        mut file,
        file_name,
        wanted,
        mut cursor,
        settings,
        skip_bad_rows,
        size,
        format,
    } = job;
    let started = Instant::now();
    let found = sheet::inspect(&mut file, &file_name, &settings)?;
    let _ = format.set(found);
    let mut workbook = sheet::Workbook::open(found, file, &file_name)?;
    let plan = workbook.plan(wanted.as_deref(), &file_name)?;
    tracing::info!(
        format = found.name(),
        sheets = plan.len(),
        duration_ms = started.elapsed().as_millis() as u64,
        "spreadsheet opened"
    );
    let mut tree = TreeHasher::from_hex(&cursor.tree_state)
        .map_err(|error| ImportError::Resume(format!("checkpoint tree hash: {error}")))?;
    let sheet_count = plan.len().max(1) as f64;
    for (index, planned) in plan.iter().enumerate().skip(cursor.sheet_index) {
        if index > cursor.sheet_index || cursor.sheet != planned.name {
            if cursor.sheet_records > 0 && cursor.sheet != planned.name {
                return Err(ImportError::Resume(format!(
                    "the checkpoint is in sheet {:?}, but sheet {} of {file_name} is {:?}",
                    cursor.sheet,
                    index + 1,
                    planned.name
                )));
            }
            cursor.sheet_index = index;
            cursor.sheet = planned.name.clone();
            cursor.sheet_records = 0;
            cursor.header = None;
        }
        let mut encoder: Option<sheet::TypedRowEncoder> = None;
        let mut writer = BatchWriter::new(&cursor.commit_id, &cursor.sheet, settings.batch_size);
        let mut rejected: Vec<RejectedRow> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut batch_started = Instant::now();
        let mut json = Vec::with_capacity(512);
        let mut logical_row_id = String::with_capacity(planned.name.len() + 12);
        let mut height = 0u64;
        let mut gone = false;
        let flush = |cursor: &mut Checkpoint,
                     writer: &mut BatchWriter,
                     rejected: &mut Vec<RejectedRow>,
                     tree: &TreeHasher,
                     progress: f64,
                     batch_started: Instant|
         -> bool {
            let full = std::mem::replace(
                writer,
                BatchWriter::new(&cursor.commit_id, &cursor.sheet, settings.batch_size),
            );
            cursor.loaded_rows += full.rows();
            cursor.rejected_rows += rejected.len() as u64;
            cursor.tree_state = tree.to_hex();
            cursor.byte_offset = ((size as f64) * progress / sheet_count) as u64;
            let batch = Batch {
                rows: full.finish(),
                rejected: std::mem::take(rejected),
                checkpoint: cursor.clone(),
                encode_duration: batch_started.elapsed(),
                lookup_duration: Duration::ZERO,
            };
            sender
                .blocking_send(Ok(Produced::Batch(Box::new(batch))))
                .is_ok()
        };
        let mut visit = |event: sheet::SheetEvent<'_>| -> Result<sheet::Flow, SheetError> {
            match event {
                sheet::SheetEvent::Header(header) => {
                    match &cursor.header {
                        Some(known) if known != header => {
                            return Err(SheetError::Read {
                                file: file_name.clone(),
                                sheet: planned.name.clone(),
                                message: "its header differs from the one the run started with"
                                    .to_owned(),
                            })
                        }
                        Some(_) => {}
                        None => cursor.header = Some(header.clone()),
                    }
                    encoder = Some(sheet::TypedRowEncoder::new(header));
                }
                sheet::SheetEvent::Progress {
                    height: declared, ..
                } => height = declared,
                sheet::SheetEvent::Row {
                    n,
                    sheet_row,
                    values,
                } => {
                    if n <= cursor.sheet_records {
                        // Loaded before the resume.
                        return Ok(sheet::Flow::Continue);
                    }
                    cursor.records += 1;
                    cursor.sheet_records = n;
                    match values {
                        Ok(values) => {
                            let encoder = encoder.as_ref().expect("the header comes first");
                            json.clear();
                            encoder.encode(values, &mut json);
                            let row_hash = hash::row_hash(&json);
                            logical_row_id.clear();
                            let _ = write!(logical_row_id, "{}:{n}", cursor.sheet);
                            tree.push(&logical_row_id, &row_hash);
                            writer.push(n, &row_hash, &json);
                            batch_bytes += json.len();
                        }
                        Err(problem) if skip_bad_rows => rejected.push(RejectedRow {
                            line: sheet_row,
                            byte: 0,
                            raw: Vec::new(),
                            problem,
                        }),
                        Err(problem) => {
                            return Err(SheetError::BadRow {
                                file: file_name.clone(),
                                sheet: planned.name.clone(),
                                row: sheet_row,
                                problem,
                            })
                        }
                    }
                    let pending = writer.rows() as usize + rejected.len();
                    if pending >= settings.batch_size || batch_bytes >= MAX_BATCH_BYTES {
                        let within = if height > 0 {
                            (n as f64 / height as f64).min(1.0)
                        } else {
                            0.0
                        };
                        if !flush(
                            &mut cursor,
                            &mut writer,
                            &mut rejected,
                            &tree,
                            index as f64 + within,
                            batch_started,
                        ) {
                            gone = true;
                            return Ok(sheet::Flow::Stop);
                        }
                        batch_bytes = 0;
                        batch_started = Instant::now();
                    }
                }
            }
            Ok(sheet::Flow::Continue)
        };
        workbook.read_sheet(&planned.name, &file_name, &settings, &mut visit)?;
        if gone {
            return Ok(false);
        }
        if writer.rows() > 0 || !rejected.is_empty() {
            let progress = index as f64 + 1.0;
            if !flush(
                &mut cursor,
                &mut writer,
                &mut rejected,
                &tree,
                progress,
                batch_started,
            ) {
                return Ok(false);
            }
        }
        let header = cursor.header.take().unwrap_or_else(|| Header::resolve(&[]));
        cursor.completed_sheets.push(sheet::SheetLineage {
            name: planned.name.clone(),
            visibility: planned.visibility.to_owned(),
            rows: cursor.sheet_records,
            columns: header.columns,
            header_changes: header.changes,
        });
        cursor.sheet_index = index + 1;
        cursor.sheet_records = 0;
        tracing::info!(sheet = %planned.name, rows = cursor.completed_sheets.last().map(|s| s.rows).unwrap_or(0), "sheet read");
    }
    // The last word: a batch without rows whose checkpoint lists every sheet.
    cursor.byte_offset = size;
    let batch = Batch {
        rows: BatchWriter::new(&cursor.commit_id, &cursor.sheet, 0).finish(),
        rejected: Vec::new(),
        checkpoint: cursor,
        encode_duration: Duration::ZERO,
        lookup_duration: Duration::ZERO,
    };
    Ok(sender
        .blocking_send(Ok(Produced::Batch(Box::new(batch))))
        .is_ok())
}

/// The commit's `source` for a spreadsheet: where it came from, its format, and each
/// sheet with its visibility, columns and row count.
fn sheet_lineage(
    parameters: &ImportParameters,
    info: &ObjectInfo,
    format: Option<SheetFormat>,
    checkpoint: &Checkpoint,
) -> serde_json::Value {
    let mut source = serde_json::to_value(&parameters.source).unwrap_or_else(|_| json!({}));
    if let Some(object) = source.as_object_mut() {
        object.insert("etag".into(), json!(info.etag));
        object.insert("version_id".into(), json!(info.version_id));
        object.insert("size".into(), json!(info.size));
        object.insert("format".into(), json!(format.map(SheetFormat::name)));
        object.insert("sheets".into(), json!(checkpoint.completed_sheets));
        if let Some(wanted) = &parameters.sheets {
            object.insert("sheets_requested".into(), json!(wanted));
        }
        object.insert(
            "parser".into(),
            json!(format!(
                "dsa-ingest {} (calamine 0.38)",
                env!("CARGO_PKG_VERSION")
            )),
        );
    }
    source
}
