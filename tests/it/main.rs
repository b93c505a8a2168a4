//! Integration tests: the real PostgreSQL and S3 store, one database and bucket per test.

mod broker;
mod consume;
mod fetch;
mod helpers;
mod import;
mod metrics;
mod process;
mod proxy;
mod resume;
mod schemas;
