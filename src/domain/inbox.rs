//! The stored form of a recorded notification: what the listener writes to
//! the store's inbox (and what parking keeps) once it has read and checked
//! Apple's envelope, and what the applier reads back.
//!
//! Apple's JSON is read once, by the listener; the store keeps a compact
//! binary form of exactly what the applier needs, which the applier reads
//! without JSON and without allocating per assignment (its strings borrow
//! from the stored bytes). A 100-assignment notification of one asset is
//! some 1.4 KB of JSON and about 15 bytes per assignment here.
//!
//! # Format, version 1
//!
//! `varint` is LEB128 (7 bits a byte, low first, at most 10 bytes); `str`
//! is a varint byte length, then that many bytes of UTF-8; `zigzag` is a
//! signed number mapped to a varint (0, -1, 1, -2, …).
//!
//! ```text
//! u8   1                       the format version (never `{` nor JSON
//!                              whitespace: see below)
//! u8   notificationType        0 another type, 1 ASSET_MANAGEMENT,
//!                              2 ASSET_COUNT, 3 USER_MANAGEMENT,
//!                              4 USER_ASSOCIATED, 5 TEST_NOTIFICATION
//! str  notificationType        only for 0: the type as Apple sent it
//! str  notificationId
//! str  uId
//! then by type:
//! ASSET_MANAGEMENT
//!   u8     flags               bit 0: a removal (DISASSOCIATE, REVOKE or
//!                              any type but ASSOCIATE); bit 1: failed
//!   str    eventId
//!   zigzag errorNumber         only when failed
//!   str    errorMessage        only when failed
//!   varint assets              the distinct (adamId, pricingParam) pairs
//!   assets x (str adamId, str pricingParam)
//!   varint runs                consecutive assignments of one asset and
//!                              one target kind, in Apple's order
//!   runs x (varint asset (index into the table), u8 kind (0 serial
//!          number, 1 clientUserId), varint count, count x str target)
//! ASSET_COUNT
//!   str adamId, str pricingParam, zigzag countDelta
//! USER_MANAGEMENT, USER_ASSOCIATED
//!   varint users
//!   users x (str clientUserId, u8 present (bit 0 email, 1 inviteCode,
//!            2 idHash, 3 status), the present ones as str, in that order)
//! TEST_NOTIFICATION, another type: nothing more
//! ```
//!
//! Nothing may follow. Apple sends one asset per ASSET_MANAGEMENT
//! notification, so its assignments are one run: per assignment a length
//! byte and the serial number or clientUserId.
//!
//! # Format, version 2: an ASSET_MANAGEMENT notification as pair numbers
//!
//! When the listener knows the batch of the notification's event (this
//! vppd sent it, see [`crate::runtime::sent`]), it stores the pairs Apple named as
//! their numbers in that batch instead of Apple's strings: a hundred
//! assignments of one asset to consecutive devices are one run of a few
//! bytes, not 1.3 KB. The inbox is the store's most written tree (each
//! entry is written on its own, then again with its neighbours whenever
//! sled rewrites the node), so this is most of what a rollout writes.
//!
//! ```text
//! u8     2                     the format version
//! str    notificationId
//! str    uId
//! u8     flags                 as in version 1
//! str    eventId
//! zigzag errorNumber           only when failed
//! str    errorMessage          only when failed
//! str    jobId                 the batch the event belongs to
//! varint batch
//! u8     phase                 0 disassociate, 2 associate (a revoke
//!                              batch's notifications stay version 1:
//!                              they are decided by the assets Apple names)
//! varint runs                  the pairs in Apple's order, as runs of
//!                              consecutive numbers
//! runs x (zigzag step, varint length)   step: the run's first pair minus
//!                              the end of the run before (0 at first)
//! ```
//!
//! The assignments that name no pair of the batch are left out: the
//! applier would ignore them in version 1 too.
//!
//! An item whose first byte is not a version byte (below 0x09, where no
//! JSON text starts) is a raw JSON envelope, as vppd recorded them before
//! this format; it is read as it was then (by the Apple edge's
//! `apple::report::stored_notification`), so notifications
//! recorded (or parked) by an older vppd are still applied after an
//! upgrade.

use crate::domain::ids::EventId;
use crate::domain::job::{Phase, Target};
use crate::domain::lifecycle::varint::{put_varint, put_zigzag};
use crate::domain::report::{
    Assignee, Assignment, Notification, NotificationBody, ReportedError, UserRecord,
};

/// The format version of a notification as Apple named it.
pub const VERSION: u8 = 1;
/// The format version of an ASSET_MANAGEMENT notification as pair numbers.
pub const PAIRS_VERSION: u8 = 2;
/// More than a notification names (Apple sends at most 100 items): a
/// damaged run is refused, not allocated.
const MAX_PAIRS: u64 = 1 << 16;

/// Apple's notification types with a code of their own.
const TYPES: [(u8, &str); 5] = [
    (
        1,
        crate::domain::report::notification_type::ASSET_MANAGEMENT,
    ),
    (2, crate::domain::report::notification_type::ASSET_COUNT),
    (3, crate::domain::report::notification_type::USER_MANAGEMENT),
    (4, crate::domain::report::notification_type::USER_ASSOCIATED),
    (
        5,
        crate::domain::report::notification_type::TEST_NOTIFICATION,
    ),
];
const OTHER: u8 = 0;
const ASSET_MANAGEMENT: u8 = 1;
const ASSET_COUNT: u8 = 2;
const USER_MANAGEMENT: u8 = 3;
const USER_ASSOCIATED: u8 = 4;

const REMOVAL: u8 = 1;
const FAILED: u8 = 2;

const SERIAL: u8 = 0;
const USER: u8 = 1;

/// Is this stored item in a binary format (rather than a JSON envelope)?
/// Version bytes are below 0x09: no JSON text starts with one.
pub fn is_binary(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|b| *b < 0x09)
}

/// Why a stored notification cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty")]
    Empty,
    #[error(
        "stored in format version {0}, which this vppd does not know (it writes {VERSION} and {PAIRS_VERSION}); was it recorded by a newer vppd?"
    )]
    Version(u8),
    #[error("damaged at byte {at} of {len}: {field} {problem}")]
    Damaged {
        field: &'static str,
        problem: &'static str,
        at: usize,
        len: usize,
    },
}

/// An assignment Apple reported, borrowed from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignmentRef<'a> {
    pub adam_id: &'a str,
    pub pricing_param: &'a str,
    pub target: Target<'a>,
}

impl AssignmentRef<'_> {
    pub fn to_owned(&self) -> Assignment {
        Assignment {
            adam_id: self.adam_id.to_string(),
            pricing_param: self.pricing_param.to_string(),
            assignee: match self.target {
                Target::Serial(s) => Assignee::Serial(s.to_string()),
                Target::User(u) => Assignee::User(u.to_string()),
            },
        }
    }
}

/// A stored notification, read: its strings borrow from the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNotification<'a> {
    pub id: &'a str,
    /// Apple's notificationType, as sent.
    pub kind: &'a str,
    pub uid: &'a str,
    pub body: StoredBody<'a>,
}

/// What a stored notification says; as [`NotificationBody`], borrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredBody<'a> {
    Assets {
        event_id: &'a str,
        /// (errorNumber, errorMessage); `None` on success.
        error: Option<(i32, &'a str)>,
        assignments: Vec<AssignmentRef<'a>>,
        removal: bool,
    },
    LicenseCount {
        adam_id: &'a str,
        pricing_param: &'a str,
        delta: i64,
    },
    /// Few and stored by the applier as they are: owned.
    Users(Vec<UserRecord>),
    /// Nothing to apply (the type is [`StoredNotification::kind`]).
    Other,
}

impl StoredNotification<'_> {
    /// The owned form, as the Apple edge's `read_notification` gives it.
    pub fn to_owned(&self) -> Notification {
        let body = match &self.body {
            StoredBody::Assets {
                event_id,
                error,
                assignments,
                removal,
            } => NotificationBody::Assets {
                event_id: EventId::from(*event_id),
                error: error.map(|(number, message)| ReportedError {
                    number,
                    message: message.to_string(),
                }),
                assignments: assignments.iter().map(AssignmentRef::to_owned).collect(),
                removal: *removal,
            },
            StoredBody::LicenseCount {
                adam_id,
                pricing_param,
                delta,
            } => NotificationBody::LicenseCount {
                adam_id: adam_id.to_string(),
                pricing_param: pricing_param.to_string(),
                delta: *delta,
            },
            StoredBody::Users(users) => NotificationBody::Users(users.clone()),
            StoredBody::Other => NotificationBody::Other(self.kind.to_string()),
        };
        Notification {
            id: self.id.to_string(),
            kind: self.kind.to_string(),
            uid: self.uid.to_string(),
            body,
        }
    }
}

/// A stored ASSET_MANAGEMENT notification in pair numbers (version 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPairs<'a> {
    pub id: &'a str,
    pub uid: &'a str,
    pub event_id: &'a str,
    /// (errorNumber, errorMessage); `None` on success.
    pub error: Option<(i32, &'a str)>,
    pub removal: bool,
    pub job_id: &'a str,
    pub batch: u32,
    pub phase: Phase,
    /// The pairs Apple named, in its order.
    pub pairs: Vec<u32>,
}

/// An inbox item, read: as Apple named it, or as pair numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored<'a> {
    Named(StoredNotification<'a>),
    Pairs(StoredPairs<'a>),
}

// ---- Writing ----------------------------------------------------------------

/// The stored form of [`StoredPairs`] (version 2).
pub fn encode_pairs(p: &StoredPairs<'_>) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + p.id.len() + p.uid.len() + p.event_id.len() + p.job_id.len());
    out.push(PAIRS_VERSION);
    put_str(&mut out, p.id);
    put_str(&mut out, p.uid);
    put_outcome(&mut out, p.removal, p.event_id, p.error);
    put_str(&mut out, p.job_id);
    put_varint(&mut out, u64::from(p.batch));
    out.push(phase_code(p.phase));
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for &pair in &p.pairs {
        match runs.last_mut() {
            Some((start, len)) if u64::from(*start) + *len == u64::from(pair) => *len += 1,
            _ => runs.push((pair, 1)),
        }
    }
    put_varint(&mut out, runs.len() as u64);
    let mut end = 0i64;
    for (start, len) in runs {
        put_zigzag(&mut out, i64::from(start) - end);
        put_varint(&mut out, len);
        end = i64::from(start) + len as i64;
    }
    out
}

fn phase_code(phase: Phase) -> u8 {
    match phase {
        Phase::Disassociate => 0,
        Phase::Revoke => 1,
        Phase::Associate => 2,
    }
}

/// Writes one stored notification. Start with [`Encoder::new`], finish with
/// exactly one of the body methods.
pub struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    /// The header; `capacity` is a guess of the size (the JSON's length
    /// over four fits most).
    pub fn new(kind: &str, id: &str, uid: &str, capacity: usize) -> Encoder {
        let mut out = Vec::with_capacity(capacity.max(64));
        out.push(VERSION);
        match TYPES.iter().find(|(_, t)| *t == kind) {
            Some((code, _)) => out.push(*code),
            None => {
                out.push(OTHER);
                put_str(&mut out, kind);
            }
        }
        put_str(&mut out, id);
        put_str(&mut out, uid);
        Encoder { out }
    }

    /// An ASSET_MANAGEMENT body. `assignments` is walked twice (the asset
    /// table comes first), so it must yield the same items both times.
    pub fn assets<'a, I>(
        mut self,
        event_id: &str,
        removal: bool,
        error: Option<(i32, &str)>,
        assignments: I,
    ) -> Vec<u8>
    where
        I: IntoIterator<Item = AssignmentRef<'a>> + Clone,
    {
        let out = &mut self.out;
        put_outcome(out, removal, event_id, error);
        // The asset table and the runs. Apple sends one asset per
        // notification, so the table is searched last-found first.
        let mut assets: Vec<(&str, &str)> = Vec::new();
        let mut runs: Vec<(usize, u8, u64)> = Vec::new();
        let mut last = 0usize;
        for a in assignments.clone() {
            let index = match assets.get(last) {
                Some(&(id, p)) if id == a.adam_id && p == a.pricing_param => last,
                _ => match assets
                    .iter()
                    .position(|&(id, p)| id == a.adam_id && p == a.pricing_param)
                {
                    Some(i) => i,
                    None => {
                        assets.push((a.adam_id, a.pricing_param));
                        assets.len() - 1
                    }
                },
            };
            last = index;
            let kind = kind_of(a.target);
            match runs.last_mut() {
                Some((i, k, n)) if *i == index && *k == kind => *n += 1,
                _ => runs.push((index, kind, 1)),
            }
        }
        put_varint(out, assets.len() as u64);
        for (adam_id, pricing_param) in &assets {
            put_str(out, adam_id);
            put_str(out, pricing_param);
        }
        put_varint(out, runs.len() as u64);
        let mut items = assignments.into_iter();
        for (index, kind, n) in runs {
            put_varint(out, index as u64);
            out.push(kind);
            put_varint(out, n);
            for a in items.by_ref().take(n as usize) {
                put_str(out, target_str(a.target));
            }
        }
        self.out
    }

    /// An ASSET_COUNT body.
    pub fn license_count(mut self, adam_id: &str, pricing_param: &str, delta: i64) -> Vec<u8> {
        put_str(&mut self.out, adam_id);
        put_str(&mut self.out, pricing_param);
        put_zigzag(&mut self.out, delta);
        self.out
    }

    /// A USER_MANAGEMENT or USER_ASSOCIATED body.
    pub fn users<'a, I>(mut self, users: I) -> Vec<u8>
    where
        I: ExactSizeIterator<Item = &'a UserRecord>,
    {
        let out = &mut self.out;
        put_varint(out, users.len() as u64);
        for u in users {
            put_str(out, &u.client_user_id);
            let fields = [&u.email, &u.invite_code, &u.id_hash, &u.status];
            let present = fields
                .iter()
                .enumerate()
                .filter(|(_, f)| f.is_some())
                .fold(0u8, |bits, (i, _)| bits | 1 << i);
            out.push(present);
            for f in fields.into_iter().flatten() {
                put_str(out, f);
            }
        }
        self.out
    }

    /// A notification with nothing to apply (TEST_NOTIFICATION, another type).
    pub fn other(self) -> Vec<u8> {
        self.out
    }
}

/// The stored form of an owned notification (what the listener writes for
/// the envelope it was read from).
pub fn encode(n: &Notification) -> Vec<u8> {
    let e = Encoder::new(&n.kind, &n.id, &n.uid, 64);
    match &n.body {
        NotificationBody::Assets {
            event_id,
            error,
            assignments,
            removal,
        } => e.assets(
            event_id.as_str(),
            *removal,
            error.as_ref().map(|e| (e.number, e.message.as_str())),
            assignments.iter().map(|a| AssignmentRef {
                adam_id: &a.adam_id,
                pricing_param: &a.pricing_param,
                target: a.assignee.as_target(),
            }),
        ),
        NotificationBody::LicenseCount {
            adam_id,
            pricing_param,
            delta,
        } => e.license_count(adam_id, pricing_param, *delta),
        NotificationBody::Users(users) => e.users(users.iter()),
        NotificationBody::Other(_) => e.other(),
    }
}

/// The stored form of a notification read borrowed (what the listener
/// writes for one read of the Apple edge's scanner).
pub fn encode_borrowed(n: &StoredNotification<'_>) -> Vec<u8> {
    match &n.body {
        StoredBody::Assets {
            event_id,
            error,
            assignments,
            removal,
        } => {
            // The strings, plus a few bytes of framing per assignment.
            let size = assignments
                .iter()
                .map(|a| target_str(a.target).len() + 2)
                .sum::<usize>();
            Encoder::new(n.kind, n.id, n.uid, size + 64).assets(
                event_id,
                *removal,
                *error,
                assignments.iter().copied(),
            )
        }
        StoredBody::LicenseCount {
            adam_id,
            pricing_param,
            delta,
        } => Encoder::new(n.kind, n.id, n.uid, 64).license_count(adam_id, pricing_param, *delta),
        StoredBody::Users(users) => Encoder::new(n.kind, n.id, n.uid, 64).users(users.iter()),
        StoredBody::Other => Encoder::new(n.kind, n.id, n.uid, 64).other(),
    }
}

fn kind_of(t: Target<'_>) -> u8 {
    match t {
        Target::Serial(_) => SERIAL,
        Target::User(_) => USER,
    }
}

fn target_str(t: Target<'_>) -> &str {
    match t {
        Target::Serial(s) | Target::User(s) => s,
    }
}

/// The flags, eventId and error of an ASSET_MANAGEMENT notification, in
/// both formats.
fn put_outcome(out: &mut Vec<u8>, removal: bool, event_id: &str, error: Option<(i32, &str)>) {
    out.push(if removal { REMOVAL } else { 0 } | if error.is_some() { FAILED } else { 0 });
    put_str(out, event_id);
    if let Some((number, message)) = error {
        put_zigzag(out, number as i64);
        put_str(out, message);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

// ---- Reading ----------------------------------------------------------------

/// Reads an inbox item in either binary format ([`is_binary`]).
pub fn decode_item(bytes: &[u8]) -> Result<Stored<'_>, DecodeError> {
    match bytes.first() {
        Some(&PAIRS_VERSION) => decode_pairs(bytes).map(Stored::Pairs),
        _ => decode(bytes).map(Stored::Named),
    }
}

fn decode_pairs(bytes: &[u8]) -> Result<StoredPairs<'_>, DecodeError> {
    let mut r = Reader { bytes, at: 1 };
    let id = r.str("notificationId")?;
    let uid = r.str("uId")?;
    let (removal, event_id, error) = r.outcome()?;
    let job_id = r.str("jobId")?;
    let batch =
        u32::try_from(r.varint("batch")?).map_err(|_| r.damaged("batch", "out of range"))?;
    let phase = match r.u8("phase")? {
        0 => Phase::Disassociate,
        2 => Phase::Associate,
        _ => return Err(r.damaged("phase", "unknown")),
    };
    let n_runs = r.count("run count")?;
    let mut pairs = Vec::new();
    let mut end = 0i64;
    for _ in 0..n_runs {
        let start = end
            .checked_add(r.zigzag("run step")?)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| r.damaged("run step", "out of range"))?;
        let len = r.varint("run length")?;
        if len == 0 || pairs.len() as u64 + len > MAX_PAIRS {
            return Err(r.damaged("run length", "out of range"));
        }
        let last = u64::from(start) + len - 1;
        if last > u64::from(u32::MAX) {
            return Err(r.damaged("run length", "out of range"));
        }
        pairs.extend(start..=last as u32);
        end = last as i64 + 1;
    }
    if r.at != bytes.len() {
        return Err(r.damaged("end", "followed by more bytes"));
    }
    Ok(StoredPairs {
        id,
        uid,
        event_id,
        error,
        removal,
        job_id,
        batch,
        phase,
        pairs,
    })
}

/// Reads a stored notification in the binary format ([`is_binary`]).
/// Everything is checked here, so a damaged item is refused whole rather
/// than applied in part.
pub fn decode(bytes: &[u8]) -> Result<StoredNotification<'_>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    match r.u8("format version") {
        Ok(VERSION) => {}
        Ok(v) => return Err(DecodeError::Version(v)),
        Err(_) => return Err(DecodeError::Empty),
    }
    let code = r.u8("notificationType")?;
    let kind = match code {
        OTHER => r.str("notificationType")?,
        _ => match TYPES.iter().find(|(c, _)| *c == code) {
            Some((_, t)) => *t,
            None => return Err(r.damaged("notificationType", "unknown code")),
        },
    };
    let id = r.str("notificationId")?;
    let uid = r.str("uId")?;
    let body = match code {
        ASSET_MANAGEMENT => {
            let (removal, event_id, error) = r.outcome()?;
            let n_assets = r.count("asset count")?;
            let mut assets = Vec::with_capacity(n_assets);
            for _ in 0..n_assets {
                assets.push((r.str("adamId")?, r.str("pricingParam")?));
            }
            let n_runs = r.count("run count")?;
            let mut assignments = Vec::new();
            for _ in 0..n_runs {
                let &(adam_id, pricing_param) = assets
                    .get(r.count("asset index")?)
                    .ok_or_else(|| r.damaged("asset index", "out of the table"))?;
                let kind = r.u8("target kind")?;
                if kind != SERIAL && kind != USER {
                    return Err(r.damaged("target kind", "unknown"));
                }
                let n = r.count("run length")?;
                assignments.reserve(n);
                for _ in 0..n {
                    let t = r.str("target")?;
                    assignments.push(AssignmentRef {
                        adam_id,
                        pricing_param,
                        target: if kind == SERIAL {
                            Target::Serial(t)
                        } else {
                            Target::User(t)
                        },
                    });
                }
            }
            StoredBody::Assets {
                event_id,
                error,
                assignments,
                removal,
            }
        }
        ASSET_COUNT => StoredBody::LicenseCount {
            adam_id: r.str("adamId")?,
            pricing_param: r.str("pricingParam")?,
            delta: r.zigzag("countDelta")?,
        },
        USER_MANAGEMENT | USER_ASSOCIATED => {
            let n = r.count("user count")?;
            let mut users = Vec::with_capacity(n);
            for _ in 0..n {
                let client_user_id = r.str("clientUserId")?.to_string();
                let present = r.u8("user fields")?;
                if present & !0x0f != 0 {
                    return Err(r.damaged("user fields", "unknown bits"));
                }
                let mut field = |bit: u8, what| -> Result<Option<String>, DecodeError> {
                    if present & (1 << bit) == 0 {
                        return Ok(None);
                    }
                    Ok(Some(r.str(what)?.to_string()))
                };
                users.push(UserRecord {
                    client_user_id,
                    email: field(0, "email")?,
                    invite_code: field(1, "inviteCode")?,
                    id_hash: field(2, "idHash")?,
                    status: field(3, "status")?,
                });
            }
            StoredBody::Users(users)
        }
        _ => StoredBody::Other,
    };
    if r.at != bytes.len() {
        return Err(r.damaged("end", "followed by more bytes"));
    }
    Ok(StoredNotification {
        id,
        kind,
        uid,
        body,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn damaged(&self, field: &'static str, problem: &'static str) -> DecodeError {
        DecodeError::Damaged {
            field,
            problem,
            at: self.at,
            len: self.bytes.len(),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| self.damaged(what, "truncated"))?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.damaged(what, "over 10 bytes"))
    }

    fn zigzag(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let v = self.varint(what)?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// A count of things still to read: each takes at least a byte, so a
    /// count over the bytes left is damage (and never a huge allocation).
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.varint(what)?;
        match usize::try_from(n) {
            Ok(n) if n <= self.bytes.len() - self.at => Ok(n),
            _ => Err(self.damaged(what, "over the bytes left")),
        }
    }

    /// What an ASSET_MANAGEMENT notification reports, as
    /// [`put_outcome`] writes it: (removal, eventId, error).
    #[allow(clippy::type_complexity)]
    fn outcome(&mut self) -> Result<(bool, &'a str, Option<(i32, &'a str)>), DecodeError> {
        let flags = self.u8("flags")?;
        if flags & !(REMOVAL | FAILED) != 0 {
            return Err(self.damaged("flags", "unknown bits"));
        }
        let event_id = self.str("eventId")?;
        let error = if flags & FAILED != 0 {
            let number = i32::try_from(self.zigzag("errorNumber")?)
                .map_err(|_| self.damaged("errorNumber", "out of range"))?;
            Some((number, self.str("errorMessage")?))
        } else {
            None
        };
        Ok((flags & REMOVAL != 0, event_id, error))
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.varint(what)?;
        let start = self.at;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| self.damaged(what, "truncated"))?;
        let s = std::str::from_utf8(&self.bytes[start..end])
            .map_err(|_| self.damaged(what, "not UTF-8"))?;
        self.at = end;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        // Empty, plain, and multi-byte text (lengths over 127 take a
        // two-byte varint).
        prop_oneof![
            Just(String::new()),
            "[A-Z0-9-]{1,14}",
            "\\PC{0,40}",
            "[a-z]{120,200}",
        ]
    }

    fn assignment() -> impl Strategy<Value = Assignment> {
        (
            prop_oneof!["[0-9]{1,4}", text()],
            prop_oneof![Just("STDQ".to_string()), Just("PLUS".to_string()), text()],
            any::<bool>(),
            text(),
        )
            .prop_map(|(adam_id, pricing_param, user, t)| Assignment {
                adam_id,
                pricing_param,
                assignee: if user {
                    Assignee::User(t)
                } else {
                    Assignee::Serial(t)
                },
            })
    }

    fn user() -> impl Strategy<Value = UserRecord> {
        (
            text(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        )
            .prop_map(
                |(client_user_id, email, invite_code, id_hash, status)| UserRecord {
                    client_user_id,
                    email,
                    invite_code,
                    id_hash,
                    status,
                },
            )
    }

    fn notification() -> impl Strategy<Value = Notification> {
        let kind = prop_oneof![
            Just(crate::domain::report::notification_type::ASSET_MANAGEMENT.to_string()),
            Just(crate::domain::report::notification_type::ASSET_COUNT.to_string()),
            Just(crate::domain::report::notification_type::USER_MANAGEMENT.to_string()),
            Just(crate::domain::report::notification_type::USER_ASSOCIATED.to_string()),
            Just(crate::domain::report::notification_type::TEST_NOTIFICATION.to_string()),
            text(),
        ];
        let assets = (
            text(),
            proptest::option::of((any::<i32>(), text())),
            // A few assets, so that runs and the table repeat.
            proptest::collection::vec(assignment(), 0..4),
            proptest::collection::vec((0usize..4, any::<bool>(), text()), 0..120),
            any::<bool>(),
        )
            .prop_map(|(event_id, error, assets, items, removal)| {
                let assignments = items
                    .into_iter()
                    .filter_map(|(i, user, t)| {
                        let a = assets.get(i % assets.len().max(1))?;
                        Some(Assignment {
                            adam_id: a.adam_id.clone(),
                            pricing_param: a.pricing_param.clone(),
                            assignee: if user {
                                Assignee::User(t)
                            } else {
                                Assignee::Serial(t)
                            },
                        })
                    })
                    .collect();
                NotificationBody::Assets {
                    event_id: event_id.into(),
                    error: error.map(|(number, message)| ReportedError { number, message }),
                    assignments,
                    removal,
                }
            });
        (
            kind,
            text(),
            text(),
            assets,
            (text(), text(), any::<i32>()),
            proptest::collection::vec(user(), 0..5),
        )
            .prop_map(|(kind, id, uid, assets, count, users)| {
                use crate::domain::report::notification_type as t;
                let body = match kind.as_str() {
                    t::ASSET_MANAGEMENT => assets,
                    t::ASSET_COUNT => NotificationBody::LicenseCount {
                        adam_id: count.0,
                        pricing_param: count.1,
                        delta: count.2 as i64,
                    },
                    t::USER_MANAGEMENT | t::USER_ASSOCIATED => NotificationBody::Users(users),
                    other => NotificationBody::Other(other.to_string()),
                };
                Notification {
                    id,
                    kind,
                    uid,
                    body,
                }
            })
    }

    proptest! {
        #[test]
        fn every_notification_survives_the_round_trip(n in notification()) {
            let stored = encode(&n);
            prop_assert!(is_binary(&stored));
            let read = decode(&stored).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(read.to_owned(), n);
        }

        #[test]
        fn a_damaged_item_is_refused_or_read_whole(
            n in notification(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bits in 1u8..=255,
        ) {
            let stored = encode(&n);
            // Cut short: always refused (nothing may be left out unnoticed).
            let short = &stored[..cut.index(stored.len())];
            prop_assert!(decode(short).is_err());
            // A byte changed: refused, or read as some whole notification,
            // never a panic.
            let mut changed = stored.clone();
            let at = flip.index(changed.len());
            changed[at] ^= bits;
            let _ = decode(&changed);
        }
    }

    /// id, uId, eventId, error, removal, job, batch, associate?, pairs.
    type Pairs = (
        String,
        String,
        String,
        Option<(i32, String)>,
        bool,
        String,
        u32,
        bool,
        Vec<u32>,
    );

    fn pairs() -> impl Strategy<Value = Pairs> {
        (
            text(),
            text(),
            text(),
            proptest::option::of((any::<i32>(), text())),
            any::<bool>(),
            text(),
            any::<u32>(),
            any::<bool>(),
            // Runs, repeats, steps back, and the ends of the range.
            proptest::collection::vec(
                prop_oneof![0u32..300, Just(u32::MAX), Just(u32::MAX - 1), any::<u32>()],
                0..120,
            ),
        )
    }

    fn as_stored(p: &Pairs) -> StoredPairs<'_> {
        StoredPairs {
            id: &p.0,
            uid: &p.1,
            event_id: &p.2,
            error: p.3.as_ref().map(|(n, m)| (*n, m.as_str())),
            removal: p.4,
            job_id: &p.5,
            batch: p.6,
            phase: if p.7 {
                Phase::Associate
            } else {
                Phase::Disassociate
            },
            pairs: p.8.clone(),
        }
    }

    proptest! {
        #[test]
        fn every_pair_form_survives_the_round_trip(p in pairs()) {
            let want = as_stored(&p);
            let stored = encode_pairs(&want);
            prop_assert!(is_binary(&stored));
            let read = decode_item(&stored).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(read, Stored::Pairs(want));
        }

        #[test]
        fn a_damaged_pair_form_is_refused_or_read_whole(
            p in pairs(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bits in 1u8..=255,
        ) {
            let stored = encode_pairs(&as_stored(&p));
            prop_assert!(decode_item(&stored[..cut.index(stored.len())]).is_err());
            let mut changed = stored.clone();
            let at = flip.index(changed.len());
            changed[at] ^= bits;
            let _ = decode_item(&changed);
        }

        #[test]
        fn a_named_item_reads_as_named(n in notification()) {
            let stored = encode(&n);
            match decode_item(&stored) {
                Ok(Stored::Named(read)) => prop_assert_eq!(read.to_owned(), n),
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            }
        }
    }

    #[test]
    fn a_pair_form_names_its_damage() {
        let p = StoredPairs {
            id: "n",
            uid: "7",
            event_id: "e",
            error: None,
            removal: false,
            job_id: "j",
            batch: 3,
            phase: Phase::Associate,
            pairs: vec![5, 6, 7, 2],
        };
        let stored = encode_pairs(&p);
        let mut revoke = stored.clone();
        // The phase byte follows the job id and the batch.
        let phase_at = 1 + 2 + 2 + 1 + 2 + 2 + 1;
        assert_eq!(revoke[phase_at], 2);
        revoke[phase_at] = 1;
        assert!(matches!(
            decode_item(&revoke),
            Err(DecodeError::Damaged { field: "phase", .. })
        ));
        let mut longer = stored.clone();
        longer.push(0);
        assert!(matches!(
            decode_item(&longer),
            Err(DecodeError::Damaged { field: "end", .. })
        ));
        // A run of more pairs than any notification names.
        let mut huge = stored[..=phase_at].to_vec();
        huge.extend([1, 0, 0x81, 0x80, 0x04]);
        assert!(matches!(
            decode_item(&huge),
            Err(DecodeError::Damaged {
                field: "run length",
                ..
            })
        ));
        assert_eq!(
            decode_item(&[9]).unwrap_err().to_string(),
            "stored in format version 9, which this vppd does not know (it writes 1 and 2); was it recorded by a newer vppd?"
        );
    }

    #[test]
    fn one_asset_costs_a_length_byte_and_the_target_per_assignment() {
        let n = Notification {
            id: "ba8bbb23-44c2-44f6-a928-eff6ba5ffac3".into(),
            kind: "ASSET_MANAGEMENT".into(),
            uid: "2049025000431439".into(),
            body: NotificationBody::Assets {
                event_id: "87cbc650-16cc-4f9e-a833-e622f377a9f7".into(),
                error: None,
                assignments: (0..100)
                    .map(|i| Assignment {
                        adam_id: "408709785".into(),
                        pricing_param: "STDQ".into(),
                        assignee: Assignee::Serial(format!("C02Y402H{i:04}")),
                    })
                    .collect(),
                removal: false,
            },
        };
        let stored = encode(&n);
        let header = 1 + 1 + 37 + 17 + 1 + 37 + 1 + 10 + 5 + 1 + 1 + 1 + 1;
        assert_eq!(stored.len(), header + 100 * 13);
    }

    #[test]
    fn damage_is_named() {
        let n = Notification {
            id: "n".into(),
            kind: "ASSET_COUNT".into(),
            uid: "7".into(),
            body: NotificationBody::LicenseCount {
                adam_id: "1".into(),
                pricing_param: "STDQ".into(),
                delta: -5,
            },
        };
        let stored = encode(&n);
        assert_eq!(decode(&stored).unwrap().to_owned(), n);
        let e = decode(&stored[..stored.len() - 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "damaged at byte {} of {}: countDelta truncated",
                stored.len() - 1,
                stored.len() - 1
            )
        );
        let mut longer = stored.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(DecodeError::Damaged { field: "end", .. })
        ));
        assert_eq!(decode(&[7, 1]), Err(DecodeError::Version(7)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert!(!is_binary(b"{\"notificationId\":\"n\"}"));
        assert!(!is_binary(b" \n{}"));
    }
}
