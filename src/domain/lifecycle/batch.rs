//! One request's worth of a job: what was sent, its events, and a decision
//! per pair. Its transitions are driven by [`super::JobRecord`], which keeps
//! the job's counters in step with them.

use serde::{Deserialize, Serialize};

use crate::domain::ids::{EventId, JobId};
use crate::domain::job::Phase;
use crate::domain::plan::Rect;

use super::varint::{put_varint, take_varint};

/// A fixed-size bit set, stored run-length encoded (or as Base64 words when
/// that is shorter) to keep batch records small.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub fn get(&self, i: u32) -> bool {
        self.words
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; false if it was already set (or out of range).
    pub fn set(&mut self, i: u32) -> bool {
        match self.words.get_mut(i as usize / 64) {
            Some(w) => {
                let mask = 1 << (i % 64);
                let was = *w & mask != 0;
                *w |= mask;
                !was
            }
            None => false,
        }
    }
}

/// A stored bitmap that starts with this is run-length encoded; anything
/// else is the words as Base64, as every version wrote before.
const RUNS_MARK: char = '~';

impl Bitmap {
    /// Alternating lengths of runs of clear and set bits (starting with
    /// clear), as varints after the word count. Apple decides pairs in
    /// stretches of the rect, so a batch's bitmaps are a few runs: a
    /// 25,000-pair batch rewritten after each notification stays tens of
    /// bytes instead of 4 KiB.
    fn runs(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.words.len() as u64);
        let mut value = false;
        let mut run = 0u64;
        for w in &self.words {
            if (value && *w == u64::MAX) || (!value && *w == 0) {
                run += 64;
                continue;
            }
            for bit in 0..64 {
                if (w >> bit) & 1 == 1 {
                    if !value {
                        put_varint(&mut out, run);
                        value = true;
                        run = 0;
                    }
                } else if value {
                    put_varint(&mut out, run);
                    value = false;
                    run = 0;
                }
                run += 1;
            }
        }
        // The last run is implied by the word count.
        out
    }

    fn from_runs(mut bytes: &[u8]) -> Result<Bitmap, &'static str> {
        let words = take_varint(&mut bytes)?;
        if words > u32::MAX as u64 / 64 + 1 {
            return Err("bitmap longer than any batch");
        }
        let total = words * 64;
        let mut b = Bitmap {
            words: vec![0; words as usize],
        };
        let (mut at, mut value) = (0u64, false);
        while !bytes.is_empty() {
            let run = take_varint(&mut bytes)?;
            let end = at
                .checked_add(run)
                .filter(|e| *e <= total)
                .ok_or("bitmap runs overflow it")?;
            if value {
                b.set_range(at, end);
            }
            at = end;
            value = !value;
        }
        if value {
            b.set_range(at, total);
        }
        Ok(b)
    }

    fn set_range(&mut self, from: u64, to: u64) {
        let mut i = from;
        while i < to {
            if i.is_multiple_of(64) && to - i >= 64 {
                self.words[(i / 64) as usize] = u64::MAX;
                i += 64;
            } else {
                self.words[(i / 64) as usize] |= 1 << (i % 64);
                i += 1;
            }
        }
    }
}

impl Serialize for Bitmap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        let b64 = &base64::engine::general_purpose::STANDARD_NO_PAD;
        let runs = self.runs();
        if runs.len() < self.words.len() * 8 {
            let mut out = String::with_capacity(1 + runs.len().div_ceil(3) * 4);
            out.push(RUNS_MARK);
            b64.encode_string(runs, &mut out);
            return s.serialize_str(&out);
        }
        let mut bytes = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        s.serialize_str(&b64.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let b64 = &base64::engine::general_purpose::STANDARD_NO_PAD;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if let Some(runs) = s.strip_prefix(RUNS_MARK) {
            let bytes = b64.decode(runs).map_err(serde::de::Error::custom)?;
            return Bitmap::from_runs(&bytes).map_err(serde::de::Error::custom);
        }
        let bytes = b64.decode(s.as_bytes()).map_err(serde::de::Error::custom)?;
        if bytes.len() % 8 != 0 {
            return Err(serde::de::Error::custom("bitmap length is not whole words"));
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Ok(Bitmap { words })
    }
}

/// A pair Apple named as revoked by a revoke batch: the asset Apple names
/// and the target's offset in the batch's rect (serials, then users).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    pub adam_id: String,
    pub pricing_param: String,
    pub target: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    /// Recorded before the POST; without an eventId after a crash, its
    /// outcome is unknown and must be reconciled before anything is resent.
    Sending,
    /// Apple accepted it: at least one eventId is known.
    Sent,
    /// Every pair confirmed or failed.
    Decided,
    /// Its job was canceled while it was being sent: what Apple did of it
    /// was reconciled, the rest is never sent. Its undecided pairs stay
    /// pending, like the rest of a canceled job's unsent work.
    Withdrawn,
}

impl BatchState {
    /// Still to be tracked or reconciled.
    pub fn is_open(self) -> bool {
        matches!(self, BatchState::Sending | BatchState::Sent)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    job_id: JobId,
    no: u32,
    token: String,
    phase: Phase,
    rect: Rect,
    state: BatchState,
    /// Every eventId Apple gave for this batch (a resent remainder adds one).
    events: Vec<EventId>,
    created_ms: u64,
    sent_ms: u64,
    /// Last sign of life: the send, or the last notification.
    last_activity_ms: u64,
    /// Apple's event status said the event is finished.
    terminal_ms: Option<u64>,
    next_poll_ms: u64,
    confirmed: Bitmap,
    failed: Bitmap,
    n_confirmed: u32,
    n_failed: u32,
    /// A revoke batch: the pairs Apple named, each once, in the order
    /// named; removal commands refer to them by position.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revoked: Vec<Revoked>,
    /// A `Sending` batch being reconciled: the pairs Apple was already
    /// asked about (Get Assignments) since its last POST, whatever the
    /// answer, so that a reconciliation cut short by a crash goes on where
    /// it stopped. Cleared when the reconciliation ends and when Apple takes
    /// the batch; a POST is never made while it is set (its answers would
    /// predate that POST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checked: Option<Bitmap>,
}

impl BatchRecord {
    pub(super) fn new(
        job_id: &JobId,
        token: &str,
        no: u32,
        phase: Phase,
        rect: Rect,
        now: u64,
    ) -> BatchRecord {
        let pairs = rect.pairs();
        BatchRecord {
            job_id: job_id.clone(),
            no,
            token: token.to_string(),
            phase,
            rect,
            state: BatchState::Sending,
            events: Vec::new(),
            created_ms: now,
            sent_ms: 0,
            last_activity_ms: now,
            terminal_ms: None,
            next_poll_ms: 0,
            confirmed: Bitmap::new(pairs),
            failed: Bitmap::new(pairs),
            n_confirmed: 0,
            n_failed: 0,
            revoked: Vec::new(),
            checked: None,
        }
    }

    /// The pairs Apple named as revoked (a revoke batch only).
    pub fn revoked(&self) -> &[Revoked] {
        &self.revoked
    }

    /// Records a pair Apple named as revoked; its position when it is new.
    pub(super) fn add_revoked(&mut self, r: &Revoked) -> Option<u32> {
        if self.phase != Phase::Revoke || r.target >= self.rect.n_targets() {
            return None;
        }
        if self.revoked.iter().any(|x| x == r) {
            return None;
        }
        self.revoked.push(r.clone());
        Some(self.revoked.len() as u32 - 1)
    }

    pub fn job_id(&self) -> &JobId {
        &self.job_id
    }

    pub fn no(&self) -> u32 {
        self.no
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn rect(&self) -> &Rect {
        &self.rect
    }

    pub fn state(&self) -> BatchState {
        self.state
    }

    pub fn events(&self) -> &[EventId] {
        &self.events
    }

    pub fn sent_ms(&self) -> u64 {
        self.sent_ms
    }

    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms
    }

    pub fn terminal_ms(&self) -> Option<u64> {
        self.terminal_ms
    }

    pub fn next_poll_ms(&self) -> u64 {
        self.next_poll_ms
    }

    pub fn pairs(&self) -> u32 {
        self.rect.pairs() as u32
    }

    pub fn confirmed(&self) -> u32 {
        self.n_confirmed
    }

    pub fn failed(&self) -> u32 {
        self.n_failed
    }

    pub fn undecided(&self) -> u32 {
        self.pairs() - self.n_confirmed - self.n_failed
    }

    pub fn is_decided_pair(&self, i: u32) -> bool {
        self.confirmed.get(i) || self.failed.get(i)
    }

    pub fn is_confirmed_pair(&self, i: u32) -> bool {
        self.confirmed.get(i)
    }

    /// Pair indexes not yet confirmed or failed, in order.
    pub fn undecided_pairs(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.pairs()).filter(|p| !self.is_decided_pair(*p))
    }

    /// A reconciliation of this batch is under way (some pairs checked).
    pub fn reconciling(&self) -> bool {
        self.checked.is_some()
    }

    /// Undecided pairs a reconciliation under way has not asked Apple about
    /// yet (every undecided pair when none is under way), in order.
    pub fn to_check(&self) -> impl Iterator<Item = u32> + '_ {
        self.undecided_pairs()
            .filter(|p| !self.checked.as_ref().is_some_and(|c| c.get(*p)))
    }

    /// Records pairs a reconciliation asked Apple about. Only a `Sending`
    /// batch is reconciled; false otherwise or when nothing was new.
    pub(super) fn note_checked(&mut self, pairs: &[u32]) -> bool {
        if self.state != BatchState::Sending || pairs.is_empty() {
            return false;
        }
        let n = self.pairs() as u64;
        let checked = self.checked.get_or_insert_with(|| Bitmap::new(n));
        let mut new = false;
        for p in pairs {
            new |= checked.set(*p);
        }
        new
    }

    /// The reconciliation is over: what it learned is in the pairs' states.
    pub(super) fn end_reconciliation(&mut self) -> bool {
        self.checked.take().is_some()
    }

    /// When the tracker should ask Apple about this batch's event next: not
    /// a state change, only a schedule.
    pub fn schedule_poll(&mut self, at_ms: u64) {
        self.next_poll_ms = at_ms;
    }

    pub(super) fn mark_sent(&mut self, event_id: &str, now: u64) -> bool {
        if !self.state.is_open() {
            return false;
        }
        self.state = BatchState::Sent;
        self.checked = None;
        self.events.push(EventId::from(event_id));
        self.sent_ms = now;
        self.last_activity_ms = now;
        self.terminal_ms = None;
        self.next_poll_ms = 0;
        true
    }

    pub(super) fn withdraw(&mut self) -> bool {
        if self.state != BatchState::Sending {
            return false;
        }
        self.state = BatchState::Withdrawn;
        true
    }

    pub(super) fn confirm(&mut self, pair: u32) -> bool {
        if pair >= self.pairs() || self.is_decided_pair(pair) {
            return false;
        }
        self.confirmed.set(pair);
        self.n_confirmed += 1;
        true
    }

    pub(super) fn fail(&mut self, pair: u32) -> bool {
        if pair >= self.pairs() || self.is_decided_pair(pair) {
            return false;
        }
        self.failed.set(pair);
        self.n_failed += 1;
        true
    }

    pub(super) fn touch(&mut self, now: u64) {
        self.last_activity_ms = now;
    }

    pub(super) fn mark_terminal(&mut self, now: u64) {
        if self.terminal_ms.is_none() {
            self.terminal_ms = Some(now);
        }
    }

    /// `→ decided` once every pair is; true on that transition only.
    pub(super) fn close_if_decided(&mut self) -> bool {
        if self.undecided() > 0 || !self.state.is_open() {
            return false;
        }
        self.state = BatchState::Decided;
        true
    }
}
