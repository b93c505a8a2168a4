//! `dsa-ingest consume` as a real child process, against the real broker, database and
//! store: sharing work, redelivery, crashes, poison messages, a broker that drops the
//! connection, and SIGTERM.

use std::process::Command;
use std::time::Duration;

use dsa_ingest::sample::sample_csv;
use serde_json::json;
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, test_settings, wait_until, TestApp};
use crate::process::{
    attempts, import_caught_mid_file, pending_run, reference, status_of, summary_of,
    wait_for_status, Consumer,
};

#[tokio::test]
async fn two_consumers_share_six_imports_and_each_run_is_imported_once() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let mut runs = Vec::new();
    for part in 0..6 {
        runs.push(pending_run(&app, "orders", &format!("part{part}.csv"), 3_000, 40 + part).await);
    }
    let first = Consumer::start(&app, &broker, &[]);
    let second = Consumer::start(&app, &broker, &[]);
    broker.wait_for_consumers(2).await;
    for run_id in &runs {
        broker.publish_json(&reference(*run_id)).await;
    }

    wait_until(Duration::from_secs(120), "six completed runs", || async {
        app.count("dsa_jobs.analysis_runs WHERE status = 'completed'")
            .await
            == 6
    })
    .await;

    for run_id in &runs {
        assert_eq!(
            attempts(&app, *run_id).await,
            1,
            "run {run_id} was claimed twice"
        );
    }
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NOT NULL")
            .await,
        6
    );
    assert_eq!(app.count("dsa_core.commits").await, 6);
    // Every commit is a full snapshot of its own file.
    assert_eq!(app.count("dsa_core.commit_rows").await, 6 * 3_000);
    // History stayed linear although the imports finished in parallel.
    assert_eq!(
        app.count("dsa_core.commits WHERE parent_commit_id IS NULL")
            .await,
        1
    );
    assert_eq!(
        app.count("(SELECT DISTINCT parent_commit_id FROM dsa_core.commits WHERE parent_commit_id IS NOT NULL) p")
            .await,
        5
    );
    let handled = |consumer: &Consumer| consumer.log().matches("import message handled").count();
    assert_eq!(handled(&first) + handled(&second), 6);
    assert!(
        handled(&first) > 0 && handled(&second) > 0,
        "one consumer did all the work: {} and {}",
        handled(&first),
        handled(&second)
    );
    assert_eq!(broker.waiting().await, 0);
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn a_message_delivered_twice_gives_one_commit() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("twice.csv", sample_csv(2_000, 7)).await;
    let request = json!({
        "idempotency_key": "nightly-2026-11-28",
        "dataset": "twice",
        "source": {"bucket": app.bucket, "key": "twice.csv"},
        "user": "billing",
        "options": {"message": "Nightly export"}
    });
    let _consumer = deliver_twice(&app, &broker, &request).await;
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 1);
    assert_eq!(app.count("dsa_core.commits").await, 1);
    let (user, message): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT r.user_id, c.message FROM dsa_jobs.analysis_runs r
           JOIN dsa_core.commits c ON c.run_id = r.id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(user.as_deref(), Some("billing"));
    assert_eq!(message.as_deref(), Some("Nightly export"));
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn a_killed_consumers_run_is_resumed_by_the_redelivery() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (mut doomed, run_id) =
        import_caught_mid_file(&app, &broker, "crash", "crash.csv", 20_000, 3).await;
    doomed.signal(libc::SIGKILL);
    doomed.exit(Duration::from_secs(10)).await;
    assert_eq!(status_of(&app, run_id).await, "running");

    let _rescuer = Consumer::start(&app, &broker, &[]);
    wait_for_status(&app, run_id, "completed", Duration::from_secs(60)).await;

    let summary = summary_of(&app, run_id).await;
    assert!(
        summary["resumed_from_byte"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(summary["rows"], 20_000);
    assert_eq!(attempts(&app, run_id).await, 2);
    assert_eq!(app.count("dsa_core.commits").await, 1);
    let commit_id = summary["commit_id"].as_str().unwrap();
    assert_eq!(
        app.count(&format!(
            "(SELECT DISTINCT logical_row_id FROM dsa_core.commit_rows WHERE commit_id = '{commit_id}') ids"
        ))
        .await,
        20_000
    );
    // The resumed commit is the commit an uninterrupted import makes.
    let uninterrupted = app.import("reference", "crash.csv").await;
    assert_eq!(summary["tree_hash"], uninterrupted.tree_hash.as_str());
}

#[tokio::test]
async fn unreadable_messages_go_to_the_dead_letter_queue_and_the_consumer_goes_on() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let consumer = Consumer::start(&app, &broker, &[]);
    broker.wait_for_consumers(1).await;
    broker.publish(b"this is not json").await;
    broker.publish_json(&json!({"hello": "world"})).await;
    broker.publish_json(&reference(Uuid::new_v4())).await;

    let dead_letters = &broker.settings.dead_letter_queue;
    wait_until(Duration::from_secs(30), "three dead letters", || async {
        broker.dead_letters().await == 3
    })
    .await;
    // Two workers settle them, so the order in the dead-letter queue is not fixed.
    let mut bodies = Vec::new();
    while let Some(body) = broker.get(dead_letters).await {
        bodies.push(body);
    }
    assert_eq!(bodies.len(), 3);
    assert!(bodies.iter().any(|body| body == b"this is not json"));
    let log = consumer.log();
    assert!(log.contains("not valid JSON"), "{log}");
    assert!(log.contains("does not exist"), "{log}");

    let run_id = pending_run(&app, "after", "after.csv", 500, 1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_for_status(&app, run_id, "completed", Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_bad_file_fails_its_run_and_the_message_is_acknowledged() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("ragged.csv", b"a,b\n1,2\n3\n".to_vec()).await;
    let importer = app.importer(test_settings());
    let (run_id, _) = app
        .create_run(&importer, "ragged", "ragged.csv", false)
        .await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    broker.publish_json(&reference(run_id)).await;

    wait_for_status(&app, run_id, "failed", Duration::from_secs(30)).await;
    let (_, error, _) = app.run_state(run_id).await;
    assert!(error.unwrap().contains("line 3"));
    // Acknowledged: neither waiting in the queue nor dead-lettered.
    wait_until(Duration::from_secs(10), "the queue to drain", || async {
        broker.waiting().await == 0
    })
    .await;
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn an_s3_event_imports_each_object_once_into_the_dataset_its_key_names() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("sales/2026/day 1.csv", sample_csv(1_000, 5)).await;
    let etag = app
        .s3
        .head_object()
        .bucket(&app.bucket)
        .key("sales/2026/day 1.csv")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let event = json!({
        "EventName": "s3:ObjectCreated:Put",
        "Key": format!("{}/sales/2026/day 1.csv", app.bucket),
        "Records": [{
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "eventName": "s3:ObjectCreated:Put",
            "s3": {
                "bucket": {"name": app.bucket},
                "object": {"key": "sales%2F2026%2Fday+1.csv", "size": 1, "eTag": etag, "sequencer": "17A"}
            }
        }]
    });
    let _consumer = deliver_twice(&app, &broker, &event).await;
    assert_eq!(
        app.count("dsa_jobs.analysis_runs WHERE status = 'completed'")
            .await,
        1
    );
    assert_eq!(
        app.count("dsa_core.commits c JOIN dsa_core.datasets d ON d.id = c.dataset_id WHERE d.name = 'sales'")
            .await,
        1
    );
    assert_eq!(
        app.count("dsa_core.commit_rows WHERE logical_row_id = 'day 1:1000'")
            .await,
        1
    );
}

/// The broker's pid for the connection a process opened (its name carries the pid).
fn broker_connection_of(pid: u32) -> Option<String> {
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("run rabbitmqctl");
    let name = format!(":{pid}\"}}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.contains("\"consume dsa-ingest@") && line.contains(&name))
        .and_then(|line| line.split('\t').next())
        .map(str::to_owned)
}

#[tokio::test]
async fn a_connection_closed_by_the_broker_is_recovered_and_the_import_finishes_once() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (consumer, run_id) =
        import_caught_mid_file(&app, &broker, "cut", "cut.csv", 20_000, 9).await;

    let connection = broker_connection_of(consumer.pid()).expect("the consumer's connection");
    let closed = Command::new("rabbitmqctl")
        .args([
            "close_connection",
            &connection,
            "test closes the connection",
        ])
        .output()
        .unwrap();
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );

    wait_for_status(&app, run_id, "completed", Duration::from_secs(90)).await;
    // The import went on in the same process; the redelivered message found it held
    // and waited for it instead of starting a second import.
    assert_eq!(attempts(&app, run_id).await, 1);
    assert_eq!(app.count("dsa_core.commits").await, 1);
    wait_until(
        Duration::from_secs(30),
        "the redelivered message to be settled",
        || async {
            broker.queue_state(&broker.settings.import_queue).await == (0, 1)
                && consumer.log().contains("nothing to do")
        },
    )
    .await;
    assert!(
        consumer.log().contains("reconnecting"),
        "{}",
        consumer.log()
    );

    // Subscribed again: new work is taken.
    let next = pending_run(&app, "cut", "next.csv", 500, 2).await;
    broker.publish_json(&reference(next)).await;
    wait_for_status(&app, next, "completed", Duration::from_secs(30)).await;
}

#[tokio::test]
async fn sigterm_stops_after_the_batch_in_flight_and_leaves_the_run_resumable() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (mut stopping, run_id) =
        import_caught_mid_file(&app, &broker, "stop", "stop.csv", 20_000, 4).await;

    stopping.signal(libc::SIGTERM);
    let status = stopping.exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(stopping.log().contains("consumer stopped"));
    // Not failed, not held: the next consumer can take it at once.
    let (state, released): (String, bool) = sqlx::query_as(
        "SELECT status::text, coalesce(lease_expires_at <= now(), true)
           FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(state, "running");
    assert!(released, "the lease is still held");
    // The broker requeues the message as it handles the closed channel, which may be a
    // moment after the process has exited.
    wait_until(
        Duration::from_secs(10),
        "the message to be back in the queue, ready",
        || async { broker.queue_state(&broker.settings.import_queue).await == (1, 0) },
    )
    .await;

    let _next = Consumer::start(&app, &broker, &[]);
    wait_for_status(&app, run_id, "completed", Duration::from_secs(60)).await;
    let summary = summary_of(&app, run_id).await;
    assert!(summary["resumed_from_byte"].as_u64().unwrap() > 0);
    assert_eq!(summary["rows"], 20_000);
}

/// Publishes `body` twice, then starts a consumer and waits until it handled both: one
/// import, and one delivery that found the run finished.
async fn deliver_twice(app: &TestApp, broker: &TestBroker, body: &serde_json::Value) -> Consumer {
    broker.publish_json(body).await;
    broker.publish_json(body).await;
    let consumer = Consumer::start(app, broker, &[]);
    wait_until(
        Duration::from_secs(60),
        "both deliveries to be handled",
        || async {
            let log = consumer.log();
            log.contains("import message handled") && log.contains("nothing to do")
        },
    )
    .await;
    consumer
}

#[tokio::test]
async fn an_unusable_s3_event_record_fails_its_own_run_and_the_others_are_imported() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("good/a.csv", sample_csv(100, 6)).await;
    let record = |key: &str| {
        json!({
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": app.bucket}, "object": {"key": key, "sequencer": "1"}}
        })
    };
    // `%0A` decodes to a line feed: no dataset can be named after that segment.
    let event = json!({ "Records": [record("%0A%2Fbad.csv"), record("good%2Fa.csv")] });
    let _consumer = Consumer::start(&app, &broker, &[]);
    broker.publish_json(&event).await;

    wait_until(
        Duration::from_secs(30),
        "both records to have runs",
        || async {
            app.count("dsa_jobs.analysis_runs WHERE status IN ('completed', 'failed')")
                .await
                == 2
        },
    )
    .await;
    let (error,): (Option<String>,) =
        sqlx::query_as("SELECT error_message FROM dsa_jobs.analysis_runs WHERE status = 'failed'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(error.unwrap().contains("dataset name"));
    assert_eq!(app.count("dsa_core.commit_rows").await, 100);
    wait_until(
        Duration::from_secs(10),
        "the message to be settled",
        || async { broker.waiting().await == 0 },
    )
    .await;
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn a_store_that_stays_away_is_retried_then_the_message_dead_lettered_and_a_replay_resumes() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let run_id = pending_run(&app, "away", "away.csv", 300, 12).await;
    // A port nothing listens on: every request to the store is refused.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let consumer = Consumer::start(
        &app,
        &broker,
        &[
            ("S3_ENDPOINT", closed.as_str()),
            ("AMQP_RETRY_SECONDS", "2"),
        ],
    );
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;

    wait_until(
        Duration::from_secs(60),
        "the message to be dead-lettered",
        || async { broker.dead_letters().await == 1 },
    )
    .await;
    assert!(consumer.log().contains("transient failure; retrying"));
    let (status, error, _) = app.run_state(run_id).await;
    assert_eq!(status, "pending", "the run is parked, not failed");
    assert!(error.unwrap().contains("replay it to resume"));

    // With the store back, replaying the dead letter imports the run.
    let body = broker
        .get(&broker.settings.dead_letter_queue)
        .await
        .unwrap();
    drop(consumer);
    let _healthy = Consumer::start(&app, &broker, &[]);
    broker.publish(&body).await;
    wait_for_status(&app, run_id, "completed", Duration::from_secs(30)).await;
    let (_, error, _) = app.run_state(run_id).await;
    assert_eq!(error, None, "a completed run carries no old error");
}
