//! The degraded-response cache end to end, through `Coordinator::cache_get` / `cache_put`, on
//! the embedded in-memory store, a spawned `redis-server` and a spawned Redis Cluster:
//! trivial variants hit, different questions miss, tenants never see each other's answers,
//! TTL and cap hold, large values are refused, only successes are stored, and garbage stored
//! under a cache key never panics.
//!
//! Scenarios written once as `async fn name(env: Env)` are instantiated by `on_all!` as
//! `name::memory`, `name::redis` and `name::cluster`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fusebox::cache::{Answer, Caller, Match, NotStorable, RequestKey, Stored, Tenant};
use fusebox::config::TenantSource;
use fusebox::keys::cache_keys;
use fusebox::{CacheConfig, Config, Coordinator, Event, FeatureConfig, RedisConfig};
use serde_json::{json, Value};
use support::{Recorder, RedisCluster, RedisServer};

const NS: &str = "cache-test";
const KEY_A: &str = "sk-ant-api03-tenant-a-secret";
const KEY_B: &str = "sk-ant-api03-tenant-b-secret";

fn a() -> Caller<'static> {
    Caller {
        api_key: Some(KEY_A),
        tenant_id: None,
    }
}

fn b() -> Caller<'static> {
    Caller {
        api_key: Some(KEY_B),
        tenant_id: None,
    }
}

enum Env {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

impl Env {
    fn memory() -> Env {
        Env::Memory
    }
    fn redis() -> Env {
        Env::Redis(RedisServer::start())
    }
    fn cluster() -> Env {
        Env::Cluster(RedisCluster::start(3))
    }

    fn redis_config(&self) -> Option<RedisConfig> {
        let base = RedisConfig {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            ..RedisConfig::default()
        };
        match self {
            Env::Memory => None,
            Env::Redis(s) => Some(RedisConfig {
                url: Some(s.url()),
                ..base
            }),
            Env::Cluster(c) => Some(RedisConfig {
                cluster: c.urls(),
                ..base
            }),
        }
    }

    /// Feature `chat` with the cache on (`cache` over the defaults).
    fn config(&self, cache: CacheConfig) -> Config {
        let mut config = Config {
            namespace: NS.into(),
            redis: self.redis_config(),
            cache,
            ..Config::default()
        };
        config
            .features
            .insert("chat".into(), FeatureConfig::default());
        config
    }

    async fn start(&self, cache: CacheConfig) -> (Coordinator, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let c = Coordinator::builder(self.config(cache))
            .observer(recorder.clone())
            .require_store(true)
            .build()
            .await
            .expect("valid configuration");
        (c, recorder)
    }

    /// Runs one raw command on the Redis holding `key` (not on the memory store).
    fn raw(&self, key: &str, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        use redis::ConnectionLike;
        match self {
            Env::Memory => panic!("no Redis in a memory test"),
            Env::Redis(s) => support::sync_connection(&s.url()).req_command(cmd),
            Env::Cluster(c) => {
                let _ = key;
                let client = redis::cluster::ClusterClient::new(c.urls())?;
                client.get_connection()?.req_command(cmd)
            }
        }
    }
}

fn on() -> CacheConfig {
    CacheConfig {
        enabled: true,
        ..CacheConfig::default()
    }
}

fn ask(text: &str) -> Value {
    json!({
        "model": "claude-sonnet-4-6",
        "max_tokens": 512,
        "system": "You are a geography tutor.",
        "messages": [{"role": "user", "content": text}],
    })
}

fn answer(model: &str, text: &str) -> Answer {
    Answer::success(
        200,
        model,
        json!({"type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn"}),
    )
    .expect("a 200 is storable")
}

fn text_of(c: &fusebox::cache::Cached) -> String {
    c.body["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn put(c: &Coordinator, who: Caller<'_>, req: &Value, ans: &Answer) {
    let stored = c.cache_put("chat", who, req, ans).await.expect("feature");
    assert!(matches!(stored, Stored::Yes), "{stored:?}");
}

fn failures(r: &Recorder) -> usize {
    r.events()
        .iter()
        .filter(|e| matches!(e, Event::CacheFailed { .. }))
        .count()
}

macro_rules! on_all {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() { super::$name(Env::memory()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() { super::$name(Env::redis()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() { super::$name(Env::cluster()).await }
        }
    )*};
}

on_all!(
    trivial_variants_hit_and_different_questions_miss,
    tenant_a_never_gets_tenant_b_answers,
    cap_keeps_the_newest_entries,
    values_over_the_bound_are_refused,
);

async fn trivial_variants_hit_and_different_questions_miss(env: Env) {
    let (c, rec) = env.start(on()).await;
    let q = ask("What is the capital of France?");
    put(&c, a(), &q, &answer("claude-sonnet-4-6", "Paris.")).await;

    // Same request, another model, streaming, metadata: an exact hit.
    let mut same = q.clone();
    same["model"] = json!("claude-haiku-4-5");
    same["stream"] = json!(true);
    same["metadata"] = json!({"user_id": "u-1"});
    let hit = c.cache_get("chat", a(), &same).await.expect("feature");
    let hit = hit.expect("exact hit");
    assert_eq!(hit.matched, Match::Exact);
    assert_eq!(text_of(&hit), "Paris.");
    assert_eq!(hit.model, "claude-sonnet-4-6");
    assert!(hit.is_degraded());
    assert_eq!(hit.source.as_str(), "cache");
    assert!(hit.age < Duration::from_secs(60), "{:?}", hit.age);

    for variant in [
        "what is the capital of france",
        "  What is the   capital of France ?! ",
        "WHAT IS THE CAPITAL OF FRANCE.",
        "What is the capital of France\n?",
        "«What is the capital of France»",
    ] {
        let got = c
            .cache_get("chat", a(), &ask(variant))
            .await
            .expect("feature");
        let got = got.unwrap_or_else(|| panic!("{variant:?} should hit"));
        assert_eq!(got.matched, Match::Similar, "{variant:?}");
        assert_eq!(text_of(&got), "Paris.");
    }

    let mut other_system = q.clone();
    other_system["system"] = json!("You are a pirate.");
    let mut other_temperature = q.clone();
    other_temperature["temperature"] = json!(0.2);
    let mut earlier_turn = q.clone();
    earlier_turn["messages"] = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is the capital of France?"}
    ]);
    let misses = [
        ask("What is the capital of Spain?"),
        ask("What is the capital of France and Spain?"),
        ask("What was the capital of France?"),
        ask("France: what is the capital of"),
        ask("What is the capitol of France?"),
        other_system,
        other_temperature,
        earlier_turn,
    ];
    for m in &misses {
        let got = c.cache_get("chat", a(), m).await.expect("feature");
        assert!(got.is_none(), "{m} should miss, got {got:?}");
    }
    // Inner punctuation and symbols are kept.
    put(&c, a(), &ask("What is 2.5 + 1?"), &answer("m", "3.5")).await;
    for m in ["What is 25 + 1?", "What is 2.5 - 1?", "What is 2.5 1?"] {
        let got = c.cache_get("chat", a(), &ask(m)).await.expect("feature");
        assert!(got.is_none(), "{m} should miss, got {got:?}");
    }
    assert_eq!(failures(&rec), 0, "{:?}", rec.events());
}

async fn tenant_a_never_gets_tenant_b_answers(env: Env) {
    let (c, _) = env.start(on()).await;
    let q = ask("What is our refund policy?");
    put(&c, b(), &q, &answer("m", "B's policy")).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
    put(&c, a(), &q, &answer("m", "A's policy")).await;
    let got_a = c.cache_get("chat", a(), &q).await.expect("f").expect("hit");
    let got_b = c.cache_get("chat", b(), &q).await.expect("f").expect("hit");
    assert_eq!(text_of(&got_a), "A's policy");
    assert_eq!(text_of(&got_b), "B's policy");
    // No API key, no tenant: neither stored nor served.
    let anon = Caller::default();
    assert!(c.cache_get("chat", anon, &q).await.expect("f").is_none());
    let s = c
        .cache_put("chat", anon, &q, &answer("m", "anon"))
        .await
        .expect("f");
    assert!(matches!(s, Stored::NoTenant), "{s:?}");
    // The API keys never appear in a Redis key.
    if !matches!(env, Env::Memory) {
        let keys = all_keys(&env);
        assert!(!keys.is_empty());
        for k in &keys {
            assert!(!k.contains("secret") && !k.contains("sk-ant"), "{k}");
        }
    }
}

/// Every key of the test's Redis (every node of a cluster).
fn all_keys(env: &Env) -> Vec<String> {
    let urls = match env {
        Env::Memory => return Vec::new(),
        Env::Redis(s) => vec![s.url()],
        Env::Cluster(c) => c.urls(),
    };
    let mut keys = Vec::new();
    for url in urls {
        let mut con = support::sync_connection(&url);
        let ks: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).expect("KEYS");
        keys.extend(ks);
    }
    keys
}

async fn cap_keeps_the_newest_entries(env: Env) {
    let (c, _) = env
        .start(CacheConfig {
            max_entries: 3,
            ..on()
        })
        .await;
    for i in 0..5 {
        put(
            &c,
            a(),
            &ask(&format!("question {i}")),
            &answer("m", &format!("answer {i}")),
        )
        .await;
        // Distinct stored-at instants, so "oldest" is well defined on every store.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..5 {
        let got = c
            .cache_get("chat", a(), &ask(&format!("question {i}")))
            .await
            .expect("f");
        if i < 2 {
            assert!(got.is_none(), "question {i} should have been evicted");
        } else {
            assert_eq!(got.map(|g| text_of(&g)), Some(format!("answer {i}")));
        }
    }
    if !matches!(env, Env::Memory) {
        let keys = all_keys(&env);
        let entries = keys.iter().filter(|k| k.contains(":cache:")).count();
        assert_eq!(entries, 3, "{keys:?}");
        let index = cache_keys(NS, "chat").index;
        let n = env
            .raw(&index, redis::cmd("ZCARD").arg(&index))
            .expect("ZCARD");
        assert_eq!(n, redis::Value::Int(3));
    }
}

async fn values_over_the_bound_are_refused(env: Env) {
    let (c, _) = env
        .start(CacheConfig {
            max_value_bytes: 200,
            ..on()
        })
        .await;
    let q = ask("Write a long essay");
    let big = answer("m", &"x".repeat(500));
    let s = c.cache_put("chat", a(), &q, &big).await.expect("f");
    assert!(matches!(s, Stored::TooLarge { max: 200, .. }), "{s:?}");
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
    put(&c, a(), &q, &answer("m", "short")).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_some());
}

#[test]
fn only_successes_can_be_stored() {
    for status in [400, 401, 429, 500, 529, 302, 199] {
        assert_eq!(
            Answer::success(status, "m", json!({"type": "message"})),
            Err(NotStorable::Status(status))
        );
    }
    let error_body = json!({"type": "error", "error": {"type": "overloaded_error"}});
    assert_eq!(
        Answer::success(200, "m", error_body),
        Err(NotStorable::ErrorBody)
    );
}

#[tokio::test(start_paused = true)]
async fn ttl_and_age_on_the_memory_store_follow_paused_time() {
    let (c, _) = Env::Memory
        .start(CacheConfig {
            ttl: Duration::from_secs(60),
            ..on()
        })
        .await;
    let q = ask("What is the capital of France?");
    put(&c, a(), &q, &answer("m", "Paris.")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    let got = c.cache_get("chat", a(), &q).await.expect("f").expect("hit");
    assert_eq!(got.age, Duration::from_secs(59));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_on_redis_expires_entries() {
    let env = Env::redis();
    let (c, _) = env
        .start(CacheConfig {
            ttl: Duration::from_secs(1),
            ..on()
        })
        .await;
    let q = ask("What is the capital of France?");
    put(&c, a(), &q, &answer("m", "Paris.")).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_some());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_off_serves_exact_matches_only() {
    let (c, _) = Env::Memory
        .start(CacheConfig {
            similar: false,
            ..on()
        })
        .await;
    let q = ask("What is the capital of France?");
    put(&c, a(), &q, &answer("m", "Paris.")).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_some());
    let v = ask("what is the capital of france");
    assert!(c.cache_get("chat", a(), &v).await.expect("f").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_sources_tenant_id_and_shared() {
    let by_id = CacheConfig {
        tenant: TenantSource::TenantId,
        ..on()
    };
    let (c, _) = Env::Memory.start(by_id).await;
    let q = ask("Hello?");
    let acme = Caller {
        api_key: Some(KEY_A),
        tenant_id: Some("acme"),
    };
    put(&c, acme, &q, &answer("m", "hi acme")).await;
    let other = Caller {
        api_key: Some(KEY_A),
        tenant_id: Some("globex"),
    };
    assert!(c.cache_get("chat", other, &q).await.expect("f").is_none());
    // Same API key without the tenant id: no tenant, no answer.
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
    let (c, _) = Env::Memory
        .start(CacheConfig {
            tenant: TenantSource::Shared,
            ..on()
        })
        .await;
    put(&c, a(), &q, &answer("m", "hi all")).await;
    assert!(c.cache_get("chat", b(), &q).await.expect("f").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_cache_stores_nothing() {
    let (c, _) = Env::Memory.start(CacheConfig::default()).await;
    let q = ask("Hello?");
    let s = c
        .cache_put("chat", a(), &q, &answer("m", "hi"))
        .await
        .expect("f");
    assert!(matches!(s, Stored::Disabled), "{s:?}");
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
    assert!(c.cache_get("nope", a(), &q).await.is_err());
}

/// The Redis key the test's request is stored under for tenant A.
fn entry_key(req: &Value) -> String {
    let rk = RequestKey::of(req, true).expect("a request");
    cache_keys(NS, "chat").entry(Tenant::from_api_key(NS, KEY_A).as_str(), &rk.lookup)
}

async fn garbage_under_cache_keys_never_panics(env: Env) {
    let (c, rec) = env.start(on()).await;
    let q = ask("What is the capital of France?");
    let key = entry_key(&q);
    let cases: Vec<(&str, redis::Cmd)> = vec![
        (
            "a string",
            redis::cmd("SET").arg(&key).arg("not a hash").clone(),
        ),
        (
            "a non-JSON body",
            redis::cmd("HSET")
                .arg(&key)
                .arg(&["b", "{not json", "m", "m", "e", "x", "at", "1"])
                .clone(),
        ),
        (
            "a non-numeric stored-at",
            redis::cmd("HSET")
                .arg(&key)
                .arg(&["b", "{}", "m", "m", "e", "x", "at", "abc"])
                .clone(),
        ),
        (
            "missing fields",
            redis::cmd("HSET").arg(&key).arg(&["zz", "1"]).clone(),
        ),
        (
            "binary junk",
            redis::cmd("HSET")
                .arg(&key)
                .arg("b")
                .arg(&[0xffu8, 0xfe, 0x00][..])
                .arg("m")
                .arg("m")
                .arg("e")
                .arg("x")
                .arg("at")
                .arg("1")
                .clone(),
        ),
    ];
    for (what, cmd) in cases {
        env.raw(&key, redis::cmd("DEL").arg(&key)).expect("DEL");
        env.raw(&key, &cmd).expect("write garbage");
        let got = c.cache_get("chat", a(), &q).await.expect("feature");
        assert!(got.is_none(), "{what}: {got:?}");
    }
    assert!(failures(&rec) >= 2, "{:?}", rec.events());
    // A put over garbage replaces it.
    put(&c, a(), &q, &answer("m", "Paris.")).await;
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_some());
    // An index of the wrong type: the write is dropped, reported, and nothing panics.
    let index = cache_keys(NS, "chat").index;
    env.raw(&index, redis::cmd("DEL").arg(&index)).expect("DEL");
    env.raw(&index, redis::cmd("SET").arg(&index).arg("x"))
        .expect("SET");
    let s = c
        .cache_put("chat", a(), &q, &answer("m", "again"))
        .await
        .expect("f");
    assert!(matches!(s, Stored::Dropped(_)), "{s:?}");
    assert!(!c.is_degraded(), "a bad value is not an outage");
}

mod garbage_under_cache_keys_never_panics {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        super::garbage_under_cache_keys_never_panics(Env::redis()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster() {
        super::garbage_under_cache_keys_never_panics(Env::cluster()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_miss_and_a_dropped_write() {
    let mut env = Env::redis();
    let (c, rec) = env.start(on()).await;
    let q = ask("What is the capital of France?");
    put(&c, a(), &q, &answer("m", "Paris.")).await;
    if let Env::Redis(s) = &mut env {
        s.kill();
    }
    assert!(c.cache_get("chat", a(), &q).await.expect("f").is_none());
    let s = c
        .cache_put("chat", a(), &q, &answer("m", "Paris."))
        .await
        .expect("f");
    assert!(matches!(s, Stored::Dropped(_)), "{s:?}");
    assert!(failures(&rec) >= 2, "{:?}", rec.events());
    assert!(c.is_degraded(), "health saw the cache's failures");
}

#[test]
fn feature_cache_settings_inherit_field_by_field() {
    let c = Config::from_toml(
        r#"
        [cache]
        enabled = true
        ttl = "10m"
        max_entries = 500
        tenant = "tenant_id"

        [features.chat]
        [features.chat.cache]
        max_entries = 50
        similar = false

        [features.batch.cache]
        enabled = false
        "#,
    )
    .expect("valid");
    let chat = c.features["chat"].cache(&c.cache);
    assert!(chat.enabled);
    assert_eq!(chat.ttl, Duration::from_secs(600));
    assert_eq!(chat.max_entries, 50);
    assert!(!chat.similar);
    assert_eq!(chat.tenant, TenantSource::TenantId);
    assert_eq!(chat.max_value_bytes, CacheConfig::default().max_value_bytes);
    let batch = c.features["batch"].cache(&c.cache);
    assert!(!batch.enabled);
    assert_eq!(batch.max_entries, 500);
}

#[test]
fn bad_cache_settings_are_refused_naming_the_field() {
    for (toml, field) in [
        ("[cache]\nttl = \"0s\"", "cache.ttl"),
        ("[cache]\nmax_entries = 0", "cache.max_entries"),
        ("[cache]\nmax_value_bytes = 0", "cache.max_value_bytes"),
        (
            "[cache]\nmax_value_bytes = 99999999999",
            "cache.max_value_bytes",
        ),
        ("[cache]\ntimeout = \"1m\"", "cache.timeout"),
        ("[cache]\ntenant = \"everyone\"", "cache.tenant"),
        ("[cache]\nsize = 3", "cache"),
        (
            "[features.chat.cache]\nmax_entries = 0",
            "features.chat.cache.max_entries",
        ),
        (
            "[features.chat.cache]\nttl = \"90d\"",
            "features.chat.cache.ttl",
        ),
    ] {
        match Config::from_toml(toml) {
            Err(fusebox::Error::Config { field: f, reason }) => {
                assert!(f.starts_with(field), "{toml}: {f}: {reason}")
            }
            other => panic!("{toml}: {other:?}"),
        }
    }
}

/// A cache call that outlasts its own bound (a large write over a slow link) is a dropped
/// write, not an outage: it must not switch the replica's admissions to local mode (with the
/// default `failure_threshold = 1`, one counted timeout would). Before the cache used its own
/// routing (`Tiered::remote_side`), this replica went local on the first slow write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cache_write_does_not_send_admissions_to_local_mode() {
    let server = RedisServer::start();
    // 40 ms each way: an 80 ms round trip, over the cache's 20 ms bound and well under the
    // hot path's 2 s.
    let proxy = support::delay_proxy::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], server.port())),
        Duration::from_millis(40),
    );
    let mut config = Env::Memory.config(CacheConfig {
        timeout: Duration::from_millis(20),
        ..on()
    });
    config.redis = Some(RedisConfig {
        url: Some(format!("redis://{proxy}")),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    });
    let rec = Arc::new(Recorder::default());
    let c = Coordinator::builder(config)
        .observer(rec.clone())
        .require_store(true)
        .build()
        .await
        .expect("valid configuration");
    let q = ask("What is the capital of France?");
    let s = c
        .cache_put("chat", a(), &q, &answer("m", "Paris."))
        .await
        .expect("feature");
    assert!(
        matches!(s, Stored::Dropped(fusebox::StoreError::Timeout(_))),
        "the write outlasted the cache's bound: {s:?}"
    );
    assert!(
        !c.is_degraded(),
        "a slow cache write sent the replica to local mode: {:?}",
        rec.events()
    );
    let permit = c.admit("chat", "t").await.expect("admitted");
    assert!(!c.is_degraded(), "{:?}", rec.events());
    drop(permit);
}
