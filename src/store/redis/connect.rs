//! Building the connection from [`RedisConfig`]: a lazy `ConnectionManager` for a single
//! node, a [`ClusterHandle`] for Redis Cluster. Neither connects here.

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClient;
use redis::IntoConnectionInfo;

use super::conn::ClusterHandle;
use crate::config::RedisConfig;
use crate::Error;

/// Reconnect backoff of the single-node connection: delays grow from this...
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// ...up to this...
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
/// ...for this many tries; then the next command starts a new round.
const RECONNECT_TRIES: usize = 3;

pub(super) fn single_node(
    url: &str,
    config: &RedisConfig,
) -> Result<redis::aio::ConnectionManager, Error> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::config("redis.url", format!("is not a usable Redis URL: {e}")))?;
    let cm_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.timeout))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_number_of_retries(RECONNECT_TRIES);
    client
        .get_connection_manager_lazy(cm_config)
        .map_err(|e| Error::config("redis.url", e.to_string()))
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
