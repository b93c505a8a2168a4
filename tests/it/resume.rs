use std::process::Stdio;
use std::time::Duration;

use dsa_ingest::import::ImportSummary;

use dsa_ingest::sample::sample_csv;

use crate::helpers::{spawn_app, wait_until};

/// Runs `dsa-ingest ARGS` to success and returns its stdout.
fn run_ok(app: &crate::helpers::TestApp, args: &[&str]) -> Vec<u8> {
    app.cli_ok(args)
}

/// Runs `dsa-ingest ARGS` to success and parses its stdout as JSON.
fn run_json<T: serde::de::DeserializeOwned>(app: &crate::helpers::TestApp, args: &[&str]) -> T {
    serde_json::from_slice(&run_ok(app, args)).unwrap()
}

#[tokio::test]
async fn an_import_killed_mid_file_resumes_from_its_checkpoint() {
    let app = spawn_app().await;
    // CRLF line ends: the resume point then sits on the \n of a record's terminator.
    let crlf = String::from_utf8(sample_csv(60_000, 11))
        .unwrap()
        .replace('\n', "\r\n");
    app.put("big.csv", crlf.into_bytes()).await;
    let source = format!("s3://{}/big.csv", app.bucket);

    let mut child = app
        .cli()
        .args(["import", "--dataset", "killed", &source, "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pool = app.pool.clone();
    wait_until(
        Duration::from_secs(60),
        "the child to commit some batches",
        || {
            let pool = pool.clone();
            async move {
                let loaded: Option<i64> = sqlx::query_scalar(
                    "SELECT max((a.checkpoint->>'loaded_rows')::bigint)
                   FROM dsa_jobs.analysis_runs a JOIN dsa_core.datasets d ON d.id = a.dataset_id
                  WHERE d.name = 'killed'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                loaded.unwrap_or(0) >= 2_000
            }
        },
    )
    .await;
    child.kill().unwrap(); // SIGKILL: no chance to clean up.
    child.wait().unwrap();

    let (run_id, status, checkpoint_byte): (uuid::Uuid, String, i64) = sqlx::query_as(
        "SELECT a.id, a.status::text, (a.checkpoint->>'byte_offset')::bigint
           FROM dsa_jobs.analysis_runs a JOIN dsa_core.datasets d ON d.id = a.dataset_id
          WHERE d.name = 'killed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "running", "the child finished before it was killed");

    let resumed: ImportSummary =
        run_json(&app, &["import", "--resume", &run_id.to_string(), "--json"]);

    // The uninterrupted import that the resumed one must equal; run after it, so the
    // killed run stored its rows as new ones, as a first import does.
    let reference: ImportSummary = run_json(
        &app,
        &["import", "--dataset", "reference", &source, "--json"],
    );

    assert_eq!(resumed.run_id, run_id);
    assert_eq!(resumed.rows, reference.rows);
    // Across both attempts every row was stored exactly once, and the reference found
    // them all stored.
    assert_eq!((resumed.new_rows, reference.new_rows), (60_000, 0));
    assert_eq!(resumed.tree_hash, reference.tree_hash);
    // The checkpoint the resume started from is at least the one seen after the kill
    // (the child may have committed one more batch before it died).
    assert!(resumed.resumed_from_byte >= checkpoint_byte as u64 && resumed.resumed_from_byte > 0);
    assert_eq!(
        resumed.bytes_read,
        resumed.bytes - resumed.resumed_from_byte
    );
    // Same rows under the same logical ids, each exactly once.
    let (differences, duplicates): (i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM (
              (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1
               EXCEPT SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $2)
              UNION ALL
              (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $2
               EXCEPT SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1)) d),
           (SELECT count(*) - count(DISTINCT logical_row_id) FROM dsa_core.commit_rows WHERE commit_id = $2)",
    )
    .bind(&reference.commit_id)
    .bind(&resumed.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((differences, duplicates), (0, 0));
    let (status, row_count): (String, i64) = sqlx::query_as(
        "SELECT a.status::text, c.row_count FROM dsa_jobs.analysis_runs a
           JOIN dsa_core.commits c ON c.run_id = a.id WHERE a.id = $1",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), row_count), ("completed", 60_000));

    let shown: serde_json::Value = run_json(&app, &["status", &run_id.to_string(), "--json"]);
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["dataset"], "killed");
    assert_eq!(shown["attempts"], 2);
    assert_eq!(
        shown["output_summary"]["commit_id"],
        resumed.commit_id.as_str()
    );
    assert_eq!(shown["progress"]["percentage"].as_f64(), Some(100.0));
}

#[tokio::test]
async fn the_cli_reports_a_failed_import_and_marks_the_run() {
    let app = spawn_app().await;
    app.put("large.csv", sample_csv(200, 12)).await;
    let source = format!("s3://{}/large.csv", app.bucket);

    let output = app
        .cli()
        .env("IMPORT_MAX_FILE_SIZE", "500")
        .args(["import", "--dataset", "limited", &source])
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("larger than the limit of 500 bytes"),
        "{stderr}"
    );
    let (status, message, completed): (String, Option<String>, bool) = sqlx::query_as(
        "SELECT status::text, error_message, completed_at IS NOT NULL FROM dsa_jobs.analysis_runs",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "failed");
    assert!(message.as_deref().unwrap().contains("IMPORT_MAX_FILE_SIZE"));
    assert!(completed);

    let run_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM dsa_jobs.analysis_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let shown = String::from_utf8(run_ok(&app, &["status", &run_id.to_string()])).unwrap();
    assert!(shown.contains("status     failed"), "{shown}");
    assert!(
        shown.contains(&format!("error      {}", message.unwrap())),
        "{shown}"
    );
    let unknown = app
        .cli()
        .args(["status", &uuid::Uuid::new_v4().to_string()])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
}

/// A `dsa-ingest` child reading the S3 store through a proxy that serves
/// `bytes_per_second` a connection, so that it can be caught at a chosen step; its
/// stdout and stderr go to the returned files.
struct SlowCli {
    child: std::process::Child,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
}

impl SlowCli {
    async fn start(bytes_per_second: u64, app: &crate::helpers::TestApp, args: &[&str]) -> Self {
        let slow = crate::process::slow_endpoint(bytes_per_second).await;
        let stdout = tempfile::NamedTempFile::new().unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = app
            .cli()
            .env("S3_ENDPOINT", &slow)
            .args(args)
            .stdout(stdout.reopen().unwrap())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits up to `limit` for the child to exit without blocking the runtime (the
    /// slow store it reads from is served by this test's own tasks); returns its exit
    /// code and stderr.
    async fn exit_within(&mut self, limit: Duration) -> (i32, String) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let log = || std::fs::read_to_string(self.stderr.path()).unwrap();
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the import did not exit within {limit:?}; its stderr:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGINT (Ctrl-C) and asserts that the import exits within `limit`, paused:
    /// exit code 1, the `--resume` command named, the run still `running` with its
    /// lease given back.
    async fn interrupt_expecting_pause(
        &mut self,
        app: &crate::helpers::TestApp,
        run_id: uuid::Uuid,
        limit: Duration,
    ) {
        // SAFETY: kill(2) on a child this test started and has not reaped.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) },
            0
        );
        let (code, log) = self.exit_within(limit).await;
        assert_eq!(code, 1, "{log}");
        assert!(
            log.contains(&format!("dsa-ingest import --resume {run_id}")),
            "{log}"
        );
        let (status, owner): (String, Option<String>) = sqlx::query_as(
            "SELECT status::text, lease_owner FROM dsa_jobs.analysis_runs WHERE id = $1",
        )
        .bind(run_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!((status.as_str(), owner), ("running", None));
    }
}

/// How long an import that is not held up is given to exit.
const EXIT_LIMIT: Duration = Duration::from_secs(120);

/// Starts `dsa-ingest import` of `object` (stored as `key`) into `dataset` from a
/// store served slowly, and waits until it has committed `rows` rows.
async fn cli_import_caught_mid_file(
    app: &crate::helpers::TestApp,
    dataset: &str,
    key: &str,
    object: Vec<u8>,
    rows: i64,
) -> (SlowCli, uuid::Uuid) {
    app.put(key, object).await;
    let source = format!("s3://{}/{key}", app.bucket);
    let cli = SlowCli::start(
        400_000,
        app,
        &["import", "--dataset", dataset, &source, "--json"],
    )
    .await;
    let loaded = || async {
        sqlx::query_as::<_, (uuid::Uuid, i64)>(
            "SELECT a.id, coalesce((a.checkpoint->>'loaded_rows')::bigint, 0)
               FROM dsa_jobs.analysis_runs a JOIN dsa_core.datasets d ON d.id = a.dataset_id
              WHERE d.name = $1",
        )
        .bind(dataset)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    };
    wait_until(
        Duration::from_secs(60),
        "the import to commit some batches",
        || async { loaded().await.is_some_and(|(_, loaded)| loaded >= rows) },
    )
    .await;
    let (run_id, _) = loaded().await.unwrap();
    (cli, run_id)
}

/// Waits until some process holds the lease of a run (the test's database has one run)
/// and returns the run.
async fn claimed_run(app: &crate::helpers::TestApp) -> uuid::Uuid {
    let claimed = || async {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT id FROM dsa_jobs.analysis_runs WHERE lease_owner IS NOT NULL",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    };
    wait_until(
        Duration::from_secs(60),
        "an import to claim the run",
        || async { claimed().await.is_some() },
    )
    .await;
    claimed().await.unwrap()
}

#[tokio::test]
async fn an_import_whose_database_connections_are_cut_retries_from_its_checkpoint() {
    let app = spawn_app().await;
    let csv = sample_csv(20_000, 23);
    let (mut cli, run_id) =
        cli_import_caught_mid_file(&app, "cut", "cut.csv", csv.clone(), 1_000).await;
    let killed = app.cut_client_connections().await;
    assert!(killed >= 2, "the import's connections were cut ({killed})");
    // The test's own pool lost its connections too; it reconnects on its next query.
    let (code, log) = cli.exit_within(EXIT_LIMIT).await;
    assert_eq!(code, 0, "the import did not finish: {log}");
    assert!(log.contains("retrying from the last checkpoint"), "{log}");
    let summary: ImportSummary =
        serde_json::from_slice(&std::fs::read(cli.stdout.path()).unwrap()).unwrap();
    assert_eq!((summary.run_id, summary.rows), (run_id, 20_000));
    assert!(
        summary.resumed_from_byte > 0,
        "the retry went on from the checkpoint"
    );
    crate::faults::assert_commit_is_the_file(&app, run_id, &csv, "cut").await;
}

#[tokio::test]
async fn ctrl_c_pauses_an_import_that_resume_then_finishes() {
    let app = spawn_app().await;
    let csv = sample_csv(20_000, 24);
    let (mut cli, run_id) =
        cli_import_caught_mid_file(&app, "interrupted", "interrupted.csv", csv.clone(), 1_000)
            .await;
    // Paused, not failed: its lease given back and its batches kept.
    cli.interrupt_expecting_pause(&app, run_id, EXIT_LIMIT)
        .await;
    let loaded = crate::process::loaded_rows(&app, run_id).await;
    assert!((1_000..20_000).contains(&loaded), "{loaded}");
    let resumed: ImportSummary =
        run_json(&app, &["import", "--resume", &run_id.to_string(), "--json"]);
    assert!(resumed.resumed_from_byte > 0);
    crate::faults::assert_commit_is_the_file(&app, run_id, &csv, "interrupted").await;
}

/// A workbook of `rows` rows of five 16-digit hex strings, all different, so that it
/// compresses poorly: about 50 bytes of object a row.
fn incompressible_workbook(rows: u32) -> Vec<u8> {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet().set_name("data").unwrap();
    for column in 0..5u16 {
        sheet.write_string(0, column, format!("c{column}")).unwrap();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for row in 1..=rows {
        for column in 0..5u16 {
            // xorshift: cheap, and no two of these values repeat.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            sheet
                .write_string(row, column, format!("{state:016x}"))
                .unwrap();
        }
    }
    workbook.save_to_buffer().unwrap()
}

#[tokio::test]
async fn ctrl_c_while_a_spreadsheet_is_spooled_pauses_the_import_at_once() {
    let app = spawn_app().await;
    let workbook = incompressible_workbook(30_000);
    assert!(workbook.len() > 1_000_000, "{} bytes", workbook.len());
    app.put("spooled.xlsx", workbook).await;
    let source = format!("s3://{}/spooled.xlsx", app.bucket);
    // At 5 kB/s a connection, spooling the whole object takes minutes.
    let mut cli = SlowCli::start(5_000, &app, &["import", "--dataset", "spooled", &source]).await;
    let run_id = claimed_run(&app).await;
    // Well before the spool could have finished.
    cli.interrupt_expecting_pause(&app, run_id, Duration::from_secs(20))
        .await;
    let resumed: ImportSummary =
        run_json(&app, &["import", "--resume", &run_id.to_string(), "--json"]);
    assert_eq!(resumed.rows, 30_000);
}

/// Before its first batch a plain CSV's top (64 KiB) is read for its delimiter and
/// header; a stop during that read pauses the run at once too.
#[tokio::test]
async fn ctrl_c_while_a_csv_header_is_read_pauses_the_import_at_once() {
    let app = spawn_app().await;
    let csv = sample_csv(20_000, 32);
    assert!(csv.len() > 64 * 1024, "{} bytes", csv.len());
    app.put("sniffed.csv", csv.clone()).await;
    let source = format!("s3://{}/sniffed.csv", app.bucket);
    // At 1 kB/s a connection, the 64 KiB alone take a minute.
    let mut cli = SlowCli::start(1_000, &app, &["import", "--dataset", "sniffed", &source]).await;
    let run_id = claimed_run(&app).await;
    cli.interrupt_expecting_pause(&app, run_id, Duration::from_secs(20))
        .await;
    assert_eq!(crate::process::loaded_rows(&app, run_id).await, 0);
    let resumed: ImportSummary =
        run_json(&app, &["import", "--resume", &run_id.to_string(), "--json"]);
    assert_eq!(resumed.rows, 20_000);
    crate::faults::assert_commit_is_the_file(&app, run_id, &csv, "sniffed").await;
}

/// A compressed text is read again from its top on resume, up to the checkpoint; a
/// stop during that skip pauses the run at once too.
#[tokio::test]
async fn ctrl_c_while_a_resumed_gzip_skips_to_its_checkpoint_pauses_at_once() {
    let app = spawn_app().await;
    let csv = sample_csv(200_000, 31);
    // A first attempt, paused once a tenth of the rows are in.
    let (mut cli, run_id) = cli_import_caught_mid_file(
        &app,
        "skipped",
        "skipped.csv.gz",
        crate::formats::gzip(&csv),
        20_000,
    )
    .await;
    cli.interrupt_expecting_pause(&app, run_id, EXIT_LIMIT)
        .await;
    let loaded = crate::process::loaded_rows(&app, run_id).await;
    assert!(loaded < 200_000, "{loaded}");

    // The resume reads the object again from its top, at 2 kB/s a connection: the skip
    // to the checkpoint alone would take minutes.
    let mut cli = SlowCli::start(2_000, &app, &["import", "--resume", &run_id.to_string()]).await;
    assert_eq!(claimed_run(&app).await, run_id);
    cli.interrupt_expecting_pause(&app, run_id, Duration::from_secs(20))
        .await;
    assert_eq!(crate::process::loaded_rows(&app, run_id).await, loaded);

    // At full speed the resume then finishes the file.
    let resumed: ImportSummary =
        run_json(&app, &["import", "--resume", &run_id.to_string(), "--json"]);
    assert!(resumed.resumed_from_byte > 0);
    crate::faults::assert_commit_is_the_file(&app, run_id, &csv, "skipped").await;
}

#[tokio::test]
async fn a_local_source_that_cannot_be_read_fails_the_run_without_retrying() {
    let app = spawn_app().await;
    let directory = tempfile::tempdir().unwrap();
    let output = app
        .cli()
        .args([
            "import",
            "--dataset",
            "unreadable",
            directory.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("it is a directory"), "{stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");
    let status: String = sqlx::query_scalar("SELECT status::text FROM dsa_jobs.analysis_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "failed");
}

#[tokio::test]
async fn a_named_pipe_as_source_fails_the_run_at_once_and_says_what_it_is() {
    let app = spawn_app().await;
    let directory = tempfile::tempdir().unwrap();
    let fifo = directory.path().join("events.csv");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // Nobody writes to the pipe: an import that opened it would wait for ever.
    let output = app
        .cli()
        .args(["import", "--dataset", "piped", fifo.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("it is a named pipe (FIFO), not a regular file"),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
    let status: String = sqlx::query_scalar("SELECT status::text FROM dsa_jobs.analysis_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "failed");
}
