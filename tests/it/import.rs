use std::time::Duration;

use dsa_ingest::import::decode::DecodeError;
use dsa_ingest::import::fetch::FetchError;
use dsa_ingest::import::ImportError;
use serde_json::json;

use dsa_ingest::sample::sample_csv;

use crate::helpers::{spawn_app, test_settings, wait_until};
use crate::process::loaded_rows;

#[tokio::test]
async fn values_round_trip_exactly() {
    let app = spawn_app().await;
    // BOM, CRLF, quotes, embedded newlines (LF and CRLF), unicode, empty fields.
    let csv = "\u{feff}name,quote,empty,text\r\n\
               plain,\"say \"\"hi\"\"\",,\"line one\nline two\"\r\n\
               \"ünïcødé ✓ 😀\",\"a,b\",\"\",\"crlf\r\ninside\"\r\n\
               tab\there,\\backslash\\,x,\"\"\r\n";
    app.put("dir/values.csv", csv.as_bytes().to_vec()).await;

    let summary = app.import("values", "dir/values.csv").await;

    assert_eq!(summary.rows, 3);
    assert_eq!(summary.new_rows, 3);
    assert_eq!(summary.bytes, csv.len() as u64);
    let rows = app.commit_rows(&summary.commit_id).await;
    assert_eq!(
        rows,
        vec![
            (
                "values:1".to_owned(),
                json!({"name": "plain", "quote": "say \"hi\"", "empty": "", "text": "line one\nline two"})
            ),
            (
                "values:2".to_owned(),
                json!({"name": "ünïcødé ✓ 😀", "quote": "a,b", "empty": "", "text": "crlf\r\ninside"})
            ),
            (
                "values:3".to_owned(),
                json!({"name": "tab\there", "quote": "\\backslash\\", "empty": "x", "text": ""})
            ),
        ]
    );
    // The stored hash is sha256 of the row's canonical JSON, reproducible outside.
    let (hash,): (Vec<u8>,) = sqlx::query_as(
        "SELECT row_hash FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = 'values:1'",
    )
    .bind(&summary.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let canonical = dsa_ingest::import::hash::canonical_json(&rows[0].1).unwrap();
    assert_eq!(
        hash,
        dsa_ingest::import::hash::row_hash(&canonical).to_vec()
    );
}

#[tokio::test]
async fn a_second_import_stores_nothing_new_and_continues_history() {
    let app = spawn_app().await;
    app.put("data.csv", sample_csv(1_000, 1)).await;

    let first = app.import("history", "data.csv").await;
    let second = app.import("history", "data.csv").await;

    assert_eq!((first.rows, first.new_rows), (1_000, 1_000));
    assert_eq!((second.rows, second.new_rows), (1_000, 0));
    assert_eq!(first.parent_commit_id, None);
    assert_eq!(
        second.parent_commit_id.as_deref(),
        Some(first.commit_id.as_str())
    );
    assert_eq!(second.tree_hash, first.tree_hash);
    let head: String = sqlx::query_scalar(
        "SELECT commit_id FROM dsa_core.refs WHERE dataset_id = $1 AND name = 'main'",
    )
    .bind(second.dataset_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(head, second.commit_id);
    let (status, output, progress): (String, serde_json::Value, serde_json::Value) =
        sqlx::query_as(
            "SELECT status::text, output_summary, progress
               FROM dsa_jobs.analysis_runs WHERE id = $1",
        )
        .bind(second.run_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    assert_eq!(output["parent_commit_id"], json!(first.commit_id));
    // One batch, so no progress was written while it ran: the end says it all.
    assert_eq!(progress["percentage"], json!(100));
    assert_eq!(progress["bytes_processed"], json!(second.bytes));
    assert_eq!(progress["total_bytes"], json!(second.bytes));
    assert_eq!(progress["rows_processed"], json!(1_000));
}

#[tokio::test]
async fn the_tree_hash_does_not_depend_on_the_batch_size() {
    let app = spawn_app().await;
    app.put("data.csv", sample_csv(777, 2)).await;
    let mut small = test_settings();
    small.batch_size = 10;
    let mut large = test_settings();
    large.batch_size = 10_000;

    let (_, a) = app.import_with(small, "a", "data.csv", false).await;
    let (_, b) = app.import_with(large, "b", "data.csv", false).await;

    assert_eq!(a.unwrap().tree_hash, b.unwrap().tree_hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_staged_side_by_side_store_each_row_once_and_give_the_same_version() {
    let app = spawn_app().await;
    // 37 distinct rows, each repeated every 37 lines: with batches of 10 rows, a row's
    // content comes back three or four batches later, while those batches are staging
    // or committing beside it.
    let mut csv = String::from("id,value\n");
    for n in 0..3_000u64 {
        csv.push_str(&format!("{},v{}\n", n % 37, n % 37));
    }
    app.put("repeats.csv", csv.into_bytes()).await;
    let mut wide = test_settings();
    wide.batch_size = 10;
    wide.staging_batches = dsa_ingest::config::MAX_STAGING_BATCHES;
    let mut narrow = wide.clone();
    narrow.staging_batches = 1;

    let (_, staged_wide) = app.import_with(wide, "wide", "repeats.csv", false).await;
    let staged_wide = staged_wide.expect("import with four batches staging");
    assert_eq!(staged_wide.rows, 3_000);
    assert_eq!(staged_wide.new_rows, 37, "each distinct row stored once");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM dsa_core.rows")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 37);
    // Every entry is there, in the file's order of ids, and references a stored row.
    let (entries, dangling): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE r.row_hash IS NULL)
           FROM dsa_core.commit_rows c LEFT JOIN dsa_core.rows r USING (row_hash)
          WHERE c.commit_id = $1",
    )
    .bind(&staged_wide.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((entries, dangling), (3_000, 0));

    // One batch at a time gives the same version (its rows are all stored by now).
    let (_, one_at_a_time) = app
        .import_with(narrow, "narrow", "repeats.csv", false)
        .await;
    let one_at_a_time = one_at_a_time.expect("import with one batch staging");
    assert_eq!(one_at_a_time.new_rows, 0);
    assert_eq!(one_at_a_time.tree_hash, staged_wide.tree_hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_four_batches_staging_keeps_entries_and_checkpoint_together() {
    let app = spawn_app().await;
    app.put("stopped.csv", sample_csv(30_000, 21)).await;
    let mut settings = test_settings();
    settings.staging_batches = dsa_ingest::config::MAX_STAGING_BATCHES;
    let reference = app.import("reference", "stopped.csv").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let importer = app.importer(settings.clone()).stop_on(stop.clone());
    let (run_id, _) = app
        .create_run(&importer, "stopped", "stopped.csv", false)
        .await;
    let running = tokio::spawn({
        let importer = importer.clone();
        async move { importer.run(run_id).await }
    });
    wait_until(
        Duration::from_secs(60),
        "some batches to commit",
        || async { loaded_rows(&app, run_id).await >= 3_000 },
    )
    .await;
    stop.cancel();
    let error = running.await.unwrap().unwrap_err();
    assert!(matches!(error, ImportError::Interrupted), "{error}");

    // Every batch that committed moved the checkpoint with it, and no other did.
    let loaded = loaded_rows(&app, run_id).await;
    assert!((3_000..30_000).contains(&loaded), "{loaded}");
    let entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dsa_core.commit_rows
          WHERE commit_id = (SELECT checkpoint->>'commit_id' FROM dsa_jobs.analysis_runs
                              WHERE id = $1)",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(entries, loaded);

    let resumed = app
        .importer(settings)
        .run(run_id)
        .await
        .expect("the resumed import succeeds");
    assert_eq!(resumed.rows, 30_000);
    assert_eq!(resumed.tree_hash, reference.tree_hash);
}

#[tokio::test]
async fn the_command_line_stages_up_to_four_batches_and_refuses_more() {
    let app = spawn_app().await;
    app.put("staged.csv", sample_csv(3_000, 9)).await;
    let source = format!("s3://{}/staged.csv", app.bucket);
    let import = |staging: &str| {
        app.cli()
            .env("IMPORT_STAGING_BATCHES", staging)
            .args(["import", "--dataset", "staged", &source, "--json"])
            .output()
            .unwrap()
    };

    // The most the setting allows: four batches staging beside the one committing.
    let output = import("4");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: dsa_ingest::import::ImportSummary =
        serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((summary.rows, summary.new_rows), (3_000, 3_000));

    for refused in ["0", "5"] {
        let output = import(refused);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!(
                "IMPORT_STAGING_BATCHES=\"{refused}\" is not valid"
            )),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_imports_racing_into_one_dataset_both_commit_in_a_line() {
    let app = spawn_app().await;
    app.put("one.csv", sample_csv(2_000, 3)).await;
    app.put("two.csv", sample_csv(2_000, 4)).await;
    let dataset = dsa_ingest::db::DatasetName::parse("raced").unwrap();
    let (dataset_id, _) = dsa_ingest::db::ensure_dataset(&app.pool, &dataset, None)
        .await
        .unwrap();
    // Hold the dataset row as a finaliser would, so both imports load everything and
    // then meet at finalise at the same time.
    let mut blocker = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM dsa_core.datasets WHERE id = $1 FOR NO KEY UPDATE")
        .bind(dataset_id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let pool = app.pool.clone();
    let release = async move {
        wait_until(
            Duration::from_secs(60),
            "both imports to load all rows",
            || {
                let pool = pool.clone();
                async move {
                    let loaded: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM dsa_jobs.analysis_runs
                      WHERE dataset_id = $1 AND (checkpoint->>'loaded_rows')::bigint = 2000",
                    )
                    .bind(dataset_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    loaded == 2
                }
            },
        )
        .await;
        // Both are now queued behind the dataset lock, unfinalised.
        let finalised: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dsa_core.commits WHERE committed_at IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            finalised, 0,
            "finalise did not wait for the dataset row lock"
        );
        blocker.commit().await.unwrap();
    };

    let (one, two, ()) = tokio::join!(
        app.import_with(test_settings(), "raced", "one.csv", false),
        app.import_with(test_settings(), "raced", "two.csv", false),
        release,
    );
    let (one, two) = (one.1.unwrap(), two.1.unwrap());

    // Exactly one of them saw the other as its parent; main points at the later one.
    let (first, second) = if two.parent_commit_id.as_deref() == Some(one.commit_id.as_str()) {
        (one, two)
    } else {
        (two, one)
    };
    assert_eq!(first.parent_commit_id, None);
    assert_eq!(
        second.parent_commit_id.as_deref(),
        Some(first.commit_id.as_str())
    );
    let head: String = sqlx::query_scalar(
        "SELECT commit_id FROM dsa_core.refs WHERE dataset_id = $1 AND name = 'main'",
    )
    .bind(first.dataset_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(head, second.commit_id);
    let finalised = app
        .count("dsa_core.commits WHERE committed_at IS NOT NULL")
        .await;
    assert_eq!(finalised, 2);
}

#[tokio::test]
async fn a_file_over_the_size_limit_fails_before_a_byte_is_read() {
    let app = spawn_app().await;
    let csv = sample_csv(100, 5);
    let size = csv.len();
    app.put("big.csv", csv).await;
    let mut settings = test_settings();
    settings.max_file_size = 1_000;

    let (run_id, result) = app.import_with(settings, "limited", "big.csv", false).await;

    let error = result.unwrap_err();
    assert!(
        matches!(error, ImportError::Fetch(FetchError::TooLarge { .. })),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&size.to_string()) && message.contains("1000"),
        "{message}"
    );
    let (status, stored, completed) = app.run_state(run_id).await;
    assert_eq!(status, "failed");
    assert_eq!(stored.as_deref(), Some(message.as_str()));
    assert!(completed);
    let commits = app.count("dsa_core.commits").await;
    assert_eq!(commits, 0);
}

#[tokio::test]
async fn an_object_replaced_mid_import_fails_the_run_and_commits_nothing() {
    let app = spawn_app().await;
    app.put("moving.csv", sample_csv(20_000, 6)).await;
    let mut settings = test_settings();
    settings.batch_size = 50;
    settings.chunk_size = 16 * 1024;
    settings.fetch_concurrency = 1;

    let importer = app.importer(settings);
    let parameters = dsa_ingest::import::run::ImportParameters {
        source: app.location("moving.csv"),
        expected_etag: None,
        options: dsa_ingest::import::run::ImportOptions {
            ..Default::default()
        },
    };
    let dataset = dsa_ingest::db::DatasetName::parse("moving").unwrap();
    let (run_id, _) = importer
        .create_run(&dataset, None, &parameters)
        .await
        .unwrap();
    let running = tokio::spawn(async move { importer.run(run_id).await });
    let pool = app.pool.clone();
    wait_until(Duration::from_secs(60), "the first batches to commit", || {
        let pool = pool.clone();
        async move {
            let rows: Option<i64> = sqlx::query_scalar(
                "SELECT (checkpoint->>'loaded_rows')::bigint FROM dsa_jobs.analysis_runs WHERE id = $1",
            )
            .bind(run_id)
            .fetch_one(&pool)
            .await
            .unwrap();
            rows.unwrap_or(0) >= 100
        }
    })
    .await;
    app.put("moving.csv", sample_csv(20_000, 7)).await;

    let error = running.await.unwrap().unwrap_err();

    let changed = matches!(
        error,
        ImportError::Fetch(FetchError::ObjectChanged { .. })
            | ImportError::Decode(DecodeError::Source(FetchError::ObjectChanged { .. }))
    );
    assert!(changed, "{error}");
    let (status, message, completed) = app.run_state(run_id).await;
    assert_eq!(status, "failed");
    assert!(message
        .unwrap()
        .contains("changed while it was being imported"));
    assert!(completed);
    let (commits, commit_rows, refs): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM dsa_core.commits), (SELECT count(*) FROM dsa_core.commit_rows),
                (SELECT count(*) FROM dsa_core.refs)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((commits, commit_rows, refs), (0, 0, 0));
}

#[tokio::test]
async fn a_quote_left_open_to_the_end_fails_the_run_naming_its_line_and_main_stays() {
    let app = spawn_app().await;
    app.put("people.csv", b"id,name\n1,a\n2,b\n".to_vec()).await;
    let first = app.import("people", "people.csv").await;
    // Five batches of 100 rows load before the record whose quote never closes; the
    // parser alone would have ended that field at the end of the file and imported
    // the 150 lines after it as one value.
    let mut csv = b"id,name\n".to_vec();
    for n in 1..=500 {
        csv.extend_from_slice(format!("{n},row {n}\n").as_bytes());
    }
    let open_at = csv.len();
    csv.extend_from_slice(b"501,\"Smith, J.\n");
    for n in 502..=650 {
        csv.extend_from_slice(format!("{n},row {n}\n").as_bytes());
    }
    app.put("people.csv", csv).await;

    let message = app.import_fails("people", "people.csv").await;

    assert_eq!(
        message,
        format!(
            "people.csv: line 502, byte {open_at}: a quoted field in this record is never \
             closed; the parser would take the rest of the file as its value (is a quote left \
             open?)"
        )
    );
    let main: String = sqlx::query_scalar(
        "SELECT r.commit_id FROM dsa_core.refs r JOIN dsa_core.datasets d ON d.id = r.dataset_id
          WHERE d.name = 'people' AND r.name = 'main'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(main, first.commit_id);
}

#[tokio::test]
async fn a_ragged_row_fails_the_run_naming_its_line_and_byte() {
    let app = spawn_app().await;
    let csv = b"a,b\n1,2\n\"multi\nline\",3\n4,5,6\n7,8\n".to_vec();
    app.put("ragged.csv", csv).await;

    let message = app.import_fails("ragged", "ragged.csv").await;

    assert_eq!(
        message,
        "ragged.csv: line 5, byte 23: expected 2 fields as in the header, found 3"
    );
}

#[tokio::test]
async fn invalid_utf8_names_its_line_and_byte() {
    let app = spawn_app().await;
    let mut csv = b"a,b\n1,2\nok,bad".to_vec();
    csv.push(0xff);
    csv.extend_from_slice(b"\n");
    app.put("latin1.csv", csv).await;

    let (_, result) = app
        .import_with(test_settings(), "utf8", "latin1.csv", false)
        .await;

    assert_eq!(
        result.unwrap_err().to_string(),
        "latin1.csv: line 3, byte 8: column 2 is not valid UTF-8 (at byte 14 of the file)"
    );
}

#[tokio::test]
async fn bad_rows_can_be_skipped_into_the_rejected_rows_table() {
    let app = spawn_app().await;
    let mut csv = b"a,b\n1,2\n3\n".to_vec();
    csv.extend_from_slice(b"x,\xff\n5,6\n");
    app.put("mixed.csv", csv).await;

    let (run_id, result) = app
        .import_with(test_settings(), "mixed", "mixed.csv", true)
        .await;

    let summary = result.unwrap();
    assert_eq!((summary.rows, summary.rejected_rows), (2, 2));
    let rows = app.commit_rows(&summary.commit_id).await;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    // Row numbers follow the file, so a skipped row leaves a gap a person can find.
    assert_eq!(ids, vec!["mixed:1", "mixed:4"]);
    let rejected: Vec<(i64, i64, Option<i32>, String)> = sqlx::query_as(
        "SELECT line, byte_offset, \"column\", error FROM dsa_jobs.rejected_rows
          WHERE run_id = $1 ORDER BY line",
    )
    .bind(run_id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!((rejected[0].0, rejected[0].1, rejected[0].2), (3, 8, None));
    assert_eq!(
        (rejected[1].0, rejected[1].1, rejected[1].2),
        (4, 10, Some(2))
    );
    assert!(rejected[1].3.contains("not valid UTF-8"));
}

#[tokio::test]
async fn a_worker_whose_lease_was_taken_over_can_no_longer_write() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let (run_id, dataset_id) = app.create_run(&importer, "leased", "data.csv", false).await;
    let lease = Duration::from_secs(30);
    let stale = dsa_ingest::runs::claim(&app.pool, run_id, "worker-a", lease)
        .await
        .unwrap();
    // A live lease is not taken.
    let refused = dsa_ingest::runs::claim(&app.pool, run_id, "worker-b", lease).await;
    assert!(matches!(
        refused,
        Err(dsa_ingest::runs::ClaimError::Held { .. })
    ));
    // Worker A goes quiet, its lease runs out, and worker B takes the run over.
    sqlx::query(
        "UPDATE dsa_jobs.analysis_runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(run_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let current = dsa_ingest::runs::claim(&app.pool, run_id, "worker-b", lease)
        .await
        .unwrap();
    assert!(current.lease.token > stale.lease.token);

    let loader = dsa_ingest::import::load::Loader::new(&app.pool, stale.lease.clone());
    let checkpoint =
        dsa_ingest::import::run::Checkpoint::start("stale-commit".into(), None, "data".into());
    let error = loader
        .begin_commit(dataset_id, "written by a stale worker", None, &checkpoint)
        .await
        .unwrap_err();

    assert!(
        matches!(error, dsa_ingest::import::load::LoadError::LeaseLost { .. }),
        "{error}"
    );
    let commits = app.count("dsa_core.commits").await;
    assert_eq!(commits, 0, "the stale worker's transaction must roll back");
}

#[tokio::test]
async fn a_claim_is_not_blocked_by_the_row_lock_of_a_worker_frozen_before_its_commit() {
    use sqlx::Connection;
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let (run_id, _) = app.create_run(&importer, "frozen", "data.csv", false).await;
    let first = dsa_ingest::runs::claim(&app.pool, run_id, "worker-a", Duration::from_secs(1))
        .await
        .unwrap();
    // Worker A's batch transaction has moved the checkpoint (locking the run's row)
    // and the worker froze before its COMMIT.
    let options = app
        .pool
        .connect_options()
        .as_ref()
        .clone()
        .application_name("worker-a");
    let mut frozen = sqlx::PgConnection::connect_with(&options).await.unwrap();
    sqlx::query("BEGIN").execute(&mut frozen).await.unwrap();
    sqlx::query(
        "UPDATE dsa_jobs.analysis_runs SET lease_expires_at = now() + interval '1 second'
          WHERE id = $1 AND lease_token = $2",
    )
    .bind(run_id)
    .bind(first.lease.token)
    .execute(&mut frozen)
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "worker A's lease to run out",
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT lease_expires_at <= now() FROM dsa_jobs.analysis_runs WHERE id = $1",
            )
            .bind(run_id)
            .fetch_one(&app.pool)
            .await
            .unwrap()
        },
    )
    .await;

    let taken = tokio::time::timeout(
        Duration::from_secs(30),
        dsa_ingest::runs::claim(&app.pool, run_id, "worker-b", Duration::from_secs(30)),
    )
    .await
    .expect("the claim waited on the frozen worker's row lock")
    .unwrap();
    assert!(taken.lease.token > first.lease.token);
    assert!(
        sqlx::query("SELECT 1").execute(&mut frozen).await.is_err(),
        "the frozen worker's transaction must have been ended"
    );
}

#[tokio::test]
async fn rows_repeated_within_and_across_batches_are_stored_once() {
    let app = spawn_app().await;
    let mut csv = String::from("kind,value\n");
    for n in 0..350 {
        csv.push_str(&format!("k{},same\n", n % 3));
    }
    app.put("repeats.csv", csv.into_bytes()).await;

    let summary = app.import("repeats", "repeats.csv").await;

    assert_eq!((summary.rows, summary.new_rows), (350, 3));
    let (entries, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT row_hash) FROM dsa_core.commit_rows WHERE commit_id = $1",
    )
    .bind(&summary.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((entries, distinct), (350, 3));
    let stored = app.count("dsa_core.rows").await;
    assert_eq!(stored, 3);
}

#[tokio::test]
async fn an_unterminated_quote_fails_the_run_before_memory_runs_away() {
    let app = spawn_app().await;
    let mut csv = b"a,b\n1,2\n3,\"never closed ".to_vec();
    csv.extend(std::iter::repeat_n(b'x', 3 << 20));
    app.put("open-quote.csv", csv).await;

    let message = app.import_fails("open-quote", "open-quote.csv").await;

    assert_eq!(
        message,
        "open-quote.csv: the record starting at byte 8 is longer than 1048576 bytes \
         (IMPORT_MAX_RECORD_BYTES); is a quote left open there?"
    );
}
