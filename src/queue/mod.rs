//! The broker-driven processes and the broker edge they share.
//!
//! `consume` turns import messages into imports, `relay` publishes what the outbox holds,
//! `maintain` refreshes the search view and
//! runs the `sweeper` of abandoned runs and reports the `backlog` (queue depths, unsent
//! outbox rows) in its metrics; `amqp` is the one place that talks to RabbitMQ and
//! `messages` the one place that knows the bodies.

pub mod amqp;
pub mod backlog;
pub mod consume;
pub mod maintain;
pub mod messages;
pub mod relay;
pub mod sweeper;
