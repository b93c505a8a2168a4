//! Row identity by key and the import modes (replace, append, upsert, delete): every
//! version is checked against rows the test computes itself.

use std::collections::BTreeMap;

use dsa_ingest::config::S3Settings;
use dsa_ingest::db::DatasetName;
use dsa_ingest::import::run::{ImportMode, ImportOptions, ImportParameters, OnConflict};
use dsa_ingest::import::{ImportError, ImportSummary, Importer};
use rust_xlsxwriter::Workbook;
use serde_json::{json, Value};

use crate::helpers::{service_settings, spawn_app, test_settings, TestApp};
use crate::process::slow_endpoint;

/// Imports `key` of the test's bucket into `dataset` with `options`.
async fn import_as(
    app: &TestApp,
    importer: &Importer,
    dataset: &str,
    key: &str,
    options: ImportOptions,
) -> Result<ImportSummary, ImportError> {
    let parameters = ImportParameters {
        source: app.location(key),
        expected_etag: None,
        options,
    };
    let (run_id, _) = importer
        .create_run(&DatasetName::parse(dataset).unwrap(), None, &parameters)
        .await
        .expect("create run");
    importer.run(run_id).await
}

/// The message of a keyed `replace` of `key` into `dataset` that must fail.
async fn keyed_failure(app: &TestApp, importer: &Importer, dataset: &str, key: &str) -> String {
    import_as(
        app,
        importer,
        dataset,
        key,
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .expect_err("the import must fail")
    .to_string()
}

fn keyed(columns: &[&str], mode: ImportMode) -> ImportOptions {
    ImportOptions {
        key: Some(columns.iter().map(|column| column.to_string()).collect()),
        mode,
        ..ImportOptions::default()
    }
}

fn mode(mode: ImportMode) -> ImportOptions {
    ImportOptions {
        mode,
        ..ImportOptions::default()
    }
}

/// The rows `main` of `dataset` points at, by logical row id.
async fn main_rows(app: &TestApp, dataset: &str) -> BTreeMap<String, Value> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT cr.logical_row_id, r.data
           FROM dsa_core.datasets d
           JOIN dsa_core.refs f ON f.dataset_id = d.id AND f.name = 'main'
           JOIN dsa_core.commit_rows cr ON cr.commit_id = f.commit_id
           JOIN dsa_core.rows r USING (row_hash)
          WHERE d.name = $1",
    )
    .bind(dataset)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// CSV text from a header and rows.
fn csv(lines: &[&str]) -> Vec<u8> {
    let mut text = lines.join("\n");
    text.push('\n');
    text.into_bytes()
}

/// A row of the `id,name,qty` files, as the dataset stores it.
fn row(id: &str, name: &str, qty: &str) -> Value {
    json!({"id": id, "name": name, "qty": qty})
}

/// `count` rows `id,name,qty` with ids `first..first+count`, in the given id order.
fn numbered(ids: &[u64]) -> Vec<u8> {
    let mut text = String::from("id,name,qty\n");
    for id in ids {
        text.push_str(&format!("{id},item-{id},{}\n", id * 3 % 17));
    }
    text.into_bytes()
}

#[tokio::test]
async fn a_keyed_replace_of_a_shuffled_daily_file_changes_nothing() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let ids: Vec<u64> = (1..=450).collect();
    let mut shuffled = ids.clone();
    // A fixed permutation that moves every row: 7 is coprime with 450.
    shuffled.sort_by_key(|id| (id * 7) % 450);
    app.put("orders-2026-11-28.csv", numbered(&ids)).await;
    app.put("orders-2026-11-29.csv", numbered(&shuffled)).await;

    let first = import_as(
        &app,
        &importer,
        "orders",
        "orders-2026-11-28.csv",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    // The dataset remembers its key and its one sheet: the next day's file, named
    // otherwise and in another order, is the same version.
    let second = import_as(
        &app,
        &importer,
        "orders",
        "orders-2026-11-29.csv",
        ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(first.rows, 450);
    assert_eq!(second.rows, 450);
    assert_eq!(second.tree_hash, first.tree_hash);
    assert_eq!(second.new_rows, 0);
    let rows = main_rows(&app, "orders").await;
    assert_eq!(rows.len(), 450);
    assert_eq!(
        rows["orders-2026-11-28:17"],
        row("17", "item-17", &(17 * 3 % 17).to_string())
    );
    assert_eq!(
        second.source.row_key.as_deref(),
        Some(&["id".to_owned()][..])
    );
    assert_eq!(second.source.numeric_key_sheets, ["orders-2026-11-28"]);
    // Logical order sorts numeric keys as numbers: the tree hash equals one computed
    // by the test over ids 1..=450 in numeric order.
    let mut tree = dsa_ingest::import::hash::TreeHasher::new();
    let hashes: BTreeMap<String, Vec<u8>> =
        app.entries(&second.commit_id).await.into_iter().collect();
    for id in &ids {
        let logical = format!("orders-2026-11-28:{id}");
        let hash: [u8; 32] = hashes[&logical].as_slice().try_into().unwrap();
        tree.push(&logical, &hash);
    }
    assert_eq!(tree.to_hex(), second.tree_hash);
}

#[tokio::test]
async fn append_upsert_and_delete_give_exactly_the_expected_rows() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put(
        "base.csv",
        csv(&["id,name,qty", "1,apple,3", "2,pear,5", "10,plum,1"]),
    )
    .await;
    app.put("upsert.csv", csv(&["id,name,qty", "2,pear,6", "11,kiwi,9"]))
        .await;
    app.put("append.csv", csv(&["id,name,qty", "12,fig,1", "2,other,0"]))
        .await;
    app.put("delete.csv", csv(&["id,name", "1,ignored", "99,absent"]))
        .await;

    import_as(
        &app,
        &importer,
        "fruit",
        "base.csv",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    let mut expected: BTreeMap<String, Value> = [
        ("base:1", row("1", "apple", "3")),
        ("base:2", row("2", "pear", "5")),
        ("base:10", row("10", "plum", "1")),
    ]
    .into_iter()
    .map(|(id, data)| (id.to_owned(), data))
    .collect();
    assert_eq!(main_rows(&app, "fruit").await, expected);

    let upserted = import_as(
        &app,
        &importer,
        "fruit",
        "upsert.csv",
        mode(ImportMode::Upsert),
    )
    .await
    .unwrap();
    expected.insert("base:2".into(), row("2", "pear", "6"));
    expected.insert("base:11".into(), row("11", "kiwi", "9"));
    assert_eq!(main_rows(&app, "fruit").await, expected);
    assert_eq!(upserted.rows, 4);

    // Append with the default on_conflict fails on a key the dataset has, naming the line.
    let error = import_as(
        &app,
        &importer,
        "fruit",
        "append.csv",
        mode(ImportMode::Append),
    )
    .await
    .expect_err("key 2 exists");
    let message = error.to_string();
    assert!(
        message.contains("line 3") && message.contains("key 2 exists"),
        "{message}"
    );
    assert_eq!(main_rows(&app, "fruit").await, expected);

    let ignore = ImportOptions {
        on_conflict: OnConflict::Ignore,
        ..mode(ImportMode::Append)
    };
    import_as(&app, &importer, "fruit", "append.csv", ignore)
        .await
        .unwrap();
    expected.insert("base:12".into(), row("12", "fig", "1"));
    assert_eq!(main_rows(&app, "fruit").await, expected);

    let update = ImportOptions {
        on_conflict: OnConflict::Update,
        ..mode(ImportMode::Append)
    };
    import_as(&app, &importer, "fruit", "append.csv", update)
        .await
        .unwrap();
    expected.insert("base:2".into(), row("2", "other", "0"));
    assert_eq!(main_rows(&app, "fruit").await, expected);

    let deleted = import_as(
        &app,
        &importer,
        "fruit",
        "delete.csv",
        mode(ImportMode::Delete),
    )
    .await
    .unwrap();
    expected.remove("base:1");
    assert_eq!(main_rows(&app, "fruit").await, expected);
    assert_eq!((deleted.deleted_rows, deleted.keys_not_found), (1, 1));
    assert_eq!(deleted.rows, expected.len() as u64);
    // Every version is history: six commits, each a full snapshot.
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NOT NULL")
            .await,
        5
    );
    assert_eq!(
        app.count("dsa_core.commits WHERE committed_at IS NULL")
            .await,
        0
    );
}

/// A `delete` into a dataset without a version deletes nothing: an empty version, every
/// key counted as not found, and no deletion entry left in it.
#[tokio::test]
async fn a_delete_as_a_datasets_first_import_makes_an_empty_version() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put("gone.csv", csv(&["id,name", "1,a", "2,b"])).await;
    let deleted = import_as(
        &app,
        &importer,
        "nothing-yet",
        "gone.csv",
        keyed(&["id"], ImportMode::Delete),
    )
    .await
    .unwrap();
    assert_eq!(
        (deleted.rows, deleted.deleted_rows, deleted.keys_not_found),
        (0, 0, 2)
    );
    assert_eq!(main_rows(&app, "nothing-yet").await, BTreeMap::new());
    assert_eq!(app.count("dsa_core.commit_rows").await, 0);
    // Exits 0 only when every entry's row is stored and the tree hash is the version's.
    app.cli_text(&["verify", "nothing-yet"]);
}

#[tokio::test]
async fn positional_append_continues_the_numbering() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put("log.csv", csv(&["at,event", "1,start", "2,stop"]))
        .await;
    app.put("log-more.csv", csv(&["at,event", "3,start"])).await;
    import_as(&app, &importer, "log", "log.csv", ImportOptions::default())
        .await
        .unwrap();
    let appended = import_as(
        &app,
        &importer,
        "log",
        "log-more.csv",
        mode(ImportMode::Append),
    )
    .await
    .unwrap();
    let ids: Vec<String> = main_rows(&app, "log").await.into_keys().collect();
    assert_eq!(ids, ["log:1", "log:2", "log:3"]);
    assert_eq!(appended.rows, 3);
    // Upsert and delete need a key.
    let error = import_as(
        &app,
        &importer,
        "log",
        "log-more.csv",
        mode(ImportMode::Upsert),
    )
    .await
    .expect_err("no key");
    assert!(error.to_string().contains("needs a key"), "{error}");
}

#[tokio::test]
async fn repeated_empty_and_missing_keys_are_refused_naming_lines() {
    let app = spawn_app().await;
    let mut settings = test_settings();
    // Batches of two rows: the repeat of line 2 at line 5 lies in another batch.
    settings.batch_size = 2;
    let importer = app.importer(settings);
    app.put("dup.csv", csv(&["id,v", "a,1", "b,2", "c,3", "a,4", "d,5"]))
        .await;
    app.put("near.csv", csv(&["id,v", "a,1", "a,2"])).await;
    app.put("empty.csv", csv(&["id,v", "a,1", ",2"])).await;
    app.put("nokey.csv", csv(&["name,v", "a,1"])).await;

    let error = keyed_failure(&app, &importer, "d1", "near.csv").await;
    assert!(
        error.contains("line 3") && error.contains("repeats the key of line 2"),
        "{error}"
    );
    let error = keyed_failure(&app, &importer, "d2", "dup.csv").await;
    assert!(error.contains("line 5"), "{error}");
    let error = keyed_failure(&app, &importer, "d3", "empty.csv").await;
    assert!(
        error.contains("line 3") && error.contains("key column \"id\" is empty"),
        "{error}"
    );
    let error = keyed_failure(&app, &importer, "d4", "nokey.csv").await;
    assert!(
        error.contains("key column \"id\" is not in the header"),
        "{error}"
    );
    // Nothing of a failed run stays behind.
    assert_eq!(app.count("dsa_core.commit_rows").await, 0);

    // With --skip-bad-rows the later row of a repeat is rejected, wherever it is.
    let skip = ImportOptions {
        skip_bad_rows: true,
        ..keyed(&["id"], ImportMode::Replace)
    };
    let summary = import_as(&app, &importer, "d5", "dup.csv", skip)
        .await
        .unwrap();
    assert_eq!((summary.rows, summary.rejected_rows), (4, 1));
    let rows = main_rows(&app, "d5").await;
    assert_eq!(rows["dup:a"], json!({"id": "a", "v": "1"}));
    let rejected: (i64, String) = sqlx::query_as("SELECT line, error FROM dsa_jobs.rejected_rows")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rejected.0, 5);
    assert!(rejected.1.contains("key a repeats"), "{}", rejected.1);
}

#[tokio::test]
async fn a_batch_that_fails_to_commit_takes_the_batch_stored_beside_it_down() {
    let app = spawn_app().await;
    let mut settings = test_settings();
    settings.batch_size = 2;
    let importer = app.importer(settings);
    // The second batch repeats the key of line 2 and fails as it commits, while the
    // third stores its rows beside it, in a transaction of its own.
    app.put(
        "dup.csv",
        csv(&["id,v", "a,1", "b,2", "c,3", "a,4", "d,5", "e,6"]),
    )
    .await;

    let error = keyed_failure(&app, &importer, "d", "dup.csv").await;

    assert!(error.contains("line 5"), "{error}");
    // Only the first batch committed; the third never does once the second failed.
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT data->>'id' FROM dsa_core.rows ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, ["a", "b"]);
    let loaded: i64 = sqlx::query_scalar(
        "SELECT (checkpoint->>'loaded_rows')::bigint FROM dsa_jobs.analysis_runs",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(loaded, 2);
}

#[tokio::test]
async fn a_composite_key_is_the_canonical_array_of_its_values() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put(
        "stock.csv",
        csv(&[
            "store,sku,qty",
            "s1,A:1,3",
            "s1,\"B \"\"x\"\"\",4",
            "s2,A:1,5",
        ]),
    )
    .await;
    import_as(
        &app,
        &importer,
        "stock",
        "stock.csv",
        keyed(&["store", "sku"], ImportMode::Replace),
    )
    .await
    .unwrap();
    let ids: Vec<String> = main_rows(&app, "stock").await.into_keys().collect();
    assert_eq!(
        ids,
        [
            r#"stock:["s1","A:1"]"#,
            r#"stock:["s1","B \"x\""]"#,
            r#"stock:["s2","A:1"]"#
        ]
    );
}

#[tokio::test]
async fn a_spreadsheet_is_keyed_by_a_number_column() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let book = |order: &[u32]| {
        let mut workbook = Workbook::new();
        let sheet = workbook.add_worksheet().set_name("Items").unwrap();
        sheet.write(0, 0, "id").unwrap();
        sheet.write(0, 1, "name").unwrap();
        for (row, id) in order.iter().enumerate() {
            sheet.write(row as u32 + 1, 0, *id as f64).unwrap();
            sheet
                .write(row as u32 + 1, 1, format!("item {id}"))
                .unwrap();
        }
        workbook.save_to_buffer().unwrap()
    };
    app.put("items.xlsx", book(&[7, 10, 8])).await;
    app.put("items-again.xlsx", book(&[10, 8, 7])).await;
    let first = import_as(
        &app,
        &importer,
        "items",
        "items.xlsx",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    let ids: Vec<String> = main_rows(&app, "items").await.into_keys().collect();
    assert_eq!(ids, ["Items:10", "Items:7", "Items:8"]);
    let second = import_as(
        &app,
        &importer,
        "items",
        "items-again.xlsx",
        ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(second.tree_hash, first.tree_hash);
    assert_eq!(second.source.numeric_key_sheets, ["Items"]);
}

/// The tree hash of `commit_id`'s rows chained in the order of `ids`, computed here.
async fn tree_in_order(app: &TestApp, commit_id: &str, ids: &[&str]) -> String {
    let hashes: BTreeMap<String, Vec<u8>> = app.entries(commit_id).await.into_iter().collect();
    assert_eq!(hashes.len(), ids.len(), "{hashes:?}");
    let mut tree = dsa_ingest::import::hash::TreeHasher::new();
    for id in ids {
        let hash: [u8; 32] = hashes[*id].as_slice().try_into().unwrap();
        tree.push(id, &hash);
    }
    tree.to_hex()
}

#[tokio::test]
async fn keys_sort_as_numbers_exactly_while_every_key_of_the_version_is_one() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put("s.csv", csv(&["id,v", "1,a", "2,b", "10,c"])).await;
    app.put("word.csv", csv(&["id,v", "x,d"])).await;
    app.put("gone.csv", csv(&["id", "x"])).await;
    app.put("more.csv", csv(&["id,v", "3,e", "-4,f"])).await;
    // In numeric order in the file: the streamed tree hash is the commit's.
    let first = import_as(
        &app,
        &importer,
        "s",
        "s.csv",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    assert_eq!(first.source.numeric_key_sheets, ["s"]);
    assert_eq!(
        first.tree_hash,
        tree_in_order(&app, &first.commit_id, &["s:1", "s:2", "s:10"]).await
    );
    // A word among the keys: the sheet sorts bytewise.
    let worded = import_as(&app, &importer, "s", "word.csv", mode(ImportMode::Upsert))
        .await
        .unwrap();
    assert!(worded.source.numeric_key_sheets.is_empty());
    assert_eq!(
        worded.tree_hash,
        tree_in_order(&app, &worded.commit_id, &["s:1", "s:10", "s:2", "s:x"]).await
    );
    // The word deleted: numbers again (the version is scanned to know it).
    let deleted = import_as(&app, &importer, "s", "gone.csv", mode(ImportMode::Delete))
        .await
        .unwrap();
    assert_eq!(deleted.source.numeric_key_sheets, ["s"]);
    assert_eq!(deleted.tree_hash, first.tree_hash);
    // Numbers out of order, one negative: sorted by the server, as numbers.
    let appended = import_as(&app, &importer, "s", "more.csv", mode(ImportMode::Append))
        .await
        .unwrap();
    assert_eq!(appended.source.numeric_key_sheets, ["s"]);
    assert_eq!(
        appended.tree_hash,
        tree_in_order(
            &app,
            &appended.commit_id,
            &["s:-4", "s:1", "s:2", "s:3", "s:10"]
        )
        .await
    );
}

#[tokio::test]
async fn a_spreadsheet_appends_upserts_and_deletes_by_key() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let book = |rows: &[(u32, &str)]| {
        let mut workbook = Workbook::new();
        let sheet = workbook.add_worksheet().set_name("Items").unwrap();
        sheet.write(0, 0, "id").unwrap();
        sheet.write(0, 1, "name").unwrap();
        for (row, (id, name)) in rows.iter().enumerate() {
            sheet.write(row as u32 + 1, 0, *id as f64).unwrap();
            sheet.write(row as u32 + 1, 1, *name).unwrap();
        }
        workbook.save_to_buffer().unwrap()
    };
    app.put("base.xlsx", book(&[(1, "one"), (2, "two"), (3, "three")]))
        .await;
    app.put("append.xlsx", book(&[(4, "four")])).await;
    app.put("upsert.xlsx", book(&[(5, "five"), (2, "TWO")]))
        .await;
    app.put("delete.xlsx", book(&[(1, "whatever"), (9, "absent")]))
        .await;
    let item = |id: u32, name: &str| json!({"id": id, "name": name});
    import_as(
        &app,
        &importer,
        "items",
        "base.xlsx",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    let mut expected: BTreeMap<String, Value> = [(1, "one"), (2, "two"), (3, "three")]
        .into_iter()
        .map(|(id, name)| (format!("Items:{id}"), item(id, name)))
        .collect();
    assert_eq!(main_rows(&app, "items").await, expected);

    import_as(
        &app,
        &importer,
        "items",
        "append.xlsx",
        mode(ImportMode::Append),
    )
    .await
    .unwrap();
    expected.insert("Items:4".into(), item(4, "four"));
    assert_eq!(main_rows(&app, "items").await, expected);

    let upserted = import_as(
        &app,
        &importer,
        "items",
        "upsert.xlsx",
        mode(ImportMode::Upsert),
    )
    .await
    .unwrap();
    expected.insert("Items:5".into(), item(5, "five"));
    expected.insert("Items:2".into(), item(2, "TWO"));
    assert_eq!(main_rows(&app, "items").await, expected);
    assert_eq!(upserted.rows, 5);

    // Appending a key the dataset has fails, naming the sheet's row.
    let error = import_as(
        &app,
        &importer,
        "items",
        "upsert.xlsx",
        mode(ImportMode::Append),
    )
    .await
    .expect_err("key 5 exists")
    .to_string();
    assert!(error.contains("Items") && error.contains("5"), "{error}");
    assert_eq!(main_rows(&app, "items").await, expected);

    let deleted = import_as(
        &app,
        &importer,
        "items",
        "delete.xlsx",
        mode(ImportMode::Delete),
    )
    .await
    .unwrap();
    expected.remove("Items:1");
    assert_eq!(main_rows(&app, "items").await, expected);
    assert_eq!((deleted.deleted_rows, deleted.keys_not_found), (1, 1));
    assert_eq!(deleted.source.numeric_key_sheets, ["Items"]);
    assert_eq!(
        deleted.tree_hash,
        tree_in_order(
            &app,
            &deleted.commit_id,
            &["Items:2", "Items:3", "Items:4", "Items:5"]
        )
        .await
    );
}

#[tokio::test]
async fn an_upsert_fails_when_main_moves_under_it() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put("base.csv", numbered(&(1..=50).collect::<Vec<_>>()))
        .await;
    app.put("big-delta.csv", numbered(&(40..=2_000).collect::<Vec<_>>()))
        .await;
    import_as(
        &app,
        &importer,
        "moving",
        "base.csv",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();

    // The upsert reads its file through a slow store, so another import can finish first.
    let services = service_settings();
    let slow = S3Settings {
        endpoint: Some(slow_endpoint(20_000).await),
        region: services
            .get("S3_REGION")
            .cloned()
            .unwrap_or_else(|| "garage".into()),
        bucket: None,
    };
    let slow_importer = Importer::new(
        app.pool.clone(),
        Some(dsa_ingest::s3::client(&slow).await),
        test_settings(),
    );
    let upsert = {
        let parameters = ImportParameters {
            source: app.location("big-delta.csv"),
            expected_etag: None,
            options: mode(ImportMode::Upsert),
        };
        let (run_id, _) = slow_importer
            .create_run(&DatasetName::parse("moving").unwrap(), None, &parameters)
            .await
            .unwrap();
        tokio::spawn(async move { slow_importer.run(run_id).await })
    };
    crate::helpers::wait_until(
        std::time::Duration::from_secs(30),
        "the upsert to have loaded a batch",
        || async {
            app.count("dsa_jobs.analysis_runs WHERE (checkpoint->>'loaded_rows')::bigint > 0")
                .await
                > 0
        },
    )
    .await;
    import_as(
        &app,
        &importer,
        "moving",
        "base.csv",
        ImportOptions::default(),
    )
    .await
    .unwrap();
    let error = upsert.await.unwrap().expect_err("main moved");
    assert!(error.to_string().contains("main moved"), "{error}");
    assert_eq!(main_rows(&app, "moving").await.len(), 50);
}

#[test]
fn a_request_carries_key_and_mode() {
    let body = br#"{"idempotency_key": "k", "dataset": "orders",
                    "source": {"bucket": "b", "key": "orders.csv"},
                    "options": {"key": ["order_id"], "mode": "upsert"}}"#;
    match dsa_ingest::queue::messages::parse(body).unwrap() {
        dsa_ingest::queue::messages::ImportMessage::Request(request) => {
            assert_eq!(request.options.key, Some(vec!["order_id".to_owned()]));
            assert_eq!(request.options.mode, ImportMode::Upsert);
        }
        other => panic!("not a request: {other:?}"),
    }
    for refused in [
        br#"{"idempotency_key": "k", "dataset": "d", "source": {"bucket": "b", "key": "k"}, "options": {"mode": "merge"}}"#.as_slice(),
        br#"{"idempotency_key": "k", "dataset": "d", "source": {"bucket": "b", "key": "k"}, "options": {"keys": ["a"]}}"#,
        br#"{"idempotency_key": "k", "dataset": "d", "source": {"bucket": "b", "key": "k"}, "options": {"key": []}}"#,
        br#"{"idempotency_key": "k", "dataset": "d", "source": {"bucket": "b", "key": "k"}, "options": {"rekey": true, "mode": "append"}}"#,
    ] {
        assert!(
            dsa_ingest::queue::messages::parse(refused).is_err(),
            "{}",
            String::from_utf8_lossy(refused)
        );
    }
}

#[tokio::test]
async fn keyed_versions_verify_and_diff_by_key() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put(
        "base.csv",
        csv(&["sku,qty", "pear,1", "apple,2", "fig,3", "Zed,4"]),
    )
    .await;
    app.put("delta.csv", csv(&["sku,qty", "fig,30", "kiwi,5"]))
        .await;
    import_as(
        &app,
        &importer,
        "stock",
        "base.csv",
        keyed(&["sku"], ImportMode::Replace),
    )
    .await
    .unwrap();
    import_as(
        &app,
        &importer,
        "stock",
        "delta.csv",
        mode(ImportMode::Upsert),
    )
    .await
    .unwrap();

    // verify recomputes both tree hashes in the same logical order finalise used
    // (bytewise keys: "Zed" before "apple").
    let verified = app
        .cli()
        .args(["verify", "stock", "--all"])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let diff = app
        .cli()
        .args(["diff", "stock", "--json"])
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(diff.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let changes: Vec<(String, String)> = lines
        .iter()
        .filter(|line| line.get("op").is_some())
        .map(|line| {
            (
                line["op"].as_str().unwrap().to_owned(),
                line["logical_row_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("changed".to_owned(), "base:fig".to_owned()),
            ("added".to_owned(), "base:kiwi".to_owned())
        ]
    );
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(
        (
            &summary["added"],
            &summary["changed"],
            &summary["removed"],
            &summary["unchanged"]
        ),
        (&json!(1), &json!(1), &json!(0), &json!(3))
    );
}

/// Runs `dsa-ingest ARGS` to success and parses its stdout as JSON.
fn cli_json(app: &TestApp, args: &[&str]) -> ImportSummary {
    serde_json::from_slice(&app.cli_ok(args)).unwrap()
}

#[tokio::test]
async fn each_mode_resumes_after_a_kill_to_the_same_version() {
    use std::process::Stdio;
    use std::time::Duration;

    let app = spawn_app().await;
    // The sample's `id` column is unique: the delta changes ids 1..=5,000 and adds the rest.
    app.put("base.csv", dsa_ingest::sample::sample_csv(5_000, 1))
        .await;
    app.put("delta.csv", dsa_ingest::sample::sample_csv(60_000, 2))
        .await;
    let base = format!("s3://{}/base.csv", app.bucket);
    let delta = format!("s3://{}/delta.csv", app.bucket);
    for (mode, extra) in [
        ("upsert", &[][..]),
        ("append", &["--on-conflict", "update"][..]),
        ("delete", &[][..]),
    ] {
        let killed = format!("killed-{mode}");
        let reference = format!("reference-{mode}");
        for dataset in [&killed, &reference] {
            cli_json(
                &app,
                &[
                    "import",
                    "--dataset",
                    dataset,
                    "--key",
                    "id",
                    &base,
                    "--json",
                ],
            );
        }
        let mut args = vec![
            "import",
            "--dataset",
            &killed,
            "--mode",
            mode,
            &delta,
            "--json",
        ];
        args.extend_from_slice(extra);
        let mut child = app
            .cli()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let running = format!(
            "dsa_jobs.analysis_runs a JOIN dsa_core.datasets d ON d.id = a.dataset_id
              WHERE d.name = '{killed}' AND a.status = 'running'
                AND (a.checkpoint->>'records')::bigint >= 2000"
        );
        crate::helpers::wait_until(
            Duration::from_secs(60),
            "some committed batches",
            || async { app.count(&running).await == 1 },
        )
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
        let run_id: uuid::Uuid = sqlx::query_scalar(&format!("SELECT a.id FROM {running}"))
            .fetch_one(&app.pool)
            .await
            .expect("the child was killed mid-file");

        let resumed = cli_json(&app, &["import", "--resume", &run_id.to_string(), "--json"]);
        let mut args = vec![
            "import",
            "--dataset",
            &reference,
            "--mode",
            mode,
            &delta,
            "--json",
        ];
        args.extend_from_slice(extra);
        let uninterrupted = cli_json(&app, &args);
        assert_eq!(resumed.run_id, run_id);
        assert!(resumed.resumed_from_byte > 0, "{mode}");
        assert_eq!(
            (resumed.rows, &resumed.tree_hash),
            (uninterrupted.rows, &uninterrupted.tree_hash),
            "{mode}"
        );
        let expected_rows = if mode == "delete" { 0 } else { 60_000 };
        assert_eq!(resumed.rows, expected_rows, "{mode}");
        assert_eq!(
            main_rows(&app, &killed).await.len() as u64,
            expected_rows,
            "{mode}"
        );
        assert_eq!(
            app.count("dsa_core.commits WHERE committed_at IS NULL")
                .await,
            0
        );
    }
}

#[tokio::test]
async fn a_merged_commit_keeps_the_parents_columns_for_its_readers() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put(
        "orders.csv",
        csv(&["order_id,amt,note", "1,10,a", "2,20,b", "3,30,c"]),
    )
    .await;
    import_as(
        &app,
        &importer,
        "orders",
        "orders.csv",
        keyed(&["order_id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    // An upsert with a column fewer and one more, then a delete by key alone.
    app.put(
        "delta.csv",
        csv(&["order_id,amt,channel", "2,21,web", "4,40,shop"]),
    )
    .await;
    import_as(
        &app,
        &importer,
        "orders",
        "delta.csv",
        mode(ImportMode::Upsert),
    )
    .await
    .unwrap();
    assert_eq!(
        app.cli_text(&["export", "orders"]),
        "order_id,amt,note,channel\n1,10,a,\n2,21,,web\n3,30,c,\n4,40,,shop\n"
    );
    app.put("gone.csv", csv(&["order_id", "3"])).await;
    let deleted = import_as(
        &app,
        &importer,
        "orders",
        "gone.csv",
        mode(ImportMode::Delete),
    )
    .await
    .unwrap();
    let export = app.cli_text(&["export", "orders"]);
    assert_eq!(
        export,
        "order_id,amt,note,channel\n1,10,a,\n2,21,,web\n4,40,,shop\n"
    );
    let source: Value =
        sqlx::query_scalar("SELECT source FROM dsa_core.commits WHERE commit_id = $1")
            .bind(&deleted.commit_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        source["columns"],
        json!(["order_id", "amt", "note", "channel"])
    );

    // Without new columns, the export of a merged commit imports back to its tree.
    app.put("plain.csv", csv(&["order_id,amt", "1,10", "2,20", "3,30"]))
        .await;
    import_as(
        &app,
        &importer,
        "plain",
        "plain.csv",
        keyed(&["order_id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    app.put("plain-gone.csv", csv(&["order_id", "2"])).await;
    let merged = import_as(
        &app,
        &importer,
        "plain",
        "plain-gone.csv",
        mode(ImportMode::Delete),
    )
    .await
    .unwrap();
    let exported = app.cli_text(&["export", "plain"]);
    assert_eq!(exported, "order_id,amt\n1,10\n3,30\n");
    app.put("plain.csv", exported.into_bytes()).await;
    let again = import_as(
        &app,
        &importer,
        "again",
        "plain.csv",
        keyed(&["order_id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    assert_eq!(again.tree_hash, merged.tree_hash);
}

/// A sheet to write: its name, its header, and its rows of text cells.
type SheetSpec<'a> = (&'a str, &'a [&'a str], &'a [&'a [&'a str]]);

/// An xlsx workbook of these sheets.
fn book(sheets: &[SheetSpec]) -> Vec<u8> {
    let mut workbook = Workbook::new();
    for (name, header, rows) in sheets {
        let sheet = workbook.add_worksheet().set_name(*name).unwrap();
        for (column, title) in header.iter().enumerate() {
            sheet.write(0, column as u16, *title).unwrap();
        }
        for (row, cells) in rows.iter().enumerate() {
            for (column, cell) in cells.iter().enumerate() {
                sheet.write(row as u32 + 1, column as u16, *cell).unwrap();
            }
        }
    }
    workbook.save_to_buffer().unwrap()
}

#[tokio::test]
async fn a_spreadsheet_upsert_keeps_the_columns_and_sheets_of_its_parent() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    app.put(
        "base.xlsx",
        book(&[
            (
                "A",
                &["id", "qty", "note"],
                &[&["a1", "1", "x"], &["a2", "2", "y"]],
            ),
            ("B", &["id", "colour"], &[&["b1", "red"]]),
        ]),
    )
    .await;
    app.put(
        "delta.xlsx",
        book(&[("A", &["id", "qty", "size"], &[&["a2", "20", "L"]])]),
    )
    .await;
    import_as(
        &app,
        &importer,
        "stock",
        "base.xlsx",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    let merged = import_as(
        &app,
        &importer,
        "stock",
        "delta.xlsx",
        mode(ImportMode::Upsert),
    )
    .await
    .unwrap();

    let source: Value =
        sqlx::query_scalar("SELECT source FROM dsa_core.commits WHERE commit_id = $1")
            .bind(&merged.commit_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let columns: BTreeMap<String, Value> = source["sheets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sheet| {
            (
                sheet["name"].as_str().unwrap().to_owned(),
                sheet["columns"].clone(),
            )
        })
        .collect();
    assert_eq!(
        columns["A"],
        json!(["id", "qty", "note", "size"]),
        "{source}"
    );
    assert_eq!(columns["B"], json!(["id", "colour"]), "{source}");
    assert_eq!(
        app.cli_text(&["export", "stock", "--sheet", "A"]),
        "id,qty,note,size\na1,1,x,\na2,20,,L\n"
    );
    assert_eq!(
        app.cli_text(&["export", "stock", "--sheet", "B"]),
        "id,colour\nb1,red\n"
    );
}

/// A keyed replace is the file's rows alone: the sheets of the parent that the new
/// workbook lacks are not the version's, and its readers see the new sheet only.
#[tokio::test]
async fn a_keyed_replace_by_a_workbook_with_other_sheets_lists_only_its_own() {
    let app = spawn_app().await;
    let importer = app.importer(test_settings());
    let id = ["id"];
    app.put(
        "two.xlsx",
        book(&[("A", &id, &[&["a1"]]), ("B", &id, &[&["b1"]])]),
    )
    .await;
    app.put("one.xlsx", book(&[("Only", &id, &[&["o1"]])]))
        .await;
    import_as(
        &app,
        &importer,
        "swap",
        "two.xlsx",
        keyed(&["id"], ImportMode::Replace),
    )
    .await
    .unwrap();
    let replaced = import_as(
        &app,
        &importer,
        "swap",
        "one.xlsx",
        mode(ImportMode::Replace),
    )
    .await
    .unwrap();
    assert_eq!(replaced.rows, 1);
    let source: Value =
        sqlx::query_scalar("SELECT source FROM dsa_core.commits WHERE commit_id = $1")
            .bind(&replaced.commit_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(source["sheet_order"], json!(["Only"]), "{source}");
    assert_eq!(app.cli_text(&["export", "swap"]), "id\no1\n");
}
