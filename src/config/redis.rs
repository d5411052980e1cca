//! `[redis]`: where the shared state lives, and how to behave when it is unreachable.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;

use super::validate::{check_count, check_range, DAY, MS};

/// Where the shared state lives, and how to behave when it is unreachable. Its `Debug`
/// output hides passwords in URLs.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// A single Redis: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    /// Exactly one of `url` and `cluster` is set. Default: none.
    pub url: Option<String>,
    /// Redis Cluster seed nodes (`redis://host:port` each). Default: empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
    /// Longest round trip of one script call (from sending it to its reply) before it counts
    /// as failed and the call goes on per the feature's policy. Time an admission spends
    /// queued behind the admission batch in flight is bounded separately, by the same
    /// amount: an admission not sent within `timeout` fails unsent. So an admission answers
    /// within about 2 x `timeout` (3 x on Cluster, whose admission takes two round trips).
    /// 1 ms to 10 s. Default: `50ms`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest wait to establish a connection. 1 ms to 60 s. Default: `1s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Consecutive store failures (errors or timeouts) before the coordinator stops asking
    /// Redis and runs on local state. At least 1. Default: `1`.
    pub failure_threshold: u32,
    /// While in local mode, how often one call probes Redis to see whether it is back.
    /// 10 ms to 10 min. Default: `1s`.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Fleet size to assume in local mode: each feature's bulkhead limit is divided by this
    /// (rounded up) so the fleet stays near its limit while every replica decides alone.
    /// At least 1. Default: `1`.
    pub replicas: u32,
    /// Idle keys expire after this long (breaker state that nobody touches, empty
    /// bulkheads). 1 min to 30 days. Default: `24h`.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// Outcomes and releases waiting to be sent in the background, at most. When full, the
    /// caller sends its own directly. 16 to 1,048,576. Default: `65536`.
    pub settle_queue: usize,
    /// Most outcomes/releases sent in one script call. 1 to 4096. Default: `256`.
    pub settle_batch: usize,
    /// How long a queued outcome/release waits for this replica's next admission on its
    /// target or feature to take it along (in the same script call, ahead of the decision)
    /// before the background flusher sends it (at once when 16 or more are queued). This
    /// replica always sees its own settles at its next admission; other replicas see them at
    /// most this much later. Outcomes that can change an admission decision (a failure, a
    /// slow call, a probe's outcome) and releases of a feature that has callers waiting on
    /// this replica are sent at once, and `flush` does not wait for it. 0 (send at once) to 100 ms.
    /// Default: `2ms`.
    #[serde(with = "humantime_serde")]
    pub settle_delay: Duration,
    /// Bound on operator reads and commands (`Coordinator::snapshot`, `in_flight`, `force`,
    /// the CLI's `status` and `force`), which use their own connection so that a slow link
    /// fails the hot path's `timeout` without hiding the fleet's state from an operator.
    /// 1 ms to 10 s. Default: `connect_timeout`.
    #[serde(with = "humantime_serde::option")]
    pub operator_timeout: Option<Duration>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster: Vec::new(),
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            failure_threshold: 1,
            retry_interval: Duration::from_secs(1),
            replicas: 1,
            idle_ttl: Duration::from_secs(24 * 3600),
            settle_queue: 65536,
            settle_batch: 256,
            settle_delay: Duration::from_millis(2),
            operator_timeout: None,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("failure_threshold", &self.failure_threshold)
            .field("retry_interval", &self.retry_interval)
            .field("replicas", &self.replicas)
            .field("idle_ttl", &self.idle_ttl)
            .field("settle_queue", &self.settle_queue)
            .field("settle_batch", &self.settle_batch)
            .field("settle_delay", &self.settle_delay)
            .field("operator_timeout", &self.operator_timeout)
            .finish()
    }
}

/// A Redis URL with the password (if any) replaced by `***`, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    let hidden = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        "***".to_owned()
    };
    format!("{}{hidden}{}", &url[..scheme_end + 3], &rest[at..])
}

impl RedisConfig {
    /// The bound on operator reads and commands: `operator_timeout`, else `connect_timeout`
    /// (capped at 10 s).
    pub fn resolved_operator_timeout(&self) -> Duration {
        self.operator_timeout
            .unwrap_or(self.connect_timeout)
            .min(Duration::from_secs(10))
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        match (&self.url, self.cluster.is_empty()) {
            (Some(_), false) => {
                return Err(Error::config(
                    "redis.cluster",
                    "set either redis.url or redis.cluster, not both",
                ))
            }
            (None, true) => {
                return Err(Error::config(
                    "redis.url",
                    "a [redis] table needs url (single node) or cluster (seed nodes)",
                ))
            }
            _ => {}
        }
        if let Some(url) = &self.url {
            check_url("redis.url", url)?;
        }
        for (i, url) in self.cluster.iter().enumerate() {
            check_url(&format!("redis.cluster[{i}]"), url)?;
        }
        check_range("redis.timeout", self.timeout, MS, Duration::from_secs(10))?;
        check_range(
            "redis.connect_timeout",
            self.connect_timeout,
            MS,
            Duration::from_secs(60),
        )?;
        check_count(
            "redis.failure_threshold",
            self.failure_threshold.into(),
            1,
            1000,
        )?;
        check_range(
            "redis.retry_interval",
            self.retry_interval,
            10 * MS,
            Duration::from_secs(600),
        )?;
        check_count("redis.replicas", self.replicas.into(), 1, 100_000)?;
        check_range(
            "redis.idle_ttl",
            self.idle_ttl,
            Duration::from_secs(60),
            30 * DAY,
        )?;
        check_count("redis.settle_queue", self.settle_queue as u64, 16, 1 << 20)?;
        check_count("redis.settle_batch", self.settle_batch as u64, 1, 4096)?;
        check_range(
            "redis.settle_delay",
            self.settle_delay,
            Duration::ZERO,
            Duration::from_millis(100),
        )?;
        if let Some(t) = self.operator_timeout {
            check_range("redis.operator_timeout", t, MS, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

fn check_url(field: &str, url: &str) -> Result<(), Error> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(Error::config(
            field,
            "must start with redis:// or rediss://",
        ));
    }
    if url.starts_with("rediss://") && !cfg!(feature = "tls") {
        return Err(Error::config(
            field,
            "rediss:// needs fusebox built with the `tls` feature",
        ));
    }
    redis::parse_redis_url(url).ok_or_else(|| Error::config(field, "is not a valid Redis URL"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://app:s3cret@10.0.0.1:6379/0"),
            "redis://app:***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://:s3cret@h:1"), "rediss://:***@h:1");
        assert_eq!(redact_url("redis://s3cret@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://h:1/2"), "redis://h:1/2");
        let c = RedisConfig {
            url: Some("redis://u:topsecret@h:1".into()),
            cluster: vec!["redis://:topsecret@h:2".into()],
            ..RedisConfig::default()
        };
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
