//! The fleet test: three `fusebox serve` processes (the built binary) on loopback behind a real
//! nginx (deploy/nginx.conf, the compose file's load balancer, with loopback addresses), one
//! `redis-server`, and the mock upstream (in this process, counting the calls and the calls in
//! flight per model).
//!
//! * A failing primary model is called at most threshold + calls in flight + allowed probes
//!   (one per open period) times across the fleet; the same run with per-process state (no
//!   `[redis]`) calls it at least threshold times per replica, and each replica probes.
//! * A feature's bulkhead limit holds across the three replicas (the mock's peak in flight);
//!   with per-process state it does not.
//! * `redis-server` killed mid-load and restarted: no request hangs, the answers follow each
//!   feature's store-down policy (local mode answers; `fail_closed` refuses with a 503), and the
//!   shared state resumes: a breaker forced open after the restart is seen by all replicas.
//!
//! The fleets run one at a time (a lock), each bounded in requests and time.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusebox::mock::{MockUpstream, Plan, Reply};
use futures_util::StreamExt;
use support::nginx::{make_temp_dir, Nginx};
use support::serve::Serve;
use support::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_fusebox");
const PRIMARY: &str = "claude-primary";
const FALLBACK: &str = "claude-fallback";
const SLOW: &str = "claude-slow";
const API_KEY: &str = "sk-ant-fleet-test-key-9876543210";
/// The breaker's `consecutive_failures`.
const THRESHOLD: u64 = 5;
/// No request may take longer than this (the client's timeout): "no request hangs".
const REQUEST_BOUND: Duration = Duration::from_secs(15);

/// One fleet at a time: each is four processes plus Redis on a shared machine. (A tokio
/// mutex: each test has its own runtime, and the guard is held across awaits.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three replicas of `config` behind nginx.
struct Fleet {
    replicas: Vec<Serve>,
    nginx: Nginx,
    dir: PathBuf,
}

impl Fleet {
    fn start(name: &str, config: &str) -> Fleet {
        let dir = make_temp_dir(&format!("fleet-{name}"));
        let path = dir.join("fusebox.toml");
        std::fs::write(&path, config).expect("write the fleet's config");
        let replicas: Vec<Serve> = (1..=3)
            .map(|i| Serve::start(BIN, &format!("{name}-{i}"), &path, &[]))
            .collect();
        let addrs: Vec<_> = replicas.iter().map(Serve::addr).collect();
        let nginx = Nginx::start(&addrs);
        Fleet {
            replicas,
            nginx,
            dir,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("fusebox.toml")
    }

    fn url(&self) -> String {
        self.nginx.url()
    }

    /// No replica's log has the client's API key in it.
    fn assert_no_key_in_logs(&self) {
        for (i, replica) in self.replicas.iter().enumerate() {
            let log = replica.log();
            assert!(
                !log.contains(API_KEY) && !log.contains("9876543210"),
                "replica {} logged the API key:\n{log}",
                i + 1
            );
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.nginx.stop();
        for replica in &mut self.replicas {
            replica.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fleet's configuration: `[redis]` when `redis` is given (shared state), none otherwise
/// (each process on its own embedded store).
fn config(namespace: &str, mock: &str, redis: Option<&str>, open: &str, extra: &str) -> String {
    let redis = match redis {
        Some(url) => format!(
            "[redis]\nurl = \"{url}\"\ntimeout = \"1s\"\nconnect_timeout = \"1s\"\n\
             retry_interval = \"100ms\"\n"
        ),
        None => String::new(),
    };
    format!(
        r#"namespace = "{namespace}"

{redis}
[server]
upstream = "{mock}"
default_feature = "chat"

[retry]
max_attempts = 1

[breaker]
consecutive_failures = {THRESHOLD}
failure_rate = false
open_duration = "{open}"
max_open_duration = "{open}"
half_open_probes = 1

[features.chat]
chain = ["{PRIMARY}", "{FALLBACK}"]

{extra}
"#
    )
}

/// What one request got.
#[derive(Debug, Clone)]
struct Outcome {
    feature: String,
    /// The status, or `None` for a transport error or a timeout (in `error`).
    status: Option<u16>,
    model: Option<String>,
    error_type: Option<String>,
    error: Option<String>,
    elapsed: Duration,
    /// When it started, from the start of the run.
    started: Duration,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_BOUND)
        .build()
        .expect("HTTP client")
}

async fn call(
    client: &reqwest::Client,
    base: &str,
    feature: &str,
    model: &str,
    t0: Instant,
) -> Outcome {
    let started = t0.elapsed();
    let begin = Instant::now();
    let body = serde_json::json!({
        "model": model,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello fleet"}],
    });
    let sent = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("x-fusebox-feature", feature)
        .json(&body)
        .send()
        .await;
    let mut outcome = Outcome {
        feature: feature.to_owned(),
        status: None,
        model: None,
        error_type: None,
        error: None,
        elapsed: Duration::ZERO,
        started,
    };
    match sent {
        Ok(response) => {
            outcome.status = Some(response.status().as_u16());
            outcome.model = response
                .headers()
                .get("x-fusebox-model")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match response.json::<serde_json::Value>().await {
                Ok(json) => {
                    outcome.error_type = json["error"]["type"].as_str().map(str::to_owned);
                }
                Err(e) => outcome.error = Some(format!("body: {e}")),
            }
        }
        Err(e) => outcome.error = Some(e.to_string()),
    }
    outcome.elapsed = begin.elapsed();
    outcome
}

/// `total` requests at `concurrency` at once.
async fn drive(
    base: &str,
    feature: &str,
    model: &str,
    total: usize,
    concurrency: usize,
) -> Vec<Outcome> {
    let client = client();
    let t0 = Instant::now();
    futures_util::stream::iter(0..total)
        .map(|_| call(&client, base, feature, model, t0))
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// A streaming request through nginx (`proxy_buffering off`) gets the fallback's whole SSE
/// stream, event by event, as the Messages API sends it.
async fn assert_stream_passes_nginx(base: &str, what: &str) {
    let response = client()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&serde_json::json!({
            "model": PRIMARY,
            "max_tokens": 16,
            "stream": true,
            "messages": [{"role": "user", "content": "stream through nginx"}],
        }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: streaming request: {e}"));
    assert_eq!(response.status(), 200, "{what}: stream status");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        header("content-type").starts_with("text/event-stream"),
        "{what}: {:?}",
        response.headers()
    );
    assert_eq!(header("x-fusebox-model"), FALLBACK, "{what}");
    let mut chunks = 0;
    let mut text = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.unwrap_or_else(|e| panic!("{what}: stream body: {e}")));
        chunks += 1;
    }
    let text = String::from_utf8_lossy(&text);
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{what}: {text}");
    assert_eq!(events.last(), Some(&"message_stop"), "{what}: {text}");
    assert!(
        events.contains(&"content_block_delta") && !events.contains(&"error"),
        "{what}: {text}"
    );
    assert!(chunks >= 1, "{what}");
}

fn assert_all_answered(outcomes: &[Outcome], what: &str) {
    let bad: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != Some(200)).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} requests not answered: {bad:#?}",
        bad.len()
    );
}

async fn mock_with(plans: &[(&str, Plan)]) -> MockUpstream {
    let mut builder = MockUpstream::builder();
    for (model, plan) in plans {
        builder = builder.model(*model, plan.clone());
    }
    builder.start().await.expect("start the mock upstream")
}

const REQUESTS: usize = 60;
const PROBE_REQUESTS: usize = 30;
const CONCURRENCY: usize = 6;
/// The breaker's open duration (and its longest: it does not grow).
const OPEN: Duration = Duration::from_secs(2);

/// What one failing-primary run counted at the mock.
#[derive(Debug)]
struct PrimaryRun {
    /// Calls that reached the primary in the first phase (the breaker opening).
    opening: u64,
    /// Calls that reached it in the second phase, after the open period: the probes.
    probes: u64,
    /// The most primary calls in flight at once.
    peak: u64,
    /// How many open periods can have ended during the whole run (each lasts OPEN).
    periods: u64,
}

/// The failing-primary load on a fleet: REQUESTS requests, a pause longer than the open
/// period, then PROBE_REQUESTS more.
async fn failing_primary_run(name: &str, config: &str, mock: &MockUpstream) -> PrimaryRun {
    let fleet = Fleet::start(name, config);
    mock.reset_counts();
    let started = Instant::now();
    let mut outcomes = drive(&fleet.url(), "chat", PRIMARY, REQUESTS, CONCURRENCY).await;
    let opening = mock.requests(PRIMARY);
    // Every breaker that opened in the first phase may probe after this.
    tokio::time::sleep(OPEN + Duration::from_millis(500)).await;
    outcomes.extend(drive(&fleet.url(), "chat", PRIMARY, PROBE_REQUESTS, CONCURRENCY).await);
    let elapsed = started.elapsed();
    assert_all_answered(&outcomes, name);
    assert!(
        outcomes
            .iter()
            .all(|o| o.model.as_deref() == Some(FALLBACK)),
        "{name}: every answer came from the fallback: {outcomes:#?}"
    );
    let run = PrimaryRun {
        opening,
        probes: mock.requests(PRIMARY) - opening,
        peak: mock.peak_in_flight(PRIMARY),
        periods: (elapsed.as_millis() / OPEN.as_millis()) as u64,
    };
    // After the counts: a stream through nginx, answered by the fallback.
    assert_stream_passes_nginx(&fleet.url(), name).await;
    fleet.assert_no_key_in_logs();
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_primary_is_called_threshold_plus_in_flight_plus_probes_fleet_wide() {
    let _serial = SERIAL.lock().await;
    // The primary fails slowly (so calls overlap), the fallback answers; a request's
    // fallback attempt (50 ms) outlasts the delivery of its primary failure to Redis
    // (redis.settle_delay, 2 ms), so a primary call is in flight only while its request is.
    let mock = mock_with(&[
        (
            PRIMARY,
            Plan::always(Reply::overloaded()).latency(Duration::from_millis(100)),
        ),
        (FALLBACK, Plan::answer().latency(Duration::from_millis(50))),
    ])
    .await;
    let redis = RedisServer::start();
    let open = format!("{}s", OPEN.as_secs());

    let shared_config = config("fleet-breaker", &mock.url(), Some(&redis.url()), &open, "");
    let shared = failing_primary_run("shared", &shared_config, &mock).await;
    // The fleet's state is in Redis now (breaker, retry budget, members): under key names
    // that never carry the client's API key.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(keys.contains("fleet-breaker"), "the fleet's keys: {keys}");
    assert!(
        !keys.contains(API_KEY) && !keys.contains("9876543210"),
        "an API key in a Redis key: {keys}"
    );

    let local_config = config("fleet-breaker", &mock.url(), None, &open, "");
    let local = failing_primary_run("per-process", &local_config, &mock).await;

    // Every call that reached the primary counted toward the threshold before the breaker
    // opened fleet-wide, or was in flight then (at most one per request in flight: the
    // client keeps CONCURRENCY in flight), or is a probe: half_open_probes = 1 per open
    // period that ended.
    let in_flight = CONCURRENCY as u64;
    let probes = shared.periods;
    let bound = THRESHOLD + in_flight + probes;
    let shared_total = shared.opening + shared.probes;
    let local_total = local.opening + local.probes;
    eprintln!(
        "failing primary, {REQUESTS} + {PROBE_REQUESTS} requests at concurrency {CONCURRENCY} \
         through nginx to 3 replicas, breaker threshold {THRESHOLD}, open {OPEN:?}: shared \
         state {} calls while opening + {} probes = {shared_total} (peak {} in flight; bound \
         {THRESHOLD} + {in_flight} + {probes} x 1 = {bound}); per-process state {} + {} = \
         {local_total}",
        shared.opening, shared.probes, shared.peak, local.opening, local.probes
    );
    assert!(
        shared.opening >= THRESHOLD,
        "the breaker opened after {THRESHOLD} failures, not before: {shared:?}"
    );
    assert!(
        shared_total <= bound,
        "shared state: {shared_total} calls reached the failing primary, more than threshold \
         + in flight + probes = {bound}: {shared:?}"
    );
    assert!(
        shared.peak <= in_flight,
        "at most one primary call per request in flight: {shared:?}"
    );
    assert!(
        shared.probes >= 1,
        "after the open period the fleet probes the primary again: {shared:?}"
    );
    // Each replica on its own opens only after its own THRESHOLD failures, and probes on
    // its own timer.
    assert!(
        local.opening >= 3 * THRESHOLD,
        "per-process state: each replica pays the threshold itself: {local:?}"
    );
    assert!(
        local.probes >= 3,
        "per-process state: each replica probes on its own: {local:?}"
    );
    assert!(
        local_total > bound,
        "the contrast: per-process state ({local_total}) exceeds the shared bound ({bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bulkhead_limit_holds_across_the_three_replicas() {
    let _serial = SERIAL.lock().await;
    const LIMIT: u64 = 4;
    let mock = mock_with(&[(SLOW, Plan::answer().latency(Duration::from_millis(150)))]).await;
    let redis = RedisServer::start();
    let bulk = format!(
        "[features.bulk]\nmax_concurrent = {LIMIT}\nmax_wait = \"10s\"\nchain = [\"{SLOW}\"]\n"
    );

    let shared_config = config(
        "fleet-bulkhead",
        &mock.url(),
        Some(&redis.url()),
        "5m",
        &bulk,
    );
    let fleet = Fleet::start("bulk-shared", &shared_config);
    mock.reset_counts();
    let outcomes = drive(&fleet.url(), "bulk", SLOW, 36, 12).await;
    let shared_peak = mock.peak_in_flight(SLOW);
    assert_all_answered(&outcomes, "bulkhead, shared");
    assert_eq!(mock.requests(SLOW), 36);
    drop(fleet);

    let local_config = config("fleet-bulkhead", &mock.url(), None, "5m", &bulk);
    let fleet = Fleet::start("bulk-local", &local_config);
    mock.reset_counts();
    let outcomes = drive(&fleet.url(), "bulk", SLOW, 36, 12).await;
    let local_peak = mock.peak_in_flight(SLOW);
    assert_all_answered(&outcomes, "bulkhead, per-process");
    drop(fleet);

    eprintln!(
        "bulkhead max_concurrent = {LIMIT}, 36 requests at concurrency 12 through nginx to 3 \
         replicas: peak in flight at the upstream {shared_peak} with shared state, \
         {local_peak} per-process"
    );
    assert!(
        shared_peak <= LIMIT,
        "the fleet-wide limit {LIMIT} held across three replicas: peak {shared_peak}"
    );
    assert_eq!(
        shared_peak, LIMIT,
        "12 callers kept every permit busy at some point"
    );
    assert!(
        local_peak > LIMIT,
        "the contrast: per-process limits add up past {LIMIT}: peak {local_peak}"
    );
}

/// `fusebox -c CONFIG force TARGET open`.
fn force_open(config: &Path, target: &str) {
    let output = std::process::Command::new(BIN)
        .arg("-c")
        .arg(config)
        .args(["force", target, "open"])
        .env_remove("FUSEBOX_REDIS_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run fusebox force");
    assert!(
        output.status.success(),
        "fusebox force {target} open: {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_load_and_restarted_no_hang_policy_kept_and_shared_state_resumes() {
    let _serial = SERIAL.lock().await;
    let mock = mock_with(&[
        (PRIMARY, Plan::answer().latency(Duration::from_millis(10))),
        (FALLBACK, Plan::answer().latency(Duration::from_millis(10))),
    ])
    .await;
    let mut redis = RedisServer::start();
    // `chat` keeps answering on local state while Redis is away (the default policy);
    // `strict` refuses instead.
    let strict = format!(
        "[features.strict]\non_store_unavailable = \"fail_closed\"\nchain = [\"{FALLBACK}\"]\n"
    );
    let mut text = config(
        "fleet-redis-down",
        &mock.url(),
        Some(&redis.url()),
        "5m",
        &strict,
    );
    // Notice a dead Redis quickly.
    text = text.replace(
        "timeout = \"1s\"\nconnect_timeout = \"1s\"",
        "timeout = \"250ms\"\nconnect_timeout = \"250ms\"",
    );
    let fleet = Fleet::start("redis-down", &text);
    let base = fleet.url();

    // Steady load on both features from 6 callers until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for i in 0..6 {
        let stop = stop.clone();
        let base = base.clone();
        // A request names a model of its feature's chain.
        let (feature, model) = if i % 2 == 0 {
            ("chat", PRIMARY)
        } else {
            ("strict", FALLBACK)
        };
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) && outcomes.len() < 2000 {
                outcomes.push(call(&client, &base, feature, model, t0).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            outcomes
        }));
    }

    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = t0.elapsed();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted_at = t0.elapsed();
    tokio::task::block_in_place(|| redis.restart());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.expect("load worker"));
    }
    let ended_at = t0.elapsed();

    // No request hung: each got an answer (the client's bound is REQUEST_BOUND).
    let unanswered: Vec<&Outcome> = outcomes.iter().filter(|o| o.status.is_none()).collect();
    assert!(
        unanswered.is_empty(),
        "requests without an answer (hung or cut): {unanswered:#?}"
    );
    let slowest = outcomes.iter().map(|o| o.elapsed).max().unwrap_or_default();
    let during = |o: &Outcome| o.started >= killed_at && o.started < restarted_at;
    let chat: Vec<&Outcome> = outcomes.iter().filter(|o| o.feature == "chat").collect();
    let strict: Vec<&Outcome> = outcomes.iter().filter(|o| o.feature == "strict").collect();
    let refused: Vec<&&Outcome> = strict.iter().filter(|o| o.status != Some(200)).collect();
    eprintln!(
        "redis killed at {killed_at:?}, restarted at {restarted_at:?}, load ended at \
         {ended_at:?}: {} requests ({} while Redis was down), slowest {slowest:?}; chat: {} \
         answered of {}; strict: {} refused of {}",
        outcomes.len(),
        outcomes.iter().filter(|o| during(o)).count(),
        chat.iter().filter(|o| o.status == Some(200)).count(),
        chat.len(),
        refused.len(),
        strict.len()
    );
    // The default policy: every chat request answered, Redis or not.
    assert!(
        chat.iter().filter(|o| during(o)).count() > 0,
        "load ran while Redis was down"
    );
    let chat_failed: Vec<&&Outcome> = chat.iter().filter(|o| o.status != Some(200)).collect();
    assert!(
        chat_failed.is_empty(),
        "chat (local mode while Redis is down) should answer every request: {chat_failed:#?}"
    );
    // fail_closed: refused with the proxy's 503 (API error shape), and only then.
    assert!(
        !refused.is_empty(),
        "strict (fail_closed) was refused at least once while Redis was down"
    );
    for o in &refused {
        assert_eq!(
            (o.status, o.error_type.as_deref()),
            (Some(503), Some("api_error")),
            "a strict refusal is the store-unavailable 503: {o:#?}"
        );
        assert!(
            o.started + o.elapsed >= killed_at,
            "strict was refused before Redis was killed: {o:#?}"
        );
    }

    // Shared state resumes: a breaker forced open on the restarted Redis is seen by every
    // replica (each asked directly): the primary is no longer called.
    tokio::task::block_in_place(|| force_open(&fleet.config_path(), PRIMARY));
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, replica) in fleet.replicas.iter().enumerate() {
        loop {
            let o = call(&client, &replica.url(), "chat", PRIMARY, t0).await;
            if o.status == Some(200) && o.model.as_deref() == Some(FALLBACK) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} does not see the forced-open breaker: {o:#?}\n{}",
                i + 1,
                replica.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    mock.reset_counts();
    for replica in &fleet.replicas {
        for (feature, model) in [("chat", PRIMARY), ("strict", FALLBACK)] {
            let o = call(&client, &replica.url(), feature, model, t0).await;
            assert_eq!(o.status, Some(200), "{o:#?}");
            assert_eq!(o.model.as_deref(), Some(FALLBACK), "{o:#?}");
        }
    }
    assert_eq!(
        mock.requests(PRIMARY),
        0,
        "no replica called the forced-open primary"
    );
    fleet.assert_no_key_in_logs();
}
