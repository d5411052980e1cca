//! Fleet invariants: several independent `Coordinator`s (each with its own Redis connection)
//! share ONE real `redis-server` (or a real 3-master Redis Cluster) and are hammered by
//! hundreds of concurrent tasks. What is counted is what actually reaches the protected call.
//!
//! The tests of this file run one at a time (`SERIAL`): each saturates the machine on purpose,
//! and two at once would only make each other's store calls slow.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fusebox::{
    BreakerConfig, CircuitState, Config, Coordinator, Error, FeatureConfig, Force, RateConfig,
    RedisConfig, Rejection, StorePolicy, Transition, TransitionReason,
};
use rand::Rng;
use support::{unique_name, Recorder, RedisCluster, RedisServer};

/// Independent coordinators per test (replicas of one service).
const REPLICAS: usize = 4;
/// Bound on every store operation. Generous: these tests are about fleet invariants, not
/// about Redis being slow, and they share 2 cores with hundreds of tasks; a timeout here would
/// send a replica to local mode and make the test about something else.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// A hammer that has not finished by then is a hang.
const HAMMER_BOUND: Duration = Duration::from_secs(25);
/// Callers still busy this long after their time budget ended are hung (the longest wait is
/// the bulkhead's 2 s `max_wait`).
const HANG_MARGIN: Duration = Duration::from_secs(8);

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

/// Sleeps a random number of milliseconds in `range` (a yield when 0).
async fn pause_ms(range: std::ops::RangeInclusive<u64>) {
    let n = rand::rng().random_range(range);
    if n == 0 {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(ms(n)).await;
    }
}

/// One replica: a coordinator and what it observed.
struct Replica {
    coordinator: Coordinator,
    recorder: Arc<Recorder>,
}

/// `n` coordinators, each built on its own from `config` (so each has its own connection).
async fn fleet(n: usize, config: &Config) -> Vec<Replica> {
    let mut replicas = Vec::with_capacity(n);
    for _ in 0..n {
        let recorder = Arc::new(Recorder::default());
        let coordinator = Coordinator::builder(config.clone())
            .observer(recorder.clone())
            .build()
            .await
            .expect("coordinator builds");
        replicas.push(Replica {
            coordinator,
            recorder,
        });
    }
    replicas
}

async fn flush_all(fleet: &[Replica]) {
    for r in fleet {
        r.coordinator.flush(Duration::from_secs(2)).await;
    }
}

/// Every transition any replica reported.
fn all_transitions(fleet: &[Replica]) -> Vec<Transition> {
    let mut all: Vec<Transition> = fleet
        .iter()
        .flat_map(|r| r.recorder.transitions())
        .collect();
    all.sort_by_key(|t| t.generation);
    all
}

/// The store stayed healthy on every replica (otherwise the test measured local mode).
fn assert_store_stayed_healthy(fleet: &[Replica]) {
    for (i, r) in fleet.iter().enumerate() {
        assert!(!r.coordinator.is_degraded(), "replica {i} went degraded");
        assert_eq!(
            r.recorder.degraded(),
            0,
            "replica {i} reported StoreDegraded"
        );
        assert_eq!(
            r.recorder.settle_dropped_items(),
            0,
            "replica {i} dropped outcomes/releases"
        );
    }
}

fn single(url: String) -> RedisConfig {
    RedisConfig {
        url: Some(url),
        timeout: STORE_TIMEOUT,
        ..RedisConfig::default()
    }
}

fn config(tag: &str, redis: RedisConfig) -> Config {
    Config {
        namespace: namespace(tag),
        redis: Some(redis),
        ..Config::default()
    }
}

/// A breaker that trips on `failures` consecutive failures only.
fn breaker(failures: u32, open: Duration, probes: u32, successes: u32) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(failures),
        failure_rate: None,
        open_duration: open,
        max_open_duration: open.max(Duration::from_secs(300)),
        half_open_probes: probes,
        half_open_successes: successes,
        ..BreakerConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Bulkhead
// ---------------------------------------------------------------------------------------------

const BULKHEAD: &str = "chat";
const MODEL: &str = "model-a";
const BULKHEAD_LIMIT: u32 = 8;

/// `chat`: at most [`BULKHEAD_LIMIT`] in flight fleet-wide, callers queue up to 2 s. Fails
/// closed, so a store failure shows up as `StoreUnavailable` (counted as unexpected) instead of
/// as local admissions that would legitimately exceed the fleet limit.
fn bulkhead_config(tag: &str, redis: RedisConfig) -> Config {
    let mut c = config(tag, redis);
    c.features.insert(
        BULKHEAD.into(),
        FeatureConfig {
            max_concurrent: Some(BULKHEAD_LIMIT),
            max_wait: Duration::from_secs(2),
            on_store_unavailable: StorePolicy::FailClosed,
            ..FeatureConfig::default()
        },
    );
    c
}

#[derive(Debug, Default)]
struct BulkheadRun {
    /// Calls that reached the protected section.
    reached: usize,
    /// Calls refused with `BulkheadFull` after waiting.
    full: usize,
    /// Calls started (each must end as reached or full).
    started: usize,
    /// Highest number of calls inside the protected section at once, fleet-wide.
    max_in_flight: usize,
    /// Anything else (local permits, other rejections, errors).
    unexpected: Vec<String>,
    elapsed: Duration,
}

/// `tasks_per_replica` tasks on every replica, each making up to `calls_per_task` calls of
/// [`BULKHEAD`] to [`MODEL`], starting no new call once `enough` calls got through fleet-wide
/// or after `budget` (the machine is shared: the count is bounded, and so is the time). The
/// protected call bumps a fleet-wide in-flight counter, sleeps `section` ms (random in the
/// range) and leaves.
async fn hammer_bulkhead(
    fleet: &[Replica],
    tasks_per_replica: usize,
    calls_per_task: usize,
    enough: usize,
    section: std::ops::RangeInclusive<u64>,
    budget: Duration,
) -> BulkheadRun {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(AtomicUsize::new(0));
    let full = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let t0 = Instant::now();
    let stop_at = t0 + budget;
    let mut handles = Vec::new();
    for r in fleet {
        for _ in 0..tasks_per_replica {
            let c = r.coordinator.clone();
            let (in_flight, max_seen, reached, full, started, unexpected) = (
                in_flight.clone(),
                max_seen.clone(),
                reached.clone(),
                full.clone(),
                started.clone(),
                unexpected.clone(),
            );
            let section = section.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..calls_per_task {
                    if Instant::now() >= stop_at || reached.load(SeqCst) >= enough {
                        break;
                    }
                    started.fetch_add(1, SeqCst);
                    match c.admit(BULKHEAD, MODEL).await {
                        Ok(permit) => {
                            if permit.is_local() {
                                lock(&unexpected).push("a local permit".into());
                            }
                            let now = in_flight.fetch_add(1, SeqCst) + 1;
                            max_seen.fetch_max(now, SeqCst);
                            reached.fetch_add(1, SeqCst);
                            pause_ms(section.clone()).await;
                            in_flight.fetch_sub(1, SeqCst);
                            permit.success();
                        }
                        Err(Error::Rejected(Rejection::BulkheadFull { limit, .. }))
                            if limit == BULKHEAD_LIMIT =>
                        {
                            full.fetch_add(1, SeqCst);
                        }
                        Err(e) => lock(&unexpected).push(format!("{e:?}")),
                    }
                }
            }));
        }
    }
    let joined = tokio::time::timeout(budget + HANG_MARGIN, async {
        for h in handles {
            h.await.expect("a caller task panicked");
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "the bulkhead hammer hung: callers still busy {HANG_MARGIN:?} after the budget"
    );
    let unexpected = lock(&unexpected).clone();
    BulkheadRun {
        reached: reached.load(SeqCst),
        full: full.load(SeqCst),
        started: started.load(SeqCst),
        max_in_flight: max_seen.load(SeqCst),
        unexpected,
        elapsed: t0.elapsed(),
    }
}

/// `at_least`: the calls that must have got through (acquired a permit) for the run to count.
fn check_bulkhead_run(run: &BulkheadRun, at_least: usize) {
    assert!(
        run.unexpected.is_empty(),
        "{} unexpected results, first ones: {:?}",
        run.unexpected.len(),
        &run.unexpected[..run.unexpected.len().min(5)]
    );
    assert_eq!(
        run.reached + run.full,
        run.started,
        "every call either got through or was refused with BulkheadFull"
    );
    assert!(
        run.reached >= at_least,
        "only {} calls acquired a permit in {:?} (at least {at_least} needed for the test to \
         mean something)",
        run.reached,
        run.elapsed
    );
    assert!(
        run.max_in_flight <= BULKHEAD_LIMIT as usize,
        "bulkhead oversubscribed: {} calls in flight at once, limit {BULKHEAD_LIMIT}",
        run.max_in_flight
    );
    assert_eq!(
        run.max_in_flight, BULKHEAD_LIMIT as usize,
        "the fleet never used the whole bulkhead: the limit is applied too strictly"
    );
}

/// Permits left in the store after everything was recorded and flushed: none.
async fn assert_no_permit_left(fleet: &[Replica]) {
    // Releases are delivered by each replica's flusher (and, on Cluster, compensations by
    // spawned tasks): give them a moment, well under the 30 s lease that would also free them.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n = fleet[0]
            .coordinator
            .in_flight(BULKHEAD)
            .await
            .expect("in_flight");
        if n == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} permits still held after every call was recorded and flushed"
        );
        flush_all(fleet).await;
        tokio::time::sleep(ms(20)).await;
    }
}

/// 4 replicas x 100 tasks (400 callers for 8 permits) x 25 calls: 10,000 acquisitions of an
/// 8-permit bulkhead: callers keep coming until 10,000 acquisitions got through (seen here:
/// ~7 s; bulkhead waiting polls Redis, so a loaded 2-core machine may get through only a few
/// hundred a second, hence the 90 s budget, after which the test fails). At this contention
/// some callers exhaust the 2 s `max_wait`, so both outcomes (through / BulkheadFull) are
/// exercised.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulkhead_is_never_oversubscribed_across_the_fleet() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let fleet = fleet(
        REPLICAS,
        &bulkhead_config("fleet-bulkhead", single(server.url())),
    )
    .await;
    let run = hammer_bulkhead(&fleet, 100, 50, 10_000, 0..=2, Duration::from_secs(90)).await;
    eprintln!(
        "bulkhead (single node): {} calls until 10000 got through: {} reached, {} BulkheadFull, \
         max in flight {}, {:?}",
        run.started, run.reached, run.full, run.max_in_flight, run.elapsed
    );
    check_bulkhead_run(&run, 10_000);
    flush_all(&fleet).await;
    assert_no_permit_left(&fleet).await;
    assert_store_stayed_healthy(&fleet);
}

/// The same invariant on a real 3-master Redis Cluster, where the breaker part and the
/// feature part of an admission are two script calls on two hash tags. Some callers target a
/// breaker forced open: their feature part takes a permit that the compensation must give
/// back — those permits crowd the bulkhead for a moment but never let it be oversubscribed,
/// and none may stay taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulkhead_is_never_oversubscribed_on_redis_cluster() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start(3);
    let redis = RedisConfig {
        cluster: cluster.urls(),
        timeout: STORE_TIMEOUT,
        ..RedisConfig::default()
    };
    let fleet = fleet(REPLICAS, &bulkhead_config("fleet-cluster", redis)).await;
    const BLOCKED: &str = "model-forced-open";
    fleet[0]
        .coordinator
        .force_create(BLOCKED, Force::Open)
        .await
        .expect("force open");

    // Callers of the forced-open target, until the counted callers are done.
    let stop = Arc::new(AtomicBool::new(false));
    let blocked_calls = Arc::new(AtomicUsize::new(0));
    let blocked_unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut spammers = Vec::new();
    for r in &fleet {
        for _ in 0..3 {
            let c = r.coordinator.clone();
            let (stop, blocked_calls, blocked_unexpected) = (
                stop.clone(),
                blocked_calls.clone(),
                blocked_unexpected.clone(),
            );
            spammers.push(tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    match c.admit(BULKHEAD, BLOCKED).await {
                        Err(Error::Rejected(Rejection::CircuitOpen {
                            state: CircuitState::ForcedOpen,
                            ..
                        })) => {
                            blocked_calls.fetch_add(1, SeqCst);
                        }
                        Ok(p) => lock(&blocked_unexpected).push(format!("admitted: {p:?}")),
                        Err(e) => lock(&blocked_unexpected).push(format!("{e:?}")),
                    }
                    pause_ms(2..=8).await;
                }
            }));
        }
    }

    // Sections of 2–6 ms: a split admission plus its release takes a few round trips, and
    // the compensated permits of the forced-open callers crowd the bulkhead; with shorter
    // sections all 8 permits are rarely inside the section at the same instant.
    let run = hammer_bulkhead(&fleet, 16, 32, usize::MAX, 2..=6, Duration::from_secs(20)).await;
    stop.store(true, SeqCst);
    for s in spammers {
        s.await.expect("a caller task panicked");
    }
    eprintln!(
        "bulkhead (cluster): {} calls of 2048 planned: {} reached, {} BulkheadFull, max in \
         flight {}, {} refused by the forced-open breaker, {:?}",
        run.started,
        run.reached,
        run.full,
        run.max_in_flight,
        blocked_calls.load(SeqCst),
        run.elapsed
    );
    check_bulkhead_run(&run, 1000);
    let blocked_unexpected = lock(&blocked_unexpected).clone();
    assert!(
        blocked_unexpected.is_empty(),
        "calls to the forced-open target: {blocked_unexpected:?}"
    );
    assert!(
        blocked_calls.load(SeqCst) > 0,
        "the compensation path was exercised"
    );
    flush_all(&fleet).await;
    assert_no_permit_left(&fleet).await;
    assert_store_stayed_healthy(&fleet);
}

// ---------------------------------------------------------------------------------------------
// Breaker
// ---------------------------------------------------------------------------------------------

const PLAIN: &str = "plain";

/// A feature without limits, and one target with the given breaker.
fn breaker_config(tag: &str, url: String, target: &str, b: BreakerConfig) -> Config {
    let mut c = config(tag, single(url));
    c.features.insert(PLAIN.into(), FeatureConfig::default());
    c.targets.insert(target.into(), b.into());
    c
}

/// `n` failing calls from one coordinator, then flushed: they all reached the target.
async fn trip(c: &Coordinator, target: &str, n: u32) {
    for i in 0..n {
        let p = c
            .admit(PLAIN, target)
            .await
            .unwrap_or_else(|e| panic!("failure {i} of the trip was not admitted: {e}"));
        p.failure();
    }
    c.flush(Duration::from_secs(2)).await;
}

/// Half-open admits exactly `half_open_probes` calls fleet-wide per half-open period, while
/// callers on 4 replicas hammer a target whose probes fail slowly (50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_admits_exactly_n_probes_fleet_wide_per_period() {
    let _serial = SERIAL.lock().await;
    const TARGET: &str = "flaky-model";
    const PROBES: u32 = 2;
    let server = RedisServer::start();
    let b = breaker(3, ms(300), PROBES, 1000);
    let fleet = fleet(
        REPLICAS,
        &breaker_config("fleet-probes", server.url(), TARGET, b),
    )
    .await;
    trip(&fleet[0].coordinator, TARGET, 3).await;
    let snap = fleet[1]
        .coordinator
        .snapshot(TARGET)
        .await
        .expect("snapshot");
    assert_eq!(snap.state, CircuitState::Open, "tripped: {snap:?}");

    // (generation, probe?) of every call that reached the target.
    let reached = Arc::new(Mutex::new(Vec::<(u64, bool)>::new()));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for r in &fleet {
        for _ in 0..10 {
            let c = r.coordinator.clone();
            let (reached, unexpected, stop) = (reached.clone(), unexpected.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    match c.admit(PLAIN, TARGET).await {
                        Ok(p) => {
                            lock(&reached).push((p.generation(), p.is_probe()));
                            tokio::time::sleep(ms(50)).await;
                            p.failure();
                        }
                        Err(Error::Rejected(Rejection::CircuitOpen {
                            state: CircuitState::Open | CircuitState::HalfOpen,
                            retry_after: Some(_),
                            ..
                        })) => {}
                        Err(e) => lock(&unexpected).push(format!("{e:?}")),
                    }
                    pause_ms(2..=6).await;
                }
            }));
        }
    }

    // Hammer for a while, then stop while the breaker is open (every half-open period that
    // began has ended), so that no period is cut short by the end of the test.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all = all_transitions(&fleet);
        let began = all
            .iter()
            .filter(|t| t.to == CircuitState::HalfOpen)
            .count();
        let ended = all
            .iter()
            .filter(|t| t.from == CircuitState::HalfOpen)
            .count();
        if began == ended {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a half-open period did not end: {all:?}"
        );
        tokio::time::sleep(ms(2)).await;
    }
    stop.store(true, SeqCst);
    let joined = tokio::time::timeout(HAMMER_BOUND, async {
        for h in handles {
            h.await.expect("a caller task panicked");
        }
    })
    .await;
    assert!(joined.is_ok(), "callers hung");
    flush_all(&fleet).await;

    let unexpected = lock(&unexpected).clone();
    assert!(unexpected.is_empty(), "unexpected results: {unexpected:?}");
    let transitions = all_transitions(&fleet);
    let half_open: BTreeSet<u64> = transitions
        .iter()
        .filter(|t| t.to == CircuitState::HalfOpen)
        .map(|t| t.generation)
        .collect();
    let reached = lock(&reached).clone();
    let mut per_period: BTreeMap<u64, usize> = half_open.iter().map(|g| (*g, 0)).collect();
    for (generation, probe) in &reached {
        assert!(
            *probe,
            "a call reached the target without a probe slot (generation {generation})"
        );
        match per_period.get_mut(generation) {
            Some(n) => *n += 1,
            None => panic!(
                "a call reached the target in generation {generation}, which is not a \
                 half-open period; half-open generations: {half_open:?}"
            ),
        }
    }
    eprintln!("half-open periods (generation -> calls that reached the target): {per_period:?}");
    assert!(
        per_period.len() >= 2,
        "too few half-open periods observed: {per_period:?}"
    );
    for (generation, n) in &per_period {
        assert_eq!(
            *n, PROBES as usize,
            "half-open period {generation} let {n} calls reach the target, not exactly \
             {PROBES}; all periods: {per_period:?}"
        );
    }
    for t in transitions
        .iter()
        .filter(|t| t.from == CircuitState::HalfOpen)
    {
        assert_eq!(
            (t.to, t.reason),
            (CircuitState::Open, TransitionReason::ProbeFailed),
            "{t:?}"
        );
    }
    assert_store_stayed_healthy(&fleet);
}

/// While the breaker is open (long open duration), no replica reaches the target, and every
/// refusal says so with the time left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_open_no_replica_reaches_the_target() {
    let _serial = SERIAL.lock().await;
    const TARGET: &str = "down-model";
    let open = Duration::from_secs(60);
    let server = RedisServer::start();
    let fleet = fleet(
        REPLICAS,
        &breaker_config("fleet-open", server.url(), TARGET, breaker(3, open, 1, 1)),
    )
    .await;
    trip(&fleet[0].coordinator, TARGET, 3).await;
    for r in &fleet {
        let snap = r.coordinator.snapshot(TARGET).await.expect("snapshot");
        assert_eq!(snap.state, CircuitState::Open, "every replica sees it open");
    }

    let reached = Arc::new(AtomicUsize::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused: Vec<Arc<AtomicUsize>> = fleet.iter().map(|_| Arc::default()).collect();
    let until = Instant::now() + Duration::from_secs(1);
    let mut handles = Vec::new();
    for (r, refused) in fleet.iter().zip(&refused) {
        for _ in 0..25 {
            let c = r.coordinator.clone();
            let (reached, unexpected, refused) =
                (reached.clone(), unexpected.clone(), refused.clone());
            handles.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match c.admit(PLAIN, TARGET).await {
                        Ok(p) => {
                            reached.fetch_add(1, SeqCst);
                            p.failure();
                        }
                        Err(Error::Rejected(Rejection::CircuitOpen {
                            state: CircuitState::Open,
                            retry_after: Some(left),
                            ..
                        })) if left > Duration::ZERO && left <= open => {
                            refused.fetch_add(1, SeqCst);
                        }
                        Err(e) => lock(&unexpected).push(format!("{e:?}")),
                    }
                    pause_ms(0..=3).await;
                }
            }));
        }
    }
    let joined = tokio::time::timeout(HAMMER_BOUND, async {
        for h in handles {
            h.await.expect("a caller task panicked");
        }
    })
    .await;
    assert!(joined.is_ok(), "callers hung");

    let refused: Vec<usize> = refused.iter().map(|n| n.load(SeqCst)).collect();
    eprintln!("while open: refused per replica {refused:?}");
    let unexpected = lock(&unexpected).clone();
    assert!(
        unexpected.is_empty(),
        "{} unexpected results, first ones: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    assert_eq!(reached.load(SeqCst), 0, "calls reached an open target");
    for (i, n) in refused.iter().enumerate() {
        assert!(*n > 0, "replica {i} made no call");
    }
    let snap = fleet[0]
        .coordinator
        .snapshot(TARGET)
        .await
        .expect("snapshot");
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.generation, 1, "nothing changed the breaker meanwhile");
    assert_store_stayed_healthy(&fleet);
}

/// Three trip / half-open / close cycles, each step under concurrency from 4 replicas: the
/// union of the transitions they report has every generation exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_transition_is_reported_exactly_once_fleet_wide() {
    let _serial = SERIAL.lock().await;
    const TARGET: &str = "cycling-model";
    const CYCLES: u64 = 3;
    let open = ms(300);
    let server = RedisServer::start();
    let fleet = Arc::new(
        fleet(
            REPLICAS,
            &breaker_config("fleet-once", server.url(), TARGET, breaker(5, open, 1, 1)),
        )
        .await,
    );

    /// Every replica runs `per_replica` concurrent calls with `fail` as their outcome.
    async fn wave(fleet: &Arc<Vec<Replica>>, per_replica: usize, fail: bool) -> Vec<String> {
        let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut handles = Vec::new();
        for i in 0..fleet.len() {
            for _ in 0..per_replica {
                let (fleet, unexpected) = (fleet.clone(), unexpected.clone());
                handles.push(tokio::spawn(async move {
                    match fleet[i].coordinator.admit(PLAIN, TARGET).await {
                        Ok(p) => {
                            pause_ms(1..=3).await;
                            if fail {
                                p.failure();
                            } else {
                                p.success();
                            }
                        }
                        Err(Error::Rejected(Rejection::CircuitOpen { .. })) => {}
                        Err(e) => lock(&unexpected).push(format!("{e:?}")),
                    }
                }));
            }
        }
        for h in handles {
            h.await.expect("a caller task panicked");
        }
        flush_all(fleet).await;
        let out = lock(&unexpected).clone();
        out
    }

    for cycle in 0..CYCLES {
        let errors = wave(&fleet, 20, true).await;
        assert!(errors.is_empty(), "cycle {cycle}, failures: {errors:?}");
        let snap = fleet[1]
            .coordinator
            .snapshot(TARGET)
            .await
            .expect("snapshot");
        assert_eq!(snap.state, CircuitState::Open, "cycle {cycle}: tripped");
        tokio::time::sleep(open + ms(50)).await;
        let errors = wave(&fleet, 20, false).await;
        assert!(errors.is_empty(), "cycle {cycle}, probes: {errors:?}");
        let snap = fleet[2]
            .coordinator
            .snapshot(TARGET)
            .await
            .expect("snapshot");
        assert_eq!(
            snap.state,
            CircuitState::Closed,
            "cycle {cycle}: closed again"
        );
    }

    let all = all_transitions(&fleet);
    let by_replica: Vec<usize> = fleet
        .iter()
        .map(|r| r.recorder.transitions().len())
        .collect();
    eprintln!("transitions reported per replica: {by_replica:?}");
    let generations: Vec<u64> = all.iter().map(|t| t.generation).collect();
    let expected: Vec<u64> = (1..=3 * CYCLES).collect();
    assert_eq!(
        generations, expected,
        "every generation reported exactly once fleet-wide; got {all:#?}"
    );
    for t in &all {
        assert_eq!(t.target, TARGET);
        let want = match t.generation % 3 {
            1 => (
                CircuitState::Closed,
                CircuitState::Open,
                TransitionReason::ConsecutiveFailures,
            ),
            2 => (
                CircuitState::Open,
                CircuitState::HalfOpen,
                TransitionReason::OpenElapsed,
            ),
            _ => (
                CircuitState::HalfOpen,
                CircuitState::Closed,
                TransitionReason::ProbesSucceeded,
            ),
        };
        assert_eq!((t.from, t.to, t.reason), want, "{t:?}");
    }
    let snap = fleet[0]
        .coordinator
        .snapshot(TARGET)
        .await
        .expect("snapshot");
    assert_eq!(snap.generation, 3 * CYCLES);
    assert_store_stayed_healthy(&fleet);
}

// ---------------------------------------------------------------------------------------------
// Rate limit
// ---------------------------------------------------------------------------------------------

/// 4 replicas hammer a feature limited to R = 50/s with bursts of B = 10 for ~1.5 s: the
/// fleet together gets at most B + R x elapsed calls through (and a fair share of that).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_holds_fleet_wide() {
    let _serial = SERIAL.lock().await;
    const RATED: &str = "rated";
    const R: u32 = 50;
    const B: u32 = 10;
    let server = RedisServer::start();
    let mut c = config("fleet-rate", single(server.url()));
    c.features.insert(
        RATED.into(),
        FeatureConfig {
            rate: Some(RateConfig {
                requests: R,
                per: Duration::from_secs(1),
                burst: Some(B),
            }),
            on_store_unavailable: StorePolicy::FailClosed,
            ..FeatureConfig::default()
        },
    );
    let fleet = fleet(REPLICAS, &c).await;
    let emission = Duration::from_secs(1) / R;

    let admitted = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let until = started + Duration::from_millis(1500);
    let mut handles = Vec::new();
    for r in &fleet {
        for _ in 0..10 {
            let c = r.coordinator.clone();
            let (admitted, limited, unexpected) =
                (admitted.clone(), limited.clone(), unexpected.clone());
            handles.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match c.admit(RATED, MODEL).await {
                        Ok(p) => {
                            if p.is_local() {
                                lock(&unexpected).push("a local permit".into());
                            }
                            admitted.fetch_add(1, SeqCst);
                            p.success();
                        }
                        Err(Error::Rejected(Rejection::RateLimited { retry_after, .. }))
                            if retry_after > Duration::ZERO && retry_after <= emission =>
                        {
                            limited.fetch_add(1, SeqCst);
                        }
                        Err(e) => lock(&unexpected).push(format!("{e:?}")),
                    }
                    pause_ms(1..=5).await;
                }
            }));
        }
    }
    let joined = tokio::time::timeout(HAMMER_BOUND, async {
        for h in handles {
            h.await.expect("a caller task panicked");
        }
    })
    .await;
    assert!(joined.is_ok(), "callers hung");
    // Every admission happened inside [started, now].
    let elapsed = started.elapsed();

    let admitted = admitted.load(SeqCst);
    let allowed = f64::from(B) + f64::from(R) * elapsed.as_secs_f64();
    eprintln!(
        "rate: {admitted} admitted, {} refused, in {elapsed:?} (at most {allowed:.1})",
        limited.load(SeqCst)
    );
    let unexpected = lock(&unexpected).clone();
    assert!(
        unexpected.is_empty(),
        "{} unexpected results, first ones: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    assert!(
        admitted as f64 <= allowed + 2.0,
        "rate limit exceeded fleet-wide: {admitted} admitted in {elapsed:?}, at most {allowed:.1}"
    );
    // Not too strict either (e.g. not divided by the fleet size): the burst from rest plus at
    // least half of what the rate allows over the run.
    let at_least = f64::from(B) + f64::from(R) * elapsed.as_secs_f64() / 2.0;
    assert!(
        admitted as f64 >= at_least,
        "the fleet got only {admitted} calls through in {elapsed:?}"
    );
    assert!(limited.load(SeqCst) > 0, "the limit was never reached");
    assert_store_stayed_healthy(&fleet);
}

// ---------------------------------------------------------------------------------------------
// The fleet measures itself (issue 5, §2.5)
// ---------------------------------------------------------------------------------------------

/// Regression (§2.5, "the fleet size for local mode is a guess"): local mode divided the
/// limits by `redis.replicas` (default 1), so a degraded fleet of 3 with `fail_open` admitted
/// 3 x the limit. Now every coordinator keeps an expiring membership entry in Redis and local
/// mode divides by the last fleet size it observed: with a limit of 6 and Redis stopped, each
/// of 3 replicas admits 2, the fleet 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mode_divides_by_the_observed_fleet_size() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let mut redis = single(server.url());
    redis.timeout = ms(100);
    redis.failure_threshold = 1;
    redis.retry_interval = Duration::from_secs(1);
    let mut config = config("fleet-size", redis);
    config.features.insert(
        "chat".into(),
        FeatureConfig {
            max_concurrent: Some(6),
            lease: Duration::from_secs(30),
            on_store_unavailable: StorePolicy::FailOpen,
            ..FeatureConfig::default()
        },
    );
    let fleet = fleet(3, &config).await;
    for r in &fleet {
        assert_eq!(
            r.coordinator.fleet_size(),
            1,
            "nothing observed yet: the setting"
        );
        r.coordinator
            .call("chat", "m", || async { Ok::<_, ()>(()) })
            .await
            .expect("admitted and ran");
    }
    // Each coordinator joined on its first call; wait until each has seen all three.
    let started = Instant::now();
    while fleet.iter().any(|r| r.coordinator.fleet_size() != 3) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "fleet sizes observed: {:?}",
            fleet
                .iter()
                .map(|r| r.coordinator.fleet_size())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(ms(50)).await;
    }
    let members = fleet[0]
        .coordinator
        .replicas()
        .await
        .expect("membership read");
    assert_eq!(members.len(), 3, "three live members: {members:?}");
    assert_eq!(members.iter().filter(|m| m.this).count(), 1, "{members:?}");
    flush_all(&fleet).await;

    server.pause();
    let mut held = Vec::new();
    let mut admitted = Vec::new();
    for r in &fleet {
        let mut n = 0;
        for _ in 0..6 {
            if let Ok(p) = r.coordinator.admit("chat", "m").await {
                assert!(
                    p.is_local(),
                    "admitted on local state while Redis is stopped"
                );
                held.push(p);
                n += 1;
            }
        }
        admitted.push(n);
    }
    server.resume();
    assert_eq!(
        admitted,
        vec![2, 2, 2],
        "each replica admits its share of the limit (6 / 3 replicas observed)"
    );
    drop(held);
}
