//! Guarded calls report through the `metrics` facade: calls by outcome, attempts, failures by
//! class, retries, retry budget spent, fallbacks, degraded answers (cache / canned), breaker
//! transitions, latency histograms; per feature and target. Recorded with `metrics-util`'s
//! debugging recorder, installed for this thread only (a current-thread runtime on paused
//! time, so every task of the test runs under it).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use fusebox::classify::{Class, Classification, Reason};
use fusebox::pipeline::{ChainTarget, Tier};
use fusebox::{
    BreakerConfig, BudgetConfig, CannedConfig, Config, Coordinator, FeatureConfig, RetryConfig,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

const RETRYABLE: Class = Class::Retryable { retry_after: None };
const OVERLOADED: Class = Class::Overloaded { retry_after: None };

fn config() -> Config {
    let mut config = Config {
        namespace: support::unique_name("metrics"),
        breaker: BreakerConfig {
            consecutive_failures: Some(1),
            open_duration: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        retry: RetryConfig {
            base: Duration::from_millis(100),
            max_attempts: 2,
            // One retry per window, from the floor.
            budget: Some(BudgetConfig {
                ratio: 0.0,
                window: Duration::from_secs(10),
                min_per_second: 0.1,
            }),
            ..RetryConfig::default()
        },
        ..Config::default()
    };
    config.features.insert(
        "f".into(),
        FeatureConfig {
            chain: vec!["a".into(), "b".into()],
            canned: Some(CannedConfig {
                text: "Busy".into(),
                retry_after: None,
            }),
            ..FeatureConfig::default()
        },
    );
    config.features.insert(
        "g".into(),
        FeatureConfig {
            chain: vec!["c".into()],
            ..FeatureConfig::default()
        },
    );
    config
}

/// `name{labels}` -> value, labels sorted.
type Seen = HashMap<String, DebugValue>;

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

fn counter(seen: &Seen, name: &str, labels: &[(&str, &str)]) -> u64 {
    match seen.get(&key(name, labels)) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}

fn histogram(seen: &Seen, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    match seen.get(&key(name, labels)) {
        Some(DebugValue::Histogram(v)) => v.iter().map(|x| x.into_inner()).collect(),
        None => Vec::new(),
        Some(other) => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[test]
fn guarded_calls_report_through_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || rt.block_on(scenario()));
    let seen: Seen = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| {
            let labels: Vec<(String, String)> = k
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            (key(k.key().name(), &labels), v)
        })
        .collect();
    let names: Vec<&String> = seen.keys().collect();
    let c = |name: &str, labels: &[(&str, &str)]| counter(&seen, name, labels);

    // Call 1 (f): a fails (its budget spent, no retry), opens; b answers.
    // Call 2 (f): a skipped (open), b overloaded: canned.
    // Call 3 (g): c fails once, one retry (the floor's), answers.
    assert_eq!(
        c(
            "fusebox_calls_total",
            &[("feature", "f"), ("outcome", "fallback")]
        ),
        1,
        "{names:?}"
    );
    assert_eq!(
        c(
            "fusebox_calls_total",
            &[("feature", "f"), ("outcome", "canned")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_calls_total",
            &[("feature", "g"), ("outcome", "primary")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_attempts_total",
            &[("feature", "f"), ("target", "a")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_attempts_total",
            &[("feature", "f"), ("target", "b")]
        ),
        2
    );
    assert_eq!(
        c(
            "fusebox_attempts_total",
            &[("feature", "g"), ("target", "c")]
        ),
        2
    );
    assert_eq!(
        c(
            "fusebox_attempt_failures_total",
            &[("feature", "f"), ("target", "a"), ("class", "retryable")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_attempt_failures_total",
            &[("feature", "f"), ("target", "b"), ("class", "overloaded")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_retries_total",
            &[("feature", "g"), ("target", "c")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_retries_total",
            &[("feature", "f"), ("target", "a")]
        ),
        0
    );
    assert_eq!(
        c(
            "fusebox_retry_budget_spent_total",
            &[("feature", "f"), ("target", "a")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_fallbacks_total",
            &[("feature", "f"), ("target", "b")]
        ),
        1
    );
    assert_eq!(
        c(
            "fusebox_degraded_answers_total",
            &[("feature", "f"), ("source", "canned")]
        ),
        1
    );
    for target in ["a", "b"] {
        assert_eq!(
            c(
                "fusebox_breaker_transitions_total",
                &[
                    ("target", target),
                    ("from", "closed"),
                    ("to", "open"),
                    ("reason", "consecutive_failures")
                ]
            ),
            1,
            "{target}: {names:?}"
        );
    }
    let g = histogram(
        &seen,
        "fusebox_call_duration_seconds",
        &[("feature", "g"), ("outcome", "primary")],
    );
    assert_eq!(g.len(), 1);
    assert!(
        g[0] >= 0.0 && g[0] <= 0.2,
        "c's retry waited at most 100 ms: {g:?}"
    );
    let a = histogram(
        &seen,
        "fusebox_attempt_duration_seconds",
        &[("feature", "g"), ("target", "c")],
    );
    assert_eq!(a.len(), 2);
    // Labels are names from the configuration and fixed words only.
    for k in seen.keys() {
        assert!(!k.contains("sk-ant"), "{k}");
    }
}

async fn scenario() {
    let c = Coordinator::new(config()).await.expect("builds");
    let spent = c.retry_budget("f", "a").expect("budget");
    assert!(
        spent.withdraw().await.is_granted(),
        "the window's one retry"
    );

    let first = |t: &ChainTarget, _: u32| {
        std::future::ready(if t.name == "a" {
            Err(RETRYABLE)
        } else {
            Ok("B")
        })
    };
    let answer = c.guarded_call("f", first, |e: &Class| *e).await.expect("b");
    assert_eq!(answer.tier, Tier::Fallback);

    let second = |t: &ChainTarget, _: u32| {
        std::future::ready(if t.name == "a" {
            Ok("A")
        } else {
            Err(OVERLOADED)
        })
    };
    let answer = c
        .guarded_call("f", second, |e: &Class| *e)
        .await
        .expect("canned");
    assert_eq!(answer.tier, Tier::Canned);

    let third =
        |_: &ChainTarget, n: u32| std::future::ready(if n == 1 { Err(RETRYABLE) } else { Ok("C") });
    // Retryable, not the target's fault (a 409): c stays closed for its retry.
    let conflict = |e: &Class| {
        Classification::new(*e, Reason::Conflict).with_health(fusebox::CallOutcome::Ignored)
    };
    let answer = c.guarded_call("g", third, conflict).await.expect("c");
    assert_eq!((answer.tier, answer.attempts), (Tier::Primary, 2));
}
