//! `dsa-ingest consume`: import messages in, commits out, exactly once in effect.
//!
//! One replica holds one broker connection with one consuming channel, takes up to
//! `IMPORT_PARALLEL_WORKERS` deliveries at once (the prefetch and a semaphore agree),
//! and runs each with the import core. Exactly-once comes from the database, not the
//! broker: a run is claimed under a lease with a fencing token, a delivery for a
//! finished run is acknowledged without work, and the acknowledgement goes out only
//! after the finalising transaction committed. A redelivery therefore never imports
//! twice, and a lost acknowledgement costs one cheap look at the run.
//!
//! When the connection or channel goes away (broker restart, `consumer_timeout`, a
//! network cut), imports in flight keep running against the database; their
//! deliveries belong to the dead channel and are never acknowledged on the new one.
//! The broker redelivers them, and whoever receives one waits for the run (or resumes
//! it when its worker died) before acknowledging.

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::AmqpSettings;
use crate::db::{self, DatasetError, DatasetName};
use crate::http::Health;
use crate::import::run::SourceLocation;
use crate::import::run::{ImportOptions, ImportParameters};
use crate::import::{format_of_file_name, retry_backoff, ImportSummary, Importer, Outcome};
use crate::metrics::{format_label, metrics, AmqpOutcome, FailureReason};
use crate::policy::SourcePolicy;
use crate::queue::amqp::{self, AmqpError};
use crate::queue::messages::{self, CreatedObject, DatasetRef, ImportMessage, ImportRequest};
use crate::runs;

#[derive(Debug, Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What the consumer needs besides the broker: the import core and its settings.
#[derive(Clone)]
pub struct ConsumerSetup {
    pub importer: Importer,
    pub pool: PgPool,
    pub s3: Option<aws_sdk_s3::Client>,
    pub amqp: AmqpSettings,
    /// Imports at once in this process (prefetch and concurrency).
    pub workers: usize,
    /// `S3_EVENT_DATASET`: one dataset for every S3 event, overriding key and metadata.
    pub event_dataset: Option<DatasetName>,
    /// `S3_EVENT_DATASET_FROM_METADATA`: an event's object may name its dataset.
    pub event_dataset_from_metadata: bool,
    /// The allow-lists every source a message names must pass.
    pub policy: SourcePolicy,
    /// Told when the broker connection comes and goes (for `/readyz`).
    pub health: Health,
    /// Told after each completed import, so the outbox relay publishes at once.
    pub committed: Option<tokio::sync::mpsc::Sender<()>>,
}

/// How a delivery is settled once its work is done.
#[derive(Debug)]
enum Settle {
    /// Done: the run is completed or failed for good.
    Ack,
    /// Nothing to do: the run was finished already, or another worker took it over and
    /// its delivery settles it. Acknowledged like `Ack`, counted apart.
    Skipped,
    /// Refused for good (unreadable, names nothing, retries exhausted): the broker
    /// moves it to the dead-letter queue.
    DeadLetter(String),
    /// Not finished because this process is stopping; another consumer resumes it.
    Requeue,
}

/// Runs the consumer until `stop` is cancelled, then drains: no new deliveries, imports
/// in flight stop after their current batch (or at `shutdown_grace`), unacknowledged
/// deliveries go back to the queue when the connection closes.
pub async fn run(setup: ConsumerSetup, stop: CancellationToken) -> Result<(), ConsumeError> {
    let setup = Arc::new(setup);
    let permits = Arc::new(Semaphore::new(setup.workers));
    let tasks = TaskTracker::new();
    let mut reconnect = amqp::Reconnect::default();
    // Imports must not notice the stop before the consumer stops taking deliveries,
    // so they get their own token, cancelled once the subscription is gone.
    let stop_imports = CancellationToken::new();
    let importer = setup
        .importer
        .clone()
        .keep_runs_on_transient_failure()
        .stop_on(stop_imports.clone());
    // Held until the imports in flight are done: dropping the channel or its consumer
    // would close the channel, and with it every acknowledgement still to come.
    let mut last_session: Option<(Connection, Channel, lapin::Consumer)> = None;

    while !stop.is_cancelled() {
        let session = tokio::select! {
            session = subscribe(&setup) => session,
            _ = stop.cancelled() => break,
        };
        let (connection, channel, mut deliveries) = match session {
            Ok(session) => session,
            Err(error) if error.is_topology_mismatch() => {
                // Declaring again cannot succeed; a person must reconcile the settings
                // with what exists on the broker.
                return Err(ConsumeError::Amqp(error));
            }
            Err(error) => {
                if reconnect
                    .wait_after(&error, "broker unavailable", &stop)
                    .await
                {
                    continue;
                }
                break;
            }
        };
        reconnect.reset();
        setup.health.set_broker_connected(true);
        tracing::info!(
            queue = %setup.amqp.import_queue,
            workers = setup.workers,
            "consuming import messages"
        );

        loop {
            // While every worker is busy, look at the channel now and then, so a dead
            // one is replaced (and readiness reported) without waiting for a worker.
            let permit = loop {
                tokio::select! {
                    permit = permits.clone().acquire_owned() => {
                        break Some(permit.expect("the semaphore is never closed"));
                    }
                    _ = stop.cancelled() => break None,
                    _ = tokio::time::sleep(CHANNEL_CHECK_INTERVAL) => {
                        if !channel.status().connected() {
                            break None;
                        }
                    }
                }
            };
            let Some(permit) = permit else {
                if !stop.is_cancelled() {
                    tracing::warn!(
                        "the broker channel closed while every worker was busy; reconnecting"
                    );
                }
                break;
            };
            let next = tokio::select! {
                next = deliveries.next() => next,
                _ = stop.cancelled() => break,
            };
            match next {
                Some(Ok(delivery)) => {
                    let setup = Arc::clone(&setup);
                    let importer = importer.clone();
                    let channel = channel.clone();
                    tasks.spawn(async move {
                        handle(&setup, &importer, delivery, &channel).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "lost the broker channel; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("the broker ended the subscription; reconnecting");
                    break;
                }
            }
        }
        setup.health.set_broker_connected(false);
        if stop.is_cancelled() {
            // Stop the flow first, so the broker sends nothing more while imports wind
            // down; what it already sent and we did not start goes back with the close.
            let tag = deliveries.tag();
            if let Err(error) = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::debug!(error = %error, "cancelling the subscription");
            }
            last_session = Some((connection, channel, deliveries));
            break;
        }
        // The connection is dropped (closed) here; imports in flight continue.
        let _ = connection.close(200, "reconnecting".into()).await;
    }

    stop_imports.cancel();
    tasks.close();
    let grace = setup.amqp.shutdown_grace;
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "imports did not stop within the grace period; their runs resume from their last checkpoint"
        );
    }
    if let Some((connection, _channel, _deliveries)) = last_session {
        if let Err(error) = connection.close(200, "shutting down".into()).await {
            tracing::debug!(error = %error, "closing the broker connection");
        }
    }
    tracing::info!("consumer stopped");
    Ok(())
}

/// How often a consumer whose workers are all busy checks that its channel is alive.
const CHANNEL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Connects, declares the topology, and subscribes with a prefetch of `workers`.
async fn subscribe(
    setup: &ConsumerSetup,
) -> Result<(Connection, Channel, lapin::Consumer), AmqpError> {
    let connection = amqp::connect(&setup.amqp, "consume").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| AmqpError::Broker {
            action: "opening a channel",
            source,
        })?;
    amqp::declare_import_topology(&channel, &setup.amqp).await?;
    amqp::declare_maintenance_topology(&channel, &setup.amqp).await?;
    channel
        .basic_qos(
            setup.workers.min(u16::MAX as usize) as u16,
            BasicQosOptions::default(),
        )
        .await
        .map_err(|source| AmqpError::Broker {
            action: "setting the prefetch",
            source,
        })?;
    let consumer = channel
        .basic_consume(
            setup.amqp.import_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Broker {
            action: "subscribing to the import queue",
            source,
        })?;
    Ok((connection, channel, consumer))
}

/// Works one delivery to its end and settles it on the channel it came from.
async fn handle(setup: &ConsumerSetup, importer: &Importer, delivery: Delivery, channel: &Channel) {
    let span = tracing::info_span!(
        "delivery",
        delivery.tag = delivery.delivery_tag,
        redelivered = delivery.redelivered
    );
    let settle = process(setup, importer, &delivery.data, channel)
        .instrument(span.clone())
        .await;
    metrics().amqp_outcome(match &settle {
        Settle::Ack => AmqpOutcome::Ack,
        Settle::Skipped => AmqpOutcome::Skipped,
        Settle::DeadLetter(_) => AmqpOutcome::DeadLetter,
        Settle::Requeue => AmqpOutcome::Requeue,
    });
    let acker = &delivery.acker;
    let settled = match &settle {
        Settle::Ack | Settle::Skipped => acker.ack(BasicAckOptions::default()).await,
        Settle::DeadLetter(reason) => {
            tracing::error!(parent: &span, reason = %reason, "message dead-lettered");
            acker.reject(BasicRejectOptions { requeue: false }).await
        }
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    match settled {
        Ok(true) => tracing::debug!(parent: &span, outcome = ?settle, "delivery settled"),
        // The channel the delivery came on is gone; its tag means nothing on any other
        // channel. The broker redelivers the message and the run's state settles it.
        Ok(false) => tracing::info!(
            parent: &span,
            outcome = ?settle,
            "the delivery's channel closed before it was settled; the broker redelivers it"
        ),
        Err(error) => {
            tracing::warn!(parent: &span, error = %error, "could not settle the delivery")
        }
    }
}

async fn process(
    setup: &ConsumerSetup,
    importer: &Importer,
    body: &[u8],
    channel: &Channel,
) -> Settle {
    let message = match messages::parse(body) {
        Ok(message) => message,
        Err(error) => return Settle::DeadLetter(error.to_string()),
    };
    // Resolving the runs is retried here, with backoff, rather than by requeueing:
    // a requeue comes straight back, and brokers differ in whether it counts toward
    // the delivery limit. Each streak of failures gets the whole budget: a success
    // ends the streak.
    let mut retries: Option<ExponentialBackoff> = None;
    let runs = loop {
        match runs_for(setup, &message).await {
            Ok(runs) => {
                retries = None;
                break runs;
            }
            Err(Refusal::DeadLetter(reason)) => return Settle::DeadLetter(reason),
            Err(Refusal::Transient(error)) => {
                let what = "cannot resolve the message's runs yet";
                if let Err(settle) = back_off(setup, importer, &mut retries, &error, what).await {
                    return settle;
                }
            }
        }
    };
    let no_runs = runs.is_empty();
    let mut worked = false;
    for run_id in runs {
        // Retried here like the resolving above: a requeue would come straight back,
        // and through an outage longer than a few deliveries the broker's delivery
        // limit would dead-letter the message.
        let format = loop {
            match refuse_unless_allowed(setup, run_id).await {
                Ok(format) => {
                    retries = None;
                    break format;
                }
                Err(error) => {
                    let what = "cannot check the run's source yet";
                    if let Err(settle) = back_off(setup, importer, &mut retries, &error, what).await
                    {
                        return settle;
                    }
                }
            }
        };
        match import_to_end(setup, importer, run_id, format, channel).await {
            Settle::Ack => worked = true,
            Settle::Skipped => {}
            other => return other,
        }
    }
    // A message whose every run needed nothing (a redelivery of finished work) is
    // counted as skipped.
    if worked || no_runs {
        Settle::Ack
    } else {
        Settle::Skipped
    }
}

/// Fails an unfinished run whose source the allow-lists refuse, naming the rule,
/// before a byte of it is read; the import that follows then finds the run failed and
/// the message is acknowledged. Returns the run's `format` label for the metrics, from
/// its file name ("other" for a run that is finished or unreadable).
async fn refuse_unless_allowed(
    setup: &ConsumerSetup,
    run_id: Uuid,
) -> Result<&'static str, sqlx::Error> {
    let Some(parameters) = runs::unfinished_parameters(&setup.pool, run_id).await? else {
        return Ok("other");
    };
    let format = format_label(format_of_file_name(parameters.source.file_name()));
    if let Err(refused) = setup.policy.check(&parameters.source) {
        metrics().record_import_failed(format, FailureReason::Refused);
        tracing::warn!(run.id = %run_id, reason = %refused, "source refused");
        runs::fail_run(&setup.pool, run_id, None, &refused.to_string()).await?;
    }
    Ok(format)
}

enum Refusal {
    DeadLetter(String),
    Transient(String),
}

impl From<sqlx::Error> for Refusal {
    fn from(error: sqlx::Error) -> Self {
        Refusal::Transient(error.to_string())
    }
}

/// The runs a message stands for, created where the message asks for them.
async fn runs_for(setup: &ConsumerSetup, message: &ImportMessage) -> Result<Vec<Uuid>, Refusal> {
    match message {
        ImportMessage::Run(run_id) => match runs::exists(&setup.pool, *run_id).await? {
            true => Ok(vec![*run_id]),
            false => Err(Refusal::DeadLetter(format!(
                "run {run_id} does not exist in this database"
            ))),
        },
        ImportMessage::Request(request) => Ok(vec![run_for_request(setup, request).await?]),
        ImportMessage::ObjectsCreated(objects) => {
            let mut runs = Vec::with_capacity(objects.len());
            for object in objects {
                match run_for_object(setup, object).await {
                    Ok(run_id) => runs.push(run_id),
                    // One unusable record must not strand the others: it gets a failed
                    // run of its own that says why, and the rest are imported.
                    Err(Refusal::DeadLetter(reason)) => {
                        let run_id = failed_keyed_run(
                            setup,
                            &object.idempotency_key(),
                            &object_parameters(object),
                            None,
                            &reason,
                        )
                        .await?;
                        tracing::warn!(run.id = %run_id, reason = %reason, "S3 event record refused");
                    }
                    Err(transient) => return Err(transient),
                }
            }
            Ok(runs)
        }
    }
}

async fn run_for_request(setup: &ConsumerSetup, request: &ImportRequest) -> Result<Uuid, Refusal> {
    if let Some(run_id) = runs::run_by_key(&setup.pool, &request.idempotency_key).await? {
        return Ok(run_id);
    }
    let parameters = ImportParameters {
        source: SourceLocation::S3 {
            bucket: request.source.bucket.clone(),
            key: request.source.key.clone(),
        },
        expected_etag: request.source.etag.clone(),
        options: request.options.clone(),
    };
    let dataset_id = match request.dataset_ref() {
        DatasetRef::Name(name) => {
            let name = DatasetName::parse(&name)
                .map_err(|error| Refusal::DeadLetter(error.to_string()))?;
            db::ensure_dataset(&setup.pool, &name, None)
                .await
                .map_err(dataset_refusal)?
                .0
        }
        DatasetRef::Id(id) => {
            let known: Option<i64> =
                sqlx::query_scalar("SELECT id FROM dsa_core.datasets WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&setup.pool)
                    .await?;
            match known {
                Some(id) => id,
                None => {
                    // A run a person can find (by its idempotency key) says why nothing
                    // was imported, and a redelivery finds it failed and stops there.
                    let run_id = runs::create_keyed_run(
                        &setup.pool,
                        None,
                        request.user.as_deref(),
                        &parameters,
                        &request.idempotency_key,
                    )
                    .await?;
                    runs::fail_run(
                        &setup.pool,
                        run_id,
                        None,
                        &format!(
                            "dataset {id} does not exist; create it or name the dataset instead"
                        ),
                    )
                    .await?;
                    return Ok(run_id);
                }
            }
        }
    };
    Ok(runs::create_keyed_run(
        &setup.pool,
        Some(dataset_id),
        request.user.as_deref(),
        &parameters,
        &request.idempotency_key,
    )
    .await?)
}

async fn run_for_object(setup: &ConsumerSetup, object: &CreatedObject) -> Result<Uuid, Refusal> {
    let key = object.idempotency_key();
    if let Some(run_id) = runs::run_by_key(&setup.pool, &key).await? {
        return Ok(run_id);
    }
    // Checked before the metadata HEAD: a refused bucket is not touched at all.
    setup
        .policy
        .check_object(&object.bucket, &object.key)
        .map_err(|refused| Refusal::DeadLetter(refused.to_string()))?;
    let name = match &setup.event_dataset {
        Some(name) => name.clone(),
        None => {
            let from_metadata = match (&setup.s3, setup.event_dataset_from_metadata) {
                (Some(s3), true) => dataset_metadata(s3, object).await?,
                _ => None,
            };
            let name = from_metadata.unwrap_or_else(|| object.dataset_from_key());
            DatasetName::parse(&name).map_err(|error| {
                Refusal::DeadLetter(format!(
                    "s3://{}/{}: cannot take a dataset name from it: {error}",
                    object.bucket, object.key
                ))
            })?
        }
    };
    let dataset_id = db::ensure_dataset(&setup.pool, &name, None)
        .await
        .map_err(dataset_refusal)?
        .0;
    Ok(runs::create_keyed_run(
        &setup.pool,
        Some(dataset_id),
        None,
        &object_parameters(object),
        &key,
    )
    .await?)
}

/// The run an S3 event record asks for. The event's ETag pins the object: if the key
/// was overwritten since, this run fails and the newer object's own event imports it.
fn object_parameters(object: &CreatedObject) -> ImportParameters {
    ImportParameters {
        source: SourceLocation::S3 {
            bucket: object.bucket.clone(),
            key: object.key.clone(),
        },
        expected_etag: object.etag.clone(),
        options: ImportOptions {
            message: Some(format!(
                "Import s3://{}/{} ({})",
                object.bucket,
                object.key,
                object.event_name.as_deref().unwrap_or("S3 event")
            )),
            ..ImportOptions::default()
        },
    }
}

/// A run, found by its idempotency key, that failed before it started: a person finds
/// why nothing was imported, and a redelivery finds it failed and stops there.
async fn failed_keyed_run(
    setup: &ConsumerSetup,
    key: &str,
    parameters: &ImportParameters,
    user: Option<&str>,
    reason: &str,
) -> Result<Uuid, Refusal> {
    let run_id = runs::create_keyed_run(&setup.pool, None, user, parameters, key).await?;
    runs::fail_run(&setup.pool, run_id, None, reason).await?;
    Ok(run_id)
}

/// The object's user metadata `dataset` (see `s3::dataset_metadata`); a failure to
/// read it is retried, since guessing from the key could put the rows in the wrong
/// dataset.
async fn dataset_metadata(
    s3: &aws_sdk_s3::Client,
    object: &CreatedObject,
) -> Result<Option<String>, Refusal> {
    crate::s3::dataset_metadata(s3, &object.bucket, &object.key)
        .await
        .map_err(Refusal::Transient)
}

fn dataset_refusal(error: DatasetError) -> Refusal {
    match error {
        DatasetError::Database(error) => Refusal::Transient(error.to_string()),
        other => Refusal::DeadLetter(other.to_string()),
    }
}

/// How often a delivery whose run another worker holds looks at the run again.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Imports the run, resuming it if needed, until it is completed or failed for good.
/// `format` labels its failures and retries (a completed run reports the format its
/// content had).
async fn import_to_end(
    setup: &ConsumerSetup,
    importer: &Importer,
    run_id: Uuid,
    format: &'static str,
    channel: &Channel,
) -> Settle {
    let mut retries: Option<ExponentialBackoff> = None;
    loop {
        // Claiming after the stop would take a fresh lease that nobody then uses.
        if importer.is_stopping() {
            return Settle::Requeue;
        }
        let in_flight = metrics().import_in_flight();
        let result = importer.run(run_id).await;
        drop(in_flight);
        match result {
            Ok(summary) => {
                log_completed(&summary);
                metrics().record_import_finished(&(&summary).into(), summary.source.format());
                if let Some(committed) = &setup.committed {
                    let _ = committed.try_send(());
                }
                return Settle::Ack;
            }
            Err(error) => match error.outcome() {
                Outcome::AlreadyFinished => {
                    tracing::info!(run.id = %run_id, reason = %error, "nothing to do");
                    return Settle::Skipped;
                }
                Outcome::NoSuchRun => {
                    return Settle::DeadLetter(format!("run {run_id} does not exist"));
                }
                Outcome::HeldElsewhere => {
                    // Another worker (or another task of ours whose delivery was lost
                    // with its channel) is importing this run. Starting a second import
                    // would be wrong; holding the message until the run ends keeps
                    // someone responsible for it should that worker die.
                    tracing::info!(run.id = %run_id, reason = %error, "run is held by a live worker; waiting for it");
                    match wait_while_held(&setup.pool, run_id, importer, channel).await {
                        Ok(()) => continue,
                        Err(settle) => return settle,
                    }
                }
                Outcome::Interrupted => return Settle::Requeue,
                // The run was taken over by another worker (its lease had run out); that
                // worker's delivery settles it.
                Outcome::TakenOver => {
                    tracing::info!(run.id = %run_id, "another worker took the run over; leaving it to them");
                    return Settle::Skipped;
                }
                Outcome::Transient => match retries
                    .get_or_insert_with(|| retry_backoff(setup.amqp.retry_budget))
                    .next_backoff()
                {
                    Some(wait) => {
                        metrics().record_import_retried(format);
                        metrics().amqp_outcome(AmqpOutcome::Retry);
                        tracing::warn!(run.id = %run_id, error = %error, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
                        if !pause(importer, wait).await {
                            return Settle::Requeue;
                        }
                    }
                    None => {
                        let note = format!(
                            "stopped after retrying for {} s: {error}; the message is in the dead-letter queue, replay it to resume",
                            setup.amqp.retry_budget.as_secs()
                        );
                        if let Err(park) = runs::park(&setup.pool, run_id, &note).await {
                            tracing::warn!(run.id = %run_id, error = %park, "could not record the pause on the run");
                        }
                        return Settle::DeadLetter(note);
                    }
                },
                // The import core marked the run failed with the reason; the message
                // has been handled.
                Outcome::Permanent => {
                    metrics().record_import_failed(format, error.failure_reason());
                    tracing::warn!(run.id = %run_id, error = %error, "run failed");
                    return Settle::Ack;
                }
            },
        }
    }
}

/// Waits until the run is no longer held by a live lease. Gives up (requeueing) when
/// this process is stopping, and at once when the delivery's own channel died: the
/// broker has handed the message to someone else by then, and a waiter that stayed
/// would pin a worker slot for nothing (each `consumer_timeout` would add another).
async fn wait_while_held(
    pool: &PgPool,
    run_id: Uuid,
    importer: &Importer,
    channel: &Channel,
) -> Result<(), Settle> {
    loop {
        if importer.is_stopping() {
            return Err(Settle::Requeue);
        }
        if !channel.status().connected() {
            tracing::info!(run.id = %run_id, "the delivery's channel closed while waiting for the run; giving the worker slot back");
            metrics().record_waiter_released();
            return Err(Settle::Requeue);
        }
        match runs::held_by_live_lease(pool, run_id).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(error) => {
                tracing::debug!(run.id = %run_id, error = %error, "looking at a held run")
            }
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// One step of retrying a delivery's transient failure: counts it, logs it and waits
/// the backoff's next interval. `Err` settles the delivery: dead-lettered once the
/// retry budget is spent, requeued when the process stops meanwhile.
async fn back_off(
    setup: &ConsumerSetup,
    importer: &Importer,
    retries: &mut Option<ExponentialBackoff>,
    error: &(dyn std::fmt::Display + Sync),
    what: &str,
) -> Result<(), Settle> {
    let wait = retries
        .get_or_insert_with(|| retry_backoff(setup.amqp.retry_budget))
        .next_backoff();
    let Some(wait) = wait else {
        return Err(Settle::DeadLetter(format!(
            "gave up after retrying for {} s: {what}: {error}",
            setup.amqp.retry_budget.as_secs()
        )));
    };
    metrics().amqp_outcome(AmqpOutcome::Retry);
    tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "{what}; retrying");
    if pause(importer, wait).await {
        Ok(())
    } else {
        Err(Settle::Requeue)
    }
}

/// Sleeps for `wait` unless the process starts stopping first; false when it did.
async fn pause(importer: &Importer, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = importer.stopped() => false,
    }
}

fn log_completed(summary: &ImportSummary) {
    tracing::info!(
        run.id = %summary.run_id,
        dataset.id = summary.dataset_id,
        commit.id = %summary.commit_id,
        rows = summary.rows,
        new_rows = summary.new_rows,
        bytes = summary.bytes,
        duration_ms = (summary.seconds * 1000.0) as u64,
        "import message handled"
    );
}
