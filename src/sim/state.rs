//! One simulated organization (location) per token: assets and license
//! counts, assignments with their indexes, users, events and client config.
//!
//! Assignments are the bulk of the data (the demo holds 2.5 million at
//! 100,000 devices), so they are kept compact: targets (users and serials)
//! are interned once into `u32` ids, and the pairs live in a [`PairLog`]
//! with indexes per asset, per target and by version.
//!
//! Invariant: `assets[a].assigned` is the number of live pairs of `a`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::mpsc::UnboundedSender;

use super::notify::{Notifier, Payload};
use super::pairs::PairLog;
use super::process::{Job, JobBody, Parked, Work};
use super::{InvitationAcceptance, Shared, SimAsset, SimError, lock};
use crate::apple::token::SToken;
use crate::apple::types::{
    self, Asset, Assignment, ErrorResponse, MdmInfo, ResponseErrorInfo, ResponseUser,
    notification_type,
};

pub(crate) type AssetIdx = u32;
pub(crate) type TargetId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TargetKind {
    User,
    Serial,
}

pub(crate) struct AssetState {
    pub adam_id: String,
    pub pricing: String,
    pub product_type: String,
    /// `None`: unlimited.
    pub total: Option<u32>,
    pub assigned: u32,
    pub device_assignable: bool,
    pub revocable: bool,
}

impl AssetState {
    pub fn has_free_license(&self) -> bool {
        self.total.is_none_or(|t| t > self.assigned)
    }

    pub fn available(&self) -> Option<u32> {
        self.total.map(|t| t.saturating_sub(self.assigned))
    }

    /// Apple has no platform data for a simulated asset; books are read on
    /// iOS and macOS too.
    pub fn platforms(&self) -> Vec<String> {
        vec!["iOS".to_string(), "macOS".to_string()]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserStatus {
    Registered,
    Associated,
    Retired,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Registered => "Registered",
            UserStatus::Associated => "Associated",
            UserStatus::Retired => "Retired",
        }
    }
}

pub(crate) struct UserRecord {
    pub client_user_id: String,
    pub email: Option<String>,
    /// The Managed Apple Account linked, if any: one links one user only.
    pub managed_apple_id: Option<String>,
    pub invite_code: Option<String>,
    pub id_hash: Option<String>,
    pub status: UserStatus,
    pub version: u64,
}

impl UserRecord {
    pub fn is_active(&self) -> bool {
        self.status != UserStatus::Retired
    }

    /// As Get Users and USER_MANAGEMENT show it: the invite code only while
    /// the user still has to accept it.
    pub fn to_response(&self) -> ResponseUser {
        ResponseUser {
            client_user_id: self.client_user_id.clone(),
            email: self.email.clone(),
            invite_code: self
                .invite_code
                .clone()
                .filter(|_| self.status == UserStatus::Registered),
            id_hash: self.id_hash.clone(),
            status: Some(self.status.as_str().to_string()),
        }
    }
}

/// Targets of one error number in an event, merged as Event Status shows them.
pub(crate) struct FailureGroup {
    pub number: i32,
    assets: Vec<Asset>,
    users: Vec<String>,
    serials: Vec<String>,
    seen_assets: HashSet<Asset>,
    seen_users: HashSet<String>,
    seen_serials: HashSet<String>,
}

impl FailureGroup {
    fn new(number: i32) -> FailureGroup {
        FailureGroup {
            number,
            assets: Vec::new(),
            users: Vec::new(),
            serials: Vec::new(),
            seen_assets: HashSet::new(),
            seen_users: HashSet::new(),
            seen_serials: HashSet::new(),
        }
    }

    fn add(&mut self, asset: Option<&Asset>, kind: TargetKind, target: &str) {
        if let Some(asset) = asset
            && self.seen_assets.insert(asset.clone())
        {
            self.assets.push(asset.clone());
        }
        let (seen, list) = match kind {
            TargetKind::User => (&mut self.seen_users, &mut self.users),
            TargetKind::Serial => (&mut self.seen_serials, &mut self.serials),
        };
        if seen.insert(target.to_string()) {
            list.push(target.to_string());
        }
    }

    fn to_error(&self) -> ErrorResponse {
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        ErrorResponse {
            error_number: self.number,
            error_message: types::error_message(self.number).to_string(),
            error_info: Some(ResponseErrorInfo {
                assets: (!self.assets.is_empty()).then(|| self.assets.clone()),
                client_user_ids: non_empty(&self.users),
                serial_numbers: non_empty(&self.serials),
            }),
        }
    }
}

pub(crate) struct EventState {
    pub kind: &'static str,
    pub num_requested: u64,
    pub num_completed: u64,
    pub num_failed: u64,
    pub done: bool,
    failures: Vec<FailureGroup>,
}

impl EventState {
    pub fn new(kind: &'static str, num_requested: u64) -> EventState {
        EventState {
            kind,
            num_requested,
            num_completed: 0,
            num_failed: 0,
            done: false,
            failures: Vec::new(),
        }
    }

    pub fn record_failure(
        &mut self,
        number: i32,
        asset: Option<&Asset>,
        kind: TargetKind,
        target: &str,
    ) {
        self.num_failed += 1;
        let group = match self.failures.iter().position(|g| g.number == number) {
            Some(i) => &mut self.failures[i],
            None => {
                self.failures.push(FailureGroup::new(number));
                let last = self.failures.len() - 1;
                &mut self.failures[last]
            }
        };
        group.add(asset, kind, target);
    }

    pub fn status(&self) -> &'static str {
        if !self.done {
            types::event_status::PENDING
        } else if self.num_failed > 0 {
            types::event_status::FAILED
        } else {
            types::event_status::COMPLETE
        }
    }

    /// Absent while empty (section 9 item 15).
    pub fn failures(&self) -> Option<Vec<ErrorResponse>> {
        (!self.failures.is_empty())
            .then(|| self.failures.iter().map(FailureGroup::to_error).collect())
    }
}

/// Filters of Get Assignments, already parsed.
#[derive(Default)]
pub(crate) struct AssignmentQuery<'a> {
    pub adam_id: Option<&'a str>,
    pub pricing: Option<&'a str>,
    pub client_user_id: Option<&'a str>,
    pub serial_number: Option<&'a str>,
    pub exclude_inactive_users: bool,
    pub since_version: Option<u64>,
}

/// Filters of Get Users, already parsed.
#[derive(Default)]
pub(crate) struct UserQuery<'a> {
    pub active_only: bool,
    pub retired_only: bool,
    pub client_user_id: Option<&'a str>,
    pub since_version: Option<u64>,
}

pub(crate) struct OrgData {
    /// The `versionId` counter: bumped once per write transaction.
    pub version: u64,
    version_prefix: String,
    /// `sinceVersionId` older than this is refused as too old (9721), as
    /// Apple does once it no longer keeps a version's changes.
    oldest_version: u64,
    assets: Vec<AssetState>,
    asset_index: HashMap<(String, String), AssetIdx>,
    user_targets: HashMap<Arc<str>, TargetId>,
    serial_targets: HashMap<Arc<str>, TargetId>,
    targets: Vec<(TargetKind, Arc<str>)>,
    pairs: PairLog,
    users: Vec<UserRecord>,
    users_by_client: HashMap<String, Vec<usize>>,
    /// Users created `Registered`, oldest first, for the invitation
    /// acceptance knob; an entry no longer `Registered` is skipped.
    waiting_invitations: VecDeque<usize>,
    pub events: HashMap<String, EventState>,
}

impl OrgData {
    fn new(version_prefix: String, assets: &[SimAsset]) -> Result<OrgData, SimError> {
        let mut data = OrgData {
            version: 1,
            oldest_version: 1,
            version_prefix,
            assets: Vec::new(),
            asset_index: HashMap::new(),
            user_targets: HashMap::new(),
            serial_targets: HashMap::new(),
            targets: Vec::new(),
            pairs: PairLog::default(),
            users: Vec::new(),
            users_by_client: HashMap::new(),
            waiting_invitations: VecDeque::new(),
            events: HashMap::new(),
        };
        for asset in assets {
            data.add_asset(asset)?;
        }
        Ok(data)
    }

    fn add_asset(&mut self, asset: &SimAsset) -> Result<AssetIdx, SimError> {
        let invalid = |reason: &str| SimError::InvalidAsset {
            adam_id: asset.adam_id.clone(),
            reason: reason.to_string(),
        };
        if !valid_adam_id(&asset.adam_id) {
            return Err(invalid("adamId must be digits"));
        }
        if !valid_pricing(&asset.pricing_param) {
            return Err(invalid("pricingParam must be STDQ or PLUS"));
        }
        if asset.product_type != "App" && asset.product_type != "Book" {
            return Err(invalid("productType must be App or Book"));
        }
        let key = (asset.adam_id.clone(), asset.pricing_param.clone());
        if self.asset_index.contains_key(&key) {
            return Err(invalid("listed twice with the same pricingParam"));
        }
        let idx = self.assets.len() as AssetIdx;
        self.asset_index.insert(key, idx);
        self.assets.push(AssetState {
            adam_id: asset.adam_id.clone(),
            pricing: asset.pricing_param.clone(),
            product_type: asset.product_type.clone(),
            total: asset.total,
            assigned: 0,
            device_assignable: asset.device_assignable,
            revocable: asset.revocable,
        });
        self.pairs.add_asset();
        Ok(idx)
    }

    pub fn render_version(&self) -> String {
        format!("{}{:012x}", self.version_prefix, self.version)
    }

    /// The counter behind a `versionId` this organization issued.
    pub fn parse_version(&self, text: &str) -> Option<u64> {
        let rest = text.trim().to_ascii_lowercase();
        let counter = rest.strip_prefix(&self.version_prefix)?;
        if counter.len() != 12 {
            return None;
        }
        let v = u64::from_str_radix(counter, 16).ok()?;
        (v >= self.oldest_version.max(1) && v <= self.version).then_some(v)
    }

    /// Every `versionId` issued so far becomes too old for `sinceVersionId`.
    pub fn forget_versions(&mut self) {
        self.version += 1;
        self.oldest_version = self.version;
    }

    pub fn asset_list(&self) -> &[AssetState] {
        &self.assets
    }

    pub fn asset(&self, idx: AssetIdx) -> &AssetState {
        &self.assets[idx as usize]
    }

    pub fn find_asset(&self, adam_id: &str, pricing: &str) -> Option<AssetIdx> {
        self.asset_index
            .get(&(adam_id.to_string(), pricing.to_string()))
            .copied()
    }

    pub fn target(&self, kind: TargetKind, name: &str) -> Option<TargetId> {
        match kind {
            TargetKind::User => self.user_targets.get(name).copied(),
            TargetKind::Serial => self.serial_targets.get(name).copied(),
        }
    }

    pub fn target_name(&self, id: TargetId) -> (TargetKind, &str) {
        let (kind, name) = &self.targets[id as usize];
        (*kind, name)
    }

    fn intern(&mut self, kind: TargetKind, name: &str) -> TargetId {
        if let Some(id) = self.target(kind, name) {
            return id;
        }
        let id = self.targets.len() as TargetId;
        let name: Arc<str> = Arc::from(name);
        self.targets.push((kind, name.clone()));
        self.pairs.add_target();
        match kind {
            TargetKind::User => self.user_targets.insert(name, id),
            TargetKind::Serial => self.serial_targets.insert(name, id),
        };
        id
    }

    pub fn has_pair(&self, asset: AssetIdx, target: TargetId) -> bool {
        self.pairs.contains(asset, target)
    }

    pub fn has_pair_named(&self, asset: AssetIdx, kind: TargetKind, name: &str) -> bool {
        self.target(kind, name)
            .is_some_and(|t| self.has_pair(asset, t))
    }

    /// Assigns a license; the caller has checked that one is free.
    pub fn insert_pair(&mut self, asset: AssetIdx, kind: TargetKind, name: &str, version: u64) {
        let target = self.intern(kind, name);
        if self.pairs.insert(asset, target, version) {
            self.assets[asset as usize].assigned += 1;
        }
    }

    /// Frees a license; `false` if the pair did not exist.
    pub fn remove_pair(&mut self, asset: AssetIdx, target: TargetId) -> bool {
        if !self.pairs.remove(asset, target) {
            return false;
        }
        let state = &mut self.assets[asset as usize];
        state.assigned = state.assigned.saturating_sub(1);
        true
    }

    /// The revocable assets a target holds, in asset order.
    pub fn revocable_assets_of(&self, target: TargetId) -> Vec<AssetIdx> {
        let mut held = self.pairs.assets_of(target);
        held.retain(|a| self.assets[*a as usize].revocable);
        held
    }

    pub fn all_pairs(&self) -> Vec<(AssetIdx, TargetId)> {
        self.pairs.all()
    }

    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    /// The serial numbers holding the asset, for checks that must not copy
    /// millions of pairs out.
    pub fn for_each_serial_holding(&self, asset: AssetIdx, mut f: impl FnMut(&str)) {
        for target in self.pairs.holders(asset) {
            let (kind, name) = self.target_name(target);
            if kind == TargetKind::Serial {
                f(name);
            }
        }
    }

    pub fn assignment(
        &self,
        asset: AssetIdx,
        target: TargetId,
        include_user_state: bool,
    ) -> Assignment {
        let state = self.asset(asset);
        let (kind, name) = self.target_name(target);
        let mut assignment = Assignment {
            adam_id: state.adam_id.clone(),
            pricing_param: state.pricing.clone(),
            client_user_id: None,
            serial_number: None,
            user_status: None,
            id_hash: None,
        };
        match kind {
            TargetKind::Serial => assignment.serial_number = Some(name.to_string()),
            TargetKind::User => {
                assignment.client_user_id = Some(name.to_string());
                if include_user_state && let Some(user) = self.current_user(name) {
                    assignment.user_status = Some(user.status.as_str().to_string());
                    assignment.id_hash = user.id_hash.clone();
                }
            }
        }
        assignment
    }

    /// One page of Get Assignments and the total count, without building the
    /// whole answer when the filters allow it.
    pub fn assignments_page(
        &self,
        q: &AssignmentQuery<'_>,
        start: usize,
        len: usize,
    ) -> (usize, Vec<(AssetIdx, TargetId)>) {
        let asset_ok = |a: AssetIdx| {
            let s = &self.assets[a as usize];
            q.adam_id.is_none_or(|id| s.adam_id == id) && q.pricing.is_none_or(|p| s.pricing == p)
        };
        let structural = q.client_user_id.is_none()
            && q.serial_number.is_none()
            && q.since_version.is_none()
            && !q.exclude_inactive_users;
        let only_since = q.client_user_id.is_none()
            && q.serial_number.is_none()
            && q.adam_id.is_none()
            && q.pricing.is_none()
            && !q.exclude_inactive_users;
        if let (true, Some(since)) = (only_since, q.since_version) {
            return self.pairs.since_page(since, start, len);
        }
        if structural {
            // Pages by skipping whole assets (their counts are known), then
            // the pairs of one asset: a page costs at most one asset's
            // pairs, never the whole organization's.
            let matching: Vec<AssetIdx> = (0..self.assets.len() as AssetIdx)
                .filter(|a| asset_ok(*a))
                .collect();
            let total = matching
                .iter()
                .map(|a| self.assets[*a as usize].assigned as usize)
                .sum();
            let mut skip = start;
            let mut out = Vec::with_capacity(len.min(total));
            for a in matching {
                let held = self.assets[a as usize].assigned as usize;
                if skip >= held {
                    skip -= held;
                    continue;
                }
                out.extend(
                    self.pairs
                        .holders(a)
                        .skip(skip)
                        .take(len - out.len())
                        .map(|t| (a, t)),
                );
                skip = 0;
                if out.len() >= len {
                    break;
                }
            }
            return (total, out);
        }

        let all = self.matching_assignments(q, asset_ok);
        let total = all.len();
        let page = all.into_iter().skip(start).take(len).collect();
        (total, page)
    }

    fn matching_assignments(
        &self,
        q: &AssignmentQuery<'_>,
        asset_ok: impl Fn(AssetIdx) -> bool,
    ) -> Vec<(AssetIdx, TargetId)> {
        let wanted_target = match (q.client_user_id, q.serial_number) {
            (Some(_), Some(_)) => return Vec::new(), // a pair has one or the other
            (Some(user), None) => match self.target(TargetKind::User, user) {
                Some(t) => Some(t),
                None => return Vec::new(),
            },
            (None, Some(serial)) => match self.target(TargetKind::Serial, serial) {
                Some(t) => Some(t),
                None => return Vec::new(),
            },
            (None, None) => None,
        };
        let keep = |a: AssetIdx, t: TargetId| {
            if !asset_ok(a) || wanted_target.is_some_and(|w| w != t) {
                return false;
            }
            if q.exclude_inactive_users {
                let (kind, name) = self.target_name(t);
                if kind == TargetKind::User && self.active_user(name).is_none() {
                    return false;
                }
            }
            true
        };
        if let Some(since) = q.since_version {
            return self
                .pairs
                .since(since)
                .filter(|(a, t)| keep(*a, *t))
                .collect();
        }
        if let Some(t) = wanted_target {
            return self
                .pairs
                .assets_of(t)
                .into_iter()
                .map(|a| (a, t))
                .filter(|(a, t)| keep(*a, *t))
                .collect();
        }
        let mut out = Vec::new();
        for a in 0..self.assets.len() as AssetIdx {
            if !asset_ok(a) {
                continue;
            }
            out.extend(
                self.pairs
                    .holders(a)
                    .map(|t| (a, t))
                    .filter(|(a, t)| keep(*a, *t)),
            );
        }
        out
    }

    /// The user record that is not retired, if any (there is at most one).
    pub fn active_user(&self, client_user_id: &str) -> Option<usize> {
        self.users_by_client
            .get(client_user_id)?
            .iter()
            .copied()
            .find(|i| self.users[*i].is_active())
    }

    /// The active record, else the latest retired one.
    fn current_user(&self, client_user_id: &str) -> Option<&UserRecord> {
        let records = self.users_by_client.get(client_user_id)?;
        let index = self
            .active_user(client_user_id)
            .or_else(|| records.last().copied())?;
        Some(&self.users[index])
    }

    pub fn latest_user(&self, client_user_id: &str) -> Option<usize> {
        self.users_by_client.get(client_user_id)?.last().copied()
    }

    pub fn user(&self, index: usize) -> &UserRecord {
        &self.users[index]
    }

    pub fn user_mut(&mut self, index: usize) -> &mut UserRecord {
        &mut self.users[index]
    }

    pub fn push_user(&mut self, record: UserRecord) -> usize {
        let index = self.users.len();
        self.users_by_client
            .entry(record.client_user_id.clone())
            .or_default()
            .push(index);
        self.users.push(record);
        index
    }

    /// The active user other than `except` who is linked to this Managed
    /// Apple Account, if any.
    pub fn managed_account_holder(&self, managed: &str, except: &str) -> Option<&UserRecord> {
        self.users.iter().find(|u| {
            u.is_active()
                && u.client_user_id != except
                && u.managed_apple_id
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(managed))
        })
    }

    pub fn queue_invitations(&mut self, users: impl IntoIterator<Item = usize>) {
        self.waiting_invitations.extend(users);
    }

    pub fn waiting_invitations(&self) -> usize {
        self.waiting_invitations
            .iter()
            .filter(|i| self.users[**i].status == UserStatus::Registered)
            .count()
    }

    pub fn has_waiting_invitations(&self) -> bool {
        self.waiting_invitations
            .iter()
            .any(|i| self.users[*i].status == UserStatus::Registered)
    }

    /// Accepts the invitations of up to `max` waiting users, oldest first:
    /// they become `Associated` in one write. Returns them as USER_ASSOCIATED
    /// shows them.
    fn accept_waiting(&mut self, max: usize) -> Vec<ResponseUser> {
        let mut chosen = Vec::new();
        while chosen.len() < max {
            let Some(index) = self.waiting_invitations.pop_front() else {
                break;
            };
            if self.users[index].status == UserStatus::Registered {
                chosen.push(index);
            }
        }
        self.associate_users(&chosen)
    }

    fn associate_users(&mut self, indexes: &[usize]) -> Vec<ResponseUser> {
        if indexes.is_empty() {
            return Vec::new();
        }
        self.version += 1;
        let version = self.version;
        indexes
            .iter()
            .map(|index| {
                let record = &mut self.users[*index];
                record.status = UserStatus::Associated;
                record.id_hash = Some(id_hash(uuid::Uuid::new_v4().as_bytes()));
                record.version = version;
                let mut shown = record.to_response();
                // USER_ASSOCIATED names the invite code that was accepted.
                shown.invite_code = record.invite_code.clone();
                shown
            })
            .collect()
    }

    pub fn users_matching(&self, q: &UserQuery<'_>) -> Vec<&UserRecord> {
        let candidates: Box<dyn Iterator<Item = &UserRecord>> = match q.client_user_id {
            Some(id) => match self.users_by_client.get(id) {
                Some(indexes) => Box::new(indexes.iter().map(|i| &self.users[*i])),
                None => return Vec::new(),
            },
            None => Box::new(self.users.iter()),
        };
        candidates
            .filter(|u| !q.active_only || u.is_active())
            .filter(|u| !q.retired_only || u.status == UserStatus::Retired)
            .filter(|u| q.since_version.is_none_or(|v| u.version > v))
            .collect()
    }

    /// Changes the license count of an asset, creating the asset on a
    /// purchase of something the organization did not own.
    fn change_licenses(
        &mut self,
        adam_id: &str,
        pricing: &str,
        delta: i32,
    ) -> Result<(), SimError> {
        let refuse = |reason: &str| SimError::Licenses {
            adam_id: adam_id.to_string(),
            reason: reason.to_string(),
        };
        let idx = match self.find_asset(adam_id, pricing) {
            Some(idx) => idx,
            None if delta > 0 => {
                let mut asset = SimAsset::app(adam_id, Some(0));
                asset.pricing_param = pricing.to_string();
                self.add_asset(&asset)?
            }
            None => {
                return Err(SimError::UnknownAsset {
                    adam_id: adam_id.to_string(),
                    pricing: pricing.to_string(),
                });
            }
        };
        let state = &mut self.assets[idx as usize];
        let Some(total) = state.total else {
            return Err(refuse("the asset is unlimited"));
        };
        let new_total = i64::from(total) + i64::from(delta);
        if new_total < i64::from(state.assigned) {
            return Err(refuse(
                "fewer licenses than are assigned; disassociate first",
            ));
        }
        if new_total > i64::from(types::UNLIMITED_COUNT - 1) {
            return Err(refuse("the count would not fit Apple's int32"));
        }
        state.total = Some(new_total as u32);
        self.version += 1;
        Ok(())
    }
}

/// Client config as stored (section 3.3).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientConfigState {
    pub mdm_info: Option<MdmInfo>,
    pub notification_url: Option<String>,
    pub notification_auth_token: Option<String>,
    pub subscribed: Vec<String>,
}

impl ClientConfigState {
    /// Where notifications go, if configured.
    pub fn target(&self) -> Option<(String, String)> {
        Some((
            self.notification_url.clone()?,
            self.notification_auth_token.clone()?,
        ))
    }

    pub fn wants(&self, notification_type: &str) -> bool {
        self.notification_url.is_some()
            && self.notification_auth_token.is_some()
            && self.subscribed.iter().any(|t| t == notification_type)
    }
}

/// Token bucket for `maxRequestPerSecond` (section 9 item 9).
pub(crate) struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            tokens: 0.0,
            last: None,
        }
    }

    /// Takes one request's worth; capacity and refill are both `rate`.
    pub fn take(&mut self, rate: f64, now: Instant) -> bool {
        self.tokens = match self.last {
            None => rate,
            Some(last) => {
                (self.tokens + now.saturating_duration_since(last).as_secs_f64() * rate).min(rate)
            }
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(crate) struct Org {
    pub fingerprint: String,
    pub uid: String,
    pub org_name: String,
    /// Unix seconds; a renewal moves it.
    pub expires_at: std::sync::atomic::AtomicI64,
    pub read_only: bool,
    pub data: Mutex<OrgData>,
    pub client: Mutex<ClientConfigState>,
    pub bucket: Mutex<Bucket>,
    pub jobs: UnboundedSender<Work>,
    pub notifier: Notifier,
    /// Events held PENDING, in the order they stopped.
    pub held: Mutex<Vec<Parked>>,
    /// Wakes the invitation acceptor when users start waiting.
    pub invitations_waiting: tokio::sync::Notify,
}

impl Org {
    pub fn new(
        token: &SToken,
        assets: &[SimAsset],
        read_only: bool,
        jobs: UnboundedSender<Work>,
        notifier: Notifier,
    ) -> Result<Org, SimError> {
        let fingerprint = token.fingerprint().to_string();
        Ok(Org {
            uid: uid_for(&fingerprint),
            // Every versionId of this org shares the prefix, so a versionId
            // of another org (or a made-up one) is recognised as never issued.
            data: Mutex::new(OrgData::new(version_prefix(&fingerprint), assets)?),
            fingerprint,
            org_name: token.org_name().to_string(),
            expires_at: std::sync::atomic::AtomicI64::new(token.expires_at().unix_timestamp()),
            read_only,
            client: Mutex::new(ClientConfigState::default()),
            bucket: Mutex::new(Bucket::new()),
            jobs,
            notifier,
            held: Mutex::new(Vec::new()),
            invitations_waiting: tokio::sync::Notify::new(),
        })
    }

    /// Creates the event and queues it, both under the organization's lock so
    /// that queue order is acceptance order; `None` when the event task is
    /// gone (shutting down) and nothing would process it.
    pub fn enqueue(
        &self,
        shared: &Shared,
        event_id: String,
        body: JobBody,
        hold_after: Option<u64>,
    ) -> Option<String> {
        let mut data = lock(&self.data);
        data.events.insert(event_id.clone(), body.new_event());
        shared.busy_add(1);
        let job = Job {
            event_id: event_id.clone(),
            accepted_at: Instant::now(),
            body,
            hold_after,
        };
        if self.jobs.send(Work::New(job)).is_err() {
            data.events.remove(&event_id);
            shared.busy_done();
            return None;
        }
        Some(event_id)
    }

    /// Sends a notification of `notification_type` if the client subscribed to it.
    pub fn notify(&self, shared: &Shared, notification_type: &'static str, payload: Payload) {
        if lock(&self.client).wants(notification_type) {
            self.notifier
                .emit(shared, &self.uid, notification_type, payload);
        }
    }

    pub fn change_licenses(
        &self,
        shared: &Shared,
        adam_id: &str,
        pricing: &str,
        delta: i32,
    ) -> Result<(), SimError> {
        lock(&self.data).change_licenses(adam_id, pricing, delta)?;
        let payload = types::AssetCountNotification {
            adam_id: adam_id.to_string(),
            pricing_param: pricing.to_string(),
            count_delta: delta,
        };
        self.notify(
            shared,
            notification_type::ASSET_COUNT,
            Payload::Json(to_json(&payload)),
        );
        self.notifier.flush(shared);
        Ok(())
    }

    pub fn accept_invitation(&self, shared: &Shared, client_user_id: &str) -> Result<(), SimError> {
        let users = {
            let mut data = lock(&self.data);
            let index = data
                .active_user(client_user_id)
                .filter(|i| data.user(*i).status == UserStatus::Registered)
                .ok_or_else(|| SimError::NoPendingInvitation {
                    client_user_id: client_user_id.to_string(),
                })?;
            data.associate_users(&[index])
        };
        self.notify_associated(shared, users);
        Ok(())
    }

    /// Up to `max` users waiting for their invitation accept it, oldest
    /// first; returns their clientUserIds.
    pub fn accept_waiting(&self, shared: &Shared, max: usize) -> Vec<String> {
        let users = lock(&self.data).accept_waiting(max);
        let ids = users.iter().map(|u| u.client_user_id.clone()).collect();
        self.notify_associated(shared, users);
        ids
    }

    /// USER_ASSOCIATED for users who just linked, at most `max_items` a
    /// notification.
    fn notify_associated(&self, shared: &Shared, users: Vec<ResponseUser>) {
        if users.is_empty() {
            return;
        }
        let max = shared.config.notifications.max_items.max(1);
        let mut users = users.into_iter().peekable();
        while users.peek().is_some() {
            let payload = types::UserAssociatedNotification {
                associated_users: users.by_ref().take(max).collect(),
            };
            self.notify(
                shared,
                notification_type::USER_ASSOCIATED,
                Payload::Json(to_json(&payload)),
            );
        }
        self.notifier.flush(shared);
    }

    /// Users a CREATE just registered join the invitation queue once its
    /// notifications are out; with [`InvitationAcceptance::All`] they accept
    /// at once.
    pub fn invitations_sent(&self, shared: &Shared, registered: Vec<usize>) {
        if registered.is_empty() {
            return;
        }
        lock(&self.data).queue_invitations(registered);
        match shared.invitation_acceptance() {
            InvitationAcceptance::All => {
                self.accept_waiting(shared, usize::MAX);
            }
            InvitationAcceptance::Rate { .. } => self.invitations_waiting.notify_one(),
            InvitationAcceptance::Off => {}
        }
    }

    /// The user with this invite code, if it is still waiting.
    pub fn pending_invitation(&self, invite_code: &str) -> Option<String> {
        let data = lock(&self.data);
        data.users
            .iter()
            .find(|u| {
                u.status == UserStatus::Registered && u.invite_code.as_deref() == Some(invite_code)
            })
            .map(|u| u.client_user_id.clone())
    }

    pub fn has_waiting_invitations(&self) -> bool {
        lock(&self.data).has_waiting_invitations()
    }

    /// Users still waiting to accept their invitation.
    pub fn waiting_invitations(&self) -> usize {
        lock(&self.data).waiting_invitations()
    }

    pub fn expires_at(&self) -> OffsetDateTime {
        let secs = self.expires_at.load(std::sync::atomic::Ordering::Relaxed);
        OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    pub fn token_expired(&self) -> bool {
        OffsetDateTime::now_utc() >= self.expires_at()
    }

    /// Section 9 item 21: only inside the 15-day warning period, unless asked always.
    pub fn token_expiration_date(&self, always: bool) -> Option<String> {
        let expires_at = self.expires_at();
        let warn = OffsetDateTime::now_utc() + time::Duration::days(15) >= expires_at;
        (always || warn).then(|| crate::apple::token::format_apple_date(expires_at))
    }
}

/// A 16-digit library id, stable for a token, like Apple's `"2049025000431439"`.
fn uid_for(fingerprint: &str) -> String {
    let n = u64::from_str_radix(fingerprint.get(..15).unwrap_or("0"), 16).unwrap_or(0);
    format!("{}", 2_000_000_000_000_000u64 + n % 1_000_000_000_000_000)
}

fn version_prefix(fingerprint: &str) -> String {
    let head: String = fingerprint.chars().take(8).collect();
    format!("{head:0>8}-0000-4000-8000-")
}

/// A stand-in for the hash of an Apple Account: 20 bytes, Base64, like Apple's.
pub(crate) fn id_hash(seed: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(seed);
    base64::engine::general_purpose::STANDARD.encode(&digest[..20])
}

pub(crate) fn valid_adam_id(adam_id: &str) -> bool {
    !adam_id.is_empty() && adam_id.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn valid_pricing(pricing: &str) -> bool {
    pricing == types::STDQ || pricing == types::PLUS
}

/// Serializes a wire type that cannot fail to serialize (plain structs of
/// strings and numbers); `Null` would only appear if that ever changed.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> OrgData {
        OrgData::new(
            version_prefix("0123456789abcdef"),
            &[SimAsset::app("1", Some(2)), SimAsset::app("2", None)],
        )
        .unwrap()
    }

    #[test]
    fn pairs_keep_counts_and_indexes_in_step() {
        let mut d = data();
        d.insert_pair(0, TargetKind::Serial, "S1", 2);
        d.insert_pair(0, TargetKind::Serial, "S1", 3);
        d.insert_pair(1, TargetKind::Serial, "S1", 3);
        assert_eq!(d.asset(0).assigned, 1);
        assert_eq!(d.pair_count(), 2);
        let t = d.target(TargetKind::Serial, "S1").unwrap();
        assert_eq!(d.revocable_assets_of(t), vec![0, 1]);
        assert!(d.remove_pair(0, t));
        assert!(!d.remove_pair(0, t));
        assert_eq!(d.asset(0).assigned, 0);
        assert_eq!(d.pair_count(), 1);
        assert_eq!(d.all_pairs(), vec![(1, t)]);
    }

    #[test]
    fn versions_round_trip_and_refuse_the_future() {
        let mut d = data();
        d.version = 5;
        let v = d.render_version();
        assert_eq!(v.len(), 36);
        assert_eq!(d.parse_version(&v), Some(5));
        assert_eq!(d.parse_version(&v.to_uppercase()), Some(5));
        let future = v.replace("000000000005", "000000000006");
        assert_eq!(d.parse_version(&future), None);
        assert_eq!(
            d.parse_version("70e8c740-514c-11eb-bb63-a90b882fcd52"),
            None
        );
    }

    #[test]
    fn structural_pages_match_the_filtered_walk() {
        let mut d = data();
        for i in 0..7 {
            d.insert_pair(i % 2, TargetKind::Serial, &format!("S{i}"), 2);
        }
        let q = AssignmentQuery::default();
        let (total, first) = d.assignments_page(&q, 0, 3);
        let (_, second) = d.assignments_page(&q, 3, 3);
        let (_, third) = d.assignments_page(&q, 6, 3);
        assert_eq!(total, 7);
        let mut walked = first;
        walked.extend(second);
        walked.extend(third);
        assert_eq!(walked, d.all_pairs());
    }

    #[test]
    fn bucket_allows_a_burst_of_rate_then_refills() {
        let mut b = Bucket::new();
        let t0 = Instant::now();
        assert!(b.take(2.0, t0));
        assert!(b.take(2.0, t0));
        assert!(!b.take(2.0, t0));
        assert!(b.take(2.0, t0 + std::time::Duration::from_millis(500)));
    }
}
