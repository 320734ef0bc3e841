//! A job's user targets: the users step before its associations (users
//! ensured at Apple, invitations written), which users are `Associated`,
//! and invitations released. Driven by [`super::JobRecord`].

use serde::{Deserialize, Serialize};

use super::Bitmap;
use crate::domain::job::UserCounts;

/// Where a job's user targets stand. Positions are those of
/// [`crate::domain::job::JobSpec::job_users`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProgress {
    total: u64,
    /// The users step is done: users ensured and retired at Apple, and the
    /// invitations of those `Registered` written to the outbox.
    ready: bool,
    associated: Bitmap,
    associated_n: u64,
    /// Invitations in the outbox, not yet acknowledged by the MDM.
    invites_pending: u64,
    invited: u64,
}

impl UserProgress {
    pub(super) fn new(total: usize) -> UserProgress {
        UserProgress {
            total: total as u64,
            ready: false,
            associated: Bitmap::new(total as u64),
            associated_n: 0,
            invites_pending: 0,
            invited: 0,
        }
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    pub fn is_associated(&self, i: u32) -> bool {
        self.associated.get(i)
    }

    pub fn all_associated(&self) -> bool {
        self.associated_n >= self.total
    }

    pub fn invites_pending(&self) -> u64 {
        self.invites_pending
    }

    /// The users step is over; `invitations` were written to the outbox in
    /// the same commit. False when it was over already (nothing changes).
    pub(super) fn make_ready(&mut self, invitations: u64) -> bool {
        if self.ready {
            return false;
        }
        self.ready = true;
        self.invites_pending += invitations;
        true
    }

    /// Users (by position) now `Associated`; how many were not before.
    pub(super) fn associate(&mut self, users: &[u32]) -> u64 {
        let mut n = 0;
        for &u in users {
            if (u as u64) < self.total && self.associated.set(u) {
                n += 1;
            }
        }
        self.associated_n += n;
        n
    }

    pub(super) fn invited(&mut self, n: u64) {
        self.invited += n;
        self.invites_pending = self.invites_pending.saturating_sub(n);
    }

    /// Nothing of the users step keeps the job from completing.
    pub(super) fn settled(&self) -> bool {
        self.ready && self.invites_pending == 0
    }

    pub fn counts(&self) -> UserCounts {
        UserCounts {
            total: self.total,
            associated: self.associated_n,
            invited: self.invited,
        }
    }
}
