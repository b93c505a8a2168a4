//! The health and metrics server over a real TCP connection, against the test database.
//!
//! The metrics are process-wide and other tests import in parallel, so counter values
//! are checked on a child process of their own, which imports only what its test gives.

use std::net::SocketAddr;
use std::time::Duration;

use dsa_ingest::http::{spawn_server, Health};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, wait_until};
use crate::process::{pending_run, reference, status_of, summary_of, Consumer};

/// One HTTP/1.1 GET; returns the status code, the headers (lower-cased names) and the
/// body. `Connection: close` lets the body run to the end of the stream.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("headers end with a blank line");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// The value of one series (`name` or `name{labels}`) in the text format.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} is not in:\n{text}"))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served_over_http() {
    let app = spawn_app().await;
    let health = Health::new(app.pool.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = spawn_server("127.0.0.1:0", health.clone(), async {
        let _ = stopped.await;
    })
    .await
    .expect("bind port 0");
    let addr = server.local_addr;
    assert_ne!(addr.port(), 0);

    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // The database answers but no broker connection was reported yet.
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker: not connected"), "{body}");
    assert!(!body.contains("database"), "{body}");

    health.set_broker_connected(true);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    let (status, headers, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let content_type = headers
        .iter()
        .find(|(name, _)| name == "content-type")
        .map(|(_, value)| value.as_str());
    assert_eq!(content_type, Some("text/plain; version=0.0.4"));
    // The pool is watched since the server started and holds the connection readiness
    // used.
    let open = sample(&text, "dsa_db_pool_connections{state=\"in_use\"}")
        + sample(&text, "dsa_db_pool_connections{state=\"idle\"}");
    assert!(open >= 1.0, "{text}");
    assert!(sample(&text, "dsa_process_peak_resident_memory_bytes") > 0.0);
    // The standard process metrics keep their standard names.
    assert!(sample(&text, "process_resident_memory_bytes") > 0.0);
    assert!(sample(&text, "process_start_time_seconds") > 0.0);
    assert!(sample(&text, "dsa_db_pool_max_connections") >= 1.0);

    let (status, _, _) = get(addr, "/nowhere").await;
    assert_eq!(status, 404);

    // The server ends when told to; its listener is part of the task's future, so it
    // is closed once the task has ended.
    stop.send(()).expect("server still running");
    tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .expect("the server stopped when told to")
        .expect("server task did not panic")
        .expect("server ended cleanly");
}

#[tokio::test]
async fn readiness_names_the_database_when_it_does_not_answer() {
    let app = spawn_app().await;
    // A pool of its own, closed: queries fail at once, as when the database is gone.
    let pool = dsa_ingest::db::connect(&app.database_url, 1)
        .await
        .expect("connect");
    pool.close().await;
    let health = Health::new(pool);
    health.set_broker_connected(true);

    let not_ready = health.check_ready().await.expect_err("database is down");
    assert_eq!(not_ready.reasons.len(), 1, "{not_ready}");
    assert!(
        not_ready.reasons[0].starts_with("database: "),
        "{not_ready}"
    );

    health.set_broker_connected(false);
    let not_ready = health.check_ready().await.expect_err("both are down");
    assert_eq!(not_ready.reasons.len(), 2, "{not_ready}");
    assert_eq!(not_ready.reasons[1], "broker: not connected");
}

#[tokio::test]
async fn a_consumer_counts_exactly_the_import_it_did() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // 1,200 rows in batches of 500 (the child's settings): three batches, and a file of
    // about 120 KB read in ranges of 64 KiB.
    let run_id = pending_run(&app, "counted", "counted.csv", 1_200, 3).await;
    let consumer = Consumer::start(&app, &broker, &[]);
    let addr = consumer.metrics_addr().await;
    let (_, _, before) = get(addr, "/metrics").await;
    assert_eq!(sample(&before, "dsa_rows_processed_total"), 0.0);

    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_until(
        std::time::Duration::from_secs(60),
        "the run to complete",
        || async { status_of(&app, run_id).await == "completed" },
    )
    .await;
    let summary = summary_of(&app, run_id).await;
    let bytes = summary["bytes"].as_f64().unwrap();
    let ranges = (bytes / 65536.0).ceil();

    // The consumer counts the run just after the run completes.
    let completed = "dsa_import_runs_total{format=\"csv\",status=\"completed\"}";
    wait_until(
        std::time::Duration::from_secs(10),
        "the run to be counted",
        || async move { sample(&get(addr, "/metrics").await.2, completed) == 1.0 },
    )
    .await;
    let (_, _, after) = get(addr, "/metrics").await;
    assert_eq!(sample(&after, "dsa_rows_processed_total"), 1_200.0);
    assert_eq!(
        sample(&after, "dsa_rows_deduplicated_total"),
        0.0,
        "{after}"
    );
    assert_eq!(sample(&after, "dsa_bytes_processed_total"), bytes);
    assert_eq!(sample(&after, "dsa_batch_duration_seconds_count"), 3.0);
    assert_eq!(
        sample(&after, "dsa_s3_requests_total{operation=\"head\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "dsa_s3_requests_total{operation=\"get_range\"}"),
        ranges
    );
    assert_eq!(
        sample(
            &after,
            "dsa_import_runs_total{format=\"csv\",status=\"failed\"}"
        ),
        0.0
    );
    // The import took its connection (and the claim a transaction's) through the timed
    // acquire; nothing is in flight any more.
    assert!(sample(&after, "dsa_db_pool_acquire_duration_seconds_count") >= 2.0);
    assert_eq!(sample(&after, "dsa_import_oldest_start_time_seconds"), 0.0);
    assert_eq!(sample(&after, "dsa_imports_in_flight"), 0.0);
    // The consumer watches the spool directory's file system.
    assert!(sample(&after, "dsa_spool_filesystem_size_bytes") > 0.0);
    assert!(sample(&after, "dsa_spool_filesystem_free_bytes") > 0.0);
    assert_eq!(sample(&after, "dsa_spool_used_bytes"), 0.0);
}

#[tokio::test]
async fn rows_are_counted_as_batches_commit_while_the_import_runs() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // A slow store: the run is caught after some batches committed, long before its end.
    let (consumer, run_id) =
        crate::process::import_caught_mid_file(&app, &broker, "steady", "steady.csv", 40_000, 5)
            .await;
    let addr = consumer.metrics_addr().await;
    // The counter moves just after each batch's transaction commits.
    let loaded = crate::process::loaded_rows(&app, run_id).await as f64;
    assert!(loaded > 0.0);
    wait_until(
        Duration::from_secs(10),
        "the committed rows to be counted",
        || async move {
            sample(&get(addr, "/metrics").await.2, "dsa_rows_processed_total") >= loaded
        },
    )
    .await;
    let (_, _, text) = get(addr, "/metrics").await;
    assert!(sample(&text, "dsa_bytes_processed_total") > 0.0);
    assert_eq!(sample(&text, "dsa_imports_in_flight"), 1.0);
    let oldest = sample(&text, "dsa_import_oldest_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(oldest > now - 120.0 && oldest <= now, "{oldest} vs {now}");
    assert_eq!(status_of(&app, run_id).await, "running");
}

#[tokio::test]
async fn a_failed_run_is_counted_with_its_format_and_reason() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let run_id = pending_run(&app, "too-big", "too-big.csv", 1_200, 4).await;
    let consumer = Consumer::start(&app, &broker, &[("IMPORT_MAX_FILE_SIZE", "1000")]);
    let addr = consumer.metrics_addr().await;
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_until(Duration::from_secs(60), "the run to fail", || async {
        status_of(&app, run_id).await == "failed"
    })
    .await;
    let failed = "dsa_import_failures_total{format=\"csv\",reason=\"too_large\"}";
    wait_until(
        Duration::from_secs(10),
        "the failure to be counted",
        || async move { sample(&get(addr, "/metrics").await.2, failed) == 1.0 },
    )
    .await;
    let (_, _, text) = get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &text,
            "dsa_import_runs_total{format=\"csv\",status=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "dsa_import_failures_total{format=\"csv\",reason=\"bad_input\"}"
        ),
        0.0
    );
    assert_eq!(sample(&text, "dsa_rows_processed_total"), 0.0);
}

/// Publishes `body` straight into `queue` through the default exchange.
async fn publish_to_queue(broker: &TestBroker, queue: &str, body: &[u8]) {
    broker
        .channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

/// Every `dsa_*` and `process_*` name in `text`: the metric names a dashboard query or
/// an alert expression uses.
fn metric_names_used(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("dsa_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// The sample names of a scrape (a histogram's `_bucket`, `_sum` and `_count` each).
fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn maintain_reports_the_backlog_and_every_name_the_dashboard_and_alerts_use() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    for n in 0..3 {
        broker.publish_json(&serde_json::json!({ "n": n })).await;
    }
    publish_to_queue(&broker, &broker.settings.dead_letter_queue, b"{}").await;
    // An outbox row nobody can deliver (no queue is bound to this key), an hour old:
    // the relay tries it and leaves it unsent.
    sqlx::query(
        "INSERT INTO dsa_jobs.outbox (exchange, routing_key, payload, created_at)
         VALUES ('amq.direct', 'nowhere', '{}', now() - interval '1 hour')",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let maintainer = Consumer::start_maintainer(&app, &broker, &[]);
    let addr = maintainer.metrics_addr().await;
    let (_, _, text) = get(addr, "/metrics").await;
    assert_eq!(
        sample(&text, "dsa_amqp_queue_messages_ready{queue=\"import\"}"),
        3.0,
        "{}",
        maintainer.log()
    );
    assert_eq!(
        sample(
            &text,
            "dsa_amqp_queue_messages_ready{queue=\"dead_letter\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "dsa_outbox_unsent_messages"), 1.0);
    let age = sample(&text, "dsa_outbox_oldest_unsent_age_seconds");
    assert!((3590.0..3700.0).contains(&age), "{age}");

    // A consumer's scrape beside the maintainer's: together they export every metric
    // name the shipped dashboard and alert rules use, so renaming a metric fails here
    // rather than leaving an empty panel or an alert that can never fire.
    let consumer = Consumer::start(&app, &broker, &[]);
    let (_, _, consumer_text) = get(consumer.metrics_addr().await, "/metrics").await;
    let mut exported = sample_names(&text);
    exported.extend(sample_names(&consumer_text));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "charts/dsa-ingest/dashboards/dsa-ingest.json",
        "charts/dsa-ingest/templates/prometheusrule.yaml",
        "tests/ops/alerts-test.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect("read the file");
        let used = metric_names_used(&text);
        assert!(!used.is_empty(), "{file} uses no dsa_ metric");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no scrape exports: {missing:?}"
        );
    }
}

#[tokio::test]
async fn readiness_uses_its_own_connection_and_caches_its_answer_for_a_second() {
    let app = spawn_app().await;
    // The import pool is exhausted: its only connection is held by a transaction.
    let imports = dsa_ingest::db::connect(&app.database_url, 1)
        .await
        .expect("connect");
    let _busy = imports.begin().await.expect("hold the only connection");
    let probe = dsa_ingest::db::probe_pool(&app.database_url).expect("probe pool");
    let health = Health::with_probe(imports.clone(), probe.clone());
    health.set_broker_connected(true);
    let started = std::time::Instant::now();
    health
        .check_ready()
        .await
        .expect("ready on the probe's own connection");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Within the cache window the answer is reused, even though the database is gone
    // for the probe now; after it, the probe asks again and finds it gone.
    probe.close().await;
    health.check_ready().await.expect("the cached answer");
    tokio::time::sleep(dsa_ingest::http::READY_CACHE + Duration::from_millis(100)).await;
    let not_ready = health.check_ready().await.expect_err("asked again");
    assert!(
        not_ready.reasons[0].starts_with("database: "),
        "{not_ready}"
    );
}
