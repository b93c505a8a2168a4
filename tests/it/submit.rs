//! `dsa-ingest submit`, run as a child process against the real store, database and
//! broker. Each test declares its own exchanges and queues (uuid-suffixed names) and
//! deletes them when it ends.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dsa_ingest::cli::submit::{self, SubmitError};
use dsa_ingest::config::AmqpSettings;
use dsa_ingest::import::run::ImportParameters;
use dsa_ingest::import::ImportSummary;
use dsa_ingest::queue::amqp;
use dsa_ingest::sample::sample_csv;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, test_settings, wait_until, TestApp};

/// The smallest part S3 accepts, so a ~12 MB file goes up in three parts.
const PART_SIZE: u64 = 5 * 1024 * 1024;

/// A file in the temporary directory, removed when the test ends.
struct TempFile(PathBuf);

impl TempFile {
    fn with(name: &str, bytes: &[u8]) -> Self {
        let dir = std::env::temp_dir().join(format!("dsa-submit-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dsa_ingest(app: &TestApp, broker: &TestBroker) -> Command {
    let mut command = app.child();
    command
        .envs(broker.env())
        .env("S3_BUCKET", &app.bucket)
        .env("SUBMIT_PART_SIZE", PART_SIZE.to_string());
    command
}

/// Runs `dsa-ingest ARGS` to success and parses its stdout as JSON.
fn run_json(app: &TestApp, broker: &TestBroker, args: &[&str]) -> serde_json::Value {
    let output = dsa_ingest(app, broker).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "dsa-ingest {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn object_bytes(app: &TestApp, key: &str) -> Vec<u8> {
    app.s3
        .get_object()
        .bucket(&app.bucket)
        .key(key)
        .send()
        .await
        .expect("the object exists")
        .body
        .collect()
        .await
        .unwrap()
        .to_vec()
}

async fn object_keys(app: &TestApp) -> Vec<String> {
    app.s3
        .list_objects_v2()
        .bucket(&app.bucket)
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .filter_map(|object| object.key().map(str::to_owned))
        .collect()
}

async fn open_multipart_uploads(app: &TestApp) -> usize {
    app.s3
        .list_multipart_uploads()
        .bucket(&app.bucket)
        .send()
        .await
        .expect("list multipart uploads")
        .uploads()
        .len()
}

async fn run_parameters(app: &TestApp, run_id: Uuid) -> ImportParameters {
    let parameters: serde_json::Value =
        sqlx::query_scalar("SELECT run_parameters FROM dsa_jobs.analysis_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    serde_json::from_value(parameters).unwrap()
}

fn run_id_of(printed: &serde_json::Value) -> Uuid {
    printed["run_id"].as_str().unwrap().parse().unwrap()
}

/// Asserts that the import queue holds exactly one message, naming `run_id`.
async fn assert_one_message_for(broker: &TestBroker, run_id: Uuid) {
    let messages = broker.take_all(&broker.settings.import_queue).await;
    assert_eq!(messages.len(), 1, "messages on the import queue");
    let body: serde_json::Value = serde_json::from_slice(&messages[0].data).unwrap();
    assert_eq!(
        body,
        serde_json::json!({ "analysis_run_id": run_id.to_string() })
    );
    let message_id = messages[0].properties.message_id().clone();
    assert_eq!(
        message_id.map(|id| id.as_str().to_owned()),
        Some(run_id.to_string())
    );
}

#[tokio::test]
async fn a_local_file_larger_than_a_part_is_uploaded_in_parts_and_queued() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let csv = sample_csv(120_000, 31);
    assert!(csv.len() as u64 > 2 * PART_SIZE, "{} bytes", csv.len());
    let file = TempFile::with("orders.2026.csv", &csv);

    let printed = run_json(
        &app,
        &broker,
        &["submit", "--dataset", "orders", file.path(), "--json"],
    );

    let run_id = run_id_of(&printed);
    assert_eq!(printed["dataset"], "orders");
    assert_eq!(printed["status"], "pending");
    let source = printed["source"].as_str().unwrap();
    let key = source
        .strip_prefix(&format!("s3://{}/", app.bucket))
        .unwrap_or_else(|| panic!("{source} is not in the test bucket"));
    let segments: Vec<&str> = key.split('/').collect();
    assert_eq!(segments.len(), 5, "{key}");
    assert_eq!(&segments[..2], ["uploads", "orders"]);
    assert_eq!(
        segments[2],
        chrono::Utc::now()
            .date_naive()
            .format("%Y-%m-%d")
            .to_string()
    );
    segments[3].parse::<Uuid>().expect("an upload id");
    assert_eq!(segments[4], "orders.2026.csv");

    let stored = object_bytes(&app, key).await;
    assert_eq!(stored.len(), csv.len());
    assert_eq!(Sha256::digest(&stored), Sha256::digest(&csv));
    let head = app
        .s3
        .head_object()
        .bucket(&app.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    // A multipart object's ETag ends in the number of its parts.
    assert!(
        head.e_tag().unwrap().trim_matches('"').ends_with("-3"),
        "{:?}",
        head.e_tag()
    );
    assert_eq!(open_multipart_uploads(&app).await, 0);

    let (status, error, _) = app.run_state(run_id).await;
    assert_eq!((status.as_str(), error), ("pending", None));
    let parameters = run_parameters(&app, run_id).await;
    assert_eq!(parameters.source, app.location(key));
    assert_eq!(parameters.expected_etag.as_deref(), head.e_tag());
    assert_one_message_for(&broker, run_id).await;
}

#[tokio::test]
async fn submit_wait_follows_the_run_through_a_consumer_to_its_summary() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let csv = sample_csv(20_000, 32);
    let file = TempFile::with("events.csv", &csv);
    let consumer = KillOnDrop(
        dsa_ingest(&app, &broker)
            .env("IMPORT_BATCH_SIZE", "1000")
            .env("IMPORT_PROGRESS_UPDATE_INTERVAL", "1")
            // Port 0: tests running at once must not compete for the metrics port.
            .env("METRICS_ADDR", "127.0.0.1:0")
            .arg("consume")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let mut submit = KillOnDrop(
        dsa_ingest(&app, &broker)
            .args([
                "submit",
                "--dataset",
                "events",
                file.path(),
                "--wait",
                "--json",
                "--user",
                "ana",
                "--message",
                "Weekly events",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = wait_for_exit(&mut submit.0, Duration::from_secs(120)).await;
    let (stdout, stderr) = outputs(&mut submit.0);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let summary: ImportSummary = serde_json::from_str(&stdout).unwrap();
    assert_eq!((summary.rows, summary.new_rows), (20_000, 20_000));
    assert_eq!(summary.bytes, csv.len() as u64);

    let (status, error, completed) = app.run_state(summary.run_id).await;
    assert_eq!(
        (status.as_str(), error, completed),
        ("completed", None, true)
    );
    let (message, user): (String, Option<String>) = sqlx::query_as(
        "SELECT c.message, a.user_id FROM dsa_core.commits c
           JOIN dsa_jobs.analysis_runs a ON a.id = c.run_id WHERE c.commit_id = $1",
    )
    .bind(&summary.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(message, "Weekly events");
    assert_eq!(user.as_deref(), Some("ana"));
    drop(consumer);
    assert!(broker
        .take_all(&broker.settings.import_queue)
        .await
        .is_empty());
}

#[tokio::test]
async fn ctrl_c_while_waiting_exits_2_and_leaves_the_run_queued() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let file = TempFile::with("late.csv", &sample_csv(100, 33));
    // No consumer runs, so the run stays pending for as long as submit waits.
    let mut submit = KillOnDrop(
        dsa_ingest(&app, &broker)
            .args(["submit", "--dataset", "late", file.path(), "--wait"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pool = app.pool.clone();
    wait_until(Duration::from_secs(60), "the run to be created", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dsa_jobs.analysis_runs")
                .fetch_one(&pool)
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    let run_id: Uuid = sqlx::query_scalar("SELECT id FROM dsa_jobs.analysis_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // The message is published after the run is created; once it is on the queue,
    // submit is waiting (or about to).
    wait_until(
        Duration::from_secs(60),
        "the message to be queued",
        || async { broker.waiting().await > 0 },
    )
    .await;

    // SAFETY: kill(2) with the pid of our own child process.
    let sent = unsafe { libc::kill(submit.0.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let status = wait_for_exit(&mut submit.0, Duration::from_secs(30)).await;
    let (_, stderr) = outputs(&mut submit.0);
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("run {run_id} goes on in the consumer")),
        "{stderr}"
    );
    assert_eq!(app.run_state(run_id).await.0, "pending");
    assert_one_message_for(&broker, run_id).await;
}

#[tokio::test]
async fn a_file_over_the_size_limit_is_refused_before_any_upload() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let csv = sample_csv(200, 34);
    let file = TempFile::with("big.csv", &csv);

    let output = dsa_ingest(&app, &broker)
        .env("IMPORT_MAX_FILE_SIZE", "1000")
        .args(["submit", "--dataset", "big", file.path()])
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("is {} bytes", csv.len()))
            && stderr.contains("larger than the limit of 1000 bytes")
            && stderr.contains("IMPORT_MAX_FILE_SIZE"),
        "{stderr}"
    );
    assert!(object_keys(&app).await.is_empty());
    assert_eq!(open_multipart_uploads(&app).await, 0);
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 0);
}

#[tokio::test]
async fn an_s3_source_is_queued_where_it_is_without_a_new_upload() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    app.put("incoming/stock.csv", sample_csv(300, 35)).await;
    let source = format!("s3://{}/incoming/stock.csv", app.bucket);

    let printed = run_json(
        &app,
        &broker,
        &[
            "submit",
            "--dataset",
            "stock",
            &source,
            "--json",
            "--skip-bad-rows",
        ],
    );

    let run_id = run_id_of(&printed);
    assert_eq!(printed["source"], source.as_str());
    assert_eq!(object_keys(&app).await, ["incoming/stock.csv"]);
    let parameters = run_parameters(&app, run_id).await;
    assert_eq!(parameters.source, app.location("incoming/stock.csv"));
    assert!(parameters.options.skip_bad_rows);
    assert_eq!(app.run_state(run_id).await.0, "pending");
    assert_one_message_for(&broker, run_id).await;

    // A source that does not exist is refused before a run is created.
    let missing = dsa_ingest(&app, &broker)
        .args([
            "submit",
            "--dataset",
            "stock",
            &format!("s3://{}/incoming/nothing.csv", app.bucket),
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("incoming/nothing.csv not found"),
        "{stderr}"
    );
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 1);
}

#[tokio::test]
async fn ctrl_c_during_the_upload_aborts_it_and_submits_nothing() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // Five parts: the signal lands while parts are still to be sent.
    let csv = sample_csv(240_000, 36);
    assert!(csv.len() as u64 > 4 * PART_SIZE, "{} bytes", csv.len());
    let file = TempFile::with("huge.csv", &csv);
    let mut submit = KillOnDrop(
        dsa_ingest(&app, &broker)
            .args(["submit", "--dataset", "huge", file.path()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let s3 = app.s3.clone();
    let bucket = app.bucket.clone();
    wait_until(
        Duration::from_secs(60),
        "the multipart upload to start",
        || {
            let s3 = s3.clone();
            let bucket = bucket.clone();
            async move {
                let listing = s3.list_multipart_uploads().bucket(bucket).send().await;
                listing.is_ok_and(|listing| !listing.uploads().is_empty())
            }
        },
    )
    .await;

    // SAFETY: kill(2) with the pid of our own child process.
    let sent = unsafe { libc::kill(submit.0.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let status = wait_for_exit(&mut submit.0, Duration::from_secs(60)).await;
    let (stdout, stderr) = outputs(&mut submit.0);
    assert_eq!(status.code(), Some(1), "stdout: {stdout} stderr: {stderr}");
    assert!(
        stderr.contains("the upload was aborted and nothing was submitted"),
        "{stderr}"
    );
    assert_eq!(open_multipart_uploads(&app).await, 0);
    assert!(object_keys(&app).await.is_empty());
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 0);
    assert!(broker
        .take_all(&broker.settings.import_queue)
        .await
        .is_empty());
}

#[tokio::test]
async fn a_run_whose_message_cannot_be_published_is_marked_failed() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let (run_id, _) = app
        .create_run(&importer, "unqueued", "never/there.csv", false)
        .await;
    // An exchange that does not exist: the broker refuses the publish.
    let settings = AmqpSettings {
        url: TestBroker::new().await.settings.url.clone(),
        import_exchange: format!("test.missing.{}", Uuid::new_v4().simple()),
        ..AmqpSettings::default()
    };
    let connection = amqp::connect(&settings, "test").await.unwrap();
    let channel = amqp::confirm_channel(&connection).await.unwrap();

    let error = submit::queue_run(&channel, &settings, &app.pool, run_id)
        .await
        .unwrap_err();

    assert!(
        matches!(error, SubmitError::NotQueued { run_id: failed, .. } if failed == run_id),
        "{error}"
    );
    let (status, message, completed) = app.run_state(run_id).await;
    assert_eq!((status.as_str(), completed), ("failed", true));
    let message = message.unwrap();
    assert!(message.starts_with("never queued:"), "{message}");
    assert!(message.contains(&settings.import_exchange), "{message}");
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(timeout, "dsa-ingest to exit", || {
        status = child.try_wait().unwrap();
        std::future::ready(status.is_some())
    })
    .await;
    status.unwrap()
}

fn outputs(child: &mut Child) -> (String, String) {
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).unwrap();
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).unwrap();
    }
    (stdout, stderr)
}
