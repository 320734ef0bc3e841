//! Asynchronous processing of management events, one task per token.
//!
//! Architecture invariant: the events of one token are processed strictly
//! one after another in the order the HTTP handler accepted them (the
//! handler queues them under the organization's lock), and the tasks of an
//! event in request order: asset by asset, and for each asset the users
//! before the serials (section 9 items 3 and 10). This is what lets a client
//! move a license with a disassociate followed at once by an associate.
//!
//! An event is processed in steps. Each step holds the organization's lock
//! for at most [`CHUNK`] tasks and never across an `.await`, so reads stay
//! responsive during a 25,000-task event, and notification chunks leave as
//! soon as they fill instead of when the event ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use super::notify::{PairsNote, Payload, asset_management, notification_error, result_of};
use super::state::{
    AssetIdx, EventState, Org, OrgData, TargetId, TargetKind, UserRecord, UserStatus, id_hash,
    to_json,
};
use super::{Shared, lock};
use crate::apple::types::error_number;
use crate::apple::types::{
    Asset, Assignment, RequestUser, ResponseUser, UserManagementNotification, event_type,
    notification_type,
};

/// Tasks applied per lock acquisition.
const CHUNK: usize = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AssetOp {
    Associate,
    Disassociate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserOp {
    Create,
    Update,
    Retire,
}

/// What an accepted management POST asked for, already validated.
pub(crate) enum JobBody {
    Assets {
        op: AssetOp,
        /// With `pricingParam` filled in.
        assets: Vec<Asset>,
        /// Users first, then serials, each in request order.
        targets: Vec<(TargetKind, String)>,
    },
    Revoke {
        targets: Vec<(TargetKind, String)>,
    },
    Users {
        op: UserOp,
        users: Vec<RequestUser>,
    },
}

impl JobBody {
    pub fn event_type(&self) -> &'static str {
        match self {
            JobBody::Assets {
                op: AssetOp::Associate,
                ..
            } => event_type::ASSOCIATE,
            JobBody::Assets {
                op: AssetOp::Disassociate,
                ..
            } => event_type::DISASSOCIATE,
            JobBody::Revoke { .. } => event_type::REVOKE,
            JobBody::Users {
                op: UserOp::Create, ..
            } => event_type::CREATE,
            JobBody::Users {
                op: UserOp::Update, ..
            } => event_type::UPDATE,
            JobBody::Users {
                op: UserOp::Retire, ..
            } => event_type::RETIRE,
        }
    }

    /// Known when the event is accepted, except for revoke (fixed when it starts).
    pub fn num_requested(&self) -> u64 {
        match self {
            JobBody::Assets {
                assets, targets, ..
            } => (assets.len() * targets.len()) as u64,
            JobBody::Revoke { .. } => 0,
            JobBody::Users { users, .. } => users.len() as u64,
        }
    }

    pub fn new_event(&self) -> EventState {
        EventState::new(self.event_type(), self.num_requested())
    }
}

pub(crate) struct Job {
    pub event_id: String,
    pub accepted_at: Instant,
    pub body: JobBody,
    /// Held PENDING after this many tasks (see [`super::HoldSettings`]).
    pub hold_after: Option<u64>,
}

/// What the token's event task is handed, in queue order.
pub(crate) enum Work {
    /// An event just accepted.
    New(Job),
    /// A held event, released: it goes on from where it stopped.
    Resume(Parked),
}

/// An event held PENDING: out of the token's queue until released, so the
/// events behind it go on (otherwise resubmitting, Apple's advice for an
/// event stuck in PENDING, could never help).
pub(crate) struct Parked {
    pub event_id: String,
    pub event_type: &'static str,
    pub held_at: Instant,
    work: ParkedWork,
}

enum ParkedWork {
    /// Held before its first task: a revoke then finds its work on release.
    NotStarted(Job),
    Started(Processor),
}

/// Processes the token's events until the simulator shuts down.
pub(crate) async fn run_events(
    shared: Arc<Shared>,
    org: Arc<Org>,
    mut jobs: UnboundedReceiver<Work>,
) {
    while let Some(work) = jobs.recv().await {
        if let Work::New(job) = &work {
            let start_at = job.accepted_at + shared.config.event_delay;
            tokio::time::sleep_until(start_at.into()).await;
        }
        run(&shared, &org, work).await;
        shared.busy_done();
    }
}

/// Settings a step needs, read once per event.
struct Ctx {
    max_items: usize,
    disassociate_missing_fails: bool,
    all_or_nothing: bool,
}

struct StepResult {
    processed: u64,
    finished: bool,
    notes: Vec<Payload>,
}

async fn run(shared: &Shared, org: &Org, work: Work) {
    let ctx = Ctx {
        max_items: shared.config.notifications.max_items.max(1),
        disassociate_missing_fails: shared.config.disassociate_missing_fails,
        all_or_nothing: shared.config.shortfall_all_or_nothing,
    };
    let (job, hold_after) = match work {
        Work::New(job) if job.hold_after == Some(0) => {
            let parked = Parked {
                event_id: job.event_id.clone(),
                event_type: job.body.event_type(),
                held_at: Instant::now(),
                work: ParkedWork::NotStarted(job),
            };
            lock(&org.held).push(parked);
            return;
        }
        Work::New(job) => {
            let hold_after = job.hold_after;
            (job, hold_after)
        }
        Work::Resume(Parked {
            work: ParkedWork::NotStarted(job),
            ..
        }) => (job, None),
        Work::Resume(Parked {
            work: ParkedWork::Started(processor),
            event_id,
            event_type,
            ..
        }) => {
            finish(shared, org, event_id, event_type, processor, None, &ctx).await;
            return;
        }
    };
    let event_id = job.event_id.clone();
    let event_type = job.body.event_type();
    let processor = {
        let mut data = lock(&org.data);
        Processor::start(&mut data, job, &ctx)
    };
    finish(
        shared, org, event_id, event_type, processor, hold_after, &ctx,
    )
    .await;
}

/// Processes, then parks the event if it stopped at its hold, or hands the
/// users it registered to the invitation knob once it is done.
async fn finish(
    shared: &Shared,
    org: &Org,
    event_id: String,
    event_type: &'static str,
    processor: Processor,
    limit: Option<u64>,
    ctx: &Ctx,
) {
    let (mut processor, finished) = process(shared, org, processor, limit, ctx).await;
    if !finished {
        park(org, event_id, event_type, processor);
        return;
    }
    if let Processor::Users(users) = &mut processor {
        org.invitations_sent(shared, std::mem::take(&mut users.registered));
    }
}

fn park(org: &Org, event_id: String, event_type: &'static str, processor: Processor) {
    lock(&org.held).push(Parked {
        event_id,
        event_type,
        held_at: Instant::now(),
        work: ParkedWork::Started(processor),
    });
}

/// Runs an event's tasks, at most `limit` of them; `false` when it stopped
/// at the limit with work left (the event stays PENDING).
async fn process(
    shared: &Shared,
    org: &Org,
    mut processor: Processor,
    limit: Option<u64>,
    ctx: &Ctx,
) -> (Processor, bool) {
    let notification = processor.notification_type();
    let rate = shared
        .config
        .assignments_per_second
        .filter(|r| *r > 0.0 && r.is_finite());
    let began = Instant::now();
    let mut done: u64 = 0;
    loop {
        if limit.is_some_and(|l| done >= l) {
            // Held: what was decided so far is notified, the rest waits.
            let notify = lock(&org.client).wants(notification);
            for payload in processor.flush(notify) {
                org.notify(shared, notification, payload);
            }
            org.notifier.flush(shared);
            return (processor, false);
        }
        let budget = match rate {
            None => CHUNK,
            Some(rate) => {
                let due = (began.elapsed().as_secs_f64() * rate) as u64 + 1;
                if due <= done {
                    let next = began + Duration::from_secs_f64(done as f64 / rate);
                    tokio::time::sleep_until(next.into()).await;
                    continue;
                }
                ((due - done) as usize).min(CHUNK)
            }
        };
        let budget = match limit {
            Some(l) => budget.min((l - done) as usize),
            None => budget,
        };
        let notify = lock(&org.client).wants(notification);
        let step = {
            let mut data = lock(&org.data);
            processor.step(&mut data, budget, notify, ctx)
        };
        done += step.processed;
        for payload in step.notes {
            org.notify(shared, notification, payload);
        }
        if step.finished {
            break;
        }
        if rate.is_none() {
            // Let HTTP handlers and deliveries run between chunks.
            tokio::task::yield_now().await;
        }
    }
    org.notifier.flush(shared);
    (processor, true)
}

pub(crate) enum Processor {
    Assets(AssetProcessor),
    Revoke(RevokeProcessor),
    Users(UserProcessor),
}

impl Processor {
    fn start(data: &mut OrgData, job: Job, ctx: &Ctx) -> Processor {
        match job.body {
            JobBody::Assets {
                op,
                assets,
                targets,
            } => Processor::Assets(AssetProcessor {
                event_id: Arc::from(job.event_id),
                op,
                assets: Arc::from(assets),
                targets: Arc::from(targets),
                cursor: 0,
                current: None,
                groups: Grouper::new(ctx.max_items),
            }),
            JobBody::Revoke { targets } => {
                // Section 9 item 16: the work is what the targets hold now.
                let mut tasks = Vec::new();
                for (kind, name) in &targets {
                    if let Some(t) = data.target(*kind, name) {
                        tasks.extend(data.revocable_assets_of(t).into_iter().map(|a| (a, t)));
                    }
                }
                if let Some(event) = data.events.get_mut(&job.event_id) {
                    event.num_requested = tasks.len() as u64;
                }
                Processor::Revoke(RevokeProcessor {
                    event_id: job.event_id,
                    tasks,
                    cursor: 0,
                    groups: Grouper::new(ctx.max_items),
                })
            }
            JobBody::Users { op, users } => Processor::Users(UserProcessor {
                event_id: job.event_id,
                op,
                users,
                cursor: 0,
                groups: Grouper::new(ctx.max_items),
                registered: Vec::new(),
            }),
        }
    }

    fn step(&mut self, data: &mut OrgData, budget: usize, notify: bool, ctx: &Ctx) -> StepResult {
        match self {
            Processor::Assets(p) => p.step(data, budget, notify, ctx),
            Processor::Revoke(p) => p.step(data, budget, notify),
            Processor::Users(p) => p.step(data, budget, notify),
        }
    }

    fn notification_type(&self) -> &'static str {
        match self {
            Processor::Users(_) => notification_type::USER_MANAGEMENT,
            _ => notification_type::ASSET_MANAGEMENT,
        }
    }

    /// The notifications of the groups not yet full.
    fn flush(&mut self, notify: bool) -> Vec<Payload> {
        let notes = match self {
            Processor::Assets(p) => {
                let groups = p.groups.drain();
                groups
                    .into_iter()
                    .map(|(key, items)| p.note(key, items))
                    .collect()
            }
            Processor::Revoke(p) => p
                .groups
                .drain()
                .into_iter()
                .map(|(key, items)| {
                    Payload::Json(asset_management(
                        &p.event_id,
                        event_type::REVOKE,
                        key.1,
                        items,
                    ))
                })
                .collect(),
            Processor::Users(p) => {
                let groups = p.groups.drain();
                groups
                    .into_iter()
                    .map(|(key, items)| p.note(key.1, items))
                    .collect()
            }
        };
        if notify { notes } else { Vec::new() }
    }
}

/// The asset being worked on by an associate or disassociate.
#[derive(Clone, Copy)]
struct CurrentAsset {
    position: usize,
    index: Option<AssetIdx>,
    /// All-or-nothing mode found a shortfall: no new license for this asset.
    deny_new: bool,
}

pub(crate) struct AssetProcessor {
    event_id: Arc<str>,
    op: AssetOp,
    /// Shared with the notifications waiting to be sent.
    assets: Arc<[Asset]>,
    targets: Arc<[(TargetKind, String)]>,
    /// Task index: asset position * targets + target position.
    cursor: usize,
    current: Option<CurrentAsset>,
    /// Target positions per (asset position, outcome) group.
    groups: Grouper<u32>,
}

impl AssetProcessor {
    fn step(&mut self, data: &mut OrgData, budget: usize, notify: bool, ctx: &Ctx) -> StepResult {
        let version = data.version + 1;
        let mut wrote = false;
        let width = self.targets.len();
        let total = self.assets.len() * width;
        let mut completed = 0u64;
        let mut failures: Vec<(i32, usize, usize)> = Vec::new();
        let mut notes = Vec::new();
        let mut processed = 0usize;
        while processed < budget && self.cursor < total {
            let position = self.cursor / width;
            let target = self.cursor % width;
            let current = match self.current {
                Some(c) if c.position == position => c,
                _ => {
                    // The previous asset is finished: its groups can go out.
                    for (key, items) in self.groups.drain() {
                        notes.push(self.note(key, items));
                    }
                    let c = self.resolve(data, position, ctx);
                    self.current = Some(c);
                    c
                }
            };
            let (kind, name) = &self.targets[target];
            let outcome = match self.op {
                AssetOp::Associate => associate_one(data, current, *kind, name, version),
                AssetOp::Disassociate => disassociate_one(
                    data,
                    current.index,
                    *kind,
                    name,
                    ctx.disassociate_missing_fails,
                ),
            };
            let error = match outcome {
                Ok(changed) => {
                    wrote |= changed;
                    completed += 1;
                    None
                }
                Err(number) => {
                    failures.push((number, position, target));
                    Some(number)
                }
            };
            if notify
                && let Some((key, items)) =
                    self.groups.push((position as u32, error), target as u32)
            {
                notes.push(self.note(key, items));
            }
            self.cursor += 1;
            processed += 1;
        }
        let finished = self.cursor >= total;
        if finished {
            for (key, items) in self.groups.drain() {
                notes.push(self.note(key, items));
            }
        }
        if wrote {
            data.version = version;
        }
        if let Some(event) = data.events.get_mut(&*self.event_id) {
            event.num_completed += completed;
            for (number, position, target) in failures {
                let (kind, name) = &self.targets[target];
                event.record_failure(number, Some(&self.assets[position]), *kind, name);
            }
            event.done = finished;
        }
        StepResult {
            processed: processed as u64,
            finished,
            notes,
        }
    }

    fn resolve(&self, data: &OrgData, position: usize, ctx: &Ctx) -> CurrentAsset {
        let asset = &self.assets[position];
        let index = data.find_asset(&asset.adam_id, asset.pricing());
        let deny_new = match index {
            Some(a) if ctx.all_or_nothing && self.op == AssetOp::Associate => {
                let needed = self
                    .targets
                    .iter()
                    .filter(|(kind, name)| {
                        *kind == TargetKind::Serial || data.active_user(name).is_some()
                    })
                    .filter(|(kind, name)| !data.has_pair_named(a, *kind, name))
                    .count();
                data.asset(a)
                    .available()
                    .is_some_and(|free| needed > free as usize)
            }
            _ => false,
        };
        CurrentAsset {
            position,
            index,
            deny_new,
        }
    }

    fn note(&self, (asset, error): GroupKey, items: Vec<u32>) -> Payload {
        let kind = match self.op {
            AssetOp::Associate => event_type::ASSOCIATE,
            AssetOp::Disassociate => event_type::DISASSOCIATE,
        };
        Payload::Pairs(PairsNote {
            event_id: self.event_id.clone(),
            kind,
            error,
            assets: self.assets.clone(),
            targets: self.targets.clone(),
            asset,
            items,
        })
    }
}

/// Section 9 items 1, 3, 4 and 5, in that precedence: unknown asset (9709),
/// then user not active (9609), then already assigned (success, no
/// license), then shortfall (9709).
fn associate_one(
    data: &mut OrgData,
    asset: CurrentAsset,
    kind: TargetKind,
    name: &str,
    version: u64,
) -> Result<bool, i32> {
    let Some(a) = asset.index else {
        return Err(error_number::NOT_ENOUGH_LICENSES);
    };
    if kind == TargetKind::User && data.active_user(name).is_none() {
        return Err(error_number::USER_NOT_FOUND);
    }
    if data.has_pair_named(a, kind, name) {
        return Ok(false);
    }
    if asset.deny_new || !data.asset(a).has_free_license() {
        return Err(error_number::NOT_ENOUGH_LICENSES);
    }
    data.insert_pair(a, kind, name, version);
    Ok(true)
}

/// Section 9 item 2: a missing pair is a no-op success unless the
/// alternative mode asks for 9610.
fn disassociate_one(
    data: &mut OrgData,
    asset: Option<AssetIdx>,
    kind: TargetKind,
    name: &str,
    missing_fails: bool,
) -> Result<bool, i32> {
    let removed = match (asset, data.target(kind, name)) {
        (Some(a), Some(t)) => data.remove_pair(a, t),
        _ => false,
    };
    if removed {
        Ok(true)
    } else if missing_fails {
        Err(error_number::LICENSE_NOT_FOUND)
    } else {
        Ok(false)
    }
}

pub(crate) struct RevokeProcessor {
    event_id: String,
    tasks: Vec<(AssetIdx, TargetId)>,
    cursor: usize,
    groups: Grouper<Assignment>,
}

impl RevokeProcessor {
    fn step(&mut self, data: &mut OrgData, budget: usize, notify: bool) -> StepResult {
        let version = data.version + 1;
        let mut wrote = false;
        let mut notes = Vec::new();
        let start = self.cursor;
        let end = (start + budget).min(self.tasks.len());
        for &(asset, target) in &self.tasks[start..end] {
            // Built before the removal, while the pair still resolves.
            let assignment = notify.then(|| data.assignment(asset, target, false));
            wrote |= data.remove_pair(asset, target);
            // One group whatever the asset: Apple's revocation example lists
            // a target's assignments of several assets in one notification.
            if let Some(assignment) = assignment
                && let Some((key, items)) = self.groups.push((0, None), assignment)
            {
                notes.push(Payload::Json(asset_management(
                    &self.event_id,
                    event_type::REVOKE,
                    key.1,
                    items,
                )));
            }
        }
        self.cursor = end;
        let finished = self.cursor >= self.tasks.len();
        if finished {
            for (key, items) in self.groups.drain() {
                notes.push(Payload::Json(asset_management(
                    &self.event_id,
                    event_type::REVOKE,
                    key.1,
                    items,
                )));
            }
        }
        if wrote {
            data.version = version;
        }
        if let Some(event) = data.events.get_mut(&self.event_id) {
            event.num_completed += (end - start) as u64;
            event.done = finished;
        }
        StepResult {
            processed: (end - start) as u64,
            finished,
            notes,
        }
    }
}

pub(crate) struct UserProcessor {
    event_id: String,
    op: UserOp,
    users: Vec<RequestUser>,
    cursor: usize,
    groups: Grouper<ResponseUser>,
    /// Records this CREATE made `Registered`: they wait for an invitation.
    registered: Vec<usize>,
}

impl UserProcessor {
    fn step(&mut self, data: &mut OrgData, budget: usize, notify: bool) -> StepResult {
        let version = data.version + 1;
        let mut wrote = false;
        let mut notes = Vec::new();
        let mut completed = 0u64;
        let mut failures = Vec::new();
        let start = self.cursor;
        let end = (start + budget).min(self.users.len());
        for user in &self.users[start..end] {
            let outcome = match self.op {
                UserOp::Create => create_user(data, user, version),
                UserOp::Update => update_user(data, user, version),
                UserOp::Retire => retire_user(data, user, version),
            };
            let (error, shown) = match outcome {
                Ok((index, changed)) => {
                    wrote |= changed;
                    completed += 1;
                    if self.op == UserOp::Create
                        && data.user(index).status == UserStatus::Registered
                    {
                        self.registered.push(index);
                    }
                    (None, data.user(index).to_response())
                }
                Err(number) => {
                    failures.push((number, user.client_user_id.clone()));
                    let shown = ResponseUser {
                        client_user_id: user.client_user_id.clone(),
                        email: user.email.clone(),
                        invite_code: None,
                        id_hash: None,
                        status: None,
                    };
                    (Some(number), shown)
                }
            };
            if notify && let Some((key, items)) = self.groups.push((0, error), shown) {
                notes.push(self.note(key.1, items));
            }
        }
        self.cursor = end;
        let finished = self.cursor >= self.users.len();
        if finished {
            for (key, items) in self.groups.drain() {
                notes.push(self.note(key.1, items));
            }
        }
        if wrote {
            data.version = version;
        }
        if let Some(event) = data.events.get_mut(&self.event_id) {
            event.num_completed += completed;
            for (number, id) in failures {
                event.record_failure(number, None, TargetKind::User, &id);
            }
            event.done = finished;
        }
        StepResult {
            processed: (end - start) as u64,
            finished,
            notes,
        }
    }

    fn note(&self, error: Option<i32>, users: Vec<ResponseUser>) -> Payload {
        let kind = match self.op {
            UserOp::Create => event_type::CREATE,
            UserOp::Update => event_type::UPDATE,
            UserOp::Retire => event_type::RETIRE,
        };
        Payload::Json(to_json(&UserManagementNotification {
            event_id: self.event_id.as_str().into(),
            kind: kind.to_string(),
            result: result_of(error).to_string(),
            users,
            error: error.map(notification_error),
        }))
    }
}

/// `Ok((record, whether anything was written))`.
type UserOutcome = Result<(usize, bool), i32>;

fn create_user(data: &mut OrgData, user: &RequestUser, version: u64) -> UserOutcome {
    if data.active_user(&user.client_user_id).is_some() {
        return Err(error_number::USER_EXISTS);
    }
    if let Some(managed) = &user.managed_apple_id
        && data
            .managed_account_holder(managed, &user.client_user_id)
            .is_some()
    {
        return Err(error_number::ACCOUNT_LINKED_TO_ANOTHER_USER);
    }
    // A Managed Apple Account links at once; otherwise the user must accept
    // an invitation first.
    let (status, invite_code, hash) = match &user.managed_apple_id {
        Some(managed) => (
            UserStatus::Associated,
            None,
            Some(id_hash(managed.as_bytes())),
        ),
        None => (
            UserStatus::Registered,
            Some(uuid::Uuid::new_v4().simple().to_string()),
            None,
        ),
    };
    let index = data.push_user(UserRecord {
        client_user_id: user.client_user_id.clone(),
        email: user.email.clone(),
        managed_apple_id: user.managed_apple_id.clone(),
        invite_code,
        id_hash: hash,
        status,
        version,
    });
    Ok((index, true))
}

fn update_user(data: &mut OrgData, user: &RequestUser, version: u64) -> UserOutcome {
    let Some(index) = data.active_user(&user.client_user_id) else {
        return Err(error_number::USER_NOT_FOUND);
    };
    if let Some(managed) = &user.managed_apple_id
        && data
            .managed_account_holder(managed, &user.client_user_id)
            .is_some()
    {
        return Err(error_number::ACCOUNT_LINKED_TO_ANOTHER_USER);
    }
    let record = data.user_mut(index);
    if let Some(email) = &user.email {
        record.email = Some(email.clone());
    }
    if let Some(managed) = &user.managed_apple_id {
        record.status = UserStatus::Associated;
        record.id_hash = Some(id_hash(managed.as_bytes()));
        record.managed_apple_id = Some(managed.clone());
    }
    record.version = version;
    Ok((index, true))
}

fn retire_user(data: &mut OrgData, user: &RequestUser, version: u64) -> UserOutcome {
    if let Some(index) = data.active_user(&user.client_user_id) {
        let record = data.user_mut(index);
        record.status = UserStatus::Retired;
        record.version = version;
        return Ok((index, true));
    }
    // Retiring twice is harmless: report the retired record.
    match data.latest_user(&user.client_user_id) {
        Some(index) => Ok((index, false)),
        None => Err(error_number::USER_NOT_FOUND),
    }
}

/// Groups outcomes into notifications: one group per (asset, error number),
/// handed out as soon as it holds `max` items.
type GroupKey = (u32, Option<i32>);

struct Grouper<T> {
    max: usize,
    open: Vec<(GroupKey, Vec<T>)>,
}

impl<T> Grouper<T> {
    fn new(max: usize) -> Grouper<T> {
        Grouper {
            max: max.max(1),
            open: Vec::new(),
        }
    }

    fn push(&mut self, key: GroupKey, item: T) -> Option<(GroupKey, Vec<T>)> {
        let index = match self.open.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.open.push((key, Vec::new()));
                self.open.len() - 1
            }
        };
        self.open[index].1.push(item);
        (self.open[index].1.len() >= self.max).then(|| self.open.remove(index))
    }

    fn drain(&mut self) -> Vec<(GroupKey, Vec<T>)> {
        std::mem::take(&mut self.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouper_hands_out_full_chunks_per_key() {
        let mut g = Grouper::new(2);
        assert!(g.push((0, None), 1).is_none());
        assert!(
            g.push((0, Some(error_number::NOT_ENOUGH_LICENSES)), 2)
                .is_none()
        );
        assert_eq!(g.push((0, None), 3), Some(((0, None), vec![1, 3])));
        assert!(g.push((0, None), 4).is_none());
        assert_eq!(
            g.drain(),
            vec![
                ((0, Some(error_number::NOT_ENOUGH_LICENSES)), vec![2]),
                ((0, None), vec![4])
            ]
        );
        assert!(g.drain().is_empty());
    }
}
