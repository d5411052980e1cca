//! The backoff as the guarded call's [`Retry`] policy: `Coordinator::guarded_call_with(feature,
//! &BackoffPolicy::new(coordinator.retry_backoff(feature)?), ..)`.
//!
//! [`Retry::delay`] is synchronous and stateless per call, so the fleet retry budget (one
//! script call) is not spent here: the pipeline draws on
//! [`crate::Coordinator::retry_budget`] itself (a `deposit()` on a request's first attempt at
//! a target, a `withdraw()` before each retry).

use std::time::Duration;

use super::backoff::{jitter, BackoffParams};
use crate::pipeline::{ChainTarget, Class, Retry};

/// [`BackoffParams`] as a [`Retry`] policy: up to `max_attempts` attempts per target, the
/// jittered delay before each retry, a `retry-after` as a floor, and none over
/// `retry_after_cap` (the chain goes on to its next target instead).
#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    params: BackoffParams,
}

impl BackoffPolicy {
    /// A policy with these settings (e.g. [`crate::Coordinator::retry_backoff`]'s).
    pub fn new(params: BackoffParams) -> Self {
        BackoffPolicy { params }
    }

    /// The delay after `failed` failed attempts in a row whose last asked for `retry_after`.
    pub fn delay_after(&self, failed: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let p = &self.params;
        if failed == 0 || failed >= p.max_attempts {
            return None;
        }
        if retry_after.is_some_and(|r| r > p.retry_after_cap) {
            return None;
        }
        let n = failed - 1;
        // Stateless: decorrelated jitter grows from the previous step instead of the
        // previous (random) delay.
        let prev = if n == 0 { p.base } else { p.step(n - 1) };
        let d = jitter(p, n, prev, &mut rand::rng());
        Some(d.max(retry_after.unwrap_or(Duration::ZERO)))
    }
}

impl Retry for BackoffPolicy {
    fn delay(&self, _target: &ChainTarget, failed: u32, class: &Class) -> Option<Duration> {
        self.delay_after(failed, class.retry_after())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Jitter;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_stay_in_bounds_and_stop_at_max_attempts(
            base in 1u64..1_000,
            extra in 0u64..10_000,
            attempts in 1u32..10,
            failed in 0u32..12,
            hint in proptest::option::of(0u64..90_000),
            jitter in prop_oneof![
                Just(Jitter::Full),
                Just(Jitter::Proportional),
                Just(Jitter::Decorrelated),
                Just(Jitter::None)
            ],
        ) {
            let p = BackoffParams {
                base: Duration::from_millis(base),
                cap: Duration::from_millis(base + extra),
                max_attempts: attempts,
                jitter,
                retry_after_cap: Duration::from_secs(60),
            };
            let hint = hint.map(Duration::from_millis);
            let d = BackoffPolicy::new(p).delay_after(failed, hint);
            if failed == 0 || failed >= attempts || hint.is_some_and(|h| h > p.retry_after_cap) {
                prop_assert_eq!(d, None);
            } else {
                let d = d.expect("a retry is planned");
                prop_assert!(d <= p.cap.max(hint.unwrap_or(Duration::ZERO)));
                prop_assert!(d >= hint.unwrap_or(Duration::ZERO));
            }
        }
    }
}
