//! `RedisStore` against real `redis-server` processes (and a real 3-master Redis Cluster):
//! the Lua scripts do what `BreakerState` / GCRA / leased permits say, survive SCRIPT FLUSH and
//! corrupted values, set a TTL on every key, and compensate split admissions.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusebox::breaker::{BreakerParams, CircuitState};
use fusebox::bulkhead::BulkheadParams;
use fusebox::keys::{feature_keys, target_keys};
use fusebox::ratelimit::RateParams;
use fusebox::store::{
    Admission, AdmitRequest, Admitted, FeatureSpec, MemoryStore, RedisStore, Settle, Store,
    TargetSpec,
};
use fusebox::{
    BreakerConfig, CallOutcome, Error, Force, RedisConfig, Rejection, StoreError, Transition,
    TransitionReason,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{RedisCluster, RedisServer};

const IDLE_TTL_MS: u64 = 120_000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: Some(url.to_owned()),
        // Generous: the tests run in parallel with many servers on one machine.
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&config(&server.url()))
        .await
        .expect("connect")
}

/// `tr` went `from` -> `to` at `generation`, for `reason`.
#[track_caller]
fn assert_transition(
    tr: &Transition,
    from: CircuitState,
    to: CircuitState,
    generation: u64,
    reason: TransitionReason,
) {
    assert_eq!(
        (tr.from, tr.to, tr.generation, tr.reason),
        (from, to, generation, reason),
        "{tr:?}"
    );
}

/// A bulkhead of `limit` permits with a 30 s lease.
fn bulkhead(limit: u32) -> BulkheadParams {
    BulkheadParams {
        limit,
        lease_ms: 30_000,
    }
}

/// [`fast_breaker`] with one half-open probe whose success closes it.
fn one_probe_breaker() -> BreakerConfig {
    BreakerConfig {
        half_open_probes: 1,
        half_open_successes: 1,
        ..fast_breaker()
    }
}

/// The setup most breaker tests share: a fresh server, a store on it, target "m" with
/// [`fast_breaker`] and feature "chat" without limits.
async fn breaker_setup() -> (RedisServer, RedisStore, Arc<TargetSpec>, Arc<FeatureSpec>) {
    let server = RedisServer::start();
    let store = connect(&server).await;
    (
        server,
        store,
        target("m", &fast_breaker()),
        plain_feature("chat"),
    )
}

/// Consecutive failures 3, open 300 ms doubling per re-open, 2 probes, 2 successes to close.
fn fast_breaker() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate: None,
        minimum_calls: 1,
        window: Duration::from_secs(60),
        window_buckets: 10,
        open_duration: Duration::from_millis(300),
        open_duration_multiplier: 2.0,
        max_open_duration: Duration::from_secs(10),
        half_open_probes: 2,
        half_open_successes: 2,
        probe_timeout: Duration::from_secs(30),
        ..BreakerConfig::default()
    }
}

fn target(name: &str, cfg: &BreakerConfig) -> Arc<TargetSpec> {
    Arc::new(TargetSpec {
        name: name.to_owned(),
        keys: target_keys("test", name),
        params: BreakerParams::from_config(cfg, IDLE_TTL_MS),
    })
}

fn feature(
    name: &str,
    bulkhead: Option<BulkheadParams>,
    rate: Option<RateParams>,
) -> Arc<FeatureSpec> {
    Arc::new(FeatureSpec {
        name: name.to_owned(),
        keys: feature_keys("test", name),
        bulkhead,
        rate,
    })
}

fn plain_feature(name: &str) -> Arc<FeatureSpec> {
    feature(name, None, None)
}

async fn admit<S: Store>(store: &S, t: &TargetSpec, f: &FeatureSpec, id: &str) -> Admission {
    store
        .admit(AdmitRequest {
            target: t,
            feature: f,
            call_id: id,
        })
        .await
        .expect("admit")
}

async fn admitted<S: Store>(store: &S, t: &TargetSpec, f: &FeatureSpec, id: &str) -> Admitted {
    match admit(store, t, f, id).await {
        Admission::Admitted(a) => a,
        other => panic!("call {id} should be admitted, got {other:?}"),
    }
}

async fn rejected<S: Store>(store: &S, t: &TargetSpec, f: &FeatureSpec, id: &str) -> Rejection {
    match admit(store, t, f, id).await {
        Admission::Rejected { rejection, .. } => rejection,
        other => panic!("call {id} should be rejected, got {other:?}"),
    }
}

fn settle_of(
    t: &Arc<TargetSpec>,
    f: &Arc<FeatureSpec>,
    id: &str,
    a: &Admitted,
    outcome: CallOutcome,
) -> Settle {
    Settle {
        target: t.clone(),
        feature: f.clone(),
        call_id: id.to_owned(),
        generation: a.generation,
        probe: a.probe,
        permit: a.permit,
        refund_rate: false,
        outcome,
        elapsed_ms: 5,
    }
}

/// Admits one call and settles it with `outcome`; returns the settle's transitions.
async fn call<S: Store>(
    store: &S,
    t: &Arc<TargetSpec>,
    f: &Arc<FeatureSpec>,
    id: &str,
    outcome: CallOutcome,
) -> Vec<Transition> {
    let a = admitted(store, t, f, id).await;
    store
        .settle(&[settle_of(t, f, id, &a, outcome)])
        .await
        .expect("settle")
}

/// Trips `t` with three consecutive failures; returns the open transition.
async fn trip<S: Store>(store: &S, t: &Arc<TargetSpec>, f: &Arc<FeatureSpec>) -> Transition {
    let mut all = Vec::new();
    for i in 0..3 {
        all.extend(call(store, t, f, &format!("trip-{i}"), CallOutcome::Failure).await);
    }
    assert_eq!(
        all.len(),
        1,
        "exactly one transition from 3 failures: {all:?}"
    );
    all.remove(0)
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let out = server.cli(&["PTTL", key]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("PTTL {key}: {out}"))
}

/// The server's clock in ms.
fn server_ms(server: &RedisServer) -> u64 {
    let out = server.cli(&["TIME"]);
    let mut parts = out.lines().map(|l| l.trim().parse::<u64>().expect("TIME"));
    let (sec, usec) = (parts.next().expect("sec"), parts.next().expect("usec"));
    sec * 1000 + usec / 1000
}

/// Polls `check` every 20 ms until it holds or `within` has passed.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Breaker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_then_settle_round_trip() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    assert!(!store.is_cluster());
    store.ping().await.expect("ping");
    let t = target("m", &fast_breaker());
    let f = feature("chat", Some(bulkhead(5)), None);

    let a = admitted(&store, &t, &f, "c1").await;
    assert_eq!(
        a,
        Admitted {
            generation: 0,
            probe: false,
            permit: true,
            transition: None
        }
    );
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 1);

    let transitions = store
        .settle(&[settle_of(&t, &f, "c1", &a, CallOutcome::Success)])
        .await
        .expect("settle");
    assert!(transitions.is_empty());
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 0);

    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Closed);
    assert_eq!(snap.window.calls, 1);
    assert_eq!(snap.window.failures, 0);

    // A failure and then a success: window 3 calls / 1 failure, consecutive count reset.
    call(&store, &t, &f, "c2", CallOutcome::Failure).await;
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.consecutive_failures, 1);
    call(&store, &t, &f, "c3", CallOutcome::Success).await;
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!((snap.window.calls, snap.window.failures), (3, 1));
    assert_eq!(snap.consecutive_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_trips_after_consecutive_failures_and_refuses() {
    let (_server, store, t, f) = breaker_setup().await;

    assert!(call(&store, &t, &f, "f1", CallOutcome::Failure)
        .await
        .is_empty());
    assert!(call(&store, &t, &f, "f2", CallOutcome::Failure)
        .await
        .is_empty());
    let tr = call(&store, &t, &f, "f3", CallOutcome::Failure).await;
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_transition(
        &tr[0],
        CircuitState::Closed,
        CircuitState::Open,
        1,
        TransitionReason::ConsecutiveFailures,
    );
    assert_eq!(tr[0].target, "m");
    assert!(tr[0].at_ms > 1_600_000_000_000, "server time in ms");

    match rejected(&store, &t, &f, "x").await {
        Rejection::CircuitOpen {
            target,
            state,
            retry_after,
        } => {
            assert_eq!(target, "m");
            assert_eq!(state, CircuitState::Open);
            let ra = retry_after.expect("open has a retry-after");
            assert!(
                ra <= Duration::from_millis(300) && ra > Duration::ZERO,
                "{ra:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.opens, 1);
    assert!(snap.open_until_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_rate_over_the_window_trips() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let cfg = BreakerConfig {
        consecutive_failures: None,
        failure_rate: Some(50.0),
        minimum_calls: 4,
        ..fast_breaker()
    };
    let t = target("m", &cfg);
    let f = plain_feature("chat");
    // S F S F: 50 % of 4 calls at the 4th.
    assert!(call(&store, &t, &f, "1", CallOutcome::Success)
        .await
        .is_empty());
    assert!(call(&store, &t, &f, "2", CallOutcome::Failure)
        .await
        .is_empty());
    assert!(call(&store, &t, &f, "3", CallOutcome::Success)
        .await
        .is_empty());
    let tr = call(&store, &t, &f, "4", CallOutcome::Failure).await;
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_eq!(tr[0].reason, TransitionReason::FailureRate);
    // The window is cleared on open.
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.window.calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_older_than_the_window_do_not_count() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let cfg = BreakerConfig {
        consecutive_failures: None,
        failure_rate: Some(100.0),
        minimum_calls: 4,
        window: Duration::from_secs(1),
        window_buckets: 2,
        ..fast_breaker()
    };
    let t = target("m", &cfg);
    let f = plain_feature("chat");
    for id in ["1", "2", "3"] {
        assert!(call(&store, &t, &f, id, CallOutcome::Failure)
            .await
            .is_empty());
    }
    // Wait for a bucket epoch at least two past the failures' (out of the window) that maps to
    // the OTHER bucket of the ring (so the old bucket is still stored and must be skipped as
    // stale rather than overwritten), early enough in the bucket for the next call to land in it.
    let idx: Vec<String> = ["we0", "we1"]
        .iter()
        .map(|f| server.cli(&["HGET", &t.keys.breaker, f]))
        .collect();
    let old_epoch: u64 = idx
        .iter()
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .expect("a stored bucket epoch");
    loop {
        let now = server_ms(&server);
        let epoch = now / 500;
        if epoch >= old_epoch + 2 && !(epoch - old_epoch).is_multiple_of(2) && now % 500 < 250 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The three old failures have left the window: one failure out of one call.
    assert!(call(&store, &t, &f, "4", CallOutcome::Failure)
        .await
        .is_empty());
    assert_eq!(store.snapshot(&t).await.expect("snapshot").window.calls, 1);
    let mut tr = Vec::new();
    for id in ["5", "6", "7"] {
        tr.extend(call(&store, &t, &f, id, CallOutcome::Failure).await);
    }
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_eq!(tr[0].reason, TransitionReason::FailureRate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_trip_the_slow_call_rate() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let cfg = BreakerConfig {
        consecutive_failures: None,
        failure_rate: None,
        minimum_calls: 2,
        slow_call_duration: Some(Duration::from_millis(100)),
        slow_call_rate: 100.0,
        ..fast_breaker()
    };
    let t = target("m", &cfg);
    let f = plain_feature("chat");
    let slow = |id: &str, a: &Admitted, elapsed_ms: u64| Settle {
        elapsed_ms,
        ..settle_of(&t, &f, id, a, CallOutcome::Success)
    };
    let a = admitted(&store, &t, &f, "a").await;
    let b = admitted(&store, &t, &f, "b").await;
    let tr = store
        .settle(&[slow("a", &a, 100), slow("b", &b, 99)])
        .await
        .expect("settle");
    assert!(tr.is_empty(), "99 ms is not slow: {tr:?}");
    let c = admitted(&store, &t, &f, "c").await;
    let d = admitted(&store, &t, &f, "d").await;
    let tr = store
        .settle(&[slow("c", &c, 250), slow("d", &d, 100)])
        .await
        .expect("settle");
    assert!(tr.is_empty(), "3 of 4 slow is under 100 %: {tr:?}");
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!((snap.window.calls, snap.window.slow), (4, 3));
    store.force(&t, Force::Open).await.expect("force");
    store.force(&t, Force::Reset).await.expect("force");
    let e = admitted(&store, &t, &f, "e").await;
    let g = admitted(&store, &t, &f, "g").await;
    let tr = store
        .settle(&[slow("e", &e, 150), slow("g", &g, 150)])
        .await
        .expect("settle");
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_eq!(tr[0].reason, TransitionReason::SlowCallRate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_exactly_n_probes_then_closes() {
    let (_server, store, t, f) = breaker_setup().await;
    trip(&store, &t, &f).await;
    tokio::time::sleep(Duration::from_millis(350)).await;

    // The first call after the open time moves the breaker to half-open and is a probe.
    let p1 = admitted(&store, &t, &f, "p1").await;
    assert!(p1.probe);
    assert_eq!(p1.generation, 2);
    let tr = p1.transition.clone().expect("open -> half-open");
    assert_eq!(
        (tr.from, tr.to, tr.generation, tr.reason),
        (
            CircuitState::Open,
            CircuitState::HalfOpen,
            2,
            TransitionReason::OpenElapsed
        )
    );
    let p2 = admitted(&store, &t, &f, "p2").await;
    assert!(p2.probe);
    assert!(p2.transition.is_none(), "the transition is reported once");
    // Exactly two probe slots.
    match rejected(&store, &t, &f, "p3").await {
        Rejection::CircuitOpen {
            state, retry_after, ..
        } => {
            assert_eq!(state, CircuitState::HalfOpen);
            let ra = retry_after.expect("probe lease end");
            assert!(
                ra > Duration::from_secs(25) && ra <= Duration::from_secs(30),
                "{ra:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.snapshot(&t).await.expect("snapshot").probes_in_flight,
        2
    );

    // A non-probe outcome in half-open counts for nothing.
    let stray = Admitted {
        generation: 2,
        probe: false,
        permit: false,
        transition: None,
    };
    let tr = store
        .settle(&[settle_of(&t, &f, "stray", &stray, CallOutcome::Success)])
        .await
        .expect("settle");
    assert!(tr.is_empty());
    assert_eq!(
        store
            .snapshot(&t)
            .await
            .expect("snapshot")
            .half_open_successes,
        0
    );

    // Two successful probes (one batch, in order) close it.
    let tr = store
        .settle(&[
            settle_of(&t, &f, "p1", &p1, CallOutcome::Success),
            settle_of(&t, &f, "p2", &p2, CallOutcome::Success),
        ])
        .await
        .expect("settle");
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_transition(
        &tr[0],
        CircuitState::HalfOpen,
        CircuitState::Closed,
        3,
        TransitionReason::ProbesSucceeded,
    );
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Closed);
    assert_eq!(snap.opens, 0);
    assert_eq!(snap.probes_in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_probe_reopens_for_longer() {
    let (_server, store, t, f) = breaker_setup().await;
    trip(&store, &t, &f).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let p1 = admitted(&store, &t, &f, "p1").await;
    let p2 = admitted(&store, &t, &f, "p2").await;
    let tr = store
        .settle(&[
            settle_of(&t, &f, "p1", &p1, CallOutcome::Failure),
            // Same generation as p1, but p1's failure already moved the breaker on.
            settle_of(&t, &f, "p2", &p2, CallOutcome::Failure),
        ])
        .await
        .expect("settle");
    assert_eq!(tr.len(), 1, "one transition for two failed probes: {tr:?}");
    assert_transition(
        &tr[0],
        CircuitState::HalfOpen,
        CircuitState::Open,
        3,
        TransitionReason::ProbeFailed,
    );
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.opens, 2);
    assert_eq!(snap.probes_in_flight, 0);
    // Second open: 300 ms x 2.
    let until = snap.open_until_ms.expect("open");
    let open_for = until.saturating_sub(tr[0].at_ms);
    assert_eq!(open_for, 600, "open_until - transition time");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(
        matches!(
            rejected(&store, &t, &f, "early").await,
            Rejection::CircuitOpen {
                state: CircuitState::Open,
                ..
            }
        ),
        "still open after 350 ms of 600"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_of_an_old_generation_change_nothing() {
    let (_server, store, t, f) = breaker_setup().await;
    let old = admitted(&store, &t, &f, "old").await;
    assert_eq!(old.generation, 0);
    trip(&store, &t, &f).await; // generation 1
    store
        .force(&t, Force::Reset)
        .await
        .expect("reset")
        .expect("transition"); // generation 2
    for _ in 0..3 {
        let tr = store
            .settle(&[settle_of(&t, &f, "old", &old, CallOutcome::Failure)])
            .await
            .expect("settle");
        assert!(
            tr.is_empty(),
            "a generation-0 outcome must not count: {tr:?}"
        );
    }
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Closed);
    assert_eq!(snap.generation, 2);
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.window.calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_before_refuses_until_the_instant_and_only_moves_later() {
    let (server, store, t, f) = breaker_setup().await;
    store.set_not_before(&t, 2_000).await.expect("not_before");
    store.set_not_before(&t, 100).await.expect("not_before"); // earlier: ignored
    match rejected(&store, &t, &f, "x").await {
        Rejection::NotBefore {
            target,
            retry_after,
        } => {
            assert_eq!(target, "m");
            assert!(
                retry_after > Duration::from_millis(1_500) && retry_after <= Duration::from_secs(2),
                "{retry_after:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Closed, "not a breaker failure");
    assert!(snap.not_before_ms.is_some());
    assert!(pttl(&server, &t.keys.breaker) > 0);

    let short = target("n", &fast_breaker());
    store.set_not_before(&short, 200).await.expect("not_before");
    assert!(matches!(
        rejected(&store, &short, &f, "y").await,
        Rejection::NotBefore { .. }
    ));
    tokio::time::sleep(Duration::from_millis(250)).await;
    admitted(&store, &short, &f, "z").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_open_closed_disable_and_reset() {
    let (server, store, t, f) = breaker_setup().await;

    // Reset of a closed breaker: nothing to do, no key created.
    assert_eq!(store.force(&t, Force::Reset).await.expect("force"), None);
    assert_eq!(server.cli(&["EXISTS", &t.keys.breaker]), "0");

    let tr = store
        .force(&t, Force::Open)
        .await
        .expect("force")
        .expect("transition");
    assert_eq!(
        (tr.from, tr.to, tr.generation, tr.reason),
        (
            CircuitState::Closed,
            CircuitState::ForcedOpen,
            1,
            TransitionReason::Operator
        )
    );
    assert_eq!(
        store.force(&t, Force::Open).await.expect("force"),
        None,
        "idempotent"
    );
    match rejected(&store, &t, &f, "x").await {
        Rejection::CircuitOpen {
            state, retry_after, ..
        } => {
            assert_eq!(state, CircuitState::ForcedOpen);
            assert_eq!(retry_after, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        pttl(&server, &t.keys.breaker),
        -1,
        "operator states persist"
    );

    // Forced closed: failures never trip.
    store
        .force(&t, Force::Closed)
        .await
        .expect("force")
        .expect("transition");
    for i in 0..5 {
        let tr = call(&store, &t, &f, &format!("f{i}"), CallOutcome::Failure).await;
        assert!(tr.is_empty(), "{tr:?}");
    }
    assert_eq!(pttl(&server, &t.keys.breaker), -1);

    // Disabled: calls flow, nothing counted.
    store
        .force(&t, Force::Disable)
        .await
        .expect("force")
        .expect("transition");
    let a = admitted(&store, &t, &f, "d").await;
    assert_eq!(a.generation, 3);
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Disabled);

    let tr = store
        .force(&t, Force::Reset)
        .await
        .expect("force")
        .expect("transition");
    assert_eq!(
        (tr.from, tr.to, tr.generation),
        (CircuitState::Disabled, CircuitState::Closed, 4)
    );
    let ttl = pttl(&server, &t.keys.breaker);
    assert!(
        ttl > 0 && ttl <= IDLE_TTL_MS as i64,
        "reset brings expiry back: {ttl}"
    );
}

// ---------------------------------------------------------------------------------------------
// Rate limit and bulkhead
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_admits_a_burst_then_refuses_with_retry_after() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        None,
        Some(RateParams {
            emission_us: 200_000,
            burst: 3,
        }),
    );
    for i in 0..3 {
        admitted(&store, &t, &f, &format!("r{i}")).await;
    }
    match rejected(&store, &t, &f, "r3").await {
        Rejection::RateLimited {
            feature,
            retry_after,
        } => {
            assert_eq!(feature, "chat");
            assert!(
                retry_after > Duration::from_millis(100)
                    && retry_after <= Duration::from_millis(200),
                "{retry_after:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(220)).await;
    admitted(&store, &t, &f, "r4").await;
    assert!(matches!(
        rejected(&store, &t, &f, "r5").await,
        Rejection::RateLimited { .. }
    ));
    let ttl = pttl(&server, &f.keys.rate);
    assert!(ttl > 0 && ttl <= 1_000 + 600 + 5, "TAT passed + 1 s: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_gives_back_a_rate_slot() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        None,
        Some(RateParams {
            emission_us: 10_000_000,
            burst: 1,
        }),
    );
    let a = admitted(&store, &t, &f, "a").await;
    assert!(matches!(
        rejected(&store, &t, &f, "b").await,
        Rejection::RateLimited { .. }
    ));
    let mut s = settle_of(&t, &f, "a", &a, CallOutcome::Ignored);
    s.refund_rate = true;
    store.settle(&[s]).await.expect("settle");
    admitted(&store, &t, &f, "c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_limit_lease_reclaim_heartbeat_and_idempotent_release() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        Some(BulkheadParams {
            limit: 2,
            lease_ms: 1_000,
        }),
        None,
    );
    let a = admitted(&store, &t, &f, "a").await;
    let b = admitted(&store, &t, &f, "b").await;
    assert!(a.permit && b.permit);
    match rejected(&store, &t, &f, "c").await {
        Rejection::BulkheadFull {
            feature,
            limit,
            retry_after,
        } => {
            assert_eq!((feature.as_str(), limit), ("chat", 2));
            let ra = retry_after.expect("earliest lease end");
            assert!(
                ra > Duration::ZERO && ra <= Duration::from_millis(1_000),
                "{ra:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 2);
    let ttl = pttl(&server, &f.keys.permits);
    assert!(ttl > 1_500 && ttl <= 2_000, "lease + 1 s: {ttl}");

    // Keep `a` alive with heartbeats; `b` lapses.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.heartbeat(&f, "a").await.expect("heartbeat"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        store.in_flight(&f).await.expect("in_flight"),
        1,
        "b expired"
    );
    // The expired permit is reclaimed inside admit.
    let c = admitted(&store, &t, &f, "c").await;
    assert!(c.permit);
    assert!(
        !store.heartbeat(&f, "b").await.expect("heartbeat"),
        "b is gone"
    );
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 2);

    // Release twice: harmless.
    let rel = settle_of(&t, &f, "a", &a, CallOutcome::Success);
    store
        .settle(std::slice::from_ref(&rel))
        .await
        .expect("settle");
    store.settle(&[rel]).await.expect("settle again");
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 1);
    assert!(!store.heartbeat(&f, "a").await.expect("heartbeat"));
    // A feature without a bulkhead has nothing to heartbeat.
    assert!(!store
        .heartbeat(&plain_feature("x"), "a")
        .await
        .expect("heartbeat"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_all_or_nothing() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        Some(bulkhead(1)),
        Some(RateParams {
            emission_us: 1_000,
            burst: 100,
        }),
    );
    admitted(&store, &t, &f, "holder").await;
    let tat_before = server.cli(&["GET", &f.keys.rate]);
    // Bulkhead refuses: the rate slot must not be taken.
    for i in 0..5 {
        assert!(matches!(
            rejected(&store, &t, &f, &format!("x{i}")).await,
            Rejection::BulkheadFull { .. }
        ));
    }
    assert_eq!(server.cli(&["GET", &f.keys.rate]), tat_before);
    // A refusing breaker refuses before the bulkhead is touched.
    let g = feature("other", Some(bulkhead(5)), None);
    store.force(&t, Force::Open).await.expect("force");
    rejected(&store, &t, &g, "y").await;
    assert_eq!(store.in_flight(&g).await.expect("in_flight"), 0);
}

// ---------------------------------------------------------------------------------------------
// Split admission (as on Cluster) and its compensation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_admit_releases_permit_and_refunds_rate_when_the_breaker_refuses() {
    let server = RedisServer::start();
    let store = connect(&server).await.with_split_admit(true);
    assert!(store.splits_admit());
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        Some(bulkhead(1)),
        Some(RateParams {
            emission_us: 10_000_000,
            burst: 1,
        }),
    );
    store.force(&t, Force::Open).await.expect("force");
    match rejected(&store, &t, &f, "refused").await {
        Rejection::CircuitOpen { state, .. } => assert_eq!(state, CircuitState::ForcedOpen),
        other => panic!("the breaker's rejection wins: {other:?}"),
    }
    // The feature part took a permit and the only rate slot; compensation gives both back.
    eventually(Duration::from_secs(3), "permit released", || async {
        store.in_flight(&f).await.expect("in_flight") == 0
    })
    .await;
    store.force(&t, Force::Reset).await.expect("force");
    let a = admitted(&store, &t, &f, "next").await;
    assert!(a.permit, "rate slot refunded and permit free");
}

/// Issue 5 §2.8: a caller dropped after its answer arrived but before it read it. The answer
/// was a refusal that carries a transition (open -> half-open: the breaker part moved the
/// breaker, the feature part refused): nobody else will report that transition, so the store
/// gives it to the transition sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_with_a_transition_is_reported_when_its_caller_was_dropped() {
    let server = RedisServer::start();
    let store = connect(&server).await.with_split_admit(true);
    let lost = Arc::new(std::sync::Mutex::new(Vec::<Transition>::new()));
    let sink = Arc::clone(&lost);
    store.set_transition_sink(Arc::new(move |t| {
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(t)
    }));
    let cfg = one_probe_breaker();
    let t = target("m", &cfg);
    let healthy = target("h", &cfg);
    let f = feature("chat", Some(bulkhead(1)), None);
    trip(&store, &t, &plain_feature("plain")).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let _holder = admitted(&store, &healthy, &f, "holder").await;

    let mut admission = Box::pin(store.admit(AdmitRequest {
        target: &t,
        feature: &f,
        call_id: "dropped",
    }));
    let first =
        std::future::poll_fn(|cx| std::task::Poll::Ready(Future::poll(admission.as_mut(), cx)))
            .await;
    assert!(
        first.is_pending(),
        "answered without a round trip: {first:?}"
    );
    // The admission ran (the breaker is half-open) and its answer is on its way back.
    eventually(Duration::from_secs(5), "the breaker part ran", || async {
        store.snapshot(&t).await.expect("snapshot").state == CircuitState::HalfOpen
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(admission);

    let reported = lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        reported
            .iter()
            .any(|tr| tr.target == "m" && tr.to == CircuitState::HalfOpen),
        "open -> half-open made by the dropped caller's admission was never reported: \
         {reported:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_admit_frees_the_probe_when_the_feature_refuses() {
    let server = RedisServer::start();
    let store = connect(&server).await.with_split_admit(true);
    let cfg = one_probe_breaker();
    let t = target("m", &cfg);
    let healthy = target("h", &cfg);
    let f = feature("chat", Some(bulkhead(1)), None);
    let plain = plain_feature("plain");
    trip(&store, &t, &plain).await;
    tokio::time::sleep(Duration::from_millis(350)).await;

    // Fill the bulkhead through another target.
    let holder = admitted(&store, &healthy, &f, "holder").await;
    // The breaker part takes the only probe slot (and moves open -> half-open), the feature
    // part refuses: the caller sees the bulkhead, the probe slot comes back.
    match admit(&store, &t, &f, "probe").await {
        Admission::Rejected {
            rejection,
            transition,
        } => {
            assert!(
                matches!(rejection, Rejection::BulkheadFull { .. }),
                "{rejection:?}"
            );
            let tr = transition.expect("open -> half-open still reported");
            assert_eq!(tr.to, CircuitState::HalfOpen);
        }
        other => panic!("{other:?}"),
    }
    eventually(Duration::from_secs(3), "probe slot freed", || async {
        store.snapshot(&t).await.expect("snapshot").probes_in_flight == 0
    })
    .await;
    store
        .settle(&[settle_of(
            &healthy,
            &f,
            "holder",
            &holder,
            CallOutcome::Success,
        )])
        .await
        .expect("settle");
    let p = admitted(&store, &t, &f, "probe2").await;
    assert!(p.probe && p.permit);
    let tr = store
        .settle(&[settle_of(&t, &f, "probe2", &p, CallOutcome::Success)])
        .await
        .expect("settle");
    assert_eq!(tr.len(), 1);
    assert_eq!(tr[0].to, CircuitState::Closed);
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 0);
}

// ---------------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_mid_run_is_survived() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature("chat", Some(bulkhead(5)), None);
    call(&store, &t, &f, "a", CallOutcome::Success).await;
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    call(&store, &t, &f, "b", CallOutcome::Failure).await;
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(store.snapshot(&t).await.expect("snapshot").window.calls, 2);
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert!(!store.heartbeat(&f, "gone").await.expect("heartbeat"));
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 0);
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    store.set_not_before(&t, 1).await.expect("not_before");
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    store.force(&t, Force::Open).await.expect("force");
}

/// Take-backs (a split admission refused by the breaker gives back the feature part's permit
/// and rate slot; one refused by the feature frees the breaker part's probe slot) still land
/// after `SCRIPT FLUSH` emptied the script cache: release.lua and settle.lua are loaded
/// again on NOSCRIPT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_backs_after_script_flush_still_land() {
    let server = RedisServer::start();
    let store = connect(&server).await.with_split_admit(true);
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        Some(bulkhead(1)),
        Some(RateParams {
            emission_us: 10_000_000,
            burst: 1,
        }),
    );
    store.force(&t, Force::Open).await.expect("force");
    for round in 0..3 {
        assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
        rejected(&store, &t, &f, &format!("refused-{round}")).await;
        eventually(
            Duration::from_secs(5),
            "permit released after SCRIPT FLUSH",
            || async { store.in_flight(&f).await.expect("in_flight") == 0 },
        )
        .await;
    }
    store.force(&t, Force::Reset).await.expect("force");
    // The rate slot was refunded each time (burst 1, one slot per 10 s).
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    let a = admitted(&store, &t, &f, "next").await;
    assert!(a.permit);
}

/// Regression (issue 5, §3): against a Redis with `requirepass` and a wrong password, a
/// hot-path admission (50 ms timeout) failed with `Timeout(50ms)`, since the connection's
/// lazy connect retries with backoff for longer than that; the cause (authentication) was
/// known only to the operator's connection. Now every call names it, the first one too,
/// and no call outlasts its timeout to do so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_named_on_the_hot_path() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "requirepass", "right-password"]);
    let url = format!("redis://:wrong-password@127.0.0.1:{}/", server.port());
    let rc = RedisConfig {
        url: Some(url),
        ..RedisConfig::default()
    };
    assert_eq!(
        rc.timeout,
        Duration::from_millis(50),
        "the hot path's default"
    );
    let t = target("m", &fast_breaker());
    let f = plain_feature("chat");
    let store = RedisStore::connect(&rc).await.expect("connects lazily");
    for i in 0..5 {
        let started = Instant::now();
        let err = store
            .admit(AdmitRequest {
                target: &t,
                feature: &f,
                call_id: &format!("c{i}"),
            })
            .await
            .expect_err("wrong password: no admission");
        assert!(
            matches!(err, StoreError::Auth(_)),
            "admission {i} names authentication, got {err:?}"
        );
        assert!(err.is_unavailable(), "counts toward local mode");
        assert!(!err.to_string().contains("wrong-password"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "bounded by the timeout (plus scheduling): {:?}",
            started.elapsed()
        );
    }
    // The password mended on the server: the store connects again by itself (the connection
    // manager never retried after an authentication failure, so it answered "auth" until the
    // process restarted).
    let mut admin = support::sync_connection(&format!(
        "redis://:right-password@127.0.0.1:{}/",
        server.port()
    ));
    let () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "wrong-password"])
        .query(&mut admin)
        .expect("CONFIG SET");
    let mut n = 0;
    eventually(
        Duration::from_secs(10),
        "admits once the password is right",
        || {
            n += 1;
            let id = format!("after-{n}");
            let (store, t, f) = (&store, &t, &f);
            async move {
                store
                    .admit(AdmitRequest {
                        target: t,
                        feature: f,
                        call_id: &id,
                    })
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_the_wrong_type_is_a_command_error_not_a_panic() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature("chat", Some(bulkhead(5)), None);
    assert_eq!(server.cli(&["SET", &t.keys.breaker, "not a hash"]), "OK");
    let is_command = |r: &Result<_, StoreError>| matches!(r, Err(StoreError::Command(_)));
    let r = store
        .admit(AdmitRequest {
            target: &t,
            feature: &f,
            call_id: "x",
        })
        .await;
    assert!(is_command(&r), "{r:?}");
    let r = store.snapshot(&t).await;
    assert!(matches!(r, Err(StoreError::Command(_))), "{r:?}");
    let a = Admitted {
        generation: 0,
        probe: false,
        permit: false,
        transition: None,
    };
    let r = store
        .settle(&[settle_of(&t, &f, "x", &a, CallOutcome::Failure)])
        .await;
    assert!(matches!(r, Err(StoreError::Command(_))), "{r:?}");
    let r = store.force(&t, Force::Open).await;
    assert!(matches!(r, Err(StoreError::Command(_))), "{r:?}");
    let r = store.set_not_before(&t, 10).await;
    assert!(matches!(r, Err(StoreError::Command(_))), "{r:?}");
    assert!(!r.as_ref().err().is_some_and(StoreError::is_unavailable));

    // The feature's permits under a string: admit fails, and takes nothing.
    let t2 = target("n", &fast_breaker());
    assert_eq!(server.cli(&["SET", &f.keys.permits, "nope"]), "OK");
    let r = store
        .admit(AdmitRequest {
            target: &t2,
            feature: &f,
            call_id: "y",
        })
        .await;
    assert!(is_command(&r), "{r:?}");
    let r = store.in_flight(&f).await;
    assert!(matches!(r, Err(StoreError::Command(_))), "{r:?}");
    // The store keeps working for healthy keys.
    store.ping().await.expect("ping");
    admitted(&store, &t2, &plain_feature("ok"), "z").await;
}

/// Regression (found by an adversarial run): a permit written with the score `+inf` made
/// admit.lua answer a retry-after of i64::MIN (so the coordinator admitted locally beside the
/// fleet), and lib.lua's expire_leases then sent `PEXPIRE key <i64::MIN>`, deleting every
/// permit of the feature. Now the refusal says at most a day, and the key keeps its permits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_that_never_expires_is_refused_sanely_and_deletes_nothing() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature("chat", Some(bulkhead(1)), None);
    assert_eq!(server.cli(&["ZADD", &f.keys.permits, "+inf", "ghost"]), "1");
    let r = store
        .admit(AdmitRequest {
            target: &t,
            feature: &f,
            call_id: "x",
        })
        .await;
    match r {
        Ok(Admission::Rejected {
            rejection: Rejection::BulkheadFull { retry_after, .. },
            ..
        }) => assert!(
            retry_after.is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(86_400)),
            "{retry_after:?}"
        ),
        other => panic!("expected a bulkhead refusal, got {other:?}"),
    }
    // The reconciliation script (lib.lua's expire_leases) must not delete the key.
    let adopt = redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../lua/lib.lua"),
        include_str!("../lua/adopt.lua")
    ));
    let mut con = support::sync_connection(&server.url());
    let added: i64 = adopt
        .key(&f.keys.permits)
        .arg("local-1")
        .arg(10_000)
        .invoke(&mut con)
        .expect("adopt.lua");
    assert_eq!(added, 1);
    assert_eq!(
        server.cli(&["ZCARD", &f.keys.permits]),
        "2",
        "nothing deleted"
    );
    let ttl: i64 = server
        .cli(&["PTTL", &f.keys.permits])
        .parse()
        .expect("an integer");
    assert!(ttl > 0, "the permits key keeps a positive expiry: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_hash_fields_are_survived_and_healed() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        None,
        Some(RateParams {
            emission_us: 1_000,
            burst: 10,
        }),
    );
    server.cli(&[
        "HSET",
        &t.keys.breaker,
        "s",
        "banana",
        "g",
        "-5",
        "ou",
        "1e3",
        "o",
        "99999999999",
        "cf",
        "x",
        "nb",
        "-1",
        "wn",
        "99999",
        "we0",
        "zz",
    ]);
    assert_eq!(server.cli(&["SET", &f.keys.rate, "not-a-number"]), "OK");

    let snap = store.snapshot(&t).await.expect("snapshot of garbage");
    assert_eq!(snap.state, CircuitState::Closed);
    assert_eq!(snap.generation, 0);
    assert_eq!(snap.opens, 0);
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.not_before_ms, None);

    let a = admitted(&store, &t, &f, "a").await;
    assert_eq!(a.generation, 0);
    // Outcomes count from the healed defaults and trip normally.
    let mut all = vec![];
    for id in ["a", "b", "c"] {
        let a = if id == "a" {
            a.clone()
        } else {
            admitted(&store, &t, &f, id).await
        };
        all.extend(
            store
                .settle(&[settle_of(&t, &f, id, &a, CallOutcome::Failure)])
                .await
                .expect("settle"),
        );
    }
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(
        (all[0].from, all[0].to, all[0].generation),
        (CircuitState::Closed, CircuitState::Open, 1)
    );
    assert_eq!(server.cli(&["HGET", &t.keys.breaker, "s"]), "1");
    assert_eq!(server.cli(&["HGET", &t.keys.breaker, "g"]), "1");
    assert_eq!(server.cli(&["HGET", &t.keys.breaker, "o"]), "1");

    // A state code out of range reads as closed.
    let u = target("u", &fast_breaker());
    server.cli(&["HSET", &u.keys.breaker, "s", "9", "g", "7"]);
    let a = admitted(&store, &u, &f, "u1").await;
    assert_eq!(a.generation, 7);
    let mut tr = store
        .settle(&[settle_of(&u, &f, "u1", &a, CallOutcome::Failure)])
        .await
        .expect("settle");
    for id in ["u2", "u3"] {
        tr.extend(call(&store, &u, &f, id, CallOutcome::Failure).await);
    }
    assert_eq!(
        tr.len(),
        1,
        "a healed closed breaker counts failures: {tr:?}"
    );
    assert_eq!((tr[0].from, tr[0].generation), (CircuitState::Closed, 8));
    // A rate key holding garbage was treated as no key, and the admission rewrote it.
    let tat = server.cli(&["GET", &f.keys.rate]);
    assert!(tat.bytes().all(|b| b.is_ascii_digit()), "{tat}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_gets_a_ttl() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let t = target("m", &fast_breaker());
    let lease_ms = 5_000;
    let f = feature(
        "chat",
        Some(BulkheadParams { limit: 5, lease_ms }),
        Some(RateParams {
            emission_us: 1_000,
            burst: 10,
        }),
    );
    trip(&store, &t, &f).await;
    let open_until = store
        .snapshot(&t)
        .await
        .expect("snapshot")
        .open_until_ms
        .expect("open");
    let ttl = pttl(&server, &t.keys.breaker);
    assert!(
        ttl > IDLE_TTL_MS as i64 - 1_000 && ttl <= IDLE_TTL_MS as i64 + 300,
        "breaker: idle TTL past open_until ({open_until}): {ttl}"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let p = admitted(&store, &t, &f, "probe").await;
    assert!(p.probe && p.permit);

    let probe_ttl = pttl(&server, &t.keys.probes);
    assert!(
        probe_ttl > 30_000 && probe_ttl <= 31_000,
        "probes: probe_timeout + 1 s: {probe_ttl}"
    );
    let permits_ttl = pttl(&server, &f.keys.permits);
    assert!(
        permits_ttl > 5_000 && permits_ttl <= 6_000,
        "permits: lease + 1 s: {permits_ttl}"
    );
    let rate_ttl = pttl(&server, &f.keys.rate);
    assert!(
        rate_ttl > 0 && rate_ttl <= 1_001 + 5,
        "rate: TAT passed + 1 s: {rate_ttl}"
    );
    // Half-open with a probe out: the hash outlives the probe by the idle time.
    let breaker_ttl = pttl(&server, &t.keys.breaker);
    assert!(
        breaker_ttl > IDLE_TTL_MS as i64 && breaker_ttl <= (IDLE_TTL_MS + 30_000) as i64,
        "breaker: probe_timeout + idle: {breaker_ttl}"
    );

    // Every key the store wrote has an expiry.
    let keys = server.cli(&["KEYS", "fusebox:*"]);
    assert!(!keys.is_empty());
    for key in keys.lines() {
        assert!(pttl(&server, key) > 0, "{key} has no TTL");
    }
    let n = target("nb", &fast_breaker());
    store.set_not_before(&n, 500).await.expect("not_before");
    let ttl = pttl(&server, &n.keys.breaker);
    assert!(
        ttl > IDLE_TTL_MS as i64 && ttl <= IDLE_TTL_MS as i64 + 500,
        "{ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_succeeds_while_redis_is_down_and_recovers() {
    let mut server = RedisServer::start();
    server.kill();
    let cfg = RedisConfig {
        timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        ..config(&server.url())
    };
    let store = RedisStore::connect(&cfg).await.expect("lazy connect");
    let t = target("m", &fast_breaker());
    let f = plain_feature("chat");
    let r = store
        .admit(AdmitRequest {
            target: &t,
            feature: &f,
            call_id: "x",
        })
        .await;
    match r {
        Err(e) => assert!(e.is_unavailable(), "{e:?}"),
        Ok(a) => panic!("no Redis, yet {a:?}"),
    }
    assert!(store.ping().await.is_err());

    server.restart();
    eventually(Duration::from_secs(10), "store answers again", || async {
        store.ping().await.is_ok()
    })
    .await;
    admitted(&store, &t, &f, "y").await;

    // A restart under a live connection: the next calls recover by themselves.
    server.restart();
    eventually(
        Duration::from_secs(10),
        "admit works after restart",
        || async {
            store
                .admit(AdmitRequest {
                    target: &t,
                    feature: &f,
                    call_id: "z",
                })
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connect_is_lazy_too() {
    let mut server = RedisServer::start();
    server.kill();
    let store = RedisStore::connect(&RedisConfig {
        url: None,
        cluster: vec![server.url()],
        timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        ..RedisConfig::default()
    })
    .await
    .expect("lazy cluster connect");
    assert!(store.is_cluster());
    for _ in 0..3 {
        match store.ping().await {
            Err(e) => assert!(e.is_unavailable(), "{e:?}"),
            Ok(()) => panic!("no cluster, yet PONG"),
        }
    }
    let t = target("m", &fast_breaker());
    let r = store
        .admit(AdmitRequest {
            target: &t,
            feature: &plain_feature("chat"),
            call_id: "x",
        })
        .await;
    assert!(
        r.as_ref().err().is_some_and(StoreError::is_unavailable),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_a_timeout() {
    let server = RedisServer::start();
    let cfg = RedisConfig {
        timeout: Duration::from_millis(150),
        ..config(&server.url())
    };
    let store = RedisStore::connect(&cfg).await.expect("connect");
    let t = target("m", &fast_breaker());
    let f = plain_feature("chat");
    admitted(&store, &t, &f, "a").await;
    server.pause();
    let started = Instant::now();
    let r = store
        .admit(AdmitRequest {
            target: &t,
            feature: &f,
            call_id: "b",
        })
        .await;
    let took = started.elapsed();
    server.resume();
    assert!(matches!(r, Err(StoreError::Timeout(_))), "{r:?}");
    assert!(
        took < Duration::from_secs(1),
        "bounded by the timeout: {took:?}"
    );
    eventually(Duration::from_secs(5), "answers after resume", || async {
        store.ping().await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_bad_url_is_a_config_error_naming_the_field() {
    let r = RedisStore::connect(&RedisConfig {
        url: Some("redis://127.0.0.1:notaport/".to_owned()),
        ..RedisConfig::default()
    })
    .await;
    match r {
        Err(Error::Config { field, .. }) => assert_eq!(field, "redis.url"),
        other => panic!("{other:?}"),
    }
    let r = RedisStore::connect(&RedisConfig {
        cluster: vec![
            "redis://127.0.0.1:7000/".to_owned(),
            "http://nope".to_owned(),
        ],
        ..RedisConfig::default()
    })
    .await;
    match r {
        Err(Error::Config { field, .. }) => assert_eq!(field, "redis.cluster[1]"),
        other => panic!("{other:?}"),
    }
    let r = RedisStore::connect(&RedisConfig::default()).await;
    assert!(matches!(r, Err(Error::Config { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_with_acl_user_and_password_work() {
    let server = RedisServer::start();
    assert_eq!(
        server.cli(&["ACL", "SETUSER", "fb", "on", ">s3cret", "~*", "+@all"]),
        "OK"
    );
    let url = format!("redis://fb:s3cret@127.0.0.1:{}/", server.port());
    let store = RedisStore::connect(&config(&url)).await.expect("connect");
    assert!(
        !format!("{store:?}").contains("s3cret"),
        "Debug hides the URL"
    );
    let t = target("m", &fast_breaker());
    call(
        &store,
        &t,
        &plain_feature("chat"),
        "a",
        CallOutcome::Success,
    )
    .await;

    let wrong = format!("redis://fb:wrong@127.0.0.1:{}/", server.port());
    let store = RedisStore::connect(&RedisConfig {
        timeout: Duration::from_millis(500),
        ..config(&wrong)
    })
    .await
    .expect("connect is lazy");
    let r = store.ping().await;
    assert!(r.is_err(), "{r:?}");
}

/// A test-only CA (valid 2000-2100) and a server certificate it signed for 127.0.0.1.
const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBaTCCAQ6gAwIBAgICEAAwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPZnVzZWJv
eCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAaMRgw
FgYDVQQDDA9mdXNlYm94IHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AASQjSvZNCj2a3XP8psKZx/nFV26pnfJmBKBYX/mHe2rhw0tFQbpXEjqkqWD5EcH
DTPVXFfrLoVwqa4kltn2F1gao0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB
/wQEAwICBDAdBgNVHQ4EFgQUIobb6mFcsKx1FGDMvlY5+27avGYwCgYIKoZIzj0E
AwIDSQAwRgIhAK8uLe6eaTNYAhG6riM2mN1gllMiDSpA2+iOzaOq3vFwAiEAw45e
9yEA5p0+QTdloHi42aTTYKZf2fotYz+6diY9AO4=
-----END CERTIFICATE-----
";
const TEST_SERVER_CERT_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBsDCCAVagAwIBAgICEAEwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPZnVzZWJv
eCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAUMRIw
EAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARVH5B8
qpN9cItqXmKmB6jaPUiRvfQmsVkc8HYZbGBKR8Ns5+CJPFRLuxn7TE/RFGpGmFkE
dmvdEIv77j/dV8Jdo4GPMIGMMBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9zdDAJ
BgNVHRMEAjAAMBMGA1UdJQQMMAoGCCsGAQUFBwMBMA4GA1UdDwEB/wQEAwIHgDAf
BgNVHSMEGDAWgBQihtvqYVywrHUUYMy+Vjn7btq8ZjAdBgNVHQ4EFgQUNlJoX+HF
Ru+DXOOHleUAil2++1YwCgYIKoZIzj0EAwIDSAAwRQIgU7Iw8hHXZ7BxigSjbzyh
oxW7JcIfix2e9/Lj16bjtEoCIQDanj/VKI8GCSAyXFe1UCp0GX/BbpR2/PlO1cjQ
EDaeYw==
-----END CERTIFICATE-----
";
const TEST_SERVER_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgZnYPtqsvpU18Ib1c
iUxXnvYp0efLCrZPVzKiX8uKE7+hRANCAARVH5B8qpN9cItqXmKmB6jaPUiRvfQm
sVkc8HYZbGBKR8Ns5+CJPFRLuxn7TE/RFGpGmFkEdmvdEIv77j/dV8Jd
-----END PRIVATE KEY-----
";

/// `rediss://` works (rustls with the ring provider), the server certificate is verified
/// against the roots the platform loader is given (`SSL_CERT_FILE`), and a plain `redis://`
/// client cannot talk to the TLS port.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_connect_over_tls() {
    let dir = std::env::temp_dir().join(format!("fusebox-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write fixture");
        p.display().to_string()
    };
    let ca = path("ca.pem", TEST_CA_PEM);
    let cert = path("server.pem", TEST_SERVER_CERT_PEM);
    let key = path("server.key", TEST_SERVER_KEY_PEM);
    // Only this test in this process uses TLS, so the loader reads our CA.
    std::env::set_var("SSL_CERT_FILE", &ca);
    let tls_port = support::redis_server::free_port(false).to_string();
    let server = RedisServer::start_with_args(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let store = RedisStore::connect(&config(&url)).await.expect("connect");
    store.ping().await.expect("ping over TLS");
    let t = target("m", &fast_breaker());
    call(
        &store,
        &t,
        &plain_feature("chat"),
        "a",
        CallOutcome::Success,
    )
    .await;
    assert_eq!(store.snapshot(&t).await.expect("snapshot").window.calls, 1);
    assert_eq!(server.cli(&["HGET", &t.keys.breaker, "wn"]), "10");

    let plain = RedisStore::connect(&RedisConfig {
        timeout: Duration::from_millis(500),
        ..config(&format!("redis://127.0.0.1:{tls_port}/"))
    })
    .await
    .expect("connect is lazy");
    assert!(plain.ping().await.is_err(), "plain text to a TLS port");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The same decisions as MemoryStore (the reference model)
// ---------------------------------------------------------------------------------------------

/// What an admission decided, without times.
fn decision(a: &Admission) -> String {
    let tr = |t: &Option<Transition>| {
        t.as_ref()
            .map(|t| format!("{:?}->{:?}#{} {:?}", t.from, t.to, t.generation, t.reason))
    };
    match a {
        Admission::Admitted(a) => format!(
            "admitted gen={} probe={} permit={} {:?}",
            a.generation,
            a.probe,
            a.permit,
            tr(&a.transition)
        ),
        Admission::Rejected {
            rejection,
            transition,
        } => {
            let what = match rejection {
                Rejection::CircuitOpen { state, .. } => format!("circuit {state}"),
                other => other.kind().to_owned(),
            };
            format!("rejected {what} {:?}", tr(transition))
        }
    }
}

fn transitions_without_time(ts: &[Transition]) -> Vec<String> {
    ts.iter()
        .map(|t| {
            format!(
                "{} {:?}->{:?}#{} {:?}",
                t.target, t.from, t.to, t.generation, t.reason
            )
        })
        .collect()
}

/// A seeded random run of admissions, outcomes and operator commands gives the same
/// decisions, transitions and snapshots on Redis (one call and split) as on MemoryStore.
/// Time plays no part: open durations and leases are long, the window is one hour in one
/// bucket (the run is repeated if it straddles an hour boundary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_decisions_as_memory_store() {
    let server = RedisServer::start();
    let cfg = BreakerConfig {
        consecutive_failures: Some(4),
        failure_rate: Some(50.0),
        minimum_calls: 6,
        window: Duration::from_secs(3600),
        window_buckets: 1,
        open_duration: Duration::from_secs(600),
        ..fast_breaker()
    };
    let hour = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 3600)
            .unwrap_or(0)
    };
    for (round, split) in [(0u64, false), (1, true)] {
        loop {
            let started_in = hour();
            let ns = format!("{round}-{started_in}-{}", rand::random::<u32>());
            let targets: Vec<Arc<TargetSpec>> = (0..2)
                .map(|i| {
                    Arc::new(TargetSpec {
                        name: format!("t{i}"),
                        keys: target_keys(&ns, &format!("t{i}")),
                        params: BreakerParams::from_config(&cfg, IDLE_TTL_MS),
                    })
                })
                .collect();
            let features: Vec<Arc<FeatureSpec>> = (0..2)
                .map(|i| {
                    Arc::new(FeatureSpec {
                        name: format!("f{i}"),
                        keys: feature_keys(&ns, &format!("f{i}")),
                        bulkhead: Some(BulkheadParams {
                            limit: 3,
                            lease_ms: 600_000,
                        }),
                        rate: None,
                    })
                })
                .collect();
            let redis = connect(&server).await.with_split_admit(split);
            let memory = MemoryStore::default();
            let mut rng = StdRng::seed_from_u64(0xF05E + round);
            let mut held: Vec<Settle> = Vec::new();
            for step in 0..400 {
                let roll = rng.random_range(0..100);
                if roll < 45 || held.is_empty() {
                    let t = &targets[rng.random_range(0..targets.len())];
                    let f = &features[rng.random_range(0..features.len())];
                    let id = format!("c{step}");
                    let m = admit(&memory, t, f, &id).await;
                    let r = admit(&redis, t, f, &id).await;
                    assert_eq!(decision(&r), decision(&m), "step {step}: admit {id}");
                    if let Admission::Admitted(a) = r {
                        let outcome = match rng.random_range(0..10) {
                            0..=4 => CallOutcome::Failure,
                            5..=8 => CallOutcome::Success,
                            _ => CallOutcome::Ignored,
                        };
                        held.push(settle_of(t, f, &id, &a, outcome));
                    }
                } else if roll < 95 {
                    let n = rng.random_range(1..=held.len().min(4));
                    let batch: Vec<Settle> = (0..n)
                        .map(|_| held.swap_remove(rng.random_range(0..held.len())))
                        .collect();
                    let m = memory.settle(&batch).await.expect("memory settle");
                    let r = redis.settle(&batch).await.expect("redis settle");
                    assert_eq!(
                        transitions_without_time(&r),
                        transitions_without_time(&m),
                        "step {step}: settle"
                    );
                } else {
                    let t = &targets[rng.random_range(0..targets.len())];
                    let cmd = [
                        Force::Reset,
                        Force::Reset,
                        Force::Open,
                        Force::Closed,
                        Force::Disable,
                    ][rng.random_range(0..5)];
                    let m = memory.force(t, cmd).await.expect("memory force");
                    let r = redis.force(t, cmd).await.expect("redis force");
                    assert_eq!(
                        transitions_without_time(&r.into_iter().collect::<Vec<_>>()),
                        transitions_without_time(&m.into_iter().collect::<Vec<_>>()),
                        "step {step}: force {cmd:?}"
                    );
                }
                if split {
                    // Let compensations land before the next decision depends on them.
                    for f in &features {
                        let want = memory.in_flight(f).await.expect("in_flight");
                        eventually(Duration::from_secs(3), "compensation", || async {
                            redis.in_flight(f).await.expect("in_flight") == want
                        })
                        .await;
                    }
                }
            }
            for t in &targets {
                let mut m = memory.snapshot(t).await.expect("snapshot");
                let mut r = redis.snapshot(t).await.expect("snapshot");
                m.open_until_ms = None;
                r.open_until_ms = None;
                assert_eq!(r, m, "snapshot of {}", t.name);
            }
            for f in &features {
                assert_eq!(
                    redis.in_flight(f).await.expect("in_flight"),
                    memory.in_flight(f).await.expect("in_flight"),
                    "in flight of {}",
                    f.name
                );
            }
            if hour() == started_in {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_admit_and_settle_split() {
    let cluster = RedisCluster::start(3);
    let store = RedisStore::connect(&RedisConfig {
        url: None,
        cluster: cluster.urls(),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    })
    .await
    .expect("connect");
    assert!(store.is_cluster() && store.splits_admit());
    store.ping().await.expect("ping");

    let t = target("m", &fast_breaker());
    let f = feature(
        "chat",
        Some(bulkhead(2)),
        Some(RateParams {
            emission_us: 1_000,
            burst: 100,
        }),
    );
    let node = &cluster.nodes()[0];
    assert_ne!(
        node.cli(&["CLUSTER", "KEYSLOT", &t.keys.breaker]),
        node.cli(&["CLUSTER", "KEYSLOT", &f.keys.permits]),
        "the test needs the target and the feature in different slots"
    );

    // Round trip.
    let a = admitted(&store, &t, &f, "a").await;
    assert!(a.permit && !a.probe);
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 1);
    store
        .settle(&[settle_of(&t, &f, "a", &a, CallOutcome::Success)])
        .await
        .expect("settle");
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 0);

    // Trip, refuse (and the feature part's permit comes back), half-open probe, close.
    let open = trip(&store, &t, &f).await;
    assert_eq!(open.to, CircuitState::Open);
    assert!(matches!(
        rejected(&store, &t, &f, "refused").await,
        Rejection::CircuitOpen { .. }
    ));
    eventually(Duration::from_secs(3), "compensated permit", || async {
        store.in_flight(&f).await.expect("in_flight") == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let p1 = admitted(&store, &t, &f, "p1").await;
    let p2 = admitted(&store, &t, &f, "p2").await;
    assert!(p1.probe && p2.probe);
    // Bulkhead full (2 held): the third call's breaker part is refused anyway (probes).
    rejected(&store, &t, &f, "p3").await;

    // Script cache flushed on every node: still works.
    for node in cluster.nodes() {
        assert_eq!(node.cli(&["SCRIPT", "FLUSH"]), "OK");
    }
    let tr = store
        .settle(&[
            settle_of(&t, &f, "p1", &p1, CallOutcome::Success),
            settle_of(&t, &f, "p2", &p2, CallOutcome::Success),
        ])
        .await
        .expect("settle");
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_eq!(tr[0].to, CircuitState::Closed);
    assert_eq!(
        store.snapshot(&t).await.expect("snapshot").state,
        CircuitState::Closed
    );
    assert_eq!(store.in_flight(&f).await.expect("in_flight"), 0);
    assert!(store.heartbeat(&f, "nothing").await.is_ok());
    store.set_not_before(&t, 1_000).await.expect("not_before");
    assert!(matches!(
        rejected(&store, &t, &f, "nb").await,
        Rejection::NotBefore { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// A half-open breaker under a probe slower than the idle TTL (issue 5, §2.6)
// ---------------------------------------------------------------------------------------------

/// The breaker hash expires when idle. A probe admitted half-open may take longer than the
/// idle TTL (here 300 ms, probe_timeout 10 s): the hash must outlive it, so that the probe's
/// late failure still finds its generation and re-opens the breaker (instead of the breaker
/// silently reading as closed at generation 0 and ignoring it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_breaker_outlives_a_probe_slower_than_the_idle_ttl() {
    const IDLE_MS: u64 = 300;
    let server = RedisServer::start();
    let store = connect(&server).await;
    let cfg = BreakerConfig {
        half_open_probes: 1,
        half_open_successes: 1,
        probe_timeout: Duration::from_secs(10),
        ..fast_breaker()
    };
    let t = Arc::new(TargetSpec {
        name: "slow-probe".to_owned(),
        keys: target_keys("test", "slow-probe"),
        params: BreakerParams::from_config(&cfg, IDLE_MS),
    });
    let f = plain_feature("plain");
    trip(&store, &t, &f).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = admitted(&store, &t, &f, "probe").await;
    assert!(probe.probe, "{probe:?}");
    let generation = probe.generation;
    let ttl: i64 = server
        .cli(&["PTTL", &t.keys.breaker])
        .parse()
        .expect("PTTL");
    assert!(
        ttl > 5_000,
        "breaker hash expires in {ttl} ms while its probe may run 10 s"
    );

    // The probe outlasts the idle TTL, then fails.
    tokio::time::sleep(Duration::from_millis(3 * IDLE_MS)).await;
    let trs = store
        .settle(&[settle_of(&t, &f, "probe", &probe, CallOutcome::Failure)])
        .await
        .expect("settle");
    assert!(
        trs.iter().any(|tr| tr.from == CircuitState::HalfOpen
            && tr.to == CircuitState::Open
            && tr.generation == generation + 1),
        "the slow probe's failure must re-open the breaker: {trs:?}"
    );
    let snap = store.snapshot(&t).await.expect("snapshot");
    assert_eq!(snap.state, CircuitState::Open, "{snap:?}");
}

// ---------------------------------------------------------------------------------------------
// The slowest rate the configuration allows (issue 5, §2.9)
// ---------------------------------------------------------------------------------------------

/// A full burst may take at most 365 days to refill (the configuration refuses more), which
/// keeps the limiter's stored instant (µs) far below 2^53, where Lua's doubles stop being
/// exact. At that bound (1 request per 24 h, burst 365) Redis and the in-memory store make the
/// same decisions over many admissions: the whole burst, then refusals whose retry_after
/// agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_slowest_rate_allowed_both_stores_agree() {
    const DAY_US: u64 = 86_400_000_000;
    let rate = |burst: u32| fusebox::RateConfig {
        requests: 1,
        per: Duration::from_secs(24 * 3600),
        burst: Some(burst),
    };
    let with = |burst: u32| {
        let mut c = fusebox::Config::default();
        c.features.insert(
            "slow".to_owned(),
            fusebox::FeatureConfig {
                rate: Some(rate(burst)),
                ..fusebox::FeatureConfig::default()
            },
        );
        c.validate()
    };
    with(365).expect("a burst refilling in 365 days is allowed");
    assert!(with(366).is_err(), "one more day is refused");

    let server = RedisServer::start();
    let redis = connect(&server).await;
    let memory = MemoryStore::default();
    let t = target("m", &fast_breaker());
    let f = feature(
        "slow",
        None,
        Some(RateParams {
            emission_us: DAY_US,
            burst: 365,
        }),
    );
    let (mut admitted_redis, mut admitted_memory) = (0, 0);
    for i in 0..600 {
        let id = format!("c{i}");
        let r = admit(&redis, &t, &f, &id).await;
        let m = admit(&memory, &t, &f, &id).await;
        match (&r, &m) {
            (Admission::Admitted(_), Admission::Admitted(_)) => {
                admitted_redis += 1;
                admitted_memory += 1;
            }
            (
                Admission::Rejected {
                    rejection: Rejection::RateLimited { retry_after: a, .. },
                    ..
                },
                Admission::Rejected {
                    rejection: Rejection::RateLimited { retry_after: b, .. },
                    ..
                },
            ) => {
                let gap = a.abs_diff(*b);
                assert!(
                    gap < Duration::from_secs(60),
                    "call {i}: retry_after {a:?} (Redis) vs {b:?} (memory)"
                );
                assert!(*a > Duration::from_secs(23 * 3600), "call {i}: {a:?}");
            }
            _ => panic!("call {i}: Redis {r:?}, memory {m:?}"),
        }
    }
    assert_eq!((admitted_redis, admitted_memory), (365, 365));
    // The stored instant is exact: now + 365 days, in µs, well below 2^53.
    let tat: u64 = server
        .cli(&["GET", &f.keys.rate])
        .parse()
        .expect("a stored TAT");
    assert!(tat < (1u64 << 53) / 4, "TAT {tat} µs");
}

/// A permit release that cannot reach Redis is retried until it lands, instead of holding the
/// permit for its whole lease. The settle times out against a SIGSTOPped Redis, which is then
/// killed (so the stalled call never runs) and restarted from its append-only file (so the
/// permit is still held there): a bulkhead of 1 admits again within seconds, not after the
/// 30 s lease. Seen by the adversarial review: a flush over a dropped connection left a
/// bulkhead of 1 full for its lease (30 of 40 sequential requests refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_could_not_reach_redis_is_retried_until_it_lands() {
    let mut server =
        RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::connect(&RedisConfig {
        timeout: Duration::from_millis(200),
        ..config(&server.url())
    })
    .await
    .expect("connect");
    let t = target("m", &BreakerConfig::default());
    let f = feature("one", Some(bulkhead(1)), None);
    let a = admitted(&store, &t, &f, "first").await;
    assert!(a.permit);
    let held = rejected(&store, &t, &f, "held").await;
    assert!(
        matches!(held, Rejection::BulkheadFull { .. }),
        "the permit is held: {held:?}"
    );
    server.pause();
    let settled = store
        .settle(&[settle_of(&t, &f, "first", &a, CallOutcome::Ignored)])
        .await;
    assert!(
        matches!(settled, Err(ref e) if e.is_unavailable()),
        "the settle did not reach the paused Redis: {settled:?}"
    );
    tokio::task::block_in_place(|| server.restart());
    assert_eq!(
        server.cli(&["ZCARD", &f.keys.permits]),
        "1",
        "the permit survived the restart"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("next-{n}");
        let req = AdmitRequest {
            target: &t,
            feature: &f,
            call_id: &id,
        };
        match store.admit(req).await {
            Ok(Admission::Admitted(_)) => break,
            other => assert!(
                Instant::now() < deadline,
                "still refused 10 s after Redis came back (lease 30 s): {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
