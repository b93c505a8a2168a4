//! Stage `claim`: create import runs, and take one under a lease with a fencing token.
//!
//! Every batch transaction re-checks the token it claimed (see `load`), so a worker that
//! lost its lease, however slowly it notices, can never write into a run another worker
//! has taken over: the lease decides who may work, the token decides whose writes count.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use crate::decode::Header;
use crate::fetch::SourceLocation;
use crate::hash::TreeHasher;

/// What an import run was asked to do; stored as the run's `run_parameters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportParameters {
    pub source: SourceLocation,
    /// Put rows that cannot be decoded into `dsa_jobs.rejected_rows` instead of failing.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// The commit message; a default naming the source is used when absent.
    #[serde(default)]
    pub message: Option<String>,
    /// The ETag the requester saw; the run fails if the object has another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_etag: Option<String>,
    /// For spreadsheets: the worksheets to import (all of them when absent). A name
    /// the file does not have fails the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sheets: Option<Vec<String>>,
}

/// Where a run continues after a crash; written in the same transaction as each batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The commit this run is filling; created before the first batch.
    pub commit_id: String,
    /// The ETag the run started with; a resume against another object fails.
    pub etag: Option<String>,
    /// The `{sheet}` of the logical row ids being written.
    pub sheet: String,
    /// Absolute offset of the first byte not yet loaded (0 until the header is read).
    pub byte_offset: u64,
    /// Line number of the line that starts at `byte_offset`.
    pub line: u64,
    /// Data records consumed so far, loaded or rejected; the next row is `records + 1`.
    pub records: u64,
    /// Rows written to the commit so far.
    pub loaded_rows: u64,
    /// Of those, rows that were not stored before.
    pub new_rows: u64,
    pub rejected_rows: u64,
    /// The tree hash state after the last loaded row.
    pub tree_state: String,
    /// The header, once read; a resume does not read it again. For a spreadsheet,
    /// the header of the sheet being read, which a resume checks against the file.
    pub header: Option<Header>,
    /// Spreadsheets: the position of the sheet being read in the run's list of sheets.
    /// `byte_offset` is then only an estimate of progress; the resume point is this
    /// sheet and `sheet_records`.
    #[serde(default)]
    pub sheet_index: usize,
    /// Spreadsheets: data rows of the current sheet consumed so far (loaded, rejected,
    /// or empty rows between them); the next row is `sheet_records + 1`.
    #[serde(default)]
    pub sheet_records: u64,
    /// Spreadsheets: the sheets read to their end, for the commit's lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_sheets: Vec<crate::sheet::SheetLineage>,
}

impl Checkpoint {
    /// The state of a run whose commit exists but whose file has not been read yet.
    pub fn start(commit_id: String, etag: Option<String>, sheet: String) -> Self {
        Self {
            commit_id,
            etag,
            sheet,
            byte_offset: 0,
            line: 1,
            records: 0,
            loaded_rows: 0,
            new_rows: 0,
            rejected_rows: 0,
            tree_state: TreeHasher::new().to_hex(),
            header: None,
            sheet_index: 0,
            sheet_records: 0,
            completed_sheets: Vec::new(),
        }
    }
}

/// The right to write one run's batches, valid while `token` is the run's lease token.
#[derive(Clone, Debug)]
pub struct Lease {
    pub run_id: Uuid,
    pub token: i64,
    pub owner: String,
    pub duration: std::time::Duration,
}

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

/// `dsa-ingest@host/boot:pid`: who holds a lease, readable by a person and by
/// [`owner_is_dead_local_process`]. The boot id tells apart machines or containers
/// that share a host name, and a host before and after a restart.
pub fn worker_identity() -> String {
    format!("dsa-ingest@{}:{}", this_host(), std::process::id())
}

fn this_host() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().chars().take(8).collect::<String>())
        .unwrap_or_default();
    format!("{}/{boot}", hostname())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// True when `owner` names a process on this host that no longer runs, so its lease can
/// be taken at once instead of after it expires (the usual case after `kill -9` and a
/// `--resume` on the same machine). Other hosts' leases always run out by time.
pub fn owner_is_dead_local_process(owner: &str) -> bool {
    let Some((host, pid)) = owner
        .strip_prefix("dsa-ingest@")
        .and_then(|rest| rest.rsplit_once(':'))
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == this_host()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
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

/// lease_token, dataset_id, run_parameters, checkpoint, attempts, user_id.
type ClaimedColumns = (
    i64,
    i64,
    Json<serde_json::Value>,
    Option<Json<serde_json::Value>>,
    i32,
    Option<String>,
);

/// Takes the run if it is pending, or running under a lease that expired or whose
/// holder is a dead process on this host; increments the fencing token.
pub async fn claim(
    pool: &PgPool,
    run_id: Uuid,
    owner: &str,
    duration: std::time::Duration,
) -> Result<ClaimedRun, ClaimError> {
    let current: Option<(String, Option<String>, bool)> = sqlx::query_as(
        "SELECT status::text, lease_owner, coalesce(lease_expires_at > now(), false)
           FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    let Some((status, holder, live)) = current else {
        return Err(ClaimError::NotFound(run_id));
    };
    if !matches!(status.as_str(), "pending" | "running") {
        return Err(ClaimError::Finished { run_id, status });
    }
    let takeover = holder
        .as_deref()
        .filter(|holder| live && owner_is_dead_local_process(holder));

    let claimed: Option<ClaimedColumns> = sqlx::query_as(
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
    .fetch_optional(pool)
    .await?;

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
            SET lease_expires_at = now(), error_message = $3
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
    let mut tx = pool.begin().await?;
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
        sqlx::query(
            "DELETE FROM dsa_core.commit_rows WHERE commit_id IN
               (SELECT commit_id FROM dsa_core.commits WHERE run_id = $1 AND committed_at IS NULL)",
        )
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM dsa_core.commits WHERE run_id = $1 AND committed_at IS NULL")
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(updated == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_or_foreign_owner_is_not_taken_over() {
        assert!(!owner_is_dead_local_process(&worker_identity()));
        assert!(!owner_is_dead_local_process(
            "dsa-ingest@elsewhere.example:1"
        ));
        assert!(!owner_is_dead_local_process("someone"));
        let dead = format!("dsa-ingest@{}:{}", this_host(), u32::MAX - 1);
        assert!(owner_is_dead_local_process(&dead));
    }
}
