//! The fleet-wide retry budget per target through the coordinator: on the embedded
//! MemoryStore (paused Tokio time), on one Redis shared by several coordinators, on a Redis
//! Cluster, in local mode when Redis is gone, and in a storm where every attempt fails and
//! four coordinators retry as fast as the budget lets them.

mod support;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use fusebox::clock::TokioClock;
use fusebox::retry::{Attempts, Backoff, BackoffParams, Jitter, Stop, Verdict};
use fusebox::{
    BudgetConfig, Config, Coordinator, Event, FeatureConfig, RedisConfig, RetryOverrides, Source,
    Withdrawal,
};
use support::{unique_name, Recorder, RedisCluster, RedisServer};

const TARGET: &str = "claude-sonnet-4-6";

fn config(budget: BudgetConfig) -> Config {
    let mut c = Config {
        namespace: unique_name("retry").replace(':', "-"),
        ..Config::default()
    };
    c.retry.budget = Some(budget);
    c.features.insert("chat".into(), FeatureConfig::default());
    c.features.insert(
        "batch".into(),
        FeatureConfig {
            retry: RetryOverrides {
                budget: Some(false),
                ..RetryOverrides::default()
            },
            ..FeatureConfig::default()
        },
    );
    c
}

fn budget(ratio: f64, window_s: u64, min_per_second: f64) -> BudgetConfig {
    BudgetConfig {
        ratio,
        window: Duration::from_secs(window_s),
        min_per_second,
    }
}

fn on_redis(mut c: Config, url: Option<String>, cluster: Vec<String>) -> Config {
    c.redis = Some(RedisConfig {
        url,
        cluster,
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    });
    c
}

fn granted(w: &Withdrawal, source: Source) -> bool {
    matches!(w, Withdrawal::Granted { source: s } if *s == source)
}

#[tokio::test(start_paused = true)]
async fn embedded_budget_allows_the_ratio_of_requests_in_the_window() {
    let recorder = Arc::new(Recorder::default());
    let c = Coordinator::builder(config(budget(0.2, 10, 0.0)))
        .observer(recorder.clone())
        .clock(Arc::new(TokioClock::new()))
        .build()
        .await
        .expect("builds");
    let b = c.retry_budget("chat", TARGET).expect("budget");
    for _ in 0..10 {
        b.deposit();
    }
    assert!(granted(&b.withdraw().await, Source::Embedded));
    assert!(granted(&b.withdraw().await, Source::Embedded));
    assert_eq!(
        b.withdraw().await,
        Withdrawal::Spent {
            source: Source::Embedded,
            requests: 10,
            retries: 2
        },
        "20% of 10 requests: 2 retries"
    );
    assert!(recorder.events().iter().any(|e| matches!(
        e,
        Event::RetryBudgetSpent { target, source: Source::Embedded } if target == TARGET
    )));
    // Another target has its own budget; the opted-out feature is not limited.
    let other = c.retry_budget("chat", "claude-haiku-4-5").expect("budget");
    assert!(!other.withdraw().await.is_granted());
    let batch = c.retry_budget("batch", TARGET).expect("budget");
    assert_eq!(batch.withdraw().await, Withdrawal::Unlimited);
    assert!(c.retry_budget("nope", TARGET).is_err());

    // The window slides: ten seconds later the requests no longer count.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!b.withdraw().await.is_granted());
    for _ in 0..5 {
        b.deposit();
    }
    assert!(granted(&b.withdraw().await, Source::Embedded));
    assert!(!b.withdraw().await.is_granted());
}

/// Two coordinators on one store: what one deposits, the other can spend.
async fn shared_by_two(config: Config) {
    let a = Coordinator::new(config.clone()).await.expect("a builds");
    let b = Coordinator::new(config).await.expect("b builds");
    let ba = a.retry_budget("chat", TARGET).expect("budget");
    let bb = b.retry_budget("chat", TARGET).expect("budget");
    for _ in 0..10 {
        ba.deposit();
    }
    // A's withdrawal carries its ten undelivered requests along.
    assert!(granted(&ba.withdraw().await, Source::Shared));
    assert!(
        granted(&bb.withdraw().await, Source::Shared),
        "B spends A's"
    );
    assert_eq!(
        bb.withdraw().await,
        Withdrawal::Spent {
            source: Source::Shared,
            requests: 10,
            retries: 2
        }
    );
    // Deposits without a withdrawal reach the store from A's background task.
    for _ in 0..10 {
        ba.deposit();
    }
    let mut delivered = false;
    for _ in 0..100 {
        if bb.withdraw().await.is_granted() {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "A's deposits never reached the shared store");
    assert!(!a.is_degraded() && !b.is_degraded());
}

#[tokio::test]
async fn budget_is_shared_by_coordinators_on_one_redis() {
    let server = RedisServer::start();
    shared_by_two(on_redis(
        config(budget(0.2, 10, 0.0)),
        Some(server.url()),
        vec![],
    ))
    .await;
}

#[tokio::test]
async fn budget_is_shared_by_coordinators_on_redis_cluster() {
    let cluster = RedisCluster::start(3);
    shared_by_two(on_redis(config(budget(0.2, 10, 0.0)), None, cluster.urls())).await;
}

#[tokio::test]
async fn with_redis_down_the_budget_is_local_and_its_floor_divided_by_the_fleet() {
    let mut server = RedisServer::start();
    let mut c = on_redis(config(budget(0.0, 10, 1.0)), Some(server.url()), vec![]);
    if let Some(r) = c.redis.as_mut() {
        r.replicas = 2;
        r.timeout = Duration::from_millis(200);
    }
    let coordinator = Coordinator::new(c).await.expect("builds");
    let b = coordinator.retry_budget("chat", TARGET).expect("budget");
    assert!(granted(&b.withdraw().await, Source::Shared));
    server.kill();
    // 1 retry/s over 10 s is 10 fleet-wide; alone, this replica of two gets 5.
    let mut local = 0;
    let mut spent = 0;
    for _ in 0..8 {
        match b.withdraw().await {
            Withdrawal::Granted {
                source: Source::Local,
            } => local += 1,
            Withdrawal::Spent {
                source: Source::Local,
                ..
            } => spent += 1,
            other => panic!("expected a local decision, got {other:?}"),
        }
    }
    assert_eq!((local, spent), (5, 3));
}

/// What reached the protected call during a storm.
#[derive(Default)]
struct Reached {
    requests: AtomicU64,
    retries: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_across_four_coordinators_stays_within_the_budget() {
    let server = RedisServer::start();
    storm("redis", |c| on_redis(c, Some(server.url()), vec![])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_across_four_coordinators_on_cluster_stays_within_the_budget() {
    let cluster = RedisCluster::start(3);
    storm("cluster", |c| on_redis(c, None, cluster.urls())).await;
}

/// Four coordinators, every attempt failing, retries as fast as the budget allows.
async fn storm(name: &str, store: impl Fn(Config) -> Config) {
    const REPLICAS: usize = 4;
    const TASKS: usize = 8;
    const REQUESTS: usize = 25;
    // A window longer than the storm: every request and retry counts against one window, so
    // the bound is exact: retries <= 20% of requests.
    let ratio = 0.2;
    let config = store(config(budget(ratio, 600, 0.0)));
    let mut fleet = Vec::new();
    for _ in 0..REPLICAS {
        fleet.push(Coordinator::new(config.clone()).await.expect("builds"));
    }
    let reached = Arc::new(Reached::default());
    let spent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in &fleet {
        for t in 0..TASKS {
            let (c, reached, spent) = (c.clone(), Arc::clone(&reached), Arc::clone(&spent));
            tasks.push(tokio::spawn(async move {
                let clock = TokioClock::new();
                let budget = c.retry_budget("chat", TARGET).expect("budget");
                for i in 0..REQUESTS {
                    let params = BackoffParams {
                        base: Duration::from_millis(1),
                        cap: Duration::from_millis(4),
                        max_attempts: 4,
                        jitter: Jitter::Full,
                        retry_after_cap: Duration::from_secs(1),
                    };
                    let r = Attempts {
                        backoff: Backoff::seeded(params, (t * REQUESTS + i) as u64),
                        clock: &clock,
                        deadline_ms: None,
                        attempt_timeout: Duration::from_secs(5),
                        budget: Some(&budget),
                    }
                    .run(
                        |n| {
                            if n == 1 {
                                reached.requests.fetch_add(1, SeqCst);
                            } else {
                                reached.retries.fetch_add(1, SeqCst);
                            }
                            async { Err::<(), _>("529 overloaded") }
                        },
                        |_| Verdict::Retry { retry_after: None },
                        || "timeout",
                    )
                    .await;
                    if r.stop == Stop::BudgetSpent {
                        spent.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let requests = reached.requests.load(SeqCst);
    let retries = reached.retries.load(SeqCst);
    eprintln!(
        "storm on {name}: {REPLICAS} coordinators, {requests} requests, {retries} retries reached the \
         call ({:.3} per request; budget {ratio}, without it {}), {} requests stopped by the \
         budget",
        retries as f64 / requests as f64,
        requests * 3,
        spent.load(SeqCst)
    );
    assert_eq!(requests as usize, REPLICAS * TASKS * REQUESTS);
    assert!(
        retries as f64 <= ratio * requests as f64,
        "{retries} retries for {requests} requests: over the {ratio} budget"
    );
    assert!(retries > 0, "the budget was never spent on a retry");
    assert!(
        fleet.iter().all(|c| !c.is_degraded()),
        "a replica went local"
    );
}
