//! `dsa-ingest gc`: removes what no committed version needs.
//!
//! 1. Unfinished commits (`committed_at` NULL) of runs that failed or were cancelled,
//!    or that are abandoned: still `running` with a lease that expired more than the
//!    grace period ago. An abandoned run is marked failed and its lease token moved on
//!    first, in the same transaction, so a worker that wakes up later can neither
//!    resume it nor write another batch into it.
//! 2. Rows of `dsa_core.rows` that no `commit_rows` entry references, finalised or not.
//!
//! Step 2 is safe beside running imports, by this argument (ARCHITECTURE.md tells it at
//! length): an import stores a row in the same transaction as the `commit_rows` entry
//! that references it, and a batch transaction holds
//! [`GC_LOCK`](crate::import::load::GC_LOCK) shared from before it writes anything,
//! while gc deletes under it exclusively (both READ COMMITTED, see `db::begin`). So gc's delete, whose snapshot is taken after
//! it holds the lock, sees every batch that committed before, and no batch runs while
//! it deletes: a row a running import stored is referenced by its unfinished commit,
//! which step 2 counts. The rows an import uses without storing them (ones its look-up
//! found stored already, in an earlier transaction, and ones one of the batches before it
//! still loading has, which that batch may have stored without an entry when `--skip-bad-rows`
//! dropped a repeated key) are covered by the generation in `dsa_core.gc_state`: gc
//! moves it with its delete, the look-up notes it before it looks, and a batch that
//! sees it moved checks that those rows are still there, under the lock, before it
//! commits its references to them (`load.rs`'s `still_stored`).

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use super::{GcArgs, HistoryError};
use crate::config::Settings;
use crate::import::load::GC_LOCK;

/// What gc removed, or with `--dry-run` would remove.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// Runs still `running` whose lease expired long ago, now marked failed.
    pub abandoned_runs: u64,
    /// Unfinished commits of failed, cancelled or abandoned runs.
    pub commits: u64,
    pub commit_rows: u64,
    /// Bytes of those entries (ids and hashes, as stored).
    pub commit_rows_bytes: u64,
    /// Rows no commit references.
    pub rows: u64,
    /// Bytes of those rows (hash and content, as stored).
    pub rows_bytes: u64,
}

/// Unfinished commits whose run can no longer finish them. `$1` is how long after its
/// lease expired a `running` run counts as abandoned.
const DEAD_COMMITS: &str = "
    SELECT c.commit_id
      FROM dsa_core.commits c
      LEFT JOIN dsa_jobs.analysis_runs a ON a.id = c.run_id
     WHERE c.committed_at IS NULL
       AND (a.status IN ('failed', 'cancelled')
            OR (a.status = 'running' AND a.lease_expires_at < now() - $1::interval)
            OR (a.id IS NULL AND c.authored_at < now() - $1::interval))";

pub async fn collect(
    pool: &PgPool,
    abandoned_after: Duration,
    dry_run: bool,
) -> Result<GcReport, HistoryError> {
    let after = format!("{} seconds", abandoned_after.as_secs());
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };

    // Step 1: leftovers of runs that will never finish.
    let mut tx = pool.begin().await?;
    if !dry_run {
        // Fencing first: the run is failed and its token moved on before its commit goes.
        report.abandoned_runs = sqlx::query(
            "UPDATE dsa_jobs.analysis_runs
                SET status = 'failed', lease_token = lease_token + 1, lease_owner = NULL,
                    lease_expires_at = NULL, completed_at = now(),
                    error_message = 'abandoned: its lease expired at '
                        || lease_expires_at::text
                        || ' and no worker resumed it; dsa-ingest gc removed its unfinished commit'
              WHERE status = 'running' AND lease_expires_at < now() - $1::interval
                AND EXISTS (SELECT 1 FROM dsa_core.commits c
                             WHERE c.run_id = analysis_runs.id AND c.committed_at IS NULL)",
        )
        .bind(&after)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    } else {
        report.abandoned_runs = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM dsa_jobs.analysis_runs
              WHERE status = 'running' AND lease_expires_at < now() - $1::interval
                AND EXISTS (SELECT 1 FROM dsa_core.commits c
                             WHERE c.run_id = analysis_runs.id AND c.committed_at IS NULL)",
        )
        .bind(&after)
        .fetch_one(&mut *tx)
        .await? as u64;
    }
    let dead: Vec<String> = sqlx::query_scalar(&format!("{DEAD_COMMITS} FOR UPDATE OF c"))
        .bind(&after)
        .fetch_all(&mut *tx)
        .await?;
    report.commits = dead.len() as u64;
    let (entries, bytes): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(octet_length(commit_id) + octet_length(logical_row_id)
                                        + octet_length(row_hash)), 0)::bigint
           FROM dsa_core.commit_rows WHERE commit_id = ANY($1)",
    )
    .bind(&dead)
    .fetch_one(&mut *tx)
    .await?;
    report.commit_rows = entries as u64;
    report.commit_rows_bytes = bytes as u64;
    if !dry_run && !dead.is_empty() {
        sqlx::query("DELETE FROM dsa_core.commit_rows WHERE commit_id = ANY($1)")
            .bind(&dead)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM dsa_core.commits WHERE commit_id = ANY($1) AND committed_at IS NULL",
        )
        .bind(&dead)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;

    // Step 2: rows no commit references, under the lock (see the module's comment).
    let mut tx = crate::db::begin(pool).await?;
    // An anti-join of two large tables: let the server hash, not sort on disk.
    sqlx::query(crate::db::SET_SORT_MEMORY)
        .execute(&mut *tx)
        .await?;
    let (rows, bytes): (i64, i64) = if dry_run {
        // The dead commits' entries are still there; count as if they were gone.
        sqlx::query_as(
            "SELECT count(*), coalesce(sum(octet_length(r.row_hash) + pg_column_size(r.data)), 0)::bigint
               FROM dsa_core.rows r
              WHERE NOT EXISTS (SELECT 1 FROM dsa_core.commit_rows cr
                                 WHERE cr.row_hash = r.row_hash
                                   AND cr.commit_id <> ALL($1))",
        )
        .bind(&dead)
        .fetch_one(&mut *tx)
        .await?
    } else {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(GC_LOCK)
            .execute(&mut *tx)
            .await?;
        let removed: (i64, i64) = sqlx::query_as(
            "WITH gone AS (
                 DELETE FROM dsa_core.rows r
                  WHERE NOT EXISTS (SELECT 1 FROM dsa_core.commit_rows cr
                                     WHERE cr.row_hash = r.row_hash)
              RETURNING octet_length(r.row_hash) + pg_column_size(r.data) AS bytes)
             SELECT count(*), coalesce(sum(bytes), 0)::bigint FROM gone",
        )
        .fetch_one(&mut *tx)
        .await?;
        if removed.0 > 0 {
            sqlx::query("UPDATE dsa_core.gc_state SET generation = generation + 1")
                .execute(&mut *tx)
                .await?;
        }
        removed
    };
    tx.commit().await?;
    report.rows = rows as u64;
    report.rows_bytes = bytes as u64;
    Ok(report)
}

pub async fn command(pool: &PgPool, settings: &Settings, args: GcArgs) -> Result<(), HistoryError> {
    let abandoned_after = settings.import.lease_duration + Duration::from_secs(args.grace_seconds);
    let report = collect(pool, abandoned_after, args.dry_run).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
        return Ok(());
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!(
        "{verb} {} unfinished commits with {} commit_rows entries ({} bytes){}",
        report.commits,
        report.commit_rows,
        report.commit_rows_bytes,
        if report.abandoned_runs > 0 {
            format!(
                "; {} abandoned runs {}marked failed",
                report.abandoned_runs,
                if report.dry_run { "would be " } else { "" }
            )
        } else {
            String::new()
        }
    );
    println!(
        "{verb} {} rows no commit references ({} bytes)",
        report.rows, report.rows_bytes
    );
    Ok(())
}
