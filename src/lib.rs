//! vppd assigns Apple app and book licenses at scale through Apple's App and
//! Book Management API, and releases a command to the MDM for every change
//! Apple confirms, exactly once.
//!
//! The crate is built in layers, each a folder; a module names its own
//! layer and those below it, never one above (`tests/layers.rs` checks it):
//!
//! - [`domain`]: jobs, plans, schedules, pairs and the [`domain::lifecycle`]
//!   that decides them; pure, no I/O, property-tested.
//! - [`apple`]: Apple's wire types, the client, the notification scanner;
//!   converts to and from the domain at its edge.
//! - [`store`]: the [`store::Store`] trait, each operation written once
//!   (`store/ops.rs`), over two small backends (sled, PostgreSQL).
//! - [`runtime`]: what the stages share: [`runtime::context`], the token
//!   registry, config, metrics, the HTTP plumbing, the lease keeper.
//! - [`stages`]: admin, submit, track, listen, release, users, drift, side
//!   by side; none imports another, and only [`stages::submit`] sends
//!   management requests to Apple.
//! - [`daemon`]: the wiring of `vppd run`, and systemd.
//! - [`cli`]: the operator commands, `vppd demo`, the stand-in MDM.
//!
//! [`sim`], Apple's simulator for tests and the demo, stands apart.

// Apple's errors carry its whole ErrorResponse so callers can act on it;
// they are rare and never on a hot path, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod apple;
pub mod cli;
pub mod daemon;
pub mod domain;
pub mod runtime;
pub mod sim;
pub mod stages;
pub mod store;
