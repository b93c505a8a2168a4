//! The upload benchmark: how fast `dsa-ingest serve` takes a file over HTTP, beside
//! `dsa-ingest submit` of the same file, and how much memory the server holds while it
//! does. In one run on the local services:
//! - `dsa-ingest submit --dataset D FILE` as a whole process (the baseline: it streams
//!   the file into the store, creates the run and queues it);
//! - `curl` posting the same file chunked to `POST /v1/datasets/D/imports` of one
//!   `dsa-ingest serve` process, which does the same work behind HTTP;
//!
//! each the median of `--repeat` runs, then the server's peak RSS (`VmHWM`) over all of
//! its uploads. The runs are queued on queues of the benchmark's own, deleted at the end;
//! nothing imports them. Run it with `scripts/bench-upload`.
//!
//! `cargo run --release --example bench_upload -- [--megabytes 200] [--repeat 3]`

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dsa_ingest::config::Settings;
use sha2::{Digest, Sha256};

#[path = "support/mod.rs"]
mod support;

const BENCH_DATABASE: &str = "dsa_bench_upload";
const TOKEN: &str = "bench-upload-token";
/// Queues and exchanges of the benchmark's own, so its runs never reach a consumer of
/// the development queues.
const AMQP_NAMES: [(&str, &str); 6] = [
    ("AMQP_IMPORT_EXCHANGE", "dsa_bench_upload.imports"),
    ("AMQP_IMPORT_QUEUE", "dsa_bench_upload.imports"),
    ("AMQP_DEAD_LETTER_EXCHANGE", "dsa_bench_upload.dead"),
    ("AMQP_DEAD_LETTER_QUEUE", "dsa_bench_upload.dead"),
    ("AMQP_MAINTENANCE_EXCHANGE", "dsa_bench_upload.maintenance"),
    ("AMQP_MAINTENANCE_QUEUE", "dsa_bench_upload.maintenance"),
];

/// The upload benchmark's options.
#[derive(clap::Parser)]
struct Args {
    /// The size of the file to upload, in megabytes (10^6 bytes), about.
    #[arg(long, value_parser = support::parse_count, default_value = "200")]
    megabytes: u64,
    /// Runs of each measurement; the median is printed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { megabytes, repeat } = clap::Parser::parse();
    if repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let settings = Settings::from_env()?;
    let binary = support::sibling_binary("dsa-ingest")?;
    if Command::new("curl").arg("--version").output().is_err() {
        bail!("the benchmark posts with curl, which is not installed (apt-get install curl)");
    }
    let database_url =
        support::recreate_database(settings.database_url.expose(), BENCH_DATABASE).await?;
    let environment = Environment {
        binary: binary.clone(),
        database_url: database_url.clone(),
    };
    environment.run(&["migrate"])?;

    // The sample's rows are about 100 bytes.
    let rows = megabytes * 10_000;
    let path = PathBuf::from(format!("target/bench/sample-{rows}.csv"));
    let bytes = dsa_ingest::sample::ensure_sample_csv(&path, rows, 1)?;

    let tokens =
        std::env::temp_dir().join(format!("bench-upload-tokens-{}.toml", std::process::id()));
    std::fs::write(
        &tokens,
        format!(
            "[[clients]]\nname = \"bench\"\ntoken_sha256 = \"{}\"\ndatasets = [\"**\"]\n\
             scopes = [\"read\", \"write\"]\n",
            hex::encode(Sha256::digest(TOKEN.as_bytes()))
        ),
    )?;
    let address = free_address()?;
    let server = Server::start(&environment, &tokens, &address)?;
    let result = measure(&environment, &server, &path, bytes, repeat).await;
    let peak = server.peak_rss_bytes();
    drop(server);
    let _ = std::fs::remove_file(&tokens);
    delete_bench_topology(&settings).await;
    delete_uploaded_objects(&settings, &environment.database_url).await;
    let (submit, upload) = result?;

    println!(
        "{:<22} {:>9} {:>10} {:>13}",
        "case", "seconds", "MB/s", "x submit"
    );
    for (case, seconds) in [
        ("dsa-ingest submit", submit),
        ("POST /v1/.../imports", upload),
    ] {
        println!(
            "{case:<22} {seconds:>9.2} {:>10.1} {:>12.2}x",
            bytes as f64 / 1e6 / seconds,
            submit / seconds
        );
    }
    println!(
        "\nfile: {} ({:.1} MB, {rows} rows); medians of {repeat} runs",
        path.display(),
        bytes as f64 / 1e6
    );
    println!(
        "upload throughput: {:.2}x submit's; server peak RSS over {repeat} uploads: {:.1} MB",
        submit / upload,
        peak.unwrap_or(0) as f64 / 1e6
    );
    Ok(())
}

/// The median seconds of `submit` and of the HTTP upload of the file.
async fn measure(
    environment: &Environment,
    server: &Server,
    path: &Path,
    bytes: u64,
    repeat: usize,
) -> anyhow::Result<(f64, f64)> {
    server.wait_ready()?;
    let file = path.to_str().context("the sample's path is UTF-8")?;
    let mut submits = Vec::new();
    let mut uploads = Vec::new();
    for round in 0..repeat {
        let dataset = format!("bench-submit-{round}");
        let started = Instant::now();
        environment.run(&["submit", "--dataset", &dataset, file])?;
        submits.push(started.elapsed().as_secs_f64());

        let url = format!(
            "http://{}/v1/datasets/bench-upload-{round}/imports?filename=sample.csv",
            server.address
        );
        let started = Instant::now();
        let output = Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--fail-with-body",
                "--request",
                "POST",
            ])
            .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
            .args(["--header", "Transfer-Encoding: chunked"])
            .args(["--header", "Content-Type: text/csv"])
            .args(["--upload-file", file, &url])
            .output()?;
        uploads.push(started.elapsed().as_secs_f64());
        if !output.status.success() {
            bail!(
                "the upload failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("not the run: {}", String::from_utf8_lossy(&output.stdout)))?;
        if answer["status"] != "pending" {
            bail!("the upload answered {answer}");
        }
    }
    eprintln!("{repeat} submits and {repeat} uploads of {bytes} bytes each queued");
    Ok((median(submits), median(uploads)))
}

struct Environment {
    binary: PathBuf,
    database_url: String,
}

impl Environment {
    /// A `dsa-ingest` command with the benchmark's database and queues.
    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .env("DATABASE_URL", &self.database_url)
            .env("RUST_LOG", "warn");
        for (name, value) in AMQP_NAMES {
            command.env(name, value);
        }
        command
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = self.command().args(args).output()?;
        if !output.status.success() {
            bail!(
                "dsa-ingest {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// A `dsa-ingest serve` process, stopped when dropped.
struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(environment: &Environment, tokens: &Path, address: &str) -> anyhow::Result<Self> {
        let child = environment
            .command()
            .arg("serve")
            .env("API_TOKENS_FILE", tokens)
            .env("HTTP_ADDR", address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start dsa-ingest serve")?;
        Ok(Self {
            child,
            address: address.to_owned(),
        })
    }

    /// Waits until `/readyz` answers 200.
    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://{}/readyz", self.address);
        loop {
            let ready = Command::new("curl")
                .args(["--silent", "--fail", "--output", "/dev/null", &url])
                .status()?
                .success();
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dsa-ingest serve did not become ready on {}", self.address);
            }
            // Polling a process we do not control; there is nothing to await.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The most memory the server held at once, from the kernel's own count.
    fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address no one listens on now.
fn free_address() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

async fn delete_bench_topology(settings: &Settings) {
    let Ok(connection) = lapin::Connection::connect(
        settings.amqp.url.expose(),
        lapin::ConnectionProperties::default(),
    )
    .await
    else {
        eprintln!("could not reach the broker to delete the benchmark's queues");
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        for (name, value) in AMQP_NAMES {
            if name.ends_with("_QUEUE") {
                let _ = channel
                    .queue_delete(value.into(), lapin::options::QueueDeleteOptions::default())
                    .await;
            } else {
                let _ = channel
                    .exchange_delete(
                        value.into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Removes the objects the runs were given (each submit and upload stores the file
/// under a key of its own), so repeated benchmarks do not fill the store.
async fn delete_uploaded_objects(settings: &Settings, database_url: &str) {
    let locations: Vec<(String, String)> = match sqlx::PgPool::connect(database_url).await {
        Ok(pool) => sqlx::query_as(
            "SELECT run_parameters->'source'->>'bucket', run_parameters->'source'->>'key'
               FROM dsa_jobs.analysis_runs
              WHERE run_parameters->'source'->>'kind' = 's3'",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let s3 = dsa_ingest::s3::client(&settings.s3).await;
    let mut deleted = 0;
    for (bucket, key) in &locations {
        if s3
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .is_ok()
        {
            deleted += 1;
        }
    }
    if deleted < locations.len() {
        eprintln!(
            "deleted {deleted} of the {} uploaded objects; the others stay in the store",
            locations.len()
        );
    }
}

fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    seconds[seconds.len() / 2]
}
