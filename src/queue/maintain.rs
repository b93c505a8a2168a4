//! `dsa-ingest maintain`: search-refresh requests in, few refreshes out.
//!
//! Every finalised import asks for a refresh of `dsa_search.datasets_summary`, and a
//! refresh reads every dataset, so one refresh per request would not keep up with a
//! burst of imports. The maintainer takes the first request, keeps taking requests
//! for a short window (`MAINTENANCE_COALESCE_MS`, or until the queue is quiet for
//! [`IDLE_GAP`], or until the prefetch is full), runs one
//! `REFRESH MATERIALIZED VIEW CONCURRENTLY`, and acknowledges every request it covered
//! with one `multiple` acknowledgement, only after the refresh committed. A request
//! that arrives during a refresh waits for the next one, which sees its commit.
//!
//! Refreshes never run from two processes at once. The queue has a single active
//! consumer, so the broker feeds one maintainer; and the refresh itself runs under a
//! transaction-level advisory lock, so a second maintainer that becomes active while
//! the first is still refreshing (a broker failover, a consumer that the broker gave
//! up on) waits for it instead of refreshing beside it.
//!
//! A body that is not a maintenance request is logged and rejected without requeue.
//! The maintenance queue has no dead-letter queue: such a body carries nothing to
//! replay, and the next valid request refreshes the view anyway.

use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpSettings, MaintenanceSettings};
use crate::http::Health;
use crate::metrics::{metrics, RefreshResult};
use crate::outbox::MaintenanceRequest;
use crate::queue::amqp::{self, AmqpError};

/// Deliveries the broker sends before the first is acknowledged; also the most
/// requests one refresh covers.
pub const PREFETCH: u16 = 100;

/// A burst is over when no request arrived for this long, even if the coalescing window
/// is not: a lone request is refreshed after this pause, not after the whole window.
pub const IDLE_GAP: Duration = Duration::from_millis(200);

/// The advisory lock every maintainer takes around a refresh ("dsa_sear" in ASCII).
/// Advisory locks are per database, so deployments on other databases do not contend.
pub const REFRESH_LOCK_KEY: i64 = 0x6473_615f_7365_6172;

/// The one statement a refresh runs. CONCURRENTLY keeps the view readable while it is
/// rebuilt; it needs the view's unique index (see the search migration).
const REFRESH_STATEMENT: &str =
    "REFRESH MATERIALIZED VIEW CONCURRENTLY dsa_search.datasets_summary";

/// How long one refresh took.
#[derive(Clone, Copy, Debug)]
pub struct RefreshTiming {
    /// Time spent waiting for another maintainer's refresh to finish.
    pub lock_wait: Duration,
    /// Time the refresh itself took, up to its commit.
    pub refresh: Duration,
}

/// Refreshes the search view once, under the refresh advisory lock, and returns when
/// the refresh has committed.
pub async fn refresh_search_index(pool: &PgPool) -> Result<RefreshTiming, sqlx::Error> {
    let started = Instant::now();
    let result = refresh_under_lock(pool, started).await;
    let outcome = match result {
        Ok(_) => RefreshResult::Completed,
        Err(_) => RefreshResult::Failed,
    };
    metrics().search_refresh(outcome, started.elapsed());
    result
}

async fn refresh_under_lock(pool: &PgPool, started: Instant) -> Result<RefreshTiming, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    // Transaction-level: released by the commit or by the connection dying with the
    // process, never left behind.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REFRESH_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let locked = Instant::now();
    sqlx::query(REFRESH_STATEMENT).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(RefreshTiming {
        lock_wait: locked - started,
        refresh: locked.elapsed(),
    })
}

/// What one maintainer did over its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaintainStats {
    /// Refreshes that committed.
    pub refreshes: u64,
    /// Requests those refreshes covered (and that were acknowledged).
    pub requests: u64,
}

/// Runs the maintainer until `stop` is cancelled: subscribes to the maintenance queue,
/// coalesces requests into refreshes, reconnects with backoff when the broker goes
/// away. On `stop` it finishes the burst it holds (refresh, then acknowledge) and
/// returns what it did.
pub async fn run(
    pool: PgPool,
    amqp: AmqpSettings,
    settings: MaintenanceSettings,
    health: Option<Health>,
    stop: CancellationToken,
) -> MaintainStats {
    let set_connected = |connected: bool| {
        if let Some(health) = &health {
            health.set_broker_connected(connected);
        }
    };
    let mut stats = MaintainStats::default();
    let mut reconnect = amqp::Reconnect::default();
    let mut maintainer = Maintainer {
        pool,
        window: settings.coalesce_window,
        failures: ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_secs(1))
            .with_max_interval(Duration::from_secs(30))
            .with_max_elapsed_time(None)
            .build(),
    };

    while !stop.is_cancelled() {
        let session = tokio::select! {
            session = subscribe(&amqp) => session,
            _ = stop.cancelled() => break,
        };
        let (connection, channel, mut deliveries) = match session {
            Ok(session) => session,
            Err(error) => {
                if reconnect
                    .wait_after(&error, "broker unavailable", &stop)
                    .await
                {
                    continue;
                }
                break;
            }
        };
        reconnect.reset();
        set_connected(true);
        tracing::info!(
            queue = %amqp.maintenance_queue,
            coalesce_window_ms = maintainer.window.as_millis() as u64,
            "consuming maintenance requests"
        );

        let ended = maintainer.serve(&mut deliveries, &stop, &mut stats).await;
        set_connected(false);
        match ended {
            Ended::Stopped => {
                // Nothing is held unacknowledged here; cancelling first makes the
                // broker hand the queue to the next maintainer before we close.
                if let Err(error) = channel
                    .basic_cancel(deliveries.tag(), BasicCancelOptions::default())
                    .await
                {
                    tracing::debug!(error = %error, "cancelling the subscription");
                }
                if let Err(error) = connection.close(200, "shutting down".into()).await {
                    tracing::debug!(error = %error, "closing the broker connection");
                }
                break;
            }
            Ended::Lost => {
                let _ = connection.close(200, "reconnecting".into()).await;
            }
        }
    }
    tracing::info!(
        refreshes = stats.refreshes,
        requests = stats.requests,
        "maintainer stopped"
    );
    stats
}

/// Connects, declares the maintenance topology and subscribes with a prefetch of
/// [`PREFETCH`].
async fn subscribe(amqp: &AmqpSettings) -> Result<(Connection, Channel, Consumer), AmqpError> {
    let broker = |action: &'static str| move |source| AmqpError::Broker { action, source };
    let connection = amqp::connect(amqp, "maintain").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(broker("opening a channel"))?;
    amqp::declare_maintenance_topology(&channel, amqp).await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(broker("setting the prefetch"))?;
    // The tag names the process, so `rabbitmqctl list_consumers` shows which
    // maintainer is the active one.
    let tag = format!("maintain {}", crate::process::worker_identity());
    let consumer = channel
        .basic_consume(
            amqp.maintenance_queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("subscribing to the maintenance queue"))?;
    Ok((connection, channel, consumer))
}

/// Why [`Maintainer::serve`] returned.
enum Ended {
    /// `stop` was cancelled; the burst in hand was settled.
    Stopped,
    /// The channel or connection went away; the broker redelivers what we held.
    Lost,
}

struct Maintainer {
    pool: PgPool,
    /// See [`MaintenanceSettings::coalesce_window`].
    window: Duration,
    /// Pauses between failed refreshes, so a database that is away is not hammered by
    /// requeued requests; reset by a refresh that commits.
    failures: ExponentialBackoff,
}

impl Maintainer {
    async fn serve(
        &mut self,
        deliveries: &mut Consumer,
        stop: &CancellationToken,
        stats: &mut MaintainStats,
    ) -> Ended {
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ended::Stopped,
                next = deliveries.next() => next,
            };
            let first = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "lost the broker channel; reconnecting");
                    return Ended::Lost;
                }
                None => {
                    tracing::warn!("the broker ended the subscription; reconnecting");
                    return Ended::Lost;
                }
            };
            let (burst, lost) = self.collect(first, deliveries, stop).await;
            if lost {
                // The deliveries belong to the dead channel and cannot be acknowledged;
                // whoever is active next receives them again.
                tracing::warn!(
                    requests = burst.len(),
                    "lost the broker channel while collecting requests; reconnecting"
                );
                return Ended::Lost;
            }
            self.settle(burst, stop, stats).await;
        }
    }

    /// Takes further deliveries after `first` until the coalescing window ends, the
    /// queue is quiet for [`IDLE_GAP`], the prefetch is full (nothing more can come
    /// before we acknowledge), or `stop` is cancelled. Returns the burst and whether
    /// the channel was lost meanwhile.
    async fn collect(
        &self,
        first: Delivery,
        deliveries: &mut Consumer,
        stop: &CancellationToken,
    ) -> (Vec<Delivery>, bool) {
        let deadline = Instant::now() + self.window;
        let idle = IDLE_GAP.min(self.window);
        let mut burst = vec![first];
        while burst.len() < usize::from(PREFETCH) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let next = tokio::select! {
                next = tokio::time::timeout(idle.min(left), deliveries.next()) => next,
                _ = stop.cancelled() => break,
            };
            match next {
                Ok(Some(Ok(delivery))) => burst.push(delivery),
                Ok(Some(Err(error))) => {
                    tracing::debug!(error = %error, "the channel failed while collecting");
                    return (burst, true);
                }
                Ok(None) => return (burst, true),
                Err(_quiet) => break,
            }
        }
        (burst, false)
    }

    /// Rejects the bodies that are not requests, refreshes once for the rest and
    /// acknowledges them all with one `multiple` acknowledgement; when the refresh
    /// fails, requeues them after a pause.
    async fn settle(
        &mut self,
        burst: Vec<Delivery>,
        stop: &CancellationToken,
        stats: &mut MaintainStats,
    ) {
        let mut requests = Vec::with_capacity(burst.len());
        for delivery in burst {
            match MaintenanceRequest::parse(&delivery.data) {
                Ok(request) => requests.push((delivery, request)),
                Err(error) => {
                    let preview =
                        String::from_utf8_lossy(&delivery.data[..delivery.data.len().min(200)])
                            .into_owned();
                    tracing::error!(
                        delivery.tag = delivery.delivery_tag,
                        error = %error,
                        body = %preview,
                        bytes = delivery.data.len(),
                        "maintenance message rejected and dropped (the maintenance queue has no dead-letter queue)"
                    );
                    if let Err(error) = delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                    {
                        tracing::warn!(error = %error, "could not reject the message");
                    }
                }
            }
        }
        let Some((last, _)) = requests.last() else {
            return;
        };
        let count = requests.len();
        let datasets = {
            let mut ids: Vec<i64> = requests.iter().filter_map(|(_, r)| r.dataset_id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len()
        };

        match refresh_search_index(&self.pool).await {
            Ok(timing) => {
                self.failures.reset();
                // One acknowledgement for the whole burst: `multiple` covers every
                // delivery up to the last one, and the rejected ones are settled already.
                let acknowledged = last.acker.ack(BasicAckOptions { multiple: true }).await;
                stats.refreshes += 1;
                match acknowledged {
                    Ok(true) => {
                        stats.requests += count as u64;
                        tracing::info!(
                            requests = count,
                            datasets,
                            duration_ms = timing.refresh.as_millis() as u64,
                            lock_wait_ms = timing.lock_wait.as_millis() as u64,
                            "search index refreshed"
                        );
                    }
                    // The channel went away after the refresh: the broker redelivers the
                    // requests, which costs one more refresh and nothing else.
                    Ok(false) => tracing::warn!(
                        requests = count,
                        duration_ms = timing.refresh.as_millis() as u64,
                        "search index refreshed, but the channel closed before the requests were acknowledged"
                    ),
                    Err(error) => tracing::warn!(
                        requests = count,
                        duration_ms = timing.refresh.as_millis() as u64,
                        error = %error,
                        "search index refreshed, but acknowledging the requests failed"
                    ),
                }
            }
            Err(error) => {
                let wait = self
                    .failures
                    .next_backoff()
                    .unwrap_or(Duration::from_secs(30));
                tracing::warn!(
                    requests = count,
                    error = %error,
                    retry_in_ms = wait.as_millis() as u64,
                    "search index refresh failed; requeueing its requests after a pause"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => {}
                }
                let requeued = last
                    .acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await;
                if let Err(error) = requeued {
                    tracing::warn!(error = %error, "could not requeue the requests; the broker redelivers them when the channel closes");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_follow_the_schema() {
        let full = MaintenanceRequest::parse(
            br#"{"task": "refresh_search_index", "dataset_id": 42, "commit_id": "9f2e"}"#,
        )
        .unwrap();
        assert_eq!(full.dataset_id, Some(42));
        assert_eq!(full.commit_id.as_deref(), Some("9f2e"));
        assert_eq!(
            MaintenanceRequest::parse(br#"{"task": "refresh_search_index"}"#).unwrap(),
            MaintenanceRequest::refresh_search_index()
        );
        for refused in [
            &br#"not json"#[..],
            br#"{}"#,
            br#"{"task": "vacuum"}"#,
            br#"{"task": "refresh_search_index", "extra": 1}"#,
            br#"{"task": "refresh_search_index", "dataset_id": 0}"#,
            br#"{"task": "refresh_search_index", "dataset_id": "7"}"#,
            br#"{"task": "refresh_search_index", "commit_id": ""}"#,
        ] {
            assert!(
                MaintenanceRequest::parse(refused).is_err(),
                "{} was accepted",
                String::from_utf8_lossy(refused)
            );
        }
    }

    #[test]
    fn a_request_serialises_without_absent_fields() {
        assert_eq!(
            serde_json::to_string(&MaintenanceRequest::refresh_search_index()).unwrap(),
            r#"{"task":"refresh_search_index"}"#
        );
    }
}
