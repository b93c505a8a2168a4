//! What is waiting, for the metrics of `maintain`: messages ready in the import and
//! dead-letter queues, and the outbox rows not yet published.
//!
//! Read when Prometheus scrapes (see [`crate::metrics::Metrics::before_scrape`]), at
//! most once per [`CACHE`]: a passive declare answers with the queue's ready count
//! without touching the queue, and the outbox's unsent rows sit in a partial index.
//! Only `maintain` reports them, so the figures exist once per maintainer rather than
//! once per consumer; dashboards and alerts take their maximum.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::config::AmqpSettings;
use crate::metrics::{metrics, QueueName, ScrapeProbe};
use crate::queue::amqp;

/// How long figures are reused: several scrapers (or a person reloading the page)
/// cost one look every few seconds.
pub const CACHE: Duration = Duration::from_secs(5);

/// The probe that [`crate::metrics::Metrics::before_scrape`] runs.
pub fn probe(pool: PgPool, amqp: AmqpSettings) -> ScrapeProbe {
    let backlog = Arc::new(Backlog {
        pool,
        amqp,
        state: Mutex::new(State::default()),
    });
    Arc::new(move || {
        let backlog = Arc::clone(&backlog);
        Box::pin(async move { backlog.refresh().await })
    })
}

struct Backlog {
    pool: PgPool,
    amqp: AmqpSettings,
    /// The lock also makes concurrent scrapes wait for one look instead of each
    /// taking their own.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A connection of its own, opened on first use and again after it failed.
    broker: Option<(Connection, Channel)>,
    looked_at: Option<Instant>,
}

impl Backlog {
    async fn refresh(&self) {
        let mut state = self.state.lock().await;
        if state
            .looked_at
            .is_some_and(|looked_at| looked_at.elapsed() < CACHE)
        {
            return;
        }
        state.looked_at = Some(Instant::now());
        match self.outbox().await {
            Ok((unsent, oldest_age)) => metrics().set_outbox_backlog(unsent, oldest_age),
            Err(error) => tracing::warn!(error = %error, "reading the outbox backlog"),
        }
        if let Err(error) = self.queues(&mut state).await {
            tracing::warn!(error = %error, "reading the queue depths");
            state.broker = None;
        }
    }

    /// Unsent rows and the age of the oldest.
    async fn outbox(&self) -> Result<(i64, Duration), sqlx::Error> {
        let (unsent, oldest_seconds): (i64, f64) = sqlx::query_as(
            "SELECT count(*),
                    coalesce(extract(epoch FROM now() - min(created_at))::float8, 0)
               FROM dsa_jobs.outbox WHERE sent_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((unsent, Duration::from_secs_f64(oldest_seconds.max(0.0))))
    }

    async fn queues(&self, state: &mut State) -> Result<(), String> {
        if !state
            .broker
            .as_ref()
            .is_some_and(|(_, channel)| channel.status().connected())
        {
            let connection = amqp::connect(&self.amqp, "metrics")
                .await
                .map_err(|error| error.to_string())?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|error| error.to_string())?;
            state.broker = Some((connection, channel));
        }
        let (_, channel) = state.broker.as_ref().expect("connected above");
        for (queue, name) in [
            (QueueName::Import, &self.amqp.import_queue),
            (QueueName::DeadLetter, &self.amqp.dead_letter_queue),
        ] {
            // Passive: only asks; a queue not declared yet closes the channel with an
            // error, and the next look opens another.
            let declared = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|error| format!("queue {name}: {error}"))?;
            metrics().set_queue_messages_ready(queue, declared.message_count());
        }
        Ok(())
    }
}
