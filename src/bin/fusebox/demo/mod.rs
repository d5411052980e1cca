//! `fusebox demo`: no network, no Redis, no configuration file. The mock upstream and the
//! proxy run in this process on the embedded store; a few clients send requests through
//! the proxy while the script breaks the upstream (primary overloaded, fallback slow,
//! everything failing, recovery). Each phase is explained in one line; what is shown is
//! counted from the answers' headers, the coordinator's observer events and the mock
//! upstream's counters. Plain lines, no redraw; it ends by itself with a summary.

mod report;
mod scenario;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use fusebox::mock::MockUpstream;
use fusebox::proxy::{serve, ProxyState};
use fusebox::{Config, Coordinator};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use self::report::{line, Forward, Msg, Tally};
use self::scenario::{scaled, FEATURE, PRIMARY};
use crate::exit::Failure;

/// `fusebox demo` flags.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Run the script this many times faster (0.25 to 20; every wait and timeout of the
    /// script shrinks with it). Default: 1, about 33 s.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0, value_parser = parse_speed)]
    speed: f64,
    /// The same as `--speed 4`.
    #[arg(long, conflicts_with = "speed")]
    fast: bool,
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.25..=20.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a factor from 0.25 to 20")),
    }
}

/// Clients sending requests at once, each pausing between its requests.
const CLIENTS: u64 = 8;
const PAUSE_MS: u64 = 100;

pub(crate) async fn run(args: &DemoArgs) -> Result<(), Failure> {
    let speed = if args.fast { 4.0 } else { args.speed };
    let fail = |what: &str| {
        let what = what.to_owned();
        move |e: String| Failure::internal(format!("demo: {what}: {e}"))
    };
    let mock = MockUpstream::builder()
        .keep_seen(false)
        .start()
        .await
        .map_err(|e| fail("cannot start the mock upstream")(e.to_string()))?;
    let config = Config::from_toml(&scenario::config(&mock.url(), speed))
        .map_err(|e| fail("the demo's configuration")(e.to_string()))?;
    let server = config.server.clone();
    let (tx, mut rx) = unbounded_channel::<Msg>();
    let coordinator = Coordinator::builder(config)
        .observer(Arc::new(Forward(tx.clone())))
        .build()
        .await
        .map_err(|e| fail("cannot start the coordinator")(e.to_string()))?;
    let state =
        ProxyState::new(coordinator, server).map_err(|e| fail("the proxy")(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| fail("cannot listen")(e.to_string()))?;
    let proxy_addr = listener
        .local_addr()
        .map_err(|e| fail("cannot listen")(e.to_string()))?;
    let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(serve(listener, state, async move {
        let _ = proxy_stopped.await;
    }));

    let start = Instant::now();
    let mut tally = Tally::new(start);
    line(&format!(
        "fusebox demo: the proxy on http://{proxy_addr} in front of a fake Anthropic API on {} \
         (both in this process; embedded store, no network, no Redis).",
        mock.url()
    ));
    line(&format!(
        "{CLIENTS} clients send requests for the feature \"{FEATURE}\" (chain: {PRIMARY}, then \
         {}; bulkhead {}; a degraded cache; a canned reply){}.",
        scenario::FALLBACK,
        scenario::BULKHEAD,
        if speed == 1.0 {
            String::new()
        } else {
            format!("; running {speed}x faster than real time")
        }
    ));
    line(&format!(
        "Each second{}: who answered (primary, fallback, cache, canned), what was refused, \
         the calls that reached each model, and each breaker's state.",
        if speed == 1.0 {
            String::new()
        } else {
            format!(
                " of the script (every {:.2} s here)",
                scaled(1000, speed).as_secs_f64()
            )
        }
    ));

    let running = Arc::new(AtomicBool::new(true));
    let asked = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| fail("cannot build the HTTP client")(e.to_string()))?;
    let url = format!("http://{proxy_addr}/v1/messages");
    let mut workers = Vec::new();
    for _ in 0..CLIENTS {
        workers.push(tokio::spawn(client_loop(
            client.clone(),
            url.clone(),
            tx.clone(),
            running.clone(),
            asked.clone(),
            scaled(PAUSE_MS, speed),
        )));
    }
    drop(tx);

    let tick_every = scaled(1000, speed);
    for phase in scenario::phases(speed) {
        for (model, plan) in &phase.plans {
            mock.set(model, plan.clone());
        }
        line("");
        line(&format!(
            "{} == {} == {}",
            tally.stamp(),
            phase.name,
            phase.explain
        ));
        let ends = tokio::time::Instant::now() + scaled((phase.seconds * 1000.0) as u64, speed);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + tick_every, tick_every);
        loop {
            // The phase lasts whole seconds: its last tick comes due with its end, and is
            // taken first so that the next phase's counts start from zero.
            tokio::select! {
                biased;
                _ = tick.tick() => tally.tick(phase.name, &upstream_calls(&mock)),
                () = tokio::time::sleep_until(ends) => break,
                Some(msg) = rx.recv() => tally.take(msg),
            }
        }
        tally.end_phase(phase.name, phase.seconds, &upstream_calls(&mock));
    }

    // The clients stop; requests still running finish (bounded) and are counted.
    running.store(false, Ordering::Relaxed);
    let drain = async {
        for w in workers {
            let _ = w.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
    while let Ok(msg) = rx.try_recv() {
        tally.take(msg);
    }
    let _ = stop_proxy.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), proxy).await;
    for l in tally.summary(&upstream_calls(&mock)) {
        line(&l);
    }
    Ok(())
}

fn upstream_calls(mock: &MockUpstream) -> std::collections::BTreeMap<String, u64> {
    mock.stats()
        .into_iter()
        .map(|(m, s)| (m, s.requests))
        .collect()
}

/// One client: a request, a pause, again, until told to stop.
async fn client_loop(
    client: reqwest::Client,
    url: String,
    tx: UnboundedSender<Msg>,
    running: Arc<AtomicBool>,
    asked: Arc<AtomicU64>,
    pause: Duration,
) {
    while running.load(Ordering::Relaxed) {
        let n = asked.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({
            "model": PRIMARY,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": scenario::question(n)}],
        });
        let sent = client
            .post(&url)
            .header("x-api-key", "demo-key-not-a-real-one")
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await;
        let msg = match sent {
            Ok(resp) => {
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let msg = Msg::Answer {
                    tier: header("x-fusebox-tier"),
                    attempts: header("x-fusebox-attempts")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(1),
                    status: resp.status().as_u16(),
                };
                // Read the whole answer, as a client would.
                let _ = resp.bytes().await;
                msg
            }
            Err(_) => Msg::Failed,
        };
        if tx.send(msg).is_err() {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}
