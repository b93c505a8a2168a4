//! What a run is doing or did: the answer to `dsa-ingest status RUN_ID`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

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
    pub progress: Option<serde_json::Value>,
    pub checkpoint: Option<serde_json::Value>,
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
