//! fusebox in one minute: `cargo run --example quickstart`.
//!
//! Runs on the embedded in-process store, or on Redis when `REDIS_URL` is set
//! (`REDIS_URL=redis://127.0.0.1:6379 cargo run --example quickstart`). It prints which store it
//! reached, then trips a breaker with three failures, shows the refusal as data, and recovers
//! through a half-open probe.

use std::process::ExitCode;
use std::time::Duration;

use fusebox::{
    BreakerConfig, CallError, Config, Coordinator, FeatureConfig, RedisConfig, Rejection,
};

#[tokio::main]
async fn main() -> ExitCode {
    // The error's own message (its Display), not Rust's Debug form of it.
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config {
        // Its own namespace, so that it never touches another application's keys.
        namespace: "fusebox-quickstart".into(),
        breaker: BreakerConfig {
            consecutive_failures: Some(3),
            open_duration: Duration::from_secs(1),
            ..BreakerConfig::default()
        },
        ..Config::default()
    };
    config.features.insert(
        "chat".into(),
        FeatureConfig {
            max_concurrent: Some(4),
            ..FeatureConfig::default()
        },
    );
    let url = std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    if let Some(url) = &url {
        config.redis = Some(RedisConfig {
            url: Some(url.clone()),
            ..RedisConfig::default()
        });
    }
    // Without `require_store(true)` an unreachable Redis would start this replica in local
    // mode; a quickstart should rather say so plainly.
    let fusebox = Coordinator::builder(config)
        .require_store(url.is_some())
        .build()
        .await?;
    let reached = fusebox.check_store().await?;
    match &url {
        Some(_) => println!(
            "store: Redis ({:?}), shared by every replica",
            reached.source
        ),
        None => println!(
            "store: embedded, in this process ({:?}); set REDIS_URL to share it",
            reached.source
        ),
    }
    // A clean slate for the demo's target (a leftover from an earlier run on Redis).
    // `force_create`: the target is not under `[targets]` and may have no state yet, which
    // `force` would refuse as a likely typo (a reset of a fresh breaker writes nothing).
    fusebox
        .force_create("demo-model", fusebox::Force::Reset)
        .await?;

    // 1. Three failures in a row trip the breaker of "demo-model".
    for i in 1..=3 {
        let r = fusebox
            .call("chat", "demo-model", || async {
                Err::<(), _>("HTTP 529 overloaded")
            })
            .await;
        match r {
            Err(CallError::Inner(e)) => println!("call {i}: sent, the model failed: {e}"),
            other => println!("call {i}: {other:?}"),
        }
    }
    fusebox.flush(Duration::from_secs(1)).await;

    // 2. The next call is not sent: the refusal is data, with the time to wait.
    let r = fusebox
        .call("chat", "demo-model", || async {
            Ok::<_, String>("never runs")
        })
        .await;
    let wait = match r {
        Err(CallError::Rejected(Rejection::CircuitOpen {
            state, retry_after, ..
        })) => {
            println!("call 4: not sent, the circuit is {state}; retry after {retry_after:?}");
            retry_after.unwrap_or(Duration::from_secs(1))
        }
        other => {
            println!("call 4: unexpected: {other:?}");
            Duration::from_secs(1)
        }
    };

    // 3. After the open time, one probe is let through; its success closes the breaker.
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let answer = fusebox
        .call("chat", "demo-model", || async {
            Ok::<_, std::io::Error>("hello")
        })
        .await?;
    println!("call 5: the half-open probe answered {answer:?}");
    // Before shutting down: deliver what is queued, and see whether anything was lost.
    let flushed = fusebox.flush(Duration::from_secs(1)).await;
    println!(
        "flush: {} outcomes delivered, {} dropped{}",
        flushed.delivered,
        flushed.dropped,
        if flushed.timed_out { ", timed out" } else { "" }
    );
    let s = fusebox.snapshot("demo-model").await?;
    println!(
        "breaker of demo-model: {:?} (generation {})",
        s.state, s.generation
    );
    Ok(())
}
