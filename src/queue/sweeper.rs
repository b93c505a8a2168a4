//! The sweeper in `dsa-ingest maintain`: runs nobody will bring back, brought back or
//! ended.
//!
//! Messages are the only thing that moves a run, and some runs lose theirs: a CLI
//! import killed and never resumed, a lost lease whose taker died, a message
//! dead-lettered by the broker's delivery limit while its long import was still
//! running (before RabbitMQ 4, every requeue counts toward `x-delivery-limit`). Every
//! `SWEEPER_INTERVAL_SECONDS` the sweeper
//!
//! 1. republishes `{"analysis_run_id"}` for each running import whose lease expired
//!    more than `SWEEPER_GRACE_SECONDS` ago: a delivery that still held the run would
//!    have claimed it within a second of the expiry, so none does. Each lease token is
//!    republished once; a consumer's claim gives a new token (and a new chance).
//! 2. fails each run nobody has held for `SWEEPER_ABANDONED_AFTER_SECONDS`, removing
//!    its unfinished commit and commit_rows.
//!
//! Both are counted in `dsa_runs_swept_total{action}`. Republishing twice is harmless
//! (a second delivery finds the run completed), so the sweeper needs no coordination
//! beyond a transaction-level advisory lock that keeps two maintainers from sweeping
//! at the same moment.

use std::collections::HashSet;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{AmqpSettings, MaintenanceSettings};
use crate::metrics::{metrics, SweepAction, SweepOutcome};
use crate::queue::amqp::{self, AmqpError};
use crate::runs;

/// The advisory lock one sweep holds ("dsa_swee" in ASCII).
pub const SWEEP_LOCK_KEY: i64 = 0x6473_615f_7377_6565;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub republished: u64,
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

/// The sweeper's memory between sweeps: the (run, lease token) pairs it republished.
#[derive(Default)]
pub struct Sweeper {
    republished: HashSet<(Uuid, i64)>,
}

impl Sweeper {
    /// One sweep. Returns `None` when another maintainer is sweeping right now.
    pub async fn sweep_once(
        &mut self,
        pool: &PgPool,
        amqp_settings: &AmqpSettings,
        settings: &MaintenanceSettings,
    ) -> Result<Option<SweepStats>, SweepError> {
        let mut lock = crate::db::begin(pool).await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(SWEEP_LOCK_KEY)
            .fetch_one(&mut *lock)
            .await?;
        if !locked {
            return Ok(None);
        }
        let mut stats = SweepStats::default();

        let abandoned = runs::abandoned(pool, settings.abandoned_after).await?;
        for run_id in abandoned {
            let message = format!(
                "abandoned: nobody held this run for {} s (SWEEPER_ABANDONED_AFTER_SECONDS); \
                 its unfinished commit was removed. Import the file again to retry",
                settings.abandoned_after.as_secs()
            );
            if runs::fail_abandoned(pool, run_id, settings.abandoned_after, &message).await? {
                tracing::warn!(run.id = %run_id, "abandoned run failed by the sweeper");
                stats.failed += 1;
            }
        }

        let expired =
            runs::expired_unclaimed(pool, settings.sweep_grace, settings.abandoned_after).await?;
        let due: Vec<(Uuid, i64)> = expired
            .into_iter()
            .filter(|lease| !self.republished.contains(lease))
            .collect();
        if !due.is_empty() {
            let connection = amqp::connect(amqp_settings, "sweeper").await?;
            let result = async {
                let channel = amqp::confirm_channel(&connection).await?;
                amqp::declare_import_topology(&channel, amqp_settings).await?;
                for (run_id, token) in &due {
                    amqp::publish_json(
                        &channel,
                        &amqp_settings.import_exchange,
                        &amqp_settings.import_routing_key,
                        &crate::queue::messages::RunReference {
                            analysis_run_id: *run_id,
                        },
                        Some(&format!("sweep-{run_id}-{token}")),
                    )
                    .await?;
                    tracing::info!(run.id = %run_id, lease.token = token, "republished a run whose lease expired unclaimed");
                    self.republished.insert((*run_id, *token));
                    stats.republished += 1;
                }
                Ok::<_, AmqpError>(())
            }
            .await;
            let _ = connection.close(200, "sweep done".into()).await;
            result?;
        }
        lock.commit().await?;
        metrics().runs_swept(SweepAction::Republished, stats.republished);
        metrics().runs_swept(SweepAction::Failed, stats.failed);
        Ok(Some(stats))
    }
}

/// Sweeps every `sweep_interval` until `stop` is cancelled; errors are logged and the
/// next sweep tries again.
pub async fn run_sweeper(
    pool: PgPool,
    amqp_settings: AmqpSettings,
    settings: MaintenanceSettings,
    stop: CancellationToken,
) {
    let mut sweeper = Sweeper::default();
    let mut ticks = tokio::time::interval(settings.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => break,
        }
        let outcome = match sweeper.sweep_once(&pool, &amqp_settings, &settings).await {
            Ok(Some(stats)) => {
                if stats != SweepStats::default() {
                    tracing::info!(
                        republished = stats.republished,
                        failed = stats.failed,
                        "sweep done"
                    );
                }
                SweepOutcome::Done
            }
            Ok(None) => SweepOutcome::Skipped,
            Err(error) => {
                tracing::warn!(error = %error, "sweep failed; trying again later");
                SweepOutcome::Failed
            }
        };
        metrics().sweep_ended(outcome);
    }
    tracing::debug!("sweeper stopped");
}
