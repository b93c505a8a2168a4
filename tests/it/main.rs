//! Integration tests: the real PostgreSQL, RabbitMQ and S3 store; one database, bucket
//! and set of queues per test.

mod allowlists;
mod broker;
mod broker_wide;
mod consume;
mod faults;
mod fetch;
mod formats;
mod helpers;
mod history;
mod import;
mod keys;
mod limits;
mod links;
mod maintenance;
mod metrics;
mod process;
mod proxy;
mod publish;
mod resume;
mod schemas;
mod serve;
mod sheets;
mod submit;
mod sweeper;
mod watch;
