//! The fleet measures itself: every coordinator that admits calls keeps an expiring entry in
//! the shared store's membership (`lua/member.lua`), renewed by a background task (one script
//! call per renewal interval, never on a caller's way). Local mode divides bulkhead and rate
//! limits by the last fleet size this replica observed, with `redis.replicas` as the floor
//! (and the only value before anything was observed). A coordinator that never admits (an
//! operator tool) never joins.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::tiered::Tried;
use super::Shared;
use crate::keys::LAYOUT;

/// One live member of the fleet, as the shared store lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Member {
    /// The replica's id (random per coordinator; its permit ids start with it).
    pub id: String,
    /// Time left before its entry expires unless renewed.
    pub expires_in: Duration,
    /// Whether this is the coordinator that was asked.
    pub this: bool,
}

/// The membership key of `namespace` (its own hash tag: one slot on Cluster).
pub(crate) fn members_key(namespace: &str) -> String {
    format!("fusebox:{{{namespace}:fleet}}:{LAYOUT}:members")
}

/// What this replica knows about the fleet's size.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) key: String,
    /// `redis.replicas`: the floor of the divisor.
    floor: u32,
    /// The last live member count observed (0: none yet).
    observed: AtomicU32,
    joined: AtomicBool,
    /// Renewal interval and entry lifetime.
    pub(crate) every: Duration,
    pub(crate) ttl: Duration,
}

impl Fleet {
    /// Renews every `retry_interval` (within 100 ms – 5 s); an entry lives three renewals.
    pub(crate) fn new(namespace: &str, floor: u32, retry_interval: Duration) -> Self {
        let every = retry_interval.clamp(Duration::from_millis(100), Duration::from_secs(5));
        Fleet {
            key: members_key(namespace),
            floor: floor.max(1),
            observed: AtomicU32::new(0),
            joined: AtomicBool::new(false),
            every,
            ttl: every * 3,
        }
    }

    /// What local mode divides limits by: the larger of the floor and the last observed size.
    pub(crate) fn divisor(&self) -> u32 {
        divisor(self.floor, self.observed.load(Ordering::Acquire))
    }

    /// Records an observed size; true when the divisor changed.
    pub(crate) fn observe(&self, n: u32) -> bool {
        let before = self.divisor();
        self.observed.store(n, Ordering::Release);
        self.divisor() != before
    }

    /// True the first time only: the caller starts the renewal task.
    pub(crate) fn join_once(&self) -> bool {
        !self.joined.load(Ordering::Relaxed) && !self.joined.swap(true, Ordering::AcqRel)
    }
}

/// The local-mode divisor: `redis.replicas` is the floor.
pub(crate) fn divisor(floor: u32, observed: u32) -> u32 {
    floor.max(observed).max(1)
}

/// Renews this replica's entry until the coordinator is dropped.
pub(crate) async fn run(shared: Weak<Shared>) {
    loop {
        let every = {
            let Some(s) = shared.upgrade() else { return };
            renew(&s).await;
            s.fleet.every
        };
        tokio::time::sleep(every).await;
    }
}

async fn renew(s: &Arc<Shared>) {
    let ttl_ms = s.fleet.ttl.as_millis() as u64;
    if let Tried::Done(n) = s
        .tiered
        .remote(|st| st.join(&s.fleet.key, &s.replica, ttl_ms))
        .await
    {
        if s.fleet.observe(n) {
            s.reshare();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_the_floor_of_the_observed_size() {
        assert_eq!(divisor(1, 0), 1, "nothing observed: the setting");
        assert_eq!(divisor(4, 0), 4);
        assert_eq!(divisor(1, 3), 3, "observed above the setting");
        assert_eq!(divisor(4, 3), 4, "the setting is the floor");
        assert_eq!(divisor(0, 0), 1);
    }

    #[test]
    fn observing_reports_divisor_changes_only() {
        let f = Fleet::new("ns", 2, Duration::from_secs(1));
        assert!(!f.observe(1), "below the floor: no change");
        assert!(f.observe(3));
        assert!(!f.observe(3));
        assert!(f.observe(2), "back to the floor");
        assert_eq!(f.divisor(), 2);
        assert!(f.join_once());
        assert!(!f.join_once());
    }

    #[test]
    fn renewal_interval_follows_retry_interval_within_bounds() {
        let f = Fleet::new("ns", 1, Duration::from_millis(10));
        assert_eq!(f.every, Duration::from_millis(100));
        assert_eq!(f.ttl, Duration::from_millis(300));
        let f = Fleet::new("ns", 1, Duration::from_secs(60));
        assert_eq!(f.every, Duration::from_secs(5));
        assert_eq!(members_key("app"), "fusebox:{app:fleet}:v1:members");
    }
}
