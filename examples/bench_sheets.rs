//! Spreadsheet benchmark: writes an N-row, 10-column xlsx (rust_xlsxwriter, constant
//! memory mode), uploads it, imports it with `dsa-ingest import` as a whole process
//! into a scratch database, and prints seconds, rows/s and peak RSS. With openpyxl
//! installed it also times `scripts/openpyxl_read.py` over the same file, for scale.
//!
//! `scripts/bench-sheets [--rows 1000000]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use aws_sdk_s3::primitives::ByteStream;
use dsa_ingest::config::Settings;
use dsa_ingest::import::ImportSummary;
use rust_xlsxwriter::{ExcelDateTime, Format, Workbook};

#[path = "support/mod.rs"]
mod support;

const BENCH_DATABASE: &str = "dsa_bench_sheets";

/// The spreadsheet benchmark's options.
#[derive(clap::Parser)]
struct Args {
    /// Rows of the workbook's one sheet (`_` separators allowed).
    #[arg(long, value_parser = support::parse_count, default_value = "1000000")]
    rows: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { rows } = clap::Parser::parse();
    let rows = u32::try_from(rows).context("--rows must fit in 32 bits")?;
    let settings = Settings::from_env()?;
    let bucket = settings
        .s3
        .bucket
        .clone()
        .context("S3_BUCKET names the bucket to upload to")?;
    let path = PathBuf::from(format!("target/bench/sheet-{rows}.xlsx"));
    if !path.exists() {
        let started = Instant::now();
        write_workbook(&path, rows)?;
        eprintln!(
            "wrote {} in {:.1} s",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let bytes = std::fs::metadata(&path)?.len();
    let key = format!("bench/sheet-{rows}.xlsx");
    let s3 = dsa_ingest::s3::client(&settings.s3).await;
    let existing = s3.head_object().bucket(&bucket).key(&key).send().await;
    if !existing.is_ok_and(|head| head.content_length() == Some(bytes as i64)) {
        s3.put_object()
            .bucket(&bucket)
            .key(&key)
            .body(ByteStream::from_path(&path).await?)
            .send()
            .await
            .with_context(|| format!("uploading s3://{bucket}/{key}"))?;
    }

    let database_url =
        support::recreate_database(settings.database_url.expose(), BENCH_DATABASE).await?;
    let binary = support::sibling_binary("dsa-ingest")?;
    run(&binary, &database_url, &["migrate"])?;
    let started = Instant::now();
    let source = format!("s3://{bucket}/{key}");
    let stdout = run(
        &binary,
        &database_url,
        &["import", "--dataset", "bench-sheets", &source, "--json"],
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let summary: ImportSummary = serde_json::from_slice(&stdout)?;
    println!(
        "xlsx import   {rows} rows x 10 columns, {:.1} MB: {seconds:.1} s, {:.0} rows/s, peak RSS {:.1} MB",
        bytes as f64 / 1e6,
        summary.rows as f64 / seconds,
        summary.peak_rss_bytes as f64 / 1e6
    );
    println!(
        "              stages (ms): wait for batch {}, decode+hash {}, look-up {}, insert rows {}, commit_rows {}, checkpoint+commit {}, finalise {}",
        summary.timings.wait_for_batch_ms,
        summary.timings.decode_hash_ms,
        summary.timings.lookup_ms,
        summary.timings.insert_rows_ms,
        summary.timings.commit_rows_ms,
        summary.timings.checkpoint_commit_ms,
        summary.timings.finalise_ms
    );

    let openpyxl = Command::new("python3")
        .args(["-c", "import openpyxl"])
        .output()
        .is_ok_and(|output| output.status.success());
    if openpyxl {
        let started = Instant::now();
        let output = Command::new("python3")
            .arg("scripts/openpyxl_read.py")
            .arg(&path)
            .output()?;
        if !output.status.success() {
            bail!("openpyxl: {}", String::from_utf8_lossy(&output.stderr));
        }
        println!(
            "openpyxl      read-only pass over the same local file: {:.1} s ({})",
            started.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    } else {
        println!("openpyxl      not installed (pip install openpyxl) - comparison skipped");
    }
    Ok(())
}

/// Ten columns of the kinds spreadsheets hold: numbers, text, a boolean and a date.
fn write_workbook(path: &Path, rows: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let mut workbook = Workbook::new();
    let date = Format::new().set_num_format("yyyy-mm-dd");
    let sheet = workbook.add_worksheet_with_constant_memory()?;
    sheet.set_name("Data")?;
    let header = [
        "id", "name", "category", "amount", "quantity", "active", "day", "code", "score", "note",
    ];
    for (column, name) in header.iter().enumerate() {
        sheet.write_string(0, column as u16, *name)?;
    }
    let categories = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let start = ExcelDateTime::from_ymd(2020, 1, 1)?.to_excel();
    for row in 1..=rows {
        let n = row as u64;
        sheet.write_number(row, 0, n as f64)?;
        sheet.write_string(row, 1, format!("customer {}", n * 7919 % 1_000_003))?;
        sheet.write_string(row, 2, categories[(n % 5) as usize])?;
        sheet.write_number(row, 3, (n * 37 % 100_000) as f64 / 100.0)?;
        sheet.write_number(row, 4, (n * 13 % 1000) as f64)?;
        sheet.write_boolean(row, 5, n.is_multiple_of(3))?;
        let day = ExcelDateTime::from_serial_datetime(start + (n % 2000) as f64)?;
        sheet.write_datetime_with_format(row, 6, &day, &date)?;
        sheet.write_string(row, 7, format!("C{:06X}", n * 2_654_435_761 % 0xFF_FFFF))?;
        sheet.write_number(row, 8, (n % 97) as f64 * 1.25)?;
        sheet.write_string(
            row,
            9,
            if n.is_multiple_of(10) {
                "checked ✓"
            } else {
                ""
            },
        )?;
    }
    let partial = path.with_extension("partial");
    workbook.save(&partial)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

fn run(binary: &Path, database_url: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let output = Command::new(binary)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()?;
    if !output.status.success() {
        bail!(
            "dsa-ingest {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}
