//! Typed settings read from the environment, with the defaults the README documents.

use std::env;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::db::DatasetName;

/// A setting that is present but cannot be used.
#[derive(Debug, Error)]
#[error("{name}={value:?} is not valid: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl From<crate::policy::PolicyError> for ConfigError {
    fn from(error: crate::policy::PolicyError) -> Self {
        Self {
            name: error.name,
            value: error.value,
            reason: error.reason,
        }
    }
}

/// Everything the process reads from its environment, parsed once at start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// PostgreSQL connection string for the dataset store and the job tables.
    pub database_url: SecretUrl,
    /// How the S3 client finds the object store.
    pub s3: S3Settings,
    /// How one import streams, batches and checkpoints.
    pub import: ImportSettings,
    /// Imports one process runs at once.
    pub parallel_workers: usize,
    /// The broker and the names of everything declared on it.
    pub amqp: AmqpSettings,
    /// Where `consume` and `maintain` serve `/healthz`, `/readyz` and `/metrics`.
    pub metrics_addr: String,
    /// How `submit` uploads local files.
    pub submit: SubmitSettings,
    /// How `maintain` turns a burst of refresh requests into few refreshes.
    pub maintenance: MaintenanceSettings,
    /// `S3_EVENT_DATASET`: the dataset every S3 event record imports into, instead of
    /// the one its key or metadata names.
    pub s3_event_dataset: Option<DatasetName>,
    /// `S3_EVENT_DATASET_FROM_METADATA`: whether an S3 event's object may name its
    /// dataset through its `x-amz-meta-dataset` metadata. Off by default: the uploader
    /// would otherwise choose which dataset's `main` moves.
    pub s3_event_dataset_from_metadata: bool,
    /// `IMPORT_ALLOWED_BUCKETS` and `IMPORT_ALLOW_LOCAL_SOURCES`: what sources the
    /// messages `consume` takes may name.
    pub source_policy: crate::policy::SourcePolicy,
    /// How `watch` lists buckets and what it leaves alone.
    pub watch: WatchSettings,
    /// Where and how `serve` answers HTTP.
    pub http: HttpSettings,
}

/// The knobs of `dsa-ingest serve`.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// `HTTP_ADDR`: where the API, `/healthz`, `/readyz` and `/metrics` are served.
    pub addr: String,
    /// `HTTP_BODY_TIMEOUT_SECONDS`: an upload whose body sends nothing for this long is
    /// cut off, so a stalled client cannot hold an upload slot and a part in memory.
    pub body_timeout: Duration,
    /// `API_TOKENS_FILE`: the TOML file of clients and the hashes of their tokens.
    pub tokens_file: Option<PathBuf>,
    /// `HTTP_REQUESTS_PER_SECOND`: each client's sustained rate of API requests; a
    /// burst of as many is allowed. One client cannot starve the others or the pool.
    pub requests_per_second: u64,
    /// `HTTP_MAX_CONCURRENT_UPLOADS`: each client's uploads at once; every upload holds
    /// a part (8 MiB) in memory and a task until it ends.
    pub max_concurrent_uploads: u64,
}

/// Where `serve` listens when `HTTP_ADDR` is not set.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: DEFAULT_HTTP_ADDR.to_owned(),
            body_timeout: Duration::from_secs(30),
            tokens_file: None,
            requests_per_second: 20,
            max_concurrent_uploads: 4,
        }
    }
}

impl HttpSettings {
    /// Reads `HTTP_ADDR`, `HTTP_BODY_TIMEOUT_SECONDS`, `API_TOKENS_FILE`,
    /// `HTTP_REQUESTS_PER_SECOND` and `HTTP_MAX_CONCURRENT_UPLOADS`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            addr: non_empty("HTTP_ADDR").unwrap_or(defaults.addr),
            body_timeout: Duration::from_secs(positive(
                "HTTP_BODY_TIMEOUT_SECONDS",
                defaults.body_timeout.as_secs(),
            )?),
            tokens_file: non_empty("API_TOKENS_FILE").map(PathBuf::from),
            requests_per_second: positive(
                "HTTP_REQUESTS_PER_SECOND",
                defaults.requests_per_second,
            )?,
            max_concurrent_uploads: positive(
                "HTTP_MAX_CONCURRENT_UPLOADS",
                defaults.max_concurrent_uploads,
            )?,
        })
    }
}

/// The knobs of `dsa-ingest watch`.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// `WATCH_RULES_FILE`: the TOML file of rules, when the command line gives none.
    pub rules_file: Option<PathBuf>,
    /// `WATCH_INTERVAL_SECONDS`: the pause between two listings of every rule.
    pub interval: Duration,
    /// `WATCH_SETTLE_SECONDS`: objects younger than this (by their `LastModified`) are
    /// left for a later listing, so a tool that writes then renames is not caught
    /// halfway.
    pub settle: Duration,
    /// `WATCH_RETENTION_DAYS`: how long the record of an object is kept. An object
    /// still in the bucket after that is recognised by its run's identity instead, so
    /// it is not imported again.
    pub retention: Duration,
    /// `WATCH_IGNORE_PREFIXES`: a key whose name, or any folder below the rule's
    /// prefix, starts with one of these is skipped.
    pub ignore_prefixes: Vec<String>,
    /// `WATCH_IGNORE_SUFFIXES`: a key whose name ends with one of these is skipped.
    pub ignore_suffixes: Vec<String>,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            rules_file: None,
            interval: Duration::from_secs(10),
            settle: Duration::from_secs(5),
            retention: Duration::from_secs(30 * 24 * 3600),
            ignore_prefixes: vec![".".to_owned(), "_".to_owned()],
            ignore_suffixes: vec![
                ".tmp".to_owned(),
                ".part".to_owned(),
                ".crdownload".to_owned(),
            ],
        }
    }
}

impl WatchSettings {
    /// Reads the `WATCH_*` settings.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            rules_file: non_empty("WATCH_RULES_FILE").map(PathBuf::from),
            interval: Duration::from_secs(positive(
                "WATCH_INTERVAL_SECONDS",
                defaults.interval.as_secs(),
            )?),
            settle: Duration::from_secs(whole("WATCH_SETTLE_SECONDS", defaults.settle.as_secs())?),
            retention: Duration::from_secs(
                positive(
                    "WATCH_RETENTION_DAYS",
                    defaults.retention.as_secs() / 86_400,
                )?
                .saturating_mul(86_400),
            ),
            ignore_prefixes: list("WATCH_IGNORE_PREFIXES", defaults.ignore_prefixes),
            ignore_suffixes: list("WATCH_IGNORE_SUFFIXES", defaults.ignore_suffixes),
        })
    }
}

/// The knobs of `dsa-ingest submit`.
#[derive(Clone, Debug)]
pub struct SubmitSettings {
    /// Bytes per multipart upload part, and the memory one upload holds: a part is read
    /// from the file and sent before the next is read. Files up to this size go up in
    /// one `PutObject`.
    pub part_size: u64,
}

/// S3 refuses multipart parts smaller than this, except the last one.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3 refuses parts larger than this.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

impl Default for SubmitSettings {
    fn default() -> Self {
        Self {
            part_size: 16 * 1024 * 1024,
        }
    }
}

/// The knobs of `dsa-ingest maintain`.
#[derive(Clone, Debug)]
pub struct MaintenanceSettings {
    /// After the first request of a burst arrives, how long `maintain` goes on taking
    /// requests before it refreshes once for all of them. Longer windows mean fewer
    /// refreshes under load and a later search index; it also stops taking requests
    /// once the queue has been quiet for a moment, so a lone request waits little.
    pub coalesce_window: Duration,
    /// How often the sweeper looks for abandoned runs (`SWEEPER_INTERVAL_SECONDS`).
    pub sweep_interval: Duration,
    /// How long after its lease expired a running run that nobody claimed is
    /// republished (`SWEEPER_GRACE_SECONDS`): a waiting redelivery claims it within a
    /// second, so a run still unclaimed after this has no message bringing it back.
    pub sweep_grace: Duration,
    /// How long a run may sit unfinished with nobody holding it before the sweeper
    /// fails it and removes its unfinished commit (`SWEEPER_ABANDONED_AFTER_SECONDS`).
    pub abandoned_after: Duration,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        Self {
            coalesce_window: Duration::from_millis(1000),
            sweep_interval: Duration::from_secs(60),
            sweep_grace: Duration::from_secs(300),
            abandoned_after: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl MaintenanceSettings {
    /// Reads `MAINTENANCE_COALESCE_MS` and the `SWEEPER_*` settings.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            coalesce_window: Duration::from_millis(positive(
                "MAINTENANCE_COALESCE_MS",
                defaults.coalesce_window.as_millis() as u64,
            )?),
            sweep_interval: Duration::from_secs(positive(
                "SWEEPER_INTERVAL_SECONDS",
                defaults.sweep_interval.as_secs(),
            )?),
            sweep_grace: Duration::from_secs(positive(
                "SWEEPER_GRACE_SECONDS",
                defaults.sweep_grace.as_secs(),
            )?),
            abandoned_after: Duration::from_secs(positive(
                "SWEEPER_ABANDONED_AFTER_SECONDS",
                defaults.abandoned_after.as_secs(),
            )?),
        })
    }
}

/// The broker connection and the topology `consume`, `maintain` and `submit` declare.
/// Every name is a setting so that several deployments (or tests) can share a broker.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`; the vhost `/` is written `%2f`.
    pub url: SecretUrl,
    /// Direct exchange that import messages are published to.
    pub import_exchange: String,
    /// Quorum queue the import consumers share; bound with `import_routing_key`.
    pub import_queue: String,
    pub import_routing_key: String,
    /// Where the import queue dead-letters messages (fanout exchange and its queue).
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Deliveries of one message before the broker dead-letters it (`x-delivery-limit`).
    pub delivery_limit: u32,
    /// Direct exchange for maintenance requests (the outbox publishes here).
    pub maintenance_exchange: String,
    /// Single-active-consumer queue `maintain` reads.
    pub maintenance_queue: String,
    pub maintenance_routing_key: String,
    /// How long a transient failure is retried in-process before the message is
    /// dead-lettered.
    pub retry_budget: Duration,
    /// Time a shutting-down consumer gives imports in flight to commit their batch.
    pub shutdown_grace: Duration,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::new(DEFAULT_AMQP_URL),
            import_exchange: "dsa.imports".to_owned(),
            import_queue: "dsa.imports".to_owned(),
            import_routing_key: "import".to_owned(),
            dead_letter_exchange: "dsa.imports.dead".to_owned(),
            dead_letter_queue: "dsa.imports.dead".to_owned(),
            delivery_limit: 5,
            maintenance_exchange: "dsa.maintenance".to_owned(),
            maintenance_queue: "dsa.maintenance".to_owned(),
            maintenance_routing_key: "refresh_search_index".to_owned(),
            retry_budget: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The local development broker.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Where health and metrics are served by default.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Where the S3-compatible store is. Credentials come from the standard AWS variables,
/// which the SDK reads itself, so they never pass through our own structs or logs.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// Custom endpoint (Garage, MinIO, LocalStack); `None` means AWS S3 itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// The bucket `submit` uploads to and tests use; imports name their own bucket.
    pub bucket: Option<String>,
}

/// The knobs of the import pipeline.
#[derive(Clone, Debug)]
pub struct ImportSettings {
    /// Rows per batch; one batch is one transaction and one checkpoint.
    pub batch_size: usize,
    /// Batches of one import whose rows are stored at once, each in its own transaction
    /// on its own connection, while the batch before them commits
    /// (`IMPORT_STAGING_BATCHES`, 1 to [`MAX_STAGING_BATCHES`]).
    pub staging_batches: usize,
    /// Bytes per ranged GET.
    pub chunk_size: u64,
    /// Ranged GETs in flight at once for one import.
    pub fetch_concurrency: usize,
    /// Progress is written every this many batches (the checkpoint, every batch).
    pub progress_update_interval: u64,
    /// Objects larger than this fail before a byte of them is read.
    pub max_file_size: u64,
    /// A CSV record longer than this fails the import (an unterminated quote, mostly).
    pub max_record_bytes: u64,
    /// A compressed file that decompresses to more than this fails the import: a
    /// decompression bomb is stopped while it streams (`IMPORT_MAX_DECOMPRESSED_SIZE`).
    pub max_decompressed_size: u64,
    /// How long a claimed run stays ours without a new batch committing.
    pub lease_duration: Duration,
    /// Where spreadsheets are copied before they are read: their readers need to seek,
    /// which a stream of ranged GETs cannot do. Must be local to this process's host.
    pub spool_dir: PathBuf,
    /// The declared uncompressed size of all parts of a zip-based spreadsheet (xlsx,
    /// xlsm, xlsb, ods) together; more is refused before a part is inflated.
    pub max_uncompressed_size: u64,
    /// The largest ratio of a big part's uncompressed to compressed size: real sheets
    /// compress about ten to one, zip bombs a thousand to one.
    pub max_compression_ratio: u64,
    /// The largest shared-strings part (uncompressed), which the reader holds in memory.
    pub max_shared_strings_size: u64,
    /// xls files and ods content are parsed whole in memory; this caps the xls file
    /// and the ods `content.xml` (uncompressed), and through it the cells of a sheet.
    pub max_unstreamed_size: u64,
    /// The widest table accepted: a CSV header, or a sheet by its declared dimension
    /// or its header row (`IMPORT_MAX_COLUMNS`).
    pub max_sheet_columns: u64,
    /// Data rows one sheet may hold (`IMPORT_MAX_SHEET_ROWS`).
    pub max_sheet_rows: u64,
    /// Worksheets one workbook may hold (`IMPORT_MAX_SHEETS`).
    pub max_sheets: u64,
    /// The longest run of empty rows between two data rows of a sheet; more is a
    /// sparse-sheet bomb (two cells, a million rows of nulls) and is refused.
    pub max_empty_rows: u64,
    /// The largest text of one spreadsheet cell, in bytes (CSV has its record limit).
    pub max_cell_bytes: u64,
}

impl Default for ImportSettings {
    fn default() -> Self {
        Self {
            batch_size: 10_000,
            staging_batches: 2,
            chunk_size: 2 * 1024 * 1024,
            fetch_concurrency: 3,
            progress_update_interval: 10,
            max_file_size: 5 * 1024 * 1024 * 1024,
            max_record_bytes: 64 * 1024 * 1024,
            max_decompressed_size: 64 * 1024 * 1024 * 1024,
            lease_duration: Duration::from_secs(60),
            spool_dir: env::temp_dir(),
            max_uncompressed_size: 16 * 1024 * 1024 * 1024,
            max_compression_ratio: 100,
            max_shared_strings_size: 128 * 1024 * 1024,
            max_unstreamed_size: 64 * 1024 * 1024,
            max_sheet_columns: 4096,
            max_sheet_rows: EXCEL_MAX_ROWS,
            max_sheets: 1024,
            max_empty_rows: 65_536,
            max_cell_bytes: 1024 * 1024,
        }
    }
}

impl ImportSettings {
    /// The database connections one import holds at most: its look-up's, one per batch
    /// staging, and the committing batch's (the plan and finalise reuse one of those).
    pub fn connections_per_import(&self) -> u32 {
        self.staging_batches as u32 + 2
    }
}

/// Rows in an Excel worksheet (2^20): the default row limit of a sheet, so any workbook
/// Excel itself can save is read.
pub const EXCEL_MAX_ROWS: u64 = 1_048_576;

/// Where the local development database lives when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/dsa_ingest";

impl Settings {
    /// Reads every setting from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = ImportSettings::default();
        Ok(Self {
            database_url: SecretUrl::new(
                env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned()),
            ),
            s3: S3Settings {
                endpoint: non_empty("S3_ENDPOINT"),
                region: non_empty("S3_REGION").unwrap_or_else(|| "us-east-1".to_owned()),
                bucket: non_empty("S3_BUCKET"),
            },
            parallel_workers: positive("IMPORT_PARALLEL_WORKERS", 4)? as usize,
            amqp: AmqpSettings::from_env()?,
            maintenance: MaintenanceSettings::from_env()?,
            metrics_addr: non_empty("METRICS_ADDR")
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_owned()),
            submit: SubmitSettings {
                part_size: part_size()?,
            },
            s3_event_dataset: match non_empty("S3_EVENT_DATASET") {
                Some(name) => {
                    Some(
                        DatasetName::parse(name.trim()).map_err(|error| ConfigError {
                            name: "S3_EVENT_DATASET",
                            value: name.clone(),
                            reason: error.to_string(),
                        })?,
                    )
                }
                None => None,
            },
            s3_event_dataset_from_metadata: flag("S3_EVENT_DATASET_FROM_METADATA")?,
            source_policy: crate::policy::SourcePolicy::from_env()?,
            watch: WatchSettings::from_env()?,
            http: HttpSettings::from_env()?,
            import: ImportSettings {
                batch_size: positive("IMPORT_BATCH_SIZE", defaults.batch_size as u64)? as usize,
                staging_batches: staging_batches(defaults.staging_batches)?,
                chunk_size: positive("IMPORT_CHUNK_SIZE", defaults.chunk_size)?,
                fetch_concurrency: positive(
                    "IMPORT_FETCH_CONCURRENCY",
                    defaults.fetch_concurrency as u64,
                )? as usize,
                progress_update_interval: positive(
                    "IMPORT_PROGRESS_UPDATE_INTERVAL",
                    defaults.progress_update_interval,
                )?,
                max_file_size: positive("IMPORT_MAX_FILE_SIZE", defaults.max_file_size)?,
                max_record_bytes: positive("IMPORT_MAX_RECORD_BYTES", defaults.max_record_bytes)?,
                max_decompressed_size: positive(
                    "IMPORT_MAX_DECOMPRESSED_SIZE",
                    defaults.max_decompressed_size,
                )?,
                lease_duration: Duration::from_secs(positive(
                    "IMPORT_LEASE_SECONDS",
                    defaults.lease_duration.as_secs(),
                )?),
                spool_dir: non_empty("IMPORT_SPOOL_DIR")
                    .map(PathBuf::from)
                    .unwrap_or(defaults.spool_dir),
                max_uncompressed_size: positive(
                    "IMPORT_MAX_UNCOMPRESSED_SIZE",
                    defaults.max_uncompressed_size,
                )?,
                max_compression_ratio: positive(
                    "IMPORT_MAX_COMPRESSION_RATIO",
                    defaults.max_compression_ratio,
                )?,
                max_shared_strings_size: positive(
                    "IMPORT_MAX_SHARED_STRINGS_SIZE",
                    defaults.max_shared_strings_size,
                )?,
                max_unstreamed_size: positive(
                    "IMPORT_MAX_UNSTREAMED_SIZE",
                    defaults.max_unstreamed_size,
                )?,
                max_sheet_columns: positive_aliased(
                    "IMPORT_MAX_COLUMNS",
                    "IMPORT_MAX_SHEET_COLUMNS",
                    defaults.max_sheet_columns,
                )?,
                max_sheet_rows: positive("IMPORT_MAX_SHEET_ROWS", defaults.max_sheet_rows)?,
                max_sheets: positive("IMPORT_MAX_SHEETS", defaults.max_sheets)?,
                max_empty_rows: positive("IMPORT_MAX_EMPTY_ROWS", defaults.max_empty_rows)?,
                max_cell_bytes: positive("IMPORT_MAX_CELL_BYTES", defaults.max_cell_bytes)?,
            },
        })
    }
}

impl AmqpSettings {
    /// Reads the `AMQP_*` variables, each falling back to its default.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let name = |variable: &str, default: String| non_empty(variable).unwrap_or(default);
        Ok(Self {
            url: SecretUrl::new(name("AMQP_URL", defaults.url.expose().to_owned())),
            import_exchange: name("AMQP_IMPORT_EXCHANGE", defaults.import_exchange),
            import_queue: name("AMQP_IMPORT_QUEUE", defaults.import_queue),
            import_routing_key: name("AMQP_IMPORT_ROUTING_KEY", defaults.import_routing_key),
            dead_letter_exchange: name("AMQP_DEAD_LETTER_EXCHANGE", defaults.dead_letter_exchange),
            dead_letter_queue: name("AMQP_DEAD_LETTER_QUEUE", defaults.dead_letter_queue),
            delivery_limit: positive("AMQP_DELIVERY_LIMIT", defaults.delivery_limit as u64)?
                .min(u32::MAX as u64) as u32,
            maintenance_exchange: name("AMQP_MAINTENANCE_EXCHANGE", defaults.maintenance_exchange),
            maintenance_queue: name("AMQP_MAINTENANCE_QUEUE", defaults.maintenance_queue),
            maintenance_routing_key: name(
                "AMQP_MAINTENANCE_ROUTING_KEY",
                defaults.maintenance_routing_key,
            ),
            retry_budget: Duration::from_secs(positive(
                "AMQP_RETRY_SECONDS",
                defaults.retry_budget.as_secs(),
            )?),
            shutdown_grace: Duration::from_secs(positive(
                "SHUTDOWN_GRACE_SECONDS",
                defaults.shutdown_grace.as_secs(),
            )?),
        })
    }
}

/// `SUBMIT_PART_SIZE`, within the part sizes S3 accepts.
fn part_size() -> Result<u64, ConfigError> {
    let size = positive("SUBMIT_PART_SIZE", SubmitSettings::default().part_size)?;
    if (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(ConfigError {
            name: "SUBMIT_PART_SIZE",
            value: size.to_string(),
            reason: format!(
                "S3 accepts parts of {MIN_PART_SIZE} (5 MiB) to {MAX_PART_SIZE} (5 GiB) bytes"
            ),
        })
    }
}

/// The most batches one import may stage at once: each holds a connection and a
/// batch's rows in memory.
pub const MAX_STAGING_BATCHES: usize = 4;

fn staging_batches(default: usize) -> Result<usize, ConfigError> {
    let staging = positive("IMPORT_STAGING_BATCHES", default as u64)?;
    if staging <= MAX_STAGING_BATCHES as u64 {
        Ok(staging as usize)
    } else {
        Err(ConfigError {
            name: "IMPORT_STAGING_BATCHES",
            value: staging.to_string(),
            reason: format!("expected 1 to {MAX_STAGING_BATCHES}"),
        })
    }
}

/// A boolean setting: `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`; unset is false.
fn flag(name: &'static str) -> Result<bool, ConfigError> {
    let Some(value) = non_empty(name) else {
        return Ok(false);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError {
            name,
            value,
            reason: "expected true or false".to_owned(),
        }),
    }
}

fn non_empty(name: &str) -> Option<String> {
    env::var(name).ok().filter(|value| !value.trim().is_empty())
}

/// `name`, or when it is unset its older name `alias` (kept so existing deployments
/// keep their setting).
fn positive_aliased(
    name: &'static str,
    alias: &'static str,
    default: u64,
) -> Result<u64, ConfigError> {
    match non_empty(name) {
        Some(_) => positive(name, default),
        None => positive(alias, default),
    }
}

/// A comma-separated list; set but empty means an empty list (unset: the default).
fn list(name: &str, default: Vec<String>) -> Vec<String> {
    match env::var(name) {
        Ok(value) => value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => default,
    }
}

/// A whole number, zero allowed.
fn whole(name: &'static str, default: u64) -> Result<u64, ConfigError> {
    let Some(value) = non_empty(name) else {
        return Ok(default);
    };
    value.trim().parse::<u64>().map_err(|_| ConfigError {
        name,
        value,
        reason: "expected a whole number".to_owned(),
    })
}

fn positive(name: &'static str, default: u64) -> Result<u64, ConfigError> {
    let Some(value) = non_empty(name) else {
        return Ok(default);
    };
    match value.trim().parse::<u64>() {
        Ok(parsed) if parsed > 0 => Ok(parsed),
        _ => Err(ConfigError {
            name,
            value,
            reason: "expected a whole number greater than zero".to_owned(),
        }),
    }
}
/// A connection URL that may carry a password. `Debug` and `Display` show it redacted,
/// so settings can be logged and errors can name the server; only [`SecretUrl::expose`]
/// gives the real text, to the one call that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the client that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", redact_url(&self.0))
    }
}

/// Query parameters whose values are credentials (libpq's `password` and
/// `sslpassword`, and the names other clients use).
const SECRET_QUERY_KEYS: &[&str] = &[
    "password",
    "sslpassword",
    "pass",
    "passwd",
    "pwd",
    "secret",
    "token",
    "access_token",
    "auth",
];

/// A connection URL without its secrets, for logs and errors: the password of the
/// user info (`amqp://user:***@host/vhost`) and the values of query parameters that
/// carry credentials (`?password=***`).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &base[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _))
                    if SECRET_QUERY_KEYS.contains(&key.to_ascii_lowercase().as_str()) =>
                {
                    format!("{key}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_in_user_info_and_query() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(
            redact_url("postgres://app@db/dsa?sslmode=require&password=hunter2&PassWord=x"),
            "postgres://app@db/dsa?sslmode=require&password=***&PassWord=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@db/dsa?sslpassword=k"),
            "postgres://u:***@db/dsa?sslpassword=***"
        );
    }

    #[test]
    fn a_secret_url_never_prints_its_password() {
        let url = SecretUrl::new("postgres://u:hunter2@db/dsa?password=hunter2");
        assert!(!format!("{url}").contains("hunter2"));
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(url.expose(), "postgres://u:hunter2@db/dsa?password=hunter2");
    }
}
