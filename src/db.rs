//! The PostgreSQL edge: the pool, the migrations, and dataset look-ups.

use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres, Transaction};
use thiserror::Error;

/// The statement that lets one ordered read of a whole version (finalise's tree hash,
/// `export`, `verify`, `gc`) sort a 1M-row commit in the server's memory rather than
/// on its disk. It applies to the transaction that runs it only.
pub const SET_SORT_MEMORY: &str = "SET LOCAL work_mem = '256MB'";

/// The schema, embedded in the binary so `dsa-ingest migrate` needs no files beside it.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens a small pool; an import holds up to three connections (see `import::load`).
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = database_url.parse()?;
    // Statement logging at INFO would print every batch's SQL; keep it for debugging.
    let options = options
        .application_name(&application_name())
        .log_statements(log::LevelFilter::Debug)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(10));
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .after_release(outside_transaction)
        .connect_with(options)
        .await
}

/// Whether a connection given back to the pool is outside any transaction, so that the
/// next caller's statements commit on their own.
///
/// A task dropped between sending BEGIN and reading its answer (an import torn down
/// while it opens a batch) leaves the server in a transaction that the driver does not
/// know about, and rolls nothing back. The connection's next user would then write
/// inside it, unseen by everyone else and lost when the connection closes: a run
/// created that way "did not exist" for the claim that followed. Such a connection is
/// closed instead of reused. The check is a simple query, in which `now()` (the
/// transaction's start) equals `statement_timestamp()` unless a transaction block was
/// open before it.
fn outside_transaction(
    conn: &mut sqlx::PgConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> futures::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        use sqlx::{Executor, Row};
        // A bare string runs as a simple query, which starts its own transaction when
        // no block is open.
        let row = conn
            .fetch_one("SELECT now() = statement_timestamp()")
            .await?;
        let outside: bool = row.try_get(0)?;
        if !outside {
            tracing::warn!("a pooled connection came back inside a transaction; closing it");
        }
        Ok(outside)
    })
}

/// The `application_name` of this process's connections: its worker identity (what
/// a lease names), so that a worker taking a run over can end the transactions a
/// frozen predecessor left open (see `runs::claim`). PostgreSQL keeps 63 bytes.
pub fn application_name() -> String {
    let mut name = crate::process::worker_identity();
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Takes a connection from the pool, recording the wait in
/// `dsa_db_pool_acquire_duration_seconds`. Used where a connection is held for a while
/// (an import's, a transaction's), which is where a busy pool makes callers wait.
pub async fn acquire(pool: &PgPool) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    let started = Instant::now();
    let connection = pool.acquire().await;
    crate::metrics::metrics().observe_pool_acquire(started.elapsed());
    connection
}

/// Begins a transaction on a pooled connection, recording the wait for the connection
/// as [`acquire`] does.
///
/// Always READ COMMITTED, whatever `default_transaction_isolation` the server or role
/// has: the fence between gc and import batches (ARCHITECTURE.md, "gc and imports in
/// flight") needs each statement after an advisory lock to see what committed while
/// it waited for the lock, which a snapshot taken at the lock statement would not.
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    Transaction::begin(
        acquire(pool).await?,
        Some("BEGIN ISOLATION LEVEL READ COMMITTED".into()),
    )
    .await
}

/// A pool of one connection, opened on first use, for health probes: it never
/// competes with imports for the main pool, and a probe that cannot get it within the
/// readiness timeout reports the database as down.
pub fn probe_pool(database_url: &str) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = database_url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options.log_statements(log::LevelFilter::Trace)))
}

/// Whether trying again later may succeed: the connection or the server was away or
/// overloaded, or the transaction lost a race (SQLSTATE classes 08, 40, 53, 57, 58).
/// Anything else (a constraint, bad data) fails the same way every time.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

/// Applies the migrations that are not yet applied; safe to run again and concurrently
/// (sqlx holds an advisory lock while it migrates).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Fails with a message that says what to do when the schema is missing or older than
/// this binary, instead of letting the first query fail on a missing table.
pub async fn check_schema(pool: &PgPool) -> Result<(), SchemaError> {
    let latest = MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .max()
        .unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .or_else(|error| match &error {
                // undefined_table: never migrated.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                _ => Err(error),
            })?;
    if applied.unwrap_or(0) < latest {
        return Err(SchemaError::NotMigrated);
    }
    Ok(())
}

#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("the database schema is missing or older than this binary: run `dsa-ingest migrate`")]
    NotMigrated,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("dataset name {0:?} is not valid: use 1 to 200 characters, no control characters")]
    InvalidName(String),
    #[error("dataset {0:?} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A dataset name that is safe to store, print and put in a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetName(String);

impl DatasetName {
    pub fn parse(name: &str) -> Result<Self, DatasetError> {
        let valid = !name.trim().is_empty()
            && name.chars().count() <= 200
            && !name.chars().any(char::is_control);
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(DatasetError::InvalidName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Creates the dataset unless it exists; returns its id and whether it was created.
pub async fn ensure_dataset(
    pool: &PgPool,
    name: &DatasetName,
    description: Option<&str>,
) -> Result<(i64, bool), DatasetError> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO dsa_core.datasets (name, description) VALUES ($1, $2)
         ON CONFLICT (name) DO NOTHING RETURNING id",
    )
    .bind(name.as_str())
    .bind(description)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = inserted {
        return Ok((id, true));
    }
    let id = find_dataset(pool, name).await?;
    Ok((id, false))
}

pub async fn find_dataset(pool: &PgPool, name: &DatasetName) -> Result<i64, DatasetError> {
    sqlx::query_scalar("SELECT id FROM dsa_core.datasets WHERE name = $1")
        .bind(name.as_str())
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| DatasetError::NotFound(name.as_str().to_owned()))
}
