//! meshlab's lab: scripted multi-peer experiments with convergence and delivery checks.
//!
//! A [`Lab`] drives peers through a [`Backend`](backend::Backend) with plain verbs (start,
//! stop, kill, restart, partition, cut, heal, say) and checks the [`World`](world::World) it
//! builds from the peers' `--json` events (await mesh, await delivery). Scenario files
//! ([`scenario`]) are read into steps and run by [`runner`], which also writes the report.

pub mod agent;
pub mod backend;
pub mod chaos;
pub mod event;
pub mod figures;
pub mod history;
pub mod junit;
pub mod lab;
pub mod link;
pub mod progress;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod world;

pub use lab::{Lab, LabError};
