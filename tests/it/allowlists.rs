//! Messages that must not reach what they should not: the bucket allow-list, local
//! paths from the queue, and the opt-in metadata rule for S3 events.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use dsa_ingest::import::run::{ImportParameters, SourceLocation};
use dsa_ingest::sample::sample_csv;
use serde_json::json;
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, wait_until, TestApp};
use crate::process::{reference, Consumer};

/// A pending run whose stored parameters name `source`, as a publisher with database
/// access (or one that forged the row) would leave it.
async fn run_reading(app: &TestApp, source: SourceLocation) -> Uuid {
    let parameters = ImportParameters {
        source,
        expected_etag: None,
        options: Default::default(),
    };
    let (run_id, _) = dsa_ingest::runs::create_for_dataset(
        &app.pool,
        &dsa_ingest::db::DatasetName::parse("target").unwrap(),
        None,
        &parameters,
    )
    .await
    .unwrap();
    run_id
}

async fn error_of(app: &TestApp, run_id: Uuid) -> String {
    let (status, message, _) = app.run_state(run_id).await;
    assert_eq!(status, "failed", "run {run_id}: {message:?}");
    message.unwrap_or_default()
}

async fn settled(app: &TestApp, broker: &TestBroker, runs: i64) {
    wait_until(Duration::from_secs(60), "every run to end", || async {
        app.count("dsa_jobs.analysis_runs WHERE status IN ('completed', 'failed')")
            .await
            == runs
    })
    .await;
    wait_until(Duration::from_secs(10), "the queue to drain", || async {
        broker.waiting().await == 0
    })
    .await;
    assert_eq!(broker.dead_letters().await, 0, "refusals are acknowledged");
}

#[tokio::test]
async fn sources_outside_the_allow_lists_fail_their_runs_naming_the_rule_and_are_acknowledged() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("allowed/a.csv", sample_csv(50, 1)).await;
    app.put("private/b.csv", sample_csv(50, 2)).await;
    let local_root = tempfile::tempdir().unwrap();
    let inside = local_root.path().join("inside.csv");
    std::fs::write(&inside, sample_csv(20, 3)).unwrap();
    let escape = local_root.path().join("escape.csv");
    std::os::unix::fs::symlink("/etc/passwd", &escape).unwrap();

    let passwd = run_reading(
        &app,
        SourceLocation::Local {
            path: "/etc/passwd".into(),
        },
    )
    .await;
    let symlinked = run_reading(&app, SourceLocation::Local { path: escape }).await;
    let local_ok = run_reading(&app, SourceLocation::Local { path: inside }).await;
    let _consumer = Consumer::start(
        &app,
        &broker,
        &[
            (
                "IMPORT_ALLOWED_BUCKETS",
                &format!("{}/allowed/", app.bucket),
            ),
            (
                "IMPORT_ALLOW_LOCAL_SOURCES",
                local_root.path().to_str().unwrap(),
            ),
        ],
    );
    for run_id in [passwd, symlinked, local_ok] {
        broker.publish_json(&reference(run_id)).await;
    }
    let request = |key: &str, bucket: &str| {
        json!({
            "idempotency_key": format!("k-{key}-{bucket}"),
            "dataset": "requests",
            "source": {"bucket": bucket, "key": key},
        })
    };
    broker
        .publish_json(&request("allowed/a.csv", &app.bucket))
        .await;
    broker
        .publish_json(&request("private/b.csv", &app.bucket))
        .await;
    broker
        .publish_json(&request("allowed/a.csv", "someone-elses-bucket"))
        .await;
    broker
        .publish_json(&json!({"Records": [{
            "eventName": "s3:ObjectCreated:Put",
            "s3": {"bucket": {"name": app.bucket}, "object": {"key": "private%2Fb.csv"}}
        }]}))
        .await;
    settled(&app, &broker, 7).await;

    let passwd_error = error_of(&app, passwd).await;
    assert!(
        passwd_error.contains("/etc/passwd")
            && passwd_error.contains("not a file under IMPORT_ALLOW_LOCAL_SOURCES"),
        "{passwd_error}"
    );
    let symlink_error = error_of(&app, symlinked).await;
    assert!(
        symlink_error.contains("it resolves to /etc/passwd"),
        "{symlink_error}"
    );
    assert_eq!(app.run_state(local_ok).await.0, "completed");
    let refused = |key: &str| {
        sqlx::query_scalar::<_, String>(
            "SELECT error_message FROM dsa_jobs.analysis_runs WHERE idempotency_key = $1",
        )
        .bind(key.to_owned())
        .fetch_one(&app.pool)
    };
    let private = refused(&format!("k-private/b.csv-{}", app.bucket))
        .await
        .unwrap();
    assert!(
        private.contains("is not allowed: IMPORT_ALLOWED_BUCKETS permits only"),
        "{private}"
    );
    let foreign = refused("k-allowed/a.csv-someone-elses-bucket")
        .await
        .unwrap();
    assert!(
        foreign.starts_with("s3://someone-elses-bucket/allowed/a.csv is not allowed"),
        "{foreign}"
    );
    assert_eq!(
        app.count(
            "dsa_jobs.analysis_runs WHERE idempotency_key LIKE 's3:%' AND status = 'failed' \
             AND error_message LIKE '%IMPORT_ALLOWED_BUCKETS%'"
        )
        .await,
        1
    );
    // Only the allowed object and the file under the local root were imported.
    assert_eq!(app.count("dsa_core.commits").await, 2);
    assert_eq!(app.count("dsa_core.commit_rows").await, 70);
}

#[tokio::test]
async fn local_sources_from_the_queue_are_refused_when_no_directory_is_allowed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let passwd = run_reading(
        &app,
        SourceLocation::Local {
            path: "/etc/passwd".into(),
        },
    )
    .await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    broker.publish_json(&reference(passwd)).await;
    settled(&app, &broker, 1).await;
    let error = error_of(&app, passwd).await;
    assert!(
        error.contains("IMPORT_ALLOW_LOCAL_SOURCES names, and it is unset"),
        "{error}"
    );
    assert_eq!(app.count("dsa_core.rows").await, 0);
}

#[tokio::test]
async fn an_objects_metadata_names_its_dataset_only_when_that_is_switched_on() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    for key in ["orders/a.csv", "orders/b.csv"] {
        app.s3
            .put_object()
            .bucket(&app.bucket)
            .key(key)
            .metadata("dataset", "payroll")
            .body(ByteStream::from(sample_csv(10, 1)))
            .send()
            .await
            .unwrap();
    }
    let event = |key: &str| {
        json!({"Records": [{
            "eventName": "s3:ObjectCreated:Put",
            "s3": {"bucket": {"name": app.bucket}, "object": {"key": key}}
        }]})
    };
    let consumer = Consumer::start(&app, &broker, &[]);
    broker.publish_json(&event("orders/a.csv")).await;
    settled(&app, &broker, 1).await;
    drop(consumer);
    let _consumer = Consumer::start(&app, &broker, &[("S3_EVENT_DATASET_FROM_METADATA", "true")]);
    broker.publish_json(&event("orders/b.csv")).await;
    settled(&app, &broker, 2).await;
    let datasets: Vec<String> = sqlx::query_scalar(
        "SELECT d.name FROM dsa_core.commits c JOIN dsa_core.datasets d ON d.id = c.dataset_id
          ORDER BY c.authored_at",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(datasets, vec!["orders", "payroll"]);
}
