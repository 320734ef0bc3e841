//! What the stages share and what runs them: the context they are handed,
//! the token registry, config, metrics, the HTTP plumbing, replica leases.

pub mod activation;
pub mod config;
pub mod context;
pub mod health;
pub mod http;
pub mod lease;
pub mod licenses;
pub mod logging;
pub mod metrics;
pub mod register;
pub mod retention;
pub mod secrets;
pub mod sent;
pub mod sync;
pub mod token_sync;
pub mod tokens;
pub mod user_records;
