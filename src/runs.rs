//! Every statement on `dsa_jobs.analysis_runs`: create a run, claim it under a lease with
//! a fencing token (the pipeline's `claim` stage), release, park or fail it, and read its
//! status.
//!
//! Every batch transaction re-checks the token it claimed (see `load`), so a worker that
//! lost its lease, however slowly it notices, can never write into a run another worker
//! has taken over: the lease decides who may work, the token decides whose writes count.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use thiserror::Error;
use uuid::Uuid;

use crate::db::{self, DatasetError, DatasetName};
use crate::import::run::{Checkpoint, ImportParameters, Lease, Progress};
use crate::process::owner_is_dead_local_process;

/// A run this worker now holds.
#[derive(Clone, Debug)]
pub struct ClaimedRun {
    pub lease: Lease,
    pub dataset_id: i64,
    pub parameters: ImportParameters,
    pub checkpoint: Option<Checkpoint>,
    pub attempts: i32,
    /// Who asked for the run; recorded as the commit's author.
    pub user_id: Option<String>,
}

#[derive(Debug, Error)]
pub enum ClaimError {
    #[error("run {0} does not exist")]
    NotFound(Uuid),
    #[error("run {run_id} is already {status}; nothing to do")]
    Finished { run_id: Uuid, status: String },
    #[error("run {run_id} is being imported by {owner} (lease until {until}); try again later")]
    Held {
        run_id: Uuid,
        owner: String,
        until: DateTime<Utc>,
    },
    #[error("run {run_id} has parameters this version cannot read: {message}")]
    BadParameters { run_id: Uuid, message: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Creates a pending import run for a dataset.
pub async fn create_import_run(
    pool: &PgPool,
    dataset_id: i64,
    user_id: Option<&str>,
    parameters: &ImportParameters,
) -> Result<Uuid, sqlx::Error> {
    let run_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO dsa_jobs.analysis_runs (id, run_type, status, dataset_id, user_id, run_parameters)
         VALUES ($1, 'import', 'pending', $2, $3, $4)",
    )
    .bind(run_id)
    .bind(dataset_id)
    .bind(user_id)
    .bind(sqlx::types::Json(parameters))
    .execute(pool)
    .await?;
    Ok(run_id)
}

/// Creates the dataset when missing and a pending run importing `parameters.source`
/// into it; returns the run and the dataset.
pub async fn create_for_dataset(
    pool: &PgPool,
    dataset: &DatasetName,
    user_id: Option<&str>,
    parameters: &ImportParameters,
) -> Result<(Uuid, i64), DatasetError> {
    let (dataset_id, _) = db::ensure_dataset(pool, dataset, None).await?;
    let run_id = create_import_run(pool, dataset_id, user_id, parameters).await?;
    Ok((run_id, dataset_id))
}

/// lease_token, dataset_id, run_parameters, checkpoint, attempts, user_id.
type ClaimedColumns = (
    i64,
    i64,
    Json<serde_json::Value>,
    Option<Json<serde_json::Value>>,
    i32,
    Option<String>,
);

/// status, lease_owner, whether the lease is live, lease_expires_at.
type RunLease = (String, Option<String>, bool, Option<DateTime<Utc>>);

/// Takes the run if it is pending, or running under a lease that expired or whose
/// holder is a dead process on this host; increments the fencing token.
pub async fn claim(
    pool: &PgPool,
    run_id: Uuid,
    owner: &str,
    duration: std::time::Duration,
) -> Result<ClaimedRun, ClaimError> {
    let current: Option<RunLease> = sqlx::query_as(
        "SELECT status::text, lease_owner, coalesce(lease_expires_at > now(), false),
                lease_expires_at
           FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    let Some((status, holder, live, expired_at)) = current else {
        return Err(ClaimError::NotFound(run_id));
    };
    if !matches!(status.as_str(), "pending" | "running") {
        return Err(ClaimError::Finished { run_id, status });
    }
    let takeover = holder
        .as_deref()
        .filter(|holder| live && owner_is_dead_local_process(holder));

    // A predecessor frozen between its checkpoint's UPDATE and its COMMIT holds the
    // run's row lock for as long as it stays frozen, and the UPDATE below would wait
    // on it forever. So the UPDATE waits a little; when the lease it would take over
    // has run out, that holder's old transactions are ended (as after a takeover) and
    // the UPDATE waits again, now for nothing a frozen process holds.
    let previous_expired = holder
        .as_deref()
        .filter(|previous| *previous != owner && !live)
        .zip(expired_at);
    let claimed = match take_lease(pool, run_id, owner, duration, takeover, true).await {
        Err(error) if is_lock_timeout(&error) => {
            if let Some((previous, expired_at)) = previous_expired {
                let ended = end_transactions_of(pool, previous, expired_at).await?;
                tracing::warn!(run.id = %run_id, previous, ended, "ended the open transactions of the worker whose lease ran out, which held the run's row");
            }
            take_lease(pool, run_id, owner, duration, takeover, false).await?
        }
        other => other?,
    };

    let Some((token, dataset_id, parameters, checkpoint, attempts, user_id)) = claimed else {
        // Someone else moved the run between our read and our update; report who.
        let (status, holder, until): (String, Option<String>, Option<DateTime<Utc>>) =
            sqlx::query_as(
                "SELECT status::text, lease_owner, lease_expires_at
                   FROM dsa_jobs.analysis_runs WHERE id = $1",
            )
            .bind(run_id)
            .fetch_one(pool)
            .await?;
        return Err(match (status.as_str(), holder, until) {
            ("pending" | "running", Some(owner), Some(until)) => ClaimError::Held {
                run_id,
                owner,
                until,
            },
            _ => ClaimError::Finished { run_id, status },
        });
    };

    // Taken over from another worker whose lease ran out: that worker may be frozen
    // (SIGSTOP, a VM pause) in the middle of a batch transaction, whose locks and
    // uncommitted rows would block ours until it wakes. Its writes could never count
    // (fencing), so its open work on this database is ended now.
    // A released lease names no holder (see `release`): only a holder that stopped
    // answering is ended, and of its work only the transactions it opened before its
    // lease ran out, which a live worker would have finished long since.
    if let (Some(previous), Some(expired_at)) = (
        holder.as_deref().filter(|previous| *previous != owner),
        expired_at,
    ) {
        match end_transactions_of(pool, previous, expired_at).await {
            Ok(0) => {}
            Ok(ended) => {
                tracing::warn!(run.id = %run_id, previous, ended, "ended the open transactions of the worker whose lease ran out")
            }
            Err(error) => {
                tracing::warn!(run.id = %run_id, previous, error = %error, "could not end the previous worker's transactions")
            }
        }
    }

    let parsed = serde_json::from_value::<ImportParameters>(parameters.0)
        .map_err(|error| error.to_string())
        .and_then(|parameters| {
            let checkpoint = checkpoint
                .map(|json| serde_json::from_value::<Checkpoint>(json.0))
                .transpose()
                .map_err(|error| format!("checkpoint: {error}"))?;
            Ok((parameters, checkpoint))
        });
    let (parameters, checkpoint) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => {
            // Claimed but unreadable: fail it now, or every attempt would claim it again.
            let error = ClaimError::BadParameters { run_id, message };
            fail_run(pool, run_id, Some(token), &error.to_string()).await?;
            return Err(error);
        }
    };
    Ok(ClaimedRun {
        lease: Lease {
            run_id,
            token,
            owner: owner.to_owned(),
            duration,
        },
        dataset_id,
        parameters,
        checkpoint,
        attempts,
        user_id,
    })
}

/// How long a claim waits for the run's row before looking at who holds it.
const CLAIM_LOCK_WAIT: &str = "2s";

/// The claim's UPDATE: takes the lease when the run is unfinished and its lease is
/// free, expired, or held by `takeover` (a dead process on this host). With
/// `bounded`, gives up after [`CLAIM_LOCK_WAIT`] when another transaction holds the
/// row (see [`is_lock_timeout`]).
async fn take_lease(
    pool: &PgPool,
    run_id: Uuid,
    owner: &str,
    duration: std::time::Duration,
    takeover: Option<&str>,
    bounded: bool,
) -> Result<Option<ClaimedColumns>, sqlx::Error> {
    let mut tx = db::begin(pool).await?;
    if bounded {
        sqlx::query(&format!("SET LOCAL lock_timeout = '{CLAIM_LOCK_WAIT}'"))
            .execute(&mut *tx)
            .await?;
    }
    let claimed = sqlx::query_as(
        "UPDATE dsa_jobs.analysis_runs
                SET status = 'running',
                    lease_owner = $2,
                    lease_token = lease_token + 1,
                    lease_expires_at = now() + make_interval(secs => $3),
                    attempts = attempts + 1,
                    started_at = coalesce(started_at, now())
              WHERE id = $1
                AND status IN ('pending', 'running')
                AND (lease_expires_at IS NULL OR lease_expires_at <= now() OR lease_owner = $4)
              RETURNING lease_token, dataset_id, run_parameters, checkpoint, attempts, user_id",
    )
    .bind(run_id)
    .bind(owner)
    .bind(duration.as_secs_f64())
    .bind(takeover)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(claimed)
}

/// PostgreSQL's `lock_not_available`: a `lock_timeout` ran out.
fn is_lock_timeout(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "55P03")
}

/// Extends the lease by its duration from now, if it is still ours (same token) and
/// the run is still running; `false` when it is not, which the next batch's fencing
/// will find too.
pub async fn renew_lease(pool: &PgPool, lease: &Lease) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET lease_expires_at = now() + make_interval(secs => $3)
          WHERE id = $1 AND lease_token = $2 AND status = 'running'",
    )
    .bind(lease.run_id)
    .bind(lease.token)
    .bind(lease.duration.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Renews the lease every third of its duration for as long as the returned handle
/// lives, so spooling a large spreadsheet or one slow batch never makes a live run
/// claimable. The timer stops by itself once the lease is no longer ours; fencing by
/// token still guards every write, this only keeps a live worker from being replaced.
pub fn keep_lease_alive(pool: PgPool, lease: Lease) -> tokio_util::task::AbortOnDropHandle<()> {
    let period = (lease.duration / 3).max(std::time::Duration::from_millis(500));
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the claim itself just set the lease
        loop {
            ticks.tick().await;
            match renew_lease(&pool, &lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(run.id = %lease.run_id, "the lease is no longer ours; no more renewals");
                    return;
                }
                // A database that does not answer now may answer at the next tick,
                // still within the lease.
                Err(error) => {
                    tracing::warn!(run.id = %lease.run_id, error = %error, "could not renew the lease")
                }
            }
        }
    }))
}

/// Terminates the connections `owner` holds on this database (matched by the
/// `application_name` every pool sets to its worker identity) whose transaction has
/// been open since before `since`; returns how many.
async fn end_transactions_of(
    pool: &PgPool,
    owner: &str,
    since: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    // The candidates are chosen first, in a materialized step: in one WHERE clause the
    // planner may call pg_terminate_backend before the other conditions have ruled a
    // backend out, and end connections of other databases and processes.
    sqlx::query_scalar(
        "WITH candidates AS MATERIALIZED (
             SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = left($1, 63)
                AND pid <> pg_backend_pid() AND state <> 'idle' AND xact_start < $2
         )
         SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM candidates",
    )
    .bind(owner)
    .bind(since)
    .fetch_one(pool)
    .await
}

/// Gives up the lease without ending the run, so a retry (here or in another process)
/// can claim it at once and resume from its checkpoint. `note` says why, for `status`.
pub async fn release(
    pool: &PgPool,
    run_id: Uuid,
    lease_token: i64,
    note: &str,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET lease_expires_at = now(), lease_owner = NULL, error_message = $3
          WHERE id = $1 AND lease_token = $2 AND status = 'running'",
    )
    .bind(run_id)
    .bind(lease_token)
    .bind(note)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// The batches a run's checkpoint counts as committed (0 before the first), as a SQL
/// expression over `dsa_jobs.analysis_runs`, for `concat!`: the one count that the
/// loader's checkpoint, finalise and the command line's retry compare.
macro_rules! committed_batches_sql {
    () => {
        "coalesce((checkpoint->>'batches')::bigint, 0)"
    };
}
pub(crate) use committed_batches_sql;

/// How many batches the run has committed, from its checkpoint (0 before the first).
pub async fn committed_batches(pool: &PgPool, run_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(concat!(
        "SELECT ",
        committed_batches_sql!(),
        " FROM dsa_jobs.analysis_runs WHERE id = $1"
    ))
    .bind(run_id)
    .fetch_one(pool)
    .await
}

/// Puts a run that could not finish back to `pending` with a note, so it waits for a
/// replayed message instead of looking busy (used when retries run out).
pub async fn park(pool: &PgPool, run_id: Uuid, note: &str) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'pending', error_message = $2, lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $1 AND status IN ('pending', 'running')
            AND (lease_expires_at IS NULL OR lease_expires_at <= now())",
    )
    .bind(run_id)
    .bind(note)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Marks a run failed with a message a person can act on, and drops its unfinished
/// commit (the rows it stored stay: they are shared, content-addressed, and harmless).
/// With a lease, only the holder's failure counts; without, any unfinished run is failed.
pub async fn fail_run(
    pool: &PgPool,
    run_id: Uuid,
    lease_token: Option<i64>,
    message: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = db::begin(pool).await?;
    let updated = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'failed', error_message = $2, completed_at = now(),
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $1 AND status IN ('pending', 'running')
            AND ($3::bigint IS NULL OR lease_token = $3)",
    )
    .bind(run_id)
    .bind(message)
    .bind(lease_token)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 1 {
        delete_unfinished_commit(&mut tx, run_id).await?;
    }
    tx.commit().await?;
    Ok(updated == 1)
}

/// Removes the run's unfinished commit and its commit_rows (the rows it stored stay:
/// they are shared, content-addressed, and `gc` removes those nothing references).
async fn delete_unfinished_commit(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    run_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM dsa_core.commit_rows WHERE commit_id IN
           (SELECT commit_id FROM dsa_core.commits WHERE run_id = $1 AND committed_at IS NULL)",
    )
    .bind(run_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM dsa_core.commits WHERE run_id = $1 AND committed_at IS NULL")
        .bind(run_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What the sweeper in `maintain` looks for
// ---------------------------------------------------------------------------------------

/// Running imports from the object store whose lease expired more than `grace` ago
/// (and less than `abandoned_after`), with their lease token: nobody claimed them
/// since, so no delivery is waiting for them.
pub async fn expired_unclaimed(
    pool: &PgPool,
    grace: std::time::Duration,
    abandoned_after: std::time::Duration,
) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, lease_token FROM dsa_jobs.analysis_runs
          WHERE run_type = 'import' AND status = 'running'
            AND lease_expires_at < now() - make_interval(secs => $1)
            AND lease_expires_at >= now() - make_interval(secs => $2)
            AND run_parameters->'source'->>'kind' = 's3'
          ORDER BY lease_expires_at
          LIMIT 1000",
    )
    .bind(grace.as_secs_f64())
    .bind(abandoned_after.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Unfinished imports nobody has held for longer than `abandoned_after`: their lease
/// (or, never claimed, their creation) is that old.
pub async fn abandoned(
    pool: &PgPool,
    abandoned_after: std::time::Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM dsa_jobs.analysis_runs
          WHERE run_type = 'import' AND status IN ('pending', 'running')
            AND coalesce(lease_expires_at, created_at) < now() - make_interval(secs => $1)
          LIMIT 1000",
    )
    .bind(abandoned_after.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Fails an abandoned run and removes its unfinished commit and commit_rows, in one
/// transaction, if it is still abandoned (a worker that claimed it meanwhile wins).
pub async fn fail_abandoned(
    pool: &PgPool,
    run_id: Uuid,
    abandoned_after: std::time::Duration,
    message: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = db::begin(pool).await?;
    let updated = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'failed', error_message = $2, completed_at = now(),
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = $1 AND status IN ('pending', 'running')
            AND coalesce(lease_expires_at, created_at) < now() - make_interval(secs => $3)",
    )
    .bind(run_id)
    .bind(message)
    .bind(abandoned_after.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 1 {
        delete_unfinished_commit(&mut tx, run_id).await?;
    }
    tx.commit().await?;
    Ok(updated == 1)
}

/// The run created for an idempotency key, if any.
pub async fn run_by_key(pool: &PgPool, key: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM dsa_jobs.analysis_runs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
}

/// Creates the run for `key`, or returns the one a concurrent delivery created first.
pub async fn create_keyed_run(
    pool: &PgPool,
    dataset_id: Option<i64>,
    user_id: Option<&str>,
    parameters: &ImportParameters,
    key: &str,
) -> Result<Uuid, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let (run_id, _) = create_keyed_run_in(&mut conn, dataset_id, user_id, parameters, key).await?;
    Ok(run_id)
}

/// [`create_keyed_run`] on the caller's connection, so the run can be created in the
/// same transaction as what must follow it (`watch` queues its message through the
/// outbox there). Also says whether this call created the run: `false` when a run
/// with the key existed already (or another transaction committed one meanwhile,
/// which the insert waits for).
pub async fn create_keyed_run_in(
    conn: &mut PgConnection,
    dataset_id: Option<i64>,
    user_id: Option<&str>,
    parameters: &ImportParameters,
    key: &str,
) -> Result<(Uuid, bool), sqlx::Error> {
    let created: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO dsa_jobs.analysis_runs
                (id, run_type, status, dataset_id, user_id, run_parameters, idempotency_key)
         VALUES ($1, 'import', 'pending', $2, $3, $4, $5)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(dataset_id)
    .bind(user_id)
    .bind(sqlx::types::Json(parameters))
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    match created {
        Some(run_id) => Ok((run_id, true)),
        None => {
            let run_id = sqlx::query_scalar(
                "SELECT id FROM dsa_jobs.analysis_runs WHERE idempotency_key = $1",
            )
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
            Ok((run_id, false))
        }
    }
}

/// Whether a run with this id exists.
pub async fn exists(pool: &PgPool, run_id: Uuid) -> Result<bool, sqlx::Error> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM dsa_jobs.analysis_runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(pool)
            .await?;
    Ok(found.is_some())
}

/// The parameters of a run that is not finished yet; `None` for a finished or missing
/// run, or one whose parameters this version cannot read (claiming it fails it).
pub async fn unfinished_parameters(
    pool: &PgPool,
    run_id: Uuid,
) -> Result<Option<ImportParameters>, sqlx::Error> {
    let parameters: Option<Json<serde_json::Value>> = sqlx::query_scalar(
        "SELECT run_parameters FROM dsa_jobs.analysis_runs
          WHERE id = $1 AND status IN ('pending', 'running')",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    Ok(parameters.and_then(|json| serde_json::from_value(json.0).ok()))
}

/// Whether the run is unfinished and its lease is still live (someone is working on it).
pub async fn held_by_live_lease(pool: &PgPool, run_id: Uuid) -> Result<bool, sqlx::Error> {
    let state: Option<(String, bool)> = sqlx::query_as(
        "SELECT status::text, coalesce(lease_expires_at > now(), false)
           FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    Ok(matches!(state, Some((status, true)) if matches!(status.as_str(), "pending" | "running")))
}

// ---------------------------------------------------------------------------------------
// What `dsa-ingest status` shows
// ---------------------------------------------------------------------------------------

/// A run as a person or a script reads it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct RunStatus {
    pub run_id: Uuid,
    pub run_type: String,
    pub status: String,
    pub dataset: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    /// Who holds the run now and until when (running runs only).
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub progress: Option<Json<Progress>>,
    pub checkpoint: Option<Json<Checkpoint>>,
    /// The import's summary once it completed.
    pub output_summary: Option<serde_json::Value>,
    pub error_message: Option<String>,
}

/// The run, or `None` when no run has that id.
pub async fn run_status(pool: &PgPool, run_id: Uuid) -> Result<Option<RunStatus>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.id AS run_id, a.run_type::text AS run_type, a.status::text AS status,
                d.name AS dataset, a.created_at, a.started_at, a.completed_at, a.attempts,
                a.lease_owner, a.lease_expires_at, a.progress, a.checkpoint,
                a.output_summary, a.error_message
           FROM dsa_jobs.analysis_runs a
           LEFT JOIN dsa_core.datasets d ON d.id = a.dataset_id
          WHERE a.id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await
}
