//! Bulkhead per feature: at most N calls in flight, as leased permits.
//!
//! A permit is an id with a lease expiry (ms). Expired permits are reclaimed inside acquire,
//! so a crashed holder's permits come back within one lease. Release is idempotent; a
//! heartbeat extends a live lease. In Redis this is a sorted set (id -> expiry).

use std::collections::HashMap;

/// Bulkhead parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkheadParams {
    /// Permits at once.
    pub limit: u32,
    /// Lease length in ms.
    pub lease_ms: u64,
}

/// The in-memory permit table of one feature (the reference model for `lua/admit.lua`).
#[derive(Debug, Clone, Default)]
pub struct Permits {
    held: HashMap<String, u64>,
}

impl Permits {
    /// Drops expired permits.
    pub fn reclaim(&mut self, now_ms: u64) {
        self.held.retain(|_, expiry| *expiry > now_ms);
    }

    /// After [`Self::reclaim`]: `Ok(())` if a permit is free, else `Err(ms until the earliest
    /// lease ends)`.
    pub fn check(&self, p: &BulkheadParams, now_ms: u64) -> Result<(), u64> {
        if (self.held.len() as u64) < u64::from(p.limit) {
            Ok(())
        } else {
            let earliest = self.held.values().copied().min().unwrap_or(now_ms + 1);
            Err(earliest.saturating_sub(now_ms).max(1))
        }
    }

    /// Takes a permit (after a successful [`Self::check`]).
    pub fn insert(&mut self, p: &BulkheadParams, id: &str, now_ms: u64) {
        self.held.insert(id.to_owned(), now_ms + p.lease_ms);
    }

    /// Releases a permit; releasing an unknown or already released id does nothing.
    pub fn release(&mut self, id: &str) -> bool {
        self.held.remove(id).is_some()
    }

    /// Extends a live lease to `now + lease`; `false` if the permit is gone or expired.
    pub fn heartbeat(&mut self, p: &BulkheadParams, id: &str, now_ms: u64) -> bool {
        match self.held.get_mut(id) {
            Some(expiry) if *expiry > now_ms => {
                *expiry = now_ms + p.lease_ms;
                true
            }
            Some(_) => {
                self.held.remove(id);
                false
            }
            None => false,
        }
    }

    /// Permits held and not expired at `now_ms`.
    pub fn in_flight(&self, now_ms: u64) -> u32 {
        self.held.values().filter(|e| **e > now_ms).count() as u32
    }

    /// Whether `id` is in the table (live or expired).
    pub fn contains(&self, id: &str) -> bool {
        self.held.contains_key(id)
    }

    /// Adds a permit with `lease_left_ms` of lease from `now_ms`, without checking the limit
    /// (a call already running being counted); an id already present is left as it is.
    pub fn adopt(&mut self, id: &str, lease_left_ms: u64, now_ms: u64) -> bool {
        if lease_left_ms == 0 || self.held.contains_key(id) {
            return false;
        }
        self.held.insert(id.to_owned(), now_ms + lease_left_ms);
        true
    }

    /// The live permits: (id, ms of lease left), in no particular order.
    pub fn live(&self, now_ms: u64) -> impl Iterator<Item = (&str, u64)> {
        self.held
            .iter()
            .filter(move |(_, e)| **e > now_ms)
            .map(move |(id, e)| (id.as_str(), *e - now_ms))
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
