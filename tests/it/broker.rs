//! Test scaffolding for the broker: every test gets its own exchanges and queues on the
//! real RabbitMQ (names carry a random suffix), removed again when the test ends.

use std::time::Duration;

use dsa_ingest::config::AmqpSettings;
use dsa_ingest::queue::amqp;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use uuid::Uuid;

use crate::helpers::{run_on_own_thread, service_settings, wait_until};

pub struct TestBroker {
    pub settings: AmqpSettings,
    /// Kept open for as long as the test runs: the channel lives on it.
    pub connection: Connection,
    /// A channel in confirm mode, for publishing like a real producer does.
    pub channel: Channel,
}

impl TestBroker {
    pub async fn new() -> Self {
        let services = service_settings();
        let suffix = &Uuid::new_v4().simple().to_string()[..12];
        let name = |base: &str| format!("test.{suffix}.{base}");
        let settings = AmqpSettings {
            url: services
                .get("AMQP_URL")
                .cloned()
                .unwrap_or_else(|| dsa_ingest::config::DEFAULT_AMQP_URL.to_owned())
                .into(),
            import_exchange: name("imports"),
            import_queue: name("imports"),
            dead_letter_exchange: name("imports.dead"),
            dead_letter_queue: name("imports.dead"),
            maintenance_exchange: name("maintenance"),
            maintenance_queue: name("maintenance"),
            ..AmqpSettings::default()
        };
        Self::attach(settings).await
    }

    /// Connects to (and declares, again if need be) the topology `settings` names.
    pub async fn attach(settings: AmqpSettings) -> Self {
        let connection = amqp::connect(&settings, "test")
            .await
            .expect("connect to RabbitMQ");
        let channel = amqp::confirm_channel(&connection).await.expect("channel");
        amqp::declare_import_topology(&channel, &settings)
            .await
            .expect("declare import topology");
        amqp::declare_maintenance_topology(&channel, &settings)
            .await
            .expect("declare maintenance topology");
        Self {
            settings,
            connection,
            channel,
        }
    }

    /// The `AMQP_*` variables that point a child process at this test's topology.
    pub fn env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        [
            ("AMQP_URL", s.url.expose()),
            ("AMQP_IMPORT_EXCHANGE", &s.import_exchange),
            ("AMQP_IMPORT_QUEUE", &s.import_queue),
            ("AMQP_DEAD_LETTER_EXCHANGE", &s.dead_letter_exchange),
            ("AMQP_DEAD_LETTER_QUEUE", &s.dead_letter_queue),
            ("AMQP_MAINTENANCE_EXCHANGE", &s.maintenance_exchange),
            ("AMQP_MAINTENANCE_QUEUE", &s.maintenance_queue),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
    }

    /// Publishes raw bytes to the import exchange, persistent, and waits for the confirm.
    pub async fn publish(&self, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                self.settings.import_exchange.as_str().into(),
                self.settings.import_routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        let confirmation = confirm.await.expect("confirm");
        assert!(
            confirmation.is_ack() && confirmation.take_message().is_none(),
            "the import queue did not take the message"
        );
    }

    pub async fn publish_json(&self, body: &serde_json::Value) {
        self.publish(&serde_json::to_vec(body).unwrap()).await;
    }

    /// Takes one message from `queue` (acknowledging it), if there is one.
    pub async fn get(&self, queue: &str) -> Option<Vec<u8>> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")?;
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(message.delivery.data.clone())
    }

    /// Takes every message waiting on `queue` (acknowledged on delivery), with its
    /// properties.
    pub async fn take_all(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut messages = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            messages.push(message.delivery);
        }
        messages
    }

    /// (messages ready, consumers) of a queue, as the broker counts them.
    pub async fn queue_state(&self, queue: &str) -> (u32, u32) {
        let declared = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        (declared.message_count(), declared.consumer_count())
    }

    /// Messages waiting in the import queue.
    pub async fn waiting(&self) -> u32 {
        self.queue_state(&self.settings.import_queue).await.0
    }

    /// Messages in the dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        self.queue_state(&self.settings.dead_letter_queue).await.0
    }

    /// Waits until `count` consumers are subscribed to the import queue.
    pub async fn wait_for_consumers(&self, count: u32) {
        let queue = &self.settings.import_queue;
        wait_until(
            Duration::from_secs(60),
            &format!("{count} consumers"),
            || async { self.queue_state(queue).await.1 >= count },
        )
        .await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        delete_topology(self.settings.clone());
    }
}

/// Deletes every exchange and queue `settings` names, on a connection of its own (the
/// test's belongs to the runtime that is dropping).
pub fn delete_topology(settings: AmqpSettings) {
    run_on_own_thread(async move {
        let Ok(connection) = amqp::connect(&settings, "test cleanup").await else {
            return;
        };
        // A failed delete closes its channel, so each gets a channel of its own.
        for queue in [
            &settings.import_queue,
            &settings.dead_letter_queue,
            &settings.maintenance_queue,
        ] {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for exchange in [
            &settings.import_exchange,
            &settings.dead_letter_exchange,
            &settings.maintenance_exchange,
        ] {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "test done".into()).await;
    });
}
