//! What the benchmark examples share: finding the binary they time, and a scratch
//! database for each run. Included by each example with `#[path]`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The `dsa-ingest` binary built beside this example (target/<profile>/).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let example = std::env::current_exe()?;
    let profile_dir = example
        .parent()
        .and_then(Path::parent)
        .context("the example runs from target/<profile>/examples")?;
    let binary = profile_dir.join(name);
    if !binary.exists() {
        bail!(
            "{} is missing: build it with cargo build --release --bins",
            binary.display()
        );
    }
    Ok(binary)
}

/// A fresh database beside the configured one, so the benchmark never touches real data.
pub async fn recreate_database(database_url: &str, name: &str) -> anyhow::Result<String> {
    let (base, _) = database_url
        .rsplit_once('/')
        .context("DATABASE_URL names a database")?;
    let admin = sqlx::PgPool::connect(&format!("{base}/postgres")).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    Ok(format!("{base}/{name}"))
}

/// A row count as people type it: `1000000` or `1_000_000`.
pub fn parse_count(text: &str) -> Result<u64, String> {
    text.replace('_', "")
        .parse()
        .map_err(|error| format!("{text:?} is not a count: {error}"))
}
