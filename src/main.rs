use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    dsa_ingest::process::keep_allocator_footprint_flat();
    dsa_ingest::telemetry::init();
    let cli = dsa_ingest::cli::Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    runtime.block_on(dsa_ingest::cli::run(cli))
}
