//! Files as people export them: other delimiters, encodings and compressions. Each test
//! starts from the rows it expects, writes them out in the format under test with code
//! of its own (and the compressors' own encoders), and compares what the import stored.

use std::io::Write;
use std::time::Duration;

use dsa_ingest::config::ImportSettings;
use dsa_ingest::db::DatasetName;
use dsa_ingest::import::run::{ImportOptions, ImportParameters, TextFormat};
use dsa_ingest::import::{ImportError, ImportSummary};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, test_settings, wait_until, TestApp};

/// Rows of a header and values, as the tests expect them back.
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<&'static str>>,
}

impl Table {
    fn sample() -> Self {
        Self {
            columns: vec!["id", "name", "note"],
            rows: vec![
                vec!["1", "Zoë", "plain"],
                vec!["2", "a;b,c|d\te", "all four delimiters"],
                vec!["3", "say \"hi\"", "line one\nline two"],
                vec!["4", "", "empty name"],
            ],
        }
    }

    /// The text of the table with `delimiter`, quoting what needs it (RFC 4180).
    fn text(&self, delimiter: char, header: bool) -> String {
        let line = |fields: &[&str]| {
            let quoted: Vec<String> = fields
                .iter()
                .map(|field| {
                    if field.contains([delimiter, '"', '\n', '\r']) {
                        format!("\"{}\"", field.replace('"', "\"\""))
                    } else {
                        (*field).to_owned()
                    }
                })
                .collect();
            quoted.join(&delimiter.to_string()) + "\n"
        };
        let mut text = String::new();
        if header {
            text.push_str(&line(&self.columns));
        }
        for row in &self.rows {
            text.push_str(&line(row));
        }
        text
    }

    /// The commit rows the table should give, under `sheet` and `columns`.
    fn expected(&self, sheet: &str, columns: &[&str]) -> Vec<(String, Value)> {
        self.rows
            .iter()
            .enumerate()
            .map(|(index, row)| {
                let object: serde_json::Map<String, Value> = columns
                    .iter()
                    .zip(row)
                    .map(|(column, value)| ((*column).to_owned(), json!(value)))
                    .collect();
                (format!("{sheet}:{}", index + 1), Value::Object(object))
            })
            .collect()
    }
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Creates a run for `key` with `options` and runs it.
async fn import_with(
    app: &TestApp,
    settings: ImportSettings,
    dataset: &str,
    key: &str,
    options: ImportOptions,
) -> (Uuid, Result<ImportSummary, ImportError>) {
    options.check().expect("options are valid");
    let importer = app.importer(settings);
    let parameters = ImportParameters {
        source: app.location(key),
        expected_etag: None,
        options,
    };
    let (run_id, _) = importer
        .create_run(&DatasetName::parse(dataset).unwrap(), None, &parameters)
        .await
        .unwrap();
    (run_id, importer.run(run_id).await)
}

async fn import(app: &TestApp, dataset: &str, key: &str, options: ImportOptions) -> ImportSummary {
    let (_, result) = import_with(app, test_settings(), dataset, key, options).await;
    result.expect("import succeeds")
}

/// Resumes a stopped run as another process would: with a pool of its own (the stopped
/// import's tasks were aborted mid-query, and a resume elsewhere never shares their
/// connections).
async fn resume(app: &TestApp, run_id: Uuid) -> ImportSummary {
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let importer = dsa_ingest::import::Importer::new(pool, Some(app.s3.clone()), test_settings());
    importer
        .run(run_id)
        .await
        .expect("the resumed import succeeds")
}

/// The commit's recorded dialect.
fn dialect(summary: &ImportSummary) -> Value {
    serde_json::to_value(&summary.source).unwrap()["dialect"].clone()
}

#[tokio::test]
async fn semicolon_tab_and_pipe_files_are_read_by_sniffing_by_name_or_as_asked() {
    let app = spawn_app().await;
    let table = Table::sample();
    app.put("european.csv", table.text(';', true).into_bytes())
        .await;
    app.put("export.tsv", table.text('\t', true).into_bytes())
        .await;
    app.put("piped.txt", table.text('|', true).into_bytes())
        .await;
    app.put("asked.csv", table.text('|', true).into_bytes())
        .await;
    let expected = |sheet: &str| table.expected(sheet, &["id", "name", "note"]);

    let european = import(&app, "european", "european.csv", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&european.commit_id).await,
        expected("european")
    );
    assert_eq!(dialect(&european)["delimiter"], ";");
    assert_eq!(dialect(&european)["delimiter_sniffed"], true);

    let tabs = import(&app, "tabs", "export.tsv", ImportOptions::default()).await;
    assert_eq!(app.commit_rows(&tabs.commit_id).await, expected("export"));
    assert_eq!(dialect(&tabs)["delimiter"], "\t");
    assert_eq!(dialect(&tabs).get("delimiter_sniffed"), None);

    let piped = import(&app, "piped", "piped.txt", ImportOptions::default()).await;
    assert_eq!(app.commit_rows(&piped.commit_id).await, expected("piped"));
    assert_eq!(dialect(&piped)["delimiter"], "|");

    let options = ImportOptions {
        delimiter: Some("|".into()),
        ..ImportOptions::default()
    };
    let asked = import(&app, "asked", "asked.csv", options).await;
    assert_eq!(app.commit_rows(&asked.commit_id).await, expected("asked"));
    assert_eq!(
        dialect(&asked),
        json!({"delimiter": "|", "quote": "\"", "header": true, "encoding": "utf-8"})
    );
}

#[tokio::test]
async fn an_ambiguous_sample_takes_the_documented_delimiter_unless_one_is_given() {
    let app = spawn_app().await;
    // Both `,` and `;` split every line in two: the tie goes to `,`.
    app.put("tie.csv", b"a;b,c\n1;2,3\n".to_vec()).await;
    // `;` splits every line alike, `,` only some (decimal commas): `;`.
    app.put("decimals.csv", b"item;price\npen;1,50\nbook;12\n".to_vec())
        .await;

    let tie = import(&app, "tie", "tie.csv", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&tie.commit_id).await,
        vec![("tie:1".to_owned(), json!({"a;b": "1;2", "c": "3"}))]
    );
    assert_eq!(dialect(&tie)["delimiter"], ",");
    let options = ImportOptions {
        delimiter: Some(";".into()),
        ..ImportOptions::default()
    };
    let asked = import(&app, "tie-asked", "tie.csv", options).await;
    assert_eq!(
        app.commit_rows(&asked.commit_id).await,
        vec![("tie:1".to_owned(), json!({"a": "1", "b,c": "2,3"}))]
    );
    let decimals = import(&app, "decimals", "decimals.csv", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&decimals.commit_id).await,
        vec![
            (
                "decimals:1".to_owned(),
                json!({"item": "pen", "price": "1,50"})
            ),
            (
                "decimals:2".to_owned(),
                json!({"item": "book", "price": "12"})
            ),
        ]
    );
}

#[tokio::test]
async fn no_header_quote_and_escape_options_are_honoured() {
    let app = spawn_app().await;
    // No header; single quotes; a backslash escapes a quote inside quotes.
    app.put(
        "raw.csv",
        b"1,'it\\'s, here'\r\n2,'two ''quoted'''\r\n".to_vec(),
    )
    .await;
    let options = ImportOptions {
        no_header: true,
        quote: Some("'".into()),
        escape: Some("\\".into()),
        ..ImportOptions::default()
    };
    let summary = import(&app, "raw", "raw.csv", options).await;
    assert_eq!(
        app.commit_rows(&summary.commit_id).await,
        vec![
            (
                "raw:1".to_owned(),
                json!({"column_1": "1", "column_2": "it's, here"})
            ),
            (
                "raw:2".to_owned(),
                json!({"column_1": "2", "column_2": "two 'quoted'"})
            ),
        ]
    );
    assert_eq!(
        dialect(&summary),
        json!({"delimiter": ",", "quote": "'", "escape": "\\", "header": false,
               "encoding": "utf-8", "delimiter_sniffed": true})
    );
    assert_eq!(summary.columns, vec!["column_1", "column_2"]);
}

#[tokio::test]
async fn utf16_with_a_byte_order_mark_and_windows_1252_are_stored_as_utf8() {
    let app = spawn_app().await;
    let table = Table::sample();
    let text = table.text('\t', true);
    let mut utf16 = vec![0xFF, 0xFE];
    for unit in text.encode_utf16() {
        utf16.extend(unit.to_le_bytes());
    }
    app.put("unicode.txt", utf16).await;
    // é is 0xE9 and € is 0x80 in Windows-1252.
    app.put("legacy.csv", b"name;price\ncaf\xe9;5 \x80\n".to_vec())
        .await;

    let unicode = import(&app, "unicode", "unicode.txt", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&unicode.commit_id).await,
        table.expected("unicode", &["id", "name", "note"])
    );
    assert_eq!(dialect(&unicode)["encoding"], "utf-16le");
    assert_eq!(dialect(&unicode)["delimiter"], "\t");

    let options = ImportOptions {
        encoding: Some("windows-1252".into()),
        ..ImportOptions::default()
    };
    let legacy = import(&app, "legacy", "legacy.csv", options).await;
    assert_eq!(
        app.commit_rows(&legacy.commit_id).await,
        vec![(
            "legacy:1".to_owned(),
            json!({"name": "café", "price": "5 €"})
        )]
    );
    assert_eq!(dialect(&legacy)["encoding"], "windows-1252");
}

#[tokio::test]
async fn bytes_invalid_in_the_declared_encoding_fail_the_row_naming_line_and_byte() {
    let app = spawn_app().await;
    // Shift_JIS: 0x82 0xA0 is あ; 0x82 before a space is no character.
    app.put("japanese.csv", b"id,name\n1,\x82\xa0\n2,\x82 x\n".to_vec())
        .await;
    let options = ImportOptions {
        encoding: Some("shift_jis".into()),
        ..ImportOptions::default()
    };

    let (run_id, result) = import_with(
        &app,
        test_settings(),
        "japanese",
        "japanese.csv",
        options.clone(),
    )
    .await;
    let message = result.unwrap_err().to_string();
    // "id,name\n1,あ\n" is 14 bytes of UTF-8; the bad sequence is 2 bytes into line 3.
    assert_eq!(
        message,
        "japanese.csv: line 3, byte 14: column 2 is not valid shift_jis \
         (near byte 16 of the decoded text)"
    );
    let (status, _, _) = app.run_state(run_id).await;
    assert_eq!(status, "failed");

    let skipping = ImportOptions {
        skip_bad_rows: true,
        ..options
    };
    let summary = import(&app, "japanese-skip", "japanese.csv", skipping).await;
    assert_eq!((summary.rows, summary.rejected_rows), (1, 1));
    assert_eq!(
        app.commit_rows(&summary.commit_id).await,
        vec![("japanese:1".to_owned(), json!({"id": "1", "name": "あ"}))]
    );
    let (line, column): (i64, Option<i32>) =
        sqlx::query_as("SELECT line, \"column\" FROM dsa_jobs.rejected_rows")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((line, column), (3, Some(2)));
}

#[tokio::test]
async fn gzip_with_several_members_zstd_and_bzip2_are_recognised_by_their_content() {
    let app = spawn_app().await;
    let table = Table::sample();
    let text = table.text(',', true);
    let (head, tail) = text.split_at(text.find("2,").unwrap());
    let mut members = gzip(head.as_bytes());
    members.extend(gzip(tail.as_bytes()));
    app.put("orders.csv.gz", members).await;
    app.put("orders.csv.zst", zstd(text.as_bytes())).await;
    // The name need not say it: the content does.
    app.put("orders-bz.csv", bzip2(text.as_bytes())).await;
    app.put("orders.tsv.gz", gzip(table.text('\t', true).as_bytes()))
        .await;

    for (dataset, key, sheet, compression) in [
        ("gz", "orders.csv.gz", "orders", "gzip"),
        ("zst", "orders.csv.zst", "orders", "zstd"),
        ("bz", "orders-bz.csv", "orders-bz", "bzip2"),
        ("tsv-gz", "orders.tsv.gz", "orders", "gzip"),
    ] {
        let summary = import(&app, dataset, key, ImportOptions::default()).await;
        assert_eq!(
            app.commit_rows(&summary.commit_id).await,
            table.expected(sheet, &["id", "name", "note"]),
            "{key}"
        );
        assert_eq!(dialect(&summary)["compression"], compression, "{key}");
        assert_eq!(summary.bytes, summary.source.size);
    }
}

/// A zip of `members` (name, content), deflated or stored.
fn zip_of(members: &[(&str, &[u8])], deflated: bool) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(if deflated {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    });
    for (name, content) in members {
        writer.start_file(*name, options).unwrap();
        writer.write_all(content).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

#[tokio::test]
async fn a_zip_of_one_table_is_read_and_a_zip_of_several_needs_a_member() {
    let app = spawn_app().await;
    let table = Table::sample();
    let csv = table.text(',', true);
    let tsv = table.text('\t', true);
    app.put(
        "one.zip",
        zip_of(
            &[
                ("export/orders.csv", csv.as_bytes()),
                ("readme.pdf", &b"%PDF"[..]),
            ],
            true,
        ),
    )
    .await;
    app.put(
        "stored.zip",
        zip_of(&[("orders.tsv", tsv.as_bytes())], false),
    )
    .await;
    app.put(
        "two.zip",
        zip_of(
            &[("a.csv", csv.as_bytes()), ("b.tsv", tsv.as_bytes())],
            true,
        ),
    )
    .await;
    let columns = ["id", "name", "note"];

    let one = import(&app, "one", "one.zip", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&one.commit_id).await,
        table.expected("one", &columns)
    );
    assert_eq!(dialect(&one)["compression"], "zip");
    assert_eq!(dialect(&one)["member"], "export/orders.csv");

    let stored = import(&app, "stored", "stored.zip", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&stored.commit_id).await,
        table.expected("stored", &columns)
    );
    // The member's name says tab-separated: no sniffing.
    assert_eq!(dialect(&stored)["delimiter"], "\t");
    assert_eq!(dialect(&stored).get("delimiter_sniffed"), None);

    let (_, result) = import_with(
        &app,
        test_settings(),
        "two",
        "two.zip",
        ImportOptions::default(),
    )
    .await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "two.zip: the zip holds several files that could be the table (\"a.csv\", \"b.tsv\"); \
         name one with --member (options.member)"
    );
    let options = ImportOptions {
        member: Some("b.tsv".into()),
        ..ImportOptions::default()
    };
    let picked = import(&app, "two-b", "two.zip", options).await;
    assert_eq!(
        app.commit_rows(&picked.commit_id).await,
        table.expected("two", &columns)
    );
    assert_eq!(dialect(&picked)["member"], "b.tsv");
    let options = ImportOptions {
        member: Some("c.csv".into()),
        ..ImportOptions::default()
    };
    let (_, result) = import_with(&app, test_settings(), "two-c", "two.zip", options).await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "two.zip: the zip has no member \"c.csv\"; it holds \"a.csv\", \"b.tsv\""
    );
    // A zipped JSON Lines member is read as JSON Lines, by its own name.
    app.put(
        "events.zip",
        zip_of(
            &[("events.jsonl", &b"{\"a\":1}\n{\"a\":true,\"b\":null}\n"[..])],
            true,
        ),
    )
    .await;
    let events = import(&app, "events", "events.zip", ImportOptions::default()).await;
    assert_eq!(
        app.commit_rows(&events.commit_id).await,
        vec![
            ("events:1".to_owned(), json!({"a": 1})),
            ("events:2".to_owned(), json!({"a": true, "b": null})),
        ]
    );
    let source = serde_json::to_value(&events.source).unwrap();
    assert_eq!(source["format"], "jsonl");
    assert_eq!(
        source["text"],
        json!({"encoding": "utf-8", "compression": "zip", "member": "events.jsonl"})
    );
}

#[tokio::test]
async fn a_decompression_bomb_and_a_corrupt_file_fail_naming_the_problem() {
    let app = spawn_app().await;
    // 8 MiB of empty lines shrink to a few KiB.
    let mut bomb = b"a,b\n".to_vec();
    bomb.resize(8 << 20, b'\n');
    app.put("bomb.csv.gz", gzip(&bomb)).await;
    let mut cut = gzip(b"a,b\n1,2\n3,4\n");
    cut.truncate(cut.len() - 10);
    app.put("cut.csv.gz", cut).await;
    let settings = ImportSettings {
        max_decompressed_size: 1 << 20,
        ..test_settings()
    };

    let (run_id, result) = import_with(
        &app,
        settings.clone(),
        "bomb",
        "bomb.csv.gz",
        ImportOptions::default(),
    )
    .await;
    let message = result.unwrap_err().to_string();
    assert_eq!(
        message,
        "bomb.csv.gz: the gzip content decompresses to more than 1048576 bytes \
         (IMPORT_MAX_DECOMPRESSED_SIZE); is it a decompression bomb?"
    );
    let (status, stored, _) = app.run_state(run_id).await;
    assert_eq!(
        (status.as_str(), stored.as_deref()),
        ("failed", Some(message.as_str()))
    );

    let (_, result) = import_with(
        &app,
        settings,
        "cut",
        "cut.csv.gz",
        ImportOptions::default(),
    )
    .await;
    let message = result.unwrap_err().to_string();
    assert!(
        message.starts_with("cut.csv.gz: the gzip content is corrupt or cut short: "),
        "{message}"
    );
}

#[tokio::test]
async fn a_gzip_import_stopped_mid_file_resumes_to_the_same_tree() {
    let app = spawn_app().await;
    let csv = dsa_ingest::sample::sample_csv(30_000, 17);
    app.put("big.csv.gz", gzip(&csv)).await;

    // The reference: the same file uncompressed, imported without a stop.
    app.put("big.csv", csv.clone()).await;
    let reference = import(&app, "reference", "big.csv", ImportOptions::default()).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let importer = app.importer(test_settings()).stop_on(stop.clone());
    let parameters = ImportParameters {
        source: app.location("big.csv.gz"),
        expected_etag: None,
        options: ImportOptions::default(),
    };
    let (run_id, _) = importer
        .create_run(&DatasetName::parse("stopped").unwrap(), None, &parameters)
        .await
        .unwrap();
    let running = tokio::spawn({
        let importer = importer.clone();
        async move { importer.run(run_id).await }
    });
    let pool = app.pool.clone();
    wait_until(Duration::from_secs(60), "some batches to commit", || {
        let pool = pool.clone();
        async move {
            let loaded: Option<i64> = sqlx::query_scalar(
                "SELECT (checkpoint->>'loaded_rows')::bigint FROM dsa_jobs.analysis_runs WHERE id = $1",
            )
            .bind(run_id)
            .fetch_one(&pool)
            .await
            .unwrap();
            loaded.unwrap_or(0) >= 3_000
        }
    })
    .await;
    stop.cancel();
    let error = running.await.unwrap().unwrap_err();
    assert!(matches!(error, ImportError::Interrupted), "{error}");
    let (checkpoint_byte, object_byte): (i64, i64) = sqlx::query_as(
        "SELECT (checkpoint->>'byte_offset')::bigint, (checkpoint->>'object_offset')::bigint
           FROM dsa_jobs.analysis_runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(checkpoint_byte > 0 && (checkpoint_byte as usize) < csv.len());
    assert!(object_byte > 0);

    let resumed = resume(&app, run_id).await;

    assert_eq!(resumed.resumed_from_byte, checkpoint_byte as u64);
    assert_eq!(resumed.rows, 30_000);
    assert_eq!(resumed.tree_hash, reference.tree_hash);
    // Every row under the same id as the uncompressed import, each once.
    let (differences, rows): (i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM (
              (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1
               EXCEPT SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $2)
              UNION ALL
              (SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $2
               EXCEPT SELECT logical_row_id, row_hash FROM dsa_core.commit_rows WHERE commit_id = $1)) d),
           (SELECT count(*) FROM dsa_core.commit_rows WHERE commit_id = $2)",
    )
    .bind(&reference.commit_id)
    .bind(&resumed.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((differences, rows), (0, 30_000));
    assert_eq!(dialect(&resumed)["compression"], "gzip");
}

#[tokio::test]
async fn the_command_line_takes_the_dialect_options() {
    let app = spawn_app().await;
    app.put("cli.txt", b"1|x\n2|y\n".to_vec()).await;
    let source = format!("s3://{}/cli.txt", app.bucket);

    let output = app
        .cli()
        .args([
            "import",
            "--dataset",
            "cli",
            &source,
            "--delimiter",
            "|",
            "--no-header",
            "--encoding",
            "latin1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: ImportSummary = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        app.commit_rows(&summary.commit_id).await,
        vec![
            (
                "cli:1".to_owned(),
                json!({"column_1": "1", "column_2": "x"})
            ),
            (
                "cli:2".to_owned(),
                json!({"column_1": "2", "column_2": "y"})
            ),
        ]
    );
    assert_eq!(dialect(&summary)["encoding"], "windows-1252");

    let refused = app
        .cli()
        .args(["import", "--dataset", "cli", &source, "--delimiter", "||"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("delimiter must be a single byte (or \\t for a tab), not \"||\""),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn json_lines_keep_their_types_and_grow_their_columns() {
    let app = spawn_app().await;
    // The rows the test expects, written out one object per line (a blank line and a
    // CRLF among them); the key `extra` appears only on the third row.
    let expected = [
        json!({"id": 1, "name": "Zoë", "price": 1.5, "ok": true, "tags": ["a", "b"]}),
        json!({"id": 2, "name": null, "price": 1e21, "ok": false, "tags": []}),
        json!({"id": 3, "name": "x", "price": -0.25, "ok": true, "tags": {"n": 1}, "extra": "late"}),
    ];
    let mut text = String::new();
    for (index, row) in expected.iter().enumerate() {
        text.push_str(&serde_json::to_string(row).unwrap());
        text.push_str(if index == 0 { "\r\n\n" } else { "\n" });
    }
    app.put("events.jsonl", text.clone().into_bytes()).await;
    app.put("events.ndjson.gz", gzip(text.as_bytes())).await;
    app.put("events.txt", text.into_bytes()).await;

    let summary = import(&app, "events", "events.jsonl", ImportOptions::default()).await;
    let rows = app.commit_rows(&summary.commit_id).await;
    let want: Vec<(String, Value)> = expected
        .iter()
        .enumerate()
        .map(|(index, row)| (format!("events:{}", index + 1), row.clone()))
        .collect();
    assert_eq!(rows, want);
    let source = serde_json::to_value(&summary.source).unwrap();
    assert_eq!(source["format"], "jsonl");
    assert_eq!(
        source["columns"],
        json!(["id", "name", "ok", "price", "tags", "extra"])
    );
    assert_eq!(source["text"], json!({"encoding": "utf-8"}));
    // Row 2's canonical form, written here by hand: keys sorted, 1e21 as ECMAScript
    // prints it.
    let (hash,): (Vec<u8>,) = sqlx::query_as(
        "SELECT row_hash FROM dsa_core.commit_rows WHERE commit_id = $1 AND logical_row_id = 'events:2'",
    )
    .bind(&summary.commit_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let canonical = br#"{"id":2,"name":null,"ok":false,"price":1e+21,"tags":[]}"#;
    assert_eq!(hash, dsa_ingest::import::hash::row_hash(canonical).to_vec());

    let compressed = import(
        &app,
        "events-gz",
        "events.ndjson.gz",
        ImportOptions::default(),
    )
    .await;
    assert_eq!(compressed.tree_hash, summary.tree_hash);
    let source = serde_json::to_value(&compressed.source).unwrap();
    assert_eq!(
        source["text"],
        json!({"encoding": "utf-8", "compression": "gzip"})
    );

    let options = ImportOptions {
        format: Some(TextFormat::Jsonl),
        ..ImportOptions::default()
    };
    let named = import(&app, "events-txt", "events.txt", options).await;
    assert_eq!(named.rows, 3);
}

/// A line whose data would not be stored as it is written fails its row, naming the
/// line: an integer no double keeps, a key named twice in one object, and (keyed) a
/// key column holding an object.
#[tokio::test]
async fn json_lines_that_could_not_be_stored_as_written_fail_their_rows() {
    let app = spawn_app().await;
    let lines = [
        r#"{"id":1,"n":9007199254740992}"#,
        r#"{"id":2,"n":9007199254740993}"#,
        r#"{"id":3,"a":1,"a":2}"#,
        r#"{"id":{"x":1}}"#,
        r#"{"id":5,"n":"9007199254740993"}"#,
    ];
    app.put(
        "exact.jsonl",
        format!("{}\n", lines.join("\n")).into_bytes(),
    )
    .await;
    let (_, result) = import_with(
        &app,
        test_settings(),
        "exact",
        "exact.jsonl",
        ImportOptions::default(),
    )
    .await;
    let message = result.unwrap_err().to_string();
    assert!(
        message.starts_with("exact.jsonl: line 2, byte 30: the line cannot be stored as written: ")
            && message.contains(
                "the integer 9007199254740993 at column 13 would be stored as 9007199254740992"
            ),
        "{message}"
    );

    let options = ImportOptions {
        skip_bad_rows: true,
        key: Some(vec!["id".to_owned()]),
        ..ImportOptions::default()
    };
    let summary = import(&app, "exact-skip", "exact.jsonl", options).await;
    assert_eq!((summary.rows, summary.rejected_rows), (2, 3));
    assert_eq!(
        app.commit_rows(&summary.commit_id).await,
        vec![
            (
                "exact:1".to_owned(),
                json!({"id": 1, "n": 9007199254740992u64})
            ),
            (
                "exact:5".to_owned(),
                json!({"id": 5, "n": "9007199254740993"})
            ),
        ]
    );
    let rejected: Vec<(i64, String)> =
        sqlx::query_as("SELECT line, error FROM dsa_jobs.rejected_rows ORDER BY line")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let lines: Vec<i64> = rejected.iter().map(|(line, _)| *line).collect();
    assert_eq!(lines, vec![2, 3, 4]);
    assert!(
        rejected[1]
            .1
            .contains(r#"the object has the key "a" twice"#),
        "{}",
        rejected[1].1
    );
    assert_eq!(
        rejected[2].1,
        r#"key column "id" holds an object; a key is a string, a number or a boolean"#
    );
}

#[tokio::test]
async fn a_json_line_that_is_not_an_object_fails_its_row() {
    let app = spawn_app().await;
    app.put(
        "mixed.jsonl",
        b"{\"a\":1}\n[1,2]\n{\"a\":\n{\"a\":4}\n".to_vec(),
    )
    .await;

    let (run_id, result) = import_with(
        &app,
        test_settings(),
        "mixed",
        "mixed.jsonl",
        ImportOptions::default(),
    )
    .await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "mixed.jsonl: line 2, byte 8: the line is a JSON array, not an object"
    );
    let (status, _, _) = app.run_state(run_id).await;
    assert_eq!(status, "failed");

    let options = ImportOptions {
        skip_bad_rows: true,
        ..ImportOptions::default()
    };
    let summary = import(&app, "mixed-skip", "mixed.jsonl", options).await;
    assert_eq!((summary.rows, summary.rejected_rows), (2, 2));
    assert_eq!(
        app.commit_rows(&summary.commit_id).await,
        vec![
            ("mixed:1".to_owned(), json!({"a": 1})),
            ("mixed:4".to_owned(), json!({"a": 4})),
        ]
    );
    let rejected: Vec<(i64, i64, String)> =
        sqlx::query_as("SELECT line, byte_offset, error FROM dsa_jobs.rejected_rows ORDER BY line")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!((rejected[0].0, rejected[0].1), (2, 8));
    assert_eq!((rejected[1].0, rejected[1].1), (3, 14));
    assert!(
        rejected[1].2.starts_with("the line is not valid JSON: "),
        "{}",
        rejected[1].2
    );
}

#[tokio::test]
async fn a_json_lines_import_stopped_mid_file_resumes_with_the_columns_it_had_seen() {
    let app = spawn_app().await;
    // 20,000 objects; the key `late` first appears after the stop.
    let mut text = String::new();
    for n in 1..=20_000u32 {
        let row = if n > 15_000 {
            json!({"n": n, "even": n % 2 == 0, "late": format!("x{n}")})
        } else {
            json!({"n": n, "even": n % 2 == 0})
        };
        text.push_str(&serde_json::to_string(&row).unwrap());
        text.push('\n');
    }
    app.put("lines.jsonl", text.clone().into_bytes()).await;
    app.put("reference.jsonl", text.into_bytes()).await;
    let reference = import(
        &app,
        "reference",
        "reference.jsonl",
        ImportOptions::default(),
    )
    .await;

    let stop = tokio_util::sync::CancellationToken::new();
    let importer = app.importer(test_settings()).stop_on(stop.clone());
    let parameters = ImportParameters {
        source: app.location("lines.jsonl"),
        expected_etag: None,
        options: ImportOptions {
            sheet_name: Some("reference".into()),
            ..ImportOptions::default()
        },
    };
    let (run_id, _) = importer
        .create_run(&DatasetName::parse("lines").unwrap(), None, &parameters)
        .await
        .unwrap();
    let running = tokio::spawn({
        let importer = importer.clone();
        async move { importer.run(run_id).await }
    });
    let pool = app.pool.clone();
    wait_until(Duration::from_secs(60), "some batches to commit", || {
        let pool = pool.clone();
        async move {
            let loaded: Option<i64> = sqlx::query_scalar(
                "SELECT (checkpoint->>'loaded_rows')::bigint FROM dsa_jobs.analysis_runs WHERE id = $1",
            )
            .bind(run_id)
            .fetch_one(&pool)
            .await
            .unwrap();
            loaded.unwrap_or(0) >= 2_000
        }
    })
    .await;
    stop.cancel();
    let error = running.await.unwrap().unwrap_err();
    assert!(matches!(error, ImportError::Interrupted), "{error}");

    let resumed = resume(&app, run_id).await;

    assert!(resumed.resumed_from_byte > 0);
    assert_eq!((resumed.rows, resumed.new_rows), (20_000, 0));
    assert_eq!(resumed.tree_hash, reference.tree_hash);
    assert_eq!(resumed.columns, vec!["even", "n", "late"]);
    assert_eq!(resumed.columns, reference.columns);
}
