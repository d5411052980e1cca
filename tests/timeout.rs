//! What `redis.timeout` measures (issue 5): the round trip of one script call, not the time an
//! admission spends queued behind the batch in flight. Over a link whose round trip is more
//! than half the timeout, admissions that queue up behind another must still be decided, and
//! the replica must stay on the shared store.
//!
//! The slow link is real: a TCP proxy on loopback (`tests/support/delay_proxy.rs`) that delays
//! every chunk by a fixed time in each direction, in front of a real `redis-server`.

use std::net::SocketAddr;
use std::time::Duration;

use fusebox::{Config, Coordinator, Error, FeatureConfig, RedisConfig};
use tokio::time::Instant;

mod support;

/// Round trip 400 ms (200 ms each way), timeout 700 ms: more than half the timeout. One
/// admission is sent; 20 more arrive 10 ms later and queue behind it (one batch in flight at
/// a time), so they are decided about 790 ms after they asked. On main they timed out (the
/// timeout counted their queueing) and the replica went local; now every one is decided on
/// the shared store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_admissions_do_not_time_out_when_the_round_trip_is_over_half_the_timeout() {
    let server = support::RedisServer::start();
    let upstream: SocketAddr = format!("127.0.0.1:{}", server.port())
        .parse()
        .expect("address");
    let proxy = support::delay_proxy::start(upstream, Duration::from_millis(200));

    let mut config = Config {
        namespace: support::unique_name("timeout"),
        redis: Some(RedisConfig {
            url: Some(format!("redis://{proxy}/")),
            timeout: Duration::from_millis(700),
            connect_timeout: Duration::from_secs(10),
            ..RedisConfig::default()
        }),
        ..Config::default()
    };
    config
        .features
        .insert("chat".into(), FeatureConfig::default());
    let c = Coordinator::new(config).await.expect("coordinator");

    // Warm up: the connection, its handshake and the scripts take several round trips.
    let mut warm = false;
    for _ in 0..20 {
        if c.admit("chat", "m").await.is_ok() && !c.is_degraded() {
            warm = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        warm,
        "the coordinator never reached Redis through the proxy"
    );
    // Let the membership renewal and any settles get out of the way.
    c.flush(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!c.is_degraded());

    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.admit("chat", "m").await.map(|p| p.is_local()) })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let queued: Vec<_> = (0..20)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = c.admit("chat", "m").await.map(|p| p.is_local());
                (r, start.elapsed())
            })
        })
        .collect();
    let mut failed: Vec<String> = Vec::new();
    let mut slowest = Duration::ZERO;
    match first.await.expect("task") {
        Ok(false) => {}
        Ok(true) => failed.push("first: decided on local state".to_owned()),
        Err(e) => failed.push(format!("first: {e}")),
    }
    for q in queued {
        let (r, took) = q.await.expect("task");
        slowest = slowest.max(took);
        match r {
            Ok(false) => {}
            Ok(true) => failed.push("decided on local state (the store timed out)".to_owned()),
            Err(Error::Rejected(r)) => failed.push(format!("refused: {r}")),
            Err(other) => failed.push(format!("{other}")),
        }
    }
    eprintln!("slowest queued admission: {slowest:?}");
    assert!(
        failed.is_empty(),
        "{} of 21 admissions failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(!c.is_degraded(), "a healthy replica went local");
}
