//! meshlab's peer: a full-mesh peer-to-peer chat peer.
//!
//! `main` parses the command line ([`config`]) and calls [`run`]. The [`mesh`] task owns all
//! state; [`connection`] tasks speak the wire protocol ([`frame`]) to neighbours, starting with
//! the [`handshake`]; [`console`] reads stdin and [`output`] writes the chat view or JSON events.
//! A peer is its [`identity`] (an Ed25519 key); its lines form a signed [`chain`].

pub mod addr;
pub mod chain;
pub mod config;
pub mod connection;
pub mod console;
pub mod dialbook;
pub mod flood;
pub mod frame;
pub mod handshake;
pub mod hook;
pub mod id;
pub mod identity;
pub mod known;
pub mod linkwatch;
pub mod mesh;
pub mod neighbours;
pub mod noise;
pub mod outbox;
pub mod output;
pub mod shutdown;
pub mod state;
pub mod stdio;
pub mod store;
pub mod terminal;

pub use mesh::{Io, run, serve};

/// Logs go to stderr: warnings by default, more with RUST_LOG (e.g. `RUST_LOG=debug`).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::Targets;
    let filter = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<Targets>().ok());
    let filter = filter.unwrap_or_else(|| Targets::new().with_default(tracing::Level::WARN));
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();
}
