//! `GET /v1/runs/{id}` (the run as `status --json` shows it) and
//! `GET /v1/runs/{id}/events` (Server-Sent Events until the run ends).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use futures::Stream;
use uuid::Uuid;

use crate::cli::submit::ProgressReading;
use crate::runs::RunStatus;

use super::auth::Scope;
use super::problem::{json_response, Problem};
use super::Api;

/// How often an event stream reads the run. Progress is written every few batches, so
/// faster polling would mostly read the same row again.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The run, after checking the caller may read its dataset.
async fn readable_run(api: &Api, headers: &HeaderMap, id: &str) -> Result<RunStatus, Problem> {
    let caller = api.inner.clients.authenticate(headers)?;
    let run_id = Uuid::parse_str(id)
        .map_err(|_| Problem::bad_request(format!("{id:?} is not a run id (a UUID)")))?;
    let not_found = || Problem::not_found(format!("no run has id {run_id}"));
    let run = crate::runs::run_status(&api.inner.pool, run_id)
        .await?
        .ok_or_else(not_found)?;
    match &run.dataset {
        Some(dataset) => caller.may(Scope::Read, dataset)?,
        // A run of no dataset (a maintenance run) is no client's business.
        None if caller.user().is_some() => return Err(not_found()),
        None => {}
    }
    Ok(run)
}

pub async fn get_run(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let run = readable_run(&api, &headers, &id).await?;
    Ok(json_response(StatusCode::OK, &run))
}

pub async fn run_events(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let run = readable_run(&api, &headers, &id).await?;
    let follow = Follow {
        api,
        run_id: run.run_id,
        first: Some(run),
        last_progress: None,
        ended: false,
    };
    let stream = futures::stream::unfold(follow, |mut follow| async move {
        let event = follow.next_event().await?;
        Some((Ok(event), follow))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The state of one event stream.
struct Follow {
    api: Api,
    run_id: Uuid,
    /// The reading made when the request was checked, sent before polling starts.
    first: Option<RunStatus>,
    /// The data of the last `progress` event; an unchanged reading sends nothing.
    last_progress: Option<String>,
    ended: bool,
}

impl Follow {
    /// The next event, or `None` once the end event was sent or the server stops.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if self.ended {
                return None;
            }
            let run = match self.first.take() {
                Some(run) => run,
                None => {
                    tokio::select! {
                        biased;
                        _ = self.api.inner.stop.cancelled() => return None,
                        _ = tokio::time::sleep(POLL_INTERVAL) => {}
                    }
                    match crate::runs::run_status(&self.api.inner.pool, self.run_id).await {
                        Ok(Some(run)) => run,
                        Ok(None) => {
                            self.ended = true;
                            return Some(failed("gone", "the run no longer exists"));
                        }
                        Err(error) => {
                            // The next reading may work; the client keeps its stream.
                            tracing::warn!(run.id = %self.run_id, error = %error, "reading the run for its event stream failed");
                            continue;
                        }
                    }
                }
            };
            match run.status.as_str() {
                "completed" => {
                    self.ended = true;
                    let summary = run.output_summary.unwrap_or(serde_json::Value::Null);
                    return Some(
                        Event::default()
                            .event("completed")
                            .data(summary.to_string()),
                    );
                }
                "failed" | "cancelled" => {
                    self.ended = true;
                    return Some(failed(
                        &run.status,
                        run.error_message
                            .as_deref()
                            .unwrap_or("no error message was recorded"),
                    ));
                }
                // Parked: the consumers gave up and dead-lettered its message; nothing
                // moves it until the message is replayed.
                "pending" if run.started_at.is_some() && run.error_message.is_some() => {
                    self.ended = true;
                    return Some(failed(
                        "pending (parked)",
                        run.error_message.as_deref().unwrap_or_default(),
                    ));
                }
                _ => {
                    let reading = ProgressReading::from_run(&run, 0);
                    let data = serde_json::json!({
                        "status": reading.status,
                        "bytes_processed": reading.bytes_processed,
                        "total_bytes": reading.total_bytes,
                        "rows_processed": reading.rows_processed,
                        "rows_per_second": reading.rows_per_second,
                        "percentage": reading.percentage(),
                    })
                    .to_string();
                    if self.last_progress.as_deref() != Some(data.as_str()) {
                        self.last_progress = Some(data.clone());
                        return Some(Event::default().event("progress").data(data));
                    }
                }
            }
        }
    }
}

fn failed(status: &str, message: &str) -> Event {
    Event::default()
        .event("failed")
        .data(serde_json::json!({"status": status, "message": message}).to_string())
}
