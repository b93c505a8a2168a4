//! `dsa-ingest consume` as a child process, and a slow S3 endpoint to catch it mid-import.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{service_settings, TestApp};
use crate::proxy::throttled_proxy;

/// A `dsa-ingest consume` child; killed when dropped, its log kept in a file.
pub struct Consumer {
    child: Child,
    log: PathBuf,
}

impl Consumer {
    pub fn start(app: &TestApp, broker: &TestBroker, extra: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!("dsa-consumer-{}.log", Uuid::new_v4()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_dsa-ingest"));
        command
            .arg("consume")
            .envs(app.child_env())
            .envs(broker.env())
            .env("IMPORT_PARALLEL_WORKERS", "2")
            .env("IMPORT_BATCH_SIZE", "500")
            .env("IMPORT_CHUNK_SIZE", "65536")
            .env("AMQP_RETRY_SECONDS", "5")
            .env("SHUTDOWN_GRACE_SECONDS", "20")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        for (key, value) in extra {
            command.env(key, value);
        }
        Self {
            child: command.spawn().expect("start dsa-ingest consume"),
            log,
        }
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
