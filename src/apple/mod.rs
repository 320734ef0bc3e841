//! Apple's App and Book Management API v2: wire types, the sToken file, and the client.
//!
//! Architecture invariant: this is the edge. It imports the domain only
//! (to convert Apple's answers into [`crate::domain::report`] and the inbox's
//! stored forms), never the store, the runtime or a stage; it reports what
//! it does through an [`Observer`].

pub mod client;
pub mod observer;
pub mod report;
pub mod requests;
pub mod scan;
pub mod token;
pub mod types;

pub use client::{AppleError, Client, ClientOptions};
pub use observer::Observer;
pub use types::error_number;
