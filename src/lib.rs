//! vppd assigns Apple app and book licenses at scale through Apple's App and
//! Book Management API v2, and releases an install command to the MDM for
//! every assignment Apple confirms, exactly once.
//!
//! A job flows through one module per stage:
//!
//! - [`admin`] takes jobs over HTTP and stores them ([`store`]: one trait,
//!   every call durable on return; the job and batch state machine it
//!   applies is [`lifecycle`]).
//! - [`plan`] turns a job and Apple's live limits into the fewest ordered
//!   batches (pure, no I/O).
//! - [`submit`] sends the batches to Apple in order, under the rate limit of
//!   the [`apple`] client, and records every eventId before moving on;
//!   [`schedule`] (pure) picks which of a token's jobs sends next and when.
//! - [`listen`] receives Apple's notifications and records them durably;
//!   [`track`] folds them, and event status and assignment sync for what they
//!   miss, into each batch's results.
//! - [`release`] delivers install commands from the durable outbox to the MDM.
//! - [`drift`] follows each token's assignments at Apple for changes made
//!   outside vppd.
//!
//! The stages do not import each other. What they share sits below them:
//! [`pairs`] (pair index <-> asset and target), [`sync`] (which pairs Apple
//! holds), [`report`] (what Apple reports, converted from the wire types at
//! the [`apple`] edge), [`retry`] (the one backoff).
//!
//! Every stage works per token: [`tokens`] is the registry of the
//! customer locations vppd serves, each with its state and Apple client.
//!
//! Beside the pipeline: [`config`] (the TOML file), [`metrics`], [`json`]
//! (JSON read from bytes), [`retention`] (finished jobs forgotten after a
//! while; the store's size), [`sim`] (a faithful simulator of Apple's side,
//! used by tests and `vppd demo`), and [`daemon`], which wires everything
//! for `vppd run` (with [`lease`] deciding which replica works what when
//! several share one store; [`systemd`] reports its status and watchdog
//! keep-alives). The operator commands live in [`cli`] (with [`progress`])
//! and [`sink`], a stand-in MDM; [`logging`] sets up the log output.

// Apple's errors carry its whole ErrorResponse so callers can act on it;
// they are rare and never on a hot path, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod activation;
pub mod admin;
pub mod apple;
pub mod balance;
pub mod cli;
pub mod config;
pub mod context;
pub mod daemon;
pub mod demo;
pub mod demo_users;
pub mod drift;
pub mod duration;
pub mod fastmap;
pub mod http;
pub mod inbox;
pub mod job;
pub mod json;
pub mod lease;
pub mod licenses;
pub mod lifecycle;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod pairs;
pub mod plan;
pub mod progress;
pub mod register;
pub mod release;
pub mod report;
pub mod requests;
pub mod retention;
pub mod retry;
pub mod schedule;
pub mod sent;
pub mod signing;
pub mod sim;
pub mod sink;
pub mod store;
pub mod submit;
pub mod sync;
pub mod systemd;
pub mod token_sync;
pub mod tokens;
pub mod track;
pub mod user_records;
pub mod users;
