//! Does a large cache write delay an admission? Admission latency (admit + record, one
//! caller, one after the other) on the Redis store, alone and while other tasks write
//! 100 KB answers to the degraded-response cache as fast as they can, through the same
//! coordinator (which sends cache traffic through its own deadpool-redis pool, never the
//! admission connection). For contrast, the same pair of figures for a trivial `EVALSHA` on
//! one redis-rs `ConnectionManager` alone and with 100 KB `SET`s sent on that same
//! multiplexed connection: what sharing the hot path's connection would cost.
//!
//! ```sh
//! cargo bench --bench cache_writes                  # spawns redis-server on a free port
//! FUSEBOX_BENCH_SECS=5 FUSEBOX_BENCH_WRITERS=4 cargo bench --bench cache_writes
//! FUSEBOX_BENCH_WRITE_RATE=0 cargo bench --bench cache_writes   # writers unthrottled
//! ```
//!
//! Latency figures on a shared machine are noisy: read each pair (baseline beside the figure
//! under writes), taken in the same run on the same Redis.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusebox::cache::{Answer, Caller};
use fusebox::{CacheConfig, CallOutcome, Config, Coordinator, FeatureConfig, RedisConfig};
use serde_json::json;

#[allow(clippy::unwrap_used, missing_docs)]
#[path = "../tests/support/mod.rs"]
mod support;

const VALUE_BYTES: usize = 100 * 1024;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    n: usize,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `op` one call after the other for `secs`, returning latency percentiles.
async fn latencies<F, Fut>(secs: f64, op: F) -> Figures
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..100 {
        op().await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        op().await;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    Figures {
        n: lat.len(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn row(name: &str, base: &Figures, loaded: &Figures, writes: u64, secs: f64) {
    println!(
        "{name:<44} alone p50 {:>8.1} µs p99 {:>8.1} µs (n={:>6}) | with writes p50 {:>8.1} µs \
         p99 {:>8.1} µs (n={:>6}, {:.0} writes/s of 100 KB)",
        base.p50_us,
        base.p99_us,
        base.n,
        loaded.p50_us,
        loaded.p99_us,
        loaded.n,
        writes as f64 / secs,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_f64("FUSEBOX_BENCH_SECS", 3.0);
    let writers = env_f64("FUSEBOX_BENCH_WRITERS", 2.0) as usize;
    // Total 100 KB writes per second across the writers (0: as fast as they can). Both rows
    // write at this rate, so their figures compare.
    let rate = env_f64("FUSEBOX_BENCH_WRITE_RATE", 200.0);
    let pause = if rate > 0.0 {
        Duration::from_secs_f64(writers as f64 / rate)
    } else {
        Duration::ZERO
    };
    let (url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let s = support::RedisServer::start();
            (s.url(), Some(s))
        }
    };
    let mut config = Config {
        namespace: format!("bench-cache-{}", std::process::id()),
        redis: Some(RedisConfig {
            url: Some(url.clone()),
            timeout: Duration::from_secs(1),
            ..RedisConfig::default()
        }),
        cache: CacheConfig {
            enabled: true,
            max_value_bytes: 1024 * 1024,
            max_entries: 200,
            timeout: Duration::from_secs(2),
            ..CacheConfig::default()
        },
        ..Config::default()
    };
    config
        .features
        .insert("chat".into(), FeatureConfig::default());
    let c = Coordinator::builder(config)
        .require_store(true)
        .build()
        .await
        .expect("coordinator");

    let admit = || {
        let c = c.clone();
        async move {
            let p = c.admit("chat", "claude-sonnet-4-6").await.expect("admit");
            p.record(CallOutcome::Success);
        }
    };

    println!("cache_writes: {secs} s per figure, {writers} writer task(s) at {rate} writes/s in all (0: unthrottled), values of {VALUE_BYTES} bytes, Redis at {url}");
    let base = latencies(secs, admit).await;

    // Writers: 100 KB answers, distinct questions, through the coordinator's cache pool.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (c, stop, written) = (c.clone(), Arc::clone(&stop), Arc::clone(&written));
        tasks.push(tokio::spawn(async move {
            let body = json!({"type": "message", "content": [{"type": "text", "text": "x".repeat(VALUE_BYTES)}]});
            let ans = Answer::success(200, "claude-sonnet-4-6", body).expect("answer");
            let who = Caller { api_key: Some("bench-key"), tenant_id: None };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = json!({"max_tokens": 10, "messages": [{"role": "user", "content": format!("q {w} {i}")}]});
                if matches!(c.cache_put("chat", who, &req, &ans).await, Ok(fusebox::cache::Stored::Yes)) {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                tokio::time::sleep(pause).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    written.store(0, Ordering::Relaxed);
    let loaded = latencies(secs, admit).await;
    let writes = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    row(
        "(a) fusebox admit+record, cache pool",
        &base,
        &loaded,
        writes,
        secs,
    );
    assert!(
        !c.is_degraded(),
        "the coordinator fell back to local state during the run"
    );

    // Contrast: one multiplexed connection carrying both.
    let client = redis::Client::open(url.as_str()).expect("url");
    let cm = client
        .get_connection_manager()
        .await
        .expect("connection manager");
    let script = redis::Script::new("return 1");
    let eval = || {
        let mut cm = cm.clone();
        let script = &script;
        async move {
            let _: i64 = script.invoke_async(&mut cm).await.expect("evalsha");
        }
    };
    let base = latencies(secs, eval).await;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (mut cm, stop, written) = (cm.clone(), Arc::clone(&stop), Arc::clone(&written));
        tasks.push(tokio::spawn(async move {
            let value = "x".repeat(VALUE_BYTES);
            while !stop.load(Ordering::Relaxed) {
                let r: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(format!("bench-cache-contrast-{w}"))
                    .arg(&value)
                    .query_async(&mut cm)
                    .await;
                if r.is_ok() {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(pause).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    written.store(0, Ordering::Relaxed);
    let loaded = latencies(secs, eval).await;
    let writes = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    row(
        "(b) EVALSHA, 100 KB SETs on the same conn",
        &base,
        &loaded,
        writes,
        secs,
    );
}
