//! Publishes the broker refuses: a message no queue is bound for (`mandatory`, reply
//! 312 NO_ROUTE) and one a full queue nacks (`x-overflow: reject-publish`), in the
//! outbox relay and in `submit`. Neither may be taken for a delivered message.

use dsa_ingest::cli::submit::{queue_run, SubmitError};
use dsa_ingest::config::AmqpSettings;
use dsa_ingest::queue::amqp::AmqpError;
use dsa_ingest::queue::relay::{self, RelayError};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::ExchangeKind;
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, test_settings, TestApp};

/// Messages ready in `queue`.
async fn ready(broker: &TestBroker, queue: &str) -> u32 {
    broker
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
        .expect("look at the queue")
        .message_count()
}

/// One search-refresh request waiting in the outbox.
async fn queue_one_refresh(app: &TestApp) {
    sqlx::query(
        "INSERT INTO dsa_jobs.outbox (exchange, routing_key, payload)
         VALUES ('dsa.maintenance', 'refresh_search_index',
                 '{\"task\": \"refresh_search_index\"}')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
}

/// A direct exchange of this test with no queue bound to it.
async fn exchange_to_nowhere(broker: &TestBroker) -> String {
    let name = format!("{}.nowhere", broker.settings.import_exchange);
    broker
        .channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    name
}

/// A direct exchange whose only queue holds nothing and refuses what comes: every
/// publish to it is nacked.
async fn exchange_to_a_full_queue(broker: &TestBroker) -> String {
    let name = format!("{}.full", broker.settings.import_exchange);
    let channel = &broker.channel;
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(0));
    arguments.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    for routing_key in [
        "refresh_search_index",
        broker.settings.import_routing_key.as_str(),
    ] {
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    name
}

#[tokio::test]
async fn the_relay_leaves_an_unroutable_row_unsent_and_publishes_it_once_routable() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    queue_one_refresh(&app).await;
    let (_connection, channel) = relay::open(&broker.settings).await.expect("open relay");
    let settings = &broker.settings;
    // Someone removes the binding after the relay declared it.
    broker
        .channel
        .queue_unbind(
            settings.maintenance_queue.as_str().into(),
            settings.maintenance_exchange.as_str().into(),
            settings.maintenance_routing_key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let published = relay::relay_once(&app.pool, &channel, settings)
        .await
        .expect("an unroutable row is not an error of the pass");
    assert_eq!(published, 0);
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 1);
    assert_eq!(ready(&broker, &settings.maintenance_queue).await, 0);

    // The binding is back: the same row goes out, once.
    broker
        .channel
        .queue_bind(
            settings.maintenance_queue.as_str().into(),
            settings.maintenance_exchange.as_str().into(),
            settings.maintenance_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let published = relay::relay_once(&app.pool, &channel, settings)
        .await
        .expect("relay");
    assert_eq!(published, 1);
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 0);
    assert_eq!(ready(&broker, &settings.maintenance_queue).await, 1);
}

#[tokio::test]
async fn the_relay_keeps_a_nacked_row_unsent_and_reports_the_nack() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    queue_one_refresh(&app).await;
    let settings = AmqpSettings {
        maintenance_exchange: exchange_to_a_full_queue(&broker).await,
        ..broker.settings.clone()
    };
    let channel = dsa_ingest::queue::amqp::confirm_channel(&broker.connection)
        .await
        .unwrap();

    let error = relay::relay_once(&app.pool, &channel, &settings)
        .await
        .expect_err("a nack ends the pass");
    assert!(
        matches!(error, RelayError::Amqp(AmqpError::Nacked { .. })),
        "{error}"
    );
    assert_eq!(app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await, 1);
}

/// Queues a run through `settings`' import exchange as `submit` does, and returns the
/// error and the run's state afterwards.
async fn queue_through(
    app: &TestApp,
    broker: &TestBroker,
    settings: &AmqpSettings,
) -> (SubmitError, Uuid, (String, Option<String>, bool)) {
    let importer = app.importer(test_settings());
    let (run_id, _) = app
        .create_run(&importer, "orders", "orders.csv", false)
        .await;
    let channel = dsa_ingest::queue::amqp::confirm_channel(&broker.connection)
        .await
        .unwrap();
    let error = queue_run(&channel, settings, &app.pool, run_id)
        .await
        .expect_err("the message was not queued");
    (error, run_id, app.run_state(run_id).await)
}

#[tokio::test]
async fn submit_fails_the_run_when_no_queue_takes_its_message() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let settings = AmqpSettings {
        import_exchange: exchange_to_nowhere(&broker).await,
        ..broker.settings.clone()
    };
    let (error, run_id, (status, message, _)) = queue_through(&app, &broker, &settings).await;
    assert!(
        matches!(&error, SubmitError::NotQueued { run_id: id, source: AmqpError::Unroutable { .. } } if *id == run_id),
        "{error}"
    );
    assert_eq!(status, "failed");
    let message = message.unwrap();
    assert!(
        message.contains("never queued") && message.contains("312"),
        "{message}"
    );
    assert_eq!(ready(&broker, &broker.settings.import_queue).await, 0);
}

#[tokio::test]
async fn submit_fails_the_run_when_the_broker_nacks_its_message() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let settings = AmqpSettings {
        import_exchange: exchange_to_a_full_queue(&broker).await,
        ..broker.settings.clone()
    };
    let (error, run_id, (status, message, _)) = queue_through(&app, &broker, &settings).await;
    assert!(
        matches!(&error, SubmitError::NotQueued { run_id: id, source: AmqpError::Nacked { .. } } if *id == run_id),
        "{error}"
    );
    assert_eq!(status, "failed");
    assert!(message.unwrap().contains("nack"));
}
