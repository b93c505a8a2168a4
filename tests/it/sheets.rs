//! Spreadsheet imports: types, sheets, formats from real writers, hostile files, resume.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use dsa_ingest::db::DatasetName;
use dsa_ingest::import::run::ImportParameters;
use dsa_ingest::import::ImportSummary;
use rust_xlsxwriter::{ExcelDateTime, Format, Formula, Workbook};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, test_settings, wait_until, TestApp};

/// A workbook with every kind of value, a hidden sheet and merged cells.
fn typed_workbook() -> Vec<u8> {
    let mut workbook = Workbook::new();
    let date = Format::new().set_num_format("yyyy-mm-dd");
    let datetime = Format::new().set_num_format("yyyy-mm-dd hh:mm:ss");
    let time = Format::new().set_num_format("hh:mm:ss");
    let sheet = workbook.add_worksheet().set_name("Types").unwrap();
    for (column, name) in [
        "id", "name", "amount", "active", "day", "moment", "clock", "doubled", "", "id",
    ]
    .iter()
    .enumerate()
    {
        if !name.is_empty() {
            sheet.write_string(0, column as u16, *name).unwrap();
        }
    }
    sheet.write_number(1, 0, 1).unwrap();
    sheet
        .write_string(1, 1, "Ünïcødé ✓ 日本語 \"quoted\"")
        .unwrap();
    sheet.write_number(1, 2, 12.5).unwrap();
    sheet.write_boolean(1, 3, true).unwrap();
    let day = ExcelDateTime::from_ymd(2024, 2, 29).unwrap();
    sheet.write_datetime_with_format(1, 4, &day, &date).unwrap();
    let moment = ExcelDateTime::from_ymd(2024, 2, 29)
        .unwrap()
        .and_hms(13, 45, 30)
        .unwrap();
    sheet
        .write_datetime_with_format(1, 5, &moment, &datetime)
        .unwrap();
    let clock = ExcelDateTime::from_hms(8, 30, 0).unwrap();
    sheet
        .write_datetime_with_format(1, 6, &clock, &time)
        .unwrap();
    sheet
        .write_formula(1, 7, Formula::new("=C2*2").set_result("25"))
        .unwrap();
    sheet.write_string(1, 8, "no header").unwrap();
    sheet.write_number(1, 9, 7).unwrap();
    // Row 3 stays empty: a row of nulls between data rows.
    sheet.write_number(3, 0, 3).unwrap();
    sheet.write_number(3, 2, -0.25).unwrap();
    // Trailing rows with formatting but no value are not rows.
    sheet.write_blank(10, 0, &date).unwrap();
    sheet.write_blank(11, 3, &date).unwrap();

    let hidden = workbook.add_worksheet().set_name("Secret").unwrap();
    hidden.set_hidden(true);
    hidden.write_string(0, 0, "key").unwrap();
    hidden.write_string(1, 0, "k1").unwrap();

    let merged = workbook.add_worksheet().set_name("Merged").unwrap();
    merged.write_string(0, 0, "group").unwrap();
    merged.write_string(0, 1, "item").unwrap();
    merged
        .merge_range(1, 0, 2, 0, "G1", &Format::new())
        .unwrap();
    merged.write_string(1, 1, "x").unwrap();
    merged.write_string(2, 1, "y").unwrap();
    workbook.save_to_buffer().unwrap()
}

async fn import_sheets(
    app: &TestApp,
    dataset: &str,
    key: &str,
    sheets: Option<Vec<String>>,
) -> (
    uuid::Uuid,
    Result<ImportSummary, dsa_ingest::import::ImportError>,
) {
    let importer = app.importer(test_settings());
    let parameters = ImportParameters {
        source: app.location(key),
        expected_etag: None,
        options: dsa_ingest::import::run::ImportOptions {
            sheets,
            ..Default::default()
        },
    };
    let (run_id, _) = importer
        .create_run(&DatasetName::parse(dataset).unwrap(), None, &parameters)
        .await
        .unwrap();
    (run_id, importer.run(run_id).await)
}

async fn source_of(app: &TestApp, commit_id: &str) -> Value {
    sqlx::query_scalar("SELECT source FROM dsa_core.commits WHERE commit_id = $1")
        .bind(commit_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_xlsx_keeps_its_types_sheets_and_empty_cells() {
    let app = spawn_app().await;
    app.put("book.xlsx", typed_workbook()).await;
    let summary = app.import("typed", "book.xlsx").await;
    let rows = app.commit_rows(&summary.commit_id).await;
    let expected = vec![
        ("Merged:1".to_owned(), json!({"group": "G1", "item": "x"})),
        ("Merged:2".to_owned(), json!({"group": null, "item": "y"})),
        ("Secret:1".to_owned(), json!({"key": "k1"})),
        (
            "Types:1".to_owned(),
            json!({
                "id": 1, "name": "Ünïcødé ✓ 日本語 \"quoted\"", "amount": 12.5, "active": true,
                "day": "2024-02-29", "moment": "2024-02-29T13:45:30", "clock": "08:30:00",
                "doubled": 25, "column_9": "no header", "id_2": 7
            }),
        ),
        (
            "Types:2".to_owned(),
            json!({
                "id": null, "name": null, "amount": null, "active": null, "day": null,
                "moment": null, "clock": null, "doubled": null, "column_9": null, "id_2": null
            }),
        ),
        (
            "Types:3".to_owned(),
            json!({
                "id": 3, "name": null, "amount": -0.25, "active": null, "day": null,
                "moment": null, "clock": null, "doubled": null, "column_9": null, "id_2": null
            }),
        ),
    ];
    assert_eq!(rows, expected);
    assert_eq!(summary.rows, 6);

    let source = source_of(&app, &summary.commit_id).await;
    assert_eq!(source["format"], "xlsx");
    let sheets: Vec<(String, String, u64)> = source["sheets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sheet| {
            (
                sheet["name"].as_str().unwrap().to_owned(),
                sheet["visibility"].as_str().unwrap().to_owned(),
                sheet["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sheets,
        vec![
            ("Types".to_owned(), "visible".to_owned(), 3),
            ("Secret".to_owned(), "hidden".to_owned(), 1),
            ("Merged".to_owned(), "visible".to_owned(), 2),
        ]
    );
    let renames: Vec<&str> = source["sheets"][0]["header_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|change| change["name"].as_str().unwrap())
        .collect();
    assert_eq!(renames, ["column_9", "id_2"]);
}

#[tokio::test]
async fn named_sheets_are_the_only_ones_imported_and_a_missing_one_fails_the_run() {
    let app = spawn_app().await;
    app.put("book.xlsx", typed_workbook()).await;
    let (_, result) = import_sheets(&app, "some", "book.xlsx", Some(vec!["Merged".into()])).await;
    let summary = result.unwrap();
    let ids: Vec<String> = app
        .commit_rows(&summary.commit_id)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["Merged:1", "Merged:2"]);

    let (run_id, result) =
        import_sheets(&app, "none", "book.xlsx", Some(vec!["Nope".into()])).await;
    let message = result.unwrap_err().to_string();
    assert!(message.contains("\"Nope\""), "{message}");
    assert!(
        message.contains(r#"["Types", "Secret", "Merged"]"#),
        "{message}"
    );
    let (status, error, _) = app.run_state(run_id).await;
    assert_eq!(status, "failed");
    assert_eq!(error.as_deref(), Some(message.as_str()));
    assert_eq!(app.count("dsa_core.commit_rows").await, 2);
}

/// Two worksheets of one name would give their rows the same ids: the file is refused,
/// naming the sheet, before a row is loaded.
#[tokio::test]
async fn a_workbook_with_two_worksheets_of_one_name_is_refused_naming_it() {
    let app = spawn_app().await;
    let renamed = rewrite_zip(&two_sheet_workbook(3), |name, content| {
        (name == "xl/workbook.xml").then(|| {
            String::from_utf8(content.to_vec())
                .unwrap()
                .replace(r#"name="Second""#, r#"name="First""#)
                .into_bytes()
        })
    });
    app.put("twins.xlsx", renamed).await;
    let (run_id, result) = import_sheets(&app, "twins", "twins.xlsx", None).await;
    let message = result.unwrap_err().to_string();
    assert!(message.contains("twins.xlsx"), "{message}");
    assert!(
        message.contains(r#"two worksheets named "First""#),
        "{message}"
    );
    let (status, error, _) = app.run_state(run_id).await;
    assert_eq!(status, "failed");
    assert_eq!(error.as_deref(), Some(message.as_str()));
    assert_eq!(app.count("dsa_core.commit_rows").await, 0);
}

/// The fixtures hold the same workbook, written by LibreOffice (xls, ods) and SheetJS
/// (xlsb); see tests/fixtures/README.md.
async fn check_fixture(file: &str, format: &str) {
    let app = spawn_app().await;
    let bytes = std::fs::read(format!(
        "{}/tests/fixtures/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    app.put(file, bytes).await;
    let summary = app.import("fixture", file).await;
    let rows = app.commit_rows(&summary.commit_id).await;
    let row = |id: &str| {
        rows.iter()
            .find(|(row_id, _)| row_id == id)
            .unwrap_or_else(|| panic!("{file}: no row {id} in {rows:#?}"))
            .1
            .clone()
    };
    let first = row("Types:1");
    assert_eq!(first["id"], json!(1), "{file}: {first}");
    assert_eq!(first["name"], json!("Ünïcødé ✓ 日本語"), "{file}: {first}");
    assert_eq!(first["amount"], json!(12.5), "{file}: {first}");
    // LibreOffice keeps a boolean as a number with a boolean format, and so writes it.
    assert_eq!(first["active"], json!(1), "{file}: {first}");
    assert_eq!(first["day"], json!("2024-02-29"), "{file}: {first}");
    assert_eq!(
        first["moment"],
        json!("2024-02-29T13:45:30"),
        "{file}: {first}"
    );
    assert_eq!(first["clock"], json!("08:30:00"), "{file}: {first}");
    assert_eq!(first["doubled"], json!(25), "{file}: {first}");
    assert_eq!(first["broken"], json!("#DIV/0!"), "{file}: {first}");
    assert_eq!(first["note"], Value::Null, "{file}: {first}");
    let second = row("Types:2");
    assert_eq!(second["active"], json!(0), "{file}: {second}");
    assert_eq!(
        second["moment"],
        json!("2000-01-01T00:00:01"),
        "{file}: {second}"
    );
    assert_eq!(second["clock"], json!("23:59:59"), "{file}: {second}");
    assert_eq!(second["doubled"], json!(-6), "{file}: {second}");
    let gap = row("Types:3");
    assert!(
        gap.as_object().unwrap().values().all(Value::is_null),
        "{file}: {gap}"
    );
    let last = row("Types:4");
    assert_eq!(last["id"], json!(4), "{file}: {last}");
    assert_eq!(last["note"], json!("after a gap"), "{file}: {last}");
    assert_eq!(row("Hidden:1"), json!({"key": "a", "value": 1}), "{file}");
    assert_eq!(
        row("Merged:1"),
        json!({"group": "G1", "item": "x"}),
        "{file}"
    );
    assert_eq!(
        row("Merged:2"),
        json!({"group": null, "item": "y"}),
        "{file}"
    );
    assert_eq!(rows.len(), 7, "{file}: {rows:#?}");

    let source = source_of(&app, &summary.commit_id).await;
    assert_eq!(source["format"], format);
    assert_eq!(source["sheets"][1]["name"], "Hidden");
    assert_eq!(
        source["sheets"][1]["visibility"], "hidden",
        "{file}: {source}"
    );
}

#[tokio::test]
async fn an_xls_written_by_libreoffice_is_imported() {
    check_fixture("source.xls", "xls").await;
}

#[tokio::test]
async fn an_ods_written_by_libreoffice_is_imported() {
    check_fixture("source.ods", "ods").await;
}

#[tokio::test]
async fn an_xlsb_with_full_cell_records_is_imported() {
    check_fixture("source-full.xlsb", "xlsb").await;
}

#[tokio::test]
async fn an_xlsb_with_short_cell_records_is_refused_rather_than_read_short() {
    let app = spawn_app().await;
    let bytes = std::fs::read(format!(
        "{}/tests/fixtures/source.xlsb",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    app.put("sheetjs.xlsb", bytes).await;
    let (_, result) = app
        .import_with(test_settings(), "short", "sheetjs.xlsb", false)
        .await;
    let message = result.unwrap_err().to_string();
    assert!(
        message.starts_with(
            "sheetjs.xlsb: part xl/worksheets/sheet1.bin stores cells in the short record form"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn a_file_whose_extension_lies_fails_with_a_clear_error() {
    let app = spawn_app().await;
    app.put("text.xlsx", b"a,b\n1,2\n".to_vec()).await;
    let (_, result) = app
        .import_with(test_settings(), "lies", "text.xlsx", false)
        .await;
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("text.xlsx: not a spreadsheet") && message.contains("looks like text"),
        "{message}"
    );

    let ods = std::fs::read(format!(
        "{}/tests/fixtures/source.ods",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    app.put("really-ods.xlsx", ods).await;
    let (_, result) = app
        .import_with(test_settings(), "lies", "really-ods.xlsx", false)
        .await;
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("really-ods.xlsx: the name says xlsx but the content is ods file"),
        "{message}"
    );
}

#[tokio::test]
async fn a_value_outside_the_header_fails_the_row_naming_the_cell() {
    let app = spawn_app().await;
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet().set_name("Data").unwrap();
    sheet.write_string(0, 0, "a").unwrap();
    sheet.write_string(0, 1, "b").unwrap();
    sheet.write_number(1, 0, 1).unwrap();
    sheet.write_number(2, 3, 9).unwrap();
    app.put("wide.xlsx", workbook.save_to_buffer().unwrap())
        .await;
    let (_, result) = app
        .import_with(test_settings(), "wide", "wide.xlsx", false)
        .await;
    let message = result.unwrap_err().to_string();
    assert_eq!(
        message,
        "wide.xlsx: sheet \"Data\", row 3: cell D3 has a value outside the header's columns A:B"
    );
    // With --skip-bad-rows the row is set aside and the others load.
    let (_, result) = app
        .import_with(test_settings(), "wide", "wide.xlsx", true)
        .await;
    let summary = result.unwrap();
    assert_eq!((summary.rows, summary.rejected_rows), (1, 1));
    let rejected: (String, i64, String) =
        sqlx::query_as("SELECT sheet, line, error FROM dsa_jobs.rejected_rows")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(rejected.0, "Data");
    assert_eq!(rejected.1, 3);
}

#[tokio::test]
async fn the_spool_directory_is_left_as_it_was() {
    let app = spawn_app().await;
    let spool =
        std::env::temp_dir().join(format!("dsa-spool-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("unrelated"), b"not ours").unwrap();
    let mut settings = test_settings();
    settings.spool_dir = spool.clone();
    app.put("book.xlsx", typed_workbook()).await;
    app.import_with(settings.clone(), "spooled", "book.xlsx", false)
        .await
        .1
        .unwrap();
    let left: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["unrelated"]);
    // And on a failure.
    app.put("broken.xlsx", typed_workbook()[..3000].to_vec())
        .await;
    let (_, result) = app
        .import_with(settings, "spooled", "broken.xlsx", false)
        .await;
    assert!(result.is_err());
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);
    std::fs::remove_dir_all(&spool).unwrap();
}

// ---------------------------------------------------------------------------------------
// Hostile files: each is refused by a child process whose own peak memory is measured.
// ---------------------------------------------------------------------------------------

/// Rewrites a zip archive, replacing parts by `change` (which may return new content).
pub(crate) fn rewrite_zip(
    original: &[u8],
    change: impl Fn(&str, &[u8]) -> Option<Vec<u8>>,
) -> Vec<u8> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(original)).unwrap();
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(1))
        .large_file(true);
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        let content = change(&name, &content).unwrap_or(content);
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(&content).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// Builds, by hand, a zip holding `workbook`'s parts (stored) where part `name` is
/// followed by `spaces` spaces, deflated with fixed Huffman codes: one literal space,
/// then matches of 258 bytes at distance 1, 13 bits each (RFC 1951 3.2.6). No
/// compressor has to chew through the gigabytes; the CRC of the bomb part is left 0,
/// since nothing may ever read that far.
fn zip_bomb(workbook: &[u8], name: &str, spaces: u64) -> Vec<u8> {
    zip_bomb_declaring(workbook, name, spaces, None)
}

/// [`zip_bomb`], but the bomb part declares `declared` bytes (its directory lies) when
/// given, instead of the size it really inflates to.
pub(crate) fn zip_bomb_declaring(
    workbook: &[u8],
    name: &str,
    spaces: u64,
    declared: Option<u64>,
) -> Vec<u8> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(workbook)).unwrap();
    let mut parts = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap();
        let part_name = entry.name().unwrap().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        parts.push((part_name, content));
    }
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (part_name, content) in &parts {
        let offset = out.len() as u32;
        let (method, data, crc, size) = if part_name == name {
            let data = deflate_with_spaces(content, spaces);
            let size = declared.unwrap_or(content.len() as u64 + spaces);
            (8u16, data, 0u32, size)
        } else {
            (0u16, content.clone(), crc32(content), content.len() as u64)
        };
        let size = u32::try_from(size).expect("under 4 GiB: no zip64 needed");
        let header = |signature: u32, central: bool| {
            let mut header = Vec::new();
            header.extend_from_slice(&signature.to_le_bytes());
            if central {
                header.extend_from_slice(&20u16.to_le_bytes()); // made by
            }
            header.extend_from_slice(&20u16.to_le_bytes()); // needed to extract
            header.extend_from_slice(&0u16.to_le_bytes()); // flags
            header.extend_from_slice(&method.to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes()); // time and date
            header.extend_from_slice(&crc.to_le_bytes());
            header.extend_from_slice(&(data.len() as u32).to_le_bytes());
            header.extend_from_slice(&size.to_le_bytes());
            header.extend_from_slice(&(part_name.len() as u16).to_le_bytes());
            header.extend_from_slice(&0u16.to_le_bytes()); // extra field
            if central {
                header.extend_from_slice(&0u16.to_le_bytes()); // comment
                header.extend_from_slice(&0u16.to_le_bytes()); // disk
                header.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
                header.extend_from_slice(&0u32.to_le_bytes()); // external attributes
                header.extend_from_slice(&offset.to_le_bytes());
            }
            header.extend_from_slice(part_name.as_bytes());
            header
        };
        out.extend_from_slice(&header(0x0403_4b50, false));
        out.extend_from_slice(&data);
        central.extend_from_slice(&header(0x0201_4b50, true));
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&(parts.len() as u16).to_le_bytes());
    out.extend_from_slice(&(parts.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A deflate stream of `prefix` (a stored block) and then `spaces` spaces.
fn deflate_with_spaces(prefix: &[u8], spaces: u64) -> Vec<u8> {
    let mut out = Vec::new();
    // Stored block, not final: 3 header bits, then byte aligned LEN and NLEN.
    out.push(0b000);
    out.extend_from_slice(&(prefix.len() as u16).to_le_bytes());
    out.extend_from_slice(&(!(prefix.len() as u16)).to_le_bytes());
    out.extend_from_slice(prefix);
    let mut bits = BitWriter::default();
    bits.put(1, 1); // final
    bits.put(0b01, 2); // fixed Huffman codes
                       // Huffman codes go most significant bit first.
    let code = |bits: &mut BitWriter, code: u32, length: u32| {
        for shift in (0..length).rev() {
            bits.put((code >> shift) & 1, 1);
        }
    };
    let literal_space = 0x30 + b' ' as u32; // literals 0-143: 8 bits from 0x30
    code(&mut bits, literal_space, 8);
    let mut left = spaces - 1;
    while left >= 258 {
        code(&mut bits, 0b1100_0101, 8); // length symbol 285: 258 bytes
        code(&mut bits, 0, 5); // distance symbol 0: distance 1
        left -= 258;
    }
    for _ in 0..left {
        code(&mut bits, literal_space, 8);
    }
    code(&mut bits, 0, 7); // end of block
    out.extend_from_slice(&bits.finish());
    out
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    current: u32,
    used: u32,
}

impl BitWriter {
    /// Appends the `count` low bits of `value`, least significant first.
    fn put(&mut self, value: u32, count: u32) {
        for bit in 0..count {
            self.current |= ((value >> bit) & 1) << self.used;
            self.used += 1;
            if self.used == 8 {
                self.bytes.push(self.current as u8);
                self.current = 0;
                self.used = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.bytes.push(self.current as u8);
        }
        self.bytes
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub(crate) fn small_workbook() -> Vec<u8> {
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "name").unwrap();
    sheet.write_string(1, 0, "value").unwrap();
    workbook.save_to_buffer().unwrap()
}

/// Runs `dsa-ingest import` on `key` in a child process that must fail; returns its
/// stderr and its own peak RSS in bytes, which it logs as it exits. (The rusage that
/// `wait4` gives is no use here: a child spawned with vfork starts from the test
/// process's own high-water mark.)
fn refuse(app: &TestApp, key: &str, env: &[(&str, &str)]) -> (String, u64) {
    let source = format!("s3://{}/{key}", app.bucket);
    let output = app
        .child()
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn,dsa_ingest::cli=debug")
        .args(["import", "--dataset", "hostile", &source, "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(1),
        "dsa-ingest should fail cleanly: {stderr}"
    );
    let peak = stderr
        .split("peak_rss_bytes=")
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no peak_rss_bytes in {stderr}"));
    (stderr, peak)
}

/// Memory a refusal may take beyond that of refusing a file that is no spreadsheet at
/// all (the runtime, the clients, the pool): the spool buffers and the zip directory,
/// far below what any of the hostile files would make a naive reader take.
const REFUSAL_RSS_ALLOWANCE: u64 = 24 * 1024 * 1024;

/// Peak RSS of a child refusing a file that is plainly not a spreadsheet but has the
/// hostile file's size, so both take the same road through the spool.
async fn baseline_rss(app: &TestApp, size: usize) -> u64 {
    let junk = b"not a spreadsheet\n"
        .iter()
        .copied()
        .cycle()
        .take(size.max(17))
        .collect();
    app.put("baseline.xlsx", junk).await;
    let (stderr, peak) = refuse(app, "baseline.xlsx", &[]);
    assert!(stderr.contains("not a spreadsheet"), "{stderr}");
    peak
}

pub(crate) async fn assert_refused(
    app: &TestApp,
    key: &str,
    body: Vec<u8>,
    expected: &str,
    env: &[(&str, &str)],
) {
    let baseline = baseline_rss(app, body.len()).await;
    app.put(key, body).await;
    let (stderr, peak) = refuse(app, key, env);
    eprintln!(
        "{key}: peak RSS {} KiB, refusing a junk file of its size {} KiB",
        peak / 1024,
        baseline / 1024
    );
    assert!(
        stderr.contains(expected),
        "{key}: expected {expected:?} in {stderr}"
    );
    assert!(
        peak < baseline + REFUSAL_RSS_ALLOWANCE,
        "{key}: peak RSS {peak} bytes, refusing a text file took {baseline}"
    );
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dsa_jobs.analysis_runs WHERE status = 'failed' AND error_message LIKE '%' || $1 || '%'",
    )
    .bind(expected)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(failed, 1, "{key}: the run is failed with the message");
}

#[tokio::test]
async fn a_zip_bomb_is_refused_from_the_zip_directory() {
    let app = spawn_app().await;
    // A sheet part that inflates to 2 GiB of spaces from 13 MB.
    let bomb = zip_bomb(&small_workbook(), "xl/worksheets/sheet1.xml", 2 << 30);
    assert!(bomb.len() < 16 << 20, "the bomb is small: {}", bomb.len());
    // It is a real zip whose part really inflates to the size it declares.
    {
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&bomb)).unwrap();
        let mut part = archive.by_name("xl/worksheets/sheet1.xml").unwrap();
        assert!(part.size() > 2 << 30);
        let mut head = vec![0u8; 1 << 20];
        part.read_exact(&mut head).unwrap();
        assert!(head.starts_with(b"<?xml") && head.ends_with(b"    "));
    }
    assert_refused(&app, "bomb.xlsx", bomb, "refusing a likely zip bomb", &[]).await;
}

#[tokio::test]
async fn a_sheet_declaring_the_whole_grid_with_two_cells_is_refused() {
    let app = spawn_app().await;
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "a").unwrap();
    sheet.write_string(1_048_575, 16_383, "z").unwrap();
    let body = workbook.save_to_buffer().unwrap();
    assert_refused(
        &app,
        "grid.xlsx",
        body,
        "spans A1:XFD1048576, 16384 columns, more than the limit of 4096",
        &[],
    )
    .await;
}

#[tokio::test]
async fn shared_strings_too_large_or_overcounted_are_refused() {
    let app = spawn_app().await;
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "text").unwrap();
    for row in 1..2000 {
        sheet
            .write_string(row, 0, format!("distinct string {row}"))
            .unwrap();
    }
    assert_refused(
        &app,
        "strings.xlsx",
        workbook.save_to_buffer().unwrap(),
        "(IMPORT_MAX_SHARED_STRINGS_SIZE)",
        &[("IMPORT_MAX_SHARED_STRINGS_SIZE", "10000")],
    )
    .await;

    let overcounted = rewrite_zip(&small_workbook(), |name, content| {
        (name == "xl/sharedStrings.xml").then(|| {
            String::from_utf8_lossy(content)
                .replace("uniqueCount=\"2\"", "uniqueCount=\"4000000000\"")
                .into_bytes()
        })
    });
    assert_refused(
        &app,
        "overcounted.xlsx",
        overcounted,
        "declares 4000000000 strings",
        &[],
    )
    .await;
}

#[tokio::test]
async fn xml_with_entity_declarations_is_refused() {
    let app = spawn_app().await;
    let body = rewrite_zip(&small_workbook(), |name, content| {
        (name == "xl/sharedStrings.xml").then(|| {
                let text = String::from_utf8_lossy(content);
                let (declaration, rest) = text.split_once("?>").unwrap();
                format!(
                    "{declaration}?><!DOCTYPE sst [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;\">]>{rest}"
                )
                .into_bytes()
            })
    });
    assert_refused(
        &app,
        "entities.xlsx",
        body,
        "part xl/sharedStrings.xml has a document type declaration",
        &[],
    )
    .await;
}

#[tokio::test]
async fn truncated_and_corrupt_files_are_refused() {
    let app = spawn_app().await;
    let whole = typed_workbook();
    assert_refused(
        &app,
        "truncated.xlsx",
        whole[..whole.len() / 2].to_vec(),
        "truncated.xlsx: cannot be read as a zip archive",
        &[],
    )
    .await;
    // Garbage in the middle of the compressed sheet data.
    let mut corrupt = rewrite_zip(&whole, |_, _| None);
    let middle = corrupt.len() / 3;
    for byte in &mut corrupt[middle..middle + 200] {
        *byte ^= 0x5A;
    }
    let baseline = baseline_rss(&app, corrupt.len()).await;
    app.put("corrupt.xlsx", corrupt).await;
    let (stderr, peak) = refuse(&app, "corrupt.xlsx", &[]);
    assert!(stderr.contains("corrupt.xlsx"), "{stderr}");
    assert!(
        peak < baseline + REFUSAL_RSS_ALLOWANCE,
        "peak RSS {peak} bytes"
    );
}

// ---------------------------------------------------------------------------------------
// Resume
// ---------------------------------------------------------------------------------------

fn two_sheet_workbook(rows: u32) -> Vec<u8> {
    let mut workbook = Workbook::new();
    for name in ["First", "Second"] {
        let sheet = workbook.add_worksheet().set_name(name).unwrap();
        sheet.write_string(0, 0, "n").unwrap();
        sheet.write_string(0, 1, "label").unwrap();
        sheet.write_string(0, 2, "value").unwrap();
        for row in 1..=rows {
            sheet.write_number(row, 0, row).unwrap();
            sheet
                .write_string(row, 1, format!("{name} row {row} ✓"))
                .unwrap();
            sheet.write_number(row, 2, row as f64 / 7.0).unwrap();
        }
    }
    workbook.save_to_buffer().unwrap()
}

#[tokio::test]
async fn an_import_killed_mid_sheet_resumes_there_and_commits_the_same_tree() {
    let app = spawn_app().await;
    app.put("two.xlsx", two_sheet_workbook(30_000)).await;
    let source = format!("s3://{}/two.xlsx", app.bucket);
    let mut child = app
        .cli()
        .args(["import", "--dataset", "killed", &source, "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pool = app.pool.clone();
    // Kill it inside the second sheet.
    wait_until(
        Duration::from_secs(120),
        "the child to reach the second sheet",
        || {
            let pool = pool.clone();
            async move {
                let position: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT (checkpoint->>'sheet_index')::bigint, (checkpoint->>'sheet_records')::bigint
                   FROM dsa_jobs.analysis_runs",
            )
            .fetch_optional(&pool)
            .await
            .unwrap();
                matches!(position, Some((Some(1), Some(records))) if records >= 1000)
            }
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let (run_id, loaded_before): (uuid::Uuid, i64) = sqlx::query_as(
        "SELECT id, (checkpoint->>'loaded_rows')::bigint FROM dsa_jobs.analysis_runs",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        loaded_before < 60_000,
        "killed before the end: {loaded_before}"
    );

    let output = app
        .cli()
        .args(["import", "--resume", &run_id.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let resumed: ImportSummary = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(resumed.rows, 60_000);
    assert_eq!(
        app.count(&format!(
            "dsa_core.commit_rows WHERE commit_id = '{}'",
            resumed.commit_id
        ))
        .await,
        60_000
    );

    let reference = app.import("reference", "two.xlsx").await;
    assert_eq!(resumed.tree_hash, reference.tree_hash);
    let resumed_source = source_of(&app, &resumed.commit_id).await;
    let reference_source = source_of(&app, &reference.commit_id).await;
    assert_eq!(resumed_source["sheets"], reference_source["sheets"]);
    assert_eq!(resumed_source["sheets"][1]["rows"], 30_000);
}

#[tokio::test]
async fn an_ods_whose_repeats_expand_to_a_billion_cells_is_refused() {
    let app = spawn_app().await;
    let ods = std::fs::read(format!(
        "{}/tests/fixtures/source.ods",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let body = rewrite_zip(&ods, |name, content| {
        (name == "content.xml").then(|| {
            let repeated = "<table:table-row table:number-rows-repeated=\"1000000\">\
                <table:table-cell office:value-type=\"float\" office:value=\"1\" \
                table:number-columns-repeated=\"1000\"/></table:table-row>";
            String::from_utf8_lossy(content)
                .replacen("</table:table>", &format!("{repeated}</table:table>"), 1)
                .into_bytes()
        })
    });
    assert_refused(
        &app,
        "repeats.ods",
        body,
        "sheet \"Types\" spans A1:ALL1000005, 1000005000 cells",
        &[],
    )
    .await;
}

#[tokio::test]
async fn error_values_of_newer_excel_are_read_as_their_text_in_their_cells() {
    let app = spawn_app().await;
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet().set_name("Dynamic").unwrap();
    sheet.write_string(0, 0, "value").unwrap();
    sheet.write_string(0, 1, "after").unwrap();
    sheet.write_string(0, 2, "known").unwrap();
    sheet.write_string(1, 0, "SPILL-HERE").unwrap();
    sheet.write_string(1, 1, "b2").unwrap();
    sheet.write_string(1, 2, "DIV-HERE").unwrap();
    sheet.write_string(3, 1, "CALC-HERE").unwrap();
    sheet.write_string(3, 2, "c4").unwrap();
    let original = workbook.save_to_buffer().unwrap();
    // Excel 365 writes a spilled array's blocked anchor as `#SPILL!` and a failed
    // array calculation as `#CALC!`; calamine knows neither, but knows `#DIV/0!`.
    let body = rewrite_zip(&original, |name, content| {
        (name == "xl/worksheets/sheet1.xml").then(|| {
            let mut text = String::from_utf8_lossy(content).into_owned();
            for (cell, error) in [("A2", "#SPILL!"), ("C2", "#DIV/0!"), ("B4", "#CALC!")] {
                let start = text.find(&format!("<c r=\"{cell}\"")).unwrap();
                let end = start + text[start..].find("</c>").unwrap() + 4;
                text.replace_range(
                    start..end,
                    &format!("<c r=\"{cell}\" t=\"e\"><f>F()</f><v>{error}</v></c>"),
                );
            }
            text.into_bytes()
        })
    });
    app.put("spill.xlsx", body).await;
    let summary = app.import("spill", "spill.xlsx").await;
    assert_eq!(
        app.commit_rows(&summary.commit_id).await,
        vec![
            (
                "Dynamic:1".to_owned(),
                json!({"value": "#SPILL!", "after": "b2", "known": "#DIV/0!"})
            ),
            (
                "Dynamic:2".to_owned(),
                json!({"value": null, "after": null, "known": null})
            ),
            (
                "Dynamic:3".to_owned(),
                json!({"value": null, "after": "#CALC!", "known": "c4"})
            ),
        ]
    );
}

#[tokio::test]
async fn an_xls_with_cells_in_opposite_corners_is_refused_before_it_is_parsed() {
    let app = spawn_app().await;
    // LibreOffice's xls of a sheet with A1 and IV65536 filled (see tests/fixtures).
    let body = std::fs::read(format!(
        "{}/tests/fixtures/sparse.xls",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    // Its DIMENSIONS record declares the extent, which calamine would reserve at once.
    assert_refused(
        &app,
        "sparse.xls",
        body.clone(),
        "sparse.xls: sheet \"Sparse\" spans 65536 rows by 256 columns (declared), 16777216 cells",
        &[],
    )
    .await;
    // With a DIMENSIONS record that lies (one cell), the cells themselves give it away.
    let declared: &[u8] = &[0x00, 0x02, 0x0E, 0x00, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1];
    let at = body
        .windows(declared.len())
        .position(|window| window == declared)
        .expect("the DIMENSIONS record of the sheet");
    let mut lying = body;
    lying[at + 8..at + 12].copy_from_slice(&1u32.to_le_bytes());
    lying[at + 14..at + 16].copy_from_slice(&1u16.to_le_bytes());
    assert_refused(
        &app,
        "lying.xls",
        lying,
        "lying.xls: sheet \"Sparse\" spans A1:IV65536, 16777216 cells",
        &[],
    )
    .await;
}
