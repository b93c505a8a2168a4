//! The broker edge: connecting, declaring the topology, and publishing with confirms.
//!
//! Everything here is idempotent, so every process declares what it uses at start and
//! again after each reconnect; no deployment step has to create queues first.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use thiserror::Error;

use crate::config::AmqpSettings;

#[derive(Debug, Error)]
pub enum AmqpError {
    #[error("cannot reach the broker at {url}: {source}")]
    Connect {
        /// The URL without its password.
        url: String,
        source: lapin::Error,
    },
    #[error("broker error while {action}: {source}")]
    Broker {
        action: &'static str,
        source: lapin::Error,
    },
    #[error("the broker did not route the message to any queue (exchange {exchange:?}, routing key {routing_key:?}): {reply}")]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
    #[error("the broker refused the message (nack) on exchange {exchange:?}")]
    Nacked { exchange: String },
    #[error("the broker did not confirm the message on exchange {exchange:?} within {seconds} s; it may or may not be queued")]
    ConfirmTimeout { exchange: String, seconds: u64 },
    #[error("cannot encode the message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl AmqpError {
    /// The broker refused a declaration because what exists differs from what we ask
    /// for (406 PRECONDITION_FAILED, e.g. a queue declared with another delivery
    /// limit): declaring again cannot succeed, a person must reconcile the two.
    pub fn is_topology_mismatch(&self) -> bool {
        match self {
            AmqpError::Broker { action, source } if action.starts_with("declaring") => {
                matches!(source.kind(), lapin::ErrorKind::ProtocolError(error) if error.get_id() == 406)
            }
            _ => false,
        }
    }
}

fn broker(action: &'static str) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Broker { action, source }
}

/// The pause between attempts to reach the broker, the same for every process that
/// holds a broker session (consumer, maintainer, relay): from 200 ms up to 15 s, for
/// ever (a consumer has nothing better to do than wait for its broker). The one place
/// that knows the backoff crate's reconnect policy.
pub struct Reconnect {
    backoff: backoff::ExponentialBackoff,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: backoff::ExponentialBackoffBuilder::new()
                .with_initial_interval(Duration::from_millis(200))
                .with_max_interval(Duration::from_secs(15))
                .with_max_elapsed_time(None)
                .build(),
        }
    }
}

impl Reconnect {
    /// After a failed attempt: logs `what` with the error and waits the next pause.
    /// Returns false when `stop` fired first (the caller then stops trying).
    pub async fn wait_after<E: std::fmt::Display + ?Sized>(
        &mut self,
        error: &E,
        what: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> bool {
        use backoff::backoff::Backoff;
        let wait = self.backoff.next_backoff().unwrap_or(MAX_RECONNECT_PAUSE);
        tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "{what}");
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = stop.cancelled() => false,
        }
    }

    /// After a session worked: the next failure waits the shortest pause again.
    pub fn reset(&mut self) {
        use backoff::backoff::Backoff;
        self.backoff.reset();
    }
}

const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(15);

/// Opens a connection whose name (shown by `rabbitmqctl list_connections`) says which
/// process and role it belongs to.
pub async fn connect(settings: &AmqpSettings, role: &str) -> Result<Connection, AmqpError> {
    let name = format!("{role} {}", crate::process::worker_identity());
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(settings.url.expose(), properties)
        .await
        .map_err(|source| AmqpError::Connect {
            url: settings.url.to_string(),
            source,
        })
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The import exchange and quorum queue, with a dead-letter exchange and queue: a
/// message that fails `delivery_limit` times, or that a consumer rejects as unreadable,
/// ends in the dead-letter queue instead of circling for ever.
pub async fn declare_import_topology(
    channel: &Channel,
    settings: &AmqpSettings,
) -> Result<(), AmqpError> {
    channel
        .exchange_declare(
            settings.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("declaring the dead-letter exchange"))?;
    let mut dead_arguments = FieldTable::default();
    dead_arguments.insert("x-queue-type".into(), string("quorum"));
    channel
        .queue_declare(
            settings.dead_letter_queue.as_str().into(),
            durable_queue(),
            dead_arguments,
        )
        .await
        .map_err(broker("declaring the dead-letter queue"))?;
    channel
        .queue_bind(
            settings.dead_letter_queue.as_str().into(),
            settings.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("binding the dead-letter queue"))?;

    channel
        .exchange_declare(
            settings.import_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("declaring the import exchange"))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), string("quorum"));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        string(&settings.dead_letter_exchange),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
    );
    channel
        .queue_declare(
            settings.import_queue.as_str().into(),
            durable_queue(),
            arguments,
        )
        .await
        .map_err(broker("declaring the import queue"))?;
    channel
        .queue_bind(
            settings.import_queue.as_str().into(),
            settings.import_exchange.as_str().into(),
            settings.import_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("binding the import queue"))?;
    Ok(())
}

/// The maintenance exchange and its queue. The queue has a single active consumer:
/// any number of `maintain` processes may subscribe, the broker feeds one, and the next
/// takes over when it goes away, so refreshes never run from two processes at once.
pub async fn declare_maintenance_topology(
    channel: &Channel,
    settings: &AmqpSettings,
) -> Result<(), AmqpError> {
    channel
        .exchange_declare(
            settings.maintenance_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("declaring the maintenance exchange"))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), string("quorum"));
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(
            settings.maintenance_queue.as_str().into(),
            durable_queue(),
            arguments,
        )
        .await
        .map_err(broker("declaring the maintenance queue"))?;
    channel
        .queue_bind(
            settings.maintenance_queue.as_str().into(),
            settings.maintenance_exchange.as_str().into(),
            settings.maintenance_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("binding the maintenance queue"))?;
    Ok(())
}

/// A channel in confirm mode, for publishing messages that must not be lost.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(broker("opening a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(broker("enabling publisher confirms"))?;
    Ok(channel)
}

/// How long to wait for the broker's confirm before calling a publish failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes `body` as persistent JSON with `mandatory` set and waits for the broker's
/// confirm, so success means a queue has the message on disk. An unroutable message
/// (no queue bound) is an error, not a silent drop. `channel` must be in confirm mode.
pub async fn publish_json<T: Serialize + ?Sized>(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &T,
    message_id: Option<&str>,
) -> Result<(), AmqpError> {
    let payload = serde_json::to_vec(body)?;
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(ShortString::from(id));
    }
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
            properties,
        )
        .await
        .map_err(broker("publishing"))?;
    let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| AmqpError::ConfirmTimeout {
            exchange: exchange.to_owned(),
            seconds: CONFIRM_TIMEOUT.as_secs(),
        })?
        .map_err(broker("waiting for the publish confirm"))?;
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(AmqpError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply: format!("{} {}", returned.reply_code, returned.reply_text),
            })
        }
        Confirmation::Nack(None) => Err(AmqpError::Nacked {
            exchange: exchange.to_owned(),
        }),
    }
}
