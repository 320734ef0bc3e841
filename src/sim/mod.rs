//! A simulator of Apple's side of the App and Book Management API v2.
//!
//! Apple cannot be reached from a test machine, and Apple's real service gives
//! no way to provoke its rarer behaviours (a 429, a lost notification, a
//! connection cut after a POST was processed). The simulator serves the v2
//! endpoints under `/mdm/v2` over real HTTP on loopback and models what a
//! client can observe:
//!
//! - **Organizations.** Each sToken added is one location ("org"), keyed by
//!   the whole bearer string, with its own assets and license counts,
//!   assignments, users, events, client config and `uId` (derived
//!   deterministically from the token).
//! - **Synchronous validation** in the order of the reference's section 9.7:
//!   authorization, rate limit, method, permissions, content type, JSON,
//!   required fields, duplicates, size limits, asset properties. A refused
//!   request creates nothing.
//! - **Asynchronous events.** Management POSTs answer an `eventId` at once;
//!   one task per token then processes the events strictly one after another
//!   in arrival order, the tasks of an event in request order (asset by
//!   asset; users before serials), at a configurable pace.
//! - **Real license accounting**: `availableCount = totalCount -
//!   assignedCount`, shortfalls, unknown assets, unregistered users.
//! - **Notifications** to the client's `notificationUrl`, chunked, retried,
//!   and optionally dropped, duplicated, delayed or reordered.
//! - **Faults** switched at run time, from Rust or over `/_sim/*`.
//! - **What people do**, which a client cannot cause itself: events that
//!   stay `PENDING` ([`HoldSettings`]), users accepting their invitations
//!   ([`InvitationAcceptance`]), changes made by hand in Apple School or
//!   Business Manager ([`ManualChange`]).
//!
//! Every knob is both a `vppd sim` flag (set at start) and a `/_sim/`
//! endpoint (changed while running); there is deliberately no separate
//! control command: a shell drives a running `vppd sim` with curl. Started
//! with `--token-file FILE` where FILE does not exist, `vppd sim` writes a
//! generated token there (0600) and says so; without `--asset` or `--apps`
//! every organization owns the apps of the reference's examples
//! ([`cli::default_catalogue`]).
//!
//! Where Apple's documentation is silent the simulator adopts the
//! assumptions of section 9 of `docs/apple-api-v2.md`:
//!
//! | item | behaviour here |
//! | --- | --- |
//! | 9.1 | associating an existing pair succeeds, uses no license |
//! | 9.2 | disassociating a missing pair is a no-op success; [`SimConfig::disassociate_missing_fails`] makes it 9610 |
//! | 9.3 | per asset, pairs in request order get licenses until none is left, the rest fail with 9709; [`SimConfig::shortfall_all_or_nothing`] fails every pair that needs a license when the asset cannot cover them all (pairs already assigned still succeed) |
//! | 9.4 | unknown asset: accepted, its pairs fail with 9709; malformed `adamId`: 9602 |
//! | 9.5 | associate to a `clientUserId` without an active user: 9609; update of a user with no active record: 9609; retire of a user who has only retired records: no-op success; of an unknown one: 9609 |
//! | 9.6 | retiring a user keeps its assignments |
//! | 9.7 | validation order as above; the rate limit is checked right after authorization (the reference allows it) |
//! | 9.8 | unknown token 9622, missing or malformed header 9722, both 401 |
//! | 9.9 | token bucket per token, capacity = refill = `maxRequestPerSecond`, excess 429 / 9646 / `Retry-After: 1` |
//! | 9.10-9.11 | ordered processing per token, [`SimConfig::event_delay`] and [`SimConfig::assignments_per_second`]; a license a disassociate or revoke frees is there for the events queued behind it, whether or not the client waited |
//! | 9.12-9.14 | one notification per (asset, outcome) group in chunks of at most [`NotificationFaults::max_items`], emitted as chunks complete (a revoke's removals go in one group whatever the asset, target by target, as in the reference's revocation example of 7.5); retries and faults per [`NotificationFaults`]; ASSET_COUNT only from license changes ([`Simulator::add_licenses`]), USER_ASSOCIATED only from accepted invitations ([`InvitationAcceptance`], [`Simulator::accept_invitation`]) |
//! | 9.15-9.16 | event status and failures as described there; revoke's `numRequested` is fixed when the event starts (0 before): the revocable assignments its targets hold then, each one task, reported `SUCCESS` as `REVOKE` and counted in `numCompleted`; a revoke never fails a task |
//! | 9.17-9.18 | `versionId` is a per-token counter bumped by every write, rendered like a UUID; `sinceVersionId` returns records changed after it, removals do not show; a value never issued gives 9721 |
//! | 9.19 | page size configurable, empty result = one page of size 0, out of range 9650 |
//! | 9.20 | client config: omitted fields kept, `[]` unsubscribes, TEST_NOTIFICATION before storing, 9728 and nothing stored if it fails |
//! | 9.21 | `tokenExpirationDate` only within 15 days of expiry unless [`SimConfig::always_token_expiration`] |
//! | 9.22-9.24 | booleans `true`/`false`/`1`/`0`; unknown parameters ignored; bad enum values 9602; unknown paths 404 / 9602; wrong method 405 / 9726; missing `pricingParam` = STDQ |
//! | 9.25 | `retiredCount` 0; retired users' assignments still count |
//! | 9.26 | errors never come with HTTP 200 except through [`Faults::error_body_with_200_next`] |
//! | 9.27 | users and serials in one request, limits per list |
//! | 9.28 | read-only tokens get 403 / 9637 on the six management POSTs |
//!
//! Control endpoints outside `/mdm/v2` (no token needed) let tests drive a
//! simulator that runs as its own process (`vppd sim`):
//!
//! - `GET /_sim/requests`: the request log, as a JSON array; `DELETE` clears it.
//! - `GET /_sim/faults`, `POST /_sim/faults`: the [`Faults`] as JSON with
//!   the Rust field names (`fail_next_with_429`, ...); a POST may carry only
//!   some fields, the others keep their values.
//! - `GET /_sim/limits`, `POST /_sim/limits`: the [`Limits`] as JSON with the
//!   service config key names (`maxAssets`, ..., `maxRequestPerSecond`:
//!   number or null); partial bodies allowed.
//! - `POST /_sim/licenses`: `{"token": "<fingerprint>", "adamId": "...",
//!   "pricingParam": "STDQ", "delta": 10}` as [`Simulator::add_licenses`].
//!   `token` is the token's fingerprint ([`crate::apple::token::fingerprint`],
//!   never the secret itself) and may be left out when only one token is loaded.
//! - `POST /_sim/invitations`: `{"token": "<fingerprint>", "clientUserId":
//!   "..."}` as [`Simulator::accept_invitation`]; or `{"all": true}`: every
//!   user waiting for an invitation accepts it now, answered with
//!   `{"accepted": ["client-1", ...]}`.
//! - `GET /_sim/invitations/acceptance`: `{"mode": "off"}` (or `"all"`, or
//!   `"rate"` with `"perSecond": 5.0`) plus `"waiting"`, the users still
//!   `Registered`; `POST` with `{"mode": "off" | "all"}` or `{"mode":
//!   "rate", "perSecond": N}` sets the [`InvitationAcceptance`] (`vppd sim
//!   --accept-invitations all|RATE` at start).
//! - `GET /_sim/stats`: notification counters plus `busy` (events and
//!   deliveries still in flight).
//! - `GET /_sim/tokens`: fingerprint, `uId` and organization name per token.
//! - `GET /_sim/hold`: `{"all": false, "next": 0, "afterTasks": 0, "held":
//!   [{"token", "eventId", "eventType", "numRequested", "numCompleted",
//!   "heldMs"}]}`, the [`HoldSettings`] and the events held now.
//!   `POST /_sim/hold` with some of `all`, `next`, `afterTasks` changes the
//!   settings (events already held stay held); `vppd sim --hold-pending
//!   all|N --hold-after-tasks N` sets them at start.
//! - `POST /_sim/hold/release`: `{"eventIds": [...]}` releases those held
//!   events (all of them without `eventIds`; `"token": "<fingerprint>"`
//!   narrows to one token) and answers `{"released": [...], "notHeld": [...]}`.
//! - `POST /_sim/versions/forget`: every `versionId` issued so far becomes
//!   too old: a `sinceVersionId` naming one gives 9721, as Apple answers
//!   once it no longer keeps that version's changes. Answers `{}`.
//! - `GET /_sim/changes`: the changes made by hand so far, oldest first,
//!   each `{"id", "token", "action", "eventId", "state": "scheduled" |
//!   "made" | "failed", "dueMs", "error"}` ([`ManualRecord`]). `POST
//!   /_sim/changes` with a [`ManualChange`], `{"action": "associate" |
//!   "disassociate" | "revoke" | "licenses", "assets": [{"adamId",
//!   "pricingParam"}], "serialNumbers": [...], "clientUserIds": [...],
//!   "delta": 5, "token": "<fingerprint>", "after": "30s"}` (only what the
//!   action needs; every token without `token`; at once without `after`),
//!   makes the change a person would make in Apple School/Business Manager
//!   and answers `{"changes": [...]}` with one record per token, carrying
//!   the eventId it is processed as. `vppd sim --change SPEC` (repeatable)
//!   schedules the same from the command line at start; against a running
//!   `vppd sim`, a shell uses this endpoint (curl). What such a change does
//!   is described in `manual.rs`.
//!
//! The simulator also answers the `invitationEmail` URL it publishes
//! (`GET /mdm/v2/invitation?inviteCode=...`), which accepts the invitation as
//! a person clicking Apple's link would. The `contentMetadataLookup` URL it
//! publishes (`/mdm/v2/lookup`) is not served: store metadata is outside the
//! API this simulator models, so it answers 404 like any unknown path.

pub mod cli;
mod control;
mod handlers;
mod invitations;
mod manual;
mod notify;
mod pairs;
mod process;
mod server;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::apple::token::{ParseError, SToken};
use crate::apple::types::{self, Assignment, Limits};

pub use manual::{ManualAction, ManualChange, ManualRecord, parse_change};
use notify::Notifier;
use state::Org;

/// How the simulated Apple behaves; fixed for the life of a [`Simulator`]
/// except the limits ([`Simulator::set_limits`]).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Published in `/service/config` and enforced.
    pub limits: Limits,
    /// Records per page of Get Assets, Get Assignments and Get Users.
    pub page_size: usize,
    /// Pace of event processing; `None` processes as fast as possible.
    pub assignments_per_second: Option<f64>,
    /// Fixed delay between accepting an event and starting to process it.
    pub event_delay: Duration,
    /// Enforce `maxRequestPerSecond` (when published) with a token bucket per token.
    pub enforce_rate_limit: bool,
    /// Added to every HTTP answer.
    pub latency: Duration,
    /// Probability of a 503 / 9729 (`Retry-After: 1`) on any request.
    pub error_5xx_rate: f64,
    pub notifications: NotificationFaults,
    /// `false`: `http://` notification URLs are allowed for loopback hosts.
    /// `true`: only `https://` (else 9712).
    pub strict_https: bool,
    /// Include `tokenExpirationDate` in every response, not only within 15
    /// days of the token's expiry.
    pub always_token_expiration: bool,
    /// Disassociating a pair that does not exist fails with 9610 instead of
    /// succeeding (section 9 item 2, alternative mode).
    pub disassociate_missing_fails: bool,
    /// On a shortfall, no pair of the asset in that event gets a license
    /// (section 9 item 3, alternative mode).
    pub shortfall_all_or_nothing: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            limits: Limits::default(),
            page_size: 1000,
            assignments_per_second: None,
            event_delay: Duration::ZERO,
            enforce_rate_limit: true,
            latency: Duration::ZERO,
            error_5xx_rate: 0.0,
            notifications: NotificationFaults::default(),
            strict_https: false,
            always_token_expiration: false,
            disassociate_missing_fails: false,
            shortfall_all_or_nothing: false,
        }
    }
}

/// Notification delivery: size, retries and faults.
#[derive(Debug, Clone)]
pub struct NotificationFaults {
    /// At most this many assignments or users per notification.
    pub max_items: usize,
    /// Probability that a notification is never delivered.
    pub drop_rate: f64,
    /// Probability that a notification is delivered twice (same `notificationId`).
    pub duplicate_rate: f64,
    /// Delivery order is shuffled within windows of this many notifications;
    /// 0 or 1 keeps the order.
    pub reorder_window: usize,
    /// Wait before the first attempt.
    pub delay: Duration,
    /// Delivery attempts in total before giving up.
    pub attempts: u32,
    /// Waits before attempt 2, 3, ...; the last value repeats if there are
    /// more attempts than values.
    pub retry_spacing: Vec<Duration>,
    /// A slower answer counts as a failed attempt.
    pub attempt_timeout: Duration,
    /// Deliveries in flight per token. Attempts start in order; with more
    /// than one in flight, arrival order at the receiver can still vary.
    pub concurrency: usize,
}

impl Default for NotificationFaults {
    fn default() -> Self {
        NotificationFaults {
            max_items: 100,
            drop_rate: 0.0,
            duplicate_rate: 0.0,
            reorder_window: 0,
            delay: Duration::ZERO,
            attempts: 3,
            retry_spacing: vec![Duration::from_secs(30), Duration::from_secs(90)],
            attempt_timeout: Duration::from_secs(10),
            concurrency: 8,
        }
    }
}

/// An asset a simulated organization owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimAsset {
    /// Digits only.
    pub adam_id: String,
    /// `STDQ` or `PLUS`.
    pub pricing_param: String,
    /// `App` or `Book`.
    pub product_type: String,
    /// Licenses owned; `None` for an unlimited free asset.
    pub total: Option<u32>,
    pub device_assignable: bool,
    pub revocable: bool,
}

impl SimAsset {
    /// A standard-quality app, device-assignable and revocable, for iOS and macOS.
    pub fn app(adam_id: &str, total: Option<u32>) -> SimAsset {
        SimAsset {
            adam_id: adam_id.to_string(),
            pricing_param: types::STDQ.to_string(),
            product_type: "App".to_string(),
            total,
            device_assignable: true,
            revocable: true,
        }
    }
}

/// A token to serve, with the organization's initial assets.
#[derive(Clone)]
pub struct SimToken {
    /// The token file's text, Base64 as Apple ships it.
    pub stoken: String,
    pub assets: Vec<SimAsset>,
    /// Management POSTs get 403 / 9637.
    pub read_only: bool,
}

impl std::fmt::Debug for SimToken {
    // The token text is a credential in the real world; keep the habit.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimToken")
            .field("stoken", &"<redacted>")
            .field("assets", &self.assets)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Faults switched at run time. Counters count down as they fire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// The next N authenticated requests get 429 / 9646 with `Retry-After`.
    pub fail_next_with_429: u32,
    /// `Retry-After` seconds sent with the 429 and 503 faults.
    pub retry_after_secs: u64,
    /// Send `Retry-After` as an HTTP date instead of seconds.
    pub retry_after_http_date: bool,
    /// The next N authenticated requests answer HTTP 200 with an error body
    /// (9603) and do nothing (reference 8.6, section 9 item 26).
    pub error_body_with_200_next: u32,
    /// The next N accepted management POSTs create their event, which is then
    /// processed, but the connection is closed without any answer.
    pub cut_connection_after_processing_next: u32,
    /// The next N requests get 503 / 9729 and do nothing.
    pub error_5xx_next: u32,
    /// Every authenticated request gets 401 / 9625.
    pub revoked: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_next_with_429: 0,
            retry_after_secs: 1,
            retry_after_http_date: false,
            error_body_with_200_next: 0,
            cut_connection_after_processing_next: 0,
            error_5xx_next: 0,
            revoked: false,
        }
    }
}

/// Events held `PENDING`, as Apple's guide foresees (section 6: "if it is
/// still PENDING after 10 minutes, retry the request"). A held event stops
/// after [`HoldSettings::after_tasks`] tasks (those are decided and notified)
/// and leaves the token's queue, so the events behind it, a resubmission
/// included, are processed. Released ([`Simulator::release_held`]), it is
/// queued again behind whatever is waiting and goes on from where it
/// stopped, as a late original would: its associations of pairs the
/// resubmission already made succeed without using a license (section 9
/// item 1), its disassociations of pairs already gone are no-op successes
/// (item 2), and its notifications carry its own eventId. Never released, it
/// stays `PENDING` for good. Only events from client requests are held, not
/// changes made by hand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HoldSettings {
    /// Hold every new event.
    pub all: bool,
    /// Hold the next N new events; counts down.
    pub next: u32,
    /// Tasks a held event processes before it stops.
    pub after_tasks: u32,
}

/// How `Registered` users accept their invitations (reference 3.11: the
/// user follows the `invitationEmail` link; the user becomes `Associated`
/// and USER_ASSOCIATED is sent, at most `maxItems` users a notification).
/// Users wait in the order their CREATE registered them; one linked by a
/// Managed Apple Account never waits.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "camelCase")]
pub enum InvitationAcceptance {
    /// Only when told ([`Simulator::accept_invitation`], `/_sim/invitations`,
    /// or a GET of the invitation link).
    #[default]
    Off,
    /// Every waiting user accepts at once, and each one registered later
    /// right after its CREATE is notified.
    All,
    /// Waiting users accept at this pace per token, oldest first.
    Rate {
        #[serde(rename = "perSecond")]
        per_second: f64,
    },
}

impl InvitationAcceptance {
    fn check(self) -> Result<Self, String> {
        match self {
            InvitationAcceptance::Rate { per_second }
                if !(per_second.is_finite() && per_second > 0.0) =>
            {
                Err(format!(
                    "perSecond must be a positive number of users per second, not {per_second}"
                ))
            }
            ok => Ok(ok),
        }
    }
}

/// An event held `PENDING`, as `GET /_sim/hold` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldEvent {
    /// Fingerprint of the token.
    pub token: String,
    pub event_id: String,
    pub event_type: String,
    pub num_requested: u64,
    pub num_completed: u64,
    /// How long it has been held, in milliseconds.
    pub held_ms: u64,
}

/// One request the simulator answered (or cut), for assertions.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    /// The path after `/mdm/v2`, e.g. `/assets/associate`.
    pub path: String,
    /// The raw query string, empty if none.
    pub query: String,
    /// The HTTP status answered; 0 when the connection was cut instead.
    pub status: u16,
    pub error_number: Option<i32>,
    /// When the request arrived.
    pub at: Instant,
    /// Fingerprint of the bearer presented, if any.
    pub token_fingerprint: Option<String>,
    /// The parsed JSON body of a POST.
    pub body: Option<serde_json::Value>,
    /// The event the request created.
    pub event_id: Option<String>,
}

/// Notification delivery counters, over all tokens. TEST_NOTIFICATIONs sent
/// for client config are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NotificationStats {
    /// Notifications built for a subscribed type (before faults).
    pub generated: u64,
    /// Deliveries answered with 2xx (a duplicate counts again).
    pub delivered: u64,
    pub attempts: u64,
    pub failed_attempts: u64,
    pub dropped_by_fault: u64,
    pub duplicated: u64,
    /// Deliveries abandoned after the last attempt.
    pub given_up: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid sToken: {0}")]
    Token(#[from] ParseError),
    #[error(transparent)]
    TokenFile(#[from] crate::apple::token::TokenError),
    #[error(
        "cannot write a generated sToken to {path}: {source} (check that its directory exists and is writable)"
    )]
    TokenFileWrite {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("this sToken is already loaded in the simulator")]
    DuplicateToken,
    #[error("the simulator has no such sToken")]
    UnknownToken,
    #[error("invalid asset {adam_id}: {reason}")]
    InvalidAsset { adam_id: String, reason: String },
    #[error("the organization owns no asset {adam_id} ({pricing})")]
    UnknownAsset { adam_id: String, pricing: String },
    #[error("license change refused for {adam_id}: {reason}")]
    Licenses { adam_id: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("no registered user {client_user_id} is waiting for an invitation")]
    NoPendingInvitation { client_user_id: String },
    #[error("cannot build the notification HTTP client: {0}")]
    HttpClient(String),
    #[error("signal handling failed: {0}")]
    Signal(std::io::Error),
}

/// What the HTTP handlers, the event tasks and the notifiers share.
pub(crate) struct Shared {
    pub config: SimConfig,
    pub limits: Mutex<Limits>,
    pub faults: Mutex<Faults>,
    pub hold: Mutex<HoldSettings>,
    pub invitations: tokio::sync::watch::Sender<InvitationAcceptance>,
    pub manual: Mutex<manual::ManualLog>,
    pub orgs: RwLock<HashMap<String, Arc<Org>>>,
    pub log: Mutex<RequestLog>,
    pub stats: notify::Stats,
    /// Events not yet finished plus notification deliveries not yet finished.
    pub busy: AtomicUsize,
    pub base_url: String,
    pub http: reqwest::Client,
    pub runtime: tokio::runtime::Handle,
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
    pub started: Instant,
}

impl Shared {
    pub fn forget_versions(&self) {
        for org in read(&self.orgs).values() {
            lock(&org.data).forget_versions();
        }
    }

    pub fn org(&self, bearer: &str) -> Option<Arc<Org>> {
        read(&self.orgs).get(bearer).cloned()
    }

    pub fn org_by_fingerprint(&self, fingerprint: Option<&str>) -> Option<Arc<Org>> {
        let orgs = read(&self.orgs);
        match fingerprint {
            Some(fp) => orgs.values().find(|o| o.fingerprint == fp).cloned(),
            None if orgs.len() == 1 => orgs.values().next().cloned(),
            None => None,
        }
    }

    pub fn limits(&self) -> Limits {
        *lock(&self.limits)
    }

    pub fn invitation_acceptance(&self) -> InvitationAcceptance {
        *self.invitations.borrow()
    }

    /// Changes how users accept invitations; `all` accepts whoever waits now.
    pub fn set_invitation_acceptance(&self, mode: InvitationAcceptance) -> Result<(), String> {
        let mode = mode.check()?;
        self.invitations.send_replace(mode);
        if mode == InvitationAcceptance::All {
            self.accept_all_waiting(None);
        }
        Ok(())
    }

    /// Every user waiting for an invitation accepts it now (of one token
    /// when `token` names its fingerprint); returns their clientUserIds.
    pub fn accept_all_waiting(&self, token: Option<&str>) -> Vec<String> {
        let orgs: Vec<Arc<Org>> = read(&self.orgs).values().cloned().collect();
        let mut accepted = Vec::new();
        for org in orgs {
            if token.is_none_or(|t| t == org.fingerprint) {
                accepted.extend(org.accept_waiting(self, usize::MAX));
            }
        }
        accepted
    }

    /// Whether the event being accepted is to be held, and after how many tasks.
    pub fn take_hold(&self) -> Option<u64> {
        let mut hold = lock(&self.hold);
        if hold.all {
            return Some(u64::from(hold.after_tasks));
        }
        if hold.next > 0 {
            hold.next -= 1;
            return Some(u64::from(hold.after_tasks));
        }
        None
    }

    pub fn held_events(&self) -> Vec<HeldEvent> {
        let orgs: Vec<Arc<Org>> = read(&self.orgs).values().cloned().collect();
        let mut out = Vec::new();
        for org in orgs {
            let held = lock(&org.held);
            let data = lock(&org.data);
            for parked in held.iter() {
                let (requested, completed) = data
                    .events
                    .get(&parked.event_id)
                    .map_or((0, 0), |e| (e.num_requested, e.num_completed));
                out.push(HeldEvent {
                    token: org.fingerprint.clone(),
                    event_id: parked.event_id.clone(),
                    event_type: parked.event_type.to_string(),
                    num_requested: requested,
                    num_completed: completed,
                    held_ms: parked.held_at.elapsed().as_millis() as u64,
                });
            }
        }
        out
    }

    /// Queues held events again: those named, or all of them (of one token
    /// when `token` names its fingerprint). Returns the eventIds released.
    pub fn release_held(&self, token: Option<&str>, event_ids: Option<&[String]>) -> Vec<String> {
        let orgs: Vec<Arc<Org>> = read(&self.orgs).values().cloned().collect();
        let mut released = Vec::new();
        for org in orgs {
            if token.is_some_and(|t| t != org.fingerprint) {
                continue;
            }
            let chosen: Vec<process::Parked> = {
                let mut held = lock(&org.held);
                let (chosen, kept) = std::mem::take(&mut *held)
                    .into_iter()
                    .partition(|p| event_ids.is_none_or(|ids| ids.contains(&p.event_id)));
                *held = kept;
                chosen
            };
            for parked in chosen {
                let event_id = parked.event_id.clone();
                self.busy_add(1);
                if org.jobs.send(process::Work::Resume(parked)).is_err() {
                    self.busy_done();
                    continue;
                }
                released.push(event_id);
            }
        }
        released
    }

    pub fn busy_add(&self, n: usize) {
        self.busy.fetch_add(n, Ordering::SeqCst);
    }

    pub fn busy_done(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The request log keeps arrival order although answers finish out of order:
/// each request takes a sequence number when it arrives.
#[derive(Default)]
pub(crate) struct RequestLog {
    next_seq: u64,
    /// Requests that arrived before this were cleared, even if they finish later.
    cleared_before: u64,
    entries: BTreeMap<u64, LoggedRequest>,
}

impl RequestLog {
    pub fn arrive(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub fn record(&mut self, seq: u64, entry: LoggedRequest) {
        if seq >= self.cleared_before {
            self.entries.insert(seq, entry);
        }
    }

    pub fn entries(&self) -> Vec<LoggedRequest> {
        self.entries.values().cloned().collect()
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.cleared_before = self.next_seq + 1;
    }
}

/// Locks a std mutex, ignoring poisoning: a panic in one request must not
/// turn every later request of a long simulator run into a panic too. No
/// critical section here calls anything expected to panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// A running simulator.
pub struct Simulator {
    shared: Arc<Shared>,
    server: server::SimServer,
}

impl Simulator {
    /// Binds `listen` (e.g. `127.0.0.1:0`) and starts serving.
    pub async fn start(config: SimConfig, listen: &str) -> Result<Simulator, SimError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| SimError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        // No proxy: notification receivers sit next to the simulator (loopback
        // in tests and the demo), and a proxy from the environment would
        // swallow those deliveries.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(config.notifications.concurrency.max(1) * 2)
            .build()
            .map_err(|e| SimError::HttpClient(e.to_string()))?;
        let shared = Arc::new(Shared {
            limits: Mutex::new(config.limits),
            config,
            faults: Mutex::new(Faults::default()),
            hold: Mutex::new(HoldSettings::default()),
            invitations: tokio::sync::watch::Sender::new(InvitationAcceptance::Off),
            manual: Mutex::new(manual::ManualLog::default()),
            orgs: RwLock::new(HashMap::new()),
            log: Mutex::new(RequestLog::default()),
            stats: notify::Stats::default(),
            busy: AtomicUsize::new(0),
            base_url: format!("http://{}/mdm/v2", reachable(local)),
            http,
            runtime: tokio::runtime::Handle::current(),
            tasks: Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let handler = Arc::new(handlers::SimHandler::new(shared.clone()));
        let server = server::SimServer::start(listener, handler);
        Ok(Simulator { shared, server })
    }

    /// The API's base URL, e.g. `http://127.0.0.1:PORT/mdm/v2`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The address the simulator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves another token (one organization per token).
    pub fn add_token(&self, token: SimToken) -> Result<(), SimError> {
        let parsed = SToken::parse(&token.stoken)?;
        let bearer = parsed.bearer().to_string();
        if read(&self.shared.orgs).contains_key(&bearer) {
            return Err(SimError::DuplicateToken);
        }
        let (jobs_tx, jobs_rx) = tokio::sync::mpsc::unbounded_channel();
        let (notes_tx, notes_rx) = tokio::sync::mpsc::unbounded_channel();
        let org = Arc::new(Org::new(
            &parsed,
            &token.assets,
            token.read_only,
            jobs_tx,
            Notifier::new(notes_tx),
        )?);
        {
            let mut orgs = write(&self.shared.orgs);
            if orgs.contains_key(&bearer) {
                return Err(SimError::DuplicateToken);
            }
            orgs.insert(bearer, org.clone());
        }
        let events = self.shared.runtime.spawn(process::run_events(
            self.shared.clone(),
            org.clone(),
            jobs_rx,
        ));
        let deliveries =
            self.shared
                .runtime
                .spawn(notify::dispatch(self.shared.clone(), org.clone(), notes_rx));
        let acceptor = self
            .shared
            .runtime
            .spawn(invitations::accept_over_time(self.shared.clone(), org));
        let mut tasks = lock(&self.shared.tasks);
        tasks.push(events);
        tasks.push(deliveries);
        tasks.push(acceptor);
        Ok(())
    }

    /// A renewed sToken of the same location, as Apple School/Business
    /// Manager downloads it: `new` serves `old`'s organization (same `uId`,
    /// assets and assignments) and its expiry becomes the organization's.
    /// `old` keeps working, as it does at Apple until it expires.
    pub fn renew_token(&self, old: &str, new: &str) -> Result<(), SimError> {
        let parsed = SToken::parse(new)?;
        let mut orgs = write(&self.shared.orgs);
        let org = orgs
            .get(old.trim())
            .cloned()
            .ok_or(SimError::UnknownToken)?;
        if orgs.contains_key(parsed.bearer()) {
            return Err(SimError::DuplicateToken);
        }
        org.expires_at.store(
            parsed.expires_at().unix_timestamp(),
            std::sync::atomic::Ordering::Relaxed,
        );
        orgs.insert(parsed.bearer().to_string(), org);
        Ok(())
    }

    /// The request log (requests under `/mdm/v2`), in arrival order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).entries()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Replaces the run-time faults.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).clone()
    }

    /// Replaces the hold settings; events already held stay held.
    pub fn set_hold(&self, hold: HoldSettings) {
        *lock(&self.shared.hold) = hold;
    }

    pub fn hold(&self) -> HoldSettings {
        lock(&self.shared.hold).clone()
    }

    /// The events held `PENDING` now, token by token.
    pub fn held_events(&self) -> Vec<HeldEvent> {
        self.shared.held_events()
    }

    /// Lets held events go on ([`HoldSettings`]): those named, or every one
    /// when `event_ids` is `None`. Returns the eventIds released.
    pub fn release_held(&self, event_ids: Option<&[String]>) -> Vec<String> {
        self.shared.release_held(None, event_ids)
    }

    /// Makes every `versionId` issued so far too old for `sinceVersionId`
    /// (9721), on every token: a client must read everything again.
    pub fn forget_versions(&self) {
        self.shared.forget_versions();
    }

    /// Changes the limits that service config publishes and requests must keep.
    pub fn set_limits(&self, limits: Limits) {
        *lock(&self.shared.limits) = limits;
    }

    /// Every current assignment of the token's organization, asset by asset.
    pub fn assignments(&self, stoken: &str) -> Vec<Assignment> {
        let Some(org) = self.shared.org(stoken.trim()) else {
            return Vec::new();
        };
        let data = lock(&org.data);
        data.all_pairs()
            .into_iter()
            .map(|(a, t)| data.assignment(a, t, false))
            .collect()
    }

    /// Whether Apple holds this one assignment now: a point lookup, for
    /// checks that must not copy every assignment out.
    pub fn holds(
        &self,
        stoken: &str,
        adam_id: &str,
        pricing: &str,
        serial: Option<&str>,
        user: Option<&str>,
    ) -> bool {
        let Some(org) = self.shared.org(stoken.trim()) else {
            return false;
        };
        let data = lock(&org.data);
        let Some(asset) = data.find_asset(adam_id, pricing) else {
            return false;
        };
        match (serial, user) {
            (Some(s), _) => data.has_pair_named(asset, state::TargetKind::Serial, s),
            (None, Some(u)) => data.has_pair_named(asset, state::TargetKind::User, u),
            (None, None) => false,
        }
    }

    /// Calls `f` with every serial number holding the asset now, without
    /// copying the assignments out (the demo checks millions this way).
    pub fn for_each_serial_holding(
        &self,
        stoken: &str,
        adam_id: &str,
        pricing: &str,
        f: impl FnMut(&str),
    ) {
        let Some(org) = self.shared.org(stoken.trim()) else {
            return;
        };
        let data = lock(&org.data);
        if let Some(asset) = data.find_asset(adam_id, pricing) {
            data.for_each_serial_holding(asset, f);
        }
    }

    /// How many assignments Apple holds now.
    pub fn assignment_count(&self, stoken: &str) -> usize {
        let Some(org) = self.shared.org(stoken.trim()) else {
            return 0;
        };
        lock(&org.data).pair_count()
    }

    /// `(assignedCount, availableCount)` of an asset; `None` available means unlimited.
    pub fn asset_counts(
        &self,
        stoken: &str,
        adam_id: &str,
        pricing: &str,
    ) -> Option<(i64, Option<i64>)> {
        let org = self.shared.org(stoken.trim())?;
        let data = lock(&org.data);
        let asset = data.asset(data.find_asset(adam_id, pricing)?);
        Some((
            i64::from(asset.assigned),
            asset
                .total
                .map(|t| i64::from(t) - i64::from(asset.assigned)),
        ))
    }

    /// Adds (or with a negative `delta` removes) licenses, as a purchase,
    /// transfer or refund would, and sends ASSET_COUNT if subscribed. An
    /// asset the organization does not own yet is created as an app when
    /// `delta` is positive.
    pub fn add_licenses(
        &self,
        stoken: &str,
        adam_id: &str,
        pricing: &str,
        delta: i32,
    ) -> Result<(), SimError> {
        let org = self
            .shared
            .org(stoken.trim())
            .ok_or(SimError::UnknownToken)?;
        org.change_licenses(&self.shared, adam_id, pricing, delta)
    }

    /// The user accepts the invitation: `Registered` becomes `Associated`,
    /// and USER_ASSOCIATED is sent if subscribed.
    pub fn accept_invitation(&self, stoken: &str, client_user_id: &str) -> Result<(), SimError> {
        let org = self
            .shared
            .org(stoken.trim())
            .ok_or(SimError::UnknownToken)?;
        org.accept_invitation(&self.shared, client_user_id)
    }

    /// Makes (or, with `after`, schedules) a change by hand on the token
    /// named, or on every token: see [`ManualChange`]. Returns one record
    /// per token, with the eventId the change is processed as.
    pub fn change_by_hand(&self, change: ManualChange) -> Result<Vec<ManualRecord>, SimError> {
        manual::make(&self.shared, change).map_err(SimError::Invalid)
    }

    /// Milliseconds since the simulator started (the clock of
    /// [`ManualRecord::due_ms`] and the request log's `atMs`).
    pub fn uptime_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// The changes made or scheduled by hand so far, oldest first.
    pub fn changes_by_hand(&self) -> Vec<ManualRecord> {
        lock(&self.shared.manual).records()
    }

    /// Changes how `Registered` users accept their invitations.
    pub fn set_invitation_acceptance(&self, mode: InvitationAcceptance) -> Result<(), SimError> {
        self.shared
            .set_invitation_acceptance(mode)
            .map_err(SimError::Invalid)
    }

    pub fn invitation_acceptance(&self) -> InvitationAcceptance {
        self.shared.invitation_acceptance()
    }

    /// Every user of the token waiting for an invitation accepts it now;
    /// returns their clientUserIds.
    pub fn accept_all_invitations(&self, stoken: &str) -> Result<Vec<String>, SimError> {
        let org = self
            .shared
            .org(stoken.trim())
            .ok_or(SimError::UnknownToken)?;
        Ok(org.accept_waiting(&self.shared, usize::MAX))
    }

    pub fn notifications_sent(&self) -> NotificationStats {
        self.shared.stats.snapshot()
    }

    /// Waits until every accepted event is processed (or held, see
    /// [`HoldSettings`]) and every notification delivery has finished
    /// (delivered or given up); `false` on timeout.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.busy.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops serving and ends every event and delivery task.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// A wildcard listen address is not a URL a client can call.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Counts a stat; all counters are plain totals, so relaxed ordering is enough.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
