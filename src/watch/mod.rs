//! `dsa-ingest watch`: objects dropped under a bucket prefix become runs, on any S3
//! store, by listing.
//!
//! Every replica runs this loop; the one holding the lister lock (`lock.rs`) lists
//! each rule (`rules.rs`) every `WATCH_INTERVAL_SECONDS`, page by page (`list.rs`),
//! creates a run for each object version it has not seen and queues the run's
//! reference through the outbox in the same transaction, records the version
//! (`record.rs`), and deletes or moves objects whose run has ended when the rule says
//! so (`after.rs`). The others stand by and take over within a second or two of the
//! lister's death. The import itself is `consume`'s job; the outbox relay running beside
//! this loop publishes the references.
//!
//! Exactly once per object version comes from the run's idempotency key
//! (`s3:{bucket}/{key}@{etag}`, the identity S3 event records have too): a version
//! listed twice, by two listers, or also announced by an event, has one run.

pub mod after;
pub mod glob;
pub mod list;
pub mod lock;
pub mod record;
pub mod rules;

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpSettings, SecretUrl, WatchSettings};
use crate::db::DatasetName;
use crate::metrics::metrics;
use crate::policy::SourcePolicy;
use crate::queue::amqp::{self, AmqpError};
use list::ListingEnd;
use lock::ListerLock;
use rules::Rule;

/// A listing round that failed; logged, and the next round tries again.
#[derive(Debug, Error)]
pub enum WatchError {
    #[error("{action}: {message}")]
    S3 { action: String, message: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("dataset: {0}")]
    Dataset(String),
}

/// How often records older than `WATCH_RETENTION_DAYS` are looked for.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// What the watcher needs: its rules, the database, the store, and a way to tell the
/// relay that messages are waiting.
pub struct WatchSetup {
    pub pool: PgPool,
    /// For the lister lock's own session.
    pub database_url: SecretUrl,
    pub s3: aws_sdk_s3::Client,
    pub rules: Vec<Rule>,
    pub settings: WatchSettings,
    /// `S3_EVENT_DATASET` and `S3_EVENT_DATASET_FROM_METADATA`, for rules that name
    /// no dataset (they choose it as S3 events do).
    pub event_dataset: Option<DatasetName>,
    pub event_dataset_from_metadata: bool,
    /// `IMPORT_ALLOWED_BUCKETS`: the rules were checked against it at start; objects
    /// are checked again, as `consume` checks every source.
    pub policy: SourcePolicy,
    /// Nudges the outbox relay after a page queued runs.
    pub nudge: mpsc::Sender<()>,
}

/// Stands by or lists until `stop` fires.
pub async fn run(setup: WatchSetup, stop: CancellationToken) {
    metrics().watch_active(false);
    while let Some(mut lock) = ListerLock::acquire(&setup.database_url, &stop).await {
        metrics().watch_active(true);
        tracing::info!(
            rules = setup.rules.len(),
            "this replica is the watch lister now"
        );
        let end = lister(&setup, &mut lock, &stop).await;
        metrics().watch_active(false);
        metrics().watch_oldest_unqueued(Duration::ZERO);
        lock.release().await;
        match end {
            ListingEnd::LostLock => {
                tracing::warn!(
                    "lost the watch lister lock (its database session is gone); standing by"
                )
            }
            ListingEnd::Stopped | ListingEnd::Done(_) => break,
        }
    }
    tracing::info!("watch stopped");
}

/// Lists every rule, acts on ended runs, and waits the interval, for as long as the
/// lock holds and nobody stops it.
async fn lister(setup: &WatchSetup, lock: &mut ListerLock, stop: &CancellationToken) -> ListingEnd {
    let mut retention_checked: Option<Instant> = None;
    loop {
        let mut oldest_unqueued = None;
        for rule in &setup.rules {
            let started = Instant::now();
            match list::list_rule(setup, rule, lock, stop).await {
                Ok(ListingEnd::Done(listing)) => {
                    metrics().watch_listing(started.elapsed());
                    tracing::debug!(
                        rule = %rule.name,
                        listed = listing.listed,
                        queued = listing.queued,
                        duration_ms = started.elapsed().as_millis() as u64,
                        "listed"
                    );
                    oldest_unqueued = match (oldest_unqueued, listing.oldest_unqueued) {
                        (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                        (a, b) => a.or(b),
                    };
                }
                Ok(end) => return end,
                Err(error) => {
                    tracing::warn!(rule = %rule.name, error = %error, "listing failed; trying again at the next interval");
                }
            }
        }
        let age = oldest_unqueued
            .and_then(|at| (Utc::now() - at).to_std().ok())
            .unwrap_or(Duration::ZERO);
        metrics().watch_oldest_unqueued(age);

        if let Err(error) = after::act_on_ended(setup).await {
            tracing::warn!(error = %error, "acting on ended runs failed; trying again next round");
        }
        if retention_checked.is_none_or(|at| at.elapsed() >= RETENTION_EVERY) {
            match record::forget_old(&setup.pool, setup.settings.retention).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, "forgot records older than WATCH_RETENTION_DAYS")
                }
                Err(error) => tracing::warn!(error = %error, "removing old records failed"),
            }
            retention_checked = Some(Instant::now());
        }

        // Wait for the next round, making sure every second that this is still the
        // lister: a lister whose session died must stop within a second or two.
        let next_round = Instant::now() + setup.settings.interval;
        loop {
            let wait = next_round
                .saturating_duration_since(Instant::now())
                .min(lock::RETRY);
            if wait.is_zero() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return ListingEnd::Stopped,
            }
            if !lock.still_held().await {
                return ListingEnd::LostLock;
            }
        }
    }
}

/// Declares the import exchange and queue, so that the first run reference the relay
/// publishes has somewhere to go; waits for the broker with backoff. A topology that
/// differs from the settings (another delivery limit) is an error a person must settle.
pub async fn declare_import_topology(
    settings: &AmqpSettings,
    stop: &CancellationToken,
) -> Result<(), AmqpError> {
    let mut reconnect = amqp::Reconnect::default();
    loop {
        let attempt: Result<(), AmqpError> = async {
            let connection = amqp::connect(settings, "watch").await?;
            let channel = amqp::confirm_channel(&connection).await?;
            let declared = amqp::declare_import_topology(&channel, settings).await;
            let _ = connection.close(200, "declared".into()).await;
            declared
        }
        .await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(error) if error.is_topology_mismatch() => return Err(error),
            Err(error) => {
                if !reconnect
                    .wait_after(&error, "watch cannot declare the import queue yet", stop)
                    .await
                {
                    return Ok(());
                }
            }
        }
    }
}
