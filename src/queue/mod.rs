//! The broker-driven processes and the broker edge they share.
//!
//! `consume` turns import messages into imports, `relay` publishes what the outbox holds,
//! `maintain` refreshes the search view and
//! runs the `sweeper` of abandoned runs; `amqp` is the one place that talks to RabbitMQ
//! and `messages` the one place that knows the bodies.

pub mod amqp;
pub mod consume;
pub mod maintain;
pub mod messages;
pub mod relay;
pub mod sweeper;
