//! The operator's own connection to Redis: established eagerly (so that a wrong password, a
//! closed port, an unknown host, TLS to a plain port or a cluster configuration pointed at a
//! single node each fail with their cause), bounded by the operator timeout, and separate
//! from the hot path's connection and its short `redis.timeout`.
//!
//! Known names are found with `SCAN MATCH fusebox:{<namespace>:*` (read-only, in pages of
//! 1,000 keys; on Cluster on every master), so listing does not block Redis like `KEYS`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Value};

use super::KnownNames;
use crate::config::RedisConfig;
use crate::error::store_error_from_redis;
use crate::keys::{TargetKeys, LAYOUT};
use crate::store::RedisStore;
use crate::{Error, StoreError};

/// Keys read per `SCAN` call.
const SCAN_PAGE: usize = 1000;
/// Most names listed (of targets and features together): a bound on memory and time.
const MAX_NAMES: usize = 10_000;

/// The operator's connection, made on first use. Lives in the coordinator.
pub(crate) struct OperatorLink {
    /// The Redis configuration with the operator timeout as its bound; `None`: embedded.
    pub(super) config: Option<RedisConfig>,
    pub(super) cell: tokio::sync::OnceCell<Link>,
}

impl OperatorLink {
    pub(crate) fn new(config: Option<&RedisConfig>) -> Self {
        OperatorLink {
            config: config.map(|rc| {
                let t = rc.resolved_operator_timeout();
                RedisConfig {
                    timeout: t,
                    connect_timeout: t,
                    ..rc.clone()
                }
            }),
            cell: tokio::sync::OnceCell::new(),
        }
    }
}

pub(super) struct Link {
    /// Runs the scripts (snapshot, in_flight, force) with the operator timeout.
    pub(super) store: RedisStore,
    raw: Raw,
    timeout: Duration,
}

/// Both reconnect by themselves after Redis restarts (a coordinator lives longer than one
/// connection).
enum Raw {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Link {
    pub(super) async fn connect(config: &RedisConfig) -> Result<Link, Error> {
        let t = config.timeout;
        let tls = config
            .url
            .iter()
            .chain(&config.cluster)
            .any(|u| u.starts_with("rediss://"));
        let raw = bounded(t, tls, connect_raw(config)).await?;
        let store = RedisStore::connect(config).await?;
        Ok(Link {
            store,
            raw,
            timeout: t,
        })
    }

    /// The server's clock (`TIME`), in ms since the Unix epoch.
    pub(super) async fn time_ms(&self) -> Result<u64, StoreError> {
        let t = self.timeout;
        let cmd = redis::cmd("TIME");
        let v: Value = match &self.raw {
            Raw::Single(con) => bounded(t, false, cmd.query_async(&mut con.clone())).await?,
            Raw::Cluster(con) => bounded(t, false, cmd.query_async(&mut con.clone())).await?,
        };
        let parts: Vec<u64> = match &v {
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| text(p).and_then(|s| s.parse().ok()))
                .collect(),
            _ => Vec::new(),
        };
        match parts.as_slice() {
            [secs, micros] => Ok(secs.saturating_mul(1000) + micros / 1000),
            _ => Err(StoreError::Reply(format!("TIME replied {v:?}"))),
        }
    }

    /// Whether a target has state in Redis (either of its keys exists; both live under one
    /// hash tag, so one `EXISTS` answers on Cluster too).
    pub(super) async fn has_state(&self, keys: &TargetKeys) -> Result<bool, StoreError> {
        let t = self.timeout;
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(&keys.breaker).arg(&keys.probes);
        let n: i64 = match &self.raw {
            Raw::Single(con) => bounded(t, false, cmd.query_async(&mut con.clone())).await?,
            Raw::Cluster(con) => bounded(t, false, cmd.query_async(&mut con.clone())).await?,
        };
        Ok(n > 0)
    }

    /// A retry budget's buckets (`e<i>`, `q<i>`, `r<i>` of the hash at `key`, see
    /// `lua/budget_withdraw.lua`) as `(epoch, requests, retries)`, read with one `HMGET`;
    /// absent fields are 0.
    pub(super) async fn budget_buckets(
        &self,
        key: &str,
        buckets: u32,
    ) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let t = self.timeout;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key);
        for i in 0..buckets {
            cmd.arg(format!("e{i}"))
                .arg(format!("q{i}"))
                .arg(format!("r{i}"));
        }
        let v: Value = match &self.raw {
            Raw::Single(con) => bounded(t, false, cmd.query_async(&mut con.clone())).await?,
            Raw::Cluster(con) => bounded(t, false, cmd.query_async(&mut con.clone())).await?,
        };
        let Value::Array(items) = &v else {
            return Err(StoreError::Reply(format!("HMGET replied {v:?}")));
        };
        let num = |item: &Value| -> Result<u64, StoreError> {
            match item {
                Value::Nil => Ok(0),
                other => text(other)
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Reply(format!("budget {key:?}: field {other:?}"))),
            }
        };
        items
            .chunks(3)
            .map(|c| match c {
                [e, q, r] => Ok((num(e)?, num(q)?, num(r)?)),
                _ => Err(StoreError::Reply(format!("HMGET replied {v:?}"))),
            })
            .collect()
    }

    /// Names of targets and features with keys under `namespace`.
    pub(super) async fn scan_names(&self, namespace: &str) -> Result<KnownNames, StoreError> {
        let pattern = format!("fusebox:{{{namespace}:*");
        let mut names = KnownNames::default();
        let t = self.timeout;
        match &self.raw {
            Raw::Single(con) => {
                let mut con = con.clone();
                let mut cursor = 0u64;
                loop {
                    let v: Value =
                        bounded(t, false, scan_cmd(cursor, &pattern).query_async(&mut con)).await?;
                    let (next, keys) = parse_scan(&v)?;
                    collect(&mut names, namespace, keys);
                    if next == 0 || full(&names) {
                        break;
                    }
                    cursor = next;
                }
            }
            Raw::Cluster(con) => {
                let mut con = con.clone();
                let route = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let first =
                    bounded(t, false, con.route_command(scan_cmd(0, &pattern), route)).await?;
                for (addr, v) in per_node(&first)? {
                    let (mut next, keys) = parse_scan(v)?;
                    collect(&mut names, namespace, keys);
                    let Some((host, port)) = addr.rsplit_once(':') else {
                        return Err(StoreError::Reply(format!("SCAN: node address {addr:?}")));
                    };
                    let port: u16 = port
                        .parse()
                        .map_err(|_| StoreError::Reply(format!("SCAN: node address {addr:?}")))?;
                    while next != 0 && !full(&names) {
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.to_owned(),
                            port,
                        });
                        let v =
                            bounded(t, false, con.route_command(scan_cmd(next, &pattern), route))
                                .await?;
                        let (n, keys) = parse_scan(&v)?;
                        collect(&mut names, namespace, keys);
                        next = n;
                    }
                }
            }
        }
        Ok(names)
    }
}

async fn connect_raw(config: &RedisConfig) -> Result<Raw, redis::RedisError> {
    let t = config.timeout;
    match &config.url {
        Some(url) => {
            let client = redis::Client::open(url.as_str())?;
            // Connects now, once (no retries), so the first failure comes back with its cause.
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t))
                .set_number_of_retries(0);
            let mut con = client.get_connection_manager_with_config(cfg).await?;
            redis::cmd("PING").query_async::<Value>(&mut con).await?;
            Ok(Raw::Single(con))
        }
        None => {
            let client = ClusterClient::builder(config.cluster.iter().map(String::as_str))
                .connection_timeout(t)
                .response_timeout(t)
                .retries(1)
                .build()?;
            let mut con = client.get_async_connection().await?;
            redis::cmd("PING").query_async::<Value>(&mut con).await?;
            Ok(Raw::Cluster(con))
        }
    }
}

/// Runs `fut` within `t`, mapping errors by cause. `tls`: a timeout is most likely TLS spoken
/// to a plain port (the server waits for a command that never comes), and says so.
async fn bounded<T>(
    t: Duration,
    tls: bool,
    fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, StoreError> {
    let r = match tokio::time::timeout(t, fut).await {
        Ok(r) => r.map_err(|e| store_error_from_redis(&e, t)),
        Err(_) => Err(StoreError::Timeout(t)),
    };
    match r {
        Err(StoreError::Timeout(t)) if tls => Err(StoreError::Tls(format!(
            "no answer to the TLS handshake within {t:?}: is the port plain TCP? (then use \
             redis:// instead of rediss://)"
        ))),
        r => r,
    }
}

fn scan_cmd(cursor: u64, pattern: &str) -> Cmd {
    let mut c = redis::cmd("SCAN");
    c.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_PAGE);
    c
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[cursor, [key, ...]]`.
fn parse_scan(v: &Value) -> Result<(u64, Vec<String>), StoreError> {
    let bad = || StoreError::Reply(format!("SCAN replied {v:?}"));
    let Value::Array(parts) = v else {
        return Err(bad());
    };
    let [cursor, keys] = parts.as_slice() else {
        return Err(bad());
    };
    let cursor = text(cursor).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let Value::Array(keys) = keys else {
        return Err(bad());
    };
    Ok((cursor, keys.iter().filter_map(text).collect()))
}

/// The per-node replies of a command sent to every master: address -> reply.
fn per_node(v: &Value) -> Result<Vec<(String, &Value)>, StoreError> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(a) if a.len() % 2 == 0 => a.chunks(2).map(|c| (&c[0], &c[1])).collect(),
        _ => {
            return Err(StoreError::Reply(format!(
                "SCAN on every master replied {v:?}"
            )))
        }
    };
    pairs
        .into_iter()
        .map(|(k, v)| {
            if let Value::ServerError(e) = v {
                return Err(StoreError::Command(format!("SCAN: {e:?}")));
            }
            text(k)
                .map(|addr| (addr, v))
                .ok_or_else(|| StoreError::Reply(format!("SCAN: node {k:?}")))
        })
        .collect()
}

fn full(names: &KnownNames) -> bool {
    names.targets.len() + names.features.len() >= MAX_NAMES
}

/// Sorts `fusebox:{<ns>:t:<target>}:v1:...` and `fusebox:{<ns>:f:<feature>}:v1:...` keys
/// into names; other keys (other layouts, foreign keys) are skipped.
fn collect(names: &mut KnownNames, namespace: &str, keys: Vec<String>) {
    let prefix = format!("fusebox:{{{namespace}:");
    for key in keys {
        if full(names) {
            return;
        }
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        let Some(end) = rest.rfind(&format!("}}:{LAYOUT}:")) else {
            continue;
        };
        let inner = &rest[..end];
        if let Some(t) = inner.strip_prefix("t:") {
            names.targets.insert(t.to_owned());
        } else if let Some(f) = inner.strip_prefix("f:") {
            names.features.insert(f.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_into_target_and_feature_names() {
        let mut names = KnownNames::default();
        collect(
            &mut names,
            "app",
            vec![
                "fusebox:{app:t:claude-sonnet-4-6}:v1:breaker".into(),
                "fusebox:{app:t:claude-sonnet-4-6}:v1:probes".into(),
                "fusebox:{app:t:a:b}:v1:breaker".into(),
                "fusebox:{app:f:chat}:v1:permits".into(),
                "fusebox:{app:f:batch}:v1:rate".into(),
                "fusebox:{app:t:old}:v0:breaker".into(),
                "fusebox:{apple:t:x}:v1:breaker".into(),
                "other".into(),
            ],
        );
        assert_eq!(
            names.targets.iter().map(String::as_str).collect::<Vec<_>>(),
            ["a:b", "claude-sonnet-4-6"]
        );
        assert_eq!(
            names
                .features
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["batch", "chat"]
        );
    }

    #[test]
    fn malformed_scan_replies_are_errors_not_panics() {
        for v in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1), Value::Nil]),
            Value::Array(vec![Value::BulkString(b"x".to_vec()), Value::Array(vec![])]),
        ] {
            assert!(parse_scan(&v).is_err(), "{v:?}");
        }
    }
}
