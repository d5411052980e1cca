//! Differential test of `lua/cache_put.lua` / `cache_get.lua` against the in-memory twin
//! (`crate::cache::memory`), at the same instants: the scripts run on the test's clock (see
//! `difftest.rs`), the memory store on a [`ManualClock`] at the same millisecond. A seeded
//! random run of puts (several keys, two features with different caps), gets and clock
//! steps (some past the TTL) must give equal reads, equal evictions and equal contents.

use std::sync::{Arc, LazyLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::{Script, Value};

use super::difftest::{set_clock, support};
use crate::cache::{CacheSpec, StoredEntry};
use crate::clock::{Clock, ManualClock};
use crate::keys::cache_keys;
use crate::store::MemoryStore;

fn on_test_clock(text: &str) -> Script {
    Script::new(&text.replace(
        "redis.call('TIME')",
        "redis.call('HMGET', 'fusebox-test:clock', 's', 'us')",
    ))
}

static PUT: LazyLock<Script> =
    LazyLock::new(|| on_test_clock(include_str!("../../../lua/cache_put.lua")));
static GET: LazyLock<Script> =
    LazyLock::new(|| on_test_clock(include_str!("../../../lua/cache_get.lua")));

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

fn redis_get(con: &mut redis::Connection, key: &str) -> Option<StoredEntry> {
    let v: Value = GET.key(key).invoke(con).expect("cache_get.lua");
    let Value::Array(a) = v else {
        panic!("cache_get.lua: {v:?}")
    };
    let now = match a.first() {
        Some(Value::Int(i)) => *i as u64,
        other => panic!("cache_get.lua time: {other:?}"),
    };
    if a.len() < 5 {
        return None;
    }
    Some(StoredEntry {
        body: text(&a[1])?,
        model: text(&a[2])?,
        exact: text(&a[3])?,
        stored_at_ms: text(&a[4])?.parse().ok()?,
        now_ms: now,
    })
}

#[test]
fn cache_scripts_match_the_memory_store() {
    let server = support::RedisServer::start();
    let mut con = support::sync_connection(&server.url());
    let clock = ManualClock::new(1_700_000_000_000);
    let memory = MemoryStore::new(Arc::new(clock.clone()));
    let specs = [
        CacheSpec {
            feature: "chat".into(),
            keys: cache_keys("diff", "chat"),
            ttl_ms: 5_000,
            max_entries: 3,
        },
        CacheSpec {
            feature: "code".into(),
            keys: cache_keys("diff", "code"),
            ttl_ms: 60_000,
            max_entries: 5,
        },
    ];
    let mut rng = StdRng::seed_from_u64(0x0cac4e);
    let (mut puts, mut hits, mut evictions) = (0, 0, 0);
    for step in 0..1500 {
        // Strictly increasing instants: no two index scores tie (ties order differently).
        clock.advance(std::time::Duration::from_millis(if rng.random_bool(0.05) {
            rng.random_range(2_000..7_000)
        } else {
            rng.random_range(1..300)
        }));
        let now = clock.now_ms();
        set_clock(&mut con, now);
        let spec = &specs[rng.random_range(0..specs.len())];
        let key = spec
            .keys
            .entry("tenant", &format!("req{}", rng.random_range(0..10)));
        if rng.random_bool(0.5) {
            let body = format!("{{\"n\":{step}}}");
            let model = format!("model-{}", step % 3);
            let exact = format!("exact-{}", rng.random_range(0..3));
            let want = memory.cache_put(spec, &key, &model, &exact, &body);
            let got: Vec<i64> = PUT
                .key(&key)
                .key(&spec.keys.index)
                .arg(&body)
                .arg(&model)
                .arg(&exact)
                .arg(spec.ttl_ms)
                .arg(spec.max_entries)
                .invoke(&mut con)
                .expect("cache_put.lua");
            assert_eq!(got, vec![now as i64, i64::from(want)], "step {step}: put");
            puts += 1;
            evictions += want;
        } else {
            let want = memory.cache_get(spec, &key);
            let got = redis_get(&mut con, &key);
            assert_eq!(got, want, "step {step}: get {key}");
            hits += usize::from(want.is_some());
        }
        for s in &specs {
            let n: usize = redis::cmd("ZCARD")
                .arg(&s.keys.index)
                .query(&mut con)
                .expect("ZCARD");
            assert!(n <= s.max_entries as usize, "step {step}: {n} entries");
        }
    }
    // The run exercised what it is meant to.
    assert!(
        puts > 500 && hits > 100 && evictions > 50,
        "{puts} {hits} {evictions}"
    );
}
