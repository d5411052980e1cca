//! Building the connection from [`RedisConfig`]: a [`SingleHandle`] (a lazy
//! `ConnectionManager`) for a single node, a [`ClusterHandle`] for Redis Cluster. Neither
//! connects here.

use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClient;
use redis::IntoConnectionInfo;

use super::conn::{ClusterHandle, SingleHandle};
use crate::config::RedisConfig;
use crate::Error;

/// Connect attempts per (re)connect of the single-node connection: one. The connection
/// manager's own retries (with backoff) hide the cause: a call that waits for a connect
/// retrying a wrong password for a second times out after `redis.timeout` and can only say
/// "timed out". With one attempt, a call gets the attempt's own error (authentication,
/// refused, DNS, TLS) at once, and the next call after a connection failure starts the next
/// attempt (while the store is marked down that is one call per `retry_interval`).
const RECONNECT_TRIES: usize = 0;

pub(super) fn single_node(url: &str, config: &RedisConfig) -> Result<SingleHandle, Error> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::config("redis.url", format!("is not a usable Redis URL: {e}")))?;
    let cm_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.timeout))
        .set_number_of_retries(RECONNECT_TRIES);
    SingleHandle::new(client, cm_config).map_err(|e| Error::config("redis.url", e.to_string()))
}

pub(super) fn cluster(
    config: &RedisConfig,
    runtime: tokio::runtime::Handle,
) -> Result<ClusterHandle, Error> {
    for (i, url) in config.cluster.iter().enumerate() {
        url.as_str().into_connection_info().map_err(|e| {
            Error::config(
                format!("redis.cluster[{i}]"),
                format!("is not a usable Redis URL: {e}"),
            )
        })?;
    }
    let client = ClusterClient::builder(config.cluster.iter().map(String::as_str))
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.timeout)
        // Redirects (MOVED / ASK) need retries; keep their waits well inside the timeout.
        .retries(3)
        .min_retry_wait(5)
        .max_retry_wait(50)
        .build()
        .map_err(|e| Error::config("redis.cluster", e.to_string()))?;
    Ok(ClusterHandle::new(client, config.connect_timeout, runtime))
}
