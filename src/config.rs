//! Typed settings read from the environment, with the defaults the README documents.

use std::env;
use std::time::Duration;

use thiserror::Error;

/// A setting that is present but cannot be used.
#[derive(Debug, Error)]
#[error("{name}={value:?} is not valid: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// Everything the process reads from its environment, parsed once at start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// PostgreSQL connection string for the dataset store and the job tables.
    pub database_url: String,
    /// How the S3 client finds the object store.
    pub s3: S3Settings,
    /// How one import streams, batches and checkpoints.
    pub import: ImportSettings,
    /// Imports one process runs at once.
    pub parallel_workers: usize,
}

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
    /// How long a claimed run stays ours without a new batch committing.
    pub lease_duration: Duration,
}

impl Default for ImportSettings {
    fn default() -> Self {
        Self {
            batch_size: 10_000,
            chunk_size: 4 * 1024 * 1024,
            fetch_concurrency: 3,
            progress_update_interval: 10,
            max_file_size: 5 * 1024 * 1024 * 1024,
            max_record_bytes: 64 * 1024 * 1024,
            lease_duration: Duration::from_secs(60),
        }
    }
}

/// Where the local development database lives when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/dsa_ingest";

impl Settings {
    /// Reads every setting from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = ImportSettings::default();
        Ok(Self {
            database_url: env::var("DATABASE_URL")
                .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned()),
            s3: S3Settings {
                endpoint: non_empty("S3_ENDPOINT"),
                region: non_empty("S3_REGION").unwrap_or_else(|| "us-east-1".to_owned()),
                bucket: non_empty("S3_BUCKET"),
            },
            parallel_workers: positive("IMPORT_PARALLEL_WORKERS", 4)? as usize,
            import: ImportSettings {
                batch_size: positive("IMPORT_BATCH_SIZE", defaults.batch_size as u64)? as usize,
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
                lease_duration: Duration::from_secs(positive(
                    "IMPORT_LEASE_SECONDS",
                    defaults.lease_duration.as_secs(),
                )?),
            },
        })
    }
}

fn non_empty(name: &str) -> Option<String> {
    env::var(name).ok().filter(|value| !value.trim().is_empty())
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
