//! Graceful shutdown: one token that SIGTERM or Ctrl-C cancels, handed to every task.
//!
//! Tasks watch the token and wind down on their own terms (an import finishes the
//! batch it is committing); `main` waits for them, so the process exits only after
//! every task has said it is done.

pub use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGTERM or Ctrl-C. A second signal is left to the
/// default handling of the runtime's signal listener, which does nothing further; an
/// operator who wants the process gone at once sends SIGKILL.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing work in flight");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
