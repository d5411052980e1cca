//! Configuration: plain serde structs (TOML-friendly), defaults on every field, validated
//! when the coordinator is built. Durations are written as `"60s"`, `"50ms"`, `"5m"`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The whole fusebox configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Prefix that separates applications sharing one Redis: every key is
    /// `fusebox:{<namespace>:...}`. Letters, digits and `._-/@` only (no `:`, which ends the
    /// namespace inside a key). Default: `"default"`.
    pub namespace: String,
    /// The shared store. `None` (no `[redis]` table): the embedded in-process store, for a
    /// single replica. Default: `None`.
    pub redis: Option<RedisConfig>,
    /// Breaker settings for every target not listed in `targets`. Default: see
    /// [`BreakerConfig`].
    pub breaker: BreakerConfig,
    /// Per-target breaker settings (a target is a model or endpoint), replacing `breaker`
    /// for that target. Default: empty.
    pub targets: BTreeMap<String, BreakerConfig>,
    /// Features (call sites such as `chat` or `batch-summaries`) with their bulkhead, rate
    /// limit and store-down policy. A call must name a configured feature. Default: empty.
    pub features: BTreeMap<String, FeatureConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "default".to_owned(),
            redis: None,
            breaker: BreakerConfig::default(),
            targets: BTreeMap::new(),
            features: BTreeMap::new(),
        }
    }
}

/// Where the shared state lives, and how to behave when it is unreachable. Its `Debug`
/// output hides passwords in URLs.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// A single Redis: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    /// Exactly one of `url` and `cluster` is set. Default: none.
    pub url: Option<String>,
    /// Redis Cluster seed nodes (`redis://host:port` each). Default: empty.
    pub cluster: Vec<String>,
    /// Longest wait for one store operation before it counts as failed and the call goes on
    /// per the feature's policy. 1 ms to 10 s. Default: `50ms`.
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
    /// How long the background flusher waits for more outcomes/releases before it sends a
    /// small batch (fewer than 16), so that a lone caller's settles are batched too (fewer
    /// script calls: measured, a third less Redis CPU per guarded call for a lone caller). A
    /// release reaches the fleet at most this much later; releases of a feature that has
    /// callers waiting on this replica are sent at once, and `flush`/`shutdown` do not wait
    /// for it. 0 (send at once) to 100 ms. Default: `2ms`.
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

/// Breaker settings for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open after this many consecutive failures; omit to switch the rule off. At least 1.
    /// Default: `5`.
    pub consecutive_failures: Option<u32>,
    /// Open when failures are at least this percentage of the calls in the window (with at
    /// least `minimum_calls`); omit to switch off. Over 0, at most 100. Default: `50.0`.
    pub failure_rate: Option<f64>,
    /// Calls needed in the window before rates are judged. At least 1. Default: `20`.
    pub minimum_calls: u32,
    /// Length of the sliding window. 1 s to 1 h. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Buckets the window is kept in (its resolution). 1 to 60, and the window must be at
    /// least 1 ms per bucket. Default: `10`.
    pub window_buckets: u32,
    /// A call taking at least this long counts as slow; omit to not track slow calls.
    /// 1 ms to 1 h. Default: none.
    #[serde(with = "humantime_serde::option")]
    pub slow_call_duration: Option<Duration>,
    /// Open when slow calls are at least this percentage of the window's calls (with
    /// `slow_call_duration` set). Over 0, at most 100. Default: `100.0`.
    pub slow_call_rate: f64,
    /// How long the breaker stays open before probing. 1 ms to 24 h. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
    /// Each consecutive re-open (a failed probe) multiplies the open duration by this.
    /// 1.0 (no growth), or 1.01 to 100. Default: `1.0`.
    pub open_duration_multiplier: f64,
    /// Cap on the grown open duration; at least `open_duration`, at most 24 h.
    /// Default: `300s`.
    #[serde(with = "humantime_serde")]
    pub max_open_duration: Duration,
    /// Probe calls admitted at once, fleet-wide, while half-open. 1 to 1000. Default: `1`.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker. 1 to 1000. Default: `1`.
    pub half_open_successes: u32,
    /// A probe that has not reported back after this long frees its slot for another.
    /// 1 ms to 1 h. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: Some(5),
            failure_rate: Some(50.0),
            minimum_calls: 20,
            window: Duration::from_secs(60),
            window_buckets: 10,
            slow_call_duration: None,
            slow_call_rate: 100.0,
            open_duration: Duration::from_secs(60),
            open_duration_multiplier: 1.0,
            max_open_duration: Duration::from_secs(300),
            half_open_probes: 1,
            half_open_successes: 1,
            probe_timeout: Duration::from_secs(30),
        }
    }
}

/// What a feature does when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StorePolicy {
    /// Keep admitting on this replica's local state (bulkhead limit divided by
    /// `redis.replicas`). Default.
    #[default]
    FailOpen,
    /// Refuse calls with [`crate::Rejection::StoreUnavailable`].
    FailClosed,
}

/// Rate limit: `requests` per `per`, with bursts of up to `burst` at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Requests per interval. At least 1.
    pub requests: u32,
    /// The interval. 1 ms to 24 h, and at least 1 µs per request.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Requests allowed at once from rest. At least 1. Default: `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// One feature's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureConfig {
    /// Most calls in flight at once across the fleet; omit for no bulkhead. 1 to 1,000,000.
    /// Default: none.
    pub max_concurrent: Option<u32>,
    /// Lease of a bulkhead permit: a holder that crashes frees it after this long; long
    /// calls extend it with a heartbeat. 100 ms to 24 h. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long admission may wait for a bulkhead permit or a rate-limit slot before
    /// refusing. 0 (refuse at once) to 10 min. Default: `0s`.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Rate limit; omit for none. Default: none.
    pub rate: Option<RateConfig>,
    /// Behaviour when the shared store is unreachable. Default: `fail_open`.
    pub on_store_unavailable: StorePolicy,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            max_concurrent: None,
            lease: Duration::from_secs(30),
            max_wait: Duration::ZERO,
            rate: None,
            on_store_unavailable: StorePolicy::FailOpen,
        }
    }
}

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn check_range(field: &str, v: Duration, lo: Duration, hi: Duration) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::config(
            field,
            format!("{v:?} is out of range ({lo:?} to {hi:?})"),
        ));
    }
    Ok(())
}

fn check_count(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::config(
            field,
            format!("{v} is out of range ({lo} to {hi})"),
        ));
    }
    Ok(())
}

fn check_pct(field: &str, v: f64) -> Result<(), Error> {
    if !(v > 0.0 && v <= 100.0) {
        return Err(Error::config(
            field,
            format!("{v} must be a percentage over 0 and at most 100"),
        ));
    }
    Ok(())
}

/// Checks a namespace, target or feature name: non-empty, at most 200 bytes, letters, digits
/// and `._-:/@` only (no braces, so names cannot break a Redis Cluster hash tag).
pub fn check_name(field: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 200 {
        return Err(Error::config(field, "must be 1 to 200 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-:/@".contains(*c)))
    {
        return Err(Error::config(
            field,
            format!("{name:?} contains {c:?}; use letters, digits and ._-:/@"),
        ));
    }
    Ok(())
}

impl Config {
    /// A copy with passwords in Redis URLs replaced by `***` (for printing).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if let Some(r) = c.redis.as_mut() {
            r.url = r.url.as_deref().map(redact_url);
            r.cluster = r.cluster.iter().map(|u| redact_url(u)).collect();
        }
        c
    }

    /// The configuration as it takes effect: every default filled in.
    pub fn resolved(&self) -> Config {
        let mut c = self.clone();
        if let Some(r) = c.redis.as_mut() {
            r.operator_timeout = Some(r.resolved_operator_timeout());
        }
        c
    }

    /// Parses TOML and validates it. Unknown fields and wrong types are errors naming the
    /// field by its dotted path (`features.chat.max_concurrent`).
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| Error::config("(file)", e.message().to_owned()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_owned();
            let field = if path == "." {
                "(file)".to_owned()
            } else {
                path
            };
            if message.is_empty() {
                message = inner.to_string();
            }
            Error::config(field, message)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        check_name("namespace", &self.namespace)?;
        if self.namespace.contains(':') {
            // `fusebox:{<ns>:t:<target>}`: the first `:` after `{` ends the namespace, so
            // namespace `a:t` + target `m` cannot share keys with namespace `a` + target `t:m`.
            return Err(Error::config(
                "namespace",
                format!(
                    "{:?} contains ':'; use letters, digits and ._-/@",
                    self.namespace
                ),
            ));
        }
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        self.breaker.validate("breaker")?;
        for (name, b) in &self.targets {
            check_name(&format!("targets.{name}"), name)?;
            b.validate(&format!("targets.{name}"))?;
        }
        for (name, f) in &self.features {
            check_name(&format!("features.{name}"), name)?;
            f.validate(&format!("features.{name}"))?;
        }
        Ok(())
    }
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

impl BreakerConfig {
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        if let Some(n) = self.consecutive_failures {
            check_count(
                &format!("{at}.consecutive_failures"),
                n.into(),
                1,
                1_000_000,
            )?;
        }
        if let Some(r) = self.failure_rate {
            check_pct(&format!("{at}.failure_rate"), r)?;
        }
        check_count(
            &format!("{at}.minimum_calls"),
            self.minimum_calls.into(),
            1,
            1_000_000,
        )?;
        check_range(
            &format!("{at}.window"),
            self.window,
            Duration::from_secs(1),
            HOUR,
        )?;
        check_count(
            &format!("{at}.window_buckets"),
            self.window_buckets.into(),
            1,
            60,
        )?;
        if let Some(d) = self.slow_call_duration {
            check_range(&format!("{at}.slow_call_duration"), d, MS, HOUR)?;
            check_pct(&format!("{at}.slow_call_rate"), self.slow_call_rate)?;
        }
        check_range(&format!("{at}.open_duration"), self.open_duration, MS, DAY)?;
        let m = self.open_duration_multiplier;
        // 1.0 (no growth), or at least 1.01 so that the grown duration reaches its cap in a
        // bounded number of steps (the store computes it step by step, inside Redis too).
        if !(m == 1.0 || (1.01..=100.0).contains(&m)) {
            return Err(Error::config(
                format!("{at}.open_duration_multiplier"),
                format!("{m} is out of range (1.0, or 1.01 to 100)"),
            ));
        }
        check_range(
            &format!("{at}.max_open_duration"),
            self.max_open_duration,
            self.open_duration,
            DAY,
        )?;
        check_count(
            &format!("{at}.half_open_probes"),
            self.half_open_probes.into(),
            1,
            1000,
        )?;
        check_count(
            &format!("{at}.half_open_successes"),
            self.half_open_successes.into(),
            1,
            1000,
        )?;
        check_range(&format!("{at}.probe_timeout"), self.probe_timeout, MS, HOUR)?;
        if self.consecutive_failures.is_none()
            && self.failure_rate.is_none()
            && self.slow_call_duration.is_none()
        {
            return Err(Error::config(
                at,
                "no rule can open this breaker: set consecutive_failures, failure_rate or \
                 slow_call_duration (or disable it at run time)",
            ));
        }
        Ok(())
    }
}

impl FeatureConfig {
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        if let Some(n) = self.max_concurrent {
            check_count(&format!("{at}.max_concurrent"), n.into(), 1, 1_000_000)?;
        }
        check_range(&format!("{at}.lease"), self.lease, 100 * MS, DAY)?;
        check_range(
            &format!("{at}.max_wait"),
            self.max_wait,
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
        if let Some(r) = &self.rate {
            check_count(
                &format!("{at}.rate.requests"),
                r.requests.into(),
                1,
                1_000_000_000,
            )?;
            check_range(&format!("{at}.rate.per"), r.per, MS, DAY)?;
            if r.per.as_micros() < u128::from(r.requests) {
                return Err(Error::config(
                    format!("{at}.rate"),
                    "more than one request per microsecond",
                ));
            }
            if let Some(b) = r.burst {
                check_count(&format!("{at}.rate.burst"), b.into(), 1, 1_000_000_000)?;
            }
        }
        Ok(())
    }
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
