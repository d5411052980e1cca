//! Exponential backoff with jitter, as plain arithmetic: no I/O, no clock, no sleeping.
//!
//! The delay before retry `n` (`n = 0` for the first retry) starts from the exponential step
//! `min(cap, base × 2^n)` and is jittered by one of the [`Jitter`] kinds (AWS Architecture
//! Blog, "Exponential Backoff And Jitter"). The random source is a seedable [`StdRng`], so a
//! test that fixes the seed sees the same delays every run.
//!
//! **`retry-after`.** An upstream hint (`retry-after-ms` / `retry-after`, parsed elsewhere
//! into an `Option<Duration>`) is a floor, not a replacement: the wait is
//! `max(jittered delay, retry_after)`, because retrying before the server's instant only earns
//! another 429/529, while the jittered part still spreads a fleet that all got the same hint.
//! A hint longer than `retry_after_cap` is not waited for at all: the plan gives up on the
//! target ([`GiveUp::RetryAfterTooLong`]) so the caller falls through to its next tier at
//! once instead of sleeping (and the target's fleet-wide "not before" keeps the other
//! replicas off it meanwhile). So no wait is ever longer than `max(cap, retry_after_cap)`.
//!
//! **Deadline.** [`Backoff::plan`] takes the time left before the call's deadline and the
//! per-attempt timeout: it answers "wait `d`, then attempt" only when `d + attempt_timeout`
//! fits in what is left, so no attempt is ever started that could not finish before the
//! deadline.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How the exponential step is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// `rand(0, step)`: the least total work for a fleet of competing clients. Default.
    #[default]
    Full,
    /// `min(cap, step × rand[0.75, 1.25))`: the common ±25%, never below three quarters of
    /// the step.
    Proportional,
    /// `min(cap, rand(base, previous × 3))`: each delay grows from the previous one rather
    /// than from the attempt number.
    Decorrelated,
    /// The step itself (lockstep retries across a fleet: for tests and comparisons).
    None,
}

impl Jitter {
    /// The name used in configuration (`"full"`, `"proportional"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::Full => "full",
            Jitter::Proportional => "proportional",
            Jitter::Decorrelated => "decorrelated",
            Jitter::None => "none",
        }
    }
}

/// Backoff settings (validated by the configuration; see `[retry]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffParams {
    /// First exponential step (and decorrelated jitter's lower bound).
    pub base: Duration,
    /// Largest computed delay.
    pub cap: Duration,
    /// Attempts per target, the first one included (1: no retry).
    pub max_attempts: u32,
    /// How delays are randomised.
    pub jitter: Jitter,
    /// Longest `retry-after` honoured; a longer one gives up on the target.
    pub retry_after_cap: Duration,
}

impl Default for BackoffParams {
    /// The `[retry]` defaults: 500 ms base, 8 s cap, 3 attempts, full jitter, 60 s
    /// `retry-after` cap.
    fn default() -> Self {
        BackoffParams {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            max_attempts: 3,
            jitter: Jitter::Full,
            retry_after_cap: Duration::from_secs(60),
        }
    }
}

impl BackoffParams {
    /// The exponential step before retry `n`: `min(cap, base × 2^n)` (no jitter).
    pub fn step(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Plan {
    /// Wait this long, then make the next attempt.
    Wait(Duration),
    /// Do not retry this target (fall through to the next tier).
    GiveUp(GiveUp),
}

/// Why [`Backoff::plan`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUp {
    /// `max_attempts` attempts were made.
    Attempts,
    /// The wait plus one attempt's timeout would end after the deadline.
    Deadline {
        /// The wait that was planned.
        wait: Duration,
    },
    /// The upstream asked for a longer wait than `retry_after_cap`.
    RetryAfterTooLong {
        /// What it asked for.
        retry_after: Duration,
    },
}

/// The delays of one call's retries on one target, in order. Pure: it never sleeps.
///
/// As an [`Iterator`] it yields the delays without `retry-after` hints or a deadline, and
/// ends after `max_attempts - 1` of them.
#[derive(Debug, Clone)]
pub struct Backoff {
    params: BackoffParams,
    rng: StdRng,
    /// Attempts made so far (the first included).
    attempts: u32,
    /// The previous computed delay (decorrelated jitter grows from it).
    prev: Duration,
}

impl Backoff {
    /// A backoff with a random seed. Counts the first attempt as made.
    pub fn new(params: BackoffParams) -> Self {
        Self::seeded(params, rand::rng().random())
    }

    /// A backoff whose jitter is fixed by `seed` (tests). Counts the first attempt as made.
    pub fn seeded(params: BackoffParams, seed: u64) -> Self {
        Backoff {
            params,
            rng: StdRng::seed_from_u64(seed),
            attempts: 1,
            prev: params.base,
        }
    }

    /// The settings.
    pub fn params(&self) -> &BackoffParams {
        &self.params
    }

    /// Attempts made so far, the first one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next computed (jittered) delay, without hints.
    fn jittered(&mut self) -> Duration {
        let n = self.attempts.saturating_sub(1);
        let d = jitter(&self.params, n, self.prev, &mut self.rng);
        self.prev = d.max(self.params.base);
        d
    }

    /// The wait before the next attempt, honouring `retry_after` (see the module docs), or
    /// why there is none. Counts the next attempt as made when it answers [`Plan::Wait`].
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Plan {
        self.plan(retry_after, None, Duration::ZERO)
    }

    /// Like [`Self::next_delay`], against a deadline: `remaining` is the time left before
    /// the call's deadline (`None`: no deadline), `attempt_timeout` the longest one attempt
    /// may take. Answers [`Plan::Wait`] only if `wait + attempt_timeout <= remaining`.
    pub fn plan(
        &mut self,
        retry_after: Option<Duration>,
        remaining: Option<Duration>,
        attempt_timeout: Duration,
    ) -> Plan {
        if self.attempts >= self.params.max_attempts {
            return Plan::GiveUp(GiveUp::Attempts);
        }
        if let Some(ra) = retry_after {
            if ra > self.params.retry_after_cap {
                return Plan::GiveUp(GiveUp::RetryAfterTooLong { retry_after: ra });
            }
        }
        let wait = self.jittered().max(retry_after.unwrap_or(Duration::ZERO));
        if let Some(left) = remaining {
            if wait.saturating_add(attempt_timeout) > left {
                return Plan::GiveUp(GiveUp::Deadline { wait });
            }
        }
        self.attempts += 1;
        Plan::Wait(wait)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        match self.next_delay(None) {
            Plan::Wait(d) => Some(d),
            Plan::GiveUp(_) => None,
        }
    }
}

/// Whether an attempt of `attempt_timeout` started now ends before the deadline
/// (`remaining`: time left; `None`: no deadline). For the first attempt at a target, which
/// [`Backoff::plan`] does not cover.
pub fn fits(remaining: Option<Duration>, attempt_timeout: Duration) -> bool {
    remaining.is_none_or(|left| attempt_timeout <= left)
}

/// The jittered delay before retry `n` (`prev`: the previous delay, which decorrelated
/// jitter grows from; `base` before the first).
pub(crate) fn jitter(p: &BackoffParams, n: u32, prev: Duration, rng: &mut impl Rng) -> Duration {
    let step = p.step(n);
    match p.jitter {
        Jitter::None => step,
        Jitter::Full => between(rng, Duration::ZERO, step),
        Jitter::Proportional => {
            let lo = step.mul_f64(0.75);
            let hi = step.mul_f64(1.25);
            // [0.75, 1.25) × step: the upper end open (a nanosecond short).
            between(rng, lo, hi.saturating_sub(Duration::from_nanos(1)).max(lo)).min(p.cap)
        }
        Jitter::Decorrelated => {
            let hi = prev.saturating_mul(3).max(p.base);
            between(rng, p.base, hi).min(p.cap)
        }
    }
}

/// A uniform duration in `[lo, hi]` (nanosecond resolution; `lo` when `hi <= lo`).
fn between(rng: &mut impl Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let lo_ns = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_ns = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(lo_ns..=hi_ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(base_ms: u64, cap_ms: u64, attempts: u32, jitter: Jitter) -> BackoffParams {
        BackoffParams {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
            max_attempts: attempts,
            jitter,
            retry_after_cap: Duration::from_secs(60),
        }
    }

    fn any_jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::Full),
            Just(Jitter::Proportional),
            Just(Jitter::Decorrelated),
            Just(Jitter::None),
        ]
    }

    #[test]
    fn no_jitter_doubles_up_to_the_cap_and_stops_after_max_attempts() {
        let b = Backoff::seeded(params(100, 700, 6, Jitter::None), 1);
        let d: Vec<u64> = b.map(|d| d.as_millis() as u64).collect();
        assert_eq!(d, vec![100, 200, 400, 700, 700]);
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let mut b = Backoff::seeded(params(100, 700, 1, Jitter::Full), 1);
        assert_eq!(b.next_delay(None), Plan::GiveUp(GiveUp::Attempts));
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        for j in [Jitter::Full, Jitter::Proportional, Jitter::Decorrelated] {
            let a: Vec<_> = Backoff::seeded(params(10, 5000, 9, j), 42).collect();
            let b: Vec<_> = Backoff::seeded(params(10, 5000, 9, j), 42).collect();
            let c: Vec<_> = Backoff::seeded(params(10, 5000, 9, j), 43).collect();
            assert_eq!(a, b, "{j:?}");
            assert_ne!(a, c, "{j:?}: another seed, other delays");
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_a_longer_one_than_the_cap_gives_up() {
        let mut b = Backoff::seeded(params(100, 700, 5, Jitter::Full), 3);
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(5))),
            Plan::Wait(Duration::from_secs(5)),
            "the hint is longer than any jittered delay: waited in full"
        );
        let mut b = Backoff::seeded(params(100, 700, 5, Jitter::Full), 3);
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(61))),
            Plan::GiveUp(GiveUp::RetryAfterTooLong {
                retry_after: Duration::from_secs(61)
            })
        );
        assert_eq!(b.attempts(), 1, "giving up makes no attempt");
    }

    #[test]
    fn an_attempt_that_cannot_finish_before_the_deadline_is_not_planned() {
        let mut b = Backoff::seeded(params(100, 700, 5, Jitter::None), 3);
        let t = Duration::from_millis(500);
        assert_eq!(
            b.plan(None, Some(Duration::from_millis(600)), t),
            Plan::Wait(Duration::from_millis(100)),
            "100 ms + 500 ms fits in 600 ms exactly"
        );
        assert_eq!(
            b.plan(None, Some(Duration::from_millis(699)), t),
            Plan::GiveUp(GiveUp::Deadline {
                wait: Duration::from_millis(200)
            })
        );
        assert!(fits(Some(t), t));
        assert!(!fits(Some(t - Duration::from_millis(1)), t));
        assert!(fits(None, t));
    }

    proptest! {
        #[test]
        fn delays_stay_in_bounds_for_every_kind(
            base in 1u64..2_000,
            extra in 0u64..60_000,
            attempts in 1u32..40,
            jitter in any_jitter(),
            seed in any::<u64>(),
        ) {
            let p = params(base, base + extra, attempts, jitter);
            let delays: Vec<Duration> = Backoff::seeded(p, seed).collect();
            prop_assert_eq!(delays.len() as u32, attempts - 1);
            for (n, d) in delays.iter().enumerate() {
                let step = p.step(n as u32);
                prop_assert!(*d <= p.cap, "{:?} above the cap", d);
                match jitter {
                    Jitter::Full => prop_assert!(*d <= step),
                    Jitter::None => prop_assert_eq!(*d, step),
                    Jitter::Proportional => {
                        prop_assert!(*d >= step.mul_f64(0.75));
                        prop_assert!(*d < step.mul_f64(1.25));
                    }
                    Jitter::Decorrelated => prop_assert!(*d >= p.base.min(p.cap)),
                }
            }
        }

        #[test]
        fn the_deadline_is_never_crossed(
            base in 1u64..2_000,
            extra in 0u64..20_000,
            jitter in any_jitter(),
            seed in any::<u64>(),
            deadline_ms in 0u64..60_000,
            timeout_ms in 0u64..10_000,
            hints in proptest::collection::vec(proptest::option::of(0u64..90_000), 1..12),
        ) {
            let p = params(base, base + extra, 12, jitter);
            let mut b = Backoff::seeded(p, seed);
            let timeout = Duration::from_millis(timeout_ms);
            let deadline = Duration::from_millis(deadline_ms);
            // The first attempt runs from 0 (if it fits) and takes its whole timeout.
            prop_assume!(fits(Some(deadline), timeout));
            let mut now = timeout;
            for hint in hints {
                let hint = hint.map(Duration::from_millis);
                match b.plan(hint, Some(deadline.saturating_sub(now)), timeout) {
                    Plan::Wait(d) => {
                        if let Some(h) = hint {
                            prop_assert!(d >= h, "retry-after honoured");
                        }
                        prop_assert!(d <= p.cap.max(p.retry_after_cap));
                        now += d + timeout;
                        prop_assert!(now <= deadline, "attempt ends at {:?} past {:?}", now, deadline);
                    }
                    Plan::GiveUp(GiveUp::RetryAfterTooLong { retry_after }) => {
                        prop_assert!(retry_after > p.retry_after_cap);
                    }
                    Plan::GiveUp(_) => break,
                }
            }
        }
    }
}
