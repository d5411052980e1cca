//! `[cache]`: the degraded-response cache (answers served when every model is down), and
//! `[features."<name>".cache]`, which changes single fields of it for one feature (a field
//! left out inherits `[cache]`'s, as `[targets."<name>".breaker]` inherits `[breaker]`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::{check_count, check_range, DAY, MS};
use crate::Error;

/// Largest value (one cached response body) the configuration may allow: 16 MiB.
pub(crate) const MAX_VALUE_BYTES_LIMIT: u64 = 16 * 1024 * 1024;

/// Whose answers a cached entry may be served to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TenantSource {
    /// A salted SHA-256 hash of the caller's API key (the key itself is never stored,
    /// logged or put in a Redis key). A call without an API key is not cached. Default.
    #[default]
    ApiKey,
    /// The tenant id the caller passes (from its own authentication). A call without one is
    /// not cached.
    TenantId,
    /// Every caller of the feature shares one cache (a single-tenant deployment).
    Shared,
}

/// Settings of the degraded-response cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Whether successful answers are stored and served when every model fails.
    /// Default: `false`.
    pub enabled: bool,
    /// How long an answer may be served after it was stored. 1 s to 30 days. Default: `1h`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most entries kept per feature (all tenants together); storing one more evicts the
    /// entry closest to expiry (the oldest, with one TTL). 1 to 10,000,000. Default: `1000`.
    pub max_entries: u32,
    /// Largest answer stored, in bytes of its JSON body; a bigger one is not stored.
    /// 1 to 16,777,216. Default: `262144` (256 KiB).
    pub max_value_bytes: u64,
    /// Whether a lookup may match a request whose last user message differs only in case,
    /// whitespace and punctuation at word edges (see `fusebox::cache`). Default: `true`.
    pub similar: bool,
    /// Whose answers an entry may be served to. Default: `api_key`.
    pub tenant: TenantSource,
    /// Longest cache read or write against Redis (through its own connection pool, off the
    /// admission connection), pool wait included; past it the read is a miss and the write
    /// is dropped. 1 ms to 10 s. Default: `250ms`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            ttl: Duration::from_secs(3600),
            max_entries: 1000,
            max_value_bytes: 256 * 1024,
            similar: true,
            tenant: TenantSource::ApiKey,
            timeout: Duration::from_millis(250),
        }
    }
}

impl CacheConfig {
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        check_range(
            &format!("{at}.ttl"),
            self.ttl,
            Duration::from_secs(1),
            30 * DAY,
        )?;
        check_count(
            &format!("{at}.max_entries"),
            self.max_entries.into(),
            1,
            10_000_000,
        )?;
        check_count(
            &format!("{at}.max_value_bytes"),
            self.max_value_bytes,
            1,
            MAX_VALUE_BYTES_LIMIT,
        )?;
        check_range(
            &format!("{at}.timeout"),
            self.timeout,
            MS,
            Duration::from_secs(10),
        )?;
        Ok(())
    }
}

/// Cache fields a feature sets; `None` inherits `[cache]`'s. See [`CacheConfig`] for what
/// each means and its range.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct CacheOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(
        with = "super::switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_value_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similar: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantSource>,
    #[serde(
        with = "super::switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

impl CacheOverrides {
    /// Every field set from `c`.
    pub fn all(c: &CacheConfig) -> Self {
        CacheOverrides {
            enabled: Some(c.enabled),
            ttl: Some(c.ttl),
            max_entries: Some(c.max_entries),
            max_value_bytes: Some(c.max_value_bytes),
            similar: Some(c.similar),
            tenant: Some(c.tenant),
            timeout: Some(c.timeout),
        }
    }

    /// `base` with the fields set here over it.
    pub fn apply(&self, base: &CacheConfig) -> CacheConfig {
        CacheConfig {
            enabled: self.enabled.unwrap_or(base.enabled),
            ttl: self.ttl.unwrap_or(base.ttl),
            max_entries: self.max_entries.unwrap_or(base.max_entries),
            max_value_bytes: self.max_value_bytes.unwrap_or(base.max_value_bytes),
            similar: self.similar.unwrap_or(base.similar),
            tenant: self.tenant.unwrap_or(base.tenant),
            timeout: self.timeout.unwrap_or(base.timeout),
        }
    }
}
