//! Integration tests: the real PostgreSQL and S3 store, one database and bucket per test.

mod fetch;
mod helpers;
mod import;
mod resume;
mod sheets;
