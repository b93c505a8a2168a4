//! Faults no other test injects: broker-side cancels and closed channels, database
//! connections killed or slowed mid-import, a consumer paused past its lease, and
//! publishes the broker refuses. Each checks exact counts and the commit's tree hash.

use std::process::Command;
use std::time::Duration;

use uuid::Uuid;

use dsa_ingest::sample::sample_csv;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, wait_until, TestApp};
use crate::metrics::{get, sample};
use crate::process::{import_caught_mid_file, pending_run, reference, wait_for_status, Consumer};

/// The broker's name for the connection a `dsa-ingest` child opened for `role`.
pub fn broker_connection(pid: u32, role: &str) -> Option<String> {
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("run rabbitmqctl");
    let name = format!(":{pid}\"}}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.contains(&format!("\"{role} dsa-ingest@")) && line.contains(&name))
        .and_then(|line| line.split('\t').next())
        .map(str::to_owned)
}

pub fn close_connection(connection: &str) {
    let closed = Command::new("rabbitmqctl")
        .args(["close_connection", connection, "test closes the connection"])
        .output()
        .unwrap();
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );
}

/// Marks the run as held by a live worker on another host until `seconds` from now.
async fn hold_elsewhere(app: &TestApp, run_id: Uuid, seconds: i64) {
    sqlx::query(
        "UPDATE dsa_jobs.analysis_runs
            SET status = 'running', lease_owner = 'elsewhere.example:1:test',
                lease_token = lease_token + 1,
                lease_expires_at = now() + make_interval(secs => $2)
          WHERE id = $1",
    )
    .bind(run_id)
    .bind(seconds as f64)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn metric(consumer: &Consumer, series: &str) -> f64 {
    let (_, _, body) = get(consumer.metrics_addr().await, "/metrics").await;
    sample(&body, series)
}

/// The tree hash of a commit recomputed from its commit_rows, in row order, with the
/// same hasher the import uses; compared with the hash the commit recorded.
pub async fn assert_tree_hash_matches(app: &TestApp, commit_id: &str) {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1
          ORDER BY split_part(logical_row_id, ':', 1),
                   split_part(logical_row_id, ':', 2)::bigint",
    )
    .bind(commit_id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut tree = dsa_ingest::import::hash::TreeHasher::new();
    for (id, hash) in &rows {
        tree.push(id, hash.as_slice().try_into().expect("32-byte row hash"));
    }
    let (recorded, count): (String, i64) =
        sqlx::query_as("SELECT tree_hash, row_count FROM dsa_core.commits WHERE commit_id = $1")
            .bind(commit_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(count as usize, rows.len());
    assert_eq!(tree.to_hex(), recorded, "tree hash of commit {commit_id}");
}

/// The row count and tree hash a CSV file must give, computed from the file by the
/// test itself: each record as a JSON object of header name to string, canonical
/// JSON, sha256, logical id `{sheet}:{n}`.
pub async fn expected_tree_of_csv(csv: &[u8], sheet: &str) -> (u64, String) {
    use dsa_ingest::import::hash::{canonical_json, row_hash, TreeHasher};
    use futures::StreamExt;
    let mut reader = csv_async::AsyncReaderBuilder::new()
        .has_headers(true)
        .create_reader(csv);
    let header: Vec<String> = reader
        .headers()
        .await
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    let mut tree = TreeHasher::new();
    let mut n = 0u64;
    let mut records = reader.records();
    while let Some(record) = records.next().await {
        let record = record.unwrap();
        n += 1;
        let object: serde_json::Map<String, serde_json::Value> = header
            .iter()
            .cloned()
            .zip(record.iter().map(serde_json::Value::from))
            .collect();
        let hash = row_hash(&canonical_json(&serde_json::Value::Object(object)).unwrap());
        tree.push(&format!("{sheet}:{n}"), &hash);
    }
    (n, tree.to_hex())
}

/// The one completed commit of the run: its rows are exactly the file's (count and
/// tree hash from the file), and its recorded tree hash matches its commit_rows.
pub async fn assert_commit_is_the_file(app: &TestApp, run_id: Uuid, csv: &[u8], sheet: &str) {
    let (commit_id, committed): (String, bool) = sqlx::query_as(
        "SELECT commit_id, committed_at IS NOT NULL FROM dsa_core.commits WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .expect("exactly one commit for the run");
    assert!(committed);
    let (rows, tree) = expected_tree_of_csv(csv, sheet).await;
    let (recorded, count): (String, i64) =
        sqlx::query_as("SELECT tree_hash, row_count FROM dsa_core.commits WHERE commit_id = $1")
            .bind(&commit_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(count as u64, rows, "rows of commit {commit_id}");
    assert_eq!(
        recorded, tree,
        "tree hash of commit {commit_id} against the file"
    );
    assert_tree_hash_matches(app, &commit_id).await;
}

#[tokio::test]
async fn a_waiter_whose_channel_closed_gives_its_worker_slot_back_at_once() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let run_id = pending_run(&app, "held", "held.csv", 500, 4).await;
    hold_elsewhere(&app, run_id, 120).await;
    // One worker slot: if the waiter kept it, the redelivery could never be taken.
    let consumer = Consumer::start(&app, &broker, &[("IMPORT_PARALLEL_WORKERS", "1")]);
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    let waiting = || consumer.log().matches("waiting for it").count();
    wait_until(Duration::from_secs(30), "the delivery to wait", || async {
        waiting() == 1
    })
    .await;

    let connection = broker_connection(consumer.pid(), "consume").expect("its connection");
    close_connection(&connection);
    wait_until(Duration::from_secs(10), "the waiter to give up", || async {
        metric(&consumer, "dsa_waiters_released_total").await == 1.0
    })
    .await;
    // The one slot took the redelivery, which waits in its turn.
    wait_until(
        Duration::from_secs(30),
        "the redelivery to wait",
        || async { waiting() == 2 },
    )
    .await;

    sqlx::query("UPDATE dsa_jobs.analysis_runs SET lease_expires_at = now() WHERE id = $1")
        .bind(run_id)
        .execute(&app.pool)
        .await
        .unwrap();
    wait_for_status(&app, run_id, "completed", Duration::from_secs(60)).await;
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_eq!(app.count("dsa_core.commit_rows").await, 500);
    assert_commit_is_the_file(&app, run_id, &sample_csv(500, 4), "held").await;
    wait_until(Duration::from_secs(10), "the queue to drain", || async {
        broker.waiting().await == 0
    })
    .await;
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn the_lease_is_renewed_on_a_timer_while_a_spreadsheet_is_spooled() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    for column in 0..4u16 {
        sheet.write_string(0, column, format!("c{column}")).unwrap();
    }
    for row in 1..=8_000u32 {
        for column in 0..4u16 {
            let value = (row as f64 * 7919.0 + column as f64 * 104_729.0).sqrt();
            sheet.write_number(row, column, value).unwrap();
        }
    }
    let body = workbook.save_to_buffer().unwrap();
    let size = body.len() as u64;
    app.put("slow.xlsx", body).await;
    let importer = app.importer(crate::helpers::test_settings());
    let (run_id, _) = app.create_run(&importer, "slow", "slow.xlsx", false).await;
    // Spooling alone takes about three lease durations; no batch commits meanwhile.
    let rate = size / 12;
    let slow = crate::process::slow_endpoint(rate).await;
    let _consumer = Consumer::start(
        &app,
        &broker,
        &[
            ("S3_ENDPOINT", slow.as_str()),
            ("IMPORT_LEASE_SECONDS", "2"),
        ],
    );
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_for_status(&app, run_id, "running", Duration::from_secs(30)).await;
    let started = std::time::Instant::now();
    let mut checks = 0;
    loop {
        let (status, live): (String, bool) = sqlx::query_as(
            "SELECT status::text, coalesce(lease_expires_at > now(), false)
               FROM dsa_jobs.analysis_runs WHERE id = $1",
        )
        .bind(run_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if status == "completed" {
            break;
        }
        assert!(
            live,
            "the lease of a live run expired after {:?}",
            started.elapsed()
        );
        checks += 1;
        assert!(started.elapsed() < Duration::from_secs(90));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "the import outlasted the lease ({:?})",
        started.elapsed()
    );
    assert!(checks > 10);
    assert_eq!(crate::process::attempts(&app, run_id).await, 1);
    assert_eq!(app.count("dsa_core.commit_rows").await, 8_000);
}

#[tokio::test]
async fn database_connections_killed_mid_batch_cost_a_retry_not_a_row() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let (consumer, run_id) =
        import_caught_mid_file(&app, &broker, "killed", "killed.csv", 20_000, 21).await;
    let killed = app.cut_client_connections().await;
    assert!(
        killed >= 2,
        "the consumer's connections were killed ({killed})"
    );
    wait_for_status(&app, run_id, "completed", Duration::from_secs(120)).await;
    assert_eq!(app.count("dsa_core.commits").await, 1);
    assert_commit_is_the_file(&app, run_id, &sample_csv(20_000, 21), "killed").await;
    wait_until(Duration::from_secs(20), "the queue to drain", || async {
        broker.waiting().await == 0
    })
    .await;
    assert_eq!(broker.dead_letters().await, 0);
    drop(consumer);
}

#[tokio::test]
async fn a_consumer_paused_past_its_lease_neither_writes_a_batch_nor_finalises_when_resumed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let rows = 20_000;
    let run_id = pending_run(&app, "paused", "paused.csv", rows, 22).await;
    let slow = crate::process::slow_endpoint(400_000).await;
    // One worker, so its prefetch is full: a frozen consumer with a free slot would
    // be handed the republished message too (until the broker's heartbeat gives up).
    let paused = Consumer::start(
        &app,
        &broker,
        &[
            ("S3_ENDPOINT", slow.as_str()),
            ("IMPORT_LEASE_SECONDS", "2"),
            ("IMPORT_PARALLEL_WORKERS", "1"),
        ],
    );
    broker.wait_for_consumers(1).await;
    broker.publish_json(&reference(run_id)).await;
    wait_until(
        Duration::from_secs(60),
        "some committed batches",
        || async { crate::process::loaded_rows(&app, run_id).await >= 1_000 },
    )
    .await;
    paused.signal(libc::SIGSTOP);
    let token_before: i64 =
        sqlx::query_scalar("SELECT lease_token FROM dsa_jobs.analysis_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // Its delivery stays on its frozen channel; the sweeper sees the expired lease
    // and republishes, and a second consumer takes the run over.
    let _other = Consumer::start(&app, &broker, &[("IMPORT_LEASE_SECONDS", "2")]);
    let _maintainer = Consumer::start_maintainer(
        &app,
        &broker,
        &[
            ("SWEEPER_INTERVAL_SECONDS", "1"),
            ("SWEEPER_GRACE_SECONDS", "1"),
        ],
    );
    wait_until(
        Duration::from_secs(120),
        "the run to be taken over and completed",
        || async { app.run_state(run_id).await.0 == "completed" },
    )
    .await;
    let (token_after, owner): (i64, Option<String>) = sqlx::query_as(
        "SELECT lease_token, output_summary->>'worker' FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(token_after > token_before);
    let _ = owner;
    let committed_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT committed_at FROM dsa_core.commits WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();

    // Resumed, the paused consumer finds its lease gone at its next write (or its
    // connection ended by the worker that took over) and leaves the run alone.
    paused.signal(libc::SIGCONT);
    wait_until(
        Duration::from_secs(60),
        "the resumed consumer to notice",
        || async {
            let log = paused.log();
            log.contains("another worker took the run over") || log.contains("nothing to do")
        },
    )
    .await;
    // Its import task has ended: nothing of it is left to write.
    wait_until(
        Duration::from_secs(30),
        "the resumed consumer's import to end",
        || async { metric(&paused, "dsa_imports_in_flight").await == 0.0 },
    )
    .await;
    assert_eq!(app.count("dsa_core.commits").await, 1);
    let still: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT committed_at FROM dsa_core.commits WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(still, committed_at, "finalised once");
    assert_commit_is_the_file(&app, run_id, &sample_csv(rows, 22), "paused").await;
    assert_eq!(app.run_state(run_id).await.0, "completed");
}

#[tokio::test]
async fn event_keys_with_plus_signs_spaces_and_non_ascii_letters_name_the_right_objects() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let objects = [
        ("in/plus+sign.csv", "in%2Fplus%2Bsign.csv", "plus+sign", 31),
        ("in/with space.csv", "in/with+space.csv", "with space", 32),
        (
            "in/café ñandú.csv",
            "in/caf%C3%A9+%C3%B1and%C3%BA.csv",
            "café ñandú",
            33,
        ),
        (
            "in/日本 2%.csv",
            "in/%E6%97%A5%E6%9C%AC+2%25.csv",
            "日本 2%",
            34,
        ),
    ];
    for (key, _, _, seed) in &objects {
        app.put(key, sample_csv(40, *seed)).await;
    }
    let records: Vec<serde_json::Value> = objects
        .iter()
        .map(|(_, encoded, _, _)| {
            serde_json::json!({
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": app.bucket}, "object": {"key": encoded}}
            })
        })
        .collect();
    let _consumer = Consumer::start(&app, &broker, &[]);
    broker
        .publish_json(&serde_json::json!({ "Records": records }))
        .await;
    wait_until(Duration::from_secs(60), "four imports", || async {
        app.count("dsa_jobs.analysis_runs WHERE status = 'completed'")
            .await
            == 4
    })
    .await;
    let mut sheets = std::collections::BTreeSet::new();
    for (key, _, base_name, seed) in &objects {
        let run_id: Uuid = sqlx::query_scalar(
            "SELECT id FROM dsa_jobs.analysis_runs WHERE run_parameters->'source'->>'key' = $1",
        )
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|error| panic!("no run for {key}: {error}"));
        // All four land in dataset `in`: a file whose import started after another's
        // commit takes that commit's one sheet name (stable ids for a dataset fed by
        // files of changing names); one that started first keeps its own base name.
        let sheet: String =
            sqlx::query_scalar("SELECT source->>'sheet' FROM dsa_core.commits WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert!(
            objects.iter().any(|(_, _, name, _)| *name == sheet),
            "{key}: sheet {sheet:?} is no object's base name (its own is {base_name:?})"
        );
        sheets.insert(sheet.clone());
        assert_commit_is_the_file(&app, run_id, &sample_csv(40, *seed), &sheet).await;
    }
    // Two workers: at most the two imports that started on an empty dataset differ.
    assert!(sheets.len() <= 2, "{sheets:?}");
    assert_eq!(app.count("dsa_core.commits").await, 4);
    assert_eq!(broker.dead_letters().await, 0);
}

#[tokio::test]
async fn the_import_queue_deleted_under_a_consumer_is_declared_again_and_work_goes_on() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let consumer = Consumer::start(&app, &broker, &[]);
    broker.wait_for_consumers(1).await;
    broker
        .channel
        .queue_delete(
            broker.settings.import_queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the import queue");
    // The broker cancels the subscription; the consumer declares its topology again.
    wait_until(
        Duration::from_secs(30),
        "the consumer to subscribe again",
        || async { consumer.log().matches("consuming import messages").count() == 2 },
    )
    .await;
    let run_id = pending_run(&app, "redeclared", "redeclared.csv", 600, 35).await;
    broker.publish_json(&reference(run_id)).await;
    wait_for_status(&app, run_id, "completed", Duration::from_secs(60)).await;
    assert_commit_is_the_file(&app, run_id, &sample_csv(600, 35), "redeclared").await;
    assert!(
        consumer.log().contains("reconnecting"),
        "{}",
        consumer.log()
    );
}

/// A connection given back to the pool inside a transaction block the driver does not
/// know about (a task dropped after sending BEGIN, before reading its answer) is closed
/// rather than handed to the next caller, whose writes would otherwise never commit.
#[tokio::test]
async fn a_connection_given_back_inside_a_transaction_is_not_reused() {
    let app = spawn_app().await;
    let pool = dsa_ingest::db::connect(&app.database_url, 1).await.unwrap();
    {
        let mut conn = pool.acquire().await.unwrap();
        // A bare BEGIN: the driver does not count it as a transaction of its own.
        sqlx::Executor::execute(&mut *conn, "BEGIN").await.unwrap();
    }
    // The pool has one connection: this is the one given back, or its replacement.
    sqlx::query("CREATE TABLE written_after (n int)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO written_after VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM written_after")
        .fetch_one(&app.pool)
        .await
        .expect("another session sees the table and its row");
    assert_eq!(seen, 1);
}
