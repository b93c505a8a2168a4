use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    dsa_ingest::telemetry::init();
    dsa_ingest::cli::run(dsa_ingest::cli::Cli::parse()).await
}
