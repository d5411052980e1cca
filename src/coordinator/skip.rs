//! The local "open until T" skip: once the store said a target is open until T, this replica
//! refuses that target by itself, without a store round trip, until min(T, now + [`HOLD`]),
//! so that an operator's forced close is seen within about [`HOLD`]. Used by the request API
//! ([`super::Coordinator::admit_request`], [`super::Coordinator::admit_attempt`]) and so by
//! the fallback chain.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::{CircuitState, Rejection};

/// Longest this replica trusts an "open" answer without asking the store again.
pub(crate) const HOLD: Duration = Duration::from_secs(1);

/// Most targets remembered at once (past it, expired entries are swept, then new ones are
/// not remembered).
const MAX: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Skip until then (at most `HOLD` after the answer).
    until: Instant,
    /// When the store said it opens again (`None`: held open by an operator, or unknown).
    open_until: Option<Instant>,
    state: CircuitState,
    not_before: bool,
}

/// Targets this replica skips for now.
#[derive(Debug, Default)]
pub(crate) struct Skips {
    map: Mutex<HashMap<String, Entry>>,
}

impl Skips {
    /// Remembers what a store refusal says about its target (open, forced open, not before);
    /// other refusals (half-open with its probes taken, feature limits) are not remembered.
    pub(crate) fn learn(&self, rejection: &Rejection) {
        let now = Instant::now();
        let (target, retry_after, state, not_before) = match rejection {
            Rejection::CircuitOpen {
                target,
                state: state @ (CircuitState::Open | CircuitState::ForcedOpen),
                retry_after,
            } => (target, *retry_after, *state, false),
            Rejection::NotBefore {
                target,
                retry_after,
            } => (target, Some(*retry_after), CircuitState::Open, true),
            _ => return,
        };
        let open_until = retry_after.map(|d| now + d);
        let until = open_until.map_or(now + HOLD, |t| t.min(now + HOLD));
        if until <= now {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX && !map.contains_key(target) {
            map.retain(|_, e| e.until > now);
            if map.len() >= MAX {
                return;
            }
        }
        map.insert(
            target.clone(),
            Entry {
                until,
                open_until,
                state,
                not_before,
            },
        );
    }

    /// Forgets what this replica learnt about `target` (an operator command changed it).
    pub(crate) fn forget(&self, target: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(target);
    }

    /// The refusal to give without asking the store, while a skip of `target` holds.
    pub(crate) fn check(&self, target: &str) -> Option<Rejection> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let e = *map.get(target)?;
        if e.until <= now {
            map.remove(target);
            return None;
        }
        let left = e.open_until.map(|t| t.saturating_duration_since(now));
        Some(if e.not_before {
            Rejection::NotBefore {
                target: target.to_owned(),
                retry_after: left.unwrap_or(Duration::ZERO),
            }
        } else {
            Rejection::CircuitOpen {
                target: target.to_owned(),
                state: e.state,
                retry_after: left,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(target: &str, ms: Option<u64>) -> Rejection {
        Rejection::CircuitOpen {
            target: target.to_owned(),
            state: if ms.is_some() {
                CircuitState::Open
            } else {
                CircuitState::ForcedOpen
            },
            retry_after: ms.map(Duration::from_millis),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_skip_holds_until_the_open_time_or_a_second_whichever_is_first() {
        let s = Skips::default();
        s.learn(&open("a", Some(300)));
        s.learn(&open("b", Some(60_000)));
        s.learn(&open("c", None));
        assert!(s.check("a").is_some() && s.check("b").is_some() && s.check("c").is_some());
        tokio::time::advance(Duration::from_millis(301)).await;
        assert!(s.check("a").is_none(), "open time over");
        assert!(s.check("b").is_some());
        tokio::time::advance(Duration::from_millis(700)).await;
        assert!(s.check("b").is_none(), "bounded by HOLD");
        assert!(s.check("c").is_none(), "forced open: bounded by HOLD");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_and_feature_refusals_are_not_skipped() {
        let s = Skips::default();
        s.learn(&Rejection::CircuitOpen {
            target: "a".into(),
            state: CircuitState::HalfOpen,
            retry_after: Some(Duration::from_secs(5)),
        });
        s.learn(&Rejection::BulkheadFull {
            feature: "f".into(),
            limit: 1,
            retry_after: None,
        });
        assert!(s.check("a").is_none());
    }
}
