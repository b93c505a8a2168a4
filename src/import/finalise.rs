//! Stage `finalise`: one transaction turns the loaded commit into history: its row count,
//! tree hash and `committed_at` are set, `main` moves to it, the run is completed with
//! its summary, and a search-refresh request is queued in the outbox.
//!
//! The dataset row is locked first, so two imports finishing into one dataset take turns:
//! the second sees the first's commit as its parent and history stays linear.

use sqlx::types::Json;
use sqlx::{Acquire, PgConnection};

use crate::import::load::LoadError;
use crate::import::run::{Lease, Lineage};

/// The finished commit's facts.
pub struct CommitFacts<'a> {
    pub dataset_id: i64,
    pub commit_id: &'a str,
    pub row_count: u64,
    pub tree_hash: &'a str,
    pub source: Lineage,
}

/// Finalises the commit and completes the run; returns the parent commit id.
/// `summary` receives the parent and returns the run's output summary.
pub async fn finalise(
    conn: &mut PgConnection,
    lease: &Lease,
    facts: CommitFacts<'_>,
    summary: impl FnOnce(Option<&str>) -> serde_json::Value,
) -> Result<Option<String>, LoadError> {
    let mut tx = conn.begin().await?;
    // Batches may run with synchronous_commit off; this transaction must be durable
    // before anyone is told the import is done.
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    // NO KEY UPDATE serialises finalisers without blocking the key-share locks that
    // other imports' inserts (their commits and runs) take on the dataset row.
    sqlx::query("SELECT 1 FROM dsa_core.datasets WHERE id = $1 FOR NO KEY UPDATE")
        .bind(facts.dataset_id)
        .execute(&mut *tx)
        .await?;
    let parent: Option<String> = sqlx::query_scalar(
        "SELECT commit_id FROM dsa_core.refs WHERE dataset_id = $1 AND name = 'main'",
    )
    .bind(facts.dataset_id)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE dsa_core.commits
            SET parent_commit_id = $2, row_count = $3, tree_hash = $4, source = $5,
                committed_at = now()
          WHERE commit_id = $1 AND committed_at IS NULL",
    )
    .bind(facts.commit_id)
    .bind(parent.as_deref())
    .bind(facts.row_count as i64)
    .bind(facts.tree_hash)
    .bind(Json(&facts.source))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO dsa_core.refs (dataset_id, name, commit_id) VALUES ($1, 'main', $2)
         ON CONFLICT (dataset_id, name)
         DO UPDATE SET commit_id = EXCLUDED.commit_id, updated_at = now()",
    )
    .bind(facts.dataset_id)
    .bind(facts.commit_id)
    .execute(&mut *tx)
    .await?;
    let output = summary(parent.as_deref());
    let completed = sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'completed', completed_at = now(), output_summary = $3,
                progress = coalesce(progress, '{}'::jsonb)
                           || jsonb_build_object('percentage', 100, 'status', 'Completed'),
                lease_owner = NULL, lease_expires_at = NULL, error_message = NULL
          WHERE id = $1 AND lease_token = $2 AND status = 'running'",
    )
    .bind(lease.run_id)
    .bind(lease.token)
    .bind(&output)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if completed != 1 {
        tx.rollback().await?;
        return Err(LoadError::LeaseLost {
            run_id: lease.run_id,
            token: lease.token,
        });
    }
    crate::outbox::queue_refresh(&mut tx, facts.dataset_id, facts.commit_id).await?;
    tx.commit().await?;
    Ok(parent)
}
