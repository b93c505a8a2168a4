//! `dsa-ingest consume` as a child process, and a slow S3 endpoint to catch it mid-import.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::broker::TestBroker;
use dsa_ingest::sample::sample_csv;
use serde_json::json;

use crate::helpers::{service_settings, test_settings, wait_until, TestApp};
use crate::proxy::throttled_proxy;

/// A `dsa-ingest consume` child; killed when dropped, its log kept in a file.
pub struct Consumer {
    child: Child,
    log: PathBuf,
}

impl Consumer {
    pub fn start(app: &TestApp, broker: &TestBroker, extra: &[(&str, &str)]) -> Self {
        Self::start_as("consume", app, broker, extra)
    }

    /// `dsa-ingest maintain` (the maintenance consumer, the relay and the sweeper) on
    /// the same settings, with the same handling.
    pub fn start_maintainer(app: &TestApp, broker: &TestBroker, extra: &[(&str, &str)]) -> Self {
        Self::start_as("maintain", app, broker, extra)
    }

    /// `dsa-ingest watch ARGS` on the same settings, with the same handling, listing
    /// every second and taking objects a second old.
    pub fn start_watcher(
        app: &TestApp,
        broker: &TestBroker,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> Self {
        let fast = [
            ("WATCH_INTERVAL_SECONDS", "1"),
            ("WATCH_SETTLE_SECONDS", "1"),
        ];
        Self::start_with("watch", args, app, broker, &[&fast[..], extra].concat())
    }

    /// `dsa-ingest serve` on a port of its own (`metrics_addr` finds it), storing uploads
    /// in the test's bucket.
    pub fn start_server(app: &TestApp, broker: &TestBroker, extra: &[(&str, &str)]) -> Self {
        Self::start_server_with_args(app, broker, &[], extra)
    }

    /// [`Consumer::start_server`] with arguments after `serve`.
    pub fn start_server_with_args(
        app: &TestApp,
        broker: &TestBroker,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> Self {
        let server = [
            ("HTTP_ADDR", "127.0.0.1:0"),
            ("S3_BUCKET", app.bucket.as_str()),
        ];
        Self::start_with("serve", args, app, broker, &[&server[..], extra].concat())
    }

    fn start_as(
        subcommand: &str,
        app: &TestApp,
        broker: &TestBroker,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::start_with(subcommand, &[], app, broker, extra)
    }

    fn start_with(
        subcommand: &str,
        args: &[&str],
        app: &TestApp,
        broker: &TestBroker,
        extra: &[(&str, &str)],
    ) -> Self {
        let log = std::env::temp_dir().join(format!("dsa-{subcommand}-{}.log", Uuid::new_v4()));
        let mut command = app.child();
        command
            .arg(subcommand)
            .args(args)
            .envs(broker.env())
            .env("IMPORT_PARALLEL_WORKERS", "2")
            .env("IMPORT_BATCH_SIZE", "500")
            .env("IMPORT_CHUNK_SIZE", "65536")
            .env("AMQP_RETRY_SECONDS", "5")
            .env("SHUTDOWN_GRACE_SECONDS", "20")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        for (key, value) in extra {
            command.env(key, value);
        }
        Self {
            child: command.spawn().expect("start dsa-ingest"),
            log,
        }
    }

    /// Where the child serves `/healthz`, `/readyz` and `/metrics` (it binds port 0
    /// and logs the address it got).
    pub async fn metrics_addr(&self) -> std::net::SocketAddr {
        let mut found = None;
        wait_until(
            Duration::from_secs(30),
            "the consumer's HTTP server",
            || {
                found = self
                    .log()
                    .lines()
                    .find(|line| line.contains("serving /healthz"))
                    .and_then(|line| {
                        line.split(|c: char| c.is_whitespace() || c == '"' || c == '=')
                            .find_map(|word| word.parse::<std::net::SocketAddr>().ok())
                    });
                let ready = found.is_some();
                async move { ready }
            },
        )
        .await;
        found.expect("an address in the log")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit on its own.
    pub async fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer did not exit; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("consumer {} log:\n{}", self.child.id(), self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// An S3 endpoint that serves bodies at `bytes_per_second`, so an import can be caught
/// in the middle.
pub async fn slow_endpoint(bytes_per_second: u64) -> String {
    let services = service_settings();
    let upstream = services["S3_ENDPOINT"]
        .trim_start_matches("http://")
        .to_owned();
    throttled_proxy(upstream, bytes_per_second).await
}

pub async fn status_of(app: &TestApp, run_id: Uuid) -> String {
    app.run_state(run_id).await.0
}

pub async fn wait_for_status(app: &TestApp, run_id: Uuid, wanted: &str, timeout: Duration) {
    wait_until(timeout, &format!("run {run_id} to be {wanted}"), || async {
        status_of(app, run_id).await == wanted
    })
    .await;
}

/// Rows the run has committed so far, from its checkpoint.
pub async fn loaded_rows(app: &TestApp, run_id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce((checkpoint->>'loaded_rows')::bigint, 0)
           FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

pub async fn summary_of(app: &TestApp, run_id: Uuid) -> serde_json::Value {
    sqlx::query_scalar("SELECT output_summary FROM dsa_jobs.analysis_runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

pub async fn attempts(app: &TestApp, run_id: Uuid) -> i32 {
    sqlx::query_scalar("SELECT attempts FROM dsa_jobs.analysis_runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Puts `rows` sample rows at `key` and creates a pending run for them in `dataset`.
pub async fn pending_run(app: &TestApp, dataset: &str, key: &str, rows: u64, seed: u64) -> Uuid {
    app.put(key, sample_csv(rows, seed)).await;
    let importer = app.importer(test_settings());
    app.create_run(&importer, dataset, key, false).await.0
}

pub fn reference(run_id: Uuid) -> serde_json::Value {
    json!({ "analysis_run_id": run_id })
}

/// Starts a consumer that reads from a slow store, hands it a run of `rows` rows, and
/// returns once some of its batches committed: an import caught in the middle.
pub async fn import_caught_mid_file(
    app: &TestApp,
    broker: &TestBroker,
    dataset: &str,
    key: &str,
    rows: u64,
    seed: u64,
) -> (Consumer, Uuid) {
    import_caught_mid_file_with(app, broker, dataset, key, rows, seed, &[]).await
}

/// [`import_caught_mid_file`] with more settings for the consumer (a later one of the
/// same name wins).
pub async fn import_caught_mid_file_with(
    app: &TestApp,
    broker: &TestBroker,
    dataset: &str,
    key: &str,
    rows: u64,
    seed: u64,
    extra: &[(&str, &str)],
) -> (Consumer, Uuid) {
    let run_id = pending_run(app, dataset, key, rows, seed).await;
    let slow = slow_endpoint(400_000).await;
    let settings = [&[("S3_ENDPOINT", slow.as_str())][..], extra].concat();
    let consumer = Consumer::start(app, broker, &settings);
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_until(
        Duration::from_secs(60),
        "some committed batches",
        || async { loaded_rows(app, run_id).await >= 1_000 },
    )
    .await;
    (consumer, run_id)
}
