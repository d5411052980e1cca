//! The breaker state machine over plain data. No I/O, no clock: `now_ms` is an argument.
//!
//! `lua/admit.lua` and `lua/settle.lua` implement exactly these rules; keep them in step.

use std::collections::BTreeMap;

use super::window::{Totals, Window};
use super::{BreakerParams, CallOutcome, CircuitState, Force, Transition, TransitionReason};

/// Everything one target's breaker remembers.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerState {
    /// Current state.
    pub state: CircuitState,
    /// Generation: incremented by every transition.
    pub generation: u64,
    /// While open: the instant (ms) the open duration ends.
    pub open_until: u64,
    /// Consecutive opens without a close in between (drives the growing open duration).
    pub opens: u32,
    /// Consecutive failures while closed.
    pub consecutive_failures: u32,
    /// Successful probes in the current half-open period.
    pub half_open_successes: u32,
    /// Fleet-wide "not before" instant (ms) set from an upstream `retry-after`; 0 if none.
    pub not_before: u64,
    /// Failure window while closed.
    pub window: Window,
    /// Probes in flight while half-open: probe id -> lease expiry (ms).
    pub probes: BTreeMap<String, u64>,
}

impl Default for BreakerState {
    fn default() -> Self {
        BreakerState {
            state: CircuitState::Closed,
            generation: 0,
            open_until: 0,
            opens: 0,
            consecutive_failures: 0,
            half_open_successes: 0,
            not_before: 0,
            window: Window::default(),
            probes: BTreeMap::new(),
        }
    }
}

/// What the breaker says about a new call, before any other check commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through with no bookkeeping (closed, forced closed, disabled).
    Allow,
    /// Let it through as a half-open probe, if the rest of admission agrees
    /// ([`BreakerState::take_probe`] commits the slot).
    Probe,
    /// Refuse: the state that refused and ms until it may change (`None`: not on its own).
    Reject {
        /// The refusing state.
        state: CircuitState,
        /// Milliseconds until a retry could succeed.
        retry_after_ms: Option<u64>,
    },
    /// Refuse: an upstream `retry-after` is in force for this many more ms.
    NotBefore {
        /// Milliseconds left.
        retry_after_ms: u64,
    },
}

/// A read-only view of one breaker, for status pages and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSnapshot {
    /// Current state (after any open -> half-open change that is due).
    pub state: CircuitState,
    /// Current generation.
    pub generation: u64,
    /// While open: when the open duration ends (ms since epoch).
    pub open_until_ms: Option<u64>,
    /// The "not before" instant if it is still in the future.
    pub not_before_ms: Option<u64>,
    /// Consecutive opens without a close.
    pub opens: u32,
    /// Consecutive failures while closed.
    pub consecutive_failures: u32,
    /// Window totals now.
    pub window: Totals,
    /// Probes in flight (unexpired).
    pub probes_in_flight: u32,
    /// Successful probes this half-open period.
    pub half_open_successes: u32,
}

impl BreakerState {
    fn transition(
        &mut self,
        target: &str,
        to: CircuitState,
        reason: TransitionReason,
        now_ms: u64,
    ) -> Transition {
        let from = self.state;
        self.state = to;
        self.generation += 1;
        Transition {
            target: target.to_owned(),
            from,
            to,
            generation: self.generation,
            reason,
            at_ms: now_ms,
        }
    }

    fn open(
        &mut self,
        p: &BreakerParams,
        target: &str,
        reason: TransitionReason,
        now_ms: u64,
    ) -> Transition {
        self.opens = self.opens.saturating_add(1);
        self.open_until = now_ms + p.open_duration_ms(self.opens);
        self.half_open_successes = 0;
        self.consecutive_failures = 0;
        self.probes.clear();
        self.window.clear();
        self.transition(target, CircuitState::Open, reason, now_ms)
    }

    fn close(&mut self, target: &str, reason: TransitionReason, now_ms: u64) -> Transition {
        self.opens = 0;
        self.open_until = 0;
        self.half_open_successes = 0;
        self.consecutive_failures = 0;
        self.probes.clear();
        self.window.clear();
        self.transition(target, CircuitState::Closed, reason, now_ms)
    }

    fn reclaim_probes(&mut self, now_ms: u64) {
        self.probes.retain(|_, expiry| *expiry > now_ms);
    }

    /// Judges a new call at `now_ms`. May move open -> half-open (returned as a transition),
    /// which stands even if the call is then refused by something else.
    pub fn evaluate(
        &mut self,
        p: &BreakerParams,
        target: &str,
        now_ms: u64,
    ) -> (Verdict, Option<Transition>) {
        match self.state {
            CircuitState::Disabled => return (Verdict::Allow, None),
            CircuitState::ForcedOpen => {
                return (
                    Verdict::Reject {
                        state: CircuitState::ForcedOpen,
                        retry_after_ms: None,
                    },
                    None,
                )
            }
            _ => {}
        }
        if self.not_before > now_ms {
            return (
                Verdict::NotBefore {
                    retry_after_ms: self.not_before - now_ms,
                },
                None,
            );
        }
        let mut transition = None;
        if self.state == CircuitState::Open {
            if now_ms < self.open_until {
                return (
                    Verdict::Reject {
                        state: CircuitState::Open,
                        retry_after_ms: Some(self.open_until - now_ms),
                    },
                    None,
                );
            }
            self.probes.clear();
            self.half_open_successes = 0;
            transition = Some(self.transition(
                target,
                CircuitState::HalfOpen,
                TransitionReason::OpenElapsed,
                now_ms,
            ));
        }
        let verdict = match self.state {
            CircuitState::HalfOpen => {
                self.reclaim_probes(now_ms);
                if (self.probes.len() as u64) < u64::from(p.half_open_probes) {
                    Verdict::Probe
                } else {
                    let earliest = self.probes.values().copied().min().unwrap_or(now_ms + 1);
                    Verdict::Reject {
                        state: CircuitState::HalfOpen,
                        retry_after_ms: Some(earliest.saturating_sub(now_ms).max(1)),
                    }
                }
            }
            _ => Verdict::Allow,
        };
        (verdict, transition)
    }

    /// Commits a probe slot decided by [`Self::evaluate`].
    pub fn take_probe(&mut self, p: &BreakerParams, probe_id: &str, now_ms: u64) {
        self.probes
            .insert(probe_id.to_owned(), now_ms + p.probe_timeout_ms);
    }

    /// Records the outcome of a call admitted under `generation` (as a probe when `probe_id`
    /// is given). Outcomes of an older generation change nothing but free their probe slot.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        p: &BreakerParams,
        target: &str,
        now_ms: u64,
        generation: u64,
        outcome: CallOutcome,
        elapsed_ms: u64,
        probe_id: Option<&str>,
    ) -> Option<Transition> {
        if let Some(id) = probe_id {
            self.probes.remove(id);
        }
        if generation != self.generation || outcome == CallOutcome::Ignored {
            return None;
        }
        let slow = p.slow_call_ms > 0 && elapsed_ms >= p.slow_call_ms;
        let failure = outcome == CallOutcome::Failure;
        match self.state {
            CircuitState::HalfOpen => {
                // Calls admitted under a half-open generation are all probes.
                probe_id?;
                if failure || (slow && p.slow_call_rate_pct > 0.0) {
                    Some(self.open(p, target, TransitionReason::ProbeFailed, now_ms))
                } else {
                    self.half_open_successes += 1;
                    if self.half_open_successes >= p.half_open_successes {
                        Some(self.close(target, TransitionReason::ProbesSucceeded, now_ms))
                    } else {
                        None
                    }
                }
            }
            CircuitState::Closed => {
                self.window
                    .add(now_ms, p.bucket_ms, p.buckets, failure, slow);
                self.consecutive_failures = if failure {
                    self.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                // Only a call that counts against the target (a failure, or a slow call
                // under the slow-call rule) can trip it: a success that is not slow never
                // opens a closed breaker. This is what lets a replica defer such successes
                // (the settle queue) without changing any admission decision.
                let counts = failure || (slow && p.slow_call_rate_pct > 0.0);
                if !counts {
                    return None;
                }
                self.trip_reason(p, now_ms)
                    .map(|reason| self.open(p, target, reason, now_ms))
            }
            _ => None,
        }
    }

    fn trip_reason(&self, p: &BreakerParams, now_ms: u64) -> Option<TransitionReason> {
        if p.consecutive_failures > 0 && self.consecutive_failures >= p.consecutive_failures {
            return Some(TransitionReason::ConsecutiveFailures);
        }
        let t = self.window.totals(now_ms, p.bucket_ms, p.buckets);
        if t.calls == 0 || t.calls < u64::from(p.minimum_calls) {
            return None;
        }
        let calls = t.calls as f64;
        if p.failure_rate_pct > 0.0 && (t.failures as f64) * 100.0 >= p.failure_rate_pct * calls {
            return Some(TransitionReason::FailureRate);
        }
        if p.slow_call_rate_pct > 0.0 && (t.slow as f64) * 100.0 >= p.slow_call_rate_pct * calls {
            return Some(TransitionReason::SlowCallRate);
        }
        None
    }

    /// Sets the "not before" instant to `now_ms + retry_after_ms` unless a later one is set.
    pub fn set_not_before(&mut self, now_ms: u64, retry_after_ms: u64) {
        self.not_before = self.not_before.max(now_ms + retry_after_ms);
    }

    /// Applies an operator command. Returns the transition (`None` if already in that state;
    /// a reset of a closed breaker still empties its window and counters).
    pub fn force(&mut self, target: &str, cmd: Force, now_ms: u64) -> Option<Transition> {
        let to = cmd.target_state();
        if matches!(cmd, Force::Reset | Force::Closed) {
            // An operator who closes a target means "send calls to it": an upstream's
            // "not before" (however long it asked for) no longer holds.
            self.not_before = 0;
        }
        if self.state == to {
            if cmd == Force::Reset {
                // No transition, but a reset always starts from an empty window.
                self.opens = 0;
                self.open_until = 0;
                self.half_open_successes = 0;
                self.consecutive_failures = 0;
                self.probes.clear();
                self.window.clear();
            }
            return None;
        }
        if cmd == Force::Reset {
            return Some(self.close(target, TransitionReason::Operator, now_ms));
        }
        self.probes.clear();
        self.half_open_successes = 0;
        self.consecutive_failures = 0;
        self.window.clear();
        self.open_until = 0;
        Some(self.transition(target, to, TransitionReason::Operator, now_ms))
    }

    /// A read-only view at `now_ms` (an open breaker whose time is up shows as half-open,
    /// as the next call would find it).
    pub fn snapshot(&self, p: &BreakerParams, now_ms: u64) -> BreakerSnapshot {
        let (state, open_until_ms) = match self.state {
            CircuitState::Open if now_ms >= self.open_until => (CircuitState::HalfOpen, None),
            CircuitState::Open => (CircuitState::Open, Some(self.open_until)),
            s => (s, None),
        };
        let probes = if state == CircuitState::HalfOpen && self.state == CircuitState::HalfOpen {
            self.probes.values().filter(|e| **e > now_ms).count() as u32
        } else {
            0
        };
        BreakerSnapshot {
            state,
            generation: self.generation,
            open_until_ms,
            not_before_ms: (self.not_before > now_ms).then_some(self.not_before),
            opens: self.opens,
            consecutive_failures: self.consecutive_failures,
            window: self.window.totals(now_ms, p.bucket_ms, p.buckets),
            probes_in_flight: probes,
            half_open_successes: self.half_open_successes,
        }
    }
}
