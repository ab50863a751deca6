//! Signals that ask the peer to leave: SIGINT (Ctrl-C) and SIGTERM (`docker stop`).

use tokio::signal::unix::{SignalKind, signal};

/// Resolves when the peer is asked to leave.
pub async fn signalled() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
