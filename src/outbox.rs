//! The outbox: messages that must follow a commit, written in the commit's own
//! transaction (`dsa_jobs.outbox`) and published afterwards by the relay.
//!
//! This is the contract between the import core, which writes rows here and knows
//! nothing of the broker, and the queue processes, which publish and consume them.
//! It carries two kinds of message: the search-refresh request a commit queues, and
//! the run reference (`{"analysis_run_id"}`) `watch` queues with each run it creates.

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use thiserror::Error;

/// The exchange an outbox row names for search-refresh requests. The relay maps it to
/// the configured `AMQP_MAINTENANCE_EXCHANGE` (see `queue::relay::destination`).
pub const MAINTENANCE_EXCHANGE: &str = "dsa.maintenance";
pub const REFRESH_ROUTING_KEY: &str = "refresh_search_index";

/// The exchange an outbox row names for import messages. The relay maps it to the
/// configured `AMQP_IMPORT_EXCHANGE` and `AMQP_IMPORT_ROUTING_KEY`.
pub const IMPORT_EXCHANGE: &str = "dsa.imports";
pub const IMPORT_ROUTING_KEY: &str = "import";

/// A body on the maintenance queue, as `docs/schemas/maintenance-request.schema.json`
/// describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    pub task: MaintenanceTask,
    /// The dataset whose change prompted the request; for logs only, since the view is
    /// refreshed as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<i64>,
    /// The commit that prompted the request; for logs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceTask {
    /// Refresh `dsa_search.datasets_summary`.
    RefreshSearchIndex,
}

#[derive(Debug, Error)]
pub enum RequestError {
    #[error("the body is not a maintenance request: {0}")]
    Invalid(String),
}

impl MaintenanceRequest {
    /// A request with no dataset or commit named.
    pub fn refresh_search_index() -> Self {
        Self {
            task: MaintenanceTask::RefreshSearchIndex,
            dataset_id: None,
            commit_id: None,
        }
    }

    /// Parses and checks a body against the published schema.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        let request: Self = serde_json::from_slice(body)
            .map_err(|error| RequestError::Invalid(error.to_string()))?;
        if matches!(request.dataset_id, Some(id) if id < 1) {
            return Err(RequestError::Invalid(
                "dataset_id must be 1 or greater".to_owned(),
            ));
        }
        if matches!(&request.commit_id, Some(id) if id.is_empty()) {
            return Err(RequestError::Invalid(
                "commit_id must not be empty".to_owned(),
            ));
        }
        Ok(request)
    }
}

/// Queues a search-refresh request for a finished commit, in the caller's transaction.
pub async fn queue_refresh(
    conn: &mut PgConnection,
    dataset_id: i64,
    commit_id: &str,
) -> Result<(), sqlx::Error> {
    let request = MaintenanceRequest {
        task: MaintenanceTask::RefreshSearchIndex,
        dataset_id: Some(dataset_id),
        commit_id: Some(commit_id.to_owned()),
    };
    sqlx::query("INSERT INTO dsa_jobs.outbox (exchange, routing_key, payload) VALUES ($1, $2, $3)")
        .bind(MAINTENANCE_EXCHANGE)
        .bind(REFRESH_ROUTING_KEY)
        .bind(sqlx::types::Json(&request))
        .execute(conn)
        .await?;
    Ok(())
}

/// Queues `{"analysis_run_id": run_id}` for the import consumers, in the caller's
/// transaction: the transaction that creates a run can queue its message with it, so
/// neither exists without the other. A duplicate publish is harmless: a run reference
/// delivered twice never yields two commits.
pub async fn queue_import(conn: &mut PgConnection, run_id: uuid::Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO dsa_jobs.outbox (exchange, routing_key, payload) VALUES ($1, $2, $3)")
        .bind(IMPORT_EXCHANGE)
        .bind(IMPORT_ROUTING_KEY)
        .bind(sqlx::types::Json(
            serde_json::json!({ "analysis_run_id": run_id }),
        ))
        .execute(conn)
        .await?;
    Ok(())
}
