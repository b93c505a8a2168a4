//! dsa-ingest: streams CSV and spreadsheet files from S3-compatible storage (or a local path) into a
//! git-like versioned dataset in PostgreSQL. See ARCHITECTURE.md for the map.

pub mod amqp;
pub mod claim;
pub mod cli;
pub mod config;
pub mod consume;
pub mod db;
pub mod decode;
pub mod fetch;
pub mod finalise;
pub mod hash;
pub mod history;
pub mod import;
pub mod load;
pub mod maintain;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod relay;
pub mod s3;
pub mod sample;
pub mod sheet;
pub mod shutdown;
pub mod status;
pub mod submit;
pub mod telemetry;
