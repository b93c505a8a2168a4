//! The import benchmark: for each row count, in one run on the local services,
//! - `psql \copy` of the file into a plain ten-text-column table (the baseline),
//! - the first import of the file into an empty store (every row new),
//! - a second import of the same file (every row already stored),
//!
//! each timed as a whole process, the median of `--repeat` runs, with the import's peak
//! RSS, the WAL each step wrote per row (`pg_stat_wal`) and the import's own per-stage
//! timings. Sizes are given as row counts (`--rows`) or file sizes (`--size 5GiB`);
//! before each size the free space of the file's directory and of the server's data
//! directory is checked against what the run needs. Run it with `scripts/bench`.
//!
//! and, with `--parallel-rows N`, four files of N rows imported in one process one after
//! another and then `IMPORT_PARALLEL_WORKERS` at a time.
//!
//! `cargo run --release --example bench -- [--rows N]... [--size SIZE]... [--repeat R]
//! [--parallel-rows N] [--keyed] [--gzip]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use aws_sdk_s3::primitives::ByteStream;
use dsa_ingest::config::Settings;
use dsa_ingest::db::DatasetName;
use dsa_ingest::import::run::ImportParameters;
use dsa_ingest::import::run::SourceLocation;
use dsa_ingest::import::{ImportSummary, Importer};
use futures::StreamExt;

#[path = "support/mod.rs"]
mod support;

const BENCH_DATABASE: &str = "dsa_bench";

struct Measurement {
    seconds: f64,
    summary: Option<ImportSummary>,
    /// WAL the server wrote during the step (`pg_stat_wal.wal_bytes`, whole cluster).
    wal_bytes: Option<u64>,
}

/// The import benchmark's options.
#[derive(clap::Parser)]
struct Args {
    /// Rows of a file to measure (repeat for several sizes; `_` separators allowed).
    /// Without `--rows` or `--size`, 1,000,000.
    #[arg(long = "rows", value_parser = support::parse_count)]
    row_counts: Vec<u64>,
    /// A file size to measure, as rows of the sample (about 100 bytes each): one of
    /// the presets 10MB, 100MB, 200MB, 1GB, 5GiB (repeatable; measured after `--rows`).
    #[arg(long = "size", value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Runs of each measurement; the median is printed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also import four files of this many rows, one after another and in parallel.
    #[arg(long, value_parser = support::parse_count, default_value = "0")]
    parallel_rows: u64,
    /// Also measure keyed imports at each size: a keyed replace against a positional
    /// one, and an upsert and an append of 10,000 rows into the keyed dataset against
    /// a server-side copy of its commit_rows.
    #[arg(long)]
    keyed: bool,
    /// Also import the file gzip-compressed: a first import into an empty store, beside
    /// the uncompressed first import.
    #[arg(long)]
    gzip: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        mut row_counts,
        sizes,
        repeat,
        parallel_rows,
        keyed,
        gzip,
    } = clap::Parser::parse();
    row_counts.extend(sizes);
    if row_counts.is_empty() {
        row_counts.push(1_000_000);
    }
    let settings = Settings::from_env()?;
    let bucket = settings
        .s3
        .bucket
        .clone()
        .context("S3_BUCKET must name the bench bucket")?;
    let binary = support::sibling_binary("dsa-ingest")?;
    let database_url =
        support::recreate_database(settings.database_url.expose(), BENCH_DATABASE).await?;
    run(&binary, &database_url, &["migrate"])?;
    let s3 = dsa_ingest::s3::client(&settings.s3).await;
    let wal = WalMeter::connect(&database_url).await?;
    println!("server: {}", server_settings(&wal.pool).await?);

    println!(
        "{:>10} {:<14} {:>9} {:>11} {:>8} {:>10} {:>11} {:>10}",
        "rows", "case", "seconds", "rows/s", "MB/s", "peak RSS", "x baseline", "WAL B/row"
    );
    let mut stage_lines = Vec::new();
    for rows in row_counts {
        let path = PathBuf::from(format!("target/bench/sample-{rows}.csv"));
        check_disk_space(&wal, &path, rows, gzip, keyed).await?;
        println!("{:>10} load average before: {}", rows, load_average());
        let bytes = dsa_ingest::sample::ensure_sample_csv(&path, rows, 1)?;
        let key = format!("bench/sample-{rows}.csv");
        upload(&s3, &bucket, &key, &path, bytes).await?;
        let source = format!("s3://{bucket}/{key}");
        let gzip_source = if gzip {
            let gz_path = path.with_extension("csv.gz");
            let gz_bytes = ensure_gzip(&path, &gz_path)?;
            let gz_key = format!("{key}.gz");
            upload(&s3, &bucket, &gz_key, &gz_path, gz_bytes).await?;
            Some(format!("s3://{bucket}/{gz_key}"))
        } else {
            None
        };
        if keyed {
            keyed_modes(&binary, &database_url, &source, rows, repeat).await?;
        }

        let mut baseline = Vec::new();
        let mut first = Vec::new();
        let mut second = Vec::new();
        let mut compressed = Vec::new();
        for round in 0..repeat {
            dsa_ingest::sample::reset_bench_store(&database_url).await?;
            baseline.push(wal.around(|| time_psql_copy(&database_url, &path)).await?);
            // Only its time is needed; at 50M rows its 5 GB are better left to the imports.
            time_psql(&database_url, "TRUNCATE public.baseline")?;
            let dataset = format!("bench-{rows}-{round}");
            first.push(
                wal.around(|| time_import(&binary, &database_url, &dataset, &source))
                    .await?,
            );
            second.push(
                wal.around(|| time_import(&binary, &database_url, &dataset, &source))
                    .await?,
            );
            if let Some(gzip_source) = &gzip_source {
                dsa_ingest::sample::reset_bench_store(&database_url).await?;
                let dataset = format!("bench-{rows}-{round}-gzip");
                compressed.push(
                    wal.around(|| time_import(&binary, &database_url, &dataset, gzip_source))
                        .await?,
                );
            }
        }
        let baseline = median(baseline);
        let base_seconds = baseline.seconds;
        let mut cases = vec![
            ("psql \\copy", baseline),
            ("first import", median(first)),
            ("second import", median(second)),
        ];
        if !compressed.is_empty() {
            cases.push(("gzip import", median(compressed)));
        }
        for (case, measurement) in cases {
            let rss = measurement
                .summary
                .as_ref()
                .map(|summary| format!("{:.1} MB", summary.peak_rss_bytes as f64 / 1e6))
                .unwrap_or_else(|| "-".into());
            let wal_per_row = measurement
                .wal_bytes
                .map(|wal_bytes| format!("{:.0}", wal_bytes as f64 / rows as f64))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:>10} {:<14} {:>9.2} {:>11.0} {:>8.1} {:>10} {:>10.2}x {:>10}",
                rows,
                case,
                measurement.seconds,
                rows as f64 / measurement.seconds,
                bytes as f64 / 1e6 / measurement.seconds,
                rss,
                measurement.seconds / base_seconds,
                wal_per_row
            );
            if let Some(summary) = &measurement.summary {
                stage_lines.push(format!(
                    "{rows:>10} {case:<14} {}",
                    serde_json::to_string(&summary.timings)?
                ));
            }
        }
        println!(
            "{:>10} {:.0} bytes a row; the database holds {:.2} bytes per file byte; load average after: {}",
            rows,
            bytes as f64 / rows as f64,
            wal.database_size().await? as f64 / bytes as f64,
            load_average()
        );
    }
    println!("\nwhere the time goes (milliseconds, from the import's own clocks):");
    for line in stage_lines {
        println!("{line}");
    }

    if parallel_rows > 0 {
        job_parallelism(&settings, &s3, &bucket, &database_url, parallel_rows).await?;
    }
    Ok(())
}

/// Keyed imports of the `rows`-row sample (its `id` column is unique): a keyed replace
/// beside a positional one, then an upsert (5,000 changed rows and 5,000 new ones) and
/// an append (10,000 new rows) into the keyed dataset, beside the baseline the issue
/// names: a server-side `INSERT ... SELECT` of the dataset's commit_rows into a table.
async fn keyed_modes(
    binary: &Path,
    database_url: &str,
    source: &str,
    rows: u64,
    repeat: usize,
) -> anyhow::Result<()> {
    let dir = PathBuf::from("target/bench");
    let delta = |name: &str, ids: &mut dyn Iterator<Item = u64>| -> anyhow::Result<String> {
        let path = dir.join(format!("{name}-{rows}.csv"));
        let mut text = format!("{}\n", dsa_ingest::sample::SAMPLE_HEADER);
        for id in ids {
            text.push_str(&format!(
                "{id},changed{id},c{id}@example.com,Oslo,NO,{}.00,active,2026-11-29,{id:08x},delta\n",
                id % 1000
            ));
        }
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    };
    let upsert = delta("upsert", &mut (1..=5_000).chain(rows + 1..=rows + 5_000))?;
    let append = delta("append", &mut (rows + 10_001..=rows + 20_000))?;
    let (mut positional, mut keyed, mut copies, mut upserts, mut appends) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut indexed_copies = Vec::new();
    for round in 0..repeat {
        dsa_ingest::sample::reset_bench_store(database_url).await?;
        positional.push(time_import(
            binary,
            database_url,
            &format!("pos-{round}"),
            source,
        )?);
        // The keyed import starts from an empty store too, or it would find every row
        // stored by the positional one.
        dsa_ingest::sample::reset_bench_store(database_url).await?;
        let dataset = format!("keyed-{round}");
        let started = Instant::now();
        run(
            binary,
            database_url,
            &[
                "import",
                "--dataset",
                &dataset,
                "--key",
                "id",
                source,
                "--json",
            ],
        )?;
        keyed.push(started.elapsed().as_secs_f64());
        let copy = format!(
            "CREATE TABLE IF NOT EXISTS public.scratch_commit_rows (LIKE dsa_core.commit_rows);
             TRUNCATE public.scratch_commit_rows;
             INSERT INTO public.scratch_commit_rows
             SELECT c.* FROM dsa_core.commit_rows c
               JOIN dsa_core.refs r ON r.commit_id = c.commit_id AND r.name = 'main'
               JOIN dsa_core.datasets d ON d.id = r.dataset_id AND d.name = '{dataset}';"
        );
        copies.push(time_psql(database_url, &copy)?);
        // The same copy into a table with commit_rows' primary key: what carrying the
        // parent's rows into the new version costs at least, whatever the merge does.
        indexed_copies.push(time_psql(
            database_url,
            &copy
                .replace("scratch_commit_rows", "scratch_commit_rows_pk")
                .replace(
                    "(LIKE dsa_core.commit_rows)",
                    "(LIKE dsa_core.commit_rows INCLUDING ALL)",
                ),
        )?);
        for (mode, file, times) in [
            ("upsert", &upsert, &mut upserts),
            ("append", &append, &mut appends),
        ] {
            let started = Instant::now();
            run(
                binary,
                database_url,
                &[
                    "import",
                    "--dataset",
                    &dataset,
                    "--mode",
                    mode,
                    file,
                    "--json",
                ],
            )?;
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let middle = |mut values: Vec<f64>| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    let positional = median(positional).seconds;
    let keyed = middle(keyed);
    let copy = middle(copies);
    println!("\nkeyed imports, {rows} rows (medians of {repeat}):");
    println!("  positional replace {positional:>8.2} s");
    println!(
        "  keyed replace      {keyed:>8.2} s  {:.2}x the positional replace",
        keyed / positional
    );
    let indexed = middle(indexed_copies);
    println!("  INSERT ... SELECT of the dataset's commit_rows {copy:>8.2} s (baseline)");
    println!("    the same into a table with commit_rows' primary key {indexed:>8.2} s");
    for (mode, times) in [("upsert 10,000", upserts), ("append 10,000", appends)] {
        let seconds = middle(times);
        println!(
            "  {mode:<18} {seconds:>8.2} s  {:.2}x the baseline, {:.2}x the indexed copy",
            seconds / copy,
            seconds / indexed
        );
    }
    Ok(())
}

/// Runs `sql` with psql and returns the seconds it took.
fn time_psql(database_url: &str, sql: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = Command::new("psql")
        .args([database_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()?;
    if !output.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Four files imported in one process, one after another and then
/// `IMPORT_PARALLEL_WORKERS` at a time, each into an empty store.
async fn job_parallelism(
    settings: &Settings,
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    database_url: &str,
    rows: u64,
) -> anyhow::Result<()> {
    let mut sources = Vec::new();
    for seed in 1..=4 {
        let path = PathBuf::from(format!("target/bench/sample-{rows}-seed{seed}.csv"));
        let bytes = dsa_ingest::sample::ensure_sample_csv(&path, rows, seed)?;
        let key = format!("bench/sample-{rows}-seed{seed}.csv");
        upload(s3, bucket, &key, &path, bytes).await?;
        sources.push(SourceLocation::S3 {
            bucket: bucket.to_owned(),
            key,
        });
    }
    let workers = settings.parallel_workers;
    println!("\njob-level parallelism: 4 files of {rows} rows in one process");
    println!("{:>8} {:>9} {:>11}", "workers", "seconds", "rows/s");
    for concurrency in [1, workers] {
        dsa_ingest::sample::reset_bench_store(database_url).await?;
        let pool = dsa_ingest::db::connect(
            database_url,
            settings.import.connections_per_import() * concurrency as u32 + 4,
        )
        .await?;
        let importer = Importer::new(pool, Some(s3.clone()), settings.import.clone());
        let mut runs = Vec::new();
        for (index, source) in sources.iter().enumerate() {
            let parameters = ImportParameters {
                source: source.clone(),
                expected_etag: None,
                options: dsa_ingest::import::run::ImportOptions {
                    ..Default::default()
                },
            };
            let dataset = DatasetName::parse(&format!("parallel-{index}"))?;
            runs.push(importer.create_run(&dataset, None, &parameters).await?.0);
        }
        let started = Instant::now();
        let results: Vec<_> = futures::stream::iter(runs)
            .map(|run_id| {
                let importer = importer.clone();
                async move { importer.run(run_id).await }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let seconds = started.elapsed().as_secs_f64();
        for result in results {
            result?;
        }
        println!(
            "{concurrency:>8} {seconds:>9.2} {:>11.0}",
            4.0 * rows as f64 / seconds
        );
    }
    Ok(())
}

/// Writes `path` gzip-compressed (default level) to `gz_path` once; returns its size.
fn ensure_gzip(path: &Path, gz_path: &Path) -> anyhow::Result<u64> {
    if !gz_path.exists() {
        let partial = gz_path.with_extension("partial");
        let mut encoder = flate2::write::GzEncoder::new(
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial)?),
            flate2::Compression::default(),
        );
        std::io::copy(&mut std::fs::File::open(path)?, &mut encoder)?;
        encoder.finish()?.into_inner()?.sync_all()?;
        std::fs::rename(&partial, gz_path)?;
    }
    Ok(std::fs::metadata(gz_path)?.len())
}

async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    bytes: u64,
) -> anyhow::Result<()> {
    let existing = s3.head_object().bucket(bucket).key(key).send().await;
    if existing.is_ok_and(|head| head.content_length() == Some(bytes as i64)) {
        return Ok(());
    }
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_path(path).await?)
        .send()
        .await
        .with_context(|| format!("uploading s3://{bucket}/{key}"))?;
    Ok(())
}

fn time_psql_copy(database_url: &str, path: &Path) -> anyhow::Result<Measurement> {
    let copy = format!(
        "\\copy public.baseline FROM '{}' WITH (FORMAT csv, HEADER true)",
        path.display()
    );
    let started = Instant::now();
    let output = Command::new("psql")
        .args([database_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", &copy])
        .output()?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(Measurement {
        seconds,
        summary: None,
        wal_bytes: None,
    })
}

fn time_import(
    binary: &Path,
    database_url: &str,
    dataset: &str,
    source: &str,
) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let stdout = run(
        binary,
        database_url,
        &["import", "--dataset", dataset, source, "--json"],
    )?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Measurement {
        seconds,
        summary: Some(serde_json::from_slice(&stdout)?),
        wal_bytes: None,
    })
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

fn median(mut measurements: Vec<Measurement>) -> Measurement {
    measurements.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    measurements.swap_remove(measurements.len() / 2)
}

/// The presets `--size` takes, as rows of the sample generator (about 100 bytes a row,
/// a little more as the ids grow): the 5 GiB preset stays under the default
/// `IMPORT_MAX_FILE_SIZE` of 5 GiB.
const SIZE_PRESETS: [(&str, u64); 5] = [
    ("10MB", 100_000),
    ("100MB", 1_000_000),
    ("200MB", 2_000_000),
    ("1GB", 10_000_000),
    ("5GiB", 50_000_000),
];

fn parse_size(text: &str) -> Result<u64, String> {
    SIZE_PRESETS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|&(_, rows)| rows)
        .ok_or_else(|| {
            let names: Vec<&str> = SIZE_PRESETS.iter().map(|(name, _)| *name).collect();
            format!(
                "{text:?} is not a size preset; use one of {} (or --rows N)",
                names.join(", ")
            )
        })
}

/// What one size of the benchmark stores, per byte of its CSV file, with some room:
/// `dsa_core.rows` with its index and two commits of `commit_rows` with theirs (the
/// baseline table is emptied once timed; with it, 10.3 at 1M rows and 10.67 at 50M;
/// the run prints the database's own figure after each size).
const DATABASE_BYTES_PER_FILE_BYTE: f64 = 11.0;
/// The sample file is about this many bytes a row at most (ids grow with the count).
const MAX_FILE_BYTES_PER_ROW: u64 = 110;

/// Refuses to start a size whose files would not fit: the CSV (and its gzip copy)
/// in `path`'s directory, and the tables plus what `max_wal_size` lets the WAL grow
/// beyond the segments kept already, in the server's data directory, when that
/// directory is on this machine.
async fn check_disk_space(
    wal: &WalMeter,
    path: &Path,
    rows: u64,
    gzip: bool,
    keyed: bool,
) -> anyhow::Result<()> {
    let file_bytes = rows * MAX_FILE_BYTES_PER_ROW;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let local_need = if path.exists() {
        0
    } else {
        file_bytes + if gzip { file_bytes / 3 } else { 0 }
    };
    let data_directory: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(&wal.pool)
        .await?;
    let max_wal: i64 = sqlx::query_scalar("SELECT pg_size_bytes(current_setting('max_wal_size'))")
        .fetch_one(&wal.pool)
        .await?;
    // WAL segments the server keeps already (recycled ones included) are taken from the
    // free space now, so only the rest of `max_wal_size` is still to come. Reading
    // the WAL directory needs pg_monitor or a superuser; without, all of it counts.
    let kept_wal: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(size), 0)::bigint FROM pg_ls_waldir()")
            .fetch_one(&wal.pool)
            .await
            .unwrap_or(0);
    let wal_to_come = max_wal.saturating_sub(kept_wal).max(0) as u64;
    // The keyed run holds a second dataset's commit_rows beside the first.
    let factor = DATABASE_BYTES_PER_FILE_BYTE + if keyed { 2.0 } else { 0.0 };
    let database_need = (file_bytes as f64 * factor) as u64 + wal_to_come;
    let gb = |bytes: u64| bytes as f64 / 1e9;
    let mut short = Vec::new();
    let local_free = free_bytes(dir)?;
    if local_free < local_need {
        short.push(format!(
            "{} has {:.1} GB free, the sample file needs {:.1} GB",
            dir.display(),
            gb(local_free),
            gb(local_need)
        ));
    }
    let database_free = match free_bytes(Path::new(&data_directory)) {
        Ok(free) => Some(free),
        Err(error) => {
            println!(
                "{rows:>10} cannot check the free space of the server's data directory \
                 {data_directory} ({error}); it needs about {:.1} GB",
                gb(database_need)
            );
            None
        }
    };
    if let Some(free) = database_free {
        // On one file system both needs come out of the same free space.
        let same = free == local_free;
        let need = database_need + if same { local_need } else { 0 };
        if free < need {
            short.push(format!(
                "the data directory {data_directory} has {:.1} GB free, the run needs {:.1} GB \
                 (tables {:.1} GB, max_wal_size {:.1} GB less {:.1} GB of WAL kept already{})",
                gb(free),
                gb(need),
                gb(need - wal_to_come - if same { local_need } else { 0 }),
                gb(max_wal as u64),
                gb(max_wal.saturating_sub(wal_to_come as i64) as u64),
                if same {
                    ", and the sample file on the same file system"
                } else {
                    ""
                }
            ));
        }
    }
    println!(
        "{rows:>10} needs about {:.1} GB for the sample file and {:.1} GB in the database \
         (the S3 store keeps a copy of the file too, wherever it keeps its data)",
        gb(local_need),
        gb(database_need)
    );
    if !short.is_empty() {
        bail!(
            "not enough disk space for {rows} rows: {}",
            short.join("; ")
        );
    }
    Ok(())
}

/// Free bytes (for an unprivileged user) of the file system holding `path`.
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path_c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path_c` is a valid C string and `stats` a writable statvfs.
    let result = unsafe { libc::statvfs(path_c.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: statvfs succeeded, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    // Both are u64 on 64-bit Linux and narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// The machine's load averages (1, 5 and 15 minutes), to read the figures beside.
/// The server settings the figures depend on most, to print beside them.
async fn server_settings(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    let settings: String = sqlx::query_scalar(
        "SELECT string_agg(name || ' ' || current_setting(name), ', ' ORDER BY name)
           FROM pg_settings
          WHERE name IN ('autovacuum', 'max_wal_size', 'shared_buffers', 'wal_compression')",
    )
    .fetch_one(pool)
    .await?;
    Ok(settings)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// Reads the server's WAL counter around a step. `pg_stat_wal` counts the whole
/// cluster, so other work on the server during a step counts too; a quiet server is
/// needed for the figure to be the step's own.
struct WalMeter {
    pool: sqlx::PgPool,
    database: String,
}

impl WalMeter {
    async fn connect(database_url: &str) -> anyhow::Result<Self> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await?;
        let database = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await?;
        Ok(Self { pool, database })
    }

    /// Runs `step` (a whole process that connects to the bench database) and adds the
    /// WAL the server wrote meanwhile to its measurement.
    async fn around(
        &self,
        step: impl FnOnce() -> anyhow::Result<Measurement>,
    ) -> anyhow::Result<Measurement> {
        self.wait_for_other_sessions().await?;
        let before = self.wal_bytes().await?;
        let mut measurement = step()?;
        self.wait_for_other_sessions().await?;
        let after = self.wal_bytes().await?;
        measurement.wal_bytes = Some(after.saturating_sub(before));
        Ok(measurement)
    }

    async fn wal_bytes(&self) -> anyhow::Result<u64> {
        let bytes: i64 = sqlx::query_scalar("SELECT wal_bytes::bigint FROM pg_stat_wal")
            .fetch_one(&self.pool)
            .await?;
        Ok(bytes as u64)
    }

    async fn database_size(&self) -> anyhow::Result<u64> {
        let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&self.pool)
            .await?;
        Ok(bytes as u64)
    }

    /// A session reports its WAL to `pg_stat_wal` when it ends, before it leaves
    /// `pg_stat_activity`; a process that exited may still have its session ending on
    /// the server. Waiting until the bench database has no client session but this one
    /// makes the counter include everything the step wrote. Autovacuum workers are not
    /// waited for: at 50M rows they work on the tables for minutes after an import.
    async fn wait_for_other_sessions(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let others: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = $1 AND pid <> pg_backend_pid()
                    AND backend_type = 'client backend'",
            )
            .bind(&self.database)
            .fetch_one(&self.pool)
            .await?;
            if others == 0 {
                return Ok(());
            }
            if started.elapsed().as_secs() > 30 {
                bail!(
                    "{others} sessions of {} did not end within 30 s",
                    self.database
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
