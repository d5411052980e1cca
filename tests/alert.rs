//! The fleet health signal: when the fallback rate of a feature's guarded calls over the
//! window passes the threshold, `Event::FallbackAlert` fires once per episode, computed from
//! fleet-wide counters in the store (`lua/fallback_rate.lua`), not per replica. Several
//! coordinators on one Redis (and on a Cluster) see exactly one alert between them; the
//! embedded store fires, recovers and fires again on paused time.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fusebox::classify::{Class, Classification, Reason};
use fusebox::clock::TokioClock;
use fusebox::pipeline::{ChainTarget, Tier};
use fusebox::{
    CallOutcome, Config, Coordinator, Event, FallbackAlertConfig, FeatureConfig, RedisConfig,
};
use support::{unique_name, Recorder, RedisCluster, RedisServer};

const OVERLOADED: Class = Class::Overloaded { retry_after: None };

fn config(window: Duration, min_calls: u64) -> Config {
    let mut config = Config {
        namespace: unique_name("alert"),
        fallback_alert: FallbackAlertConfig {
            threshold: 0.05,
            window,
            min_calls,
        },
        ..Config::default()
    };
    config.features.insert(
        "f".into(),
        FeatureConfig {
            chain: vec!["a".into(), "b".into()],
            ..FeatureConfig::default()
        },
    );
    config
}

/// `n` calls on `c`: the primary answers (`primary`) or is overloaded and b answers.
async fn calls(c: &Coordinator, n: usize, primary: bool) {
    for _ in 0..n {
        let call = move |t: &ChainTarget, _: u32| {
            std::future::ready(if primary || t.name == "b" {
                Ok("answer")
            } else {
                Err(OVERLOADED)
            })
        };
        // Not recorded on a's breaker: it stays closed, every call tries it first.
        let overloaded = |e: &Class| {
            Classification::new(*e, Reason::Overloaded).with_health(CallOutcome::Ignored)
        };
        let a = c.guarded_call("f", call, overloaded).await.expect("b");
        assert_eq!(a.tier == Tier::Primary, primary);
    }
}

fn alerts(recorders: &[Arc<Recorder>]) -> usize {
    recorders
        .iter()
        .flat_map(|r| r.events())
        .filter(|e| matches!(e, Event::FallbackAlert { feature, .. } if feature == "f"))
        .count()
}

async fn fleet(redis: RedisConfig) {
    let mut config = config(Duration::from_secs(60), 40);
    config.redis = Some(redis);
    let mut coordinators = Vec::new();
    let mut recorders = Vec::new();
    for _ in 0..4 {
        let r = Arc::new(Recorder::default());
        let c = Coordinator::builder(config.clone())
            .observer(r.clone())
            .build()
            .await
            .expect("builds");
        coordinators.push(c);
        recorders.push(r);
    }
    // 4 x 20 calls, every one a fallback: over 5% with more than 40 calls, fleet-wide (no
    // replica alone reaches 40).
    let tasks: Vec<_> = coordinators
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { calls(&c, 20, false).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("calls");
    }
    let mut waited = Duration::ZERO;
    while alerts(&recorders) == 0 && waited < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    assert_eq!(alerts(&recorders), 1, "the alert fired");
    // The same episode goes on: more fallbacks, more deliveries, no second alert.
    for c in &coordinators {
        calls(c, 10, false).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        alerts(&recorders),
        1,
        "exactly one alert per episode fleet-wide"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_per_episode_across_four_coordinators() {
    let server = RedisServer::start();
    fleet(RedisConfig {
        url: Some(server.url()),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_per_episode_across_four_coordinators_on_cluster() {
    let cluster = RedisCluster::start(3);
    fleet(RedisConfig {
        cluster: cluster.urls(),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    })
    .await;
}

/// Embedded store, paused time: fires at the crossing, once; recovers when primary answers
/// bring the rate under the threshold; fires again in a new episode; and calls age out of
/// the window.
#[tokio::test(start_paused = true)]
async fn the_embedded_store_fires_recovers_and_fires_again() {
    let r = Arc::new(Recorder::default());
    let c = Coordinator::builder(config(Duration::from_secs(10), 20))
        .observer(r.clone())
        .clock(Arc::new(TokioClock::new()))
        .build()
        .await
        .expect("builds");
    let count = |name: &str| {
        r.events()
            .iter()
            .filter(|e| match e {
                Event::FallbackAlert { .. } => name == "alert",
                Event::FallbackRecovered { .. } => name == "recovered",
                _ => false,
            })
            .count()
    };
    calls(&c, 19, false).await;
    assert_eq!(count("alert"), 0, "fewer than min_calls");
    calls(&c, 1, false).await;
    assert_eq!(count("alert"), 1);
    calls(&c, 5, false).await;
    assert_eq!(count("alert"), 1, "the same episode");
    // 25 fallbacks; 475 primary answers make it exactly 5%: not over it.
    calls(&c, 475, true).await;
    assert_eq!(count("recovered"), 1);
    calls(&c, 1, false).await;
    assert_eq!(count("alert"), 2, "a new episode");
    // A window later, everything has aged out.
    tokio::time::sleep(Duration::from_secs(11)).await;
    calls(&c, 1, true).await;
    assert_eq!(count("recovered"), 2);
}
