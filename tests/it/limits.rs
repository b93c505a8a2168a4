//! Inputs that must not hang or exhaust a consumer: a hostile CSV header, sparse and
//! oversized spreadsheets, and a zip part whose directory lies about its size.

use std::time::{Duration, Instant};

use dsa_ingest::config::ImportSettings;
use rust_xlsxwriter::Workbook;

use crate::helpers::{spawn_app, test_settings};
use crate::sheets::{assert_refused, rewrite_zip, small_workbook, zip_bomb_declaring};

#[tokio::test]
async fn a_megabyte_header_of_one_repeated_name_fails_fast_naming_the_column_limit() {
    let app = spawn_app().await;
    // About 500,000 columns named `a`: renaming them by probing from `a_2` each time
    // was ~10^11 probes on an async worker.
    let mut body = "a,".repeat(500_000).into_bytes();
    body.pop();
    body.extend_from_slice(b"\n");
    app.put("wide.csv", body).await;
    // Ranges of the default size: the tests' small ones would make this a test of
    // 250 GETs rather than of the header.
    let settings = ImportSettings {
        chunk_size: 4 << 20,
        ..test_settings()
    };
    let importer = app.importer(settings);
    let (run_id, _) = app.create_run(&importer, "wide", "wide.csv", false).await;
    let started = Instant::now();
    let result = importer.run(run_id).await;
    let elapsed = started.elapsed();
    let error = result.expect_err("the header is refused").to_string();
    assert!(
        error.contains("500000 columns, more than the limit of 4096 (IMPORT_MAX_COLUMNS)"),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let (status, message, _) = app.run_state(run_id).await;
    assert_eq!(status, "failed");
    assert!(message.unwrap().contains("IMPORT_MAX_COLUMNS"));
    assert_eq!(app.count("dsa_core.commits").await, 0);
}

#[tokio::test]
async fn a_header_of_one_name_repeated_up_to_the_limit_imports_with_unique_names() {
    let app = spawn_app().await;
    let columns = 4096;
    let mut body = vec!["a"; columns].join(",");
    body.push('\n');
    body.push_str(&vec!["1"; columns].join(","));
    body.push('\n');
    app.put("dups.csv", body.into_bytes()).await;
    let started = Instant::now();
    let summary = app.import("dups", "dups.csv").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(summary.rows, 1);
    let rows = app.commit_rows(&summary.commit_id).await;
    let row = rows[0].1.as_object().unwrap();
    assert_eq!(row.len(), columns);
    assert!(row.contains_key("a") && row.contains_key("a_2") && row.contains_key("a_4096"));
}

#[tokio::test]
async fn a_sheet_with_cells_in_a1_and_a1048576_is_refused_as_a_sparse_sheet() {
    let app = spawn_app().await;
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "a").unwrap();
    sheet.write_string(1_048_575, 0, "z").unwrap();
    let body = workbook.save_to_buffer().unwrap();
    assert!(body.len() < 16 * 1024);
    assert_refused(
        &app,
        "sparse.xlsx",
        body,
        "has 1048574 empty rows before row 1048576, more than the limit of 65536 \
         (IMPORT_MAX_EMPTY_ROWS)",
        &[],
    )
    .await;
}

#[tokio::test]
async fn rows_sheets_and_cell_sizes_over_their_limits_are_refused() {
    let app = spawn_app().await;
    let mut workbook = Workbook::new();
    for name in ["one", "two", "three"] {
        let sheet = workbook.add_worksheet().set_name(name).unwrap();
        sheet.write_string(0, 0, "text").unwrap();
        for row in 1..=10 {
            sheet
                .write_string(row, 0, "x".repeat(row as usize * 10))
                .unwrap();
        }
    }
    let body = workbook.save_to_buffer().unwrap();
    assert_refused(
        &app,
        "sheets.xlsx",
        body.clone(),
        "has 3 worksheets, more than the limit of 2 (IMPORT_MAX_SHEETS)",
        &[("IMPORT_MAX_SHEETS", "2")],
    )
    .await;
    assert_refused(
        &app,
        "rows.xlsx",
        body.clone(),
        "sheet \"one\" has data at row 7, more than the limit of 5 data rows per sheet \
         (IMPORT_MAX_SHEET_ROWS)",
        &[("IMPORT_MAX_SHEET_ROWS", "5")],
    )
    .await;
    assert_refused(
        &app,
        "cells.xlsx",
        body,
        "sheet \"one\", cell A6 holds 50 bytes of text, more than the limit of 45 \
         (IMPORT_MAX_CELL_BYTES)",
        &[("IMPORT_MAX_CELL_BYTES", "45")],
    )
    .await;
}

#[tokio::test]
async fn a_zip_part_that_inflates_past_its_declared_size_fails_the_run() {
    let app = spawn_app().await;
    // The sheet part is cut before `</sheetData>`, so a reader goes on reading the
    // spaces that follow; its directory entry declares only what precedes them.
    let cut = rewrite_zip(&small_workbook(), |name, content| {
        (name == "xl/worksheets/sheet1.xml").then(|| {
            let text = String::from_utf8(content.to_vec()).unwrap();
            let end = text.find("</sheetData>").expect("a sheet has sheetData");
            text.as_bytes()[..end].to_vec()
        })
    });
    let prefix_len = {
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&cut)).unwrap();
        let size = archive.by_name("xl/worksheets/sheet1.xml").unwrap().size();
        size
    };
    let spaces = 512 << 20;
    let bomb = zip_bomb_declaring(
        &cut,
        "xl/worksheets/sheet1.xml",
        spaces,
        Some(prefix_len + 1024),
    );
    assert!(bomb.len() < 4 << 20, "the bomb is small: {}", bomb.len());
    let started = Instant::now();
    assert_refused(
        &app,
        "liar.xlsx",
        bomb,
        "larger than its declared uncompressed size",
        &[],
    )
    .await;
    // Inflating 512 MiB of spaces would take far longer than stopping at 2 KiB.
    assert!(started.elapsed() < Duration::from_secs(30));
}
