//! The history commands against the real database and store: log, diff, export,
//! verify and gc, mostly through the `dsa-ingest` binary as a user runs them.

use std::process::Output;
use std::time::Duration;

use dsa_ingest::config::S3Settings;
use dsa_ingest::history::diff::DiffPair;
use dsa_ingest::history::gc;
use dsa_ingest::history::resolve::{resolve, Dataset};
use dsa_ingest::history::verify::verify_commit;
use dsa_ingest::import::hash::row_hash;
use dsa_ingest::import::load::{Batch, BatchOutcome, BatchWriter, LoadError, Loader, Lookup};
use dsa_ingest::import::run::Checkpoint;
use dsa_ingest::sample::sample_csv;
use serde_json::{json, Value};

use crate::helpers::{service_settings, spawn_app, test_settings, wait_until, TestApp};
use crate::process::{loaded_rows, slow_endpoint};

fn run(app: &TestApp, args: &[&str]) -> Output {
    app.cli().args(args).output().expect("dsa-ingest runs")
}

/// Runs the CLI, expects success, returns stdout.
fn ok(app: &TestApp, args: &[&str]) -> String {
    app.cli_text(args)
}

/// Runs the CLI, expects exit code 1, returns stdout and stderr together.
fn fails(app: &TestApp, args: &[&str]) -> String {
    let output = run(app, args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "dsa-ingest {args:?} should exit 1; stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// A CSV of `rows` rows `id,name,city` with `name` of row `n` as `names(n)`.
fn people(rows: u64, names: impl Fn(u64) -> String) -> Vec<u8> {
    let mut csv = String::from("id,name,city\n");
    for n in 1..=rows {
        csv += &format!("{n},{},town {n}\n", names(n));
    }
    csv.into_bytes()
}

#[tokio::test]
async fn log_lists_three_imports_newest_first() {
    let app = spawn_app().await;
    let mut commits = Vec::new();
    for version in 1..=3u64 {
        app.put("people.csv", people(10 * version, |n| format!("p{n}")))
            .await;
        commits.push(app.import("people", "people.csv").await);
    }

    let log: Vec<Value> = serde_json::from_str(&ok(&app, &["log", "people", "--json"])).unwrap();

    assert_eq!(log.len(), 3);
    for (entry, summary) in log.iter().zip(commits.iter().rev()) {
        assert_eq!(entry["commit_id"], summary.commit_id.as_str());
        assert_eq!(entry["row_count"], summary.rows);
        assert_eq!(entry["tree_hash"], summary.tree_hash.as_str());
        assert_eq!(entry["run_id"], summary.run_id.to_string());
        assert_eq!(entry["author_id"], "tester");
        assert_eq!(
            entry["message"],
            "Import s3://".to_owned() + &app.bucket + "/people.csv"
        );
        assert!(entry["committed_at"].is_string());
    }
    assert_eq!(log[0]["parent_commit_id"], commits[1].commit_id.as_str());
    assert_eq!(log[1]["parent_commit_id"], commits[0].commit_id.as_str());
    assert_eq!(log[2]["parent_commit_id"], Value::Null);

    let limited: Vec<Value> =
        serde_json::from_str(&ok(&app, &["log", "people", "--limit", "2", "--json"])).unwrap();
    assert_eq!(limited.len(), 2);
    let text = ok(&app, &["log", "people"]);
    let newest = text.find(&commits[2].commit_id).expect("newest listed");
    let oldest = text.find(&commits[0].commit_id).expect("oldest listed");
    assert!(newest < oldest, "newest first:\n{text}");
    assert!(text.contains("Rows:   30"), "{text}");
}

#[tokio::test]
async fn diff_names_changed_added_and_removed_rows_in_logical_order() {
    let app = spawn_app().await;
    app.put("people.csv", people(12, |n| format!("p{n}"))).await;
    let first = app.import("people", "people.csv").await;
    // Rows 2 and 10 change, 12 is gone: 2 must come before 10 (numbers, not text).
    app.put(
        "people.csv",
        people(11, |n| match n {
            2 | 10 => format!("changed {n}"),
            _ => format!("p{n}"),
        }),
    )
    .await;
    let second = app.import("people", "people.csv").await;

    let lines = json_lines(&ok(&app, &["diff", "people", "--json"]));
    assert_eq!(
        lines,
        vec![
            json!({"op": "changed", "logical_row_id": "people:2",
                   "old": {"id": "2", "name": "p2", "city": "town 2"},
                   "new": {"id": "2", "name": "changed 2", "city": "town 2"}}),
            json!({"op": "changed", "logical_row_id": "people:10",
                   "old": {"id": "10", "name": "p10", "city": "town 10"},
                   "new": {"id": "10", "name": "changed 10", "city": "town 10"}}),
            json!({"op": "removed", "logical_row_id": "people:12",
                   "old": {"id": "12", "name": "p12", "city": "town 12"}, "new": null}),
            json!({"summary": {"added": 0, "removed": 1, "changed": 2, "unchanged": 9}}),
        ]
    );

    // The other way round, named by prefix and by main~1: the removed row is added.
    let backwards = json_lines(&ok(
        &app,
        &["diff", "people", &second.commit_id[..8], "main~1", "--json"],
    ));
    assert_eq!(backwards[2]["op"], "added");
    assert_eq!(backwards[2]["logical_row_id"], "people:12");
    assert_eq!(
        backwards[3],
        json!({"summary": {"added": 1, "removed": 0, "changed": 2, "unchanged": 9}})
    );

    // --summary counts from the server-side merge alone.
    let summary = ok(
        &app,
        &[
            "diff",
            "people",
            &first.commit_id,
            &second.commit_id,
            "--summary",
            "--json",
        ],
    );
    assert_eq!(
        json_lines(&summary),
        vec![json!({"summary": {"added": 0, "removed": 1, "changed": 2, "unchanged": 9}})]
    );
    let text = ok(&app, &["diff", "people", "--summary"]);
    assert_eq!(text, "0 added, 1 removed, 2 changed, 9 unchanged\n");

    // A root commit is compared with nothing: all its rows are added.
    let dataset = Dataset::find(&app.pool, "people").await.unwrap();
    let root = DiffPair::resolve(&app.pool, &dataset, None, Some("main~1"))
        .await
        .unwrap();
    assert!(root.from.is_none());
    let counts = root.summary(&app.pool).await.unwrap();
    assert_eq!((counts.added, counts.unchanged), (12, 0));
}

#[tokio::test]
async fn identical_tree_hashes_answer_without_reading_rows() {
    let app = spawn_app().await;
    app.put("same.csv", sample_csv(300, 4)).await;
    let first = app.import("same", "same.csv").await;
    let second = app.import("same", "same.csv").await;
    assert_eq!(first.tree_hash, second.tree_hash);
    // With the entries gone, only the tree hashes can give the right answer.
    sqlx::query("DELETE FROM dsa_core.commit_rows")
        .execute(&app.pool)
        .await
        .unwrap();

    let summary = json_lines(&ok(&app, &["diff", "same", "--summary", "--json"]));
    let streamed = json_lines(&ok(&app, &["diff", "same", "--json"]));

    let expected = json!({"summary": {"added": 0, "removed": 0, "changed": 0, "unchanged": 300}});
    assert_eq!(summary, vec![expected.clone()]);
    assert_eq!(streamed, vec![expected]);
}

#[tokio::test]
async fn commit_names_are_resolved_within_the_dataset_or_refused() {
    let app = spawn_app().await;
    app.put("a.csv", people(3, |n| format!("a{n}"))).await;
    app.put("b.csv", people(3, |n| format!("b{n}"))).await;
    let a = app.import("alpha", "a.csv").await;
    let b = app.import("beta", "b.csv").await;
    // Two commits of alpha that share a 9-character prefix.
    let dataset_id = a.dataset_id;
    for suffix in ["11111111111111111111111", "22222222222222222222222"] {
        sqlx::query(
            "INSERT INTO dsa_core.commits (commit_id, dataset_id, message, committed_at, row_count, tree_hash)
             VALUES ('abcdef012' || $1, $2, 'crafted', now(), 0, $3)",
        )
        .bind(suffix)
        .bind(dataset_id)
        .bind("0".repeat(64))
        .execute(&app.pool)
        .await
        .unwrap();
    }

    let other = fails(&app, &["export", "alpha", "--commit", &b.commit_id]);
    assert!(other.contains("belongs to dataset \"beta\""), "{other}");
    let other_prefix = fails(&app, &["diff", "alpha", &b.commit_id[..10], "main"]);
    assert!(
        other_prefix.contains("belongs to dataset \"beta\""),
        "{other_prefix}"
    );
    let unknown = fails(&app, &["verify", "alpha", "--commit", "0123456789abcdef"]);
    assert!(
        unknown.contains("no commit \"0123456789abcdef\""),
        "{unknown}"
    );
    let ambiguous = fails(&app, &["diff", "alpha", "abcdef012", "main"]);
    assert!(ambiguous.contains("ambiguous"), "{ambiguous}");
    assert!(ambiguous.contains("abcdef0121111"), "{ambiguous}");
    let short = fails(&app, &["diff", "alpha", "abcdef", "main"]);
    assert!(short.contains("too short"), "{short}");
    let too_far = fails(&app, &["diff", "alpha", "main~3"]);
    assert!(too_far.contains("further than the history"), "{too_far}");
    let no_dataset = fails(&app, &["log", "gamma"]);
    assert!(
        no_dataset.contains("dataset \"gamma\" does not exist"),
        "{no_dataset}"
    );
    // A long enough, unique prefix works.
    let resolved = ok(&app, &["log", "alpha", "--json"]);
    assert!(resolved.contains(&a.commit_id));
    ok(&app, &["verify", "alpha", "--commit", &a.commit_id[..7]]);
}

/// Quotes, separators and newlines in fields, empty fields, unicode, a header whose
/// duplicate names the import renames, and a value that looks like a formula.
const AWKWARD: &str = "name,name,note,empty,\"a,b\"\r\n\
    plain,\"say \"\"hi\"\"\",\"line one\nline two\",,x\r\n\
    \"ünïcødé ✓ 😀\",\"a,b\",\"crlf\r\ninside\",\"\",y\r\n\
    =SUM(A1:A2),+1,-2,@cmd,\"\ttab\"\r\n";

#[tokio::test]
async fn an_export_imported_again_gives_the_same_tree_hash() {
    let app = spawn_app().await;
    app.put("in/awkward.csv", AWKWARD.as_bytes().to_vec()).await;
    let original = app.import("awkward", "in/awkward.csv").await;
    assert!(
        !original.header_changes.is_empty(),
        "a duplicate header is renamed"
    );

    // To a local file, then back through the store under the same base name.
    let folder = std::env::temp_dir().join(format!("export-{}", uuid::Uuid::new_v4()));
    let path = folder.join("awkward.csv");
    ok(
        &app,
        &["export", "awkward", "--output", path.to_str().unwrap()],
    );
    let exported = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&folder).unwrap();
    app.put("again/awkward.csv", exported.clone()).await;
    let again = app.import("awkward-again", "again/awkward.csv").await;
    assert_eq!(again.tree_hash, original.tree_hash);
    assert_eq!(again.columns, original.columns);

    // Straight to S3 (a single part), and the same bytes as the local file.
    let target = format!("s3://{}/out/awkward.csv", app.bucket);
    let written = ok(&app, &["export", "awkward", "--output", &target, "--json"]);
    let written: Value = serde_json::from_str(&written).unwrap();
    assert_eq!(written["files"][0]["bytes"], exported.len());
    let object = app
        .s3
        .get_object()
        .bucket(&app.bucket)
        .key("out/awkward.csv")
        .send()
        .await
        .unwrap();
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.as_ref(), exported.as_slice());
    let from_s3 = app.import("awkward-s3", "out/awkward.csv").await;
    assert_eq!(from_s3.tree_hash, original.tree_hash);

    // JSON Lines: one object per row with the stored data.
    let lines = json_lines(&ok(&app, &["export", "awkward", "--format", "jsonl"]));
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["logical_row_id"], "awkward:1");
    assert_eq!(lines[1]["data"]["note"], "crlf\r\ninside");
}

#[tokio::test]
async fn safe_formulas_defuse_fields_a_spreadsheet_would_run() {
    let app = spawn_app().await;
    app.put("awkward.csv", AWKWARD.as_bytes().to_vec()).await;
    app.import("awkward", "awkward.csv").await;

    let plain = ok(&app, &["export", "awkward"]);
    let safe = ok(&app, &["export", "awkward", "--safe-formulas"]);

    assert!(
        plain.contains("\n=SUM(A1:A2),+1,-2,@cmd,\ttab\n"),
        "{plain}"
    );
    assert!(
        safe.contains("\n'=SUM(A1:A2),'+1,'-2,'@cmd,'\ttab\n"),
        "{safe}"
    );
    // Other fields are untouched.
    assert!(safe.contains("plain,\"say \"\"hi\"\"\""), "{safe}");
}

/// A commit of `rows` rows of about a hundred bytes, written straight into the store.
async fn crafted_commit(app: &TestApp, dataset: &str, rows: i64) -> String {
    let dataset_id: i64 =
        sqlx::query_scalar("INSERT INTO dsa_core.datasets (name) VALUES ($1) RETURNING id")
            .bind(dataset)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let commit_id = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query(
        "INSERT INTO dsa_core.rows (row_hash, data)
         SELECT sha256(convert_to($2 || n::text, 'UTF8')),
                jsonb_build_object('id', n::text, 'pad', repeat('x', 90))
           FROM generate_series(1, $1::bigint) n",
    )
    .bind(rows)
    .bind(&commit_id)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dsa_core.commits (commit_id, dataset_id, message, committed_at, row_count,
                                       tree_hash, source)
         VALUES ($1, $2, 'crafted', now(), $3, $4, '{\"columns\": [\"id\", \"pad\"]}')",
    )
    .bind(&commit_id)
    .bind(dataset_id)
    .bind(rows)
    .bind("0".repeat(64))
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
         SELECT $1, 'big:' || n, sha256(convert_to($1 || n::text, 'UTF8'))
           FROM generate_series(1, $2::bigint) n",
    )
    .bind(&commit_id)
    .bind(rows)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO dsa_core.refs (dataset_id, name, commit_id) VALUES ($1, 'main', $2)")
        .bind(dataset_id)
        .bind(&commit_id)
        .execute(&app.pool)
        .await
        .unwrap();
    commit_id
}

#[tokio::test]
async fn an_export_to_s3_that_fails_midway_leaves_no_object_and_no_upload() {
    let app = spawn_app().await;
    // About 12 MB of CSV: the first 8 MiB part is uploaded before the export reaches
    // row 100000, whose content is missing.
    let commit_id = crafted_commit(&app, "big", 120_000).await;
    sqlx::query(
        "DELETE FROM dsa_core.rows WHERE row_hash = sha256(convert_to($1 || '100000', 'UTF8'))",
    )
    .bind(&commit_id)
    .execute(&app.pool)
    .await
    .unwrap();

    let target = format!("s3://{}/exports/big.csv", app.bucket);
    let output = app
        .cli()
        .env("RUST_LOG", "dsa_ingest=debug")
        .args(["export", "big", "--output", &target])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("row big:100000"), "{stderr}");
    assert!(
        stderr.contains("uploaded part"),
        "a part went up first: {stderr}"
    );
    let objects = app
        .s3
        .list_objects_v2()
        .bucket(&app.bucket)
        .prefix("exports/")
        .send()
        .await
        .unwrap();
    assert!(objects.contents().is_empty(), "no object is left");
    let uploads = app
        .s3
        .list_multipart_uploads()
        .bucket(&app.bucket)
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "no multipart upload is left open"
    );

    // The same export to a local file leaves no file either.
    let folder = std::env::temp_dir().join(format!("export-{}", uuid::Uuid::new_v4()));
    let path = folder.join("big.csv");
    let local = run(&app, &["export", "big", "--output", path.to_str().unwrap()]);
    assert_eq!(local.status.code(), Some(1));
    let left: Vec<_> = std::fs::read_dir(&folder).unwrap().collect();
    assert!(left.is_empty(), "no file is left: {left:?}");
    std::fs::remove_dir_all(&folder).unwrap();
}

#[tokio::test]
async fn a_multipart_export_to_s3_completes() {
    let app = spawn_app().await;
    crafted_commit(&app, "big", 120_000).await;
    let target = format!("s3://{}/exports/big.jsonl", app.bucket);

    let written: Value = serde_json::from_str(&ok(
        &app,
        &[
            "export", "big", "--format", "jsonl", "--output", &target, "--json",
        ],
    ))
    .unwrap();

    let head = app
        .s3
        .head_object()
        .bucket(&app.bucket)
        .key("exports/big.jsonl")
        .send()
        .await
        .unwrap();
    assert_eq!(
        Some(written["files"][0]["bytes"].as_i64().unwrap()),
        head.content_length()
    );
    assert!(head.content_length().unwrap() > 2 * 8 * 1024 * 1024);
    // Parts are stored as uploaded: the ETag of a multipart object ends in its count.
    assert!(head.e_tag().unwrap().contains('-'), "{:?}", head.e_tag());
}

#[tokio::test]
async fn verify_names_each_problem() {
    let app = spawn_app().await;
    app.put("checked.csv", sample_csv(20, 9)).await;
    let summary = app.import("checked", "checked.csv").await;
    let healthy = ok(&app, &["verify", "checked"]);
    assert!(
        healthy.contains(&format!("commit {}: ok (20 rows", summary.commit_id)),
        "{healthy}"
    );

    let hash_of = |id: &'static str| {
        let pool = app.pool.clone();
        let commit_id = summary.commit_id.clone();
        async move {
            sqlx::query_scalar::<_, Vec<u8>>(
                "SELECT row_hash FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = $2",
            )
            .bind(commit_id)
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let changed = hash_of("checked:3").await;
    sqlx::query("UPDATE dsa_core.rows SET data = data || '{\"extra\": \"1\"}' WHERE row_hash = $1")
        .bind(&changed)
        .execute(&app.pool)
        .await
        .unwrap();
    let missing = hash_of("checked:5").await;
    sqlx::query("DELETE FROM dsa_core.rows WHERE row_hash = $1")
        .bind(&missing)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(
        "DELETE FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = 'checked:7'",
    )
    .bind(&summary.commit_id)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE dsa_core.commits SET row_count = 99 WHERE commit_id = $1")
        .bind(&summary.commit_id)
        .execute(&app.pool)
        .await
        .unwrap();

    let text = fails(&app, &["verify", "checked"]);
    let c = &summary.commit_id;
    assert!(
        text.contains(&format!("commit {c}: row checked:3: data hashes to")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "commit {c}: row checked:5: row hash {} is missing from dsa_core.rows",
            hex::encode(&missing)
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "commit {c}: row checked:7: missing from commit_rows \
             (the ids jump from checked:6 to checked:8)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "commit {c}: row_count 99, but commit_rows holds 19 entries"
        )),
        "{text}"
    );
    assert!(
        text.contains("tree hash recomputed from commit_rows is"),
        "{text}"
    );

    let report: Value =
        serde_json::from_str(&fails(&app, &["verify", "checked", "--json"])).unwrap();
    assert_eq!(report["ok"], false);
    let rows_named: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|problem| problem["logical_row_id"].as_str())
        .collect();
    assert_eq!(rows_named, ["checked:3", "checked:5", "checked:7"]);
}

/// A failed run that died before it cleaned up: an unfinished commit whose entries
/// reference one row another commit also uses and one row nothing else uses.
async fn failed_leftovers(app: &TestApp, dataset_id: i64, shared_hash: &[u8]) -> Vec<u8> {
    let run_id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO dsa_jobs.analysis_runs (id, run_type, status, dataset_id, error_message)
         VALUES ($1, 'import', 'failed', $2, 'crashed')",
    )
    .bind(run_id)
    .bind(dataset_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let commit_id = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query(
        "INSERT INTO dsa_core.commits (commit_id, dataset_id, message, run_id)
         VALUES ($1, $2, 'unfinished', $3)",
    )
    .bind(&commit_id)
    .bind(dataset_id)
    .bind(run_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let orphan: Vec<u8> = sqlx::query_scalar(
        "INSERT INTO dsa_core.rows (row_hash, data)
         VALUES (sha256(convert_to($1, 'UTF8')), '{\"left\": \"over\"}') RETURNING row_hash",
    )
    .bind(&commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dsa_core.commit_rows (commit_id, logical_row_id, row_hash)
         VALUES ($1, 'x:1', $2), ($1, 'x:2', $3)",
    )
    .bind(&commit_id)
    .bind(shared_hash)
    .bind(&orphan)
    .execute(&app.pool)
    .await
    .unwrap();
    orphan
}

#[tokio::test]
async fn gc_removes_a_failed_runs_leftovers_and_is_idempotent() {
    let app = spawn_app().await;
    app.put("kept.csv", sample_csv(50, 2)).await;
    let kept = app.import("kept", "kept.csv").await;
    let shared: Vec<u8> = sqlx::query_scalar(
        "SELECT row_hash FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = 'kept:1'",
    )
    .bind(&kept.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let orphan = failed_leftovers(&app, kept.dataset_id, &shared).await;
    let rows_before = app.count("dsa_core.rows").await;

    let dry: Value = serde_json::from_str(&ok(&app, &["gc", "--dry-run", "--json"])).unwrap();
    assert_eq!(dry["commits"], 1);
    assert_eq!(dry["commit_rows"], 2);
    assert_eq!(dry["rows"], 1);
    assert_eq!(
        app.count("dsa_core.rows").await,
        rows_before,
        "a dry run removes nothing"
    );

    let removed: Value = serde_json::from_str(&ok(&app, &["gc", "--json"])).unwrap();
    assert_eq!(removed["commits"], 1);
    assert_eq!(removed["commit_rows"], 2);
    assert_eq!(removed["rows"], 1);
    assert!(removed["rows_bytes"].as_u64().unwrap() > 32);
    assert_eq!(app.count("dsa_core.rows").await, rows_before - 1);
    let orphan_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dsa_core.rows WHERE row_hash = $1")
            .bind(&orphan)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(orphan_left, 0);
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NULL")
            .await,
        0
    );

    let again: Value = serde_json::from_str(&ok(&app, &["gc", "--json"])).unwrap();
    assert_eq!(
        again,
        json!({"dry_run": false, "abandoned_runs": 0, "commits": 0, "commit_rows": 0,
               "commit_rows_bytes": 0, "rows": 0, "rows_bytes": 0})
    );
    ok(&app, &["verify", "kept"]);
    let text = ok(&app, &["gc"]);
    assert!(
        text.contains("removed 0 rows no commit references"),
        "{text}"
    );
}

#[tokio::test]
async fn gc_keeps_the_rows_of_an_import_in_flight() {
    let app = spawn_app().await;
    app.put("first.csv", sample_csv(400, 5)).await;
    let first = app.import("busy", "first.csv").await;
    let shared: Vec<u8> = sqlx::query_scalar(
        "SELECT row_hash FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = 'first:1'",
    )
    .bind(&first.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    failed_leftovers(&app, first.dataset_id, &shared).await;
    // The second file repeats the first's rows (found stored by the look-up) and adds
    // new ones, read slowly enough to be caught in the middle.
    let mut second = sample_csv(400, 5);
    let more = sample_csv(3_000, 6);
    let body = more.iter().position(|&byte| byte == b'\n').unwrap() + 1;
    second.extend_from_slice(&more[body..]);
    app.put("second.csv", second).await;
    let slow_s3 = dsa_ingest::s3::client(&S3Settings {
        endpoint: Some(slow_endpoint(60_000).await),
        region: service_settings()
            .get("S3_REGION")
            .cloned()
            .unwrap_or_else(|| "garage".into()),
        bucket: None,
    })
    .await;
    let importer =
        dsa_ingest::import::Importer::new(app.pool.clone(), Some(slow_s3), test_settings());
    let (run_id, _) = app.create_run(&importer, "busy", "second.csv", false).await;
    let import = tokio::spawn(async move { importer.run(run_id).await });
    wait_until(
        Duration::from_secs(60),
        "the import's first batches",
        || {
            let app = &app;
            async move { loaded_rows(app, run_id).await >= 500 }
        },
    )
    .await;

    let report = gc::collect(&app.pool, Duration::from_secs(30), false)
        .await
        .unwrap();

    assert_eq!(report.commits, 1, "the failed run's commit goes");
    assert_eq!(report.rows, 1, "only the failed run's own row goes");
    let dangling = dangling_entries(&app).await;
    assert_eq!(dangling, 0, "every row the running import stored is kept");
    assert!(!import.is_finished(), "gc ran beside the import");
    let summary = import.await.unwrap().expect("the import completes");
    assert_eq!(summary.rows, 3_400);

    let dataset = Dataset::find(&app.pool, "busy").await.unwrap();
    let commit = resolve(&app.pool, &dataset, "main").await.unwrap();
    assert_eq!(commit.commit_id, summary.commit_id);
    let report = verify_commit(&app.pool, &commit, |_| {}).await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.tree_hash, summary.tree_hash);
}

/// `commit_rows` entries whose row is not stored.
async fn dangling_entries(app: &TestApp) -> i64 {
    app.count(
        "dsa_core.commit_rows cr WHERE NOT EXISTS
           (SELECT 1 FROM dsa_core.rows r WHERE r.row_hash = cr.row_hash)",
    )
    .await
}

/// A keyed batch of `sheet` holding `rows` (key, line, content), checkpointed after
/// `loaded` rows.
fn keyed_batch(
    checkpoint: &Checkpoint,
    sheet: &str,
    rows: &[(&str, u64, &str)],
    loaded: u64,
) -> Batch {
    let mut writer = BatchWriter::new(&checkpoint.commit_id, sheet, rows.len());
    for (key, line, content) in rows {
        let canonical = content.as_bytes();
        writer.push_keyed(key, *line, &row_hash(canonical), canonical);
    }
    batch_of(writer, checkpoint, sheet, loaded)
}

/// The batch `writer` wrote, its checkpoint at `loaded` rows of `sheet`.
fn batch_of(writer: BatchWriter, checkpoint: &Checkpoint, sheet: &str, loaded: u64) -> Batch {
    let mut checkpoint = checkpoint.clone();
    checkpoint.sheet = sheet.to_owned();
    checkpoint.records = loaded;
    checkpoint.loaded_rows = loaded;
    Batch {
        rows: writer.finish(),
        rejected: Vec::new(),
        checkpoint,
        encode_duration: Duration::ZERO,
        lookup_duration: Duration::ZERO,
    }
}

/// The gc fence needs each statement after the advisory lock to see what committed
/// while it waited: a server whose default is REPEATABLE READ must not change that.
#[tokio::test]
async fn batch_and_gc_transactions_are_read_committed_whatever_the_servers_default() {
    let app = spawn_app().await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'"
    ))
    .execute(&app.pool)
    .await
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*app.pool.connect_options()).clone())
        .await
        .unwrap();
    let isolation = "SELECT current_setting('transaction_isolation')";

    let mut plain = pool.begin().await.unwrap();
    let default: String = sqlx::query_scalar(isolation)
        .fetch_one(&mut *plain)
        .await
        .unwrap();
    plain.rollback().await.unwrap();
    let mut ours = dsa_ingest::db::begin(&pool).await.unwrap();
    let pinned: String = sqlx::query_scalar(isolation)
        .fetch_one(&mut *ours)
        .await
        .unwrap();

    assert_eq!(default, "repeatable read");
    assert_eq!(pinned, "read committed");
}

/// A keyed import of a workbook into `sheets`, run by hand: its run claimed, its
/// commit begun; returns its loader (skipping bad rows) and first checkpoint.
async fn loader_of_a_running_import(app: &TestApp) -> (Loader, Checkpoint) {
    let importer = app.importer(test_settings());
    let (run_id, dataset_id) = app.create_run(&importer, "sheets", "book.xlsx", true).await;
    let claimed = dsa_ingest::runs::claim(&app.pool, run_id, "worker", Duration::from_secs(30))
        .await
        .unwrap();
    let loader = Loader::new(&app.pool, claimed.lease.clone()).skip_bad_rows(true);
    let start = Checkpoint::start("gc-fence-commit".into(), None, "People".into());
    loader
        .begin_commit(dataset_id, "two sheets", None, &start)
        .await
        .unwrap();
    (loader, start)
}

/// With `--skip-bad-rows`, a keyed batch stores a row and then leaves out its entry
/// (its key was taken): nothing references the row once the batch commits, and gc may
/// remove it. A batch just after it that has the same row (another sheet, same
/// content) takes it as stored by the batch ahead, without a look-up; it must notice
/// the gc instead of committing an entry whose row is gone.
#[tokio::test]
async fn a_row_left_without_its_entry_by_a_batch_ahead_is_not_relied_on_across_a_gc() {
    let app = spawn_app().await;
    let (loader, start) = loader_of_a_running_import(&app).await;
    let mut lookup = Lookup::new(&app.pool, 1).await.unwrap();
    let lost = r#"{"id":"a","v":"lost"}"#;
    let mut batches = [
        keyed_batch(&start, "People", &[("a", 2, r#"{"id":"a","v":"1"}"#)], 1),
        // Key a again: the row is stored, its entry rejected.
        keyed_batch(&start, "People", &[("a", 3, lost)], 2),
        // The same content, under a key of its own on another sheet.
        keyed_batch(&start, "Archive", &[("a", 2, lost)], 3),
    ];
    // All three are looked up before the second is stored, as the pipeline may.
    for batch in &mut batches {
        lookup.drop_known(&mut batch.rows).await.unwrap();
    }
    for batch in &mut batches[..2] {
        let staged = loader.stage(batch).await.unwrap();
        loader.commit(staged, batch, None).await.unwrap();
    }
    assert_eq!(
        app.count("dsa_jobs.rejected_rows WHERE error LIKE '%key a repeats%'")
            .await,
        1
    );
    let third = &mut batches[2];

    let report = gc::collect(&app.pool, Duration::from_secs(30), false)
        .await
        .unwrap();
    assert_eq!(report.rows, 1, "the row whose entry was left out goes");

    let staged = loader.stage(third).await.unwrap();
    let error = loader.commit(staged, third, None).await.unwrap_err();
    assert!(matches!(error, LoadError::RowsCollected { .. }), "{error}");
    let dangling = dangling_entries(&app).await;
    assert_eq!(dangling, 0, "no entry references a row gc removed");
    // Read again from the checkpoint, as the run does, the batch stores the row.
    let mut lookup = Lookup::new(&app.pool, 1).await.unwrap();
    let mut again = keyed_batch(&start, "Archive", &[("a", 2, lost)], 3);
    lookup.drop_known(&mut again.rows).await.unwrap();
    let outcome = load_batch(&loader, &mut again).await.unwrap();
    assert_eq!(outcome.new_rows, 1);
}

/// A gc that removes other rows between the look-up and the load moves the generation,
/// so a batch then checks the rows it relies on. Those a batch ahead stores become
/// visible only once that batch commits, which may be after this one is staged: the
/// check runs in the commit half, where they are, rather than failing the batch.
#[tokio::test]
async fn a_gc_elsewhere_does_not_fail_a_batch_relying_on_one_still_committing() {
    let app = spawn_app().await;
    let (loader, start) = loader_of_a_running_import(&app).await;
    let mut lookup = Lookup::new(&app.pool, 1).await.unwrap();
    let shared = r#"{"id":"b","v":"both sheets"}"#;
    let mut batches = [
        keyed_batch(&start, "People", &[("a", 2, r#"{"id":"a","v":"1"}"#)], 1),
        keyed_batch(&start, "People", &[("b", 3, shared)], 2),
        keyed_batch(&start, "Archive", &[("b", 2, shared)], 3),
    ];
    for batch in &mut batches {
        lookup.drop_known(&mut batch.rows).await.unwrap();
    }
    // A row nothing references, which gc removes, moving the generation.
    sqlx::query(
        "INSERT INTO dsa_core.rows (row_hash, data)
         VALUES (sha256('orphan'::bytea), '{\"left\": \"over\"}')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let report = gc::collect(&app.pool, Duration::from_secs(30), false)
        .await
        .unwrap();
    assert_eq!(report.rows, 1);

    let [first, second, third] = &mut batches;
    let staged = loader.stage(first).await.unwrap();
    loader.commit(staged, first, None).await.unwrap();
    // The third is staged beside the second, before the second commits.
    let staged_second = loader.stage(second).await.unwrap();
    let staged_third = loader.stage(third).await.unwrap();
    loader.commit(staged_second, second, None).await.unwrap();
    let outcome = loader.commit(staged_third, third, None).await.unwrap();

    assert_eq!(
        outcome.new_rows, 0,
        "the second batch stored the shared row"
    );
    assert_eq!(dangling_entries(&app).await, 0);
    let entries = app
        .count(&format!(
            "dsa_core.commit_rows WHERE commit_id = '{}'",
            start.commit_id
        ))
        .await;
    assert_eq!(entries, 3);
}

#[tokio::test]
async fn logical_row_order_is_the_same_in_sql_and_in_rust() {
    let app = spawn_app().await;
    let sheets: Vec<String> = vec!["Zeta".into(), "a:b".into(), "Alpha".into(), "ünï".into()];
    let ids = [
        "Alpha:10",
        "Alpha:9",
        "Alpha:1",
        "Zeta:100",
        "Zeta:20",
        "a:b:3",
        "a:b:12",
        "a:2",
        "a:10",
        "other",
        "x:k",
        "x:1",
        "Zeta:3",
        "Alpha:100000",
        "ünï:2",
        "ünï:10",
    ];
    let sql = format!(
        "SELECT id FROM unnest($1::text[]) AS t(id) ORDER BY {}",
        dsa_ingest::import::order::sql_order_by("(id COLLATE \"C\")", &sheets)
    );
    let from_sql: Vec<String> = sqlx::query_scalar(&sql)
        .bind(&ids[..])
        .fetch_all(&app.pool)
        .await
        .unwrap();

    let mut from_rust: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    from_rust.sort_by(|a, b| dsa_ingest::import::order::compare(&sheets, a, b));
    assert_eq!(from_sql, from_rust);
    assert_eq!(
        &from_rust[..6],
        ["Zeta:3", "Zeta:20", "Zeta:100", "a:b:3", "a:b:12", "Alpha:1"]
    );
}

/// What an export of one sheet reads: the sheet's ids, in the order the whole commit
/// gives them, for positional and keyed ids and sheet names that start with another's.
#[tokio::test]
async fn a_keyed_version_read_sheet_by_sheet_comes_in_the_commit_order() {
    use dsa_ingest::import::order::{sql_logical_reads, sql_order_by_keyed, KeyedOrder};
    let app = spawn_app().await;
    let column = "(id COLLATE \"C\")";
    // Listed sheets, one a prefix of another and one numeric, and ids of no listed
    // sheet on either side of and between their ranges.
    let ids = vec![
        "a:x:y", "a:b:2", "a:b:10", "a:c", "a:B", "n:10", "n:9", "n:-1.5", "n:2e1", "a:b:c:d",
        "0:1", "a", "a;", "ab:1", "b:2", "m:1", "nn:3", "zz:1", "n;x", "",
    ];
    let orders = [
        KeyedOrder {
            sheets: vec!["a".into(), "a:b".into(), "n".into()],
            numeric_sheets: vec!["n".into()],
        },
        KeyedOrder {
            sheets: vec!["n".into(), "a:b".into(), "a".into()],
            numeric_sheets: vec!["n".into()],
        },
        KeyedOrder::default(),
    ];
    for order in orders {
        let whole: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT id FROM unnest($1::text[]) AS t(id) ORDER BY {}",
            sql_order_by_keyed(column, &order)
        ))
        .bind(&ids)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let mut by_sheet = Vec::new();
        for (filter, order_by) in sql_logical_reads(column, &order.sheets, Some(&order)) {
            let read: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM unnest($1::text[]) AS t(id) WHERE {filter} ORDER BY {order_by}"
            ))
            .bind(&ids)
            .fetch_all(&app.pool)
            .await
            .unwrap();
            by_sheet.extend(read);
        }
        assert_eq!(by_sheet, whole, "sheets {:?}", order.sheets);
    }
}

#[tokio::test]
async fn one_sheet_reads_its_ids_in_the_commit_order() {
    use dsa_ingest::import::order::{
        sql_order_by, sql_order_by_keyed, sql_order_within_sheet, sql_sheet_filter, KeyedOrder,
    };
    let app = spawn_app().await;
    let read = |sql: String, ids: Vec<&'static str>| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&sql)
                .bind(ids)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    let column = "(id COLLATE \"C\")";
    let positional: Vec<String> = vec!["a:b".into(), "a".into(), "Zeta".into()];
    let ids = vec![
        "a:10", "a:9", "a:b:3", "a:b:12", "a:1", "Zeta:2", "a:100", "Zeta:10", "ab:1",
    ];
    let keyed = KeyedOrder {
        sheets: vec!["a".into(), "a:b".into(), "n".into()],
        numeric_sheets: vec!["n".into()],
    };
    let keyed_ids = vec![
        "a:x:y", "a:b:2", "a:b:10", "a:c", "a:B", "n:10", "n:9", "n:-1.5", "n:2e1", "a:b:c:d",
    ];
    let cases = [
        (
            positional.clone(),
            None,
            ids.clone(),
            "a",
            vec!["a:1", "a:9", "a:10", "a:100"],
        ),
        (
            positional.clone(),
            None,
            ids.clone(),
            "a:b",
            vec!["a:b:3", "a:b:12"],
        ),
        (
            positional.clone(),
            None,
            ids.clone(),
            "Zeta",
            vec!["Zeta:2", "Zeta:10"],
        ),
        (
            keyed.sheets.clone(),
            Some(keyed.clone()),
            keyed_ids.clone(),
            "a",
            vec!["a:B", "a:c", "a:x:y"],
        ),
        (
            keyed.sheets.clone(),
            Some(keyed.clone()),
            keyed_ids.clone(),
            "a:b",
            vec!["a:b:10", "a:b:2", "a:b:c:d"],
        ),
        (
            keyed.sheets.clone(),
            Some(keyed.clone()),
            keyed_ids.clone(),
            "n",
            vec!["n:-1.5", "n:9", "n:10", "n:2e1"],
        ),
    ];
    for (sheets, order, ids, sheet, expected) in cases {
        let whole = match &order {
            Some(order) => sql_order_by_keyed(column, order),
            None => sql_order_by(column, &sheets),
        };
        let all = read(
            format!("SELECT id FROM unnest($1::text[]) AS t(id) ORDER BY {whole}"),
            ids.clone(),
        )
        .await;
        let filter = sql_sheet_filter(column, sheet, &sheets, order.is_some());
        let within = sql_order_within_sheet(column, sheet, order.as_ref());
        let one = read(
            format!("SELECT id FROM unnest($1::text[]) AS t(id) WHERE {filter} ORDER BY {within}"),
            ids.clone(),
        )
        .await;
        assert_eq!(one, expected, "sheet {sheet}");
        let of_sheet: Vec<String> = all.into_iter().filter(|id| one.contains(id)).collect();
        assert_eq!(one, of_sheet, "sheet {sheet}: the whole commit's order");
    }
}

/// Keys may hold colons (times, URLs): the CSV export of a keyed commit keeps every
/// row, in key order, and imported again under the same key gives the same tree hash.
#[tokio::test]
async fn a_keyed_export_keeps_keys_with_colons() {
    let app = spawn_app().await;
    let csv = "at,what\n12:30,lunch\n09:00,start\nhttp://x/y,link\n17:45,home\n";
    app.put("in/times.csv", csv.as_bytes().to_vec()).await;
    let import = |dataset: &str, key: &str| {
        let source = format!("s3://{}/{key}", app.bucket);
        let output = ok(
            &app,
            &[
                "import",
                "--dataset",
                dataset,
                "--key",
                "at",
                &source,
                "--json",
            ],
        );
        serde_json::from_str::<Value>(&output).unwrap()
    };
    let first = import("times", "in/times.csv");
    let exported = ok(&app, &["export", "times"]);
    assert_eq!(
        exported,
        "at,what\n09:00,start\n12:30,lunch\n17:45,home\nhttp://x/y,link\n"
    );
    app.put("again/times.csv", exported.into_bytes()).await;
    let again = import("times-again", "again/times.csv");
    assert_eq!(again["tree_hash"], first["tree_hash"]);
    assert_eq!(again["rows"], 4);
}

/// A positional batch of `sheet`: `(n, hash, content)` per row. Content is stored only
/// for rows the look-up does not find, so a known row's may be anything.
fn positional_batch(
    checkpoint: &Checkpoint,
    sheet: &str,
    rows: &[(u64, [u8; 32], String)],
    loaded: u64,
) -> Batch {
    let mut writer = BatchWriter::new(&checkpoint.commit_id, sheet, rows.len());
    for (n, hash, content) in rows {
        writer.push(*n, hash, content.as_bytes());
    }
    batch_of(writer, checkpoint, sheet, loaded)
}

/// Stages `batch` and commits it.
async fn load_batch(loader: &Loader, batch: &mut Batch) -> Result<BatchOutcome, LoadError> {
    let staged = loader.stage(batch).await?;
    loader.commit(staged, batch, None).await
}

/// Stages `batch` while another transaction holds what it writes: the bounded wait
/// must give up within 20 s; returns the error it gave up with.
async fn stage_held(loader: &Loader, batch: &mut Batch) -> LoadError {
    match tokio::time::timeout(Duration::from_secs(20), loader.stage(batch)).await {
        Ok(Err(error)) => error,
        Ok(Ok(_)) => panic!("the batch was staged though another transaction holds what it writes"),
        Err(_) => panic!("the wait for what another batch holds was not cut off"),
    }
}

/// The look-up takes a row as stored when one of the batches still loading before it
/// has it: with N storing at once, N + 2 of them (those storing, the one committing and
/// the one waiting for the loader). A row of an older batch is looked up as usual.
#[tokio::test]
async fn the_lookup_counts_as_many_batches_ahead_as_the_loader_may_still_be_loading() {
    let app = spawn_app().await;
    let (_, start) = loader_of_a_running_import(&app).await;
    let row = |n: u64| {
        let content = format!(r#"{{"ahead":"{n}"}}"#);
        (n, row_hash(content.as_bytes()), content)
    };
    for (staging, window) in [(1, 3), (2, 4), (4, 6)] {
        let mut lookup = Lookup::new(&app.pool, staging).await.unwrap();
        let base = 100 * staging as u64;
        // Batches 1 to 7 pass the look-up, one new row each; none is stored.
        for n in 1..=7 {
            let mut batch = positional_batch(&start, "People", &[row(base + n)], n);
            lookup.drop_known(&mut batch.rows).await.unwrap();
        }
        // A batch with all seven rows relies on those of the last `window` batches.
        let rows: Vec<_> = (1..=7).map(|n| row(base + n)).collect();
        let mut batch = positional_batch(&start, "People", &rows, 8);
        lookup.drop_known(&mut batch.rows).await.unwrap();
        assert_eq!(batch.rows.relied_on_rows(), window, "{staging} storing");
    }
}

/// With several batches storing at once, a batch's wait for a row another transaction
/// is storing is cut off, so two imports can never wait on each other for ever; the
/// batch steps back with a transient error, and read again after the other commits it
/// stores nothing twice.
#[tokio::test]
async fn a_bounded_wait_for_a_row_another_batch_holds_steps_back_and_the_retry_succeeds() {
    let app = spawn_app().await;
    let (loader, start) = loader_of_a_running_import(&app).await;
    let loader = loader.bound_row_waits(Some(Duration::from_millis(300)));
    let content = r#"{"id":"held"}"#.to_owned();
    let row = |n: u64| (n, row_hash(content.as_bytes()), content.clone());

    // The first batch stores the row and keeps it, uncommitted.
    let mut holding = positional_batch(&start, "People", &[row(1)], 1);
    let staged = loader.stage(&mut holding).await.unwrap();
    // The second stores the same row: it waits for the first, and gives up.
    let mut waiting = positional_batch(&start, "People", &[row(2)], 2);
    let error = stage_held(&loader, &mut waiting).await;
    assert!(matches!(error, LoadError::RowsHeld { .. }), "{error}");
    assert!(
        error.to_string().contains("IMPORT_STAGING_BATCHES=1"),
        "{error}"
    );
    assert!(matches!(
        dsa_ingest::import::ImportError::from(error).outcome(),
        dsa_ingest::import::Outcome::Transient
    ));

    let first = loader.commit(staged, &holding, None).await.unwrap();
    assert_eq!(first.new_rows, 1);
    let mut again = positional_batch(&start, "People", &[row(2)], 2);
    let second = load_batch(&loader, &mut again).await.unwrap();
    assert_eq!(second.new_rows, 0);
}

/// Under the same bound, a wait for a lock on a whole table (another session's schema
/// change or LOCK TABLE) is cut off too, and named as that, not as another import's rows.
#[tokio::test]
async fn a_bounded_wait_for_a_table_another_session_locked_is_named_as_such() {
    let app = spawn_app().await;
    let (loader, start) = loader_of_a_running_import(&app).await;
    let loader = loader.bound_row_waits(Some(Duration::from_millis(300)));
    let content = r#"{"id":"locked out"}"#.to_owned();
    let row = (1, row_hash(content.as_bytes()), content.clone());

    let mut locker = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE dsa_core.rows IN SHARE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let mut batch = positional_batch(&start, "People", std::slice::from_ref(&row), 1);
    let error = stage_held(&loader, &mut batch).await;
    assert!(matches!(error, LoadError::TableLocked { .. }), "{error}");
    assert!(error.to_string().contains("lock on a table"), "{error}");
    assert!(matches!(
        dsa_ingest::import::ImportError::from(error).outcome(),
        dsa_ingest::import::Outcome::Transient
    ));

    locker.rollback().await.unwrap();
    let mut again = positional_batch(&start, "People", &[row], 1);
    let outcome = load_batch(&loader, &mut again).await.unwrap();
    assert_eq!(outcome.new_rows, 1);
}

/// A positional batch writes its `commit_rows` entries as it is staged, beside the
/// rows, under the same bound: a batch whose id another uncommitted batch has written
/// (a worker that lost its lease and the one that took the run over) steps back with
/// the transient error instead of waiting for ever.
#[tokio::test]
async fn a_positional_batch_writes_its_entries_as_it_is_staged_under_the_same_bound() {
    let app = spawn_app().await;
    let (loader, start) = loader_of_a_running_import(&app).await;
    let loader = loader.bound_row_waits(Some(Duration::from_millis(300)));
    let row = |n: u64, what: &str| {
        let content = format!(r#"{{"entry":"{what}"}}"#);
        (n, row_hash(content.as_bytes()), content)
    };

    // Different rows under the same id: only the entries meet.
    let mut holding = positional_batch(&start, "People", &[row(1, "first")], 1);
    let staged = loader.stage(&mut holding).await.unwrap();
    let mut waiting = positional_batch(&start, "People", &[row(1, "second")], 1);
    let error = stage_held(&loader, &mut waiting).await;
    assert!(matches!(error, LoadError::RowsHeld { .. }), "{error}");
    let outcome = loader.commit(staged, &holding, None).await.unwrap();
    assert_eq!(outcome.new_rows, 1);
    let entries = app.entries(&start.commit_id).await;
    assert_eq!(
        entries,
        vec![("People:1".to_owned(), row(1, "first").1.to_vec())]
    );
}

/// Batches commit without waiting for their flush, so a database crash can lose the
/// last one while the import goes on over new connections. A batch's checkpoint only
/// replaces the one of the batch before it: the batch after a lost one fails with a
/// transient error (the run resumes from what the database kept) instead of
/// committing over the lost rows.
#[tokio::test]
async fn a_batch_whose_previous_batch_was_lost_does_not_commit_over_it() {
    let app = spawn_app().await;
    let (loader, start) = loader_of_a_running_import(&app).await;
    let row = |n: u64| {
        let content = format!(r#"{{"kept":"{n}"}}"#);
        (n, row_hash(content.as_bytes()), content)
    };
    let numbered = |batches: u64, n: u64| {
        let mut batch = positional_batch(&start, "People", &[row(n)], n);
        batch.checkpoint.batches = batches;
        batch
    };

    load_batch(&loader, &mut numbered(1, 1)).await.unwrap();
    // Batch 2 never reached the database; batch 3 comes next.
    let error = load_batch(&loader, &mut numbered(3, 3)).await.unwrap_err();
    match &error {
        LoadError::CheckpointLost {
            expected, found, ..
        } => assert_eq!((*expected, *found), (2, 1)),
        other => panic!("expected CheckpointLost, got {other}"),
    }
    assert!(matches!(
        dsa_ingest::import::ImportError::from(error).outcome(),
        dsa_ingest::import::Outcome::Transient
    ));
    let (checkpoint, entries): (Value, i64) = sqlx::query_as(
        "SELECT checkpoint, (SELECT count(*) FROM dsa_core.commit_rows WHERE commit_id = $1)
           FROM dsa_jobs.analysis_runs WHERE checkpoint->>'commit_id' = $1",
    )
    .bind(&start.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(checkpoint["batches"], 1);
    assert_eq!(entries, 1);

    // Read again from there, batch 2 commits, and batch 3 after it.
    for (batches, n) in [(2, 2), (3, 3)] {
        load_batch(&loader, &mut numbered(batches, n))
            .await
            .unwrap();
    }
}

/// A file imported again finds its rows through the parent's entries, one range of ids
/// per batch; a row changed under the same id, and a batch whose ids are spread over the
/// parent's, are looked up by hash instead, so only stored rows are dropped.
#[tokio::test]
async fn a_reimport_finds_its_rows_in_the_parents_entries_and_looks_up_the_rest() {
    let app = spawn_app().await;
    app.put("data.csv", sample_csv(2_000, 1)).await;
    let parent = app.import("again", "data.csv").await;
    let entries = app.entries(&parent.commit_id).await;
    let mut hashes = vec![[0u8; 32]; 2_001];
    for (id, hash) in entries {
        let n: usize = id.strip_prefix("data:").unwrap().parse().unwrap();
        hashes[n] = hash.try_into().unwrap();
    }
    let known = |n: u64| (n, hashes[n as usize], "{}".to_owned());
    let changed = |n: u64| {
        let content = format!(r#"{{"changed":"{n}"}}"#);
        (n, row_hash(content.as_bytes()), content)
    };
    let (loader, start) = loader_of_a_running_import(&app).await;
    let mut lookup = Lookup::new(&app.pool, 1)
        .await
        .unwrap()
        .following(Some(parent.commit_id.clone()));

    // Rows 1001 to 2000, ten of them changed: one range holds the other 990.
    let rows: Vec<_> = (1_001..=2_000)
        .map(|n| {
            if (1_501..=1_510).contains(&n) {
                changed(n)
            } else {
                known(n)
            }
        })
        .collect();
    let mut again = positional_batch(&start, "data", &rows, 1_000);
    lookup.drop_known(&mut again.rows).await.unwrap();
    assert_eq!(lookup.rows_found_in_parent(), 990);
    assert_eq!(again.rows.relied_on_rows(), 990);
    // Ids spread over the parent's other rows: the range they span is cut off long
    // before it covers them, and the stored rows are found by hash.
    let rows: Vec<_> = (1..=100).map(|n| known(n * 10 - 1)).collect();
    let mut spread = positional_batch(&start, "data", &rows, 1_100);
    lookup.drop_known(&mut spread.rows).await.unwrap();
    assert!(lookup.rows_found_in_parent() < 990 + 50);
    assert_eq!(spread.rows.relied_on_rows(), 100);

    for batch in [&mut again, &mut spread] {
        let staged = loader.stage(batch).await.unwrap();
        let outcome = loader.commit(staged, batch, None).await.unwrap();
        assert_eq!(
            outcome.new_rows,
            if batch.rows.len() == 1_000 { 10 } else { 0 }
        );
    }
    assert_eq!(dangling_entries(&app).await, 0);
}
