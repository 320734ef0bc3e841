//! What a [`Client`](super::Client) reports as it works. The edge knows
//! nothing of metrics: whoever builds a client hands it an observer (the
//! daemon's metrics, or a test's recorder) and decides what a report means.

use std::time::Duration;

/// Receives the client's reports. Every call names the token by its
/// configured name; none carries a secret.
pub trait Observer: Send + Sync {
    /// The token expires at `unix_secs`, as its file or Apple last said.
    fn token_expiry(&self, token: &str, unix_secs: i64);
    /// One of Apple's limits as service config gave it (keyed as Apple
    /// names it), or `effectiveRequestsPerSecond`: the rate in force.
    fn limit(&self, token: &str, key: &str, value: i64);
    /// A request was held back `waited` by the Retry-After pause or the
    /// rate limiter.
    fn rate_limit_wait(&self, token: &str, waited: Duration);
    /// A request got no answer: not sent, or its answer was lost.
    fn request_unanswered(&self, token: &str, endpoint: &'static str);
    /// A request was answered with HTTP `status` after `took` (the wait
    /// for the gate not included).
    fn request_answered(&self, token: &str, endpoint: &'static str, status: u16, took: Duration);
    /// A `Retry-After` on a 429 or 5xx answer paused every request of the
    /// token for `wait`.
    fn retry_after(&self, token: &str, wait: Duration);
    /// Apple answered with its error number `number`.
    fn api_error(&self, token: &str, number: i32);
}
