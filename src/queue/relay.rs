//! The outbox relay: messages that must follow a commit, from `dsa_jobs.outbox` to the
//! broker.
//!
//! The finalising transaction writes a row into the outbox instead of publishing, so a
//! commit and its search-refresh request are durable together and neither exists
//! without the other. The relay publishes unsent rows in id order, each with publisher
//! confirms and `mandatory`, and sets `sent_at` only after the broker confirmed. A crash
//! between the confirm and the update publishes the row again on the next pass; that
//! is harmless because every message the outbox carries is idempotent: refreshing
//! twice gives the same view as refreshing once, and a run reference delivered twice
//! imports the run once.
//!
//! Any number of relays may run at once (one inside each `consume` and `maintain`):
//! each pass claims its rows with `FOR UPDATE SKIP LOCKED` inside a transaction, so two
//! relays never publish the same row at the same time, and a relay that dies mid-pass
//! releases its rows for the next one.

use std::time::Duration;

use lapin::{Channel, Connection};
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpSettings;
use crate::queue::amqp::{self, AmqpError};

#[derive(Debug, Error)]
pub enum RelayError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("reading or updating the outbox: {0}")]
    Database(#[from] sqlx::Error),
}

/// How often the relay looks at the outbox when nobody nudges it: rows written by
/// processes without a relay (`dsa-ingest import`), or left by a relay that died, go
/// out within this time.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Rows claimed (and held locked) per transaction. Small enough that a pass holds its
/// locks briefly, large enough that a backlog needs few round trips.
const CLAIM_BATCH: i64 = 100;

/// Where an outbox row goes on the broker.
///
/// The finalising transaction writes the built-in names (`crate::outbox::MAINTENANCE_EXCHANGE`,
/// `dsa.maintenance`) because the database does not know this deployment's settings.
/// A row naming that exchange is therefore published to the configured
/// `AMQP_MAINTENANCE_EXCHANGE` with `AMQP_MAINTENANCE_ROUTING_KEY`, which are the same
/// names unless a deployment (or a test) renamed them. Likewise a row naming the built-in
/// `dsa.imports` (a run reference `watch` queued) goes to `AMQP_IMPORT_EXCHANGE` with
/// `AMQP_IMPORT_ROUTING_KEY`. Rows naming any other exchange are published exactly as
/// written.
pub fn destination<'a>(
    exchange: &'a str,
    routing_key: &'a str,
    amqp: &'a AmqpSettings,
) -> (&'a str, &'a str) {
    if exchange == crate::outbox::MAINTENANCE_EXCHANGE {
        (&amqp.maintenance_exchange, &amqp.maintenance_routing_key)
    } else if exchange == crate::outbox::IMPORT_EXCHANGE {
        (&amqp.import_exchange, &amqp.import_routing_key)
    } else {
        (exchange, routing_key)
    }
}

/// Connects as `relay`, opens a confirm channel and declares the maintenance topology,
/// so that the first publish on a fresh broker already has a queue to land in.
pub async fn open(amqp: &AmqpSettings) -> Result<(Connection, Channel), AmqpError> {
    let connection = amqp::connect(amqp, "relay").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    amqp::declare_maintenance_topology(&channel, amqp).await?;
    Ok((connection, channel))
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    exchange: String,
    routing_key: String,
    payload: serde_json::Value,
}

/// Publishes every unsent outbox row that no other relay holds, in id order, and
/// returns how many were published and marked sent.
///
/// `channel` must be in confirm mode with the maintenance topology declared (as
/// [`open`] leaves it). A row the broker cannot route (no queue bound to its exchange)
/// stays unsent and is logged; the pass goes on with the next row, so one misrouted
/// row does not hold back the others. Any other broker error ends the pass: the rows
/// confirmed before it are marked sent, and the error is returned so the caller can
/// reconnect.
pub async fn relay_once(
    pool: &PgPool,
    channel: &Channel,
    amqp: &AmqpSettings,
) -> Result<usize, RelayError> {
    let mut published = 0;
    // Rows this pass has already tried are skipped by id, so a row that stays unsent
    // (unroutable) is not claimed again and again within one pass.
    let mut after_id = 0_i64;
    loop {
        let mut tx = crate::db::begin(pool).await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, exchange, routing_key, payload
               FROM dsa_jobs.outbox
              WHERE sent_at IS NULL AND id > $1
              ORDER BY id
              LIMIT $2
                FOR UPDATE SKIP LOCKED",
        )
        .bind(after_id)
        .bind(CLAIM_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            tx.rollback().await?;
            return Ok(published);
        };
        after_id = last.id;

        let mut sent = Vec::with_capacity(rows.len());
        let mut failure = None;
        for row in &rows {
            let (exchange, routing_key) = destination(&row.exchange, &row.routing_key, amqp);
            let message_id = format!("outbox-{}", row.id);
            match amqp::publish_json(
                channel,
                exchange,
                routing_key,
                &row.payload,
                Some(&message_id),
            )
            .await
            {
                Ok(()) => sent.push(row.id),
                Err(error @ AmqpError::Unroutable { .. }) => {
                    tracing::warn!(outbox.id = row.id, error = %error, "outbox row not routable; left unsent for the next sweep");
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        if !sent.is_empty() {
            sqlx::query("UPDATE dsa_jobs.outbox SET sent_at = now() WHERE id = ANY($1)")
                .bind(&sent)
                .execute(&mut *tx)
                .await?;
        }
        // If this commit fails, the rows were published but stay unsent, and the next
        // pass publishes them again: a duplicate refresh request, which is harmless.
        tx.commit().await?;
        published += sent.len();
        if let Some(error) = failure {
            return Err(error.into());
        }
        if (rows.len() as i64) < CLAIM_BATCH {
            return Ok(published);
        }
    }
}

/// Runs the relay until `stop` is cancelled: a pass at start, after every nudge, and
/// every [`SWEEP_INTERVAL`]. After a broker error it reconnects with exponential
/// backoff; after a database error it tries again at the next nudge or sweep.
///
/// `nudge` is how an importing process says "a commit just queued a message": create it
/// with `tokio::sync::mpsc::channel(1)` and `try_send(())` after each import, so nudges
/// that arrive during a pass collapse into one more pass. When every sender is dropped
/// the relay goes on sweeping.
///
/// With `health`, the relay reports its broker connection to `/readyz` (for `watch`,
/// whose only broker session is this relay's; `consume` and `maintain` report their
/// consumers' instead).
pub async fn run_relay(
    pool: PgPool,
    amqp: AmqpSettings,
    mut nudge: mpsc::Receiver<()>,
    health: Option<crate::http::Health>,
    stop: CancellationToken,
) {
    let set_connected = |connected: bool| {
        if let Some(health) = &health {
            health.set_broker_connected(connected);
        }
    };
    let mut reconnect = amqp::Reconnect::default();
    let mut nudges_open = true;

    while !stop.is_cancelled() {
        let session = tokio::select! {
            session = open(&amqp) => session,
            _ = stop.cancelled() => break,
        };
        let (connection, channel) = match session {
            Ok(session) => session,
            Err(error) => {
                if reconnect
                    .wait_after(&error, "outbox relay cannot reach the broker", &stop)
                    .await
                {
                    continue;
                }
                break;
            }
        };
        tracing::debug!(exchange = %amqp.maintenance_exchange, "outbox relay connected");
        set_connected(true);
        // The first sweep is one interval away: the pass below runs at once anyway.
        let mut sweep =
            tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            match relay_once(&pool, &channel, &amqp).await {
                Ok(0) => reconnect.reset(),
                Ok(messages) => {
                    reconnect.reset();
                    tracing::info!(messages, "outbox rows published");
                }
                Err(RelayError::Database(error)) => {
                    tracing::warn!(error = %error, "outbox relay cannot read the outbox; trying again at the next sweep");
                }
                Err(RelayError::Amqp(error)) => {
                    set_connected(false);
                    let _ = connection.close(200, "reconnecting".into()).await;
                    reconnect
                        .wait_after(&error, "outbox relay lost the broker; reconnecting", &stop)
                        .await;
                    break;
                }
            }
            tokio::select! {
                received = nudge.recv(), if nudges_open => {
                    if received.is_none() {
                        nudges_open = false;
                    }
                    // Nudges that came in meanwhile are covered by the pass about to run.
                    while nudge.try_recv().is_ok() {}
                }
                _ = sweep.tick() => {}
                _ = stop.cancelled() => {
                    set_connected(false);
                    let _ = connection.close(200, "shutting down".into()).await;
                    break;
                }
            }
        }
    }
    tracing::debug!("outbox relay stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_maintenance_rows_follow_the_settings() {
        let amqp = AmqpSettings {
            maintenance_exchange: "test.maintenance".to_owned(),
            maintenance_routing_key: "refresh".to_owned(),
            import_exchange: "test.imports".to_owned(),
            import_routing_key: "imp".to_owned(),
            ..AmqpSettings::default()
        };
        assert_eq!(
            destination(
                crate::outbox::MAINTENANCE_EXCHANGE,
                crate::outbox::REFRESH_ROUTING_KEY,
                &amqp
            ),
            ("test.maintenance", "refresh")
        );
        assert_eq!(
            destination(
                crate::outbox::IMPORT_EXCHANGE,
                crate::outbox::IMPORT_ROUTING_KEY,
                &amqp
            ),
            ("test.imports", "imp")
        );
        assert_eq!(destination("elsewhere", "key", &amqp), ("elsewhere", "key"));
    }
}
