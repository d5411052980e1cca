//! Tests of the store's own paths that need a real Redis and access to its internals (the
//! admission queue).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::difftest::support;
use super::{batch, RedisStore};
use crate::breaker::BreakerParams;
use crate::bulkhead::BulkheadParams;
use crate::keys::{feature_keys, target_keys};
use crate::store::{AdmitRequest, FeatureSpec, Store, TargetSpec};

async fn in_flight_becomes(store: &RedisStore, f: &FeatureSpec, n: u32, within: Duration) -> u32 {
    let t0 = std::time::Instant::now();
    loop {
        let now = store.in_flight(f).await.expect("in_flight");
        if now == n || t0.elapsed() > within {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `EVALSHA` calls the server has run so far.
fn evalsha_calls(server: &support::RedisServer) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 5 §2.7: when the batcher's queue is full, an admission makes its own script call. A
/// caller cancelled after that call ran must not keep the permit until its lease ends: it is
/// given back as on the batched path.
#[tokio::test(flavor = "current_thread")]
async fn a_direct_admission_cancelled_after_its_script_ran_holds_nothing() {
    let server = support::RedisServer::start();
    let config = crate::RedisConfig {
        url: Some(server.url()),
        timeout: Duration::from_secs(2),
        ..crate::RedisConfig::default()
    };
    let connected = RedisStore::connect(&config).await.expect("connect");
    let t = TargetSpec {
        name: "t".to_owned(),
        keys: target_keys("direct", "t"),
        params: BreakerParams::from_config(&crate::BreakerConfig::default(), 60_000),
    };
    for split in [false, true] {
        let f = FeatureSpec {
            name: format!("f-{split}"),
            keys: feature_keys("direct", &format!("f-{split}")),
            bulkhead: Some(BulkheadParams {
                limit: 5,
                lease_ms: 60_000,
            }),
            rate: None,
        };
        // A queue that is always full: every admission takes the direct path.
        let (full, _never_drained) = mpsc::channel(1);
        full.try_send(batch::Job {
            split,
            specs: connected.core.specs.get(&t, &f),
            call_id: "filler".to_owned(),
            reply: oneshot::channel().0,
            queued: tokio::time::Instant::now(),
        })
        .expect("fill the queue");
        let store = RedisStore {
            core: Arc::clone(&connected.core),
            admissions: full,
            split_admit: split,
            cache: Arc::clone(&connected.cache),
        };
        let id = format!("cancelled-{split}");
        // Connected, scripts loaded.
        assert_eq!(store.in_flight(&f).await.expect("in_flight"), 0);
        let scripts_before = evalsha_calls(&server);
        // Redis stops answering: the caller's script call is sent but not answered...
        server.pause();
        let mut admission = Box::pin(store.admit(AdmitRequest {
            target: &t,
            feature: &f,
            call_id: &id,
        }));
        for _ in 0..20 {
            let poll = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(admission.as_mut(), cx))
            })
            .await;
            assert!(poll.is_pending(), "answered by a stopped Redis: {poll:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ...when the caller is cancelled. Then Redis runs it: it takes a permit.
        drop(admission);
        server.resume();
        let mut ran = 0;
        for _ in 0..100 {
            ran = evalsha_calls(&server) - scripts_before;
            if ran > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ran > 0, "split {split}: the admission's script never ran");
        let n = in_flight_becomes(&store, &f, 0, Duration::from_secs(3)).await;
        assert_eq!(
            n, 0,
            "split {split}: a cancelled direct admission still holds its permit (lease 60 s)"
        );
    }
}

/// The retry budget's scripts are loaded with the others (a withdrawal after a Redis
/// restart must not be the first to meet an empty script cache).
#[test]
fn every_script_is_in_the_load_list() {
    let loaded: Vec<String> = super::scripts::all()
        .iter()
        .map(|s| s.get_hash().to_owned())
        .collect();
    for s in [&*super::budget::DEPOSIT, &*super::budget::WITHDRAW] {
        assert!(loaded.iter().any(|h| h == s.get_hash()), "{}", s.get_hash());
    }
}

/// Whether Redis has every script of the store cached.
fn all_scripts_loaded(server: &support::RedisServer) -> bool {
    let mut args = vec!["SCRIPT", "EXISTS"];
    let scripts = super::scripts::all();
    args.extend(scripts.iter().map(|s| s.get_hash()));
    let reply = server.cli(&args);
    reply.lines().count() == scripts.len() && reply.lines().all(|l| l.trim() == "1")
}

/// Issue 5 §2.1: every script is loaded on connect, and again once Redis answers after it
/// was unreachable (a restarted Redis has an empty script cache), so a take-back's first
/// `EVALSHA` finds its script even when nothing else has used it yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_loaded_on_connect_and_after_a_restart() {
    let mut server = support::RedisServer::start();
    let config = crate::RedisConfig {
        url: Some(server.url()),
        timeout: Duration::from_secs(1),
        ..crate::RedisConfig::default()
    };
    let store = RedisStore::connect(&config).await.expect("connect");
    let wait_loaded = |server: &support::RedisServer| {
        for _ in 0..500 {
            if all_scripts_loaded(server) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };
    assert!(
        tokio::task::block_in_place(|| wait_loaded(&server)),
        "scripts loaded on connect, before any call"
    );

    tokio::task::block_in_place(|| server.kill());
    let f = FeatureSpec {
        name: "f".to_owned(),
        keys: feature_keys("preload", "f"),
        bulkhead: None,
        rate: None,
    };
    assert!(store.in_flight(&f).await.is_err(), "Redis is down");
    tokio::task::block_in_place(|| server.restart());
    assert!(!tokio::task::block_in_place(|| all_scripts_loaded(&server)));
    let mut answered = false;
    for _ in 0..200 {
        if store.in_flight(&f).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(answered, "the store reconnects after the restart");
    assert!(
        tokio::task::block_in_place(|| wait_loaded(&server)),
        "every script loaded again after the restart"
    );
}
