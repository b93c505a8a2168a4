//! Deterministic sample CSVs for the demo, the benchmark and the tests: ten columns of
//! mixed text, about 100 bytes a row, the same bytes for the same row count and seed.

use std::io::{self, Write};

/// The header of every sample file.
pub const SAMPLE_HEADER: &str = "id,name,email,city,country,amount,status,created,code,note";

const CITIES: [&str; 8] = [
    "Lisbon",
    "Zürich",
    "Kraków",
    "São Paulo",
    "Oslo",
    "Tōkyō",
    "Nairobi",
    "Québec",
];
const STATUSES: [&str; 4] = ["active", "pending", "closed", "on hold"];

/// Writes the `rows`-row sample to `path` once, for the benchmarks: beside it first,
/// then renamed, so a stopped run leaves no half file under the name. Returns its size.
pub fn ensure_sample_csv(path: &std::path::Path, rows: u64, seed: u64) -> io::Result<u64> {
    if !path.exists() {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let partial = path.with_extension("partial");
        let mut writer = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial)?);
        write_sample_csv(&mut writer, rows, seed)?;
        writer.into_inner()?.sync_all()?;
        std::fs::rename(&partial, path)?;
    }
    Ok(std::fs::metadata(path)?.len())
}

/// Writes a header and `rows` rows. Some notes carry commas, quotes or a line break,
/// so the files exercise CSV quoting the way real exports do.
pub fn write_sample_csv(out: &mut impl Write, rows: u64, seed: u64) -> io::Result<()> {
    writeln!(out, "{SAMPLE_HEADER}")?;
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    for id in 1..=rows {
        // SplitMix64: fast, and the same sequence on every machine.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let value = z ^ (z >> 31);
        let city = CITIES[(value % 8) as usize];
        let note = match value % 16 {
            0 => "\"said \"\"hello\"\", then left\"".to_owned(),
            1 => "\"two\nlines\"".to_owned(),
            _ => format!("note {}", value % 1_000_003),
        };
        writeln!(
            out,
            "{id},user{},user{}@example.com,{city},{},{}.{:02},{},2026-{:02}-{:02},{:08x},{note}",
            value % 100_000,
            value % 100_000,
            ["PT", "CH", "PL", "BR", "NO", "JP", "KE", "CA"][(value % 8) as usize],
            (value >> 8) % 100_000,
            (value >> 16) % 100,
            STATUSES[((value >> 20) % 4) as usize],
            (value >> 24) % 12 + 1,
            (value >> 28) % 28 + 1,
            (value >> 32) as u32,
        )?;
    }
    Ok(())
}

/// The sample as bytes, for tests.
pub fn sample_csv(rows: u64, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows as usize * 110 + 100);
    write_sample_csv(&mut out, rows, seed).expect("writing to a Vec cannot fail");
    out
}

/// Empties a benchmark's scratch store and recreates its baseline table (the sample's
/// ten columns as text), so each round's first import stores every row. The
/// benchmarks call it on their own scratch databases only.
pub async fn reset_bench_store(database_url: &str) -> Result<(), sqlx::Error> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    sqlx::query(
        "TRUNCATE dsa_core.rows, dsa_core.commit_rows, dsa_core.refs, dsa_core.commits,
                  dsa_jobs.analysis_runs, dsa_jobs.outbox CASCADE",
    )
    .execute(&pool)
    .await?;
    let columns: Vec<String> = SAMPLE_HEADER
        .split(',')
        .map(|name| format!("{name} text"))
        .collect();
    sqlx::query("DROP TABLE IF EXISTS public.baseline")
        .execute(&pool)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE public.baseline ({})",
        columns.join(", ")
    ))
    .execute(&pool)
    .await?;
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_about_a_hundred_bytes_a_row() {
        let a = sample_csv(1_000, 7);
        assert_eq!(a, sample_csv(1_000, 7));
        assert_ne!(a, sample_csv(1_000, 8));
        let per_row = a.len() / 1_000;
        assert!((80..=120).contains(&per_row), "{per_row} bytes a row");
    }
}
