//! The proxy (`fusebox::proxy`): its router driven with `oneshot` (no socket) or served on
//! 127.0.0.1 where a real client connection matters, in front of the fake upstream
//! (`fusebox::mock`, a real HTTP server speaking the Messages API), on the embedded store
//! and a real redis-server. Pass-through of body fields and headers, fallback replacing the
//! model with the headers that say so, errors in the API's shape, streams failing over
//! before their first byte and ending with an `error` event after it, a client going away
//! mid-stream giving its permit back, bad input, and the API key absent from logs.

mod support;

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use fusebox::mock::{MockUpstream, Plan, Reply};
use fusebox::proxy::{app, ProxyState};
use fusebox::{
    BreakerConfig, CannedConfig, Config, Coordinator, FeatureConfig, RedisConfig, ServerConfig,
    TargetConfig,
};
use serde_json::{json, Value};
use support::RedisServer;
use tower::ServiceExt;

const BUDGET: Duration = Duration::from_secs(60);
const KEY: &str = "sk-ant-proxy-test-key-0123456789abcdef";
const PRIMARY: &str = "claude-primary";
const FALLBACK: &str = "claude-fallback";
const CANNED: &str = "We are busy; please try again in a minute.";

enum Env {
    Memory,
    Redis(RedisServer),
}

impl Env {
    fn config(&self, upstream: &str) -> Config {
        let mut config = Config {
            namespace: support::unique_name("proxy"),
            redis: match self {
                Env::Memory => None,
                Env::Redis(s) => Some(RedisConfig {
                    url: Some(s.url()),
                    timeout: Duration::from_secs(2),
                    connect_timeout: Duration::from_secs(5),
                    ..RedisConfig::default()
                }),
            },
            breaker: BreakerConfig {
                consecutive_failures: Some(100),
                ..BreakerConfig::default()
            },
            server: ServerConfig {
                upstream: upstream.to_owned(),
                default_feature: Some("chat".into()),
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
                max_concurrent: Some(10),
                ..FeatureConfig::default()
            },
        );
        config.features.insert(
            "canned".into(),
            FeatureConfig {
                chain: vec!["primary".into()],
                canned: Some(CannedConfig {
                    text: CANNED.into(),
                    retry_after: Some(Duration::from_secs(30)),
                }),
                ..FeatureConfig::default()
            },
        );
        config
    }
}

async fn bounded(scenario: impl Future<Output = ()>) {
    tokio::time::timeout(BUDGET, scenario)
        .await
        .expect("the test ran past its time budget");
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::bounded(super::$name(super::Env::Memory)).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::bounded(super::$name(super::Env::Redis(super::RedisServer::start()))).await
            }
        }
    )*};
}

macro_rules! on_memory {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::bounded(super::$name(super::Env::Memory)).await
            }
        }
    )*};
}

struct Setup {
    mock: MockUpstream,
    coordinator: Coordinator,
    state: ProxyState,
}

async fn setup_with(env: &Env, edit: impl FnOnce(&mut Config)) -> Setup {
    let mock = MockUpstream::builder().start().await.expect("mock binds");
    let mut config = env.config(&mock.url());
    edit(&mut config);
    config.validate().expect("valid configuration");
    let server = config.server.clone();
    let coordinator = Coordinator::new(config).await.expect("coordinator");
    let state = ProxyState::new(coordinator.clone(), server).expect("proxy state");
    Setup {
        mock,
        coordinator,
        state,
    }
}

async fn setup(env: &Env) -> Setup {
    setup_with(env, |_| {}).await
}

fn post(path: &str) -> axum::http::request::Builder {
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
}

fn request(body: &Value) -> Request<Body> {
    post("/v1/messages")
        .body(Body::from(body.to_string()))
        .expect("request")
}

fn ask(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello"}],
    })
}

async fn send(state: &ProxyState, req: Request<Body>) -> (Response<()>, Vec<u8>) {
    let resp = app(state.clone()).oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("body reads");
    (Response::from_parts(parts, ()), bytes.to_vec())
}

fn header<'a>(resp: &'a Response<()>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
                .chars()
                .take(300)
                .collect::<String>()
        )
    })
}

/// An error body in the API's shape, with its `error.type`.
fn api_error_type(bytes: &[u8]) -> String {
    let v = json_of(bytes);
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["type"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------

async fn unknown_fields_and_headers_pass_through_untouched(env: Env) {
    let s = setup(&env).await;
    let mut body = ask(PRIMARY);
    body["metadata"] = json!({"user_id": "u-42"});
    body["a_field_from_the_future"] = json!({"nested": [1, 2.5, "x", null], "flag": true});
    body["system"] =
        json!([{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]);
    let req = post("/v1/messages")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .body(Body::from(body.to_string()))
        .expect("request");
    let (resp, bytes) = send(&s.state, req).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let seen = s.mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body, "the upstream got the body as sent");
    assert_eq!(seen[0].api_key.as_deref(), Some(KEY));
    assert_eq!(seen[0].version.as_deref(), Some("2023-06-01"));
    assert_eq!(seen[0].beta.as_deref(), Some("prompt-caching-2024-07-31"));
    let answer = json_of(&bytes);
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["model"], PRIMARY);
    assert_eq!(header(&resp, "x-fusebox-tier"), Some("primary"));
    assert_eq!(header(&resp, "x-fusebox-model"), Some(PRIMARY));
    assert_eq!(header(&resp, "x-fusebox-target"), Some("primary"));
    assert_eq!(header(&resp, "x-fusebox-attempts"), Some("1"));
    assert_eq!(header(&resp, "x-fusebox-degraded"), Some("false"));
    assert!(
        header(&resp, "request-id").is_some(),
        "request-id passes back"
    );
    assert!(header(&resp, "x-fusebox-cache-age").is_none());
}

async fn fallback_replaces_the_model_and_says_so(env: Env) {
    let s = setup(&env).await;
    s.mock.set(PRIMARY, Plan::always(Reply::overloaded()));
    let mut body = ask(PRIMARY);
    body["temperature"] = json!(0.25);
    let (resp, bytes) = send(&s.state, request(&body)).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(json_of(&bytes)["model"], FALLBACK);
    assert_eq!(header(&resp, "x-fusebox-tier"), Some("fallback"));
    assert_eq!(header(&resp, "x-fusebox-model"), Some(FALLBACK));
    assert_eq!(header(&resp, "x-fusebox-target"), Some("fallback"));
    assert_eq!(header(&resp, "x-fusebox-attempts"), Some("2"));
    assert_eq!(header(&resp, "x-fusebox-degraded"), Some("true"));
    let seen = s.mock.seen();
    assert_eq!(seen.len(), 2);
    let mut expected = body.clone();
    expected["model"] = json!(FALLBACK);
    assert_eq!(seen[1].body, expected, "only the model was replaced");
}

async fn bad_input_gets_400s_and_413s_in_the_api_shape(env: Env) {
    let s = setup_with(&env, |c| c.server.max_body_bytes = 4096).await;
    let raw = |body: &str| {
        post("/v1/messages")
            .body(Body::from(body.to_owned()))
            .expect("request")
    };
    for (body, why) in [
        ("{\"model\": ", "invalid JSON"),
        ("", "empty body"),
        ("[1, 2]", "not an object"),
        ("{\"max_tokens\": 5, \"messages\": []}", "missing model"),
        ("{\"model\": 7, \"max_tokens\": 5}", "model not a string"),
        (
            "{\"model\": \"claude-primary\", \"stream\": \"yes\"}",
            "stream not a bool",
        ),
        (
            "{\"model\": \"claude-unknown\", \"max_tokens\": 5}",
            "model not in the chain",
        ),
    ] {
        let (resp, bytes) = send(&s.state, raw(body)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(api_error_type(&bytes), "invalid_request_error", "{why}");
    }
    // Oversized, with and without a declared length.
    let big = json!({"model": PRIMARY, "max_tokens": 5, "pad": "x".repeat(5000)}).to_string();
    let (resp, bytes) = send(&s.state, raw(&big)).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api_error_type(&bytes), "request_too_large");
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(1000)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let streamed = post("/v1/messages")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("request");
    let (resp, bytes) = send(&s.state, streamed).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api_error_type(&bytes), "request_too_large");
    // An unknown feature header.
    let req = post("/v1/messages")
        .header("x-fusebox-feature", "no-such-feature")
        .body(Body::from(ask(PRIMARY).to_string()))
        .expect("request");
    let (resp, bytes) = send(&s.state, req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(api_error_type(&bytes), "invalid_request_error");
    assert!(String::from_utf8_lossy(&bytes).contains("no-such-feature"));
    assert_eq!(s.mock.total_requests(), 0, "nothing bad went upstream");
    assert_eq!(
        s.coordinator
            .read_in_flight("chat")
            .await
            .expect("reads")
            .value,
        0
    );
}

on_both!(
    unknown_fields_and_headers_pass_through_untouched,
    fallback_replaces_the_model_and_says_so,
);
on_memory!(bad_input_gets_400s_and_413s_in_the_api_shape);
