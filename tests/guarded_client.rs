//! The Anthropic client with the pipeline preconfigured (`Client::guarded`), against the fake
//! upstream (a real HTTP server on 127.0.0.1), on the embedded store and a real Redis: the
//! chain walked with each target's model and max_tokens, a 529 answered by the fallback,
//! every model down answered from the cache (degraded, with its age) and then by the canned
//! text, tenant isolation by API key, the key never in a Redis key or value, and streams
//! failing over only before their first event is handed over.

mod support;

use std::future::Future;
use std::time::Duration;

use fusebox::anthropic::{ApiKey, Client, EventKind, Guarded, MessagesRequest};
use fusebox::cache::Caller;
use fusebox::mock::{MockUpstream, Plan, Reply};
use fusebox::pipeline::{Reply as Answer, Tier};
use fusebox::{
    BreakerConfig, CannedConfig, Config, Coordinator, FeatureConfig, RedisConfig, TargetConfig,
};
use support::RedisServer;

const BUDGET: Duration = Duration::from_secs(60);
const KEY: &str = "sk-ant-guarded-tenant-a-0123456789";
const OTHER_KEY: &str = "sk-ant-guarded-tenant-b-9876543210";
const PRIMARY: &str = "claude-primary";
const FALLBACK: &str = "claude-fallback";
const CANNED: &str = "Our assistant is busy; please try again in a minute.";

enum Env {
    Memory,
    Redis(RedisServer),
}

impl Env {
    fn config(&self) -> Config {
        let mut config = Config {
            namespace: support::unique_name("guarded"),
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
            ..Config::default()
        };
        config.cache.enabled = true;
        for (name, model, max_tokens) in [("primary", PRIMARY, 32), ("fallback", FALLBACK, 16)] {
            config.targets.insert(
                name.into(),
                TargetConfig {
                    model: Some(model.into()),
                    max_tokens: Some(max_tokens),
                    timeout: Some(Duration::from_secs(10)),
                    ..TargetConfig::default()
                },
            );
        }
        config.features.insert(
            "chat".into(),
            FeatureConfig {
                chain: vec!["primary".into(), "fallback".into()],
                canned: Some(CannedConfig {
                    text: CANNED.into(),
                    retry_after: Some(Duration::from_secs(60)),
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

async fn setup(env: &Env) -> (MockUpstream, Coordinator, Guarded) {
    let mock = MockUpstream::builder().start().await.expect("mock binds");
    let coordinator = Coordinator::new(env.config())
        .await
        .expect("valid configuration");
    assert!(!coordinator.is_degraded(), "the store answers");
    let client = Client::builder()
        .base_url(mock.url())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let guarded = client.guarded(coordinator.clone(), "chat");
    (mock, coordinator, guarded)
}

fn ask(text: &str) -> MessagesRequest {
    // The caller's model and max_tokens are replaced by each target's.
    MessagesRequest::user_text("whatever-the-caller-said", 1000, text)
}

async fn primary_overloaded_the_fallback_answers(env: Env) {
    let (mock, _c, guarded) = setup(&env).await;
    let healthy = guarded
        .messages(&ask("hello"), KEY)
        .await
        .expect("the primary answers");
    assert_eq!(
        (healthy.tier, healthy.degraded, healthy.attempts),
        (Tier::Primary, false, 1)
    );
    assert_eq!(healthy.model.as_deref(), Some(PRIMARY));

    mock.set(PRIMARY, Plan::always(Reply::overloaded()));
    let answered = guarded
        .messages(&ask("hello again"), KEY)
        .await
        .expect("the fallback answers");
    assert_eq!(
        (answered.tier, answered.degraded, answered.attempts),
        (Tier::Fallback, true, 2)
    );
    assert_eq!(answered.target.as_deref(), Some("fallback"));
    assert_eq!(answered.model.as_deref(), Some(FALLBACK));
    assert_eq!(answered.cache_age(), None);
    let reply = answered.into_fresh().expect("a fresh answer");
    assert_eq!(reply.message.model, FALLBACK);
    assert_eq!(reply.message.text(), "claude-fallback says: hello again");

    let seen = mock.seen();
    let asked: Vec<(&str, u64, Option<&str>)> = seen
        .iter()
        .map(|s| {
            (
                s.model.as_str(),
                s.body["max_tokens"].as_u64().unwrap_or(0),
                s.api_key.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        asked,
        vec![
            (PRIMARY, 32, Some(KEY)),
            (PRIMARY, 32, Some(KEY)),
            (FALLBACK, 16, Some(KEY)),
        ],
        "each target's model and max_tokens, the caller's key"
    );
}

async fn every_model_down_the_cache_then_the_canned_text(env: Env) {
    let (mock, c, guarded) = setup(&env).await;
    let question = ask("What is the capital of France?");
    let fresh = guarded
        .messages(&question, KEY)
        .await
        .expect("the primary answers");
    assert_eq!(fresh.tier, Tier::Primary);
    // The write is in the background: wait until it landed.
    let as_json = serde_json::to_value(&question).expect("json");
    let caller = Caller {
        api_key: Some(KEY),
        tenant_id: None,
    };
    let mut stored = false;
    for _ in 0..200 {
        if c.cache_get("chat", caller, &as_json)
            .await
            .expect("chat")
            .is_some()
        {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stored, "the primary's answer was stored");

    mock.set(PRIMARY, Plan::always(Reply::overloaded()));
    mock.set(FALLBACK, Plan::always(Reply::overloaded()));
    mock.reset_counts();
    let served = guarded
        .messages(&ask("what is the capital of france"), KEY)
        .await
        .expect("the cache answers");
    assert_eq!(
        (served.tier, served.degraded, served.attempts),
        (Tier::Cache, true, 2)
    );
    assert_eq!(served.model.as_deref(), Some(PRIMARY));
    assert!(served.cache_age().is_some(), "a cached answer has an age");
    match &served.reply {
        Answer::Cached(hit) => assert_eq!(
            hit.body["content"][0]["text"],
            "claude-primary says: What is the capital of France?"
        ),
        other => panic!("expected a cached answer, got {other:?}"),
    }
    assert_eq!((mock.requests(PRIMARY), mock.requests(FALLBACK)), (1, 1));

    // Another tenant never gets it, nor does a different question: the canned text.
    for (text, key) in [
        ("What is the capital of France?", OTHER_KEY),
        ("What is the capital of Spain?", KEY),
    ] {
        let canned = guarded
            .messages(&ask(text), key)
            .await
            .expect("the canned answer");
        assert_eq!((canned.tier, canned.degraded), (Tier::Canned, true));
        match &canned.reply {
            Answer::Canned { text, .. } => assert_eq!(text, CANNED),
            other => panic!("expected the canned answer, got {other:?}"),
        }
    }

    if let Env::Redis(server) = &env {
        let mut conn = support::sync_connection(&server.url());
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).expect("KEYS");
        assert!(
            keys.iter().any(|k| k.contains(":cache")),
            "the answer is in Redis: {keys:?}"
        );
        for k in &keys {
            assert!(
                !k.contains(KEY) && !k.contains("sk-ant"),
                "an API key in a Redis key: {k}"
            );
            let dump: Vec<u8> = redis::cmd("DUMP").arg(k).query(&mut conn).expect("DUMP");
            let text = String::from_utf8_lossy(&dump);
            assert!(!text.contains("sk-ant"), "an API key in the value of {k}");
        }
    }
}

async fn streams_fail_over_only_before_their_first_event(env: Env) {
    let (mock, _c, guarded) = setup(&env).await;
    mock.set(PRIMARY, Plan::always(Reply::overloaded()));
    let answered = guarded
        .stream(&ask("stream it"), KEY)
        .await
        .expect("the fallback streams");
    assert_eq!(
        (answered.tier, answered.attempts, answered.model.as_deref()),
        (Tier::Fallback, 2, Some(FALLBACK))
    );
    let events = answered
        .into_fresh()
        .expect("a stream")
        .collect()
        .await
        .expect("the whole stream");
    assert_eq!(
        events.first().map(|e| &e.kind),
        Some(&EventKind::MessageStart),
        "the first event, read to decide, is handed over"
    );
    assert_eq!(
        events.last().map(|e| &e.kind),
        Some(&EventKind::MessageStop)
    );
    assert!(mock.seen().iter().all(|s| s.stream));

    // An error after the first event is the caller's: no failover once bytes were handed over.
    mock.set(
        PRIMARY,
        Plan::always(Reply::error_after_start("overloaded_error")),
    );
    mock.reset_counts();
    let answered = guarded
        .stream(&ask("stream it again"), KEY)
        .await
        .expect("the primary started");
    assert_eq!((answered.tier, answered.attempts), (Tier::Primary, 1));
    let mut stream = answered.into_fresh().expect("a stream");
    let first = stream
        .next()
        .await
        .expect("an event")
        .expect("message_start");
    assert_eq!(first.kind, EventKind::MessageStart);
    let mut failed = false;
    while let Some(ev) = stream.next().await {
        if ev.is_err() {
            failed = true;
        }
    }
    assert!(failed, "the error event reaches the caller");
    assert_eq!(
        mock.requests(FALLBACK),
        0,
        "no failover after the first event"
    );
}

async fn a_server_error_is_retried_on_the_same_target_by_default(env: Env) {
    let (mock, _c, guarded) = setup(&env).await;
    mock.push(PRIMARY, [Reply::status(503)]);
    let answered = guarded
        .messages(&ask("retry me"), KEY)
        .await
        .expect("the primary answers its retry");
    assert_eq!(
        (answered.tier, answered.attempts, answered.degraded),
        (Tier::Primary, 2, false)
    );
    assert_eq!((mock.requests(PRIMARY), mock.requests(FALLBACK)), (2, 0));
}

on_both!(
    a_server_error_is_retried_on_the_same_target_by_default,
    primary_overloaded_the_fallback_answers,
    every_model_down_the_cache_then_the_canned_text,
    streams_fail_over_only_before_their_first_event,
);

#[tokio::test]
async fn a_key_that_cannot_be_a_header_is_a_fusebox_error() {
    let (_mock, _c, guarded) = setup(&Env::Memory).await;
    let r = guarded.messages(&ask("hi"), "sk-bad\nkey").await;
    assert!(matches!(r, Err(fusebox::CallError::Fusebox(_))), "{r:?}");
    assert!(ApiKey::new("sk-bad\nkey").is_err());
}
