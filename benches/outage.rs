//! Outage measurement: 8 replicas (8 coordinators, each with its own connection) send steady
//! traffic through one feature's guarded call (chain `primary` -> `fallback`, the
//! degraded-response cache, a canned answer, the default `[retry]` backoff and fleet retry
//! budget) while the primary model fails for a fixed period and then recovers; the fallback
//! also fails for a part of that period (every model down: cache and canned tiers). Run once
//! with the 8 coordinators on one spawned redis-server (fusebox's fleet-shared state) and once
//! with a MemoryStore per replica (per-process state), same configuration, and print the two
//! side by side.
//!
//! ```sh
//! cargo bench --bench outage
//! FUSEBOX_OUTAGE_SECS=8 cargo bench --bench outage   # outage length (default 8 s)
//! ```
//!
//! The upstream is a closure fake (a 10 ms sleep, then an answer or a retryable 503-like
//! failure), so that the figures are about fusebox, not about an HTTP server sharing two
//! cores with the load generator. "Added latency" is a request's time minus the time spent in
//! the upstream closure: fusebox's own overhead, compared between the baseline (healthy
//! primary) and the open-breaker phase (primary skipped, the fallback answers).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fusebox::cache::{Answer, Caller};
use fusebox::classify::Class;
use fusebox::pipeline::{CacheUse, ChainTarget, Tier};
use fusebox::retry::BackoffPolicy;
use fusebox::{
    BreakerConfig, CannedConfig, CircuitState, Config, Coordinator, Event, FeatureConfig, Observer,
    RedisConfig,
};
use serde_json::json;

/// The test suites' own `redis-server` spawner.
#[allow(clippy::unwrap_used, missing_docs)]
#[path = "../tests/support/mod.rs"]
mod support;

const REPLICAS: usize = 8;
const WORKERS: usize = 2;
const PAUSE: Duration = Duration::from_millis(25);
const UPSTREAM: Duration = Duration::from_millis(10);
const THRESHOLD: u32 = 5;
const OPEN: Duration = Duration::from_secs(1);
const PROBES: u32 = 1;
const BASELINE: Duration = Duration::from_secs(3);
const RECOVERY: Duration = Duration::from_secs(5);

/// The fake upstream's schedule, relative to the run's start.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    primary_down: (Duration, Duration),
    fallback_down: (Duration, Duration),
    end: Duration,
}

impl Schedule {
    fn new(start: Instant, outage: Duration) -> Schedule {
        let down = BASELINE;
        let up = BASELINE + outage;
        let third = outage / 3;
        Schedule {
            start,
            primary_down: (down, up),
            fallback_down: (down + third, down + 2 * third),
            end: up + RECOVERY,
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn down(&self, target: &str, at: Duration) -> bool {
        let (a, b) = if target == "primary" {
            self.primary_down
        } else {
            self.fallback_down
        };
        at >= a && at < b
    }
}

/// Fleet-wide counters of one run.
#[derive(Default)]
struct Counters {
    /// Calls that reached the primary while it was failing.
    failing_calls: AtomicU64,
    /// Every call that reached the failing primary: (who, started), wall clock in µs
    /// since the Unix epoch (the store's transition times are on the same host's clock).
    failing: Mutex<Vec<(usize, u64)>>,
    /// When the primary's breaker first opened, per breaker (0: the shared one; else the
    /// replica's own), in ms since the Unix epoch, as the store recorded it.
    first_open_ms: Mutex<BTreeMap<usize, u64>>,
    /// Distinct open periods of the primary: (replica or 0 for the shared store, generation).
    open_periods: Mutex<HashSet<(usize, u64)>>,
}

/// Whose breaker a replica's calls go through: 0 for the shared one, else the replica's own.
fn who(shared_store: bool, replica: usize) -> usize {
    if shared_store {
        0
    } else {
        replica + 1
    }
}

fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Watch {
    replica: usize,
    shared_store: bool,
    counters: Arc<Counters>,
}

impl Observer for Watch {
    fn on_event(&self, event: &Event) {
        if let Event::Transition(t) = event {
            if t.target == "primary" && t.to == CircuitState::Open {
                let who = who(self.shared_store, self.replica);
                if let Ok(mut first) = self.counters.first_open_ms.lock() {
                    let e = first.entry(who).or_insert(t.at_ms);
                    *e = (*e).min(t.at_ms);
                }
                if let Ok(mut s) = self.counters.open_periods.lock() {
                    s.insert((who, t.generation));
                }
            }
        }
    }
}

/// One request as measured.
struct Sample {
    replica: usize,
    started: Duration,
    latency: Duration,
    upstream: Duration,
    tier: Tier,
    /// Attempts beyond the first at the same target.
    retries: u32,
    primary_called: bool,
}

fn config(namespace: &str, redis: Option<String>) -> Config {
    let mut config = Config {
        namespace: namespace.to_owned(),
        redis: redis.map(|url| RedisConfig {
            url: Some(url),
            timeout: Duration::from_secs(1),
            ..RedisConfig::default()
        }),
        breaker: BreakerConfig {
            consecutive_failures: Some(THRESHOLD),
            open_duration: OPEN,
            half_open_probes: PROBES,
            half_open_successes: 1,
            ..BreakerConfig::default()
        },
        ..Config::default()
    };
    config.cache.enabled = true;
    config.features.insert(
        "chat".into(),
        FeatureConfig {
            chain: vec!["primary".into(), "fallback".into()],
            canned: Some(CannedConfig {
                text: "Busy; please try again in a minute.".into(),
                retry_after: Some(Duration::from_secs(60)),
            }),
            ..FeatureConfig::default()
        },
    );
    config
}

async fn one_request(
    c: &Coordinator,
    retry: &BackoffPolicy,
    schedule: Schedule,
    counters: &Counters,
    replica: usize,
    shared_store: bool,
    question: usize,
) -> Option<Sample> {
    let request = json!({"model": "m", "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("question {question}")}]});
    let to_answer = |text: &String, t: &ChainTarget| {
        Answer::success(
            200,
            t.model.clone(),
            json!({"type": "message", "content": [{"type": "text", "text": text}]}),
        )
        .ok()
    };
    let cache = CacheUse {
        caller: Caller {
            api_key: Some("sk-bench-tenant"),
            tenant_id: None,
        },
        request: &request,
        answer: &to_answer,
    };
    let upstream = Mutex::new(Duration::ZERO);
    let tried = Mutex::new(Vec::<String>::new());
    let call = |t: &ChainTarget, _n: u32| {
        let name = t.name.clone();
        let upstream = &upstream;
        let tried = &tried;
        async move {
            let began = Instant::now();
            let began_us = epoch_us();
            let primary = name == "primary";
            let failing = schedule.down(&name, schedule.now());
            if primary && failing {
                counters.failing_calls.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(UPSTREAM).await;
            if primary && failing {
                if let Ok(mut f) = counters.failing.lock() {
                    f.push((who(shared_store, replica), began_us));
                }
            }
            if let Ok(mut u) = upstream.lock() {
                *u += began.elapsed();
            }
            if let Ok(mut t) = tried.lock() {
                t.push(name.clone());
            }
            if failing {
                Err(Class::Retryable { retry_after: None })
            } else {
                Ok(format!("{name} answers"))
            }
        }
    };
    let started = schedule.now();
    let t0 = Instant::now();
    let answered = c
        .guarded_call_cached("chat", retry, Some(cache), call, |e: &Class| *e)
        .await
        .ok()?;
    let latency = t0.elapsed();
    let tried = tried.into_inner().ok()?;
    let distinct: HashSet<&String> = tried.iter().collect();
    Some(Sample {
        replica,
        started,
        latency,
        upstream: upstream.into_inner().ok()?,
        tier: answered.tier,
        retries: (tried.len() - distinct.len()) as u32,
        primary_called: tried.iter().any(|t| t == "primary"),
    })
}

struct Report {
    label: &'static str,
    failing_calls: u64,
    /// Failing calls that began before their breaker first opened (the threshold's calls
    /// and those in flight at the opening), summed over breakers.
    before_open: usize,
    /// Failing calls that began after their breaker first opened (probes).
    after_open: usize,
    /// Breakers that opened.
    breakers_opened: usize,
    open_periods: usize,
    retries: u64,
    requests: usize,
    tiers: BTreeMap<&'static str, usize>,
    base: (f64, f64),
    open: (f64, f64),
    open_count: usize,
    back_first: Option<Duration>,
    back_all: Option<Duration>,
    errors: usize,
}

impl Report {
    /// Failing calls admitted before their breaker opened beyond the threshold's own.
    fn in_flight(&self) -> usize {
        self.before_open
            .saturating_sub(THRESHOLD as usize * self.breakers_opened)
    }
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i].as_secs_f64() * 1e6
    };
    (at(0.5), at(0.99))
}

fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Primary => "primary",
        Tier::Fallback => "fallback",
        Tier::Cache => "cache",
        Tier::Canned => "canned",
        _ => "other",
    }
}

async fn run(label: &'static str, redis: Option<String>, outage: Duration) -> Report {
    let namespace = support::unique_name("outage");
    let counters = Arc::new(Counters::default());
    let mut coordinators = Vec::new();
    for replica in 0..REPLICAS {
        let c = Coordinator::builder(config(&namespace, redis.clone()))
            .observer(Arc::new(Watch {
                replica,
                shared_store: redis.is_some(),
                counters: Arc::clone(&counters),
            }))
            .build()
            .await
            .expect("valid configuration");
        coordinators.push(c);
    }
    let schedule = Schedule::new(Instant::now(), outage);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (replica, c) in coordinators.iter().enumerate() {
        for worker in 0..WORKERS {
            let c = c.clone();
            let counters = Arc::clone(&counters);
            let samples = Arc::clone(&samples);
            let errors = Arc::clone(&errors);
            let shared = redis.is_some();
            tasks.push(tokio::spawn(async move {
                let retry = BackoffPolicy::new(c.retry_backoff("chat").expect("chat"));
                let mut q = replica * 31 + worker * 7;
                while schedule.now() < schedule.end {
                    q = (q + 1) % 16;
                    match one_request(&c, &retry, schedule, &counters, replica, shared, q).await {
                        Some(s) => samples.lock().expect("samples").push(s),
                        None => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(PAUSE).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("worker");
    }
    for c in &coordinators {
        let _ = c.flush(Duration::from_secs(2)).await;
    }
    let samples = std::mem::take(&mut *samples.lock().expect("samples"));
    let (down, up) = schedule.primary_down;
    let mut tiers = BTreeMap::new();
    for s in &samples {
        *tiers.entry(tier_name(s.tier)).or_insert(0) += 1;
    }
    let overhead = |s: &Sample| s.latency.saturating_sub(s.upstream);
    let base: Vec<Duration> = samples
        .iter()
        .filter(|s| s.started < down && s.tier == Tier::Primary)
        .map(overhead)
        .collect();
    let open: Vec<Duration> = samples
        .iter()
        .filter(|s| {
            s.started >= down && s.started < up && !s.primary_called && s.tier == Tier::Fallback
        })
        .map(overhead)
        .collect();
    let open_count = open.len();
    let mut first_back: BTreeMap<usize, Duration> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.started >= up && s.tier == Tier::Primary)
    {
        let e = first_back.entry(s.replica).or_insert(s.started);
        *e = (*e).min(s.started);
    }
    let back_first = first_back.values().min().map(|t| t.saturating_sub(up));
    let back_all = (first_back.len() == REPLICAS)
        .then(|| first_back.values().max().map(|t| t.saturating_sub(up)))
        .flatten();
    let open_periods = counters.open_periods.lock().map(|s| s.len()).unwrap_or(0);
    let first_open = counters
        .first_open_ms
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let failing = counters
        .failing
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    // A call that reached the primary after its breaker opened can only be a probe (any other
    // admission is refused from the opening on); one that began before was admitted before
    // the opening: one of the threshold's failures, or in flight when it opened. The opening's
    // time is the store's, in whole ms (so a call of that same ms counts as "before").
    let mut before_open = 0usize;
    for &(who, began) in &failing {
        // A breaker that never opened: every call is "before".
        let at_us = first_open
            .get(&who)
            .map_or(u64::MAX, |ms| (ms + 1).saturating_mul(1000));
        if began < at_us {
            before_open += 1;
        }
    }
    Report {
        label,
        failing_calls: counters.failing_calls.load(Ordering::SeqCst),
        before_open,
        after_open: failing.len() - before_open,
        breakers_opened: first_open.len(),
        open_periods,
        retries: samples.iter().map(|s| u64::from(s.retries)).sum(),
        requests: samples.len(),
        tiers,
        base: percentiles(base),
        open: percentiles(open),
        open_count,
        back_first,
        back_all,
        errors: errors.load(Ordering::Relaxed),
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_owned(), |d| format!("{} ms", d.as_millis()))
}

fn print(reports: &[Report], outage: Duration) {
    println!(
        "\n{REPLICAS} replicas x {WORKERS} workers, a request every {PAUSE:?} per worker, upstream {UPSTREAM:?}; \
         breaker: {THRESHOLD} consecutive failures, open {OPEN:?}, {PROBES} probe; \
         primary down {outage:?} after a {BASELINE:?} baseline, fallback down for the middle third; {RECOVERY:?} after recovery\n"
    );
    print!("{:<52}", "");
    for r in reports {
        print!("{:>24}", r.label);
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&Report) -> String| {
        print!("{name:<52}");
        for r in reports {
            print!("{:>24}", f(r));
        }
        println!();
    };
    row("requests", &|r| r.requests.to_string());
    row("calls that reached the failing primary", &|r| {
        r.failing_calls.to_string()
    });
    row("  primary open periods (fleet)", &|r| {
        r.open_periods.to_string()
    });
    row("  breakers that opened", &|r| r.breakers_opened.to_string());
    row("  began before the breaker opened", &|r| {
        r.before_open.to_string()
    });
    row("    threshold x breakers", &|r| {
        (THRESHOLD as usize * r.breakers_opened).to_string()
    });
    row("    in flight when it opened (the rest)", &|r| {
        r.in_flight().to_string()
    });
    row("  began after it opened (probes)", &|r| {
        r.after_open.to_string()
    });
    row("    at most: probes x open periods", &|r| {
        (u64::from(PROBES) * r.open_periods as u64).to_string()
    });
    row("  target: threshold + in flight + probes x periods", &|r| {
        (THRESHOLD as usize * r.breakers_opened + r.in_flight() + PROBES as usize * r.open_periods)
            .to_string()
    });
    row(
        "  per-replica bound: (threshold + probes x periods/replica) x replicas",
        &|r| {
            let per = r.open_periods.div_ceil(REPLICAS.max(1));
            ((u64::from(THRESHOLD) + u64::from(PROBES) * per as u64) * REPLICAS as u64).to_string()
        },
    );
    row("retries sent", &|r| r.retries.to_string());
    for tier in ["primary", "fallback", "cache", "canned"] {
        row(&format!("answered by {tier}"), &|r| {
            r.tiers.get(tier).copied().unwrap_or(0).to_string()
        });
    }
    row("errors (no answer)", &|r| r.errors.to_string());
    row("overhead p50 / p99, baseline (us)", &|r| {
        format!("{:.0} / {:.0}", r.base.0, r.base.1)
    });
    row("overhead p50 / p99, breaker open (us)", &|r| {
        format!("{:.0} / {:.0}", r.open.0, r.open.1)
    });
    row("  added once open, p50 / p99 (us; target < 1000)", &|r| {
        format!("{:.0} / {:.0}", r.open.0 - r.base.0, r.open.1 - r.base.1)
    });
    row("  requests with the breaker open (sampled)", &|r| {
        r.open_count.to_string()
    });
    row("back on the primary after recovery: first", &|r| {
        ms(r.back_first)
    });
    row("back on the primary after recovery: every replica", &|r| {
        ms(r.back_all)
    });
}

fn main() {
    let outage = std::env::var("FUSEBOX_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(8), Duration::from_secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = support::RedisServer::start();
    let url = server.url();
    let reports = rt.block_on(async {
        let redis = run("fusebox on Redis", Some(url), outage).await;
        let memory = run("per-replica memory", None, outage).await;
        vec![redis, memory]
    });
    print(&reports, outage);
    drop(server);
}
