//! The degraded-response cache on Redis: `lua/cache_put.lua` / `cache_get.lua`, sent through
//! a deadpool-redis pool of their own, never the admission connection, so a 100 KB write
//! cannot queue ahead of an admission on the multiplexed connection. The pool connects on
//! first use; its waits are bounded (deadpool has no timeouts by default), and every cache
//! call is bounded by the feature's `[cache] timeout` on top.

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::{Runtime, Timeouts};
use redis::{Script, Value};

use super::RedisStore;
use crate::cache::{CacheSpec, StoredEntry};
use crate::config::RedisConfig;
use crate::{Error, StoreError};

static CACHE_PUT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../../lua/cache_put.lua")));
static CACHE_GET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../../lua/cache_get.lua")));

/// Connections in the cache pool: cache traffic is one read per degraded call and one write
/// per successful call, each short; a few connections keep a slow write from blocking reads.
const POOL_SIZE: usize = 4;

/// The cache's own connections.
pub(crate) enum CachePool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl CachePool {
    /// A pool for the store's Redis (no connection made here). Waits for a free connection
    /// and connects are bounded by `connect_timeout`, recycling (a PING) by `timeout`.
    pub(crate) fn new(config: &RedisConfig) -> Result<CachePool, Error> {
        let timeouts = Timeouts {
            wait: Some(config.connect_timeout),
            create: Some(config.connect_timeout),
            recycle: Some(config.timeout.max(Duration::from_millis(50))),
        };
        let bad = |field: &str, e: String| Error::config(field, format!("cache pool: {e}"));
        match (&config.url, config.cluster.is_empty()) {
            (Some(url), _) => deadpool_redis::Config::from_url(url.as_str())
                .builder()
                .map_err(|e| bad("redis.url", e.to_string()))?
                .max_size(POOL_SIZE)
                .timeouts(timeouts)
                .runtime(Runtime::Tokio1)
                .build()
                .map(CachePool::Single)
                .map_err(|e| bad("redis.url", e.to_string())),
            (None, _) => deadpool_redis::cluster::Config::from_urls(config.cluster.clone())
                .builder()
                .map_err(|e| bad("redis.cluster", e.to_string()))?
                .max_size(POOL_SIZE)
                .timeouts(timeouts)
                .runtime(Runtime::Tokio1)
                .build()
                .map(CachePool::Cluster)
                .map_err(|e| bad("redis.cluster", e.to_string())),
        }
    }

    async fn invoke(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        bound: Duration,
    ) -> Result<Value, StoreError> {
        let run = async {
            match self {
                CachePool::Single(p) => {
                    let mut c = p.get().await.map_err(|e| pool_error(e, bound))?;
                    inv.invoke_async(&mut c)
                        .await
                        .map_err(|e| crate::error::store_error_from_redis(&e, bound))
                }
                CachePool::Cluster(p) => {
                    let mut c = p.get().await.map_err(|e| pool_error(e, bound))?;
                    inv.invoke_async(&mut c)
                        .await
                        .map_err(|e| crate::error::store_error_from_redis(&e, bound))
                }
            }
        };
        match tokio::time::timeout(bound, run).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(bound)),
        }
    }
}

fn pool_error(e: deadpool_redis::PoolError, bound: Duration) -> StoreError {
    match e {
        deadpool_redis::PoolError::Timeout(_) => StoreError::Timeout(bound),
        deadpool_redis::PoolError::Backend(e) => crate::error::store_error_from_redis(&e, bound),
        other => StoreError::Connection(format!("cache pool: {other}")),
    }
}

impl RedisStore {
    /// Stores an entry (`cache_put.lua`) through the cache pool, bounded by `bound`. Returns
    /// how many entries the cap evicted.
    pub async fn cache_put(
        &self,
        spec: &CacheSpec,
        key: &str,
        model: &str,
        exact: &str,
        body: &str,
        bound: Duration,
    ) -> Result<u32, StoreError> {
        let mut inv = CACHE_PUT.prepare_invoke();
        inv.key(key)
            .key(&spec.keys.index)
            .arg(body)
            .arg(model)
            .arg(exact)
            .arg(spec.ttl_ms.max(1))
            .arg(spec.max_entries.max(1));
        let v = self.cache.invoke(&inv, bound).await?;
        match v {
            Value::Array(a) if a.len() == 2 => Ok(int(&a[1]).unwrap_or(0) as u32),
            other => Err(StoreError::Reply(format!("cache_put: {other:?}"))),
        }
    }

    /// Reads an entry (`cache_get.lua`) through the cache pool, bounded by `bound`. An
    /// incomplete entry (a foreign hash under the key) is `Ok(None)`.
    pub async fn cache_get(
        &self,
        key: &str,
        bound: Duration,
    ) -> Result<Option<StoredEntry>, StoreError> {
        let mut inv = CACHE_GET.prepare_invoke();
        inv.key(key);
        let v = self.cache.invoke(&inv, bound).await?;
        let Value::Array(a) = v else {
            return Err(StoreError::Reply("cache_get: not an array".to_owned()));
        };
        let Some(now) = a.first().and_then(int) else {
            return Err(StoreError::Reply("cache_get: no time".to_owned()));
        };
        if a.len() < 5 {
            return Ok(None);
        }
        let (Some(body), Some(model), Some(exact), Some(at)) =
            (text(&a[1]), text(&a[2]), text(&a[3]), text(&a[4]))
        else {
            return Ok(None);
        };
        let Ok(stored_at_ms) = at.parse::<u64>() else {
            return Ok(None);
        };
        Ok(Some(StoredEntry {
            body,
            model,
            exact,
            stored_at_ms,
            now_ms: now.max(0) as u64,
        }))
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}
