//! `dsa-ingest serve`: the HTTP entry point. Uploads stream into the object store and
//! become queued runs, as `submit` makes them; runs can be read and followed.
//!
//! Architecture Invariant: the server holds no import logic. An upload ends as a
//! pending run and a message on the import exchange, and from there belongs to the
//! consumers, exactly as a `submit`ted file does.

mod auth;
mod datasets;
mod limits;
mod openapi;
mod problem;
mod query;
mod runs;
mod upload;

use std::sync::Arc;

use axum::Router;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::submit::{queue_run, SubmitError};
use crate::config::Settings;
use crate::http::Health;
use crate::queue::amqp;

pub use auth::Clients;

/// Everything a request handler reaches; cheap to clone.
#[derive(Clone)]
pub struct Api {
    inner: Arc<ApiInner>,
}

struct ApiInner {
    pool: PgPool,
    s3: aws_sdk_s3::Client,
    /// Where uploads are stored (`S3_BUCKET`).
    bucket: String,
    settings: Settings,
    clients: Clients,
    /// Each client's rate of requests and uploads at once.
    limits: limits::Limits,
    queue: Queue,
    /// Fires at shutdown; open event streams end so the server can stop.
    stop: CancellationToken,
}

/// What `serve` is started with.
pub struct ServeSetup {
    pub pool: PgPool,
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    pub settings: Settings,
    pub clients: Clients,
    pub health: Health,
}

/// Serves the API, `/healthz`, `/readyz` and `/metrics` on `listener` until `stop`
/// fires, then finishes the requests under way (uploads complete or abort).
pub async fn run(
    setup: ServeSetup,
    listener: TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let queue = Queue {
        settings: setup.settings.amqp.clone(),
        health: setup.health.clone(),
        session: tokio::sync::Mutex::new(None),
    };
    // Connecting now makes `/readyz` true from the start; a broker that is away is
    // tried again by the first upload.
    if let Err(error) = queue.connected().await {
        tracing::warn!(error = %error, "the broker is not reachable yet; uploads are refused until it is");
    }
    crate::metrics::metrics().watch_pool(setup.health.pool());
    let api = Api {
        inner: Arc::new(ApiInner {
            pool: setup.pool,
            s3: setup.s3,
            bucket: setup.bucket,
            limits: limits::Limits::new(
                setup.settings.http.requests_per_second,
                setup.settings.http.max_concurrent_uploads,
            ),
            settings: setup.settings,
            clients: setup.clients,
            queue,
            stop: stop.clone(),
        }),
    };
    // Built from the route table the OpenAPI description is built from.
    let router = openapi::OPERATIONS
        .iter()
        .filter_map(|operation| Some((operation.route, openapi::handler(operation.route)?)))
        .fold(Router::new(), |router, (route, handler)| {
            router.route(route.as_str(), handler)
        })
        .with_state(api.clone())
        .merge(crate::http::router(setup.health))
        .layer(axum::middleware::from_fn_with_state(
            api,
            limits::limit_and_count,
        ));
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// The broker session uploads publish their runs on: one connection and confirm
/// channel, opened again after it is lost.
struct Queue {
    settings: crate::config::AmqpSettings,
    health: Health,
    session: tokio::sync::Mutex<Option<(lapin::Connection, lapin::Channel)>>,
}

impl Queue {
    /// Opens the session (declaring the import topology) unless it is open.
    async fn connected(
        &self,
    ) -> Result<
        tokio::sync::MutexGuard<'_, Option<(lapin::Connection, lapin::Channel)>>,
        amqp::AmqpError,
    > {
        let mut session = self.session.lock().await;
        let open = session
            .as_ref()
            .is_some_and(|(_, channel)| channel.status().connected());
        if !open {
            *session = None;
            self.health.set_broker_connected(false);
            let connection = amqp::connect(&self.settings, "serve").await?;
            let channel = amqp::confirm_channel(&connection).await?;
            amqp::declare_import_topology(&channel, &self.settings).await?;
            *session = Some((connection, channel));
            self.health.set_broker_connected(true);
        }
        Ok(session)
    }

    /// Publishes the run's message; a run that cannot be queued is marked failed.
    async fn queue(&self, pool: &PgPool, run_id: Uuid) -> Result<(), SubmitError> {
        let mut session = match self.connected().await {
            Ok(session) => session,
            Err(source) => {
                let message = format!("never queued: {source}");
                if let Err(error) = crate::runs::fail_run(pool, run_id, None, &message).await {
                    tracing::error!(run.id = %run_id, error = %error, "could not mark the unqueued run failed");
                }
                return Err(SubmitError::NotQueued { run_id, source });
            }
        };
        let (_, channel) = session.as_ref().expect("connected");
        let result = queue_run(channel, &self.settings, pool, run_id).await;
        if result.is_err() {
            *session = None;
            self.health.set_broker_connected(false);
        }
        result
    }
}
