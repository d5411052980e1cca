//! Faults with real processes: a `redis-server` killed, paused (SIGSTOP), its script cache
//! flushed, bad values under fusebox keys, a replica that dies holding permits, Redis down at
//! start. Calls must keep flowing per the feature's policy, never hang, never panic, and come
//! back to shared state when Redis does.
//!
//! Every await on the coordinator is bounded ([`within`]): a hang fails the test instead of
//! stalling it. The tests of this file run one at a time (`SERIAL`), since several of them
//! measure how long calls take.

// Not every test binary uses everything the shared harness exports.
mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fusebox::keys::{feature_keys, target_keys};
use fusebox::{
    BreakerConfig, CircuitState, Config, Coordinator, Error, FeatureConfig, Permit, RateConfig,
    RedisConfig, Rejection, StorePolicy, TransitionReason,
};
use rand::Rng;
use support::{unique_name, Recorder, RedisCluster, RedisServer};

/// Store timeout of the tests where Redis goes away: short, as in production.
const FAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Store timeout of the tests where Redis stays up and degradation must NOT happen: long
/// enough that a slow moment on the shared 2-core machine is not mistaken for an outage.
const CALM_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_INTERVAL: Duration = Duration::from_millis(200);
const REPLICAS: u32 = 4;
/// Bulkhead of every feature here; in local mode each replica gets ceil(8 / 4) = 2.
const LIMIT: u32 = 8;
const LOCAL_LIMIT: u32 = LIMIT.div_ceil(REPLICAS);
/// No await on a coordinator may take this long: that would be a hang.
const HANG: Duration = Duration::from_secs(5);
/// No admission may take this long (generous; the store timeout is 50 ms).
const ADMIT_BOUND: Duration = Duration::from_secs(1);

/// `fail_open`, used by the background workers.
const OPEN: &str = "open";
/// `fail_open`, used only by the test body (its local permits are counted exactly).
const SOLO: &str = "solo";
/// `fail_closed`.
const CLOSED: &str = "closed";
const MODEL: &str = "model-a";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A namespace unique to this run and call (letters, digits, `.` and `-` only, valid however
/// strict the namespace rule is about the other punctuation).
fn namespace(tag: &str) -> String {
    unique_name(tag).replace(':', "-")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Awaits `fut`, failing the test if it takes [`HANG`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung for {HANG:?}"),
    }
}

/// Polls `check` every 10 ms until it holds; fails after `limit`. Returns how long it took.
async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(ms(10)).await;
    }
    t0.elapsed()
}

async fn pause_ms(range: std::ops::RangeInclusive<u64>) {
    let n = rand::rng().random_range(range);
    tokio::time::sleep(ms(n)).await;
}

fn feature(policy: StorePolicy) -> FeatureConfig {
    FeatureConfig {
        max_concurrent: Some(LIMIT),
        on_store_unavailable: policy,
        ..FeatureConfig::default()
    }
}

fn config(tag: &str, url: String, timeout: Duration) -> Config {
    let mut c = Config {
        namespace: namespace(tag),
        redis: Some(RedisConfig {
            url: Some(url),
            timeout,
            connect_timeout: ms(250),
            failure_threshold: 1,
            retry_interval: RETRY_INTERVAL,
            replicas: REPLICAS,
            ..RedisConfig::default()
        }),
        ..Config::default()
    };
    c.features
        .insert(OPEN.into(), feature(StorePolicy::FailOpen));
    c.features
        .insert(SOLO.into(), feature(StorePolicy::FailOpen));
    c.features
        .insert(CLOSED.into(), feature(StorePolicy::FailClosed));
    c
}

async fn coordinator(config: Config) -> (Coordinator, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let c = within(
        "Coordinator::build",
        Coordinator::builder(config)
            .observer(recorder.clone())
            .build(),
    )
    .await
    .expect("coordinator builds");
    (c, recorder)
}

/// Admits one call of `feature`, bounded; records the slowest admission in `slowest` (µs).
async fn timed_admit(c: &Coordinator, feature: &str, slowest: &AtomicU64) -> Result<Permit, Error> {
    let t0 = Instant::now();
    let r = within(&format!("admit {feature}"), c.admit(feature, MODEL)).await;
    slowest.fetch_max(t0.elapsed().as_micros() as u64, SeqCst);
    r
}

fn is_store_unavailable(r: &Result<Permit, Error>, feature: &str) -> bool {
    matches!(r, Err(Error::Rejected(Rejection::StoreUnavailable { feature: f })) if f == feature)
}

// ---------------------------------------------------------------------------------------------
// Redis killed / paused mid-run
// ---------------------------------------------------------------------------------------------

/// What background callers of [`OPEN`] saw.
#[derive(Default)]
struct Workers {
    stop: AtomicBool,
    shared_ok: AtomicUsize,
    local_ok: AtomicUsize,
    local_in_flight: AtomicUsize,
    max_local_in_flight: AtomicUsize,
    /// `limit` of every BulkheadFull refusal.
    full_limits: Mutex<BTreeSet<u32>>,
    errors: Mutex<Vec<String>>,
    slowest_us: AtomicU64,
}

impl Workers {
    fn start(c: &Coordinator, n: usize) -> (Arc<Workers>, Vec<tokio::task::JoinHandle<()>>) {
        let w = Arc::new(Workers::default());
        let handles = (0..n)
            .map(|_| {
                let (c, w) = (c.clone(), w.clone());
                tokio::spawn(async move {
                    while !w.stop.load(SeqCst) {
                        match timed_admit(&c, OPEN, &w.slowest_us).await {
                            Ok(p) if p.is_local() => {
                                w.local_ok.fetch_add(1, SeqCst);
                                let n = w.local_in_flight.fetch_add(1, SeqCst) + 1;
                                w.max_local_in_flight.fetch_max(n, SeqCst);
                                pause_ms(1..=3).await;
                                w.local_in_flight.fetch_sub(1, SeqCst);
                                p.success();
                            }
                            Ok(p) => {
                                w.shared_ok.fetch_add(1, SeqCst);
                                pause_ms(1..=3).await;
                                p.success();
                            }
                            Err(Error::Rejected(Rejection::BulkheadFull { limit, .. })) => {
                                lock(&w.full_limits).insert(limit);
                                pause_ms(1..=3).await;
                            }
                            Err(e) => lock(&w.errors).push(format!("{e:?}")),
                        }
                    }
                })
            })
            .collect();
        (w, handles)
    }
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGKILL, later restarted on the same port: connections are refused.
    Kill,
    /// SIGSTOP, later SIGCONT: connections stay open, nothing answers (timeouts).
    Pause,
}

async fn outage_scenario(outage: Outage) {
    let mut server = RedisServer::start();
    let (c, rec) = coordinator(config("outage", server.url(), FAULT_TIMEOUT)).await;
    let slowest = AtomicU64::new(0);

    // Healthy: every feature admits on shared state.
    for f in [OPEN, SOLO, CLOSED] {
        let p = timed_admit(&c, f, &slowest).await.expect("healthy admit");
        assert!(!p.is_local(), "{f}: shared permit while Redis is up");
        p.success();
    }
    let (w, handles) = Workers::start(&c, 4);
    wait_until(HANG, "workers run on shared state", || {
        w.shared_ok.load(SeqCst) >= 20
    })
    .await;

    // The fault.
    let fault_at = Instant::now();
    match outage {
        Outage::Kill => tokio::task::block_in_place(|| server.kill()),
        Outage::Pause => server.pause(),
    }
    let took = wait_until(HANG, "degraded after the fault", || c.is_degraded()).await;
    eprintln!("{outage:?}: degraded {took:?} after the fault");
    assert_eq!(
        rec.degraded(),
        1,
        "one StoreDegraded event: {:?}",
        rec.log()
    );

    // Fail-open calls keep flowing on local state.
    let local_then = w.local_ok.load(SeqCst);
    tokio::time::sleep(ms(600)).await;
    assert!(
        w.local_ok.load(SeqCst) > local_then + 20,
        "fail-open callers keep getting local permits"
    );
    assert!(c.is_degraded(), "still degraded while Redis is {outage:?}");

    // The local bulkhead is the fleet limit divided by the fleet size: ceil(8 / 4) = 2.
    let mut held = Vec::new();
    for i in 0..LOCAL_LIMIT {
        let p = timed_admit(&c, SOLO, &slowest)
            .await
            .unwrap_or_else(|e| panic!("local permit {i} of {LOCAL_LIMIT}: {e}"));
        assert!(p.is_local(), "{p:?}");
        held.push(p);
    }
    match timed_admit(&c, SOLO, &slowest).await {
        Err(Error::Rejected(Rejection::BulkheadFull { limit, .. })) => {
            assert_eq!(limit, LOCAL_LIMIT, "the local share of the limit")
        }
        other => panic!(
            "permit {} of a local limit of {LOCAL_LIMIT}: {other:?}",
            LOCAL_LIMIT + 1
        ),
    }
    held.clear();
    let p = timed_admit(&c, SOLO, &slowest)
        .await
        .expect("a released local permit is available again");
    assert!(p.is_local());
    p.success();

    // Fail-closed calls are refused, including the ones that probe Redis (one per retry
    // interval: spread the calls over more than one).
    for i in 0..8 {
        let r = timed_admit(&c, CLOSED, &slowest).await;
        assert!(
            is_store_unavailable(&r, CLOSED),
            "fail_closed call {i} while Redis is {outage:?}: {r:?}"
        );
        tokio::time::sleep(ms(40)).await;
    }

    // Redis comes back: the coordinator returns to it.
    let restore_at = Instant::now();
    match outage {
        Outage::Kill => tokio::task::block_in_place(|| server.restart()),
        Outage::Pause => server.resume(),
    }
    let took = wait_until(
        Duration::from_secs(10),
        "recovered after Redis came back",
        || !c.is_degraded(),
    )
    .await;
    eprintln!(
        "{outage:?}: recovered {took:?} after Redis came back ({:?} after the fault)",
        fault_at.elapsed()
    );
    assert!(
        rec.recovered() >= 1,
        "a StoreRecovered event: {:?}",
        rec.log()
    );
    for f in [SOLO, CLOSED] {
        let p = timed_admit(&c, f, &slowest)
            .await
            .unwrap_or_else(|e| panic!("{f} after recovery: {e}"));
        assert!(!p.is_local(), "{f}: back on shared state");
        p.success();
    }
    let shared_then = w.shared_ok.load(SeqCst);
    wait_until(HANG, "workers back on shared state", || {
        w.shared_ok.load(SeqCst) > shared_then + 20
    })
    .await;
    assert!(restore_at.elapsed() < Duration::from_secs(15));

    w.stop.store(true, SeqCst);
    for h in handles {
        within("worker", h).await.expect("a worker panicked");
    }
    within("flush", c.flush(Duration::from_secs(1))).await;
    let errors = lock(&w.errors).clone();
    let slowest = Duration::from_micros(slowest.load(SeqCst).max(w.slowest_us.load(SeqCst)));
    eprintln!(
        "{outage:?}: workers {} shared + {} local permits, refusals with limits {:?}, slowest \
         admission {slowest:?}; events {:?}",
        w.shared_ok.load(SeqCst),
        w.local_ok.load(SeqCst),
        lock(&w.full_limits),
        rec.log()
            .iter()
            .filter(|k| **k != "settle_dropped")
            .collect::<Vec<_>>()
    );
    assert!(
        errors.is_empty(),
        "fail-open callers got errors: {errors:?}"
    );
    assert!(
        w.max_local_in_flight.load(SeqCst) <= LOCAL_LIMIT as usize,
        "{} local permits in flight at once, local limit {LOCAL_LIMIT}",
        w.max_local_in_flight.load(SeqCst)
    );
    let limits = lock(&w.full_limits).clone();
    assert!(
        limits.iter().all(|l| *l == LOCAL_LIMIT || *l == LIMIT),
        "refusal limits {limits:?}"
    );
    assert!(
        slowest < ADMIT_BOUND,
        "an admission took {slowest:?} (store timeout {FAULT_TIMEOUT:?})"
    );
}

/// redis-server killed mid-run, then restarted on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_run_then_restarted() {
    let _serial = SERIAL.lock().await;
    outage_scenario(Outage::Kill).await;
}

/// redis-server paused (SIGSTOP) mid-run, then resumed (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_paused_mid_run_then_resumed() {
    let _serial = SERIAL.lock().await;
    outage_scenario(Outage::Pause).await;
}

// ---------------------------------------------------------------------------------------------
// SCRIPT FLUSH
// ---------------------------------------------------------------------------------------------

/// The script cache is flushed repeatedly while two coordinators admit and settle: no call
/// fails, nothing degrades, no outcome or release is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn script_flush_mid_run_is_survived() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let mut cfg = config("script-flush", server.url(), CALM_TIMEOUT);
    cfg.features.insert(
        OPEN.into(),
        FeatureConfig {
            max_concurrent: Some(1000),
            ..FeatureConfig::default()
        },
    );
    let (c1, r1) = coordinator(cfg.clone()).await;
    let (c2, r2) = coordinator(cfg).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for c in [&c1, &c2] {
        for _ in 0..3 {
            let (c, stop, ok, errors) = (c.clone(), stop.clone(), ok.clone(), errors.clone());
            handles.push(tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    match within("admit", c.admit(OPEN, MODEL)).await {
                        Ok(p) if !p.is_local() => {
                            pause_ms(0..=1).await;
                            p.success();
                            ok.fetch_add(1, SeqCst);
                        }
                        other => lock(&errors).push(format!("{other:?}")),
                    }
                }
            }));
        }
    }
    let mut counts = vec![];
    for _ in 0..8 {
        tokio::time::sleep(ms(50)).await;
        counts.push(ok.load(SeqCst));
        let reply = tokio::task::block_in_place(|| server.cli(&["SCRIPT", "FLUSH"]));
        assert_eq!(reply, "OK");
    }
    tokio::time::sleep(ms(50)).await;
    counts.push(ok.load(SeqCst));
    stop.store(true, SeqCst);
    for h in handles {
        within("worker", h).await.expect("a worker panicked");
    }
    within("flush", c1.flush(Duration::from_secs(2))).await;
    within("flush", c2.flush(Duration::from_secs(2))).await;

    eprintln!("successful calls before each SCRIPT FLUSH and at the end: {counts:?}");
    let errors = lock(&errors).clone();
    assert!(errors.is_empty(), "calls failed: {errors:?}");
    assert!(
        counts.windows(2).all(|w| w[1] > w[0]),
        "calls kept succeeding between the flushes: {counts:?}"
    );
    for (c, r) in [(&c1, &r1), (&c2, &r2)] {
        assert!(!c.is_degraded());
        assert_eq!(r.degraded(), 0, "{:?}", r.log());
        assert_eq!(r.settle_dropped(), 0, "{:?}", r.log());
    }
    // Every release and every outcome reached Redis despite the flushes.
    assert_eq!(
        within("in_flight", c1.in_flight(OPEN))
            .await
            .expect("in_flight"),
        0
    );
    let snap = within("snapshot", c2.snapshot(MODEL))
        .await
        .expect("snapshot");
    assert_eq!(
        snap.window.calls,
        ok.load(SeqCst) as u64,
        "every outcome counted: {snap:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A replica that dies holding permits
// ---------------------------------------------------------------------------------------------

/// A coordinator "crashes" holding every permit (they are never released); another one
/// cannot get them at first and gets them all back within one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permits_of_a_crashed_replica_come_back_within_one_lease() {
    let _serial = SERIAL.lock().await;
    const HELD: &str = "held";
    const N: u32 = 3;
    let lease = ms(400);
    let server = RedisServer::start();
    let mut cfg = config("crash", server.url(), CALM_TIMEOUT);
    cfg.features.insert(
        HELD.into(),
        FeatureConfig {
            max_concurrent: Some(N),
            lease,
            ..FeatureConfig::default()
        },
    );
    let slowest = AtomicU64::new(0);

    let (a, _) = coordinator(cfg.clone()).await;
    let (b, _) = coordinator(cfg).await;
    let first_taken = Instant::now();
    for i in 0..N {
        let p = timed_admit(&a, HELD, &slowest)
            .await
            .unwrap_or_else(|e| panic!("permit {i}: {e}"));
        assert!(!p.is_local());
        // A crash: the permit is never released.
        std::mem::forget(p);
    }
    drop(a);

    match timed_admit(&b, HELD, &slowest).await {
        Err(Error::Rejected(Rejection::BulkheadFull {
            limit,
            retry_after: Some(wait),
            ..
        })) => {
            assert_eq!(limit, N);
            assert!(
                wait <= lease,
                "retry hint {wait:?} beyond the lease {lease:?}"
            );
        }
        other => panic!("the crashed replica's permits are still held: {other:?}"),
    }
    assert_eq!(
        within("in_flight", b.in_flight(HELD))
            .await
            .expect("in_flight"),
        N
    );

    // Poll until they come back; then all N at once.
    let back = wait_for_permit(&b, HELD, lease + Duration::from_secs(2)).await;
    let took = first_taken.elapsed();
    eprintln!(
        "permits of the crashed replica back {took:?} after they were taken (lease {lease:?})"
    );
    assert!(
        took <= lease + ms(500),
        "permits came back {took:?} after they were taken, lease {lease:?}"
    );
    // The permits were taken one after another, so their leases end a few ms apart: poll
    // for each of the rest too, still within one lease of when the last was taken.
    let mut held = vec![back];
    for _ in 1..N {
        let p = wait_for_permit(&b, HELD, ms(500)).await;
        assert!(!p.is_local());
        held.push(p);
    }
    let took = first_taken.elapsed();
    assert!(
        took <= lease + ms(600),
        "all {N} permits came back {took:?} after they were taken, lease {lease:?}"
    );
    match timed_admit(&b, HELD, &slowest).await {
        Err(Error::Rejected(Rejection::BulkheadFull { .. })) => {}
        other => panic!("the limit still holds: {other:?}"),
    }
    drop(held);
}

async fn wait_for_permit(c: &Coordinator, feature: &str, limit: Duration) -> Permit {
    let t0 = Instant::now();
    loop {
        match within("admit", c.admit(feature, MODEL)).await {
            Ok(p) => return p,
            Err(Error::Rejected(Rejection::BulkheadFull { .. })) => {}
            Err(e) => panic!("waiting for a permit: {e}"),
        }
        assert!(t0.elapsed() < limit, "no permit came back within {limit:?}");
        tokio::time::sleep(ms(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Bad values under fusebox keys
// ---------------------------------------------------------------------------------------------

/// What one admission under a corrupted key may come back as: a fail-open local admission or
/// a clear error (never a shared permit built on garbage, never a panic).
fn check_corrupted_admission(what: &str, feature: &str, r: Result<Permit, Error>) {
    match (feature, r) {
        (OPEN, Ok(p)) => {
            assert!(
                p.is_local(),
                "{what}: {feature} admitted on shared state: {p:?}"
            );
            p.success();
        }
        (CLOSED, r) if is_store_unavailable(&r, CLOSED) => {}
        (_, Err(Error::Store(e))) => eprintln!("{what}: {feature}: store error {e}"),
        (_, other) => panic!("{what}: {feature}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_values_under_fusebox_keys_are_survived() {
    let _serial = SERIAL.lock().await;
    const RATED: &str = "rated";
    let server = RedisServer::start();
    let mut cfg = config("bad-values", server.url(), CALM_TIMEOUT);
    cfg.breaker = BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate: None,
        ..BreakerConfig::default()
    };
    cfg.features.insert(
        RATED.into(),
        FeatureConfig {
            rate: Some(RateConfig {
                requests: 1000,
                per: Duration::from_secs(1),
                burst: None,
            }),
            ..FeatureConfig::default()
        },
    );
    let ns = cfg.namespace.clone();
    let (c, rec) = coordinator(cfg).await;
    let tk = target_keys(&ns, MODEL);
    let permits = feature_keys(&ns, OPEN).permits;
    let closed_permits = feature_keys(&ns, CLOSED).permits;
    let rate = feature_keys(&ns, RATED).rate;
    let cli = |args: &[&str]| tokio::task::block_in_place(|| server.cli(args));
    let slowest = AtomicU64::new(0);

    /// Both features admit on shared state and the permits go back.
    async fn works(c: &Coordinator, slowest: &AtomicU64, when: &str) {
        for f in [OPEN, CLOSED] {
            let p = timed_admit(c, f, slowest)
                .await
                .unwrap_or_else(|e| panic!("{when}: {f}: {e}"));
            assert!(!p.is_local(), "{when}: {f} on shared state");
            p.success();
        }
        within("flush", c.flush(Duration::from_secs(1))).await;
    }

    works(&c, &slowest, "before").await;
    assert_eq!(
        cli(&["TYPE", &tk.breaker]),
        "hash",
        "the breaker key is where we think"
    );
    let p = timed_admit(&c, OPEN, &slowest).await.expect("admit");
    assert_eq!(
        cli(&["TYPE", &permits]),
        "zset",
        "the permits key is where we think"
    );
    p.success();
    within("flush", c.flush(Duration::from_secs(1))).await;

    // The breaker hash replaced by a string.
    assert_eq!(cli(&["SET", &tk.breaker, "not a hash"]), "OK");
    for f in [OPEN, CLOSED] {
        for _ in 0..3 {
            let r = timed_admit(&c, f, &slowest).await;
            check_corrupted_admission("breaker key is a string", f, r);
        }
    }
    let _ = within("snapshot", c.snapshot(MODEL)).await;
    let _ = within("in_flight", c.in_flight(OPEN)).await;
    within("flush", c.flush(Duration::from_secs(1))).await;
    assert_eq!(cli(&["DEL", &tk.breaker]), "1");
    works(&c, &slowest, "after DEL of the breaker key").await;

    // The permits sorted sets replaced by hashes.
    cli(&["DEL", &permits, &closed_permits]);
    assert_eq!(cli(&["HSET", &permits, "x", "y"]), "1");
    assert_eq!(cli(&["HSET", &closed_permits, "x", "y"]), "1");
    for f in [OPEN, CLOSED] {
        for _ in 0..3 {
            let r = timed_admit(&c, f, &slowest).await;
            check_corrupted_admission("permits key is a hash", f, r);
        }
    }
    let _ = within("in_flight", c.in_flight(OPEN)).await;
    within("flush", c.flush(Duration::from_secs(1))).await;
    assert_eq!(cli(&["DEL", &permits, &closed_permits]), "2");
    works(&c, &slowest, "after DEL of the permits keys").await;

    // A rate key that is not a number reads as no key.
    assert_eq!(cli(&["SET", &rate, "banana"]), "OK");
    let p = timed_admit(&c, RATED, &slowest)
        .await
        .expect("rate key 'banana'");
    assert!(!p.is_local());
    p.success();
    // Its outcome goes to the breaker hash: delivered before that hash is corrupted below.
    within("flush", c.flush(Duration::from_secs(1))).await;

    // Corrupted numbers in the breaker hash read as the defaults (closed, generation 0), and
    // the breaker still works on top of them.
    let reply = cli(&["HSET", &tk.breaker, "s", "banana", "g", "-5", "ou", "xyz"]);
    assert!(!reply.starts_with("(error)"), "{reply}");
    assert_eq!(cli(&["HGET", &tk.breaker, "s"]), "banana");
    for i in 0..3 {
        let p = timed_admit(&c, OPEN, &slowest)
            .await
            .unwrap_or_else(|e| panic!("admission {i} over corrupted numbers: {e}"));
        assert!(
            !p.is_local(),
            "corrupted numbers are survived on shared state"
        );
        p.failure();
        within("flush", c.flush(Duration::from_secs(1))).await;
    }
    let snap = within("snapshot", c.snapshot(MODEL))
        .await
        .expect("snapshot over corrupted numbers");
    assert_eq!(
        snap.state,
        CircuitState::Open,
        "3 failures trip it: {snap:?}"
    );
    match timed_admit(&c, OPEN, &slowest).await {
        Err(Error::Rejected(Rejection::CircuitOpen {
            state: CircuitState::Open,
            ..
        })) => {}
        other => panic!("open after the trip: {other:?}"),
    }

    assert!(!c.is_degraded(), "bad values are not an outage");
    assert_eq!(rec.degraded(), 0, "{:?}", rec.log());
    let slowest = Duration::from_micros(slowest.load(SeqCst));
    eprintln!("bad values: slowest admission {slowest:?}");
    assert!(slowest < ADMIT_BOUND);
}

/// One settle batch carries a failure that trips the breaker and the release of the call's
/// permit; the permits key holds a bad value, so the release part fails while the outcome part
/// is applied. The trip happened in Redis, and this replica's call made it: it must be
/// reported (README: "each transition is reported once, by the replica that made it").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trip_is_reported_when_the_release_in_the_same_batch_fails() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let mut cfg = config("partial-settle", server.url(), CALM_TIMEOUT);
    cfg.breaker = BreakerConfig {
        consecutive_failures: Some(1),
        failure_rate: None,
        ..BreakerConfig::default()
    };
    let permits = feature_keys(&cfg.namespace, OPEN).permits;
    let (c, rec) = coordinator(cfg).await;
    let cli = |args: &[&str]| tokio::task::block_in_place(|| server.cli(args));

    let p = within("admit", c.admit(OPEN, MODEL)).await.expect("admit");
    assert!(!p.is_local());
    cli(&["DEL", &permits]);
    assert_eq!(cli(&["HSET", &permits, "x", "y"]), "1");
    p.failure();
    within("flush", c.flush(Duration::from_secs(1))).await;

    let snap = within("snapshot", c.snapshot(MODEL))
        .await
        .expect("snapshot");
    assert_eq!(
        (snap.state, snap.generation),
        (CircuitState::Open, 1),
        "the failure was applied and tripped the breaker"
    );
    let reported = rec.transitions();
    eprintln!("events: {:?}", rec.log());
    assert!(
        reported.iter().any(|t| t.generation == 1
            && t.to == CircuitState::Open
            && t.reason == TransitionReason::ConsecutiveFailures),
        "the trip (generation 1) that this replica made was never reported; reported: \
         {reported:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis down at start
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_at_start_then_started() {
    let _serial = SERIAL.lock().await;
    let mut server = RedisServer::start();
    tokio::task::block_in_place(|| server.kill());
    let slowest = AtomicU64::new(0);

    let t0 = Instant::now();
    let (c, rec) = coordinator(config("down-at-start", server.url(), FAULT_TIMEOUT)).await;
    let built = t0.elapsed();
    eprintln!("built against a dead Redis in {built:?}");
    assert!(
        built < Duration::from_secs(1),
        "Coordinator::new took {built:?}"
    );

    let p = timed_admit(&c, SOLO, &slowest)
        .await
        .expect("fail_open admits locally");
    assert!(p.is_local());
    p.success();
    assert!(c.is_degraded(), "degraded after the first call");
    assert_eq!(rec.degraded(), 1, "{:?}", rec.log());
    let r = timed_admit(&c, CLOSED, &slowest).await;
    assert!(is_store_unavailable(&r, CLOSED), "{r:?}");

    tokio::task::block_in_place(|| server.restart());
    let started = Instant::now();
    let p = loop {
        let p = timed_admit(&c, SOLO, &slowest)
            .await
            .expect("fail_open always admits here");
        if !p.is_local() {
            break p;
        }
        p.success();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still local 10 s after Redis started"
        );
        tokio::time::sleep(ms(20)).await;
    };
    p.success();
    eprintln!("back on Redis {:?} after it started", started.elapsed());
    assert!(!c.is_degraded());
    assert_eq!(rec.recovered(), 1, "{:?}", rec.log());
    let p = timed_admit(&c, CLOSED, &slowest)
        .await
        .expect("fail_closed admits again");
    assert!(!p.is_local());
    p.success();
    let slowest = Duration::from_micros(slowest.load(SeqCst));
    eprintln!("down at start: slowest admission {slowest:?}");
    assert!(slowest < ADMIT_BOUND);
}

// ---------------------------------------------------------------------------------------------
// A short stall must not block a bulkhead for a whole lease (issue 5, §2.1)
// ---------------------------------------------------------------------------------------------

/// Callers of a bulkhead of 12 (lease 30 s) run while the Redis is SIGSTOPped for ~3 s. The
/// admissions that timed out during the stall ran when Redis woke up: each took a permit
/// whose caller had already given up. Their take-backs must land once Redis answers again,
/// so that soon after SIGCONT the permits held in Redis are exactly the calls still running
/// (none, once the callers stop), not 12 stuck until their leases end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_stall_does_not_block_the_bulkhead_for_a_lease() {
    let _serial = SERIAL.lock().await;
    const STALL: &str = "stall";
    const STALL_LIMIT: u32 = 12;
    let server = RedisServer::start();
    let mut cfg = config("stall", server.url(), FAULT_TIMEOUT);
    cfg.features.insert(
        STALL.into(),
        FeatureConfig {
            max_concurrent: Some(STALL_LIMIT),
            lease: Duration::from_secs(30),
            ..FeatureConfig::default()
        },
    );
    let permits_key = feature_keys(&cfg.namespace, STALL).permits;
    let (c, _rec) = coordinator(cfg).await;

    #[derive(Default)]
    struct Seen {
        stop: AtomicBool,
        shared_ok: AtomicUsize,
        full: AtomicUsize,
        /// Shared permits held by a caller right now.
        live: AtomicUsize,
        errors: Mutex<Vec<String>>,
    }
    let seen = Arc::new(Seen::default());
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (c, seen) = (c.clone(), seen.clone());
            tokio::spawn(async move {
                while !seen.stop.load(SeqCst) {
                    match within("admit", c.admit(STALL, MODEL)).await {
                        Ok(p) if !p.is_local() => {
                            seen.live.fetch_add(1, SeqCst);
                            seen.shared_ok.fetch_add(1, SeqCst);
                            pause_ms(1..=3).await;
                            seen.live.fetch_sub(1, SeqCst);
                            p.success();
                        }
                        Ok(p) => {
                            pause_ms(1..=3).await;
                            p.success();
                        }
                        Err(Error::Rejected(Rejection::BulkheadFull { .. })) => {
                            seen.full.fetch_add(1, SeqCst);
                            pause_ms(1..=3).await;
                        }
                        Err(e) => lock(&seen.errors).push(format!("{e:?}")),
                    }
                }
            })
        })
        .collect();
    wait_until(HANG, "callers run on shared state", || {
        seen.shared_ok.load(SeqCst) >= 50
    })
    .await;

    server.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.resume();
    wait_until(Duration::from_secs(10), "recovered after SIGCONT", || {
        !c.is_degraded()
    })
    .await;

    // Calls flow on shared state again: a bulkhead of 12 shared by 8 callers.
    let (ok_then, full_then) = (seen.shared_ok.load(SeqCst), seen.full.load(SeqCst));
    let t0 = Instant::now();
    while seen.shared_ok.load(SeqCst) < ok_then + 200 && t0.elapsed() < HANG {
        tokio::time::sleep(ms(10)).await;
    }
    let (ok, full) = (
        seen.shared_ok.load(SeqCst) - ok_then,
        seen.full.load(SeqCst) - full_then,
    );
    eprintln!("after the stall: {ok} shared admissions, {full} refused bulkhead_full");

    seen.stop.store(true, SeqCst);
    for h in handles {
        within("caller", h).await.expect("a caller panicked");
    }
    within("flush", c.flush(Duration::from_secs(2))).await;
    assert_eq!(seen.live.load(SeqCst), 0);

    // Nothing runs now: within a few seconds Redis must hold no permit.
    let held = || -> usize {
        server
            .cli(&["ZCARD", &permits_key])
            .trim()
            .parse()
            .unwrap_or(usize::MAX)
    };
    let t0 = Instant::now();
    let mut n = tokio::task::block_in_place(held);
    while n != 0 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(ms(50)).await;
        n = tokio::task::block_in_place(held);
    }
    let errors = lock(&seen.errors).clone();
    assert!(errors.is_empty(), "callers got errors: {errors:?}");
    assert_eq!(
        n,
        0,
        "permits held in Redis {:?} after SIGCONT with no call in flight (limit {STALL_LIMIT}): \
         take-backs of the admissions that timed out during the stall were lost",
        t0.elapsed()
    );
    assert!(
        ok >= 200,
        "after the stall calls should be admitted again: {ok} admitted, {full} refused"
    );
}

// ---------------------------------------------------------------------------------------------
// A settle batch with one slow call (issue 5, §2.8)
// ---------------------------------------------------------------------------------------------

/// One settle batch carries a failure of target A (it trips A's breaker) and a success of
/// target B, whose keys live on another Cluster master; that master is SIGSTOPped while the
/// batch is sent. A's call completes, B's times out: A's trip must be reported, and
/// `SettleDropped` must count B's item only (not the whole batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_batch_that_times_out_keeps_what_completed() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
    let ns = namespace("settle-timeout");
    // The master that owns a key answers EXISTS; the others answer MOVED.
    let owner = |key: &str| {
        cluster
            .nodes()
            .iter()
            .position(|n| n.try_cli(&["EXISTS", key]).is_ok())
            .expect("a master owns every slot")
    };
    let mut names = (0..64).map(|i| format!("model-{i}"));
    let a = names.next().expect("a name");
    let a_node = tokio::task::block_in_place(|| owner(&target_keys(&ns, &a).breaker));
    let b = names
        .find(|n| tokio::task::block_in_place(|| owner(&target_keys(&ns, n).breaker)) != a_node)
        .expect("a target on another master");
    let b_node = tokio::task::block_in_place(|| owner(&target_keys(&ns, &b).breaker));

    let mut cfg = Config {
        namespace: ns,
        redis: Some(RedisConfig {
            cluster: cluster.urls(),
            // Generous: A's call must complete within it on a loaded machine; B's times out.
            timeout: ms(1500),
            connect_timeout: ms(2000),
            // Long enough that both settles go out in one batch.
            settle_delay: ms(50),
            ..RedisConfig::default()
        }),
        ..Config::default()
    };
    cfg.breaker = BreakerConfig {
        consecutive_failures: Some(1),
        failure_rate: None,
        ..BreakerConfig::default()
    };
    cfg.features.insert(OPEN.into(), FeatureConfig::default());
    let (c, rec) = coordinator(cfg).await;
    // One round first, so that every script the batch needs is cached on every master (a
    // NOSCRIPT fallback loads on every master, the stopped one too).
    for t in [&a, &b] {
        let p = within("warm-up", c.admit(OPEN, t)).await.expect("warm-up");
        p.success();
    }
    within("flush", c.flush(Duration::from_secs(4))).await;
    let pa = within("admit a", c.admit(OPEN, &a)).await.expect("admit a");
    let pb = within("admit b", c.admit(OPEN, &b)).await.expect("admit b");
    assert!(!pa.is_local() && !pb.is_local());

    cluster.nodes()[b_node].pause();
    pa.failure();
    pb.success();
    within("flush", c.flush(Duration::from_secs(4))).await;
    // On a loaded machine the flush may return before the batch is through: wait for its
    // report (the trip, and the drop of B's item), up to HANG.
    let t0 = Instant::now();
    while t0.elapsed() < HANG
        && (rec.settle_dropped_items() == 0 || !rec.transitions().iter().any(|t| t.target == a))
    {
        tokio::time::sleep(ms(20)).await;
    }
    cluster.nodes()[b_node].resume();

    let reported = rec.transitions();
    eprintln!(
        "events: {:?}; dropped items {}",
        rec.log(),
        rec.settle_dropped_items()
    );
    assert!(
        reported
            .iter()
            .any(|t| t.target == a && t.to == CircuitState::Open && t.generation == 1),
        "the trip of {a} (its settle call completed) was not reported: {reported:?}"
    );
    assert_eq!(
        rec.settle_dropped_items(),
        1,
        "only the settle of {b} (on the stopped master) was not delivered"
    );
}
