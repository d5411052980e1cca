//! The proxy's operations endpoints (`fusebox::proxy::ops`): `/healthz`, `/readyz`,
//! `/metrics` and the admin API, driven with `oneshot` on the proxy's router, on the embedded
//! store and a real redis-server; the upstream is the fake Anthropic API (`fusebox::mock`,
//! a real HTTP server on 127.0.0.1). The admin API refuses a missing or wrong token and is
//! off without one; a force through it reaches Redis (a second coordinator sees it);
//! `/metrics` parses as Prometheus text, carries the store-read gauges, and never the
//! caller's API key; `/readyz` names local mode when Redis is killed.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use fusebox::mock::{MockUpstream, Plan, Reply};
use fusebox::proxy::{app, prom, ProxyState};
use fusebox::{
    CircuitState, Config, Coordinator, FeatureConfig, RedisConfig, ServerConfig, TargetConfig,
};
use serde_json::{json, Value};
use support::{RedisCluster, RedisServer};
use tower::ServiceExt;

const BUDGET: Duration = Duration::from_secs(60);
const KEY: &str = "sk-ant-ops-test-key-0123456789abcdef";
const TOKEN: &str = "admin-token-0123456789abcdef";
const PRIMARY: &str = "claude-primary";
const FALLBACK: &str = "claude-fallback";

async fn bounded(scenario: impl Future<Output = ()>) {
    tokio::time::timeout(BUDGET, scenario)
        .await
        .expect("the test ran past its time budget");
}

/// A configuration: `chat` = primary -> fallback (bulkhead 5), on `redis` or embedded.
fn config(upstream: &str, redis: Option<&RedisServer>, token: Option<&str>) -> Config {
    let mut config = Config {
        namespace: support::unique_name("ops"),
        redis: redis.map(|s| RedisConfig {
            url: Some(s.url()),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            operator_timeout: Some(Duration::from_secs(2)),
            retry_interval: Duration::from_secs(60),
            ..RedisConfig::default()
        }),
        server: ServerConfig {
            upstream: upstream.to_owned(),
            default_feature: Some("chat".into()),
            admin_token: token.map(str::to_owned),
            ..ServerConfig::default()
        },
        ..Config::default()
    };
    config.retry.max_attempts = 1;
    for (name, model) in [("primary", PRIMARY), ("fallback", FALLBACK)] {
        config.targets.insert(
            name.into(),
            TargetConfig {
                model: Some(model.into()),
                timeout: Some(Duration::from_secs(5)),
                ..TargetConfig::default()
            },
        );
    }
    config.features.insert(
        "chat".into(),
        FeatureConfig {
            chain: vec!["primary".into(), "fallback".into()],
            max_concurrent: Some(5),
            ..FeatureConfig::default()
        },
    );
    config
}

struct Setup {
    mock: MockUpstream,
    config: Config,
    coordinator: Coordinator,
    state: ProxyState,
}

async fn setup(redis: Option<&RedisServer>, token: Option<&str>) -> Setup {
    let mock = MockUpstream::builder().start().await.expect("mock binds");
    let config = config(&mock.url(), redis, token);
    config.validate().expect("valid configuration");
    let coordinator = Coordinator::new(config.clone()).await.expect("coordinator");
    let state = ProxyState::new(coordinator.clone(), config.server.clone()).expect("state");
    Setup {
        mock,
        config,
        coordinator,
        state,
    }
}

async fn send(state: &ProxyState, req: Request<Body>) -> (Response<()>, String) {
    let resp = app(state.clone()).oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("body reads");
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

fn admin(method: &str, path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Body::empty()).expect("request")
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn error_type(body: &str) -> String {
    let v = json_of(body);
    assert_eq!(v["type"], "error", "{body}");
    v["error"]["type"].as_str().unwrap_or_default().to_owned()
}

fn ask(model: &str) -> Request<Body> {
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .body(Body::from(
            json!({
                "model": model,
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "hello"}],
            })
            .to_string(),
        ))
        .expect("request")
}

// ---------------------------------------------------------------------------------------------
// the admin API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_without_or_with_a_wrong_token_is_refused() {
    bounded(async {
        let s = setup(None, Some(TOKEN)).await;
        let wrong_length = format!("{TOKEN}x");
        let wrong_last = format!("{}X", &TOKEN[..TOKEN.len() - 1]);
        for (method, path) in [
            ("GET", "/admin/breakers"),
            ("GET", "/admin/breakers/primary"),
            ("POST", "/admin/breakers/primary/open"),
            ("GET", "/admin/bulkheads"),
            ("GET", "/admin/budgets"),
            ("GET", "/admin/replicas"),
            ("GET", "/admin/no-such-endpoint"),
        ] {
            for token in [
                None,
                Some("wrong"),
                Some(&wrong_length[..]),
                Some(&wrong_last[..]),
            ] {
                let (resp, body) = send(&s.state, admin(method, path, token)).await;
                assert_eq!(
                    resp.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {token:?}: {body}"
                );
                assert_eq!(error_type(&body), "authentication_error");
                assert!(resp.headers().contains_key("www-authenticate"));
                assert!(!body.contains(TOKEN), "{body}");
            }
            // Not a bearer token: refused too.
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Basic {TOKEN}"))
                .body(Body::empty())
                .expect("request");
            let (resp, _) = send(&s.state, req).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        }
        // Nothing was forced by the refused POSTs.
        assert_eq!(
            s.coordinator.snapshot("primary").await.expect("read").state,
            CircuitState::Closed
        );

        // The right token.
        let (resp, body) = send(&s.state, admin("GET", "/admin/breakers", Some(TOKEN))).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        let v = json_of(&body);
        assert_eq!(v["store"], "embedded");
        let names: Vec<&str> = v["breakers"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|b| b["target"].as_str())
            .collect();
        assert_eq!(names, ["fallback", "primary"], "{body}");
        let (resp, body) = send(
            &s.state,
            admin("GET", "/admin/no-such-endpoint", Some(TOKEN)),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{body}");
        assert_eq!(error_type(&body), "not_found_error");
    })
    .await;
}

#[tokio::test]
async fn without_an_admin_token_the_admin_api_is_off() {
    bounded(async {
        let s = setup(None, None).await;
        for token in [None, Some(TOKEN), Some("")] {
            for (method, path) in [
                ("GET", "/admin/breakers"),
                ("POST", "/admin/breakers/primary/open"),
            ] {
                let (resp, body) = send(&s.state, admin(method, path, token)).await;
                assert_eq!(
                    resp.status(),
                    StatusCode::FORBIDDEN,
                    "{method} {path}: {body}"
                );
                assert_eq!(error_type(&body), "permission_error");
                assert!(body.contains("admin API is off"), "{body}");
            }
        }
        assert_eq!(
            s.coordinator.snapshot("primary").await.expect("read").state,
            CircuitState::Closed
        );
    })
    .await;
}

/// A force through the admin API of one replica is the fleet's: a second coordinator on the
/// same Redis sees the breaker forced open and refuses calls; a reset brings it back.
#[tokio::test]
async fn a_force_through_the_admin_api_reaches_redis_and_the_fleet() {
    bounded(async {
        let server = RedisServer::start();
        let s = setup(Some(&server), Some(TOKEN)).await;
        let other = Coordinator::new(s.config.clone()).await.expect("second");

        let (resp, body) = send(
            &s.state,
            admin("POST", "/admin/breakers/primary/open", Some(TOKEN)),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        let v = json_of(&body);
        assert_eq!(
            (&v["changed"], &v["from"], &v["to"], &v["store"]),
            (
                &json!(true),
                &json!("closed"),
                &json!("forced_open"),
                &json!("shared")
            ),
            "{body}"
        );
        let seen = other.read_breaker("primary").await.expect("read");
        assert_eq!(seen.value.state, CircuitState::ForcedOpen);
        assert_eq!(seen.source, fusebox::Source::Shared);
        let r = other
            .call("chat", "primary", || async { Ok::<_, String>(()) })
            .await;
        assert!(r.is_err(), "the second replica refuses: {r:?}");

        // The proxy answers from the fallback now.
        let (resp, body) = send(&s.state, ask(PRIMARY)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        assert_eq!(
            resp.headers()
                .get("x-fusebox-target")
                .and_then(|v| v.to_str().ok()),
            Some("fallback")
        );

        // Listed as forced open; again is not a change.
        let (_, body) = send(
            &s.state,
            admin("GET", "/admin/breakers/primary", Some(TOKEN)),
        )
        .await;
        assert_eq!(json_of(&body)["state"], "forced_open", "{body}");
        let (_, body) = send(
            &s.state,
            admin("POST", "/admin/breakers/primary/open", Some(TOKEN)),
        )
        .await;
        assert_eq!(json_of(&body)["changed"], false, "{body}");

        // An unknown target is a 404 unless created; a bad action is a 404.
        let (resp, body) = send(
            &s.state,
            admin("POST", "/admin/breakers/gpt-typo/open", Some(TOKEN)),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{body}");
        assert_eq!(error_type(&body), "not_found_error");
        assert!(
            !other
                .known_names()
                .await
                .expect("scan")
                .value
                .targets
                .contains("gpt-typo"),
            "a refused force leaves no state"
        );
        let (resp, body) = send(
            &s.state,
            admin(
                "POST",
                "/admin/breakers/gpt-new/open?create=true",
                Some(TOKEN),
            ),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        assert_eq!(
            other.snapshot("gpt-new").await.expect("read").state,
            CircuitState::ForcedOpen
        );
        let (resp, _) = send(
            &s.state,
            admin("POST", "/admin/breakers/primary/explode", Some(TOKEN)),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);

        // Reset: back to normal for the whole fleet.
        let (resp, body) = send(
            &s.state,
            admin("POST", "/admin/breakers/primary/reset", Some(TOKEN)),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        assert_eq!(
            other.snapshot("primary").await.expect("read").state,
            CircuitState::Closed
        );

        // Bulkheads, budgets and replicas read the shared store.
        let (_, body) = send(&s.state, admin("GET", "/admin/bulkheads", Some(TOKEN))).await;
        let v = json_of(&body);
        assert_eq!(v["bulkheads"][0]["feature"], "chat", "{body}");
        assert_eq!(v["bulkheads"][0]["limit"], 5, "{body}");
        assert_eq!(v["bulkheads"][0]["in_flight"], 0, "{body}");
        let (_, body) = send(&s.state, admin("GET", "/admin/budgets", Some(TOKEN))).await;
        let v = json_of(&body);
        assert_eq!(v["store"], "shared", "{body}");
        assert_eq!(v["budgets"].as_array().map(Vec::len), Some(2), "{body}");
        assert_eq!(v["budgets"][0]["enabled"], true, "{body}");
        let (_, body) = send(&s.state, admin("GET", "/admin/replicas", Some(TOKEN))).await;
        let v = json_of(&body);
        assert!(
            v["live_replicas"].as_u64().is_some_and(|n| n >= 1),
            "{body}"
        );
        drop(s.mock);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------------

/// One sample of the text format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses Prometheus text format (0.0.4) strictly enough to catch a malformed exposition:
/// every line is a `# HELP`/`# TYPE` comment, blank, or `name{label="value",...} number`.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("a name");
            let kind = parts.next().expect("a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(typed.insert(name.to_owned()), "TYPE twice for {name}");
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let mut end = None;
            loop {
                let Some((i, c)) = chars.next() else {
                    panic!("unclosed labels: {line}")
                };
                if c == '}' {
                    end = Some(i);
                    break;
                }
                if c == ',' {
                    continue;
                }
                let mut key = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => panic!("bad escape: {line}"),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => panic!("unclosed value: {line}"),
                    }
                }
                labels.insert(key, value);
                let _ = end;
            }
            rest = &r[end.expect("labels end") + 1..];
        }
        let value = rest.trim().split(' ').next().expect("a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|e| panic!("{e}: {line}")),
        };
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

/// `/metrics` on the embedded store with a (locally installed) Prometheus recorder: the
/// pipeline's counters and the gauges read at scrape time, as parseable text; the caller's API
/// key nowhere, even after the upstream echoed it in an error.
#[tokio::test]
async fn metrics_are_prometheus_text_with_the_gauges_and_no_api_key() {
    let recorder = prom::recorder().expect("recorder");
    let handle = recorder.handle();
    // This test's thread only (a current-thread runtime: every task runs here).
    let _local = metrics::set_default_local_recorder(&recorder);
    bounded(async {
        let s = setup(None, Some(TOKEN)).await;
        let state = s.state.clone().with_metrics(handle);
        let (resp, _) = send(&state, ask(PRIMARY)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        // The primary echoes the key in an error: the chain falls back.
        let echo = json!({"type": "error", "error": {"type": "api_error",
            "message": format!("upstream broke for x-api-key: {KEY}")}});
        s.mock.push(
            PRIMARY,
            [Reply::Raw {
                status: 500,
                headers: vec![("content-type".into(), "application/json".into())],
                body: echo.to_string(),
            }],
        );
        let (resp, _) = send(&state, ask(PRIMARY)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        // A permit held while the scrape runs.
        let held = s.coordinator.admit("chat", "primary").await.expect("admit");
        s.coordinator
            .force("fallback", fusebox::Force::Open)
            .await
            .expect("force");

        let (resp, text) = send(&state, get("/metrics")).await;
        drop(held);
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            resp.headers()
        );
        assert!(!text.contains(KEY), "the API key is in /metrics:\n{text}");
        assert!(
            !text.contains(&KEY[10..]),
            "part of the API key is in /metrics"
        );
        let samples = parse_prometheus(&text);

        // The facade's metrics, through the exporter.
        assert_eq!(
            value_of(
                &samples,
                "fusebox_calls_total",
                &[("feature", "chat"), ("outcome", "primary")]
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value_of(
                &samples,
                "fusebox_calls_total",
                &[("feature", "chat"), ("outcome", "fallback")]
            ),
            Some(1.0),
            "{text}"
        );
        assert!(
            value_of(
                &samples,
                "fusebox_fallbacks_total",
                &[("target", "fallback")]
            )
            .is_some_and(|n| n >= 1.0),
            "{text}"
        );
        // The gauges read at scrape time.
        let g = |name: &str, labels: &[(&str, &str)]| {
            value_of(&samples, name, labels)
                .unwrap_or_else(|| panic!("no {name} {labels:?}:\n{text}"))
        };
        assert_eq!(g("fusebox_store_mode", &[("mode", "embedded")]), 1.0);
        assert_eq!(g("fusebox_store_mode", &[("mode", "local")]), 0.0);
        assert_eq!(g("fusebox_store_up", &[]), 1.0);
        assert_eq!(g("fusebox_live_replicas", &[]), 1.0);
        assert_eq!(
            g(
                "fusebox_breaker_state",
                &[("target", "fallback"), ("state", "forced_open")]
            ),
            1.0
        );
        assert_eq!(
            g(
                "fusebox_breaker_state",
                &[("target", "fallback"), ("state", "closed")]
            ),
            0.0
        );
        assert_eq!(
            g(
                "fusebox_breaker_state",
                &[("target", "primary"), ("state", "closed")]
            ),
            1.0
        );
        assert_eq!(
            g("fusebox_breaker_window_failures", &[("target", "primary")]),
            1.0
        );
        assert_eq!(
            g("fusebox_bulkhead_permits_in_use", &[("feature", "chat")]),
            1.0
        );
        assert_eq!(g("fusebox_bulkhead_limit", &[("feature", "chat")]), 5.0);
        assert_eq!(
            g("fusebox_retry_budget_requests", &[("target", "primary")]),
            2.0
        );
        assert!(g("fusebox_retry_budget_available", &[("target", "primary")]) >= 1.0);
        assert_eq!(g("fusebox_scrape_read_errors", &[]), 0.0);
        // Labels are configured names and fixed vocabularies only.
        for (name, labels, _) in &samples {
            for (k, v) in labels {
                assert!(
                    [
                        "feature", "target", "state", "mode", "outcome", "from", "to", "reason",
                        "class", "source", "le", "quantile"
                    ]
                    .contains(&k.as_str()),
                    "unexpected label {k}={v} on {name}"
                );
            }
        }
    })
    .await;
}

/// On Redis, the gauges come from the shared store; when Redis is killed, `/metrics` says
/// so (store up 0, local mode) instead of passing local state off as the fleet's.
#[tokio::test]
async fn metrics_on_redis_read_the_fleet_and_say_when_it_cannot() {
    bounded(async {
        let mut server = RedisServer::start();
        let s = setup(Some(&server), Some(TOKEN)).await;
        let other = Coordinator::new(s.config.clone()).await.expect("second");
        other
            .force("primary", fusebox::Force::Open)
            .await
            .expect("force on the other replica");
        let held = other.admit("chat", "fallback").await.expect("admit");
        let (_, text) = send(&s.state, get("/metrics")).await;
        let samples = parse_prometheus(&text);
        let g = |name: &str, labels: &[(&str, &str)]| {
            value_of(&samples, name, labels)
                .unwrap_or_else(|| panic!("no {name} {labels:?}:\n{text}"))
        };
        assert_eq!(g("fusebox_store_mode", &[("mode", "shared")]), 1.0);
        assert_eq!(
            g(
                "fusebox_breaker_state",
                &[("target", "primary"), ("state", "forced_open")]
            ),
            1.0,
        );
        assert_eq!(
            g("fusebox_bulkhead_permits_in_use", &[("feature", "chat")]),
            1.0
        );
        drop(held);

        server.kill();
        let (resp, text) = send(&s.state, get("/metrics")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let samples = parse_prometheus(&text);
        assert_eq!(
            value_of(&samples, "fusebox_store_up", &[]),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            value_of(&samples, "fusebox_store_mode", &[("mode", "local")]),
            Some(1.0),
            "{text}"
        );
        assert!(
            !text.contains("fusebox_breaker_state{"),
            "no fleet gauges without the fleet's store:\n{text}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// /healthz and /readyz
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_and_readyz_on_the_embedded_store() {
    bounded(async {
        let s = setup(None, None).await;
        let (resp, body) = send(&s.state, get("/healthz")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        assert_eq!(json_of(&body)["status"], "ok");
        let (resp, body) = send(&s.state, get("/readyz")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        let v = json_of(&body);
        assert_eq!(
            (&v["status"], &v["store"]),
            (&json!("ready"), &json!("embedded"))
        );
    })
    .await;
}

/// Redis killed (the real process): `/readyz` names local mode (200; 503 with `?strict`),
/// `/healthz` stays 200; Redis back on the same port: ready on the shared store again.
#[tokio::test]
async fn readyz_reports_local_mode_when_redis_is_killed() {
    bounded(async {
        let mut server = RedisServer::start();
        let s = setup(Some(&server), None).await;
        let (resp, body) = send(&s.state, get("/readyz")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        let v = json_of(&body);
        assert_eq!(
            (&v["status"], &v["store"]),
            (&json!("ready"), &json!("shared")),
            "{body}"
        );

        server.kill();
        let (resp, body) = send(&s.state, get("/readyz")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        let v = json_of(&body);
        assert_eq!(
            (&v["status"], &v["store"]),
            (&json!("degraded"), &json!("local")),
            "{body}"
        );
        assert!(
            v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cannot be reached")),
            "{body}"
        );
        let (resp, _) = send(&s.state, get("/readyz?strict")).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let (resp, _) = send(&s.state, get("/healthz")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        // Requests are still served (local mode), from the mock.
        let (resp, body) = send(&s.state, ask(PRIMARY)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");

        server.restart();
        let mut ready = false;
        for _ in 0..100 {
            let (_, body) = send(&s.state, get("/readyz")).await;
            let v = json_of(&body);
            if v["store"] == "shared" {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The hot path returns to Redis at its own health check (retry_interval is long
        // here), so the operator's view may say "Redis answers again" meanwhile.
        let (_, body) = send(&s.state, get("/readyz")).await;
        let v = json_of(&body);
        assert!(
            ready
                || v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("answers again")),
            "{body}"
        );
        let _ = Plan::answer();
    })
    .await;
}

/// Redis restarted under the operator's live connection: the first operator read after it
/// (breaker, in flight, known names, store check, retry budget) and a force answer
/// from Redis, not "broken pipe" from the dead connection (the proxy's `/readyz?strict`,
/// `/metrics` and `/admin/*` said local mode once after every Redis restart).
#[tokio::test]
async fn the_first_operator_read_after_a_redis_restart_answers_from_redis() {
    bounded(async {
        let mut server = RedisServer::start();
        let s = setup(Some(&server), None).await;
        let c = &s.coordinator;
        let reading = c.read_breaker("primary").await.expect("first read");
        assert_eq!(reading.source, fusebox::Source::Shared);

        server.restart();
        let reading = c.read_breaker("primary").await;
        assert!(
            reading
                .as_ref()
                .is_ok_and(|r| r.source == fusebox::Source::Shared),
            "breaker: {reading:?}"
        );
        server.restart();
        let reading = c.read_in_flight("chat").await;
        assert!(reading.is_ok(), "in flight: {reading:?}");
        server.restart();
        let reading = c.known_names().await;
        assert!(reading.is_ok(), "known names: {reading:?}");
        server.restart();
        let reading = c.check_store().await;
        assert!(reading.is_ok(), "check: {reading:?}");
        server.restart();
        let reading = c.read_retry_budget("primary").await;
        assert!(reading.is_ok(), "budget: {reading:?}");
        server.restart();
        let forced = c.force("primary", fusebox::Force::Open).await;
        assert!(forced.is_ok(), "force: {forced:?}");
        assert_eq!(
            c.read_breaker("primary").await.expect("read").value.state,
            CircuitState::ForcedOpen
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// retry budget readings (what /admin/budgets and /metrics show)
// ---------------------------------------------------------------------------------------------

/// The same deposits and withdrawals read the same on Redis (HMGET of the buckets + TIME) as
/// on the embedded store, and reading changes nothing.
#[tokio::test]
async fn retry_budget_readings_agree_on_redis_and_the_embedded_store() {
    bounded(async {
        let server = RedisServer::start();
        let mut readings = Vec::new();
        for redis in [None, Some(&server)] {
            let s = setup(redis, None).await;
            let c = &s.coordinator;
            let budget = c.retry_budget("chat", "primary").expect("budget");
            for _ in 0..20 {
                budget.deposit();
            }
            let mut granted = 0;
            for _ in 0..3 {
                if budget.withdraw().await.is_granted() {
                    granted += 1;
                }
            }
            let first = c
                .read_retry_budget("primary")
                .await
                .expect("read")
                .expect("a budget is configured");
            let again = c
                .read_retry_budget("primary")
                .await
                .expect("read")
                .expect("a budget is configured");
            assert_eq!(first.value, again.value, "reading changes nothing");
            assert_eq!(first.value.requests, 20);
            assert_eq!(first.value.retries, granted);
            assert_eq!(
                first.value.available(),
                first.value.allowed - granted,
                "{:?}",
                first.value
            );
            let untouched = c
                .read_retry_budget("fallback")
                .await
                .expect("read")
                .expect("configured");
            assert_eq!((untouched.value.requests, untouched.value.retries), (0, 0));
            readings.push((first.source, first.value));
        }
        assert_eq!(readings[0].0, fusebox::Source::Embedded);
        assert_eq!(readings[1].0, fusebox::Source::Shared);
        assert_eq!(readings[0].1, readings[1].1, "{readings:?}");
    })
    .await;
}

/// On Redis Cluster (3 masters): the budget reading (`HMGET` routed by its key's slot), the
/// admin API's listing and a force, and the `/metrics` gauges go through the cluster client;
/// targets spread over the masters.
#[tokio::test]
async fn the_admin_api_and_metrics_work_on_a_cluster() {
    bounded(async {
        let cluster = RedisCluster::start(3);
        let mock = MockUpstream::builder().start().await.expect("mock binds");
        let mut config = config(&mock.url(), None, Some(TOKEN));
        config.redis = Some(RedisConfig {
            cluster: cluster.urls(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            operator_timeout: Some(Duration::from_secs(2)),
            ..RedisConfig::default()
        });
        let targets: Vec<String> = (0..12).map(|i| format!("model-{i:02}")).collect();
        for t in &targets {
            config.targets.insert(t.clone(), TargetConfig::default());
        }
        config.validate().expect("valid");
        let coordinator = Coordinator::new(config.clone()).await.expect("coordinator");
        let state = ProxyState::new(coordinator.clone(), config.server.clone()).expect("state");
        for t in &targets {
            let budget = coordinator.retry_budget("chat", t).expect("budget");
            budget.deposit();
            budget.deposit();
            assert!(budget.withdraw().await.is_granted());
            let (resp, body) = send(
                &state,
                admin("POST", &format!("/admin/breakers/{t}/open"), Some(TOKEN)),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK, "{body}");
        }
        for (i, node) in cluster.nodes().iter().enumerate() {
            assert_ne!(
                node.cli(&["DBSIZE"]).trim(),
                "0",
                "master {i} holds nothing"
            );
        }
        let (_, body) = send(&state, admin("GET", "/admin/budgets", Some(TOKEN))).await;
        let v = json_of(&body);
        for row in v["budgets"].as_array().expect("rows") {
            if row["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("model-"))
            {
                assert_eq!(
                    (&row["requests"], &row["retries"]),
                    (&json!(2), &json!(1)),
                    "{row}"
                );
            }
        }
        let (_, text) = send(&state, get("/metrics")).await;
        let samples = parse_prometheus(&text);
        assert_eq!(
            value_of(&samples, "fusebox_scrape_read_errors", &[]),
            Some(0.0),
            "{text}"
        );
        for t in &targets {
            assert_eq!(
                value_of(
                    &samples,
                    "fusebox_breaker_state",
                    &[("target", t), ("state", "forced_open")]
                ),
                Some(1.0),
                "{t}: {text}"
            );
            assert_eq!(
                value_of(&samples, "fusebox_retry_budget_retries", &[("target", t)]),
                Some(1.0),
                "{t}"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// `fusebox serve`: the installed recorder and the startup log
// ---------------------------------------------------------------------------------------------

/// A `fusebox serve` child on 127.0.0.1:0; its stdout and stderr lines arrive on channels.
struct Served {
    child: std::process::Child,
    addr: String,
    stderr: std::sync::mpsc::Receiver<String>,
    _config: std::path::PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self._config);
    }
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn serve(upstream: &str, token: Option<&str>) -> Served {
    use std::process::{Command, Stdio};
    let path = std::env::temp_dir().join(format!("{}.toml", support::unique_name("ops-serve")));
    let token = token.map_or(String::new(), |t| format!("admin_token = \"{t}\"\n"));
    std::fs::write(
        &path,
        format!(
            "[server]\nupstream = \"{upstream}\"\ndefault_feature = \"chat\"\n{token}\
             [targets.primary]\nmodel = \"{PRIMARY}\"\n[features.chat]\nchain = [\"primary\"]\n"
        ),
    )
    .expect("write the config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusebox"))
        .args([
            "-c",
            path.to_str().expect("utf-8"),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env_remove("FUSEBOX_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fusebox serve");
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    let line = stdout
        .recv_timeout(BUDGET)
        .expect("fusebox serve prints its address");
    let addr = line
        .strip_prefix("fusebox serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Served {
        child,
        addr,
        stderr,
        _config: path,
    }
}

/// Reads stderr lines until one contains `needle`; everything read is returned.
fn stderr_until(s: &Served, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + BUDGET;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match s.stderr.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(needle) {
                    return seen;
                }
            }
            Err(e) => panic!("no {needle:?} on stderr ({e}):\n{seen}"),
        }
    }
}

/// `fusebox serve` says at start whether the admin API is on, and its `/metrics` renders
/// the globally installed recorder (the pipeline's counters after a request) with the gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_says_whether_the_admin_api_is_on_and_renders_the_installed_recorder() {
    bounded(async {
        let mock = MockUpstream::builder().start().await.expect("mock binds");
        let http = reqwest::Client::new();

        let off = serve(&mock.url(), None);
        let log = stderr_until(&off, "admin API off");
        assert!(log.contains("FUSEBOX_ADMIN_TOKEN"), "{log}");
        let resp = http
            .get(format!("http://{}/admin/breakers", off.addr))
            .send()
            .await
            .expect("admin request");
        assert_eq!(resp.status().as_u16(), 403);
        drop(off);

        let on = serve(&mock.url(), Some(TOKEN));
        let log = stderr_until(&on, "admin API on");
        assert!(!log.contains(TOKEN), "the token is in the log: {log}");
        let resp = http
            .post(format!("http://{}/v1/messages", on.addr))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(
                json!({"model": PRIMARY, "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .send()
            .await
            .expect("proxied request");
        assert_eq!(resp.status().as_u16(), 200);
        let text = http
            .get(format!("http://{}/metrics", on.addr))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        assert!(!text.contains(KEY), "{text}");
        let samples = parse_prometheus(&text);
        assert_eq!(
            value_of(
                &samples,
                "fusebox_calls_total",
                &[("feature", "chat"), ("outcome", "primary")]
            ),
            Some(1.0),
            "the installed recorder is rendered:\n{text}"
        );
        assert_eq!(
            value_of(&samples, "fusebox_store_mode", &[("mode", "embedded")]),
            Some(1.0),
            "{text}"
        );
    })
    .await;
}

/// A stalled Redis (SIGSTOP) does not stall `/readyz` past its own bound (a probe that times
/// out reads as "not ready" for every replica at once): local mode, saying the store did not
/// answer in time. The operator timeout here is 10 s: without the bound the reason would be
/// the store's own timeout.
#[tokio::test]
async fn readyz_does_not_wait_out_a_stalled_redis() {
    bounded(async {
        let server = RedisServer::start();
        let mock = MockUpstream::builder().start().await.expect("mock binds");
        let mut config = config(&mock.url(), Some(&server), None);
        if let Some(r) = config.redis.as_mut() {
            r.operator_timeout = Some(Duration::from_secs(10));
        }
        let coordinator = Coordinator::new(config.clone()).await.expect("coordinator");
        let state = ProxyState::new(coordinator, config.server.clone()).expect("state");
        let (_, body) = send(&state, get("/readyz")).await;
        assert_eq!(json_of(&body)["store"], "shared", "{body}");
        server.pause();
        let (resp, body) = send(&state, get("/readyz")).await;
        let (_, metrics) = send(&state, get("/metrics")).await;
        server.resume();
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        let v = json_of(&body);
        assert_eq!(v["store"], "local", "{body}");
        assert!(
            v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("did not answer within 500 ms")),
            "{body}"
        );
        let samples = parse_prometheus(&metrics);
        assert_eq!(
            value_of(&samples, "fusebox_store_up", &[]),
            Some(0.0),
            "{metrics}"
        );
    })
    .await;
}
