//! Test support: real Redis for integration tests.
//!
//! Include it from an integration test with `mod support;` and then:
//!
//! * [`redis()`] — "a Redis" for tests that do not need to own the process (shared state: use
//!   unique key names, see [`unique_name`]). Selection, in order:
//!   1. `REDIS_URL` if set (`FUSEBOX_TEST_REDIS=external` requires it);
//!   2. a spawned `redis-server` if the binary is on `PATH` (`FUSEBOX_TEST_REDIS=spawn` forces it);
//!   3. with `cargo test --features testcontainers` and a Docker engine that answers, a
//!      `redis:7.2` container (`FUSEBOX_TEST_REDIS=testcontainers` forces it);
//!   4. otherwise the call panics with instructions — tests never silently skip.
//! * [`RedisServer`] — a `redis-server` child process the test owns (kill, restart, pause, ...).
//!   Always spawned, whatever `REDIS_URL` says.
//! * [`RedisCluster`] — a real Redis Cluster of N masters made of such processes.
//!
//! Environment knobs:
//! * `REDIS_URL` — use this Redis for [`redis()`].
//! * `FUSEBOX_TEST_REDIS` — `auto` (default), `external`, `spawn` or `testcontainers`.
//! * `FUSEBOX_REDIS_SERVER_BIN` / `FUSEBOX_REDIS_CLI_BIN` — paths of `redis-server` and
//!   `redis-cli` (default: looked up on `PATH`).
//! * `FUSEBOX_KEEP_REDIS_DIRS=1` — keep the spawned servers' temp dirs (logs) after the test.
// `pub` items of a private test module trip the crate-wide `unreachable_pub` lint; they are
// `pub` so every test file can use them.
#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod cluster;
#[cfg(feature = "testcontainers")]
pub mod container;
pub mod delay_proxy;
pub mod nginx;
pub mod recorder;
pub mod redis_server;
pub mod serve;
pub mod tools;

pub use cluster::RedisCluster;
pub use recorder::Recorder;
pub use redis_server::RedisServer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a test gets "a Redis" when it does not need to own the process. Keep it alive for as
/// long as the test uses the URL: dropping it stops a spawned server or container.
pub enum TestRedis {
    /// `REDIS_URL`: a server someone else runs (shared with other tests and runs).
    External(String),
    /// A `redis-server` child process owned by this value.
    Spawned(RedisServer),
    /// A Docker container owned by this value.
    #[cfg(feature = "testcontainers")]
    Container(container::RedisContainer),
}

impl TestRedis {
    /// The `redis://` URL to connect to.
    pub fn url(&self) -> String {
        match self {
            TestRedis::External(url) => url.clone(),
            TestRedis::Spawned(server) => server.url(),
            #[cfg(feature = "testcontainers")]
            TestRedis::Container(container) => container.url(),
        }
    }

    /// A short description of where this Redis comes from, for messages.
    pub fn describe(&self) -> String {
        match self {
            TestRedis::External(url) => format!("external Redis at {url} (REDIS_URL)"),
            TestRedis::Spawned(server) => {
                format!(
                    "spawned redis-server pid {} at {}",
                    server.pid(),
                    server.url()
                )
            }
            #[cfg(feature = "testcontainers")]
            TestRedis::Container(container) => format!("container Redis at {}", container.url()),
        }
    }

    /// A fresh synchronous connection (2 s connect timeout); panics if it cannot connect.
    pub fn connection(&self) -> redis::Connection {
        sync_connection(&self.url())
    }
}

/// How to get Redis, for panic messages.
const HOW_TO_GET_REDIS: &str = "\
The integration tests need a real Redis. Any one of these works:
  * install redis-server and redis-cli (Debian/Ubuntu: `apt-get install -y redis-server redis-tools`),
    the tests then spawn their own servers on free ports;
  * set REDIS_URL=redis://HOST:PORT/ to use a running Redis (a scratch one: tests write keys to it);
  * build with `cargo test --features testcontainers` on a machine with a running Docker engine.
FUSEBOX_TEST_REDIS=external|spawn|testcontainers forces one of them.";

/// "A Redis" for a test that does not need to own the process; see the module docs for the
/// selection order. Never skips: panics with instructions when no Redis can be had.
pub fn redis() -> TestRedis {
    let mode = std::env::var("FUSEBOX_TEST_REDIS")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let redis_url = std::env::var("REDIS_URL")
        .ok()
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty());
    match mode.as_str() {
        "external" => match redis_url {
            Some(url) => TestRedis::External(url),
            None => panic!("FUSEBOX_TEST_REDIS=external but REDIS_URL is not set.\n{HOW_TO_GET_REDIS}"),
        },
        "spawn" => TestRedis::Spawned(RedisServer::start()),
        "testcontainers" | "container" | "docker" => container_or_panic(),
        "" | "auto" => {
            if let Some(url) = redis_url {
                return TestRedis::External(url);
            }
            if redis_server::redis_server_available() {
                return TestRedis::Spawned(RedisServer::start());
            }
            #[cfg(feature = "testcontainers")]
            if container::docker_answers() {
                return TestRedis::Container(container::RedisContainer::start());
            }
            panic!(
                "no Redis for the tests: REDIS_URL is not set, `{}` is not on PATH{}.\n{HOW_TO_GET_REDIS}",
                redis_server::redis_server_bin(),
                if cfg!(feature = "testcontainers") {
                    " and no Docker engine answers"
                } else {
                    " and the crate was built without --features testcontainers"
                }
            )
        }
        other => panic!(
            "FUSEBOX_TEST_REDIS={other:?} is not one of auto, external, spawn, testcontainers.\n{HOW_TO_GET_REDIS}"
        ),
    }
}

#[cfg(feature = "testcontainers")]
fn container_or_panic() -> TestRedis {
    TestRedis::Container(container::RedisContainer::start())
}

#[cfg(not(feature = "testcontainers"))]
fn container_or_panic() -> TestRedis {
    panic!(
        "FUSEBOX_TEST_REDIS=testcontainers needs the crate feature: run `cargo test --features testcontainers`.\n{HOW_TO_GET_REDIS}"
    )
}

/// A fresh synchronous connection to `url` with a 2 s connect timeout; panics if it cannot
/// connect.
pub fn sync_connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .unwrap_or_else(|e| panic!("bad Redis URL {url}: {e}"))
        .get_connection_with_timeout(std::time::Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

/// A name unique to this test process and call, e.g. for key prefixes on a shared Redis:
/// `fusebox-test-{tag}-{pid}-{counter}-{nanos}` (no `:`, so it also serves as a namespace).
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("fusebox-test-{tag}-{}-{n}-{nanos}", std::process::id())
}

/// Formats a Redis reply as text, roughly like `redis-cli` does: `OK`, integers as digits,
/// strings as their (lossy UTF-8) text, `(nil)`, arrays/sets one element per line, maps as
/// `key => value` lines, server errors as `(error) CODE detail`.
pub fn format_value(value: &redis::Value) -> String {
    use redis::Value;
    match value {
        Value::Nil => "(nil)".to_string(),
        Value::Int(i) => i.to_string(),
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".to_string(),
        Value::Double(d) => d.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::Array(items) | Value::Set(items) | Value::Push { data: items, .. } => items
            .iter()
            .map(format_value)
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{} => {}", format_value(k), format_value(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Attribute { data, .. } => format_value(data),
        Value::ServerError(err) => match err.details() {
            Some(detail) => format!("(error) {} {detail}", err.code()),
            None => format!("(error) {}", err.code()),
        },
        other => format!("{other:?}"),
    }
}
