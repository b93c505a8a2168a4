//! The HTTP server of the long-running commands: `/healthz` (liveness), `/readyz`
//! (the database answers and the broker connection is up) and `/metrics` (the
//! process-wide registry of [`crate::metrics`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::metrics::{metrics, text_content_type, HttpRoute};

/// How long `/readyz` waits for `SELECT 1` before it calls the database down. A probe
/// must answer well within the orchestrator's own timeout (often a few seconds).
pub const READY_DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a `/readyz` answer about the database is reused: probes from several
/// orchestrators (or an attacker hammering the port) cost one `SELECT 1` a second.
pub const READY_CACHE: Duration = Duration::from_secs(1);

/// When the database was last asked, and what it answered.
type CachedAnswer = (Instant, Result<(), String>);

/// What `/readyz` checks: the database answers, and the broker connection is up.
/// Cheap to clone; the consumer keeps a clone to report its connection.
#[derive(Clone)]
pub struct Health {
    /// The pool whose connections `/metrics` reports.
    pool: PgPool,
    /// Where `SELECT 1` runs: a pool of one connection of its own, so probes can never
    /// take a connection an import is waiting for.
    probe: PgPool,
    /// The last answer about the database and when it was found; the lock also makes
    /// concurrent probes wait for one query instead of each running their own.
    database: Arc<tokio::sync::Mutex<Option<CachedAnswer>>>,
    /// Set by the consumer when its channel is open, cleared when the connection is
    /// lost, so a replica that cannot receive work is taken out of rotation.
    broker_connected: Arc<AtomicBool>,
}

/// Why the process is not ready; each part names what is down.
#[derive(Debug, Error)]
#[error("not ready: {}", .reasons.join("; "))]
pub struct NotReady {
    pub reasons: Vec<String>,
}

impl Health {
    /// Starts with the broker reported as not connected.
    pub fn new(pool: PgPool) -> Self {
        Self::with_probe(pool.clone(), pool)
    }

    /// Reports `pool` in `/metrics` and runs the readiness query on `probe`.
    pub fn with_probe(pool: PgPool, probe: PgPool) -> Self {
        Self {
            pool,
            probe,
            database: Arc::new(tokio::sync::Mutex::new(None)),
            broker_connected: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Release);
    }

    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Acquire)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs the readiness checks: `SELECT 1` within [`READY_DATABASE_TIMEOUT`], and the
    /// broker flag.
    pub async fn check_ready(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        if let Err(reason) = self.database_ready().await {
            reasons.push(reason);
        }
        if !self.broker_connected() {
            reasons.push("broker: not connected".to_owned());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(NotReady { reasons })
        }
    }
}

impl Health {
    /// `SELECT 1` on the probe pool within [`READY_DATABASE_TIMEOUT`], or the answer
    /// found less than [`READY_CACHE`] ago.
    async fn database_ready(&self) -> Result<(), String> {
        let mut cached = self.database.lock().await;
        if let Some((at, answer)) = cached.as_ref() {
            if at.elapsed() < READY_CACHE {
                return answer.clone();
            }
        }
        let query = sqlx::query("SELECT 1").execute(&self.probe);
        let answer = match tokio::time::timeout(READY_DATABASE_TIMEOUT, query).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("database: {error}")),
            Err(_) => Err(format!(
                "database: no answer to SELECT 1 within {} ms",
                READY_DATABASE_TIMEOUT.as_millis()
            )),
        };
        *cached = Some((Instant::now(), answer.clone()));
        answer
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} (METRICS_ADDR)")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The health and metrics server once it is listening.
pub struct ServerHandle {
    /// The address actually bound (the port is chosen by the system for port 0).
    pub local_addr: SocketAddr,
    /// Ends when the server has shut down; it returns the server's I/O error, if any.
    pub task: JoinHandle<std::io::Result<()>>,
}

/// Binds `addr` (as `METRICS_ADDR` gives it, port 0 allowed) and serves health and
/// metrics on a task of its own until `shutdown` completes.
pub async fn spawn_server(
    addr: &str,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServerHandle, ServeError> {
    let bind_error = |source| ServeError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    tracing::info!(addr = %local_addr, "serving /healthz, /readyz and /metrics");
    let task = tokio::spawn(serve(listener, health, shutdown));
    Ok(ServerHandle { local_addr, task })
}

/// Serves `GET /healthz`, `GET /readyz` and `GET /metrics` on `listener` until
/// `shutdown` completes, then finishes the requests under way. The health's pool is
/// the one `dsa_db_pool_connections` reports.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    metrics().watch_pool(health.pool());
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The `/healthz`, `/readyz` and `/metrics` routes, for a server of its own or beside an API.
pub fn router(health: Health) -> Router {
    Router::new()
        .route(HttpRoute::Healthz.as_str(), get(healthz))
        .route(HttpRoute::Readyz.as_str(), get(readyz))
        .route(HttpRoute::Metrics.as_str(), get(metrics_text))
        .with_state(health)
}

/// Liveness: the process runs and its runtime answers.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Health>) -> Response {
    match health.check_ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(not_ready) => {
            tracing::debug!(error = %not_ready, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{not_ready}\n")).into_response()
        }
    }
}

async fn metrics_text() -> Response {
    metrics().run_scrape_probe().await;
    match metrics().encode() {
        Ok(text) => ([(header::CONTENT_TYPE, text_content_type())], text).into_response(),
        Err(error) => {
            tracing::error!(error = %error, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {error}\n"),
            )
                .into_response()
        }
    }
}
