//! The breaker state machine as stories, on a fake clock, never sleeping.
//!
//! Every story is written once against the small [`Driver`] trait and runs twice:
//! `on_plain_data::*` drives [`BreakerState`] directly (evaluate / take_probe / record / force),
//! `through_memory_store::*` drives a [`MemoryStore`] on a [`ManualClock`] through the [`Store`]
//! trait. A story that passes on one and fails on the other is a divergence between the model
//! and the store that wraps it.

use std::sync::Arc;
use std::time::Duration;

use fusebox::breaker::window::{Totals, Window};
use fusebox::breaker::{BreakerParams, BreakerSnapshot, BreakerState, Verdict};
use fusebox::clock::ManualClock;
use fusebox::keys::{feature_keys, target_keys};
use fusebox::ratelimit::RateParams;
use fusebox::store::{
    Admission, AdmitRequest, FeatureSpec, MemoryStore, Settle, Store, TargetSpec,
};
use fusebox::{CallOutcome, CircuitState, Force, Rejection, Transition, TransitionReason};

/// The fake clock's starting instant: a whole second, so bucket boundaries are round numbers.
const T0: u64 = 1_700_000_000_000;
const TARGET: &str = "claude-sonnet";

/// Three consecutive failures trip; rates off; 10 s open; one probe closes.
fn params() -> BreakerParams {
    BreakerParams {
        consecutive_failures: 3,
        failure_rate_pct: 0.0,
        minimum_calls: 1,
        bucket_ms: 1_000,
        buckets: 10,
        slow_call_ms: 0,
        slow_call_rate_pct: 0.0,
        open_ms: 10_000,
        open_multiplier: 1.0,
        max_open_ms: 10_000,
        half_open_probes: 1,
        half_open_successes: 1,
        probe_timeout_ms: 5_000,
        idle_ttl_ms: 86_400_000,
    }
}

// ---------------------------------------------------------------------------------------------
// The two ways of driving a breaker.
// ---------------------------------------------------------------------------------------------

/// An admitted call, as the caller holds it until it settles.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    id: String,
    generation: u64,
    probe: bool,
}

/// Why a call was refused, in the units both drivers share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Circuit {
        state: CircuitState,
        retry_after_ms: Option<u64>,
    },
    NotBefore {
        retry_after_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Admit {
    Let(Call),
    Refused(Refusal),
}

/// One target's breaker on a fake clock. Every transition any operation reports is appended
/// to [`Driver::transitions`].
trait Driver {
    fn new(p: BreakerParams) -> Self;
    fn advance(&mut self, ms: u64);
    fn now(&self) -> u64;
    fn transitions(&self) -> &[Transition];
    async fn admit(&mut self) -> Admit;
    async fn settle(
        &mut self,
        call: &Call,
        outcome: CallOutcome,
        elapsed_ms: u64,
    ) -> Option<Transition>;
    async fn set_not_before(&mut self, retry_after_ms: u64);
    async fn force(&mut self, cmd: Force) -> Option<Transition>;
    async fn snapshot(&mut self) -> BreakerSnapshot;
}

/// [`BreakerState`] driven directly, the way the in-memory store and the Lua scripts use it.
struct Plain {
    state: BreakerState,
    p: BreakerParams,
    now: u64,
    next_id: u64,
    log: Vec<Transition>,
}

impl Driver for Plain {
    fn new(p: BreakerParams) -> Self {
        Plain {
            state: BreakerState::default(),
            p,
            now: T0,
            next_id: 0,
            log: Vec::new(),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    fn now(&self) -> u64 {
        self.now
    }

    fn transitions(&self) -> &[Transition] {
        &self.log
    }

    async fn admit(&mut self) -> Admit {
        self.next_id += 1;
        let id = format!("call-{}", self.next_id);
        let (verdict, transition) = self.state.evaluate(&self.p, TARGET, self.now);
        self.log.extend(transition);
        match verdict {
            Verdict::Allow => Admit::Let(Call {
                id,
                generation: self.state.generation,
                probe: false,
            }),
            Verdict::Probe => {
                self.state.take_probe(&self.p, &id, self.now);
                Admit::Let(Call {
                    id,
                    generation: self.state.generation,
                    probe: true,
                })
            }
            Verdict::Reject {
                state,
                retry_after_ms,
            } => Admit::Refused(Refusal::Circuit {
                state,
                retry_after_ms,
            }),
            Verdict::NotBefore { retry_after_ms } => {
                Admit::Refused(Refusal::NotBefore { retry_after_ms })
            }
        }
    }

    async fn settle(
        &mut self,
        call: &Call,
        outcome: CallOutcome,
        elapsed_ms: u64,
    ) -> Option<Transition> {
        let t = self.state.record(
            &self.p,
            TARGET,
            self.now,
            call.generation,
            outcome,
            elapsed_ms,
            call.probe.then_some(call.id.as_str()),
        );
        self.log.extend(t.clone());
        t
    }

    async fn set_not_before(&mut self, retry_after_ms: u64) {
        self.state.set_not_before(self.now, retry_after_ms);
    }

    async fn force(&mut self, cmd: Force) -> Option<Transition> {
        let t = self.state.force(TARGET, cmd, self.now);
        self.log.extend(t.clone());
        t
    }

    async fn snapshot(&mut self) -> BreakerSnapshot {
        self.state.snapshot(&self.p, self.now)
    }
}

/// A [`MemoryStore`] on a [`ManualClock`], through the [`Store`] trait, with a feature that
/// has no bulkhead and no rate limit (so only the breaker decides).
struct ThroughStore {
    store: MemoryStore,
    clock: ManualClock,
    target: Arc<TargetSpec>,
    feature: Arc<FeatureSpec>,
    next_id: u64,
    log: Vec<Transition>,
}

fn target_spec(params: BreakerParams) -> TargetSpec {
    TargetSpec {
        name: TARGET.to_owned(),
        keys: target_keys("stories", TARGET),
        params,
    }
}

fn feature_spec(name: &str, rate: Option<RateParams>) -> FeatureSpec {
    FeatureSpec {
        name: name.to_owned(),
        keys: feature_keys("stories", name),
        bulkhead: None,
        rate,
    }
}

impl ThroughStore {
    fn settle_item(&self, call: &Call, outcome: CallOutcome, elapsed_ms: u64) -> Settle {
        Settle {
            target: self.target.clone(),
            feature: self.feature.clone(),
            call_id: call.id.clone(),
            generation: call.generation,
            probe: call.probe,
            permit: false,
            refund_rate: false,
            outcome,
            elapsed_ms,
        }
    }
}

impl Driver for ThroughStore {
    fn new(p: BreakerParams) -> Self {
        let clock = ManualClock::new(T0);
        ThroughStore {
            store: MemoryStore::new(Arc::new(clock.clone())),
            clock,
            target: Arc::new(target_spec(p)),
            feature: Arc::new(feature_spec("chat", None)),
            next_id: 0,
            log: Vec::new(),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    fn now(&self) -> u64 {
        use fusebox::clock::Clock;
        self.clock.now_ms()
    }

    fn transitions(&self) -> &[Transition] {
        &self.log
    }

    async fn admit(&mut self) -> Admit {
        self.next_id += 1;
        let id = format!("call-{}", self.next_id);
        let admission = self
            .store
            .admit(AdmitRequest {
                target: &self.target,
                feature: &self.feature,
                call_id: &id,
            })
            .await
            .expect("the memory store does not fail");
        match admission {
            Admission::Admitted(a) => {
                self.log.extend(a.transition);
                assert!(!a.permit, "the feature has no bulkhead, so no permit");
                Admit::Let(Call {
                    id,
                    generation: a.generation,
                    probe: a.probe,
                })
            }
            Admission::Rejected {
                rejection,
                transition,
            } => {
                self.log.extend(transition);
                Admit::Refused(match rejection {
                    Rejection::CircuitOpen {
                        target,
                        state,
                        retry_after,
                    } => {
                        assert_eq!(target, TARGET);
                        Refusal::Circuit {
                            state,
                            retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
                        }
                    }
                    Rejection::NotBefore {
                        target,
                        retry_after,
                    } => {
                        assert_eq!(target, TARGET);
                        Refusal::NotBefore {
                            retry_after_ms: retry_after.as_millis() as u64,
                        }
                    }
                    other => panic!("only the breaker can refuse here, got {other:?}"),
                })
            }
        }
    }

    async fn settle(
        &mut self,
        call: &Call,
        outcome: CallOutcome,
        elapsed_ms: u64,
    ) -> Option<Transition> {
        let item = self.settle_item(call, outcome, elapsed_ms);
        let mut ts = self
            .store
            .settle(&[item])
            .await
            .expect("the memory store does not fail");
        assert!(
            ts.len() <= 1,
            "one outcome makes at most one transition: {ts:?}"
        );
        self.log.extend(ts.clone());
        ts.pop()
    }

    async fn set_not_before(&mut self, retry_after_ms: u64) {
        self.store
            .set_not_before(&self.target, retry_after_ms)
            .await
            .expect("the memory store does not fail");
    }

    async fn force(&mut self, cmd: Force) -> Option<Transition> {
        let t = self
            .store
            .force(&self.target, cmd)
            .await
            .expect("the memory store does not fail");
        self.log.extend(t.clone());
        t
    }

    async fn snapshot(&mut self) -> BreakerSnapshot {
        self.store
            .snapshot(&self.target)
            .await
            .expect("the memory store does not fail")
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers that keep the stories short.
// ---------------------------------------------------------------------------------------------

async fn let_in<B: Driver>(b: &mut B) -> Call {
    match b.admit().await {
        Admit::Let(call) => call,
        Admit::Refused(r) => panic!(
            "expected a call to be let in at T0+{}ms, it was refused: {r:?}",
            b.now() - T0
        ),
    }
}

async fn refused<B: Driver>(b: &mut B) -> Refusal {
    match b.admit().await {
        Admit::Refused(r) => r,
        Admit::Let(call) => panic!(
            "expected a refusal at T0+{}ms, the call was let in: {call:?}",
            b.now() - T0
        ),
    }
}

/// Admits one call and settles it at once with `outcome` (fast: 1 ms).
async fn run<B: Driver>(b: &mut B, outcome: CallOutcome) -> Option<Transition> {
    let call = let_in(b).await;
    b.settle(&call, outcome, 1).await
}

async fn fail<B: Driver>(b: &mut B) -> Option<Transition> {
    run(b, CallOutcome::Failure).await
}

async fn succeed<B: Driver>(b: &mut B) -> Option<Transition> {
    run(b, CallOutcome::Success).await
}

/// Asserts that `t` is the transition `from -> to` for `reason`, made now, and returns it.
fn expect_transition<B: Driver>(
    b: &B,
    t: Option<Transition>,
    from: CircuitState,
    to: CircuitState,
    reason: TransitionReason,
) -> Transition {
    let t = t.unwrap_or_else(|| {
        panic!(
            "expected {from} -> {to} ({reason:?}) at T0+{}ms, got no transition",
            b.now() - T0
        )
    });
    assert_eq!(
        (t.from, t.to, t.reason),
        (from, to, reason),
        "unexpected transition {t:?}"
    );
    assert_eq!(t.target, TARGET);
    assert_eq!(
        t.at_ms,
        b.now(),
        "a transition is stamped with the store's now"
    );
    t
}

fn open_for(ms: u64) -> Refusal {
    Refusal::Circuit {
        state: CircuitState::Open,
        retry_after_ms: Some(ms),
    }
}

/// Trips a breaker built with [`tripping`] params: its first failure opens it.
async fn trip<B: Driver>(b: &mut B) -> Transition {
    assert_eq!(
        b.snapshot().await.state,
        CircuitState::Closed,
        "trip() starts from closed"
    );
    let t = fail(b).await;
    expect_transition(
        b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::ConsecutiveFailures,
    )
}

/// Params that trip on the first failure, as `trip` expects.
fn tripping() -> BreakerParams {
    BreakerParams {
        consecutive_failures: 1,
        ..params()
    }
}

// ---------------------------------------------------------------------------------------------
// The stories.
// ---------------------------------------------------------------------------------------------

/// Closed -> open after N consecutive failures; a success in between starts the count over.
async fn closed_opens_after_n_consecutive_failures<B: Driver>() {
    let mut b = B::new(params()); // 3 in a row
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(b.snapshot().await.consecutive_failures, 2);
    assert_eq!(succeed(&mut b).await, None, "a success breaks the streak");
    assert_eq!(b.snapshot().await.consecutive_failures, 0);
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(fail(&mut b).await, None);
    let t = fail(&mut b).await;
    let t = expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::ConsecutiveFailures,
    );
    assert_eq!(t.generation, 1);
    assert_eq!(refused(&mut b).await, open_for(10_000));
    let s = b.snapshot().await;
    assert_eq!(s.state, CircuitState::Open);
    assert_eq!(s.open_until_ms, Some(T0 + 10_000));
    assert_eq!(s.opens, 1);
}

/// Closed -> open on the failure rate over the window, once the window holds minimum_calls.
async fn failure_rate_over_the_window_trips_once_minimum_calls_are_in<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 0,
        failure_rate_pct: 50.0,
        minimum_calls: 4,
        ..params()
    });
    // 2 failures out of 3 is 66%, but 3 calls are not enough to judge.
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(succeed(&mut b).await, None);
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(
        b.snapshot().await.window,
        Totals {
            calls: 3,
            failures: 2,
            slow: 0
        }
    );
    // A 4th call that succeeds brings the window to 2/4 = 50%, at the threshold, but the
    // rates are judged only when a failure (or a slow call) is recorded: a success never
    // opens a breaker (the settle queue relies on it, see README "How it works").
    assert_eq!(succeed(&mut b).await, None);
    // The next failure makes 3/5 = 60%: over the threshold with enough calls, it trips.
    let t = fail(&mut b).await;
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::FailureRate,
    );
}

/// Below minimum_calls even a 100% failure rate does not trip.
async fn below_minimum_calls_not_even_all_failures_trip<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 0,
        failure_rate_pct: 50.0,
        minimum_calls: 5,
        ..params()
    });
    for _ in 0..4 {
        assert_eq!(fail(&mut b).await, None);
    }
    let s = b.snapshot().await;
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(s.window.failures, 4);
    let t = fail(&mut b).await;
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::FailureRate,
    );
}

/// A failure rate under the threshold never trips, however many calls.
async fn failure_rate_under_the_threshold_never_trips<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 0,
        failure_rate_pct: 50.0,
        minimum_calls: 4,
        ..params()
    });
    for _ in 0..20 {
        // 2 failures in every 5 calls: never more than 40% at any point.
        for _ in 0..3 {
            assert_eq!(succeed(&mut b).await, None);
        }
        assert_eq!(fail(&mut b).await, None);
        assert_eq!(fail(&mut b).await, None);
    }
    assert_eq!(b.snapshot().await.window.calls, 100);
    assert!(b.transitions().is_empty());
}

/// Failures in a bucket that is still inside the window count toward the rate.
async fn failures_inside_the_window_still_count<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 0,
        failure_rate_pct: 50.0,
        minimum_calls: 4,
        bucket_ms: 1_000,
        buckets: 5,
        ..params()
    });
    for _ in 0..3 {
        assert_eq!(fail(&mut b).await, None);
    }
    b.advance(4_999); // still the 5th bucket of a 5-bucket window that began at T0
    assert_eq!(b.snapshot().await.window.failures, 3);
    assert_eq!(succeed(&mut b).await, None, "a success never opens"); // 3/4 failures
    let t = fail(&mut b).await; // 4/5, still inside the window
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::FailureRate,
    );
}

/// Old buckets slide out of the window: failures from before the window stop counting.
async fn old_buckets_slide_out_of_the_window<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 0,
        failure_rate_pct: 50.0,
        minimum_calls: 4,
        bucket_ms: 1_000,
        buckets: 5,
        ..params()
    });
    for _ in 0..3 {
        assert_eq!(fail(&mut b).await, None);
    }
    b.advance(5_000); // T0's bucket is now one bucket older than the window
    assert_eq!(b.snapshot().await.window, Totals::default());
    assert_eq!(
        succeed(&mut b).await,
        None,
        "1 call, 0 failures in the window"
    );
    assert_eq!(
        b.snapshot().await.window,
        Totals {
            calls: 1,
            failures: 0,
            slow: 0
        }
    );
    // And the window keeps sliding bucket by bucket.
    assert_eq!(fail(&mut b).await, None);
    b.advance(1_000);
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(b.snapshot().await.window.calls, 3);
    b.advance(4_000); // the bucket of T0+5s leaves, T0+6s stays
    assert_eq!(
        b.snapshot().await.window,
        Totals {
            calls: 1,
            failures: 1,
            slow: 0
        }
    );
    assert!(b.transitions().is_empty());
}

/// Slow calls (elapsed >= slow_call_ms) count toward the slow-call rate, even when they succeed.
async fn slow_calls_count_toward_the_slow_call_rate<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 0,
        failure_rate_pct: 0.0,
        minimum_calls: 4,
        slow_call_ms: 1_000,
        slow_call_rate_pct: 50.0,
        ..params()
    });
    for elapsed in [1_500, 999, 10] {
        let call = let_in(&mut b).await;
        assert_eq!(b.settle(&call, CallOutcome::Success, elapsed).await, None);
    }
    assert_eq!(b.snapshot().await.window.slow, 1, "999 ms is not slow");
    // Exactly the slow threshold is slow: 2 slow of 4 = 50%.
    let call = let_in(&mut b).await;
    let t = b.settle(&call, CallOutcome::Success, 1_000).await;
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::SlowCallRate,
    );
}

/// Open -> half-open once open_duration is over; exactly N probes get in, the N+1th is refused
/// with a retry_after that points at the earliest probe lease.
async fn open_turns_half_open_after_open_duration_and_admits_exactly_n_probes<B: Driver>() {
    let mut b = B::new(BreakerParams {
        half_open_probes: 2,
        half_open_successes: 2,
        ..tripping()
    });
    let opened = trip(&mut b).await;
    b.advance(9_999);
    assert_eq!(refused(&mut b).await, open_for(1));
    b.advance(1);
    let first = let_in(&mut b).await;
    let t = b.transitions().last().cloned();
    let half_open = expect_transition(
        &b,
        t,
        CircuitState::Open,
        CircuitState::HalfOpen,
        TransitionReason::OpenElapsed,
    );
    assert_eq!(half_open.generation, opened.generation + 1);
    assert!(first.probe, "a call let in while half-open is a probe");
    assert_eq!(first.generation, half_open.generation);
    b.advance(1_000);
    let second = let_in(&mut b).await;
    assert!(second.probe);
    assert_eq!(
        refused(&mut b).await,
        Refusal::Circuit {
            state: CircuitState::HalfOpen,
            retry_after_ms: Some(4_000), // the first probe's 5 s lease began 1 s ago
        }
    );
    let s = b.snapshot().await;
    assert_eq!(s.state, CircuitState::HalfOpen);
    assert_eq!(s.probes_in_flight, 2);
    assert_eq!(
        b.transitions().len(),
        2,
        "closed->open, open->half-open, nothing more"
    );
}

/// A probe that never reports back frees its slot after probe_timeout.
async fn probe_that_never_reports_back_is_rearmed_after_probe_timeout<B: Driver>() {
    let mut b = B::new(tripping()); // 1 probe, 5 s probe timeout
    trip(&mut b).await;
    b.advance(10_000);
    let lost = let_in(&mut b).await;
    assert!(lost.probe);
    b.advance(4_999);
    assert_eq!(
        refused(&mut b).await,
        Refusal::Circuit {
            state: CircuitState::HalfOpen,
            retry_after_ms: Some(1),
        }
    );
    b.advance(1);
    let replacement = let_in(&mut b).await;
    assert!(replacement.probe);
    assert_eq!(
        replacement.generation, lost.generation,
        "still the same half-open period"
    );
    assert!(matches!(
        refused(&mut b).await,
        Refusal::Circuit {
            state: CircuitState::HalfOpen,
            ..
        }
    ));
    let t = b.settle(&replacement, CallOutcome::Success, 1).await;
    expect_transition(
        &b,
        t,
        CircuitState::HalfOpen,
        CircuitState::Closed,
        TransitionReason::ProbesSucceeded,
    );
}

/// M successful probes close the breaker, and closing forgets the past.
async fn m_successful_probes_close<B: Driver>() {
    let mut b = B::new(BreakerParams {
        half_open_probes: 3,
        half_open_successes: 2,
        ..tripping()
    });
    trip(&mut b).await;
    b.advance(10_000);
    let p1 = let_in(&mut b).await;
    let p2 = let_in(&mut b).await;
    assert_eq!(b.settle(&p1, CallOutcome::Success, 1).await, None);
    let s = b.snapshot().await;
    assert_eq!(
        (s.state, s.half_open_successes, s.probes_in_flight),
        (CircuitState::HalfOpen, 1, 1)
    );
    let t = b.settle(&p2, CallOutcome::Success, 1).await;
    let closed = expect_transition(
        &b,
        t,
        CircuitState::HalfOpen,
        CircuitState::Closed,
        TransitionReason::ProbesSucceeded,
    );
    let s = b.snapshot().await;
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(s.generation, closed.generation);
    assert_eq!(
        (s.opens, s.half_open_successes, s.probes_in_flight),
        (0, 0, 0)
    );
    let next = let_in(&mut b).await;
    assert!(!next.probe, "closed again: calls are no longer probes");
    assert_eq!(next.generation, closed.generation);
}

/// A failed probe re-opens, each time for open_duration * multiplier^k, capped at the max;
/// closing resets the growth.
async fn probe_failure_reopens_with_a_grown_open_duration_capped_at_max<B: Driver>() {
    let mut b = B::new(BreakerParams {
        open_ms: 1_000,
        open_multiplier: 3.0,
        max_open_ms: 5_000,
        ..tripping()
    });
    trip(&mut b).await;
    assert_eq!(refused(&mut b).await, open_for(1_000));
    for (opens, expected_ms) in [(2, 3_000), (3, 5_000), (4, 5_000)] {
        let waited = match refused(&mut b).await {
            Refusal::Circuit {
                retry_after_ms: Some(ms),
                ..
            } => ms,
            other => panic!("expected open, got {other:?}"),
        };
        b.advance(waited);
        let probe = let_in(&mut b).await;
        assert!(probe.probe);
        let t = b.settle(&probe, CallOutcome::Failure, 1).await;
        expect_transition(
            &b,
            t,
            CircuitState::HalfOpen,
            CircuitState::Open,
            TransitionReason::ProbeFailed,
        );
        assert_eq!(
            refused(&mut b).await,
            open_for(expected_ms),
            "open #{opens}"
        );
        let s = b.snapshot().await;
        assert_eq!(s.opens, opens);
        assert_eq!(s.open_until_ms, Some(b.now() + expected_ms));
    }
    b.advance(5_000);
    let probe = let_in(&mut b).await;
    let t = b.settle(&probe, CallOutcome::Success, 1).await;
    expect_transition(
        &b,
        t,
        CircuitState::HalfOpen,
        CircuitState::Closed,
        TransitionReason::ProbesSucceeded,
    );
    trip(&mut b).await;
    assert_eq!(
        refused(&mut b).await,
        open_for(1_000),
        "a close resets the growth"
    );
}

/// An outcome recorded against an older generation changes nothing.
async fn outcome_recorded_against_an_older_generation_changes_nothing<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 2,
        ..params()
    });
    let straggler = let_in(&mut b).await; // generation 0, still running
    let late_success = let_in(&mut b).await;
    assert_eq!(fail(&mut b).await, None);
    let t = fail(&mut b).await;
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::ConsecutiveFailures,
    );
    b.advance(10_000);
    let probe = let_in(&mut b).await;
    assert_eq!(probe.generation, 2);
    // The straggler's failure is old news: it does not re-open the half-open breaker...
    assert_eq!(b.settle(&straggler, CallOutcome::Failure, 1).await, None);
    // ...and an old success does not count as a probe success.
    assert_eq!(b.settle(&late_success, CallOutcome::Success, 1).await, None);
    let s = b.snapshot().await;
    assert_eq!(
        (
            s.state,
            s.generation,
            s.half_open_successes,
            s.probes_in_flight
        ),
        (CircuitState::HalfOpen, 2, 0, 1)
    );
    let t = b.settle(&probe, CallOutcome::Success, 1).await;
    expect_transition(
        &b,
        t,
        CircuitState::HalfOpen,
        CircuitState::Closed,
        TransitionReason::ProbesSucceeded,
    );
    // Closed again (generation 3): a failure from generation 2 does not count either.
    let stale_probe_retry = Call {
        probe: false,
        ..probe.clone()
    };
    assert_eq!(
        b.settle(&stale_probe_retry, CallOutcome::Failure, 1).await,
        None
    );
    let s = b.snapshot().await;
    assert_eq!((s.consecutive_failures, s.window.calls), (0, 0));
}

/// Each transition is reported exactly once, by the operation that made it, with generations
/// counting up by one.
async fn each_transition_is_reported_exactly_once<B: Driver>() {
    let mut b = B::new(tripping());
    trip(&mut b).await; // closed -> open
    assert!(matches!(refused(&mut b).await, Refusal::Circuit { .. }));
    b.advance(10_000);
    assert_eq!(
        b.snapshot().await.state,
        CircuitState::HalfOpen,
        "as the next call finds it"
    );
    assert_eq!(b.transitions().len(), 1, "a snapshot reports nothing");
    let p = let_in(&mut b).await; // open -> half-open
    assert!(
        matches!(refused(&mut b).await, Refusal::Circuit { .. }),
        "slot taken"
    );
    b.settle(&p, CallOutcome::Failure, 1).await; // half-open -> open
    b.advance(10_000);
    let p = let_in(&mut b).await; // open -> half-open
    b.settle(&p, CallOutcome::Success, 1).await; // half-open -> closed
    assert_eq!(
        b.settle(&p, CallOutcome::Success, 1).await,
        None,
        "a repeated settle"
    );
    b.force(Force::Open).await; // closed -> forced open
    assert_eq!(b.force(Force::Open).await, None, "already forced open");
    b.force(Force::Reset).await; // forced open -> closed
    let seen: Vec<_> = b
        .transitions()
        .iter()
        .map(|t| (t.from, t.to, t.reason, t.generation))
        .collect();
    use CircuitState::*;
    use TransitionReason::*;
    assert_eq!(
        seen,
        vec![
            (Closed, Open, ConsecutiveFailures, 1),
            (Open, HalfOpen, OpenElapsed, 2),
            (HalfOpen, Open, ProbeFailed, 3),
            (Open, HalfOpen, OpenElapsed, 4),
            (HalfOpen, Closed, ProbesSucceeded, 5),
            (Closed, ForcedOpen, Operator, 6),
            (ForcedOpen, Closed, Operator, 7),
        ]
    );
    assert_eq!(b.snapshot().await.generation, 7);
}

/// Forced open refuses every call, with no retry_after, for as long as it is held.
async fn forced_open_refuses_everything_until_released<B: Driver>() {
    let mut b = B::new(params());
    let t = b.force(Force::Open).await;
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::ForcedOpen,
        TransitionReason::Operator,
    );
    let forced = Refusal::Circuit {
        state: CircuitState::ForcedOpen,
        retry_after_ms: None,
    };
    assert_eq!(refused(&mut b).await, forced);
    b.advance(86_400_000);
    assert_eq!(
        refused(&mut b).await,
        forced,
        "open_duration does not apply"
    );
    assert_eq!(b.snapshot().await.state, CircuitState::ForcedOpen);
    let t = b.force(Force::Reset).await;
    expect_transition(
        &b,
        t,
        CircuitState::ForcedOpen,
        CircuitState::Closed,
        TransitionReason::Operator,
    );
    assert!(!let_in(&mut b).await.probe);
}

/// Forced closed admits every call and nothing trips it.
async fn forced_closed_admits_and_never_trips<B: Driver>() {
    let mut b = B::new(BreakerParams {
        failure_rate_pct: 10.0,
        ..tripping()
    });
    trip(&mut b).await;
    let t = b.force(Force::Closed).await;
    expect_transition(
        &b,
        t,
        CircuitState::Open,
        CircuitState::ForcedClosed,
        TransitionReason::Operator,
    );
    for _ in 0..50 {
        let call = let_in(&mut b).await;
        assert!(!call.probe);
        assert_eq!(b.settle(&call, CallOutcome::Failure, 1).await, None);
    }
    assert_eq!(b.snapshot().await.state, CircuitState::ForcedClosed);
    assert_eq!(b.transitions().len(), 2);
}

/// Disabled: calls flow even where the breaker was open, and nothing is counted.
async fn disabled_admits_and_counts_nothing<B: Driver>() {
    let mut b = B::new(tripping());
    trip(&mut b).await;
    let t = b.force(Force::Disable).await;
    expect_transition(
        &b,
        t,
        CircuitState::Open,
        CircuitState::Disabled,
        TransitionReason::Operator,
    );
    for _ in 0..10 {
        assert_eq!(fail(&mut b).await, None);
    }
    let s = b.snapshot().await;
    assert_eq!(s.state, CircuitState::Disabled);
    assert_eq!((s.consecutive_failures, s.window), (0, Totals::default()));
    assert_eq!(b.force(Force::Disable).await, None, "already disabled");
}

/// Reset from open goes back to closed with an empty window; a trip afterwards starts the open
/// duration from the beginning.
async fn reset_of_an_open_breaker_closes_it<B: Driver>() {
    let mut b = B::new(BreakerParams {
        open_multiplier: 2.0,
        max_open_ms: 60_000,
        ..tripping()
    });
    trip(&mut b).await;
    let t = b.force(Force::Reset).await;
    let reset = expect_transition(
        &b,
        t,
        CircuitState::Open,
        CircuitState::Closed,
        TransitionReason::Operator,
    );
    let call = let_in(&mut b).await;
    assert!(!call.probe);
    assert_eq!(call.generation, reset.generation);
    let s = b.snapshot().await;
    assert_eq!((s.opens, s.consecutive_failures), (0, 0));
    trip(&mut b).await;
    assert_eq!(
        refused(&mut b).await,
        open_for(10_000),
        "not 20 s: reset forgot the opens"
    );
}

/// `Force::Reset` is documented as "back to normal operation, closed with an empty window".
/// On a breaker that is already closed it must still empty the window, or the failures counted
/// before the reset trip the breaker right after it.
async fn reset_of_a_closed_breaker_empties_its_window<B: Driver>() {
    let mut b = B::new(params()); // 3 in a row
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(fail(&mut b).await, None);
    b.force(Force::Reset).await;
    let s = b.snapshot().await;
    assert_eq!(
        (s.state, s.consecutive_failures, s.window),
        (CircuitState::Closed, 0, Totals::default()),
        "reset leaves a closed breaker with an empty window"
    );
    assert_eq!(
        fail(&mut b).await,
        None,
        "one failure after a reset must not trip"
    );
}

/// not_before refuses until its instant, counts no failure, and never moves backward.
async fn not_before_refuses_until_its_instant_and_never_moves_backward<B: Driver>() {
    let mut b = B::new(tripping()); // one failure would trip
    b.set_not_before(5_000).await;
    for _ in 0..3 {
        assert_eq!(
            refused(&mut b).await,
            Refusal::NotBefore {
                retry_after_ms: 5_000
            }
        );
    }
    let s = b.snapshot().await;
    assert_eq!(s.not_before_ms, Some(T0 + 5_000));
    assert_eq!(
        (s.state, s.consecutive_failures, s.window),
        (CircuitState::Closed, 0, Totals::default()),
        "a not-before refusal is not a breaker failure"
    );
    b.advance(1_000);
    b.set_not_before(1_000).await; // earlier than the instant in force
    assert_eq!(
        refused(&mut b).await,
        Refusal::NotBefore {
            retry_after_ms: 4_000
        },
        "a shorter retry-after does not pull the instant back"
    );
    b.advance(3_999);
    assert_eq!(
        refused(&mut b).await,
        Refusal::NotBefore { retry_after_ms: 1 }
    );
    b.advance(1);
    assert_eq!(b.snapshot().await.not_before_ms, None);
    assert_eq!(succeed(&mut b).await, None);
    b.set_not_before(2_000).await;
    b.set_not_before(7_000).await; // a later one extends it
    assert_eq!(
        refused(&mut b).await,
        Refusal::NotBefore {
            retry_after_ms: 7_000
        }
    );
    assert!(b.transitions().is_empty());
}

/// An Ignored outcome frees its probe slot but counts toward nothing: not a probe success, not a
/// failure, not a call in the window, and it does not break a failure streak.
async fn ignored_outcome_frees_a_probe_slot_but_counts_toward_nothing<B: Driver>() {
    let mut b = B::new(BreakerParams {
        consecutive_failures: 2,
        ..params()
    });
    assert_eq!(fail(&mut b).await, None);
    assert_eq!(run(&mut b, CallOutcome::Ignored).await, None);
    let s = b.snapshot().await;
    assert_eq!((s.consecutive_failures, s.window.calls), (1, 1));
    let t = fail(&mut b).await;
    expect_transition(
        &b,
        t,
        CircuitState::Closed,
        CircuitState::Open,
        TransitionReason::ConsecutiveFailures,
    );
    b.advance(10_000);
    let probe = let_in(&mut b).await;
    assert!(matches!(
        refused(&mut b).await,
        Refusal::Circuit {
            state: CircuitState::HalfOpen,
            ..
        }
    ));
    assert_eq!(b.settle(&probe, CallOutcome::Ignored, 1).await, None);
    let s = b.snapshot().await;
    assert_eq!(
        (s.state, s.half_open_successes, s.probes_in_flight),
        (CircuitState::HalfOpen, 0, 0)
    );
    let next = let_in(&mut b).await;
    assert!(
        next.probe,
        "the ignored probe's slot is free at once, not after probe_timeout"
    );
    assert_eq!(b.transitions().len(), 2);
}

/// Runs every story on plain data and through the memory store.
macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod on_plain_data {
            $(
                #[tokio::test]
                async fn $story() {
                    super::$story::<super::Plain>().await;
                }
            )*
        }
        mod through_memory_store {
            $(
                #[tokio::test]
                async fn $story() {
                    super::$story::<super::ThroughStore>().await;
                }
            )*
        }
    };
}

stories!(
    closed_opens_after_n_consecutive_failures,
    failure_rate_over_the_window_trips_once_minimum_calls_are_in,
    below_minimum_calls_not_even_all_failures_trip,
    failure_rate_under_the_threshold_never_trips,
    failures_inside_the_window_still_count,
    old_buckets_slide_out_of_the_window,
    slow_calls_count_toward_the_slow_call_rate,
    open_turns_half_open_after_open_duration_and_admits_exactly_n_probes,
    probe_that_never_reports_back_is_rearmed_after_probe_timeout,
    m_successful_probes_close,
    probe_failure_reopens_with_a_grown_open_duration_capped_at_max,
    outcome_recorded_against_an_older_generation_changes_nothing,
    each_transition_is_reported_exactly_once,
    forced_open_refuses_everything_until_released,
    forced_closed_admits_and_never_trips,
    disabled_admits_and_counts_nothing,
    reset_of_an_open_breaker_closes_it,
    reset_of_a_closed_breaker_empties_its_window,
    not_before_refuses_until_its_instant_and_never_moves_backward,
    ignored_outcome_frees_a_probe_slot_but_counts_toward_nothing,
);

// ---------------------------------------------------------------------------------------------
// Plain-data details the stories do not reach.
// ---------------------------------------------------------------------------------------------

/// A snapshot is read-only: an open breaker whose time is up shows as half-open, but the
/// transition is made (and reported) by the next call.
#[test]
fn snapshot_of_an_elapsed_open_breaker_shows_half_open_without_transitioning() {
    let p = tripping();
    let mut s = BreakerState::default();
    let (v, t) = s.evaluate(&p, TARGET, T0);
    assert_eq!((v, t), (Verdict::Allow, None));
    let opened = s.record(&p, TARGET, T0, 0, CallOutcome::Failure, 1, None);
    assert!(opened.is_some());
    let before = s.clone();
    let snap = s.snapshot(&p, T0 + 10_000);
    assert_eq!(snap.state, CircuitState::HalfOpen);
    assert_eq!(snap.open_until_ms, None);
    assert_eq!(snap.generation, 1);
    assert_eq!(s, before, "snapshot changed the state");
    let (v, t) = s.evaluate(&p, TARGET, T0 + 10_000);
    assert_eq!(v, Verdict::Probe);
    assert_eq!(
        t.map(|t| (t.to, t.generation)),
        Some((CircuitState::HalfOpen, 2))
    );
}

/// `evaluate` decides a probe but only `take_probe` commits it: a probe verdict that another
/// check refused leaves the slot free.
#[test]
fn a_probe_verdict_is_not_a_probe_until_taken() {
    let p = tripping();
    let mut s = BreakerState::default();
    s.record(&p, TARGET, T0, 0, CallOutcome::Failure, 1, None);
    let now = T0 + 10_000;
    assert_eq!(s.evaluate(&p, TARGET, now).0, Verdict::Probe);
    assert_eq!(
        s.evaluate(&p, TARGET, now).0,
        Verdict::Probe,
        "nothing taken yet"
    );
    s.take_probe(&p, "p1", now);
    assert_eq!(
        s.evaluate(&p, TARGET, now).0,
        Verdict::Reject {
            state: CircuitState::HalfOpen,
            retry_after_ms: Some(5_000)
        }
    );
}

/// A success of a call that was not a probe does not count toward closing a half-open breaker
/// (only probes are let in while half-open, so such an outcome is a stray).
#[test]
fn a_non_probe_outcome_does_not_close_a_half_open_breaker() {
    let p = tripping();
    let mut s = BreakerState::default();
    s.record(&p, TARGET, T0, 0, CallOutcome::Failure, 1, None);
    let now = T0 + 10_000;
    s.evaluate(&p, TARGET, now);
    assert_eq!(s.state, CircuitState::HalfOpen);
    let gen = s.generation;
    assert_eq!(
        s.record(&p, TARGET, now, gen, CallOutcome::Success, 1, None),
        None
    );
    assert_eq!(
        s.record(&p, TARGET, now, gen, CallOutcome::Failure, 1, None),
        None
    );
    assert_eq!(
        (s.state, s.half_open_successes),
        (CircuitState::HalfOpen, 0)
    );
}

/// While half-open, a slow probe counts as a failed probe when the slow-call rule is on.
#[test]
fn a_slow_probe_reopens_when_the_slow_call_rule_is_on() {
    let p = BreakerParams {
        slow_call_ms: 1_000,
        slow_call_rate_pct: 100.0,
        ..tripping()
    };
    let mut s = BreakerState::default();
    s.record(&p, TARGET, T0, 0, CallOutcome::Failure, 1, None);
    let now = T0 + 10_000;
    s.evaluate(&p, TARGET, now);
    s.take_probe(&p, "p1", now);
    let t = s.record(&p, TARGET, now, 2, CallOutcome::Success, 1_000, Some("p1"));
    assert_eq!(
        t.map(|t| (t.to, t.reason)),
        Some((CircuitState::Open, TransitionReason::ProbeFailed))
    );
}

/// The grown open duration: multiplied once per re-open without rounding, rounded up once,
/// capped (Lua does the same operations on the same doubles).
#[test]
fn open_duration_grows_by_multiply_then_ceil_and_stops_at_the_cap() {
    let p = BreakerParams {
        open_ms: 1_001,
        open_multiplier: 1.5,
        max_open_ms: 4_000,
        ..params()
    };
    let got: Vec<u64> = (1..=6).map(|k| p.open_duration_ms(k)).collect();
    // 1001, ceil(1501.5) = 1502, ceil(2252.25) = 2253, ceil(3378.375) = 3379, cap 4000.
    assert_eq!(got, vec![1_001, 1_502, 2_253, 3_379, 4_000, 4_000]);
    assert_eq!(
        p.open_duration_ms(u32::MAX),
        4_000,
        "no overflow, no endless loop"
    );
    let flat = BreakerParams {
        open_multiplier: 1.0,
        ..p.clone()
    };
    assert_eq!(flat.open_duration_ms(50), 1_001);
    let cap_below_open = BreakerParams {
        max_open_ms: 10,
        ..p
    };
    assert_eq!(
        cap_below_open.open_duration_ms(3),
        1_001,
        "the cap never shortens the first open"
    );
}

/// The window is a ring: a slot reused for a newer bucket starts from zero.
#[test]
fn a_reused_window_slot_starts_from_zero() {
    let mut w = Window::default();
    w.add(T0, 1_000, 3, true, true);
    w.add(T0, 1_000, 3, true, false);
    assert_eq!(
        w.totals(T0, 1_000, 3),
        Totals {
            calls: 2,
            failures: 2,
            slow: 1
        }
    );
    // 3 buckets later the same slot holds a new epoch.
    w.add(T0 + 3_000, 1_000, 3, false, false);
    assert_eq!(
        w.totals(T0 + 3_000, 1_000, 3),
        Totals {
            calls: 1,
            failures: 0,
            slow: 0
        }
    );
    // A clock that steps back does not see buckets from its future.
    assert_eq!(w.totals(T0 + 1_000, 1_000, 3), Totals::default());
}

// ---------------------------------------------------------------------------------------------
// Store-only: transitions made by a call that is refused for another reason.
// ---------------------------------------------------------------------------------------------

/// The open -> half-open change found by a call that the rate limit then refuses is reported
/// once, with that refusal, and takes no probe slot.
#[tokio::test]
async fn half_open_found_by_a_rate_limited_call_is_reported_once_and_takes_no_probe() {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let target = Arc::new(target_spec(tripping()));
    // Two calls an hour: a burst of two, then one every 30 minutes.
    let feature = Arc::new(feature_spec(
        "batch",
        Some(RateParams {
            emission_us: 1_800_000_000,
            burst: 2,
        }),
    ));
    let admit = |id: &'static str| {
        let (store, target, feature) = (store.clone(), target.clone(), feature.clone());
        async move {
            store
                .admit(AdmitRequest {
                    target: &target,
                    feature: &feature,
                    call_id: id,
                })
                .await
                .expect("the memory store does not fail")
        }
    };
    let Admission::Admitted(a) = admit("a").await else {
        panic!("first call of a burst of two is admitted")
    };
    let Admission::Admitted(_b) = admit("b").await else {
        panic!("second call of a burst of two is admitted")
    };
    let opened = store
        .settle(&[Settle {
            target: target.clone(),
            feature: feature.clone(),
            call_id: "a".to_owned(),
            generation: a.generation,
            probe: false,
            permit: false,
            refund_rate: false,
            outcome: CallOutcome::Failure,
            elapsed_ms: 1,
        }])
        .await
        .expect("the memory store does not fail");
    assert_eq!(opened.len(), 1);
    clock.advance(Duration::from_millis(10_000));
    match admit("c").await {
        Admission::Rejected {
            rejection: Rejection::RateLimited { .. },
            transition: Some(t),
        } => assert_eq!(
            (t.from, t.to, t.generation),
            (CircuitState::Open, CircuitState::HalfOpen, 2)
        ),
        other => panic!("expected a rate-limit refusal carrying open -> half-open, got {other:?}"),
    }
    match admit("d").await {
        Admission::Rejected {
            rejection: Rejection::RateLimited { .. },
            transition: None,
        } => {}
        other => panic!("expected a rate-limit refusal with no transition, got {other:?}"),
    }
    let snap = store.snapshot(&target).await.expect("snapshot");
    assert_eq!(
        (snap.state, snap.probes_in_flight),
        (CircuitState::HalfOpen, 0)
    );
}

/// `open_duration_multiplier` is documented as "each consecutive re-open multiplies the open
/// duration by this". Multiply-and-floor loses the growth whenever `d * (m - 1) < 1 ms`: with
/// a valid `open_duration = "10ms"` and `open_duration_multiplier = 1.05`, floor(10 * 1.05) is
/// 10 again, so the duration never grows, however many probes fail.
#[test]
fn a_short_open_duration_still_grows_with_a_small_multiplier() {
    let p = BreakerParams {
        open_ms: 10,
        open_multiplier: 1.05,
        max_open_ms: 1_000,
        ..params()
    };
    assert!(
        p.open_duration_ms(2) > 10,
        "second open lasts {} ms, the first lasted 10 ms",
        p.open_duration_ms(2)
    );
    // 10 * 1.05^99 is about 1,253 ms: the cap is reached long before the 100th open.
    assert_eq!(p.open_duration_ms(100), 1_000);
}
