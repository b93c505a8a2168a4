//! `dsa-ingest watch` as child processes against Garage, with `consume` importing what
//! it queues: objects dropped into the bucket become commits, once per object version,
//! whatever the names, the number of watchers, or S3 events announcing them too.

use std::time::{Duration, Instant};

use dsa_ingest::sample::sample_csv;
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{spawn_app, wait_until, TestApp};
use crate::metrics::{get, sample};
use crate::process::Consumer;

/// Long enough for a child process to start, list, queue and for `consume` to import.
const IMPORTED: Duration = Duration::from_secs(90);

/// A CSV whose second record has one field too few: its run fails.
const BAD_CSV: &[u8] = b"a,b\n1,2\n3\n";

/// The value of a series on a watcher's `/metrics`.
async fn metric(process: &Consumer, series: &str) -> f64 {
    let (_, _, body) = get(process.metrics_addr().await, "/metrics").await;
    sample(&body, series)
}

/// How many listings of its rules the watcher has finished.
async fn listings(watcher: &Consumer) -> f64 {
    metric(watcher, "dsa_watch_listing_duration_seconds_count").await
}

/// Waits until the watcher has finished `more` listings after now: anything in the
/// bucket before this call has been looked at by then.
async fn wait_for_listings(watcher: &Consumer, more: f64) {
    let target = listings(watcher).await + more;
    wait_until(Duration::from_secs(60), "more listings", || async {
        listings(watcher).await >= target
    })
    .await;
}

/// The runs importing `key` of the test's bucket, with their status.
async fn runs_of(app: &TestApp, key: &str) -> Vec<(Uuid, String)> {
    sqlx::query_as(
        "SELECT id, status::text FROM dsa_jobs.analysis_runs
          WHERE run_parameters->'source'->>'bucket' = $1
            AND run_parameters->'source'->>'key' = $2
          ORDER BY created_at",
    )
    .bind(&app.bucket)
    .bind(key)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn wait_for_runs(app: &TestApp, key: &str, status: &str, count: usize) {
    wait_until(
        IMPORTED,
        &format!("{count} {status} runs of {key}"),
        || async {
            runs_of(app, key)
                .await
                .iter()
                .filter(|(_, s)| s == status)
                .count()
                == count
        },
    )
    .await;
}

async fn exists(app: &TestApp, key: &str) -> bool {
    app.s3
        .head_object()
        .bucket(&app.bucket)
        .key(key)
        .send()
        .await
        .is_ok()
}

/// Row counts of the finalised commits of a dataset, oldest first.
async fn commit_rows_of(app: &TestApp, dataset: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT c.row_count FROM dsa_core.commits c
           JOIN dsa_core.datasets d ON d.id = c.dataset_id
          WHERE d.name = $1 AND c.committed_at IS NOT NULL
          ORDER BY c.committed_at",
    )
    .bind(dataset)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// `dsa_watch_active` of each watcher.
async fn active_states(watchers: &[Consumer]) -> Vec<f64> {
    let mut states = Vec::new();
    for watcher in watchers {
        states.push(metric(watcher, "dsa_watch_active").await);
    }
    states
}

fn location(app: &TestApp, prefix: &str) -> String {
    format!("s3://{}/{prefix}", app.bucket)
}

#[tokio::test]
async fn a_dropped_csv_becomes_a_commit_once_per_version_and_hidden_names_are_left() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    let watcher = Consumer::start_watcher(
        &app,
        &broker,
        &[&location(&app, "in/"), "--dataset", "dropped"],
        &[],
    );
    for hidden in [
        "in/.hidden.csv",
        "in/_tmp/x.csv",
        "in/a.csv.part",
        "in/b.tmp",
        "in/c.csv.crdownload",
    ] {
        app.put(hidden, sample_csv(5, 9)).await;
    }
    app.put("in/a.csv", sample_csv(50, 1)).await;

    wait_for_runs(&app, "in/a.csv", "completed", 1).await;
    assert_eq!(commit_rows_of(&app, "dropped").await, vec![50]);
    let (message,): (String,) =
        sqlx::query_as("SELECT message FROM dsa_core.commits WHERE committed_at IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        message.contains(&format!("s3://{}/in/a.csv", app.bucket)),
        "{message}"
    );

    // The same content again: the same ETag, the same version, no new run.
    app.put("in/a.csv", sample_csv(50, 1)).await;
    wait_for_listings(&watcher, 3.0).await;
    assert_eq!(runs_of(&app, "in/a.csv").await.len(), 1);
    // Only a.csv was ever queued; the hidden and temporary names were left alone.
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 1);
    assert!(
        metric(
            &watcher,
            "dsa_watch_objects_skipped_total{reason=\"ignored_name\"}"
        )
        .await
            >= 5.0
    );
    assert!(metric(&watcher, "dsa_watch_objects_skipped_total{reason=\"seen\"}").await >= 1.0);
    assert_eq!(
        metric(&watcher, "dsa_watch_objects_queued_total").await,
        1.0
    );

    // New content under the same key is a new version: imported again.
    app.put("in/a.csv", sample_csv(60, 2)).await;
    wait_for_runs(&app, "in/a.csv", "completed", 2).await;
    assert_eq!(commit_rows_of(&app, "dropped").await, vec![50, 60]);
    assert_eq!(
        metric(&watcher, "dsa_watch_objects_queued_total").await,
        2.0
    );
    assert_eq!(metric(&watcher, "dsa_watch_active").await, 1.0);
    // Every run was published through the outbox, nothing is left unsent.
    wait_until(Duration::from_secs(20), "an empty outbox", || async {
        app.count("dsa_jobs.outbox WHERE sent_at IS NULL").await == 0
    })
    .await;
    assert_eq!(
        app.count("dsa_jobs.outbox WHERE exchange = 'dsa.imports'")
            .await,
        2
    );
}

#[tokio::test]
async fn unsettled_objects_wait_their_lag_is_exported_and_watch_stops_on_sigterm() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let mut watcher = Consumer::start_watcher(
        &app,
        &broker,
        &[&location(&app, ""), "--dataset", "young"],
        &[("WATCH_SETTLE_SECONDS", "3600")],
    );
    app.put("fresh.csv", sample_csv(5, 1)).await;
    wait_until(Duration::from_secs(60), "an unsettled object", || async {
        metric(
            &watcher,
            "dsa_watch_objects_skipped_total{reason=\"unsettled\"}",
        )
        .await
            >= 1.0
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "the ingest lag to show",
        || async { metric(&watcher, "dsa_watch_oldest_unqueued_age_seconds").await > 0.0 },
    )
    .await;
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 0);
    assert_eq!(app.count("dsa_jobs.watched_objects").await, 0);

    // Health like consume's: alive, and ready once the relay holds its broker session.
    let addr = watcher.metrics_addr().await;
    assert_eq!(get(addr, "/healthz").await.0, 200);
    wait_until(Duration::from_secs(30), "readiness", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;

    watcher.signal(libc::SIGTERM);
    let status = watcher.exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    assert!(watcher.log().contains("watch stopped"));
}

#[tokio::test]
async fn an_object_also_announced_by_an_s3_event_is_imported_once() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    app.put("events/day 1.csv", sample_csv(20, 3)).await;
    let etag = app
        .s3
        .head_object()
        .bucket(&app.bucket)
        .key("events/day 1.csv")
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    broker
        .publish_json(&json!({"Records": [{
            "eventName": "s3:ObjectCreated:Put",
            "s3": {
                "bucket": {"name": app.bucket},
                "object": {"key": "events%2Fday+1.csv", "eTag": etag}
            }
        }]}))
        .await;
    wait_for_runs(&app, "events/day 1.csv", "completed", 1).await;

    // The watcher, choosing the dataset as S3 events do, finds the version's run.
    let watcher = Consumer::start_watcher(&app, &broker, &[&location(&app, "events/")], &[]);
    wait_for_listings(&watcher, 2.0).await;
    let runs = runs_of(&app, "events/day 1.csv").await;
    assert_eq!(runs.len(), 1);
    let (run_id, queued): (Uuid, bool) =
        sqlx::query_as("SELECT run_id, queued FROM dsa_jobs.watched_objects")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((run_id, queued), (runs[0].0, false));
    assert_eq!(
        metric(&watcher, "dsa_watch_objects_queued_total").await,
        0.0
    );
    assert_eq!(
        metric(
            &watcher,
            "dsa_watch_objects_skipped_total{reason=\"has_run\"}"
        )
        .await,
        1.0
    );
    assert_eq!(commit_rows_of(&app, "events").await, vec![20]);
}

#[tokio::test]
async fn one_of_two_watchers_lists_and_the_other_takes_over_when_it_is_killed() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    let rule = [location(&app, "drop/"), "--dataset".into(), "shared".into()];
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    let mut watchers = vec![
        Consumer::start_watcher(&app, &broker, &rule, &[]),
        Consumer::start_watcher(&app, &broker, &rule, &[]),
    ];
    wait_until(Duration::from_secs(60), "one active watcher", || async {
        active_states(&watchers).await.iter().sum::<f64>() == 1.0
    })
    .await;

    let first = [
        "drop/a b.csv",
        "drop/c+d.csv",
        "drop/50%.csv",
        "drop/ünï/cödé.csv",
    ];
    for (seed, key) in first.iter().enumerate() {
        app.put(key, sample_csv(10, seed as u64)).await;
    }
    for key in first {
        wait_for_runs(&app, key, "completed", 1).await;
    }
    // Still exactly one lister.
    let states = active_states(&watchers).await;
    assert_eq!(states.iter().sum::<f64>(), 1.0);
    let lister = states.iter().position(|state| *state == 1.0).unwrap();
    let standby = 1 - lister;
    watchers[lister].signal(libc::SIGKILL);
    let killed_at = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "the standby to take over",
        || async { metric(&watchers[standby], "dsa_watch_active").await == 1.0 },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "took over after {takeover:?}"
    );
    println!(
        "the standby took over {:.2} s after kill -9 of the lister",
        takeover.as_secs_f64()
    );
    watchers.remove(lister);

    let second = ["drop/deep/er/x.csv", "drop/e=f&g.csv"];
    for (seed, key) in second.iter().enumerate() {
        app.put(key, sample_csv(10, 10 + seed as u64)).await;
    }
    for key in second {
        wait_for_runs(&app, key, "completed", 1).await;
    }
    wait_for_listings(&watchers[0], 2.0).await;
    // Nothing twice: one run and one commit per object.
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, 6);
    assert_eq!(commit_rows_of(&app, "shared").await.len(), 6);
    assert_eq!(app.count("dsa_jobs.watched_objects").await, 6);
}

#[tokio::test]
async fn after_delete_removes_an_object_once_its_commit_is_final_and_a_failed_run_leaves_it() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    let _watcher = Consumer::start_watcher(
        &app,
        &broker,
        &[
            &location(&app, "in/"),
            "--dataset",
            "cleaned",
            "--after",
            "delete",
        ],
        &[],
    );
    app.put("in/good.csv", sample_csv(30, 4)).await;
    app.put("in/bad.csv", BAD_CSV.to_vec()).await;

    wait_until(IMPORTED, "good.csv to be deleted", || async {
        !exists(&app, "in/good.csv").await
    })
    .await;
    // Gone only once its run completed and its commit was final.
    let runs = runs_of(&app, "in/good.csv").await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].1, "completed");
    assert_eq!(commit_rows_of(&app, "cleaned").await, vec![30]);

    wait_for_runs(&app, "in/bad.csv", "failed", 1).await;
    wait_until(
        Duration::from_secs(30),
        "bad.csv's record to be settled",
        || async {
            app.count(
                "dsa_jobs.watched_objects WHERE key = 'in/bad.csv' AND after_done_at IS NOT NULL",
            )
            .await
                == 1
        },
    )
    .await;
    assert!(
        exists(&app, "in/bad.csv").await,
        "a failed run's object stays"
    );
    let (result,): (String,) = sqlx::query_as(
        "SELECT after_result FROM dsa_jobs.watched_objects WHERE key = 'in/good.csv'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(result, "deleted");
}

#[tokio::test]
async fn an_ordered_rule_from_a_rules_file_lists_after_the_last_key_and_moves_what_it_imported() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        rules.path(),
        format!(
            r#"
            [[rule]]
            name = "daily"
            bucket = "{}"
            prefix = "daily/"
            pattern = "*.csv"
            dataset = "{{segment:1}}"
            ordered = true
            after = "move:done/"
            after_failure = "move:failed/"
            message = "Daily file {{key}}"
            "#,
            app.bucket
        ),
    )
    .unwrap();
    let path = rules.path().to_str().unwrap();
    let watcher = Consumer::start_watcher(&app, &broker, &[], &[("WATCH_RULES_FILE", path)]);
    app.put("daily/2026-11-01.csv", sample_csv(10, 1)).await;
    app.put("daily/2026-11-02.csv", BAD_CSV.to_vec()).await;

    // A move is a copy and then a delete: both objects are moved once their records
    // are settled, and only then is the source sure to be gone.
    wait_until(IMPORTED, "both objects' records to be settled", || async {
        app.count("dsa_jobs.watched_objects WHERE key LIKE 'daily/%' AND after_done_at IS NOT NULL")
            .await
            == 2
    })
    .await;
    assert!(exists(&app, "done/2026-11-01.csv").await);
    assert!(exists(&app, "failed/2026-11-02.csv").await);
    assert!(!exists(&app, "daily/2026-11-01.csv").await);
    assert!(!exists(&app, "daily/2026-11-02.csv").await);
    assert_eq!(commit_rows_of(&app, "daily").await, vec![10]);
    let cursor: String = sqlx::query_scalar("SELECT start_after FROM dsa_jobs.watch_cursors")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(cursor, "daily/2026-11-02.csv");

    // A later key is found after the cursor; an earlier key is not listed any more.
    app.put("daily/2026-10-31.csv", sample_csv(10, 2)).await;
    app.put("daily/2026-11-03.csv", sample_csv(12, 3)).await;
    wait_for_runs(&app, "daily/2026-11-03.csv", "completed", 1).await;
    wait_for_listings(&watcher, 3.0).await;
    assert!(runs_of(&app, "daily/2026-10-31.csv").await.is_empty());
    assert_eq!(commit_rows_of(&app, "daily").await, vec![10, 12]);
    let (message,): (String,) =
        sqlx::query_as("SELECT message FROM dsa_core.commits WHERE row_count = 12")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(message, "Daily file daily/2026-11-03.csv");
    assert_eq!(
        metric(&watcher, "dsa_watch_after_actions_total{action=\"moved\"}").await,
        3.0
    );
}

#[tokio::test]
async fn bad_rules_stop_watch_at_start_naming_the_problem() {
    let app = spawn_app().await;
    let run = |env: Vec<(&str, String)>, args: Vec<String>| {
        let mut command = app.child();
        command
            .arg("watch")
            .args(args)
            .env_remove("WATCH_RULES_FILE");
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.output().expect("run dsa-ingest watch");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let file = |text: &str| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    };
    let path = |file: &tempfile::NamedTempFile| file.path().to_str().unwrap().to_owned();

    let misspelt = file("[[rule]]\nname = \"orders\"\nbucket = \"landing\"\nmdoe = \"upsert\"\n");
    let (code, stderr) = run(vec![("WATCH_RULES_FILE", path(&misspelt))], vec![]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!(
            "WATCH_RULES_FILE {}, rule 1 (orders): unknown field \"mdoe\"",
            path(&misspelt)
        )),
        "{stderr}"
    );

    let overlapping = file(
        "[[rule]]\nname = \"all\"\nbucket = \"landing\"\n\
         [[rule]]\nname = \"orders\"\nbucket = \"landing\"\nprefix = \"orders/\"\n",
    );
    let (code, stderr) = run(vec![("WATCH_RULES_FILE", path(&overlapping))], vec![]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("rules \"all\" and \"orders\" overlap"),
        "{stderr}"
    );

    let (code, stderr) = run(
        vec![("IMPORT_ALLOWED_BUCKETS", "elsewhere".to_owned())],
        vec![
            "s3://landing/in/".to_owned(),
            "--dataset".to_owned(),
            "x".to_owned(),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("IMPORT_ALLOWED_BUCKETS permits only s3://elsewhere/*"),
        "{stderr}"
    );

    let (code, stderr) = run(
        vec![],
        vec![
            "s3://landing/in/".to_owned(),
            "--after".to_owned(),
            "archive".to_owned(),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("after: \"archive\" is not keep, delete"),
        "{stderr}"
    );

    let (code, stderr) = run(vec![], vec![]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("nothing to watch"), "{stderr}");
}

#[tokio::test]
async fn many_objects_in_an_unordered_prefix_are_each_queued_once() {
    // 1,000 by default; `WATCH_TEST_OBJECTS=10000` for the README's figures.
    let objects: usize = std::env::var("WATCH_TEST_OBJECTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1_000);
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    // Small files in 37 folders, put 16 at a time.
    let keys: Vec<String> = (0..objects)
        .map(|n| format!("bulk/{:02}/f{n:05}.csv", n % 37))
        .collect();
    futures::stream::iter(keys.iter())
        .for_each_concurrent(16, |key| {
            let app = &app;
            async move { app.put(key, format!("n\n{key}\n").into_bytes()).await }
        })
        .await;
    let dropped = Instant::now();
    let watcher = Consumer::start_watcher(
        &app,
        &broker,
        &[&location(&app, "bulk/"), "--dataset", "bulk"],
        &[("WATCH_SETTLE_SECONDS", "0")],
    );
    wait_until(Duration::from_secs(120), "every object queued", || async {
        app.count("dsa_jobs.analysis_runs").await == objects as i64
    })
    .await;
    let queued_after = dropped.elapsed();
    let first = metric(&watcher, "dsa_watch_listing_duration_seconds_sum").await;
    // Later listings find every object recorded already.
    let before = listings(&watcher).await;
    wait_for_listings(&watcher, 3.0).await;
    let after = listings(&watcher).await;
    let relisting = (metric(&watcher, "dsa_watch_listing_duration_seconds_sum").await - first)
        / (after - before);
    assert_eq!(app.count("dsa_jobs.analysis_runs").await, objects as i64);
    assert_eq!(
        app.count("dsa_jobs.watched_objects WHERE queued").await,
        objects as i64
    );
    assert_eq!(
        app.count("dsa_jobs.outbox WHERE exchange = 'dsa.imports'")
            .await,
        objects as i64
    );
    assert_eq!(
        metric(&watcher, "dsa_watch_objects_queued_total").await,
        objects as f64
    );
    let peak_rss = metric(&watcher, "dsa_process_peak_resident_memory_bytes").await;
    println!(
        "{objects} objects: queued {:.2} s after the watcher started ({:.0} objects/s, process start included); \
         a listing that finds them all recorded takes {:.3} s ({:.0} objects/s); the watcher's peak RSS {:.1} MB",
        queued_after.as_secs_f64(),
        objects as f64 / queued_after.as_secs_f64(),
        relisting,
        objects as f64 / relisting,
        peak_rss / 1e6,
    );
}

#[tokio::test]
async fn a_watcher_restarted_with_changed_rules_imports_nothing_twice() {
    let app = spawn_app().await;
    let broker = TestBroker::new().await;
    let _consumer = Consumer::start(&app, &broker, &[]);
    let rules = tempfile::NamedTempFile::new().unwrap();
    let path = rules.path().to_str().unwrap().to_owned();
    let write_rules = |dataset: &str, after: &str| {
        std::fs::write(
            rules.path(),
            format!(
                "[[rule]]\nname = \"in\"\nbucket = \"{}\"\nprefix = \"in/\"\npattern = \"*.csv\"\n\
                 dataset = \"{dataset}\"\nafter = \"{after}\"\n",
                app.bucket
            ),
        )
        .unwrap();
    };
    write_rules("first", "keep");
    let mut watcher =
        Consumer::start_watcher(&app, &broker, &[], &[("WATCH_RULES_FILE", path.as_str())]);
    app.put("in/a.csv", sample_csv(10, 1)).await;
    wait_for_runs(&app, "in/a.csv", "completed", 1).await;
    watcher.signal(libc::SIGTERM);
    assert!(watcher.exit(Duration::from_secs(20)).await.success());

    // The same rule name, another dataset and an after-action: what was imported stays
    // imported once; what comes now follows the new rule.
    write_rules("second", "delete");
    let watcher =
        Consumer::start_watcher(&app, &broker, &[], &[("WATCH_RULES_FILE", path.as_str())]);
    app.put("in/b.csv", sample_csv(12, 2)).await;
    wait_until(IMPORTED, "b.csv imported and deleted", || async {
        !exists(&app, "in/b.csv").await
    })
    .await;
    wait_for_listings(&watcher, 2.0).await;
    assert_eq!(runs_of(&app, "in/a.csv").await.len(), 1);
    assert_eq!(runs_of(&app, "in/b.csv").await.len(), 1);
    assert_eq!(commit_rows_of(&app, "first").await, vec![10]);
    assert_eq!(commit_rows_of(&app, "second").await, vec![12]);
    // a.csv was recorded under the old rule, which kept objects.
    assert!(exists(&app, "in/a.csv").await);
}
