//! The fallback chain and the request API under it (`Coordinator::guarded_call`,
//! `admit_request` / `admit_attempt`): fallback order, open breakers skipped without an
//! upstream call (and, while "open until" holds, without a Redis command), routing by error
//! class, stop-before-weaker, one feature permit per request across the chain, the canned
//! last resort. On the embedded store, a single Redis node and (for the split admission)
//! Redis Cluster. The upstream is a plain closure that records what it was asked.

mod support;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use fusebox::classify::{Class, Classification, Reason};
use fusebox::pipeline::{ChainTarget, NoRetry, Reply, Tier};
use fusebox::retry::Jitter;
use fusebox::{
    BreakerConfig, BudgetConfig, CallError, CallOutcome, CannedConfig, CircuitState, Config,
    Coordinator, Error, FeatureConfig, Force, RedisConfig, Rejection, RetryConfig, TargetConfig,
};
use support::cluster::RedisCluster;
use support::RedisServer;

const BUDGET: Duration = Duration::from_secs(60);

enum Env {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

impl Env {
    fn redis_config(&self) -> Option<RedisConfig> {
        let base = RedisConfig {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            ..RedisConfig::default()
        };
        match self {
            Env::Memory => None,
            Env::Redis(s) => Some(RedisConfig {
                url: Some(s.url()),
                ..base
            }),
            Env::Cluster(c) => Some(RedisConfig {
                cluster: c.urls(),
                ..base
            }),
        }
    }

    /// Feature `f` with `chain` (targets open after one failure, for a minute).
    fn config(&self, chain: &[&str]) -> Config {
        let mut config = Config {
            namespace: support::unique_name("chain"),
            redis: self.redis_config(),
            breaker: BreakerConfig {
                consecutive_failures: Some(1),
                open_duration: Duration::from_secs(60),
                ..BreakerConfig::default()
            },
            ..Config::default()
        };
        config.features.insert(
            "f".into(),
            FeatureConfig {
                chain: chain.iter().map(|s| (*s).to_owned()).collect(),
                ..FeatureConfig::default()
            },
        );
        config
    }

    async fn start(&self, config: Config) -> Coordinator {
        let c = Coordinator::new(config).await.expect("valid configuration");
        assert!(!c.is_degraded(), "the store answers");
        c
    }
}

async fn bounded(scenario: impl Future<Output = ()>) {
    tokio::time::timeout(BUDGET, scenario)
        .await
        .expect("the test ran past its time budget");
}

macro_rules! on_all {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::bounded(super::$name(super::Env::Memory)).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::bounded(super::$name(super::Env::Redis(super::RedisServer::start()))).await
            }
        }
    )*};
}

/// The upstream: what each target answers (by name), and the log of what was asked.
type Answers = Vec<(String, Result<&'static str, Class>)>;

#[derive(Clone, Default)]
struct Upstream {
    answers: Arc<Mutex<Answers>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn with(answers: &[(&str, Result<&'static str, Class>)]) -> Upstream {
        let u = Upstream::default();
        *u.answers.lock().expect("lock") =
            answers.iter().map(|(t, a)| ((*t).to_owned(), *a)).collect();
        u
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("lock").clone()
    }

    /// The closure a guarded call takes.
    fn call(
        &self,
    ) -> impl Fn(&ChainTarget, u32) -> std::future::Ready<Result<&'static str, Class>> + '_ {
        move |t: &ChainTarget, _n: u32| {
            self.asked.lock().expect("lock").push(t.name.clone());
            let answer = self
                .answers
                .lock()
                .expect("lock")
                .iter()
                .find(|(n, _)| *n == t.name)
                .map_or(Err(Class::Final), |(_, a)| *a);
            std::future::ready(answer)
        }
    }
}

fn classify(c: &Class) -> Class {
    *c
}

const OVERLOADED: Class = Class::Overloaded { retry_after: None };
const RETRYABLE: Class = Class::Retryable { retry_after: None };

async fn fallback_order(env: Env) {
    let c = env.start(env.config(&["a", "b", "c"])).await;
    let up = Upstream::with(&[
        ("a", Err(OVERLOADED)),
        ("b", Err(RETRYABLE)),
        ("c", Ok("C")),
    ]);
    let answer = c
        .guarded_call("f", up.call(), classify)
        .await
        .expect("c answers");
    assert_eq!(up.asked(), ["a", "b", "c"]);
    assert_eq!(answer.tier, Tier::Fallback);
    assert_eq!(answer.target.as_deref(), Some("c"));
    assert_eq!(answer.attempts, 3);
    assert!(answer.degraded);
    assert_eq!(answer.reply, Reply::Fresh("C"));
}

async fn the_primary_answers_first(env: Env) {
    let c = env.start(env.config(&["a", "b"])).await;
    let up = Upstream::with(&[("a", Ok("A")), ("b", Ok("B"))]);
    let answer = c.guarded_call("f", up.call(), classify).await.expect("a");
    assert_eq!(up.asked(), ["a"]);
    assert_eq!(
        (answer.tier, answer.degraded, answer.attempts),
        (Tier::Primary, false, 1)
    );
    assert_eq!(
        answer.model.as_deref(),
        Some("a"),
        "the model defaults to the name"
    );
}

async fn open_breakers_are_skipped_without_an_upstream_call(env: Env) {
    let c = env.start(env.config(&["a", "b"])).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Ok("B"))]);
    let first = c.guarded_call("f", up.call(), classify).await.expect("b");
    assert_eq!(first.target.as_deref(), Some("b"));
    // a's one failure opened it; this replica sees its own failure at the next admission.
    for _ in 0..5 {
        let answer = c.guarded_call("f", up.call(), classify).await.expect("b");
        assert_eq!(answer.target.as_deref(), Some("b"));
        assert_eq!(answer.attempts, 1, "a was not called");
    }
    assert_eq!(up.asked().iter().filter(|t| *t == "a").count(), 1);
    assert_eq!(
        c.snapshot("a").await.expect("snapshot").state,
        CircuitState::Open
    );
}

/// When every target's breaker refuses, the refusal returned is that of the target that
/// reopens first, so its retry-after is when some model may answer again. Before, it was the
/// last target's: with the primary half-opening in 2 s and the fallback in a minute, callers
/// were told to wait a minute.
async fn every_target_refused_says_when_the_first_reopens(env: Env) {
    let mut config = env.config(&["a", "b"]);
    config.targets.insert(
        "a".into(),
        TargetConfig {
            breaker: fusebox::BreakerOverrides {
                open_duration: Some(Duration::from_secs(2)),
                ..Default::default()
            },
            ..TargetConfig::default()
        },
    );
    let c = env.start(config).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Err(RETRYABLE))]);
    // One failure each opens both: a for 2 s, b for 60 s.
    let _ = c.guarded_call("f", up.call(), classify).await;
    let refused = c.guarded_call("f", up.call(), classify).await;
    match refused {
        Err(CallError::Rejected(Rejection::CircuitOpen {
            target,
            retry_after: Some(after),
            ..
        })) => {
            assert_eq!(target, "a", "the target that reopens first");
            assert!(after <= Duration::from_secs(2), "retry-after {after:?}");
        }
        other => panic!("every breaker open: {other:?}"),
    }
}

async fn a_final_error_ends_the_chain(env: Env) {
    let c = env.start(env.config(&["a", "b"])).await;
    let up = Upstream::with(&[("a", Err(Class::Final)), ("b", Ok("B"))]);
    let r = c.guarded_call("f", up.call(), classify).await;
    assert!(matches!(r, Err(CallError::Inner(Class::Final))), "{r:?}");
    assert_eq!(up.asked(), ["a"]);
    // Not the target's fault: a's breaker did not count it.
    assert_eq!(
        c.snapshot("a").await.expect("snapshot").state,
        CircuitState::Closed
    );
}

async fn a_request_too_large_goes_to_a_larger_context(env: Env) {
    let mut config = env.config(&["small", "also-small", "large"]);
    for (t, w) in [
        ("small", 100_000),
        ("also-small", 100_000),
        ("large", 1_000_000),
    ] {
        config.targets.insert(
            t.into(),
            TargetConfig {
                context_window: Some(w),
                ..TargetConfig::default()
            },
        );
    }
    let c = env.start(config).await;
    let up = Upstream::with(&[
        ("small", Err(Class::ContextTooLarge)),
        ("also-small", Ok("no")),
        ("large", Ok("L")),
    ]);
    let answer = c
        .guarded_call("f", up.call(), classify)
        .await
        .expect("large");
    assert_eq!(up.asked(), ["small", "large"]);
    assert_eq!(answer.target.as_deref(), Some("large"));
    assert_eq!(
        c.snapshot("small").await.expect("snapshot").state,
        CircuitState::Closed,
        "a request too large is not the target's fault"
    );
}

async fn stop_before_a_weaker_model(env: Env) {
    let mut config = env.config(&["strong", "weak"]);
    config.features.get_mut("f").expect("f").stop_before = Some("weak".into());
    let c = env.start(config).await;
    let up = Upstream::with(&[("strong", Err(OVERLOADED)), ("weak", Ok("W"))]);
    let r = c.guarded_call("f", up.call(), classify).await;
    assert!(matches!(r, Err(CallError::RetryLater { .. })), "{r:?}");
    assert_eq!(up.asked(), ["strong"]);
    // Once strong is open, the answer says when to come back.
    let r = c.guarded_call("f", up.call(), classify).await;
    match r {
        Err(CallError::RetryLater { retry_after }) => {
            assert!(
                retry_after.is_some_and(|d| d > Duration::from_secs(50)),
                "{retry_after:?}"
            )
        }
        other => panic!("expected RetryLater, got {other:?}"),
    }
    assert_eq!(up.asked(), ["strong"], "weak is never called");
}

async fn the_canned_answer_when_every_target_fails(env: Env) {
    let mut config = env.config(&["a", "b"]);
    config.features.get_mut("f").expect("f").canned = Some(CannedConfig {
        text: "Busy: try again in a minute".into(),
        retry_after: Some(Duration::from_secs(60)),
    });
    let c = env.start(config).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Err(OVERLOADED))]);
    // No retry: a retry of a would meet its open breaker, whose time left is a better hint.
    let answer = c
        .guarded_call_with("f", &NoRetry, up.call(), classify)
        .await
        .expect("canned");
    assert_eq!(answer.tier, Tier::Canned);
    assert!(answer.degraded);
    assert_eq!(answer.attempts, 2);
    assert!(answer.target.is_none());
    match &answer.reply {
        Reply::Canned { text, retry_after } => {
            assert_eq!(text, "Busy: try again in a minute");
            assert_eq!(*retry_after, Some(Duration::from_secs(60)));
        }
        other => panic!("expected the canned answer, got {other:?}"),
    }
    // Both open now: canned again, with no upstream call, and the open time as guidance.
    let answer = c
        .guarded_call("f", up.call(), classify)
        .await
        .expect("canned");
    assert_eq!((answer.tier, answer.attempts), (Tier::Canned, 0));
    assert_eq!(up.asked(), ["a", "b"]);
}

/// A limit-1 feature with a chain of three failing targets: the request is admitted once
/// (every attempt runs under its one permit), and the next request once it has ended.
async fn one_permit_per_request_across_the_chain(env: Env) {
    let mut config = env.config(&["a", "b", "c"]);
    config.features.get_mut("f").expect("f").max_concurrent = Some(1);
    let c = env.start(config).await;
    let held = Arc::new(Mutex::new(Vec::new()));
    let call = |t: &ChainTarget, _n: u32| {
        let c = c.clone();
        let held = Arc::clone(&held);
        let name = t.name.clone();
        async move {
            let n = c.in_flight("f").await.expect("in flight");
            held.lock().expect("lock").push((name, n));
            // Another request of the feature meanwhile: refused, the permit is taken.
            let other = c.admit_request("f", "other").await;
            assert!(
                matches!(other, Err(Error::Rejected(Rejection::BulkheadFull { .. }))),
                "{other:?}"
            );
            Err::<(), Class>(RETRYABLE)
        }
    };
    let r = c.guarded_call("f", call, classify).await;
    assert!(matches!(r, Err(CallError::Inner(_))), "{r:?}");
    assert_eq!(
        *held.lock().expect("lock"),
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 1)
        ],
        "three attempts, one permit"
    );
    // Ended: the permit is back.
    let (req, attempt) = c
        .admit_request("f", "other")
        .await
        .expect("the next request");
    attempt.record(fusebox::CallOutcome::Success);
    req.finish();
}

/// A later attempt takes only its target's breaker: in half-open, its one probe slot, which
/// a dropped attempt frees and a recorded success closes.
async fn a_later_attempt_takes_a_probe_slot_in_half_open(env: Env) {
    let mut config = env.config(&["a"]);
    config.breaker.open_duration = Duration::from_millis(200);
    let c = env.start(config).await;
    let (req, first) = c.admit_request("f", "x").await.expect("request");
    first.record(fusebox::CallOutcome::Failure);
    let a = c.admit_attempt(&req, "a").await.expect("a is closed");
    assert!(!a.is_probe());
    a.record(fusebox::CallOutcome::Failure);
    let r = c.admit_attempt(&req, "a").await;
    assert!(
        matches!(r, Err(Error::Rejected(Rejection::CircuitOpen { .. }))),
        "a opened: {r:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = c
        .admit_attempt(&req, "a")
        .await
        .expect("half-open: a probe");
    assert!(probe.is_probe());
    let r = c.admit_attempt(&req, "a").await;
    assert!(
        matches!(
            r,
            Err(Error::Rejected(Rejection::CircuitOpen {
                state: CircuitState::HalfOpen,
                ..
            }))
        ),
        "the one probe slot is taken: {r:?}"
    );
    drop(probe);
    let probe = c
        .admit_attempt(&req, "a")
        .await
        .expect("the dropped probe freed its slot");
    assert!(probe.is_probe());
    probe.record(fusebox::CallOutcome::Success);
    let closed = c.admit_attempt(&req, "a").await.expect("closed again");
    assert!(!closed.is_probe());
    drop(closed);
    req.finish();
}

on_all!(
    a_later_attempt_takes_a_probe_slot_in_half_open,
    fallback_order,
    the_primary_answers_first,
    open_breakers_are_skipped_without_an_upstream_call,
    a_final_error_ends_the_chain,
    a_request_too_large_goes_to_a_larger_context,
    stop_before_a_weaker_model,
    the_canned_answer_when_every_target_fails,
    one_permit_per_request_across_the_chain,
    every_target_refused_says_when_the_first_reopens,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_permit_per_request_across_the_chain_on_cluster() {
    bounded(one_permit_per_request_across_the_chain(Env::Cluster(
        RedisCluster::start(3),
    )))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_attempt_takes_a_probe_slot_in_half_open_on_cluster() {
    bounded(a_later_attempt_takes_a_probe_slot_in_half_open(
        Env::Cluster(RedisCluster::start(3)),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_order_on_cluster() {
    bounded(fallback_order(Env::Cluster(RedisCluster::start(3)))).await
}

/// A retry-after on an overloaded answer sets the target's fleet-wide "not before": another
/// replica skips it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_retry_after_holds_the_target_for_the_fleet() {
    bounded(async {
        let env = Env::Redis(RedisServer::start());
        let config = env.config(&["a", "b"]);
        let one = env.start(config.clone()).await;
        let two = env.start(config).await;
        let up = Upstream::with(&[
            (
                "a",
                Err(Class::Overloaded {
                    retry_after: Some(Duration::from_secs(30)),
                }),
            ),
            ("b", Ok("B")),
        ]);
        // consecutive_failures = 1 would open a anyway: count the not-before alone.
        let _ = one.force("a", Force::Closed).await.expect("force");
        let answer = one.guarded_call("f", up.call(), classify).await.expect("b");
        assert_eq!(answer.target.as_deref(), Some("b"));
        // The not-before is set in the background: wait until the other replica sees it.
        let mut refused = None;
        for _ in 0..100 {
            match two.admit_request("f", "a").await {
                Err(Error::Rejected(r @ Rejection::NotBefore { .. })) => {
                    refused = Some(r);
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            refused.is_some(),
            "the other replica honours the retry-after"
        );
    })
    .await
}

/// How long `c` refuses target `t` of feature `f` with `NotBefore` (`None`: admitted),
/// waiting up to 2 s for a not-before set in the background to land.
async fn not_before_of(c: &Coordinator, t: &str, wait_for_it: bool) -> Option<Duration> {
    for _ in 0..100 {
        match c.admit_request("f", t).await {
            Err(Error::Rejected(r @ Rejection::NotBefore { .. })) => return r.retry_after(),
            Ok(_) if wait_for_it => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(_) => return None,
            Err(e) => panic!("{e}"),
        }
    }
    None
}

/// A hostile `retry-after` (the client clamps `1e12` to a day) does not shut the target for
/// the fleet for longer than the feature's `retry_after_cap`; and an operator's forced close
/// or reset clears the not-before (regression: a day, and `force closed` did not lift it).
async fn a_hostile_retry_after_is_capped_and_operators_can_lift_it(env: Env) {
    let mut config = env.config(&["a", "b"]);
    config.retry.retry_after_cap = Duration::from_secs(60);
    let c = env.start(config).await;
    let up = Upstream::with(&[
        (
            "a",
            Err(Class::Overloaded {
                retry_after: Some(Duration::from_secs(86_399)),
            }),
        ),
        ("b", Ok("B")),
    ]);
    // consecutive_failures = 1 would open a anyway: count the not-before alone.
    let _ = c.force("a", Force::Closed).await.expect("force");
    let answer = c.guarded_call("f", up.call(), classify).await.expect("b");
    assert_eq!(answer.target.as_deref(), Some("b"));
    let held = not_before_of(&c, "a", true).await.expect("a is held");
    assert!(held <= Duration::from_secs(60), "held for {held:?}");

    // Already forced closed: the command still lifts the not-before.
    let _ = c.force("a", Force::Closed).await.expect("force");
    assert_eq!(not_before_of(&c, "a", false).await, None, "forced closed");
    c.set_not_before("a", Duration::from_secs(30))
        .await
        .expect("not before");
    assert!(not_before_of(&c, "a", false).await.is_some());
    let _ = c.force("a", Force::Reset).await.expect("force");
    assert_eq!(not_before_of(&c, "a", false).await, None, "reset");
    // Reset of a closed breaker too.
    c.set_not_before("a", Duration::from_secs(30))
        .await
        .expect("not before");
    assert!(not_before_of(&c, "a", false).await.is_some());
    let _ = c.force("a", Force::Reset).await.expect("force");
    assert_eq!(
        not_before_of(&c, "a", false).await,
        None,
        "reset when closed"
    );
    // Forced open and disable keep it.
    c.set_not_before("a", Duration::from_secs(30))
        .await
        .expect("not before");
    let _ = c.force("a", Force::Open).await.expect("force");
    let _ = c.force("a", Force::Disable).await.expect("force");
    let snap = c.snapshot("a").await.expect("snapshot");
    assert!(snap.not_before_ms.is_some(), "disable keeps it: {snap:?}");
}

on_all!(a_hostile_retry_after_is_capped_and_operators_can_lift_it);

/// Lines MONITOR shows from now on.
struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    async fn start(port: u16) -> Monitor {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(b"MONITOR\r\n").await.expect("MONITOR");
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).await.expect("+OK");
        assert!(ok.starts_with("+OK"), "{ok}");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let task = tokio::spawn(async move {
            let mut line = String::new();
            while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                sink.lock().expect("lock").push(std::mem::take(&mut line));
            }
        });
        Monitor { lines, task }
    }

    fn mentioning(&self, what: &str) -> Vec<String> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains(what))
            .cloned()
            .collect()
    }

    fn count(&self) -> usize {
        self.lines.lock().expect("lock").len()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Once Redis said "open", this replica refuses the target without a Redis command while the
/// skip holds (MONITOR sees nothing about it), and an operator's forced close is seen within
/// about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_target_is_skipped_without_a_redis_command() {
    bounded(async {
        let server = RedisServer::start();
        let port = server.port();
        let env = Env::Redis(server);
        let config = env.config(&["skipme", "b"]);
        let c = env.start(config).await;
        let up = Upstream::with(&[("skipme", Err(RETRYABLE)), ("b", Ok("B"))]);
        c.guarded_call("f", up.call(), classify).await.expect("b");
        // The next call learns "open until T" from Redis (riding the failure)...
        let answer = c.guarded_call("f", up.call(), classify).await.expect("b");
        assert_eq!(answer.attempts, 1);
        c.flush(Duration::from_secs(5)).await;
        // ... and from then on asks Redis nothing about it.
        let monitor = Monitor::start(port).await;
        let start = std::time::Instant::now();
        for _ in 0..10 {
            let answer = c.guarded_call("f", up.call(), classify).await.expect("b");
            assert_eq!(answer.target.as_deref(), Some("b"));
        }
        // The skip is bounded to about a second: a loaded machine that took longer than that
        // for the loop may ask once per second that passed.
        let allowed = start.elapsed().as_secs() as usize;
        c.flush(Duration::from_secs(5)).await;
        let seen = monitor.mentioning("skipme");
        assert!(
            monitor.count() > 0,
            "MONITOR sees the calls' other commands"
        );
        assert!(
            seen.len() <= allowed,
            "Redis was asked about the open target: {seen:?}"
        );
        assert_eq!(up.asked().iter().filter(|t| *t == "skipme").count(), 1);
        drop(monitor);

        // An operator closes it: seen within about a second (the skip's bound).
        c.force("skipme", Force::Closed).await.expect("force");
        let up = Upstream::with(&[("skipme", Ok("S")), ("b", Ok("B"))]);
        let mut answered_by = None;
        for _ in 0..40 {
            let answer = c
                .guarded_call("f", up.call(), classify)
                .await
                .expect("answer");
            if answer.target.as_deref() == Some("skipme") {
                answered_by = answer.target;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            answered_by.as_deref(),
            Some("skipme"),
            "the forced close was seen"
        );
    })
    .await
}

/// The same chain as a tower service: the wrapped service gets one routed request per attempt.
#[cfg(feature = "tower")]
mod tower {
    use super::*;
    use fusebox::pipeline::{GuardedLayer, Routed};
    use std::task::{Context, Poll};
    use tower_layer::Layer;
    use tower_service::Service;

    #[derive(Clone, Default)]
    struct Attempts(Arc<Mutex<Vec<(String, String, u32)>>>);

    impl Service<Routed<&'static str>> for Attempts {
        type Response = String;
        type Error = Class;
        type Future = std::future::Ready<Result<String, Class>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Class>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, r: Routed<&'static str>) -> Self::Future {
            self.0.lock().expect("lock").push((
                r.target.name.clone(),
                r.target.model.clone(),
                r.attempt,
            ));
            std::future::ready(if r.target.name == "a" {
                Err(OVERLOADED)
            } else {
                Ok(format!("{} answered {}", r.target.model, r.request))
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tower_service_runs_the_chain() {
        let env = Env::Memory;
        let mut config = env.config(&["a", "b"]);
        config.targets.insert(
            "b".into(),
            TargetConfig {
                model: Some("claude-haiku".into()),
                ..TargetConfig::default()
            },
        );
        let c = env.start(config).await;
        let upstream = Attempts::default();
        let mut svc = GuardedLayer::new(c, "f", |e: &Class| *e).layer(upstream.clone());
        std::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .expect("ready");
        let answered = svc.call("hello").await.expect("b answers");
        assert_eq!(answered.tier, Tier::Fallback);
        assert_eq!(answered.model.as_deref(), Some("claude-haiku"));
        assert_eq!(
            answered.into_fresh().as_deref(),
            Some("claude-haiku answered hello")
        );
        assert_eq!(
            *upstream.0.lock().expect("lock"),
            [
                ("a".to_owned(), "a".to_owned(), 1),
                ("b".to_owned(), "claude-haiku".to_owned(), 2)
            ]
        );
    }
}

/// With the cache in use, a fresh answer is stored (in the background) and served, marked
/// degraded, when every target of the chain fails; not after a final error.
async fn the_cache_answers_when_every_target_fails(env: Env) {
    use fusebox::cache::{Answer, Caller};
    use fusebox::pipeline::CacheUse;
    use serde_json::json;

    let mut config = env.config(&["a"]);
    config.cache.enabled = true;
    config.breaker.consecutive_failures = Some(100); // keep a closed: every call reaches it
    let c = env.start(config).await;
    let question = |text: &str| {
        json!({"model": "x", "max_tokens": 100,
               "messages": [{"role": "user", "content": text}]})
    };
    let q = question("What is the capital of France?");
    let to_answer = |text: &String, t: &ChainTarget| {
        Answer::success(
            200,
            t.model.clone(),
            json!({"type": "message", "content": [{"type": "text", "text": text}]}),
        )
        .ok()
    };
    let caller = Caller {
        api_key: Some("sk-test-tenant-a"),
        tenant_id: None,
    };
    let use_cache = |request| CacheUse {
        caller,
        request,
        answer: &to_answer,
    };
    let ok = |_: &ChainTarget, _: u32| std::future::ready(Ok::<String, Class>("Paris".into()));
    let fresh = c
        .guarded_call_cached("f", &NoRetry, Some(use_cache(&q)), ok, classify)
        .await
        .expect("a answers");
    assert_eq!(fresh.tier, Tier::Primary);
    // The write is in the background: wait until it landed.
    let mut stored = false;
    for _ in 0..200 {
        if c.cache_get("f", caller, &q).await.expect("f").is_some() {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stored, "the fresh answer was stored");

    let failing = |_: &ChainTarget, _: u32| std::future::ready(Err::<String, Class>(RETRYABLE));
    let variant = question("what is the capital of france");
    let served = c
        .guarded_call_cached("f", &NoRetry, Some(use_cache(&variant)), failing, classify)
        .await
        .expect("the cache answers");
    assert_eq!(
        (served.tier, served.degraded, served.attempts),
        (Tier::Cache, true, 1)
    );
    assert_eq!(served.model.as_deref(), Some("a"));
    match &served.reply {
        Reply::Cached(hit) => assert_eq!(hit.body["content"][0]["text"], "Paris"),
        other => panic!("expected a cached answer, got {other:?}"),
    }

    let final_error =
        |_: &ChainTarget, _: u32| std::future::ready(Err::<String, Class>(Class::Final));
    let r = c
        .guarded_call_cached("f", &NoRetry, Some(use_cache(&q)), final_error, classify)
        .await;
    assert!(matches!(r, Err(CallError::Inner(Class::Final))), "{r:?}");
}

on_all!(the_cache_answers_when_every_target_fails);

/// An attempt that does not answer within its target's `timeout` is a breaker failure and the
/// chain moves on; the overall `deadline` bounds the whole call (paused time: no real wait).
#[tokio::test(start_paused = true)]
async fn attempt_timeouts_move_on_and_the_deadline_bounds_the_call() {
    let env = Env::Memory;
    let mut config = env.config(&["hangs", "b"]);
    config.targets.insert(
        "hangs".into(),
        TargetConfig {
            timeout: Some(Duration::from_secs(15)),
            ..TargetConfig::default()
        },
    );
    config.retry.max_attempts = 1;
    let c = env.start(config.clone()).await;
    let started = tokio::time::Instant::now();
    let call = |t: &ChainTarget, _: u32| {
        let hang = t.name == "hangs";
        async move {
            if hang {
                std::future::pending::<()>().await;
            }
            Ok::<_, Class>("B")
        }
    };
    let answer = c
        .guarded_call("f", call, classify)
        .await
        .expect("b answers");
    assert_eq!((answer.target.as_deref(), answer.attempts), (Some("b"), 2));
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(15),
        "one attempt timeout"
    );
    assert_eq!(
        c.snapshot("hangs").await.expect("snapshot").state,
        CircuitState::Open,
        "the timeout counted as a failure"
    );

    // Both hang, deadline 20 s: after a's 15 s, b's 15 s attempt could not finish before
    // the deadline, so it is never started and the call ends.
    config.features.get_mut("f").expect("f").deadline = Some(Duration::from_secs(20));
    let c = env.start(config).await;
    let started = tokio::time::Instant::now();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let hang_all = |t: &ChainTarget, _: u32| {
        asked.lock().expect("lock").push(t.name.clone());
        async {
            std::future::pending::<()>().await;
            Ok::<&str, Class>("never")
        }
    };
    let r = c.guarded_call("f", hang_all, classify).await;
    assert!(matches!(r, Err(CallError::TimedOut)), "{r:?}");
    assert_eq!(*asked.lock().expect("lock"), ["hangs"], "b did not fit");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(15),
        "a's timeout only"
    );
}

/// Waiting for a permit eats into the deadline: an attempt that no longer fits once admitted
/// is not started (regression: the 600 ms wait, then a full 900 ms attempt, past a 1 s
/// deadline). Paused time.
#[tokio::test(start_paused = true)]
async fn an_attempt_that_no_longer_fits_after_waiting_for_a_permit_is_not_started() {
    let env = Env::Memory;
    let mut config = env.config(&["a"]);
    config.targets.insert(
        "a".into(),
        TargetConfig {
            timeout: Some(Duration::from_millis(900)),
            ..TargetConfig::default()
        },
    );
    let f = config.features.get_mut("f").expect("f");
    f.max_concurrent = Some(1);
    f.max_wait = Duration::from_millis(600);
    f.deadline = Some(Duration::from_secs(1));
    let c = env.start(config).await;
    let held = c.admit("f", "other").await.expect("the only permit");
    let holder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        held.record(CallOutcome::Success);
    });
    let started = tokio::time::Instant::now();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let slow = |t: &ChainTarget, _: u32| {
        asked.lock().expect("lock").push(t.name.clone());
        async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<&str, Class>("late")
        }
    };
    let r = c.guarded_call("f", slow, classify).await;
    let elapsed = started.elapsed();
    holder.await.expect("holder");
    assert!(matches!(r, Err(CallError::TimedOut)), "{r:?}");
    assert!(asked.lock().expect("lock").is_empty(), "no attempt started");
    assert!(
        elapsed <= Duration::from_secs(1),
        "past the deadline: {elapsed:?}"
    );
    assert_eq!(
        c.snapshot("a").await.expect("snapshot").window.calls,
        0,
        "nothing recorded on a"
    );
}

/// A retry is only started when its wait plus its whole attempt timeout fits before the
/// deadline; otherwise the chain moves on (paused time).
#[tokio::test(start_paused = true)]
async fn a_retry_that_cannot_finish_before_the_deadline_is_not_started() {
    let env = Env::Memory;
    let mut config = env.config(&["a", "b"]);
    config.breaker.consecutive_failures = Some(100);
    config.retry = RetryConfig {
        base: Duration::from_secs(6),
        cap: Duration::from_secs(6),
        jitter: Jitter::None,
        budget: None,
        ..RetryConfig::default()
    };
    config.features.get_mut("f").expect("f").deadline = Some(Duration::from_secs(20));
    for (name, secs) in [("a", 15), ("b", 1)] {
        config.targets.insert(
            name.into(),
            TargetConfig {
                timeout: Some(Duration::from_secs(secs)),
                ..TargetConfig::default()
            },
        );
    }
    let c = env.start(config).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Ok("B"))]);
    let started = tokio::time::Instant::now();
    let answer = c.guarded_call("f", up.call(), classify).await.expect("b");
    // 6 s wait + 15 s attempt > 20 s: no retry of a.
    assert_eq!(up.asked(), ["a", "b"]);
    assert_eq!(answer.target.as_deref(), Some("b"));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no wait for a retry never made"
    );

    // With a 30 s deadline the retry fits, after its 6 s wait.
    let mut config = env.config(&["a", "b"]);
    config.breaker.consecutive_failures = Some(100);
    config.retry = RetryConfig {
        base: Duration::from_secs(6),
        cap: Duration::from_secs(6),
        jitter: Jitter::None,
        max_attempts: 2,
        budget: None,
        ..RetryConfig::default()
    };
    config.features.get_mut("f").expect("f").deadline = Some(Duration::from_secs(30));
    let c = env.start(config).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Ok("B"))]);
    let started = tokio::time::Instant::now();
    c.guarded_call("f", up.call(), classify).await.expect("b");
    assert_eq!(up.asked(), ["a", "a", "b"]);
    assert_eq!(started.elapsed(), Duration::from_secs(6));
}

/// A spent retry budget falls through to the next target at once instead of waiting for a
/// retry (paused time: nothing elapses); without a budget the same call retries a.
#[tokio::test(start_paused = true)]
async fn a_spent_budget_moves_to_the_fallback_without_waiting() {
    let env = Env::Memory;
    let mut config = env.config(&["a", "b"]);
    config.breaker.consecutive_failures = Some(100);
    config.retry = RetryConfig {
        base: Duration::from_secs(1),
        jitter: Jitter::None,
        max_attempts: 3,
        budget: Some(BudgetConfig {
            ratio: 0.0,
            window: Duration::from_secs(10),
            min_per_second: 0.1,
        }),
        ..RetryConfig::default()
    };
    let c = env.start(config.clone()).await;
    // The window's one retry (its floor) is taken: the budget is spent.
    let budget = c.retry_budget("f", "a").expect("budget");
    assert!(budget.withdraw().await.is_granted());
    assert!(!budget.withdraw().await.is_granted());
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Ok("B"))]);
    let started = tokio::time::Instant::now();
    let answer = c.guarded_call("f", up.call(), classify).await.expect("b");
    assert_eq!(up.asked(), ["a", "b"], "no retry of a: the budget is spent");
    assert_eq!((answer.tier, answer.attempts), (Tier::Fallback, 2));
    assert_eq!(started.elapsed(), Duration::ZERO, "no wait");

    config.retry.budget = None;
    let c = env.start(config).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Ok("B"))]);
    let started = tokio::time::Instant::now();
    c.guarded_call("f", up.call(), classify).await.expect("b");
    assert_eq!(up.asked(), ["a", "a", "a", "b"], "max_attempts on a");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(3),
        "1 s + 2 s backoff"
    );
}

/// Four coordinators on one Redis, every attempt failing retryably (not counted on the
/// breaker, so nothing opens): what reaches the upstream stays within the fleet budget,
/// retries <= 20% of requests (a window longer than the storm), and some retries happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_through_guarded_calls_stays_within_the_budget() {
    let server = RedisServer::start();
    let env = Env::Redis(server);
    let mut config = env.config(&["a"]);
    config.retry = RetryConfig {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(4),
        max_attempts: 4,
        budget: Some(BudgetConfig {
            ratio: 0.2,
            window: Duration::from_secs(600),
            min_per_second: 0.0,
        }),
        ..RetryConfig::default()
    };
    let mut fleet = Vec::new();
    for _ in 0..4 {
        fleet.push(env.start(config.clone()).await);
    }
    let requests = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in &fleet {
        for _ in 0..8 {
            let (c, requests, retries) = (c.clone(), requests.clone(), retries.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let call = |_: &ChainTarget, n: u32| {
                        let counter = if n == 1 { &requests } else { &retries };
                        counter.fetch_add(1, SeqCst);
                        std::future::ready(Err::<(), Class>(RETRYABLE))
                    };
                    // A 409-like failure: retryable, not the target's fault.
                    let conflict = |c: &Class| {
                        Classification::new(*c, Reason::Conflict).with_health(CallOutcome::Ignored)
                    };
                    let r = c.guarded_call("f", call, conflict).await;
                    assert!(matches!(r, Err(CallError::Inner(_))), "{r:?}");
                }
            }));
        }
    }
    bounded(async {
        for t in tasks {
            t.await.expect("task");
        }
    })
    .await;
    let (requests, retries) = (requests.load(SeqCst), retries.load(SeqCst));
    assert_eq!(requests, 4 * 8 * 25);
    assert!(retries > 0, "the budget allowed some retries");
    assert!(
        retries as f64 <= 0.2 * requests as f64,
        "{retries} retries for {requests} requests"
    );
}

/// What the breaker records comes from the classification: a retryable failure that is not
/// the target's fault (409) leaves it closed; a final one that is (an unexpected 302) opens it.
async fn breaker_health_comes_from_the_classification(env: Env) {
    let c = env.start(env.config(&["a", "b"])).await;
    let up = Upstream::with(&[("a", Err(RETRYABLE)), ("b", Ok("B"))]);
    let conflict =
        |c: &Class| Classification::new(*c, Reason::Conflict).with_health(CallOutcome::Ignored);
    let answer = c
        .guarded_call_with("f", &NoRetry, up.call(), conflict)
        .await
        .expect("b");
    assert_eq!(answer.target.as_deref(), Some("b"));
    c.flush(Duration::from_secs(5)).await;
    assert_eq!(
        c.snapshot("a").await.expect("snapshot").state,
        CircuitState::Closed,
        "a 409 is not the target's fault"
    );

    let up = Upstream::with(&[("a", Err(Class::Final))]);
    let redirect = |c: &Class| {
        Classification::new(*c, Reason::UnexpectedStatus).with_health(CallOutcome::Failure)
    };
    let r = c
        .guarded_call_with("f", &NoRetry, up.call(), redirect)
        .await;
    assert!(matches!(r, Err(CallError::Inner(Class::Final))), "{r:?}");
    // The failure reaches the store with the flusher.
    c.flush(Duration::from_secs(5)).await;
    assert_eq!(
        c.snapshot("a").await.expect("snapshot").state,
        CircuitState::Open,
        "a 302 is the target's fault"
    );
}

on_all!(breaker_health_comes_from_the_classification);

/// A final error that is the request's or the caller's (400, 401: not recorded on the
/// breaker) ends with the error even with a canned answer configured; a final error that is
/// the target's fault is an availability failure, and gets the canned answer.
async fn final_errors_of_the_caller_are_not_canned(env: Env) {
    let mut config = env.config(&["a", "b"]);
    config.features.get_mut("f").expect("f").canned = Some(CannedConfig {
        text: "Busy".into(),
        retry_after: None,
    });
    let c = env.start(config).await;
    let up = Upstream::with(&[("a", Err(Class::Final)), ("b", Ok("B"))]);
    let bad_key = |c: &Class| Classification::new(*c, Reason::Credentials);
    let r = c.guarded_call("f", up.call(), bad_key).await;
    assert!(matches!(r, Err(CallError::Inner(Class::Final))), "{r:?}");
    let r = c.guarded_call("f", up.call(), classify).await;
    assert!(matches!(r, Err(CallError::Inner(Class::Final))), "{r:?}");
    assert_eq!(up.asked(), ["a", "a"], "the chain ended at a");

    let redirect = |c: &Class| {
        Classification::new(*c, Reason::UnexpectedStatus).with_health(CallOutcome::Failure)
    };
    let answer = c
        .guarded_call("f", up.call(), redirect)
        .await
        .expect("canned");
    assert_eq!(answer.tier, Tier::Canned);
}

on_all!(final_errors_of_the_caller_are_not_canned);
