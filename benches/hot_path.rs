//! Hot-path benchmark: what fusebox adds to a call, against the cost of one Redis round trip
//! measured in the same run on the same Redis through the same client.
//!
//! ```sh
//! cargo bench --bench hot_path                     # spawns redis-server on a free port
//! REDIS_URL=redis://127.0.0.1:6379 cargo bench --bench hot_path
//! FUSEBOX_BENCH_SECS=5 cargo bench --bench hot_path
//! FUSEBOX_BENCH_CONCURRENCY=64 FUSEBOX_BENCH_SECS=20 cargo bench --bench hot_path  # one level
//! FUSEBOX_BENCH_SETTLE_DELAY_MS=0 cargo bench --bench hot_path  # redis.settle_delay (default 2)
//! ```
//!
//! Rows, each at concurrency 1 and 64:
//! (a) raw `EVALSHA` of a trivial script through a redis-rs `ConnectionManager` (the client
//!     fusebox uses); (b) a fusebox-guarded no-op call (admit + record + release) on the
//!     Redis store, with a breaker, a bulkhead and a rate limit in force; (c) the same on the
//!     in-memory store; (d) a deadpool-redis checkout + the same `EVALSHA`, to show what a
//!     pool checkout would cost on the hot path; (e) `admit.lua` alone, one `EVALSHA` per
//!     admission through the same client (no fusebox client code, no batching, no release):
//!     what the admission script itself costs over the trivial one.
//! Then (f): one caller, `max_concurrent = 1`, 200 calls one after the other, on each store,
//! printing how many were refused (must be 0: a replica sees its own releases).
//!
//! Each row also shows the Redis server's CPU time per operation (from `INFO cpu`, taken
//! before and after the row, after the row's queued settles were flushed), a figure that
//! does not depend on how busy the client side of the machine was.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fusebox::{CallOutcome, Config, Coordinator, FeatureConfig, RateConfig, RedisConfig};

/// The test suites' own `redis-server` spawner, so that tests, difftest and this benchmark
/// start Redis the same way.
#[allow(clippy::unwrap_used, missing_docs)]
#[path = "../tests/support/mod.rs"]
mod support;

/// `REDIS_URL` if set, else a `redis-server` of its own on a free loopback port (kept alive
/// by the returned value).
fn redis_url() -> (String, Option<support::RedisServer>) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return (url, None);
    }
    let server = support::RedisServer::start();
    (server.url(), Some(server))
}

#[derive(Clone, Copy)]
struct Figures {
    ops: f64,
    p50_us: f64,
    p99_us: f64,
    /// Operations measured (for the Redis CPU per operation).
    count: usize,
}

/// Redis server CPU seconds (user + system) so far, from `INFO cpu`.
async fn redis_cpu(conn: &mut redis::aio::ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .expect("INFO cpu");
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k == "used_cpu_user" || k == "used_cpu_sys").then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

async fn measure<F, Fut>(concurrency: usize, secs: f64, op: F) -> Figures
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    // Warm-up.
    for _ in 0..200 {
        op().await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let op = Arc::clone(&op);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while Instant::now() < deadline {
                let t = Instant::now();
                op().await;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("bench task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    Figures {
        ops: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        count: all.len(),
    }
}

/// `redis.settle_delay` for row (b): `FUSEBOX_BENCH_SETTLE_DELAY_MS`, else the default.
fn settle_delay() -> Duration {
    match std::env::var("FUSEBOX_BENCH_SETTLE_DELAY_MS") {
        Ok(ms) => Duration::from_millis(ms.parse().expect("FUSEBOX_BENCH_SETTLE_DELAY_MS: ms")),
        Err(_) => RedisConfig::default().settle_delay,
    }
}

fn config(redis: Option<String>) -> Config {
    let mut c = Config {
        namespace: format!("bench-{}", std::process::id()),
        ..Config::default()
    };
    c.redis = redis.map(|url| RedisConfig {
        url: Some(url),
        timeout: Duration::from_secs(2),
        settle_delay: settle_delay(),
        ..RedisConfig::default()
    });
    c.features.insert(
        "bench".into(),
        FeatureConfig {
            max_concurrent: Some(100_000),
            rate: Some(RateConfig {
                requests: 100_000_000,
                per: Duration::from_secs(100),
                burst: Some(100_000_000),
            }),
            ..FeatureConfig::default()
        },
    );
    c
}

/// `redis_cpu_s`: Redis CPU seconds the row used (warm-up and flush included).
fn row(name: &str, c: usize, f: Figures, redis_cpu_s: f64) {
    println!(
        "{name:<44} c={c:<3} {:>9.0} ops/s  p50 {:>7.1} µs  p99 {:>7.1} µs  Redis CPU {:>5.1} µs/op",
        f.ops,
        f.p50_us,
        f.p99_us,
        redis_cpu_s * 1e6 / (f.count + 200) as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would run us too: do little then.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("FUSEBOX_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (url, _server) = redis_url();
    rt.block_on(async move {
        let client = redis::Client::open(url.as_str()).expect("url");
        let conn = client
            .get_connection_manager()
            .await
            .expect("connect to Redis");
        let script = Arc::new(redis::Script::new("return 1"));
        let admit_script = Arc::new(redis::Script::new(include_str!("../lua/admit.lua")));
        let ids = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut info = conn.clone();
        let redis_fusebox = Coordinator::new(config(Some(url.clone())))
            .await
            .expect("coordinator");
        let memory_fusebox = Coordinator::new(config(None)).await.expect("coordinator");
        let pool = deadpool_redis::Config::from_url(url.as_str())
            .builder()
            .expect("pool config")
            .max_size(64)
            .wait_timeout(Some(Duration::from_secs(2)))
            .create_timeout(Some(Duration::from_secs(2)))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .expect("pool");

        println!(
            "fusebox hot path, {secs} s per row, same Redis, same run ({url}); settle_delay {:?}",
            settle_delay()
        );
        let levels: Vec<usize> = match std::env::var("FUSEBOX_BENCH_CONCURRENCY") {
            Ok(v) => vec![v.parse().expect("FUSEBOX_BENCH_CONCURRENCY: a number")],
            Err(_) => vec![1, 64],
        };
        for &c in &levels {
            let cpu0 = redis_cpu(&mut info).await;
            let (conn_a, script_a) = (conn.clone(), Arc::clone(&script));
            let a = measure(c, secs, move || {
                let mut conn = conn_a.clone();
                let script = Arc::clone(&script_a);
                async move {
                    let _: i64 = script.invoke_async(&mut conn).await.expect("EVALSHA");
                }
            })
            .await;
            let cpu1 = redis_cpu(&mut info).await;
            let fb = redis_fusebox.clone();
            let b = measure(c, secs, move || {
                let fb = fb.clone();
                async move {
                    let p = fb.admit("bench", "model").await.expect("admitted");
                    p.record(CallOutcome::Success);
                }
            })
            .await;
            redis_fusebox.flush(Duration::from_secs(5)).await;
            let cpu2 = redis_cpu(&mut info).await;
            let fm = memory_fusebox.clone();
            let m = measure(c, secs, move || {
                let fm = fm.clone();
                async move {
                    let p = fm.admit("bench", "model").await.expect("admitted");
                    p.record(CallOutcome::Success);
                }
            })
            .await;
            let cpu3 = redis_cpu(&mut info).await;
            let (pool_d, script_d) = (pool.clone(), Arc::clone(&script));
            let d = measure(c, secs, move || {
                let pool = pool_d.clone();
                let script = Arc::clone(&script_d);
                async move {
                    let mut conn = pool.get().await.expect("pool checkout");
                    let _: i64 = script.invoke_async(&mut conn).await.expect("EVALSHA");
                }
            })
            .await;
            let cpu4 = redis_cpu(&mut info).await;
            let (conn_e, script_e, ids_e) = (conn.clone(), Arc::clone(&admit_script), ids.clone());
            let tag = format!("fusebox:{{bench-{}:raw}}:v1", std::process::id());
            let keys: Arc<[String; 4]> = Arc::new(
                ["breaker", "probes", "rate", "permits"].map(|k| format!("{tag}:{k}")),
            );
            let e = measure(c, secs, move || {
                let mut conn = conn_e.clone();
                let script = Arc::clone(&script_e);
                let keys = Arc::clone(&keys);
                let id = ids_e.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    // Mode `both`: breaker (1 probe, 30 s probe timeout, 24 h idle TTL), rate
                    // limit (1 µs emission, burst 10^8: never refuses), bulkhead (limit 10^9:
                    // never refuses; 60 s lease; permits are not released, as a raw script
                    // call has no settle).
                    let _: Vec<i64> = script
                        .key(&keys[0])
                        .key(&keys[1])
                        .key(&keys[2])
                        .key(&keys[3])
                        .arg("both")
                        .arg(1)
                        .arg(30_000)
                        .arg(86_400_000)
                        .arg(1)
                        .arg(100_000_000)
                        .arg(1_000_000_000)
                        .arg(60_000)
                        .arg(format!("raw-{id}"))
                        .invoke_async(&mut conn)
                        .await
                        .expect("EVALSHA admit.lua");
                }
            })
            .await;
            let cpu5 = redis_cpu(&mut info).await;
            row("(a) raw EVALSHA (baseline)", c, a, cpu1 - cpu0);
            row("(b) fusebox guarded no-op, RedisStore", c, b, cpu2 - cpu1);
            row("(c) fusebox guarded no-op, MemoryStore", c, m, cpu3 - cpu2);
            row("(d) deadpool checkout + EVALSHA", c, d, cpu4 - cpu3);
            row("(e) admit.lua alone, one EVALSHA per call", c, e, cpu5 - cpu4);
            println!(
                "    c={c}: ratio b/a = {:.2} (ops/s); p50 added by fusebox = {:.1} µs = {:.2} baseline round trips \
                 (admit.lua alone: {:.2}); deadpool d/a = {:.2}",
                b.ops / a.ops,
                b.p50_us - a.p50_us,
                (b.p50_us - a.p50_us) / a.p50_us,
                (e.p50_us - a.p50_us) / a.p50_us,
                d.ops / a.ops
            );
        }
        redis_fusebox.flush(Duration::from_secs(5)).await;

        // (f) Issue 5 §1: one caller, `max_concurrent = 1`, no `max_wait`, 200 successful
        // calls one after the other. Every store must run all of them (each call's permit is
        // back before the next admission); main before the fix refused 167-188 on Redis.
        for (name, redis) in [("RedisStore", Some(url.clone())), ("MemoryStore", None)] {
            let mut cfg = config(redis);
            cfg.namespace = format!("bench-seq-{}-{name}", std::process::id());
            cfg.features.insert(
                "one".into(),
                FeatureConfig {
                    max_concurrent: Some(1),
                    ..FeatureConfig::default()
                },
            );
            let fb = Coordinator::new(cfg).await.expect("coordinator");
            let start = Instant::now();
            let mut refused = 0;
            for _ in 0..200 {
                if fb
                    .call("one", "model", || async { Ok::<(), ()>(()) })
                    .await
                    .is_err()
                {
                    refused += 1;
                }
            }
            let per_call = start.elapsed().as_secs_f64() * 1e6 / 200.0;
            fb.flush(Duration::from_secs(5)).await;
            println!(
                "(f) sequential, max_concurrent 1, 200 calls, {name:<11}  refused {refused:>3} of 200  \
                 {per_call:>7.1} µs per call"
            );
        }
    });
}
