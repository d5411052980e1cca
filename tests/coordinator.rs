//! `Coordinator` end to end, against the embedded in-memory store (no `[redis]`) and against a
//! real spawned `redis-server`: calls and outcomes, breaker trips and recovery, bulkhead waits,
//! rate limits, leases and keep-alive, operator commands, "not before", observer and tracing
//! events, configuration errors, and secrets kept out of `Debug` and logs.
//!
//! Scenarios that matter on both stores are written once as `async fn name(env: Env)` and
//! instantiated by `on_both!(name)` as `name::memory` and `name::redis`. Every test runs under
//! a time budget ([`BUDGET`]).

// Not every test binary uses everything the shared harness exports.
mod support;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Tokio's clock: real time on Redis, paused time on the in-memory store (see `on_both!`).
use tokio::time::Instant;

use fusebox::BreakerSnapshot;
use fusebox::{
    BreakerConfig, CallError, CallOutcome, CircuitState, Config, Coordinator, Error, Event,
    FeatureConfig, Force, RateConfig, RedisConfig, Rejection, TransitionReason,
};
use support::{Recorder, RedisServer};

/// Upper bound on any one test.
const BUDGET: Duration = Duration::from_secs(30);
/// Upper bound on a flush (a healthy local Redis answers in milliseconds).
const FLUSH: Duration = Duration::from_secs(5);
const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Where the coordinators of one test keep their state: in process, or in one spawned Redis.
struct Env {
    server: Option<RedisServer>,
}

impl Env {
    fn memory() -> Env {
        Env { server: None }
    }

    fn redis() -> Env {
        Env {
            server: Some(RedisServer::start()),
        }
    }

    fn is_redis(&self) -> bool {
        self.server.is_some()
    }

    fn server(&self) -> &RedisServer {
        self.server.as_ref().expect("a Redis-backed test")
    }

    /// The default configuration on this store, with feature `chat` (no limits).
    fn config(&self) -> Config {
        let mut config = Config {
            namespace: "coordinator-test".into(),
            redis: self.server.as_ref().map(|s| redis_config(&s.url())),
            ..Config::default()
        };
        config
            .features
            .insert("chat".into(), FeatureConfig::default());
        config
    }

    /// A coordinator on `config`, with a recording observer.
    async fn start(&self, config: Config) -> (Coordinator, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let c = Coordinator::builder(config)
            .observer(recorder.clone())
            .build()
            .await
            .expect("valid configuration");
        (c, recorder)
    }

    /// [`Self::config`] with a one-permit feature `stream` of the given lease.
    fn config_with_stream(&self, lease: Duration) -> Config {
        let mut config = self.config();
        config.features.insert("stream".into(), leased(lease));
        config
    }

    /// A second coordinator ("another replica") sharing `first`'s state: a new coordinator
    /// on the same Redis, or `first` itself on the embedded store (which is per process).
    async fn peer(&self, first: &Coordinator, config: Config) -> Coordinator {
        if self.is_redis() {
            self.start(config).await.0
        } else {
            first.clone()
        }
    }
}

/// A Redis configuration with generous bounds: the tests run in parallel, many servers on one
/// machine, and are about coordinator behaviour, not latency (each Redis test also asserts
/// that its coordinators never fell back to local state).
fn redis_config(url: &str) -> RedisConfig {
    RedisConfig {
        url: Some(url.to_owned()),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

fn feature(max_concurrent: Option<u32>, max_wait: Duration) -> FeatureConfig {
    FeatureConfig {
        max_concurrent,
        max_wait,
        ..FeatureConfig::default()
    }
}

/// Runs a scenario under the time budget.
async fn bounded(scenario: impl Future<Output = ()>) {
    tokio::time::timeout(BUDGET, scenario)
        .await
        .expect("the test ran past its time budget");
}

/// Instantiates `async fn $name(env: Env)` as `$name::memory` and `$name::redis`. The memory
/// variant runs on paused Tokio time (the embedded store's clock is Tokio's): its sleeps and
/// waits take no real time and cannot race a busy machine. Redis keeps real time (its
/// scripts read the server's `TIME`).
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(start_paused = true)]
            async fn memory() {
                super::bounded(super::$name(super::Env::memory())).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::bounded(super::$name(super::Env::redis())).await
            }
        }
    )*};
}

/// Instantiates `async fn $name(env: Env)` as `$name::redis` only (shared state across
/// coordinators only exists on Redis).
macro_rules! on_redis {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::bounded(super::$name(super::Env::redis())).await
            }
        }
    )*};
}

async fn flush(c: &Coordinator) -> fusebox::FlushReport {
    let report = c.flush(FLUSH).await;
    assert!(!report.timed_out, "flush hit its timeout: {report:?}");
    report
}

async fn snapshot(c: &Coordinator, target: &str) -> BreakerSnapshot {
    c.snapshot(target).await.expect("snapshot")
}

/// Asserts that the coordinator decided on shared state throughout (never on local state
/// because Redis looked down): otherwise a Redis test would silently test the memory store.
fn assert_healthy(c: &Coordinator, recorder: &Recorder) {
    assert!(!c.is_degraded(), "the coordinator fell back to local state");
    assert!(
        recorder.degraded() == 0,
        "the coordinator degraded at some point: {:?}",
        recorder.events()
    );
}

/// One call that fails (`Err`), run through `call`; asserts it was admitted.
async fn fail(c: &Coordinator, feature: &str, target: &str) {
    let r = c
        .call(feature, target, || async { Err::<(), _>("upstream 500") })
        .await;
    match r {
        Err(CallError::Inner(e)) => assert_eq!(
            e, "upstream 500",
            "the call's own error comes back as CallError::Inner"
        ),
        other => panic!("expected the call's own error, got {other:?}"),
    }
}

/// One call that succeeds, run through `call`; asserts it was admitted.
async fn succeed(c: &Coordinator, feature: &str, target: &str) {
    let r = c
        .call(feature, target, || async { Ok::<_, String>(1) })
        .await;
    assert_eq!(r.expect("admitted and ran"), 1);
}

/// A call whose closure counts its runs; returns fusebox's verdict.
async fn counted_call(
    c: &Coordinator,
    feature: &str,
    target: &str,
    runs: &AtomicUsize,
) -> Result<(), CallError<String>> {
    c.call(feature, target, || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
    .await
}

fn rejection(r: Result<(), CallError<String>>) -> Rejection {
    match r {
        Err(CallError::Rejected(rejection)) => rejection,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn admit_rejection(r: Result<fusebox::Permit, Error>) -> Rejection {
    match r {
        Err(Error::Rejected(rejection)) => rejection,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// call / call_classified, the default breaker
// ---------------------------------------------------------------------------------------------

/// `Ok` is a success, `Err` a failure, a classifier's `Ignored` counts toward nothing (it
/// neither resets the run of failures nor extends it); the 5th consecutive failure opens the
/// breaker (default config) and then `call` refuses without running the closure.
async fn call_counts_outcomes_and_trips_after_five_failures(env: Env) {
    let (c, rec) = env.start(env.config()).await;
    let t = "model-a";

    succeed(&c, "chat", t).await;
    flush(&c).await;
    let s = snapshot(&c, t).await;
    assert_eq!(
        (s.window.calls, s.window.failures, s.consecutive_failures),
        (1, 0, 0),
        "Ok counts as a success"
    );

    for _ in 0..3 {
        fail(&c, "chat", t).await;
    }
    // The classifier decides: an Ok result it calls a failure (a 529 in a 200) is one.
    let r = c
        .call_classified(
            "chat",
            t,
            || async { Ok::<_, String>("overloaded") },
            |_| CallOutcome::Failure,
        )
        .await;
    assert_eq!(r.expect("admitted and ran"), "overloaded");
    flush(&c).await;
    let s = snapshot(&c, t).await;
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(
        (s.window.calls, s.window.failures, s.consecutive_failures),
        (5, 4, 4),
        "Err and classified failures count as failures"
    );

    // Ignored: the closure runs and its result is returned, but nothing is counted.
    let classified = AtomicUsize::new(0);
    let r = c
        .call_classified(
            "chat",
            t,
            || async { Err::<(), _>("400 bad request") },
            |r| {
                classified.fetch_add(1, Ordering::SeqCst);
                assert_eq!(r, &Err("400 bad request"), "the classifier sees the result");
                CallOutcome::Ignored
            },
        )
        .await;
    assert!(
        matches!(r, Err(CallError::Inner("400 bad request"))),
        "{r:?}"
    );
    assert_eq!(classified.load(Ordering::SeqCst), 1);
    flush(&c).await;
    let s = snapshot(&c, t).await;
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(
        (s.window.calls, s.window.failures, s.consecutive_failures),
        (5, 4, 4),
        "an Ignored outcome counts toward nothing"
    );

    // The fifth consecutive failure (the Ignored call between did not reset the run).
    fail(&c, "chat", t).await;
    flush(&c).await;
    let s = snapshot(&c, t).await;
    assert_eq!(s.state, CircuitState::Open, "{s:?}");

    let runs = AtomicUsize::new(0);
    let open_duration = BreakerConfig::default().open_duration;
    match rejection(counted_call(&c, "chat", t, &runs).await) {
        Rejection::CircuitOpen {
            target,
            state: CircuitState::Open,
            retry_after: Some(d),
        } => {
            assert_eq!(target, t);
            assert!(d <= open_duration, "retry_after {d:?} > {open_duration:?}");
            assert!(
                d > open_duration - Duration::from_secs(10),
                "retry_after {d:?}: the breaker just opened"
            );
        }
        other => panic!("expected CircuitOpen {{ Open, Some(_) }}, got {other:?}"),
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a refused call does not run"
    );
    // The other targets are not affected.
    succeed(&c, "chat", "model-b").await;
    assert_healthy(&c, &rec);
}

/// A call must name a configured feature; nothing runs otherwise.
async fn unknown_feature_is_an_error_and_runs_nothing(env: Env) {
    let (c, rec) = env.start(env.config()).await;
    let runs = AtomicUsize::new(0);
    match counted_call(&c, "chta", "m", &runs).await {
        Err(CallError::Fusebox(Error::UnknownFeature(name))) => assert_eq!(name, "chta"),
        other => panic!("expected UnknownFeature, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    match c.admit("chta", "m").await {
        Err(Error::UnknownFeature(name)) => assert_eq!(name, "chta"),
        other => panic!("expected UnknownFeature, got {other:?}"),
    }
    match c.in_flight("chta").await {
        Err(Error::UnknownFeature(name)) => assert_eq!(name, "chta"),
        other => panic!("expected UnknownFeature, got {other:?}"),
    }
    assert_healthy(&c, &rec);
}

/// A target without a `[targets.x]` table gets `[breaker]`; one with a table gets it.
async fn targets_use_breaker_defaults_unless_overridden(env: Env) {
    let mut config = env.config();
    config.breaker.consecutive_failures = Some(3);
    config.targets.insert(
        "fragile".into(),
        BreakerConfig {
            consecutive_failures: Some(2),
            ..BreakerConfig::default()
        }
        .into(),
    );
    let (c, rec) = env.start(config).await;

    for _ in 0..2 {
        fail(&c, "chat", "fragile").await;
        fail(&c, "chat", "unlisted").await;
    }
    flush(&c).await;
    assert_eq!(
        snapshot(&c, "fragile").await.state,
        CircuitState::Open,
        "[targets.fragile] consecutive_failures = 2"
    );
    assert_eq!(
        snapshot(&c, "unlisted").await.state,
        CircuitState::Closed,
        "[breaker] consecutive_failures = 3: two failures are not enough"
    );
    fail(&c, "chat", "unlisted").await;
    flush(&c).await;
    assert_eq!(snapshot(&c, "unlisted").await.state, CircuitState::Open);
    let reasons: Vec<_> = rec
        .transitions()
        .iter()
        .map(|t| (t.target.clone(), t.to, t.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (
                "fragile".to_owned(),
                CircuitState::Open,
                TransitionReason::ConsecutiveFailures
            ),
            (
                "unlisted".to_owned(),
                CircuitState::Open,
                TransitionReason::ConsecutiveFailures
            ),
        ]
    );
    assert_healthy(&c, &rec);
}

/// Target names are checked at run time: an `Error::Config` naming `target`, never a panic,
/// never a Redis key with a stray hash tag.
async fn invalid_target_names_are_config_errors(env: Env) {
    let (c, rec) = env.start(env.config()).await;
    let long = "x".repeat(201);
    for bad in [
        "a{b}",
        "{chat}",
        "has space",
        "",
        "tab\there",
        "é",
        long.as_str(),
    ] {
        let is_target_error =
            |r: &Error| matches!(r, Error::Config { field, .. } if field == "target");
        let runs = AtomicUsize::new(0);
        let r = counted_call(&c, "chat", bad, &runs).await;
        assert!(
            matches!(&r, Err(CallError::Fusebox(e)) if is_target_error(e)),
            "call {bad:?}: {r:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        let r = c.admit("chat", bad).await;
        assert!(
            r.as_ref().err().is_some_and(is_target_error),
            "admit {bad:?}: {r:?}"
        );
        let r = c.snapshot(bad).await;
        assert!(
            r.as_ref().err().is_some_and(is_target_error),
            "snapshot {bad:?}: {r:?}"
        );
        let r = c.force(bad, Force::Open).await;
        assert!(
            r.as_ref().err().is_some_and(is_target_error),
            "force {bad:?}: {r:?}"
        );
        let r = c.set_not_before(bad, Duration::from_secs(1)).await;
        assert!(
            r.as_ref().err().is_some_and(is_target_error),
            "set_not_before {bad:?}: {r:?}"
        );
    }
    if env.is_redis() {
        let keys = env.server().cli(&["KEYS", "*"]);
        assert!(
            !keys.contains("{a{b}") && !keys.contains("has space"),
            "no key was written for an invalid name: {keys}"
        );
    }
    // Names with every allowed punctuation work.
    succeed(&c, "chat", "anthropic/claude-sonnet-4.5:beta@eu_1").await;
    assert_healthy(&c, &rec);
}

on_both!(
    call_counts_outcomes_and_trips_after_five_failures,
    unknown_feature_is_an_error_and_runs_nothing,
    targets_use_breaker_defaults_unless_overridden,
    invalid_target_names_are_config_errors,
);

// ---------------------------------------------------------------------------------------------
// Configuration errors at build time
// ---------------------------------------------------------------------------------------------

async fn build_error(config: Config) -> (String, String) {
    match Coordinator::new(config).await {
        Err(Error::Config { field, reason }) => (field, reason),
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_build_naming_the_field() {
    bounded(async {
        let base = || {
            let mut c = Config::default();
            c.features.insert("x".into(), FeatureConfig::default());
            c
        };

        let mut c = base();
        c.features
            .insert("x".into(), feature(Some(0), Duration::ZERO));
        let (field, reason) = build_error(c).await;
        assert_eq!(field, "features.x.max_concurrent");
        assert!(reason.contains('0'), "{reason}");

        let mut c = base();
        c.redis = Some(RedisConfig {
            url: Some("http://127.0.0.1:6379".into()),
            ..RedisConfig::default()
        });
        assert_eq!(build_error(c).await.0, "redis.url");

        let mut c = base();
        c.redis = Some(RedisConfig::default());
        assert_eq!(build_error(c).await.0, "redis.url", "[redis] without a url");

        let mut c = base();
        c.redis = Some(RedisConfig {
            url: Some("redis://127.0.0.1:6379".into()),
            timeout: Duration::ZERO,
            ..RedisConfig::default()
        });
        assert_eq!(build_error(c).await.0, "redis.timeout");

        let mut c = base();
        c.features.insert(
            "x".into(),
            FeatureConfig {
                lease: Duration::from_millis(10),
                ..FeatureConfig::default()
            },
        );
        assert_eq!(build_error(c).await.0, "features.x.lease");

        let mut c = base();
        c.features.insert(
            "x".into(),
            FeatureConfig {
                rate: Some(RateConfig {
                    requests: 0,
                    per: Duration::from_secs(1),
                    burst: None,
                }),
                ..FeatureConfig::default()
            },
        );
        assert_eq!(build_error(c).await.0, "features.x.rate.requests");

        let mut c = base();
        c.targets.insert(
            "m".into(),
            BreakerConfig {
                failure_rate: Some(0.0),
                ..BreakerConfig::default()
            }
            .into(),
        );
        assert_eq!(build_error(c).await.0, "targets.m.breaker.failure_rate");

        let mut c = base();
        c.features.insert("a b".into(), FeatureConfig::default());
        assert_eq!(build_error(c).await.0, "features.a b");

        let mut c = base();
        c.namespace = "app{1}".into();
        assert_eq!(build_error(c).await.0, "namespace");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Bulkhead: max_wait, leases, keep-alive, dropped permits
// ---------------------------------------------------------------------------------------------

/// With max_concurrent = 1 and max_wait = 500 ms, a second caller waits and gets in as soon
/// as the first permit is recorded (on Redis: once the background flusher delivered the
/// release, which wakes the waiters).
async fn a_waiter_gets_in_as_soon_as_the_permit_is_released(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("one".into(), feature(Some(1), Duration::from_millis(500)));
    let (c, rec) = env.start(config).await;
    let first = c.admit("one", "m").await.expect("first admitted");

    let start = Instant::now();
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = Instant::now();
        first.success();
        at
    });
    let second = c.admit("one", "m").await.expect("the waiter gets in");
    let got_in = Instant::now();
    let released_at = releaser.await.expect("releaser task");
    // `>=`: on paused time the release and the admission happen at the same instant.
    assert!(
        got_in >= released_at,
        "the waiter got in before the release"
    );
    assert!(
        got_in - start < Duration::from_millis(400),
        "the waiter got in {:?} after it started waiting, {:?} after the release (max_wait 500 ms)",
        got_in - start,
        got_in - released_at
    );
    assert!(!second.is_local());
    assert_eq!(c.in_flight("one").await.expect("in_flight"), 1);
    drop(second);
    assert!(rec.rejections().is_empty(), "{:?}", rec.rejections());
    assert_healthy(&c, &rec);
}

/// A release wakes a waiter at once instead of leaving it to its polling backoff (a random
/// 1..100 ms between tries once it has waited a while): over eight rounds in which the waiter
/// has waited 250 ms before the release, at least six get in within 15 ms of it (measured:
/// under 1 ms in memory, under 7 ms on Redis with the whole suite running). Polling alone
/// passes this by chance well under 1 % of the time. On Redis the flusher's `settle_delay` is
/// set to its maximum, 100 ms: a release that someone on this replica waits for must not wait
/// for it.
async fn a_release_wakes_the_waiter_at_once(env: Env) {
    let mut config = env.config();
    if let Some(r) = config.redis.as_mut() {
        r.settle_delay = Duration::from_millis(100);
    }
    config
        .features
        .insert("one".into(), feature(Some(1), Duration::from_secs(3)));
    let (c, rec) = env.start(config).await;
    let mut delays = Vec::new();
    for _ in 0..8 {
        let first = c.admit("one", "m").await.expect("first admitted");
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let p = c.admit("one", "m").await;
                (Instant::now(), p)
            })
        };
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!waiter.is_finished(), "the waiter is still waiting");
        let released_at = Instant::now();
        first.success();
        let (got_in, second) = waiter.await.expect("waiter task");
        delays.push(got_in - released_at);
        // Released (dropped) before the next round takes the permit again.
        second.expect("the waiter gets in").success();
        flush(&c).await;
    }
    let quick = delays
        .iter()
        .filter(|d| **d < Duration::from_millis(15))
        .count();
    assert!(
        quick >= 6,
        "waiters got in {delays:?} after the release: not woken by it"
    );
    assert_healthy(&c, &rec);
}

/// With max_wait = 0 a full bulkhead refuses at once, with the limit and a retry hint (when
/// the held permit's lease ends); the refusal is observed.
async fn a_full_bulkhead_without_max_wait_refuses_at_once(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("one".into(), feature(Some(1), Duration::ZERO));
    let (c, rec) = env.start(config).await;
    let _held = c.admit("one", "m").await.expect("first admitted");

    let start = Instant::now();
    let r = c.admit("one", "m").await;
    let took = start.elapsed();
    let lease = FeatureConfig::default().lease;
    match admit_rejection(r) {
        Rejection::BulkheadFull {
            feature,
            limit: 1,
            retry_after: Some(d),
        } => {
            assert_eq!(feature, "one");
            assert!(d <= lease && d > lease - Duration::from_secs(5), "{d:?}");
        }
        other => panic!("expected BulkheadFull {{ limit: 1, .. }}, got {other:?}"),
    }
    assert!(took < Duration::from_millis(250), "refused after {took:?}");
    let rejections = rec.rejections();
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(
        (rejections[0].0.as_str(), rejections[0].1.as_str()),
        ("one", "m")
    );
    assert!(matches!(
        rejections[0].2,
        Rejection::BulkheadFull { limit: 1, .. }
    ));
    assert_healthy(&c, &rec);
}

/// A waiter that never gets a permit is refused when max_wait is up, not before, not much
/// after.
async fn max_wait_bounds_the_wait(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("one".into(), feature(Some(1), Duration::from_millis(300)));
    let (c, rec) = env.start(config).await;
    let _held = c.admit("one", "m").await.expect("first admitted");
    let start = Instant::now();
    let r = c.admit("one", "m").await;
    let took = start.elapsed();
    assert!(
        matches!(admit_rejection(r), Rejection::BulkheadFull { limit: 1, .. }),
        "refused as full"
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1000),
        "refused after {took:?} with max_wait 300 ms"
    );
    assert_eq!(rec.rejections().len(), 1, "one refusal, one event");
    assert_healthy(&c, &rec);
}

/// Dropping a permit without recording releases its bulkhead slot and counts no outcome: six
/// dropped calls (more than the 5 consecutive failures that trip) leave the window empty.
async fn a_dropped_permit_releases_and_counts_nothing(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("one".into(), feature(Some(1), Duration::ZERO));
    let (c, rec) = env.start(config).await;
    for i in 0..6 {
        let p = c
            .admit("one", "m")
            .await
            .unwrap_or_else(|e| panic!("admission {i}: the dropped permit was not released: {e}"));
        assert_eq!(c.in_flight("one").await.expect("in_flight"), 1);
        drop(p);
        flush(&c).await;
        assert_eq!(
            c.in_flight("one").await.expect("in_flight"),
            0,
            "a dropped permit is released"
        );
    }
    let s = snapshot(&c, "m").await;
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(s.window.calls, 0, "a dropped permit counts nothing: {s:?}");
    assert_eq!(s.consecutive_failures, 0);
    assert!(rec.transitions().is_empty());
    assert_healthy(&c, &rec);
}

/// With a 300 ms lease, a permit kept alive for 1 s is still held at 900 ms.
async fn keep_alive_holds_the_permit_past_its_lease(env: Env) {
    let mut config = env.config();
    config.features.insert(
        "stream".into(),
        FeatureConfig {
            max_concurrent: Some(1),
            lease: Duration::from_millis(300),
            ..FeatureConfig::default()
        },
    );
    let (c, rec) = env.start(config).await;
    let permit = c.admit("stream", "m").await.expect("admitted");
    let alive = permit.keep_alive();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        matches!(
            admit_rejection(c.admit("stream", "m").await),
            Rejection::BulkheadFull { limit: 1, .. }
        ),
        "the kept-alive permit is still held at 900 ms (lease 300 ms)"
    );
    assert_eq!(c.in_flight("stream").await.expect("in_flight"), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        permit.heartbeat().await.expect("heartbeat"),
        "the permit's lease is alive after 1 s"
    );
    drop(alive);
    permit.success();
    flush(&c).await;
    assert_eq!(c.in_flight("stream").await.expect("in_flight"), 0);
    let _next = c.admit("stream", "m").await.expect("free after record");
    assert_healthy(&c, &rec);
}

/// Without keep-alive the lease ends: another caller gets in, the holder learns it lost the
/// permit, and its late release does not free the new holder's slot.
async fn without_keep_alive_the_lease_ends(env: Env) {
    let mut config = env.config();
    config.features.insert(
        "stream".into(),
        FeatureConfig {
            max_concurrent: Some(1),
            lease: Duration::from_millis(300),
            ..FeatureConfig::default()
        },
    );
    let (c, rec) = env.start(config).await;
    let stale = c.admit("stream", "m").await.expect("admitted");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let fresh = c
        .admit("stream", "m")
        .await
        .expect("the lease ended: another caller gets in");
    assert!(
        !stale.heartbeat().await.expect("heartbeat"),
        "the stale holder learns its lease is lost"
    );
    stale.success();
    flush(&c).await;
    assert!(
        matches!(
            admit_rejection(c.admit("stream", "m").await),
            Rejection::BulkheadFull { limit: 1, .. }
        ),
        "the stale holder's release did not free the fresh holder's permit"
    );
    drop(fresh);
    assert_healthy(&c, &rec);
}

on_both!(
    a_waiter_gets_in_as_soon_as_the_permit_is_released,
    a_release_wakes_the_waiter_at_once,
    a_full_bulkhead_without_max_wait_refuses_at_once,
    max_wait_bounds_the_wait,
    a_dropped_permit_releases_and_counts_nothing,
    keep_alive_holds_the_permit_past_its_lease,
    without_keep_alive_the_lease_ends,
);

// ---------------------------------------------------------------------------------------------
// Leases that hold (issue 5, §2.3)
// ---------------------------------------------------------------------------------------------

/// A one-permit feature with the given lease.
fn leased(lease: Duration) -> FeatureConfig {
    FeatureConfig {
        max_concurrent: Some(1),
        lease,
        ..FeatureConfig::default()
    }
}

/// Regression (§2.3, "one failed heartbeat loses the lease"): the keep-alive used to beat
/// once at 0.8 x lease and take a failed beat for a live lease, so a 400 ms refusal (CLIENT
/// PAUSE) around that tick let the lease run out while the call still ran and another replica
/// took the permit: a limit of 1 held twice, and the holder learned nothing. Now it beats
/// every lease / 3 and retries a failed beat quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_around_the_heartbeat_tick_does_not_lose_the_lease() {
    bounded(async {
        let env = Env::redis();
        let lease = Duration::from_millis(1500);
        let mut config = env.config();
        config.features.insert("stream".into(), leased(lease));
        // The holder gives up on Redis after 100 ms (as in production, 50 ms by default).
        let mut holder_config = config.clone();
        if let Some(r) = holder_config.redis.as_mut() {
            r.timeout = Duration::from_millis(100);
        }
        let (holder, holder_rec) = env.start(holder_config).await;
        let (other, _) = env.start(config).await;

        let permit = holder.admit("stream", "m").await.expect("admitted");
        let alive = permit.keep_alive();
        // The old single tick fell at 1.2 s; pause Redis from 1.0 s to 1.4 s around it.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        env.server().cli(&["CLIENT", "PAUSE", "400", "ALL"]);
        tokio::time::sleep(Duration::from_millis(600)).await;
        // 1.6 s: past the admission's own lease. The other replica keeps trying until 3.5 s.
        let mut taken = 0;
        let mut refused = 0;
        for _ in 0..19 {
            match other.admit("stream", "m").await {
                Ok(p) => {
                    taken += 1;
                    drop(p);
                }
                Err(_) => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            taken, 0,
            "the permit was taken by another replica while its holder ran ({refused} refused)"
        );
        assert!(
            !permit.lease_lost() && !alive.is_lost(),
            "the holder kept its lease"
        );
        assert!(
            !holder_rec
                .events()
                .iter()
                .any(|e| matches!(e, Event::LeaseLost { .. })),
            "no lease_lost event"
        );
        drop(alive);
        permit.success();
    })
    .await;
}

/// Regression (§2.3): a lease that does run out (Redis stopped for longer than the lease) is
/// no longer silent: the holder sees it on the permit and on the keep-alive handle, and an
/// `Event::LeaseLost` is observed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_seen_by_the_holder_and_observed() {
    bounded(async {
        let env = Env::redis();
        let mut config = env.config();
        config
            .features
            .insert("stream".into(), leased(Duration::from_millis(600)));
        if let Some(r) = config.redis.as_mut() {
            r.timeout = Duration::from_millis(100);
        }
        let (c, rec) = env.start(config).await;
        let permit = c.admit("stream", "m").await.expect("admitted");
        let alive = permit.keep_alive();
        env.server().pause();
        let mut waited = Duration::ZERO;
        while !permit.lease_lost() && waited < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
        env.server().resume();
        assert!(permit.lease_lost(), "the permit says its lease was lost");
        assert!(alive.is_lost(), "the keep-alive handle says so too");
        let lost: Vec<_> = rec
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::LeaseLost { .. }))
            .collect();
        assert_eq!(lost.len(), 1, "one lease_lost event: {lost:?}");
        assert!(
            matches!(&lost[0], Event::LeaseLost { feature, target } if feature == "stream" && target == "m")
        );
    })
    .await;
}

/// Regression (§2.3): `Coordinator::call` kept no lease alive, so a call longer than the
/// lease silently lost its permit and a second call of a limit-1 feature ran beside it.
async fn a_long_call_keeps_its_permit(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("stream".into(), leased(Duration::from_millis(300)));
    let (c, rec) = env.start(config).await;
    let other = env
        .peer(&c, env.config_with_stream(Duration::from_millis(300)))
        .await;
    let running = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let long = {
        let c = c.clone();
        tokio::spawn(async move {
            c.call("stream", "m", || async move {
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok::<_, String>(())
            })
            .await
        })
    };
    started_rx.await.expect("the long call started");
    // Three leases and more: every attempt of the other replica must be refused.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(p) = other.admit("stream", "m").await {
            running.fetch_add(1, Ordering::SeqCst);
            drop(p);
        }
    }
    let _ = finish_tx.send(());
    let result = long.await.expect("the call's task");
    assert!(matches!(result, Ok(())), "the long call ran: {result:?}");
    assert_eq!(
        running.load(Ordering::SeqCst),
        0,
        "another call got the permit of a call still running"
    );
    flush(&c).await;
    let _next = c.admit("stream", "m").await.expect("free after the call");
    assert_healthy(&c, &rec);
}

on_both!(a_long_call_keeps_its_permit);

// ---------------------------------------------------------------------------------------------
// Local mode reconciled with Redis (issue 5, §2.4)
// ---------------------------------------------------------------------------------------------

/// A Redis configuration that goes local quickly: 100 ms per operation, local after one
/// failure, one probe per second.
fn quick_local(env: &Env) -> Config {
    let mut config = env.config();
    if let Some(r) = config.redis.as_mut() {
        r.timeout = Duration::from_millis(100);
        r.failure_threshold = 1;
        r.retry_interval = Duration::from_secs(1);
    }
    config.features.insert(
        "two".into(),
        FeatureConfig {
            max_concurrent: Some(2),
            lease: Duration::from_secs(30),
            ..FeatureConfig::default()
        },
    );
    config
}

/// [`quick_local`] with feature `one` as well: a limit of 1, a 30 s lease.
fn quick_local_with_one(env: &Env) -> Config {
    let mut config = quick_local(env);
    config.features.insert(
        "one".into(),
        FeatureConfig {
            max_concurrent: Some(1),
            lease: Duration::from_secs(30),
            ..FeatureConfig::default()
        },
    );
    config
}

/// Warms `a` up on Redis, then pauses Redis (SIGSTOP; the caller resumes it) and takes a
/// permit of feature `one`, which `a` grants on local state.
async fn stall_and_admit_locally(env: &Env, a: &Coordinator) -> fusebox::Permit {
    a.admit("two", "warm").await.expect("warm up").success();
    flush(a).await;
    env.server().pause();
    let held = a.admit("one", "m").await.expect("admitted locally");
    assert!(held.is_local());
    held
}

/// Regression (§2.4): going local ignored this replica's shared permits still running, so
/// with a limit of 2 held in Redis, a SIGSTOP let 2 more in locally: 4 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_counts_the_shared_permits_still_running() {
    bounded(async {
        let env = Env::redis();
        let (c, _) = env.start(quick_local(&env)).await;
        let held: Vec<_> = vec![
            c.admit("two", "m").await.expect("first"),
            c.admit("two", "m").await.expect("second"),
        ];
        assert!(held.iter().all(|p| !p.is_local()));
        env.server().pause();
        let mut admitted = 0;
        for _ in 0..4 {
            if c.admit("two", "m").await.is_ok() {
                admitted += 1;
            }
        }
        let degraded = c.is_degraded();
        env.server().resume();
        assert!(degraded, "the replica went local");
        assert_eq!(
            admitted, 0,
            "2 shared permits still run: the local share (2) has no room"
        );
        drop(held);
    })
    .await;
}

/// Regression (§2.4): after recovery Redis did not count the permits granted locally and
/// still running, so the same replica (and every other) admitted the full limit again: 4 in
/// flight with a limit of 2. Now the first operation on Redis after local permits were
/// granted registers them there first, and their release goes there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_recovery_redis_counts_the_local_permits_still_running() {
    bounded(async {
        let env = Env::redis();
        let (a, _) = env.start(quick_local(&env)).await;
        env.server().pause();
        let local: Vec<_> = vec![
            a.admit("two", "m").await.expect("first, local"),
            a.admit("two", "m").await.expect("second, local"),
        ];
        assert!(local.iter().all(|p| p.is_local()));
        env.server().resume();
        // Keep calling until the replica is back on Redis (one probe per second).
        let mut admitted = 0;
        let started = Instant::now();
        while a.is_degraded() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "never recovered"
            );
            if a.admit("two", "m").await.is_ok() {
                admitted += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..3 {
            if a.admit("two", "m").await.is_ok() {
                admitted += 1;
            }
        }
        let (b, _) = env.start(quick_local(&env)).await;
        for _ in 0..3 {
            if b.admit("two", "m").await.is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(
            admitted, 0,
            "the 2 local permits still run: nobody may take more of a limit of 2"
        );
        // Their release frees the shared slots.
        drop(local);
        flush(&a).await;
        let again = (b.admit("two", "m").await, b.admit("two", "m").await);
        assert!(
            again.0.is_ok() && again.1.is_ok(),
            "released local permits free their shared slots"
        );
    })
    .await;
}

/// Regression (found by an adversarial run): a permit granted locally during a short stall
/// reused the call id of the admission that had timed out. Once Redis answered, that
/// admission's take-back (retried until delivered) removed the id from Redis again after the
/// local permit had been registered under it, so another replica was admitted beside the
/// running call (limit 1 held twice). The local grant now gets an id of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_granted_during_a_short_stall_stays_counted_after_it() {
    bounded(async {
        let env = Env::redis();
        let mut config = quick_local_with_one(&env);
        if let Some(r) = config.redis.as_mut() {
            r.retry_interval = Duration::from_millis(100);
        }
        let (a, _) = env.start(config.clone()).await;
        let (b, _) = env.start(config).await;
        let held = stall_and_admit_locally(&env, &a).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.server().resume();
        let mut both = Vec::new();
        for round in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Ok(p) = a.admit("two", "m").await {
                p.success();
            }
            if let Ok(p) = b.admit("one", "m").await {
                both.push((round, p.is_local()));
            }
        }
        assert!(
            both.is_empty(),
            "B was admitted while A's local permit of a limit of 1 still ran: {both:?}"
        );
        drop(held);
    })
    .await;
}

/// Keeps Redis busy for `ms` milliseconds with a script (nothing else runs meanwhile, and what
/// is sent to it queues up and runs afterwards), from a thread of its own.
fn busy_redis(url: String, ms: u64) -> std::thread::JoinHandle<()> {
    let started = std::sync::Arc::new(std::sync::Barrier::new(2));
    let seen = std::sync::Arc::clone(&started);
    let handle = std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("url");
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connect");
        seen.wait();
        let _: i64 = redis::cmd("EVAL")
            .arg(
                "local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] \
                 repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - t0 > tonumber(ARGV[1]) \
                 return 1",
            )
            .arg(0)
            .arg(ms * 1000)
            .query(&mut con)
            .expect("busy script");
    });
    started.wait();
    handle
}

/// Regression (found by an adversarial run: a 2 s SIGSTOP, then 11 of 12 requests refused
/// `bulkhead_full` for the lease): after an outage, registering this replica's local permits
/// in Redis timed out, but the registration still ran when Redis got to it. The replica then
/// forgot those permits were (maybe) registered, so when they ended no release was sent, and
/// the bulkhead stayed full for the whole lease. A registration that may have run is now
/// released like one that did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_permit_whose_registration_timed_out_is_released_in_redis() {
    bounded(async {
        let env = Env::redis();
        // Local after one 100 ms timeout; one probe of Redis per second.
        let config = quick_local_with_one(&env);
        let (a, _) = env.start(config.clone()).await;
        let held = stall_and_admit_locally(&env, &a).await;
        let down = Instant::now();
        env.server().resume();
        // Redis answers again but is busy from 0.9 s to 1.7 s after the replica went local.
        // The first probe (1 s after) starts by registering `held` (adopt.lua): it times out
        // after 100 ms, and the registration runs once the busy script is done.
        tokio::time::sleep_until(down + Duration::from_millis(900)).await;
        let busy = busy_redis(env.server().url(), 800);
        tokio::time::sleep_until(down + Duration::from_millis(1050)).await;
        let _ = a.admit("two", "m").await;
        assert!(a.is_degraded(), "the probe failed against the busy Redis");
        // The local call ends after that probe failed and before the next one (2 s after).
        tokio::time::sleep_until(down + Duration::from_millis(1400)).await;
        drop(held);
        tokio::task::spawn_blocking(move || busy.join().expect("busy thread"))
            .await
            .expect("join");
        // Back on Redis; the limit of 1 must be free again well before the 30 s lease.
        let started = Instant::now();
        loop {
            if let Ok(p) = a.admit("two", "m").await {
                p.success();
            }
            if !a.is_degraded() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (b, _) = env.start(config).await;
        let started = Instant::now();
        loop {
            flush(&a).await;
            match b.admit("one", "m").await {
                Ok(p) => {
                    p.success();
                    break;
                }
                Err(e) => assert!(
                    started.elapsed() < Duration::from_secs(8),
                    "the bulkhead of 1 is still full 8 s after Redis came back (lease 30 s): \
                     the ended local permit was never released there: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

/// Regression (found by an adversarial run: with one feature's permits key corrupted, another
/// feature's limit of 1 held twice across two proxies): after an outage, registering the
/// local permits of a feature whose permits key had the wrong type failed with WRONGTYPE,
/// and every later operation of the replica, on every feature, was decided on local state
/// for as long as such a permit ran. Now the rest goes on with Redis, and that feature's
/// permits are registered once Redis takes them (tried again a second after a refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_key_of_one_feature_keeps_no_other_feature_off_redis() {
    bounded(async {
        let env = Env::redis();
        let mut config = quick_local_with_one(&env);
        if let Some(r) = config.redis.as_mut() {
            r.retry_interval = Duration::from_millis(100);
        }
        let (a, _) = env.start(config).await;
        let held = stall_and_admit_locally(&env, &a).await;
        env.server().resume();
        let permits = fusebox::keys::feature_keys("coordinator-test", "one").permits;
        assert_eq!(env.server().cli(&["SET", &permits, "garbage"]), "OK");
        let started = Instant::now();
        while a.is_degraded() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never recovered"
            );
            if let Ok(p) = a.admit("two", "m").await {
                p.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..3 {
            let p = a.admit("two", "m").await.expect("admitted");
            assert!(
                !p.is_local(),
                "feature two's keys are fine: decided on Redis, while one's local permit runs"
            );
            p.success();
        }
        // Once the key is mended, the local permit still running is registered (tried again
        // a second after the refusal): the fleet counts it. Seen before: never retried, so a
        // limit of 1 ran 3 calls across two proxies (adversarial review).
        env.server().cli(&["DEL", &permits]);
        let started = Instant::now();
        loop {
            if let Ok(p) = a.admit("two", "m").await {
                p.success();
            }
            if env.server().cli(&["ZCARD", &permits]) == "1" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the running local permit was never registered after the key was mended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(held);
    })
    .await;
}

/// Regression (§2.4): local breakers started empty, so a replica that degraded during an
/// outage tried the dead target again although it was open fleet-wide. Now the local breaker
/// is seeded from what the shared store said: an open transition this replica made, or a
/// refusal it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_replica_keeps_an_open_breaker_open() {
    bounded(async {
        let env = Env::redis();
        let mut config = quick_local(&env);
        config.breaker = BreakerConfig {
            consecutive_failures: Some(2),
            open_duration: Duration::from_secs(60),
            ..BreakerConfig::default()
        };
        let (a, _) = env.start(config.clone()).await;
        let (b, _) = env.start(config).await;
        fail(&a, "chat", "dead").await;
        fail(&a, "chat", "dead").await;
        flush(&a).await;
        // B learns of it by a refusal; A made the transition.
        let refused = rejection(
            b.call("chat", "dead", || async { Ok::<(), String>(()) })
                .await,
        );
        assert!(
            matches!(refused, Rejection::CircuitOpen { .. }),
            "{refused:?}"
        );

        env.server().pause();
        let reached = Arc::new(AtomicUsize::new(0));
        for c in [&a, &b] {
            for _ in 0..5 {
                let _ = counted_call(c, "chat", "dead", &reached).await;
            }
        }
        let degraded = a.is_degraded() && b.is_degraded();
        env.server().resume();
        assert!(degraded, "both replicas went local");
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "no call reached the target that is open fleet-wide"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Rate limit
// ---------------------------------------------------------------------------------------------

fn rate_feature(max_wait: Duration) -> FeatureConfig {
    FeatureConfig {
        rate: Some(RateConfig {
            requests: 5,
            per: Duration::from_secs(1),
            burst: Some(5),
        }),
        max_wait,
        ..FeatureConfig::default()
    }
}

/// 5 per second, bursts of 5: five admitted at once, the sixth refused with the exact time
/// until the next slot (200 ms after the burst started).
async fn rate_limit_admits_the_burst_then_refuses_with_retry_after(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("rated".into(), rate_feature(Duration::ZERO));
    let (c, rec) = env.start(config).await;
    let start = Instant::now();
    for i in 0..5 {
        let p = c
            .admit("rated", "m")
            .await
            .unwrap_or_else(|e| panic!("call {i} of the burst: {e}"));
        p.success();
    }
    let r = c.admit("rated", "m").await;
    let elapsed = start.elapsed();
    match admit_rejection(r) {
        Rejection::RateLimited {
            feature,
            retry_after,
        } => {
            assert_eq!(feature, "rated");
            let emission = Duration::from_millis(200);
            assert!(retry_after <= emission, "retry_after {retry_after:?}");
            assert!(
                retry_after + elapsed + 5 * MS >= emission,
                "retry_after {retry_after:?}, {elapsed:?} after the burst started"
            );
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_healthy(&c, &rec);
}

/// With max_wait 500 ms the sixth call waits for the next slot (about 200 ms) and gets in.
async fn rate_limit_waits_within_max_wait(env: Env) {
    let mut config = env.config();
    config
        .features
        .insert("rated".into(), rate_feature(Duration::from_millis(500)));
    let (c, rec) = env.start(config).await;
    let start = Instant::now();
    for i in 0..5 {
        let p = c
            .admit("rated", "m")
            .await
            .unwrap_or_else(|e| panic!("call {i} of the burst: {e}"));
        assert!(
            start.elapsed() < Duration::from_millis(150),
            "no wait in the burst"
        );
        p.success();
    }
    let sixth = c
        .admit("rated", "m")
        .await
        .expect("the sixth waits and gets in");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_millis(450),
        "the sixth got in {waited:?} after the burst started (next slot at 200 ms)"
    );
    drop(sixth);
    assert!(rec.rejections().is_empty());
    assert_healthy(&c, &rec);
}

on_both!(
    rate_limit_admits_the_burst_then_refuses_with_retry_after,
    rate_limit_waits_within_max_wait,
);

// ---------------------------------------------------------------------------------------------
// Observer: transitions and rejections
// ---------------------------------------------------------------------------------------------

/// Closed -> Open (ConsecutiveFailures), Open -> HalfOpen (OpenElapsed, on the first admit
/// after open_duration), HalfOpen -> Closed (ProbesSucceeded): each observed exactly once,
/// in order, with generations counting up; refused calls are `Event::Rejected`.
async fn transitions_are_observed_once_each(env: Env) {
    let mut config = env.config();
    config.breaker.open_duration = Duration::from_millis(300);
    let (c, rec) = env.start(config).await;
    let t = "m";
    for _ in 0..5 {
        fail(&c, "chat", t).await;
    }
    flush(&c).await;
    let seen = rec.transitions();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].from, seen[0].to, seen[0].reason),
        (
            CircuitState::Closed,
            CircuitState::Open,
            TransitionReason::ConsecutiveFailures
        )
    );
    assert_eq!(seen[0].target, t);
    let opened_at = Instant::now();

    let runs = AtomicUsize::new(0);
    let refused = rejection(counted_call(&c, "chat", t, &runs).await);
    assert!(matches!(
        refused,
        Rejection::CircuitOpen {
            state: CircuitState::Open,
            ..
        }
    ));
    let rejections = rec.rejections();
    assert_eq!(
        rejections,
        vec![("chat".to_owned(), t.to_owned(), refused)],
        "the refusal is observed with its feature and target"
    );

    tokio::time::sleep(Duration::from_millis(350).saturating_sub(opened_at.elapsed())).await;
    assert_eq!(rec.transitions().len(), 1, "nothing happens without a call");
    let probe = c.admit("chat", t).await.expect("the probe is admitted");
    assert!(probe.is_probe());
    let seen = rec.transitions();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[1].from, seen[1].to, seen[1].reason),
        (
            CircuitState::Open,
            CircuitState::HalfOpen,
            TransitionReason::OpenElapsed
        ),
        "observed on the admit that made it"
    );
    assert_eq!(probe.generation(), seen[1].generation);

    probe.success();
    flush(&c).await;
    let seen = rec.transitions();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        (seen[2].from, seen[2].to, seen[2].reason),
        (
            CircuitState::HalfOpen,
            CircuitState::Closed,
            TransitionReason::ProbesSucceeded
        )
    );
    let generations: Vec<u64> = seen.iter().map(|t| t.generation).collect();
    assert_eq!(
        generations,
        vec![
            seen[0].generation,
            seen[0].generation + 1,
            seen[0].generation + 2
        ]
    );

    // Nothing is reported twice, later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    flush(&c).await;
    succeed(&c, "chat", t).await;
    flush(&c).await;
    assert_eq!(rec.transitions().len(), 3, "{:?}", rec.transitions());
    assert_eq!(rec.rejections().len(), 1);
    assert_eq!(snapshot(&c, t).await.state, CircuitState::Closed);
    assert_healthy(&c, &rec);
}

on_both!(transitions_are_observed_once_each);

/// On a shared Redis, each transition is observed by the replica whose call made it, and
/// only there.
async fn each_transition_is_observed_by_the_replica_that_made_it(env: Env) {
    let mut config = env.config();
    config.breaker.open_duration = Duration::from_millis(300);
    let (a, rec_a) = env.start(config.clone()).await;
    let (b, rec_b) = env.start(config).await;
    let t = "m";
    for _ in 0..5 {
        fail(&a, "chat", t).await;
    }
    flush(&a).await;
    let opened_at = Instant::now();
    assert_eq!(rec_a.transitions().len(), 1);
    let runs = AtomicUsize::new(0);
    assert!(matches!(
        rejection(counted_call(&b, "chat", t, &runs).await),
        Rejection::CircuitOpen {
            state: CircuitState::Open,
            ..
        }
    ));
    assert!(rec_b.transitions().is_empty(), "B made no transition");

    tokio::time::sleep(Duration::from_millis(350).saturating_sub(opened_at.elapsed())).await;
    let probe = b.admit("chat", t).await.expect("B's probe");
    assert!(probe.is_probe());
    // The one probe slot is taken fleet-wide: A is refused, half-open.
    assert!(matches!(
        rejection(counted_call(&a, "chat", t, &runs).await),
        Rejection::CircuitOpen {
            state: CircuitState::HalfOpen,
            ..
        }
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    probe.success();
    flush(&b).await;

    let by = |rec: &Recorder| -> Vec<(CircuitState, CircuitState)> {
        rec.transitions().iter().map(|t| (t.from, t.to)).collect()
    };
    assert_eq!(by(&rec_a), vec![(CircuitState::Closed, CircuitState::Open)]);
    assert_eq!(
        by(&rec_b),
        vec![
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed)
        ]
    );
    assert_eq!(snapshot(&a, t).await.state, CircuitState::Closed);
    assert_healthy(&a, &rec_a);
    assert_healthy(&b, &rec_b);
}

on_redis!(each_transition_is_observed_by_the_replica_that_made_it);

// ---------------------------------------------------------------------------------------------
// Operator commands, "not before", slow calls, flush
// ---------------------------------------------------------------------------------------------

/// `Force::Open` refuses every call (ForcedOpen, no retry hint) without running it;
/// `Force::Reset` restores normal operation. On Redis, coordinator B sees what A forced.
async fn force_open_refuses_until_reset(env: Env) {
    let config = env.config();
    let (a, rec_a) = env.start(config.clone()).await;
    let b = env.peer(&a, config.clone()).await;
    let t = "m";

    let tr = a
        .force_create(t, Force::Open)
        .await
        .expect("force")
        .expect("a transition");
    assert_eq!(
        (tr.from, tr.to, tr.reason),
        (
            CircuitState::Closed,
            CircuitState::ForcedOpen,
            TransitionReason::Operator
        )
    );
    assert_eq!(rec_a.transitions(), vec![tr]);
    assert_eq!(
        a.force(t, Force::Open).await.expect("force again"),
        None,
        "already forced open"
    );

    // A coordinator started after the command sees it too (it lives in the store).
    let late = env.peer(&a, config).await;
    for c in [&a, &b, &late] {
        assert_eq!(snapshot(c, t).await.state, CircuitState::ForcedOpen);
        let runs = AtomicUsize::new(0);
        assert_eq!(
            rejection(counted_call(c, "chat", t, &runs).await),
            Rejection::CircuitOpen {
                target: t.to_owned(),
                state: CircuitState::ForcedOpen,
                retry_after: None,
            }
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    let tr = a
        .force(t, Force::Reset)
        .await
        .expect("reset")
        .expect("a transition");
    assert_eq!(
        (tr.from, tr.to),
        (CircuitState::ForcedOpen, CircuitState::Closed)
    );
    for c in [&a, &b, &late] {
        succeed(c, "chat", t).await;
    }
    assert_healthy(&a, &rec_a);
}

/// `set_not_before(t, 300 ms)` on one coordinator holds back calls to `t` on another
/// (NotBefore, retry_after <= 300 ms) without counting them as failures; calls go through
/// once the instant passed.
async fn not_before_holds_back_the_fleet_and_is_not_a_failure(env: Env) {
    let config = env.config();
    let (a, rec_a) = env.start(config.clone()).await;
    let b = env.peer(&a, config).await;
    let t = "m";
    let pause = Duration::from_millis(300);
    let set_at = Instant::now();
    a.set_not_before(t, pause).await.expect("set_not_before");

    let runs = AtomicUsize::new(0);
    // More refusals than the 5 consecutive failures that would trip the breaker.
    for _ in 0..6 {
        match rejection(counted_call(&b, "chat", t, &runs).await) {
            Rejection::NotBefore {
                target,
                retry_after,
            } => {
                assert_eq!(target, t);
                assert!(retry_after <= pause, "{retry_after:?}");
                assert!(
                    retry_after + set_at.elapsed() + 5 * MS >= pause,
                    "{retry_after:?} is shorter than what is left"
                );
            }
            other => panic!("expected NotBefore, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Other targets are not held back.
    succeed(&b, "chat", "other").await;

    let s = snapshot(&b, t).await;
    assert_eq!(s.state, CircuitState::Closed);
    assert!(s.not_before_ms.is_some());
    assert_eq!((s.window.calls, s.consecutive_failures), (0, 0), "{s:?}");

    tokio::time::sleep((pause + Duration::from_millis(50)).saturating_sub(set_at.elapsed())).await;
    counted_call(&b, "chat", t, &runs)
        .await
        .expect("admitted and ran");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    flush(&b).await;
    let s = snapshot(&b, t).await;
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!((s.window.calls, s.window.failures), (1, 0), "{s:?}");
    assert!(rec_a.transitions().is_empty());
    assert_healthy(&a, &rec_a);
}

/// With slow_call_duration 20 ms, slow_call_rate 50 % and minimum_calls 4, successes that take
/// 30 ms open the breaker (SlowCallRate) once they are half of the window's calls.
async fn slow_calls_open_the_breaker(env: Env) {
    let mut config = env.config();
    config.breaker.slow_call_duration = Some(Duration::from_millis(20));
    config.breaker.slow_call_rate = 50.0;
    config.breaker.minimum_calls = 4;
    let (c, rec) = env.start(config).await;
    let t = "m";
    for _ in 0..4 {
        succeed(&c, "chat", t).await;
    }
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, String>(())
    };
    for i in 0..3 {
        c.call("chat", t, slow).await.expect("admitted and ran");
        flush(&c).await;
        let s = snapshot(&c, t).await;
        assert_eq!(
            s.state,
            CircuitState::Closed,
            "{} slow of {} calls is under 50 %",
            i + 1,
            i + 5
        );
        assert_eq!(s.window.slow, i + 1, "{s:?}");
    }
    c.call("chat", t, slow).await.expect("admitted and ran");
    flush(&c).await;
    assert_eq!(snapshot(&c, t).await.state, CircuitState::Open);
    let seen = rec.transitions();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].from, seen[0].to, seen[0].reason),
        (
            CircuitState::Closed,
            CircuitState::Open,
            TransitionReason::SlowCallRate
        )
    );
    assert_healthy(&c, &rec);
}

/// Outcomes recorded without waiting are in the store once `flush` returns.
async fn flush_delivers_queued_outcomes(env: Env) {
    let (c, rec) = env.start(env.config()).await;
    let mut permits = Vec::new();
    for _ in 0..5 {
        permits.push(c.admit("chat", "m").await.expect("admitted"));
    }
    for p in permits {
        p.failure();
    }
    let report = flush(&c).await;
    // Nothing rode along with an admission (all five were admitted first): the background
    // delivery sent all five. The embedded store has nothing to deliver.
    let expected = if env.is_redis() { 5 } else { 0 };
    assert_eq!(
        (report.delivered, report.dropped, report.is_complete()),
        (expected, 0, true),
        "{report:?}"
    );
    let s = snapshot(&c, "m").await;
    assert_eq!(s.state, CircuitState::Open, "{s:?}");
    assert_eq!(rec.transitions().len(), 1);
    assert_healthy(&c, &rec);
    // Counted since the previous flush: nothing new.
    assert_eq!(flush(&c).await.delivered, 0);
}

/// Regression (a misspelled target): `force` on a name that is neither configured nor known
/// succeeded and left a forced breaker that never expires and that no call uses. Now it is
/// refused (`Error::UnknownTarget`) and nothing changes; a configured target, a target with
/// state, and `force_create` still work.
async fn force_refuses_an_unknown_target(env: Env) {
    let mut config = env.config();
    config
        .targets
        .insert("listed".into(), fusebox::TargetConfig::default());
    let (c, rec) = env.start(config).await;

    let r = c.force("claude-sonet-4-6", Force::Open).await;
    assert!(
        matches!(&r, Err(Error::UnknownTarget(name)) if name == "claude-sonet-4-6"),
        "{r:?}"
    );
    assert!(
        r.as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("--create")),
        "says how to force it anyway: {r:?}"
    );
    assert!(rec.transitions().is_empty(), "nothing changed");
    if env.is_redis() {
        assert_eq!(env.server().cli(&["DBSIZE"]), "0", "no key written");
    }
    assert!(matches!(
        c.force("claude-sonet-4-6", Force::Reset).await,
        Err(Error::UnknownTarget(_))
    ));

    // Configured: no state needed.
    let tr = c.force("listed", Force::Open).await.expect("configured");
    assert_eq!(tr.map(|t| t.to), Some(CircuitState::ForcedOpen));
    // Known: a call left state.
    c.call("chat", "used", || async { Err::<(), _>("500") })
        .await
        .expect_err("fails");
    flush(&c).await;
    let tr = c.force("used", Force::Open).await.expect("known");
    assert_eq!(tr.map(|t| t.to), Some(CircuitState::ForcedOpen));
    // On purpose: force_create.
    let tr = c
        .force_create("not-called-yet", Force::Open)
        .await
        .expect("create");
    assert_eq!(tr.map(|t| t.to), Some(CircuitState::ForcedOpen));
    assert_eq!(
        snapshot(&c, "not-called-yet").await.state,
        CircuitState::ForcedOpen
    );
}

on_both!(
    force_open_refuses_until_reset,
    force_refuses_an_unknown_target,
    not_before_holds_back_the_fleet_and_is_not_a_failure,
    slow_calls_open_the_breaker,
    flush_delivers_queued_outcomes,
);

/// Dropping the last handle of a coordinator still delivers what it queued (the runtime
/// lives on): another replica sees the breaker open.
async fn dropping_the_coordinator_delivers_its_queue(env: Env) {
    let config = env.config();
    let (a, rec_a) = env.start(config.clone()).await;
    let (b, _) = env.start(config).await;
    for _ in 0..5 {
        fail(&a, "chat", "m").await;
    }
    assert_healthy(&a, &rec_a);
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if snapshot(&b, "m").await.state == CircuitState::Open {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped coordinator's outcomes never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rec_a.transitions().len(), 1, "reported by the flusher of A");
}

/// Two applications on one Redis with different namespaces share nothing — even when one
/// namespace, plus `:t`, would be a prefix of the other's keys. A namespace may not contain
/// `:` (it would end the namespace inside the key), so `app:t` + `m` can never share keys with
/// `app` + `t:m`.
async fn namespaces_keep_applications_apart(env: Env) {
    let mut clashing = env.config();
    clashing.namespace = "app:t".into();
    match Coordinator::new(clashing).await {
        Err(Error::Config { field, .. }) => assert_eq!(field, "namespace"),
        other => panic!("a namespace with ':' must be refused, got {other:?}"),
    }

    let mut one = env.config();
    one.namespace = "app".into();
    let mut two = env.config();
    two.namespace = "app-t".into();
    let (a, _) = env.start(one).await;
    let (b, _) = env.start(two).await;

    a.force_create("t:m", Force::Open).await.expect("force");
    a.force_create("m", Force::Open).await.expect("force");
    assert_eq!(snapshot(&a, "t:m").await.state, CircuitState::ForcedOpen);
    for target in ["m", "t:m"] {
        let s = snapshot(&b, target).await;
        assert_eq!(
            s.state,
            CircuitState::Closed,
            "namespace \"app-t\" sees namespace \"app\"'s breaker {target}: {:?}",
            env.server().cli(&["KEYS", "*"])
        );
    }
}

/// `EVALSHA` calls the server has answered so far.
fn script_calls(server: &RedisServer) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// With `settle_delay`, a lone caller's outcomes and releases are sent together: twenty calls
/// one after the other (each admission is one script call) settle in a few script calls (a
/// batch of 16 goes at once), not twenty; `flush` delivers them without waiting out the delay, and every permit is back.
async fn a_lone_callers_settles_are_sent_together(env: Env) {
    let mut config = env.config();
    if let Some(r) = config.redis.as_mut() {
        r.settle_delay = Duration::from_millis(100);
    }
    config
        .features
        .insert("pool".into(), feature(Some(50), Duration::ZERO));
    let (c, rec) = env.start(config).await;
    // Warm: scripts loaded, connection up, the first settle delivered.
    c.admit("pool", "m").await.expect("admitted").success();
    flush(&c).await;

    let before = script_calls(env.server());
    for _ in 0..20 {
        c.admit("pool", "m").await.expect("admitted").success();
    }
    let admitted = script_calls(env.server());
    flush(&c).await;
    let after = script_calls(env.server());
    assert!(
        admitted - before >= 20,
        "each of the 20 admissions is a script call: {} seen",
        admitted - before
    );
    let settles = after - before - 20;
    eprintln!(
        "20 lone calls: {} script calls by the last admission, {settles} of all were settles",
        admitted - before
    );
    // A batch goes as soon as it holds 16, the rest waits: two when the 20 calls take under
    // 100 ms (seen: 2); a stalled machine may split them further.
    assert!(
        (1..=4).contains(&settles),
        "{settles} script calls settled 20 calls made one after the other"
    );
    assert_eq!(c.in_flight("pool").await.expect("in_flight"), 0);
    assert_eq!(snapshot(&c, "m").await.window.calls, 21);
    assert_healthy(&c, &rec);
}

on_redis!(
    dropping_the_coordinator_delivers_its_queue,
    namespaces_keep_applications_apart,
    a_lone_callers_settles_are_sent_together,
);

// ---------------------------------------------------------------------------------------------
// Secrets: Debug and logs
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "secretpw";

/// A server with an ACL user `user` / [`SECRET`], and a URL carrying the credentials.
fn server_with_password() -> (RedisServer, String) {
    let server = RedisServer::start();
    assert_eq!(
        server.cli(&[
            "ACL",
            "SETUSER",
            "user",
            "on",
            &format!(">{SECRET}"),
            "~*",
            "&*",
            "+@all"
        ]),
        "OK"
    );
    let url = format!("redis://user:{SECRET}@127.0.0.1:{}/", server.port());
    (server, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_debug_does_not_show_the_redis_password() {
    bounded(async {
        let (_server, url) = server_with_password();
        let mut config = Env::memory().config();
        config.redis = Some(redis_config(&url));
        let recorder = Arc::new(Recorder::default());
        let c = Coordinator::builder(config)
            .observer(recorder.clone())
            .build()
            .await
            .expect("build");
        // The credentials work: the call is decided on Redis.
        let p = c.admit("chat", "m").await.expect("admitted");
        assert!(!p.is_local());
        p.success();
        flush(&c).await;
        assert_healthy(&c, &recorder);
        for shown in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains(SECRET), "Debug shows the password: {shown}");
        }
    })
    .await
}

/// `Config` (and `CoordinatorBuilder`, which shows it) print Redis URLs without their
/// password, single node and cluster seeds alike; the rest of the URL stays for debugging.
#[test]
fn config_and_builder_debug_do_not_show_the_redis_password() {
    let single = Config {
        redis: Some(redis_config(&format!(
            "redis://user:{SECRET}@127.0.0.1:6379/"
        ))),
        ..Config::default()
    };
    let cluster = Config {
        redis: Some(RedisConfig {
            cluster: vec![
                format!("redis://:{SECRET}@10.0.0.5:7000"),
                format!("rediss://user:{SECRET}@10.0.0.6:7000/"),
            ],
            ..RedisConfig::default()
        }),
        ..Config::default()
    };
    for config in [single, cluster] {
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(
                !shown.contains(SECRET),
                "Config's Debug shows the password: {shown}"
            );
            assert!(shown.contains("127.0.0.1:6379") || shown.contains("10.0.0.6:7000"));
        }
        let builder = Coordinator::builder(config);
        let shown = format!("{builder:?}");
        assert!(
            !shown.contains(SECRET),
            "CoordinatorBuilder's Debug shows the Redis password: {shown}"
        );
    }
}

/// `flush(timeout)` waits at most `timeout`, even when the settle queue is full and the store
/// hangs (here: a SIGSTOPped Redis; each delivery attempt then takes the store timeout).
/// `flush` says what it could not deliver: with Redis gone, the queued settles are dropped
/// (and counted, as the `SettleDropped` events count them); with Redis stalled, the flush
/// times out and says so, and the next flush counts what arrived after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_reports_what_it_dropped_and_a_timeout() {
    bounded(async {
        let mut env = Env::redis();
        let (c, rec) = env.start(env.config()).await;
        let mut permits = Vec::new();
        for t in ["a", "b", "c"] {
            permits.push(c.admit("chat", t).await.expect("admitted"));
        }
        env.server.as_mut().expect("redis").kill();
        for p in permits {
            p.failure();
        }
        let report = c.flush(FLUSH).await;
        assert_eq!(
            (report.delivered, report.dropped, report.timed_out),
            (0, 3, false),
            "{report:?}"
        );
        assert!(!report.is_complete());
        assert_eq!(rec.settle_dropped_items(), 3, "{:?}", rec.log());

        let env = Env::redis();
        let (c, _rec) = env.start(env.config()).await;
        let p = c.admit("chat", "m").await.expect("admitted");
        env.server().pause();
        p.success();
        let report = c.flush(Duration::from_millis(200)).await;
        env.server().resume();
        assert!(report.timed_out, "{report:?}");
        assert!(!report.is_complete());
        let report = flush(&c).await;
        assert_eq!(report.delivered + report.dropped, 1, "{report:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_returns_within_its_timeout_when_the_queue_is_full() {
    bounded(async {
        let env = Env::redis();
        let mut config = env.config();
        if let Some(r) = config.redis.as_mut() {
            r.timeout = Duration::from_secs(1);
            r.settle_queue = 16;
            r.settle_batch = 1;
        }
        let (c, rec) = env.start(config).await;
        let mut permits = Vec::new();
        for _ in 0..17 {
            permits.push(c.admit("chat", "m").await.expect("admitted on Redis"));
        }
        assert_healthy(&c, &rec);
        env.server().pause();
        let mut permits = permits.into_iter();
        if let Some(p) = permits.next() {
            p.success();
        }
        // The flusher takes that one and waits for the stopped server; fill the queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for p in permits {
            p.success();
        }
        let start = Instant::now();
        c.flush(Duration::from_millis(50)).await;
        let took = start.elapsed();
        env.server().resume();
        assert!(
            took < Duration::from_millis(500),
            "flush(50 ms) took {took:?} (store timeout 1 s)"
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Tracing
// ---------------------------------------------------------------------------------------------

/// A `tracing` subscriber writing plain text into a buffer, for the current thread.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl LogBuffer {
    /// Installs it as this thread's default subscriber until the guard is dropped. The tests
    /// using it run on a current-thread runtime, so fusebox's background tasks log here too.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Lines whose fields include every `key=value` of `fields` (quotes ignored).
    fn lines_with(&self, fields: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| {
                let tokens: Vec<String> = line
                    .split_whitespace()
                    .map(|t| t.replace('"', ""))
                    .collect();
                fields.iter().all(|f| tokens.iter().any(|t| t == f))
            })
            .map(str::to_owned)
            .collect()
    }
}

/// A transition is logged under target `fusebox` with the stable fields `event=transition`,
/// `from=closed`, `to=open`, `reason`, `breaker.target`, exactly once.
async fn a_transition_is_traced_with_stable_fields(env: Env) {
    let logs = LogBuffer::default();
    let _guard = logs.install();
    let (c, rec) = env.start(env.config()).await;
    for _ in 0..5 {
        fail(&c, "chat", "m").await;
    }
    flush(&c).await;
    assert_eq!(rec.transitions().len(), 1);
    let lines = logs.lines_with(&[
        "event=transition",
        "from=closed",
        "to=open",
        "reason=consecutive_failures",
        "breaker.target=m",
    ]);
    assert_eq!(lines.len(), 1, "logs:\n{}", logs.text());
    assert!(lines[0].contains(" INFO "), "{}", lines[0]);
    assert!(lines[0].contains("fusebox"), "{}", lines[0]);

    let runs = AtomicUsize::new(0);
    rejection(counted_call(&c, "chat", "m", &runs).await);
    let lines = logs.lines_with(&["event=rejected", "kind=circuit_open", "feature=chat"]);
    assert_eq!(lines.len(), 1, "logs:\n{}", logs.text());
    assert_healthy(&c, &rec);
}

mod a_transition_is_traced_with_stable_fields {
    #[tokio::test(flavor = "current_thread")]
    async fn memory() {
        super::bounded(super::a_transition_is_traced_with_stable_fields(
            super::Env::memory(),
        ))
        .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn redis() {
        super::bounded(super::a_transition_is_traced_with_stable_fields(
            super::Env::redis(),
        ))
        .await
    }
}

/// A wrong Redis password makes the coordinator degrade and log why, without the password.
#[tokio::test(flavor = "current_thread")]
async fn store_errors_are_logged_without_the_password() {
    bounded(async {
        let (server, _) = server_with_password();
        let wrong = "wr0ngsecret";
        let url = format!("redis://user:{wrong}@127.0.0.1:{}/", server.port());
        let logs = LogBuffer::default();
        let _guard = logs.install();
        let mut config = Env::memory().config();
        config.redis = Some(redis_config(&url));
        let recorder = Arc::new(Recorder::default());
        let c = Coordinator::builder(config)
            .observer(recorder.clone())
            .build()
            .await
            .expect("build: connecting is lazy");
        let p = c
            .admit("chat", "m")
            .await
            .expect("fail_open: admitted locally");
        assert!(p.is_local(), "decided on local state");
        p.success();
        assert!(c.is_degraded());
        let degraded = logs.lines_with(&["event=store_degraded"]);
        assert_eq!(degraded.len(), 1, "logs:\n{}", logs.text());
        let all = logs.text();
        assert!(
            !all.contains(wrong),
            "a log line shows the password:\n{all}"
        );
        for e in recorder.events() {
            assert!(!format!("{e:?}").contains(wrong), "{e:?}");
        }
        assert!(!format!("{c:?}").contains(wrong));
    })
    .await
}

/// `keep_alive` on a permit that holds no bulkhead slot (the feature has no max_concurrent)
/// has nothing to extend: it must not report the lease as lost. Embedded store: paused time
/// (three leases pass in no real time).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn keep_alive_without_a_bulkhead_reports_no_lost_lease() {
    bounded(async {
        let logs = LogBuffer::default();
        let _guard = logs.install();
        let mut config = Env::memory().config();
        config.features.insert(
            "stream".into(),
            FeatureConfig {
                lease: Duration::from_millis(100),
                ..FeatureConfig::default()
            },
        );
        let c = Coordinator::new(config).await.expect("build");
        let permit = c.admit("stream", "m").await.expect("admitted");
        let alive = permit.keep_alive();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            permit.heartbeat().await.expect("heartbeat"),
            "heartbeat: nothing to lose"
        );
        let lost = logs.lines_with(&["event=lease_lost"]);
        assert!(
            lost.is_empty(),
            "keep_alive reported a lost lease for a permit without a bulkhead slot:\n{}",
            logs.text()
        );
        drop(alive);
        permit.success();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Starting without the shared store (issue 5, §3)
// ---------------------------------------------------------------------------------------------

/// A configuration for a Redis on `port` that goes local at the first failure.
fn unreachable_config(url: String) -> Config {
    let mut config = Env::memory().config();
    config.redis = Some(RedisConfig {
        url: Some(url),
        timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    });
    config
}

/// With `require_store`, a service does not start without Redis: `build` fails with the
/// cause (connection refused; a wrong password, at once, as authentication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_store_refuses_to_start_without_redis() {
    bounded(async {
        let mut server = RedisServer::start();
        let port = server.port();
        server.kill();
        let err = Coordinator::builder(unreachable_config(format!("redis://127.0.0.1:{port}/")))
            .require_store(true)
            .build()
            .await
            .expect_err("no Redis: no coordinator");
        assert!(
            matches!(&err, Error::Store(e) if e.is_unavailable()),
            "the store's error: {err}"
        );
        assert!(
            err.to_string().contains("refused"),
            "names the cause: {err}"
        );

        let (_server, url) = server_with_password();
        let wrong = url.replace(SECRET, "not-the-password");
        let started = Instant::now();
        let err = Coordinator::builder(unreachable_config(wrong))
            .require_store(true)
            .build()
            .await
            .expect_err("wrong password: no coordinator");
        let text = err.to_string().to_lowercase();
        assert!(
            text.contains("auth") || text.contains("password"),
            "names authentication: {err}"
        );
        assert!(!text.contains("not-the-password"), "no secret in: {err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        // With Redis up, it starts on shared state.
        let server = RedisServer::start();
        let c = Coordinator::builder(unreachable_config(server.url()))
            .require_store(true)
            .build()
            .await
            .expect("Redis answers: it starts");
        assert!(!c.is_degraded());
    })
    .await;
}

/// Without `require_store` a start without Redis succeeds, and says so: the coordinator is
/// degraded from the start and a `StoreDegraded` event was observed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_start_is_visible() {
    bounded(async {
        let mut server = RedisServer::start();
        let port = server.port();
        server.kill();
        let recorder = Arc::new(Recorder::default());
        let c = Coordinator::builder(unreachable_config(format!("redis://127.0.0.1:{port}/")))
            .observer(recorder.clone())
            .build()
            .await
            .expect("starts anyway");
        assert!(
            c.is_degraded(),
            "the returned coordinator says it is degraded"
        );
        assert!(
            recorder.degraded() > 0,
            "and a StoreDegraded event was observed"
        );
        let p = c.admit("chat", "m").await.expect("fail_open: local permit");
        assert!(p.is_local());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Time through one seam (issue 5, §5)
// ---------------------------------------------------------------------------------------------

/// Regression (§5): the wait loop mixed `std::time::Instant` with Tokio sleeps (and the
/// embedded store read the wall clock), so it could not run under `tokio::time::pause`. Now
/// the coordinator's deadlines, sleeps and the embedded store's clock are all Tokio's: a
/// 10 s rate wait and a 20 s bulkhead wait run in paused time, in no real time.
#[tokio::test(start_paused = true)]
async fn waits_run_under_paused_time() {
    let real = std::time::Instant::now();
    let mut config = Env::memory().config();
    config.features.insert(
        "slow".into(),
        FeatureConfig {
            rate: Some(RateConfig {
                requests: 1,
                per: Duration::from_secs(10),
                burst: Some(1),
            }),
            max_wait: Duration::from_secs(30),
            ..FeatureConfig::default()
        },
    );
    config.features.insert(
        "one".into(),
        FeatureConfig {
            max_concurrent: Some(1),
            max_wait: Duration::from_secs(60),
            ..FeatureConfig::default()
        },
    );
    let c = Coordinator::new(config).await.expect("valid");
    let t0 = tokio::time::Instant::now();
    c.admit("slow", "m").await.expect("the burst").success();
    c.admit("slow", "m")
        .await
        .expect("waits for the next slot")
        .success();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited <= Duration::from_secs(11),
        "waited {waited:?} of paused time for a 10 s slot"
    );

    let held = c.admit("one", "m").await.expect("the permit");
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.admit("one", "m").await.map(|p| p.success()) })
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    held.success();
    waiter
        .await
        .expect("the waiter's task")
        .expect("admitted when the permit came back");
    assert!(
        real.elapsed() < Duration::from_secs(5),
        "30 s of waits took {:?} of real time",
        real.elapsed()
    );
}

/// The live membership is an operator read: it comes from Redis or is an error, never this
/// replica's guess; without Redis the fleet is this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_is_read_from_redis_or_fails() {
    bounded(async {
        let embedded = Coordinator::new(Env::memory().config())
            .await
            .expect("valid");
        let members = embedded.replicas().await.expect("embedded: this process");
        assert_eq!(members.len(), 1);
        assert!(members[0].this);
        assert_eq!(embedded.fleet_size(), 1);

        let mut server = RedisServer::start();
        let port = server.port();
        server.kill();
        let down = Coordinator::new(unreachable_config(format!("redis://127.0.0.1:{port}/")))
            .await
            .expect("a degraded start");
        assert!(
            matches!(down.replicas().await, Err(Error::Store(_))),
            "Redis down: an error, not local state"
        );
    })
    .await;
}

/// Regression: the coordinator's background loops (here fleet membership) ran on whichever
/// runtime first needed them. In `fusebox serve` that is a serving thread's; a loop there ended
/// with that runtime, and the replica's membership entry expired although it still served.
/// They now run on the runtime the shared store connected from.
#[test]
fn background_loops_outlive_the_runtime_that_started_them() {
    let env = Env::redis();
    let home = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = env.config();
    if let Some(r) = config.redis.as_mut() {
        // Renewed every 100 ms; an entry lives 300 ms.
        r.retry_interval = Duration::from_millis(100);
    }
    let c = home
        .block_on(Coordinator::new(config))
        .expect("coordinator");
    // Another runtime (a serving thread's, say) makes the first admission, then ends.
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    other.block_on(async {
        c.admit("chat", "m").await.expect("admitted").success();
        // The membership loop has run at least once.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    drop(other);
    std::thread::sleep(Duration::from_secs(1));
    let members = home
        .block_on(async { tokio::time::timeout(FLUSH, c.replicas()).await })
        .expect("in time")
        .expect("read from Redis");
    assert!(
        members.iter().any(|m| m.this),
        "this replica's membership expired 1 s after the runtime that started its renewals \
         ended (entry lifetime 300 ms): {} listed",
        members.len()
    );
    drop(c);
    drop(home);
}
