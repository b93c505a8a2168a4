//! Many replicas, one lister: a PostgreSQL advisory lock held on a connection of its own.
//!
//! The lock lives exactly as long as the session that took it. When the lister dies
//! (`kill -9`, a lost node), its connection closes and the server releases the lock at
//! once; a standby, trying every [`RETRY`], takes it over within about a second. A
//! lister checks its session before every page it lists, so one that lost its
//! connection (a network cut, the server restarted) stops listing; and if two ever
//! list at once for a moment, nothing is imported twice, because runs are created once
//! per object version (the run's idempotency key), not once per listing.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::config::SecretUrl;

/// The advisory lock key (`dsa_watc` in ASCII). Locks are per database, so several
/// deployments on one server, or tests, do not meet.
pub const WATCH_LOCK_KEY: i64 = 0x6473_615f_7761_7463;

/// How often a standby tries to take the lock.
pub const RETRY: Duration = Duration::from_secs(1);

/// How long a liveness check of the lock's session may take before the lister gives
/// up the role.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The lock, held: this process is the lister until it drops it or its session ends.
pub struct ListerLock {
    connection: PgConnection,
}

impl ListerLock {
    /// Waits until this process holds the lock (`Some`), trying every [`RETRY`], or
    /// until `stop` fires (`None`). Database errors are logged and tried again.
    pub async fn acquire(database_url: &SecretUrl, stop: &CancellationToken) -> Option<Self> {
        let mut connection: Option<PgConnection> = None;
        let mut logged_standby = false;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            if connection.is_none() {
                match connect(database_url).await {
                    Ok(opened) => connection = Some(opened),
                    Err(error) => {
                        tracing::warn!(error = %error, "watch cannot reach the database to take the lister lock; trying again");
                    }
                }
            }
            if let Some(open) = connection.as_mut() {
                let taken: Result<bool, sqlx::Error> =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(WATCH_LOCK_KEY)
                        .fetch_one(&mut *open)
                        .await;
                match taken {
                    Ok(true) => {
                        return Some(Self {
                            connection: connection.take().expect("checked above"),
                        })
                    }
                    Ok(false) => {
                        if !logged_standby {
                            tracing::info!("another watch replica is the lister; standing by");
                            logged_standby = true;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "taking the watch lister lock failed; trying again");
                        connection = None;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    /// Whether the session holding the lock still answers; when it does not, the lock
    /// may be someone else's by now.
    pub async fn still_held(&mut self) -> bool {
        let check = sqlx::query("SELECT 1").execute(&mut self.connection);
        matches!(tokio::time::timeout(CHECK_TIMEOUT, check).await, Ok(Ok(_)))
    }

    /// Gives the lock up (closing the session releases it too, which is what a crash
    /// does).
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(WATCH_LOCK_KEY)
            .execute(&mut self.connection)
            .await;
        let _ = self.connection.close().await;
    }
}

async fn connect(database_url: &SecretUrl) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions = database_url.expose().parse()?;
    options
        .application_name(&crate::db::application_name())
        .log_statements(log::LevelFilter::Trace)
        .connect()
        .await
}
