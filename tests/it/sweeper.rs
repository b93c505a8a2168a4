//! The sweeper in `maintain`: runs whose lease expired with no message holding them
//! are republished; runs abandoned for too long are failed and their unfinished
//! commits removed; and the delivery-limit path, where the broker dead-letters the
//! message of a run that was still being imported.

use std::time::Duration;

use dsa_ingest::sample::sample_csv;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::faults::assert_commit_is_the_file;
use crate::helpers::{spawn_app, wait_until, TestApp};
use crate::metrics::{get, sample};
use crate::process::{pending_run, reference, wait_for_status, Consumer};

/// Sweeps every second, republishing a second after a lease expired.
const FAST_SWEEPS: &[(&str, &str)] = &[
    ("SWEEPER_INTERVAL_SECONDS", "1"),
    ("SWEEPER_GRACE_SECONDS", "1"),
];

/// The run as a worker on another host left it when it died: running, its lease
/// expired `expired_seconds` ago.
async fn left_by_a_dead_worker(app: &TestApp, run_id: Uuid, expired_seconds: f64) {
    sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'running', lease_owner = 'gone.example:1:test',
                lease_token = lease_token + 1, attempts = attempts + 1,
                started_at = now() - make_interval(secs => $2 + 1),
                lease_expires_at = now() - make_interval(secs => $2)
          WHERE id = $1",
    )
    .bind(run_id)
    .bind(expired_seconds)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn swept(maintainer: &Consumer, action: &str) -> f64 {
    let (_, _, body) = get(maintainer.metrics_addr().await, "/metrics").await;
    sample(
        &body,
        &format!("dsa_runs_swept_total{{action=\"{action}\"}}"),
    )
}

/// The sweeps a maintainer completed so far.
async fn sweeps_done(maintainer: &Consumer) -> f64 {
    let (_, _, body) = get(maintainer.metrics_addr().await, "/metrics").await;
    sample(&body, "dsa_sweeps_total{outcome=\"done\"}")
}

#[tokio::test]
async fn expired_runs_are_republished_and_abandoned_ones_failed_with_their_commit_removed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // A run whose worker died a moment ago and whose message is gone.
    let expired = pending_run(&app, "swept", "expired.csv", 700, 11).await;
    left_by_a_dead_worker(&app, expired, 5.0).await;
    // A run abandoned two hours ago, half imported: an unfinished commit with rows.
    let abandoned = pending_run(&app, "swept", "abandoned.csv", 300, 12).await;
    // And a run created a moment ago and not queued yet: young, so left alone.
    let importer = app.importer(crate::helpers::test_settings());
    app.create_run(&importer, "swept", "abandoned.csv", false)
        .await;
    sqlx::query(
        "INSERT INTO dsa_core.commits (commit_id, dataset_id, message, run_id)
         SELECT 'unfinished', dataset_id, 'half', id FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(abandoned)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
         SELECT 'unfinished', 'abandoned:' || n, sha256(n::text::bytea)
           FROM generate_series(1, 150) n",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    left_by_a_dead_worker(&app, abandoned, 7200.0).await;

    let _consumer = Consumer::start(&app, &broker, &[]);
    let maintainer = Consumer::start_maintainer(
        &app,
        &broker,
        &[FAST_SWEEPS, &[("SWEEPER_ABANDONED_AFTER_SECONDS", "3600")]].concat(),
    );
    wait_for_status(&app, expired, "completed", Duration::from_secs(60)).await;
    wait_for_status(&app, abandoned, "failed", Duration::from_secs(30)).await;

    assert_commit_is_the_file(&app, expired, &sample_csv(700, 11), "expired").await;
    let (_, message, _) = app.run_state(abandoned).await;
    assert!(message
        .unwrap()
        .contains("(SWEEPER_ABANDONED_AFTER_SECONDS); its unfinished commit was removed"),);
    assert_eq!(
        app.count("dsa_core.commits WHERE commit_id = 'unfinished'")
            .await,
        0
    );
    assert_eq!(
        app.count("dsa_core.commit_rows WHERE commit_id = 'unfinished'")
            .await,
        0
    );
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NULL")
            .await,
        0
    );
    assert_eq!(swept(&maintainer, "republished").await, 1.0);
    assert_eq!(swept(&maintainer, "failed").await, 1.0);
    // The pending run created above and never queued is young: left alone.
    assert_eq!(
        app.count("dsa_jobs.analysis_runs WHERE status = 'pending'")
            .await,
        1
    );
    // Later sweeps republish nothing more: the run was claimed and completed.
    let sweeps = sweeps_done(&maintainer).await;
    wait_until(Duration::from_secs(30), "two more sweeps", || async {
        sweeps_done(&maintainer).await >= sweeps + 2.0
    })
    .await;
    assert_eq!(swept(&maintainer, "republished").await, 1.0);
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn a_message_dead_lettered_by_the_delivery_limit_mid_import_is_brought_back_by_the_sweeper() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let run_id = pending_run(&app, "limited", "limited.csv", 900, 13).await;
    // A long import on another host holds the run...
    sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'running', lease_owner = 'busy.example:1:test',
                lease_token = lease_token + 1, attempts = 1,
                lease_expires_at = now() + interval '3 seconds'
          WHERE id = $1",
    )
    .bind(run_id)
    .execute(&app.pool)
    .await
    .unwrap();
    // ...while its message is handed back again and again (consumer_timeout, restarts):
    // on RabbitMQ before 4.x every return counts, and at the limit it is dead-lettered.
    broker.publish_json(&reference(run_id)).await;
    let limit = broker.settings.delivery_limit;
    // Handed back until the broker dead-letters it: a message just nacked may not be
    // back on the queue yet, so an empty get is not the end.
    let mut returns = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while broker.dead_letters().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the message was not dead-lettered after {returns} returns"
        );
        let got = broker
            .channel
            .basic_get(
                broker.settings.import_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap();
        if let Some(message) = got {
            message
                .delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .unwrap();
            returns += 1;
            assert!(returns <= limit + 1, "the delivery limit was never reached");
        }
    }
    assert_eq!(broker.dead_letters().await, 1);
    assert_eq!(broker.waiting().await, 0);

    // The worker then dies (its lease runs out). Nothing on the queue names the run;
    // the sweeper does.
    let consumer = Consumer::start(&app, &broker, &[]);
    let maintainer = Consumer::start_maintainer(&app, &broker, FAST_SWEEPS);
    wait_for_status(&app, run_id, "completed", Duration::from_secs(60)).await;
    assert_commit_is_the_file(&app, run_id, &sample_csv(900, 13), "limited").await;
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_eq!(swept(&maintainer, "republished").await, 1.0);
    // The dead letter stays for a person to look at; replaying it is harmless: the
    // consumer settles it without work, the run being finished.
    assert_eq!(broker.dead_letters().await, 1);
    let skipped = || async {
        let (_, _, body) = get(consumer.metrics_addr().await, "/metrics").await;
        sample(&body, "dsa_amqp_messages_total{outcome=\"skipped\"}")
    };
    assert_eq!(skipped().await, 0.0);
    broker
        .publish(
            &broker
                .get(&broker.settings.dead_letter_queue)
                .await
                .unwrap(),
        )
        .await;
    wait_until(
        Duration::from_secs(20),
        "the replay to be skipped",
        || async { skipped().await == 1.0 },
    )
    .await;
    assert_eq!(broker.waiting().await, 0);
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_eq!(broker.dead_letters().await, 0);
}
