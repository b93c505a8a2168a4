//! The consumer's links to PostgreSQL and to RabbitMQ through a proxy: a slow link
//! costs no retry, and a link cut mid-import (every connection reset, new ones turned
//! away for a while) costs no row and imports nothing twice. Each test checks exact counts and the
//! commit's tree hash against the file.

use std::time::{Duration, Instant};

use uuid::Uuid;

use dsa_ingest::sample::sample_csv;

use crate::broker::TestBroker;
use crate::faults::assert_commit_is_the_file;
use crate::helpers::{spawn_app, wait_until, TestApp};
use crate::process::{
    attempts, import_caught_mid_file_with, pending_run, reference, wait_for_status, Consumer,
};
use crate::proxy::LinkProxy;

/// What each chunk waits on its way, each way: a round trip costs at least twice this.
const LATENCY: Duration = Duration::from_millis(3);

/// The consumer's log line for a delivery whose run was already finished.
const FOUND_FINISHED: &str = "consume: nothing to do";

/// How long new connections are turned away after the cut.
const OUTAGE: Duration = Duration::from_secs(2);

/// The run completed once, into one commit that holds exactly the file's rows, with
/// nothing left of any other attempt: no unfinished commit, no commit_rows outside
/// the finished commit, one "handled" in the consumer's log.
async fn assert_imported_once(
    app: &TestApp,
    consumer: &Consumer,
    run_id: Uuid,
    rows: u64,
    seed: u64,
    sheet: &str,
) {
    let (status, error, completed) = app.run_state(run_id).await;
    assert_eq!(
        (status.as_str(), error, completed),
        ("completed", None, true)
    );
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_commit_is_the_file(app, run_id, &sample_csv(rows, seed), sheet).await;
    assert_eq!(app.count("dsa_core.commit_rows").await, rows as i64);
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NULL")
            .await,
        0,
        "an unfinished commit is left"
    );
    assert_eq!(
        app.count(
            "dsa_core.commit_rows cr WHERE NOT EXISTS (SELECT 1 FROM dsa_core.commits c
              WHERE c.commit_id = cr.commit_id AND c.committed_at IS NOT NULL)"
        )
        .await,
        0,
        "orphan commit_rows are left"
    );
    assert_eq!(
        app.count(&format!(
            "dsa_core.refs r JOIN dsa_core.commits c USING (commit_id)
              WHERE r.name = 'main' AND c.run_id = '{run_id}'"
        ))
        .await,
        1,
        "main points at the commit"
    );
    assert_eq!(
        consumer.log().matches("import message handled").count(),
        1,
        "{}",
        consumer.log()
    );
}

/// The message was acknowledged: once the consumer is gone, nothing comes back to
/// the queue (an unacknowledged delivery would), and nothing was dead-lettered.
async fn assert_settled_once_gone(broker: &TestBroker, consumer: Consumer) {
    drop(consumer);
    wait_until(
        Duration::from_secs(30),
        "the broker to see the consumer gone",
        || async { broker.queue_state(&broker.settings.import_queue).await.1 == 0 },
    )
    .await;
    assert_eq!(
        broker.waiting().await,
        0,
        "the message was not acknowledged"
    );
    assert_eq!(broker.dead_letters().await, 0);
}

/// Cuts every connection through `proxy` and turns new ones away until the outage has
/// lasted [`OUTAGE`] and the consumer has been turned away at least once (so the test
/// knows it tried the link while it was down), then lets connections through again.
async fn outage(proxy: &LinkProxy) {
    let began = Instant::now();
    proxy.refuse_new(true);
    proxy.cut_all();
    wait_until(
        Duration::from_secs(30),
        "the open connections to be cut",
        || async { proxy.cut() >= 1 && proxy.open() == 0 },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "a connection attempt during the outage",
        || async { proxy.refused() >= 1 && began.elapsed() >= OUTAGE },
    )
    .await;
    proxy.refuse_new(false);
}

#[tokio::test]
async fn a_slow_link_to_postgresql_costs_no_retry_and_no_row() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (proxy, database_url) = LinkProxy::in_front_of(&app.database_url, LATENCY).await;
    let run_id = pending_run(&app, "slow-db", "slow-db.csv", 5_000, 41).await;
    let consumer = Consumer::start(&app, &broker, &[("DATABASE_URL", database_url.as_str())]);
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_for_status(&app, run_id, "completed", Duration::from_secs(120)).await;

    assert!(proxy.forwarded() >= 1, "the consumer went around the proxy");
    assert_eq!(attempts(&app, run_id).await, 1);
    assert_imported_once(&app, &consumer, run_id, 5_000, 41, "slow-db").await;
    assert_settled_once_gone(&broker, consumer).await;
}

#[tokio::test]
async fn the_link_to_postgresql_cut_mid_import_and_down_for_a_while_loses_no_row() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (proxy, database_url) = LinkProxy::in_front_of(&app.database_url, LATENCY).await;
    let (consumer, run_id) = import_caught_mid_file_with(
        &app,
        &broker,
        "cut-db",
        "cut-db.csv",
        20_000,
        42,
        &[("DATABASE_URL", database_url.as_str())],
    )
    .await;
    assert_eq!(crate::process::status_of(&app, run_id).await, "running");
    outage(&proxy).await;
    wait_for_status(&app, run_id, "completed", Duration::from_secs(180)).await;

    // Whether the cut met a batch in flight (a retry) or idle connections (a fresh
    // connection at the next batch) is up to timing; either way no row is lost or
    // written twice.
    assert!(
        proxy.forwarded() > proxy.cut(),
        "the consumer never connected again"
    );
    // A lease it could not release while the link was down is its own: the consumer
    // releases it when the link is back instead of waiting for it to expire.
    assert!(
        !consumer.log().contains("held by a live worker"),
        "{}",
        consumer.log()
    );
    assert_imported_once(&app, &consumer, run_id, 20_000, 42, "cut-db").await;
    assert_settled_once_gone(&broker, consumer).await;
}

#[tokio::test]
async fn a_slow_link_to_the_broker_costs_no_retry_and_no_row() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (proxy, amqp_url) = LinkProxy::in_front_of(broker.settings.url.expose(), LATENCY).await;
    let run_id = pending_run(&app, "slow-mq", "slow-mq.csv", 5_000, 43).await;
    let consumer = Consumer::start(&app, &broker, &[("AMQP_URL", amqp_url.as_str())]);
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_for_status(&app, run_id, "completed", Duration::from_secs(120)).await;
    // The outbox relay beside the consumer publishes over the same slow link.
    wait_until(
        Duration::from_secs(30),
        "the outbox to be relayed",
        || async { app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await == 0 },
    )
    .await;

    assert!(proxy.forwarded() >= 1, "the consumer went around the proxy");
    assert_eq!(attempts(&app, run_id).await, 1);
    assert_imported_once(&app, &consumer, run_id, 5_000, 43, "slow-mq").await;
    assert_settled_once_gone(&broker, consumer).await;
}

#[tokio::test]
async fn the_link_to_the_broker_cut_mid_import_and_down_for_a_while_costs_no_row() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (proxy, amqp_url) = LinkProxy::in_front_of(broker.settings.url.expose(), LATENCY).await;
    let (consumer, run_id) = import_caught_mid_file_with(
        &app,
        &broker,
        "cut-mq",
        "cut-mq.csv",
        20_000,
        44,
        &[("AMQP_URL", amqp_url.as_str())],
    )
    .await;
    assert_eq!(crate::process::status_of(&app, run_id).await, "running");
    outage(&proxy).await;
    // The import goes on against the database; its delivery died with the channel,
    // so the broker hands the message out again once the consumer is back, and the
    // redelivery finds the run finished (or waits for it to be).
    wait_for_status(&app, run_id, "completed", Duration::from_secs(180)).await;
    wait_until(
        Duration::from_secs(60),
        "the redelivery to find the run finished",
        || async { consumer.log().contains(FOUND_FINISHED) },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the outbox to be relayed",
        || async { app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await == 0 },
    )
    .await;

    assert_eq!(
        consumer.log().matches("consuming import messages").count(),
        2,
        "{}",
        consumer.log()
    );
    assert_eq!(
        consumer.log().matches(FOUND_FINISHED).count(),
        1,
        "{}",
        consumer.log()
    );
    // The database link never broke: the one claim carried the import to its end.
    assert_eq!(attempts(&app, run_id).await, 1);
    assert_imported_once(&app, &consumer, run_id, 20_000, 44, "cut-mq").await;
    assert_settled_once_gone(&broker, consumer).await;
}
