//! Apple's App and Book Management API v2: wire types, the sToken file, and the client.

pub mod client;
pub mod report;
pub mod scan;
pub mod token;
pub mod types;

pub use client::{AppleError, Client, ClientOptions};
pub use types::error_number;
