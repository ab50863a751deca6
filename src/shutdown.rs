//! Signals that ask the peer to leave: SIGINT (Ctrl-C) and SIGTERM (`docker stop`).
//!
//! The handlers are installed when [`Shutdown::install`] is called, before the peer announces
//! that it listens, so a signal that arrives at any point afterwards leads to a goodbye rather
//! than to the default action (an abrupt exit).

use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    pub fn install() -> std::io::Result<Shutdown> {
        Ok(Shutdown { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// Resolves when the peer is asked to leave.
    pub async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
