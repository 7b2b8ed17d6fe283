//! Graceful shutdown on the signals a service manager sends.

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on ctrl-c (SIGINT) or SIGTERM, and returns; returns at once when
/// `shutdown` is cancelled some other way. Spawn it next to [`crate::Consumer::run`]:
///
/// ```no_run
/// # async fn run(consumer: cloudbus_core::Consumer, handler: impl cloudbus_core::consumer::Handler) {
/// use cloudbus_core::consumer::{CancellationToken, cancel_on_signals};
///
/// let shutdown = CancellationToken::new();
/// tokio::spawn(cancel_on_signals(shutdown.clone()));
/// let summary = consumer.run(handler, shutdown).await;
/// # let _ = summary;
/// # }
/// ```
pub async fn cancel_on_signals(shutdown: CancellationToken) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; ctrl-c still stops");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
        () = terminate => tracing::info!("terminated: shutting down"),
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
