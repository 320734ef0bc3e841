//! Leases for a store only one process opens: held in memory, since every
//! lease is that process's (sled locks its directory). A shared backend
//! keeps them in the database, on its clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Lease;

/// Lease name -> (holder, until).
#[derive(Debug, Default)]
pub(crate) struct LocalLeases(Mutex<HashMap<String, (String, Instant)>>);

impl LocalLeases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes or renews the leases of `names` that are free or `holder`'s,
    /// for `ttl`; the names now held, each once.
    pub(crate) fn take(&self, names: &[String], holder: &str, ttl: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut leases = self.map();
        let mut held = Vec::new();
        for name in names {
            let free = leases
                .get(name)
                .is_none_or(|(h, until)| h == holder || *until <= now);
            if free {
                leases.insert(name.clone(), (holder.to_string(), now + ttl));
                if !held.contains(name) {
                    held.push(name.clone());
                }
            }
        }
        held
    }

    /// Shortens `holder`'s leases of `names` to end within `linger`.
    pub(crate) fn release(&self, names: &[String], holder: &str, linger: Duration) {
        let until = Instant::now() + linger;
        let mut leases = self.map();
        for name in names {
            if let Some((h, expires)) = leases.get_mut(name)
                && h == holder
            {
                *expires = (*expires).min(until);
            }
        }
    }

    /// Every lease, by name.
    pub(crate) fn list(&self) -> Vec<Lease> {
        let now = Instant::now();
        let mut out: Vec<Lease> = self
            .map()
            .iter()
            .map(|(name, (holder, until))| Lease {
                name: name.clone(),
                holder: holder.clone(),
                remaining_ms: if *until > now {
                    (*until - now).as_millis() as i64
                } else {
                    -((now - *until).as_millis() as i64)
                },
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
