//! The history benchmark: for each row count, in one run on the local database,
//! - `psql \copy` of the sample file into a plain ten-text-column table (baseline A),
//! - `psql \copy (SELECT * FROM that table) TO file` (baseline B, for export),
//! - two imports into one dataset: the sample, then the same file with 1% of rows
//!   changed (every hundredth row's name), under the same base name so ids line up,
//! - `diff --summary` and `diff --json` of the two commits, `export --format csv` of the
//!   second to a local file, and `verify` of it,
//!
//! each timed as a whole process, the median of `--repeat` runs, with the process's
//! own peak RSS (VmHWM, which the CLI logs at debug level as it exits). The issue's
//! targets: diff --summary at most 1.5x A, diff --json 2x A, export 3x B, verify 3x A,
//! each under 64 MB. Run it with `scripts/bench-history`.
//!
//! `cargo run --release --example bench_history -- [--rows N]... [--repeat R]`

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::bail;
use dsa_ingest::config::Settings;

#[path = "support/mod.rs"]
mod support;

const BENCH_DATABASE: &str = "dsa_bench_history";

struct Measurement {
    seconds: f64,
    peak_rss_bytes: Option<u64>,
}

/// The history benchmark's options.
#[derive(clap::Parser)]
struct Args {
    /// Rows of the dataset to measure (repeat for several sizes; `_` separators allowed).
    #[arg(long = "rows", value_parser = support::parse_count, default_value = "1000000")]
    row_counts: Vec<u64>,
    /// Runs of each measurement; the median is printed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { row_counts, repeat } = clap::Parser::parse();
    let settings = Settings::from_env()?;
    let binary = support::sibling_binary("dsa-ingest")?;
    let database_url =
        support::recreate_database(settings.database_url.expose(), BENCH_DATABASE).await?;
    run(&binary, &database_url, &["migrate"], None)?;

    println!(
        "{:>10} {:<28} {:>9} {:>11} {:>10} {:>11} {:>7}",
        "rows", "case", "seconds", "rows/s", "peak RSS", "x baseline", "target"
    );
    for rows in row_counts {
        let folder = PathBuf::from(format!("target/bench/history-{rows}"));
        let first = folder.join("v1/data.csv");
        let second = folder.join("v2/data.csv");
        ensure_files(&first, &second, rows)?;
        std::fs::create_dir_all(folder.join("export"))?;
        let exported = folder.join("export/data.csv");
        let baseline_out = folder.join("export/baseline.csv");

        let mut cases: Vec<(&str, Vec<Measurement>)> = vec![
            ("psql \\copy in (A)", vec![]),
            ("psql \\copy out (B)", vec![]),
            ("diff --summary", vec![]),
            ("diff --json", vec![]),
            ("export --format csv", vec![]),
            ("verify", vec![]),
        ];
        for round in 0..repeat {
            dsa_ingest::sample::reset_bench_store(&database_url).await?;
            cases[0].1.push(time_psql(
                &database_url,
                &format!(
                    "\\copy public.baseline FROM '{}' WITH (FORMAT csv, HEADER true)",
                    second.display()
                ),
            )?);
            cases[1].1.push(time_psql(
                &database_url,
                &format!(
                    "\\copy (SELECT * FROM public.baseline) TO '{}' WITH (FORMAT csv, HEADER true)",
                    baseline_out.display()
                ),
            )?);
            let dataset = format!("history-{rows}-{round}");
            for file in [&first, &second] {
                run(
                    &binary,
                    &database_url,
                    &["import", "--dataset", &dataset, file.to_str().unwrap()],
                    None,
                )?;
            }
            // As autovacuum leaves tables some time after a load: visibility map set
            // (index-only scans) and statistics current.
            vacuum(&database_url).await?;
            let diff_summary = ["diff", dataset.as_str(), "--summary", "--json"];
            let (measurement, out) = time(&binary, &database_url, &diff_summary, None)?;
            check_summary(&out, rows)?;
            cases[2].1.push(measurement);
            let diff_json = ["diff", dataset.as_str(), "--json"];
            let sink = folder.join("diff.jsonl");
            let (measurement, _) = time(&binary, &database_url, &diff_json, Some(&sink))?;
            check_summary(&last_line(&sink)?, rows)?;
            cases[3].1.push(measurement);
            let export = [
                "export",
                dataset.as_str(),
                "--format",
                "csv",
                "--output",
                exported.to_str().unwrap(),
            ];
            cases[4]
                .1
                .push(time(&binary, &database_url, &export, None)?.0);
            let verify = ["verify", dataset.as_str()];
            cases[5]
                .1
                .push(time(&binary, &database_url, &verify, None)?.0);
        }
        let mut medians: Vec<(&str, Measurement)> = cases
            .into_iter()
            .map(|(case, measurements)| (case, median(measurements)))
            .collect();
        let a = medians[0].1.seconds;
        let b = medians[1].1.seconds;
        for (index, (case, measurement)) in medians.iter_mut().enumerate() {
            let (base, target) = match index {
                2 => (a, "1.5x"),
                3 => (a, "2x"),
                4 => (b, "3x"),
                5 => (a, "3x"),
                _ => (measurement.seconds, ""),
            };
            let rss = measurement
                .peak_rss_bytes
                .map(|bytes| format!("{:.1} MB", bytes as f64 / 1e6))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:>10} {:<28} {:>9.2} {:>11.0} {:>10} {:>10.2}x {:>7}",
                rows,
                case,
                measurement.seconds,
                rows as f64 / measurement.seconds,
                rss,
                measurement.seconds / base,
                target
            );
        }
    }
    Ok(())
}

/// The sample, and a copy with every hundredth row's name in capitals.
fn ensure_files(first: &Path, second: &Path, rows: u64) -> anyhow::Result<()> {
    if first.exists() && second.exists() {
        return Ok(());
    }
    dsa_ingest::sample::ensure_sample_csv(first, rows, 1)?;
    std::fs::create_dir_all(second.parent().unwrap())?;
    // A record starts with `{id},user`; a note's second line never does.
    let reader = std::io::BufReader::new(std::fs::File::open(first)?);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(second)?);
    for line in reader.lines() {
        let line = line?;
        let changed = line.split_once(",user").and_then(|(id, rest)| {
            let id: u64 = id.parse().ok()?;
            id.is_multiple_of(100).then(|| format!("{id},USER{rest}"))
        });
        writeln!(out, "{}", changed.as_deref().unwrap_or(&line))?;
    }
    out.into_inner()?.sync_all()?;
    Ok(())
}

fn check_summary(line: &str, rows: u64) -> anyhow::Result<()> {
    let value: serde_json::Value = serde_json::from_str(line.trim())?;
    let changed = value["summary"]["changed"].as_u64().unwrap_or(0);
    if changed != rows / 100 {
        bail!("expected {} changed rows, got {line}", rows / 100);
    }
    Ok(())
}

fn last_line(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().last().unwrap_or_default().to_owned())
}

async fn vacuum(database_url: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    for table in ["dsa_core.rows", "dsa_core.commit_rows", "public.baseline"] {
        sqlx::query(&format!("VACUUM ANALYZE {table}"))
            .execute(&pool)
            .await?;
    }
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    pool.close().await;
    Ok(())
}

fn time_psql(database_url: &str, command: &str) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let output = Command::new("psql")
        .args([database_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", command])
        .output()?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(Measurement {
        seconds,
        peak_rss_bytes: None,
    })
}

/// Runs a command as a whole process; stdout to `stdout_file` or kept and returned.
fn time(
    binary: &Path,
    database_url: &str,
    args: &[&str],
    stdout_file: Option<&Path>,
) -> anyhow::Result<(Measurement, String)> {
    let started = Instant::now();
    let (stdout, stderr) = run(binary, database_url, args, stdout_file)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_bytes = stderr.split("peak_rss_bytes=").nth(1).and_then(|rest| {
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    });
    Ok((
        Measurement {
            seconds,
            peak_rss_bytes,
        },
        stdout,
    ))
}

fn run(
    binary: &Path,
    database_url: &str,
    args: &[&str],
    stdout_file: Option<&Path>,
) -> anyhow::Result<(String, String)> {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn,dsa_ingest::cli=debug");
    match stdout_file {
        Some(path) => command.stdout(Stdio::from(std::fs::File::create(path)?)),
        None => command.stdout(Stdio::piped()),
    };
    let output = command.stderr(Stdio::piped()).output()?;
    if !output.status.success() {
        bail!(
            "dsa-ingest {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

fn median(mut measurements: Vec<Measurement>) -> Measurement {
    measurements.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    measurements.swap_remove(measurements.len() / 2)
}
