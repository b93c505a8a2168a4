//! dsa-ingest: streams CSV and spreadsheet files from S3-compatible storage (or a local path) into a
//! git-like versioned dataset in PostgreSQL. See ARCHITECTURE.md for the map.
//!
//! The folders follow the architecture: `import/` is the pipeline (one file per stage),
//! `queue/` the broker-driven processes, `watch/` the bucket watcher, `cli/` the command
//! line. The files at this level
//! are what all of them share: settings, the database, the store, the run lifecycle,
//! metrics and the HTTP server of the long-running commands.

pub mod cli;
pub mod config;
pub mod db;
pub mod history;
pub mod http;
pub mod import;
pub mod metrics;
pub mod outbox;
pub mod policy;
pub mod process;
pub mod queue;
pub mod runs;
pub mod s3;
pub mod sample;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod watch;
