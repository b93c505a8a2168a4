//! Writes a deterministic sample CSV to a file and optionally uploads it to S3.
//!
//! `cargo run --release --example sample_csv -- --rows 10000 --out target/sample.csv \
//!      [--upload s3://bucket/key] [--seed 1]`

use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::Context;
use aws_sdk_s3::primitives::ByteStream;
use dsa_ingest::config::Settings;
use dsa_ingest::import::run::SourceLocation;

/// The sample writer's options.
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    rows: u64,
    /// Samples with the same seed are byte for byte the same.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "target/sample.csv")]
    out: PathBuf,
    /// Also upload the file to this s3://bucket/key.
    #[arg(long)]
    upload: Option<SourceLocation>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        rows,
        seed,
        out,
        upload,
    } = clap::Parser::parse();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file =
        std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    dsa_ingest::sample::write_sample_csv(&mut writer, rows, seed)?;
    writer.into_inner()?.sync_all()?;
    let size = std::fs::metadata(&out)?.len();
    eprintln!("wrote {} ({rows} rows, {size} bytes)", out.display());

    if let Some(SourceLocation::S3 { bucket, key }) = upload {
        let settings = Settings::from_env()?;
        let client = dsa_ingest::s3::client(&settings.s3).await;
        if client.head_bucket().bucket(&bucket).send().await.is_err() {
            client
                .create_bucket()
                .bucket(&bucket)
                .send()
                .await
                .context("creating bucket")?;
        }
        client
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(ByteStream::from_path(&out).await?)
            .send()
            .await
            .with_context(|| format!("uploading to s3://{bucket}/{key}"))?;
        eprintln!("uploaded s3://{bucket}/{key}");
    }
    Ok(())
}
