//! The pure domain: jobs, plans, schedules, pairs and the lifecycle that
//! decides them. No I/O: everything here takes its inputs (time included)
//! as arguments, which is what lets it be property-tested.

pub mod balance;
pub mod duration;
pub mod fastmap;
pub mod ids;
pub mod inbox;
pub mod job;
pub mod json;
pub mod lifecycle;
pub mod pairs;
pub mod plan;
pub mod report;
pub mod retry;
pub mod schedule;
pub mod signing;
