//! Configuration: plain serde structs (TOML-friendly), defaults on every field, validated
//! when the coordinator is built. Durations are written as `"60s"`, `"50ms"`, `"5m"`; a rule
//! is switched off with `false`. One file per section: [`redis`](RedisConfig),
//! [`breaker`](BreakerConfig), [`targets`](TargetConfig), [`features`](FeatureConfig); the
//! checks they share are in `validate`, the switch-off syntax in `switch`.

mod breaker;
mod cache;
mod chain;
mod feature;
mod redis;
mod retry;
mod server;
mod switch;
mod target;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use self::breaker::BreakerConfig;
pub use self::cache::{CacheConfig, CacheOverrides, TenantSource};
pub use self::chain::{
    CannedConfig, FallbackAlertConfig, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_DEADLINE,
};
pub use self::feature::{FeatureConfig, RateConfig, StorePolicy};
pub use self::redis::{redact_url, RedisConfig};
pub use self::retry::{BudgetConfig, RetryConfig, RetryOverrides};
pub use self::server::{
    ServerConfig, DEFAULT_FEATURE_HEADER, DEFAULT_LISTEN, DEFAULT_MAX_BODY_BYTES, DEFAULT_UPSTREAM,
};
pub use self::target::{BreakerOverrides, TargetConfig};
pub use self::validate::check_name;
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
    /// Breaker settings of every target; a target's own `breaker` table changes single
    /// fields of it. Default: see [`BreakerConfig`].
    pub breaker: BreakerConfig,
    /// Targets (models or endpoints) with settings of their own: `[targets."<name>".breaker]`
    /// sets breaker fields that differ from `[breaker]`, field by field. Default: empty.
    pub targets: BTreeMap<String, TargetConfig>,
    /// Features (call sites such as `chat` or `batch-summaries`) with their bulkhead, rate
    /// limit and store-down policy. A call must name a configured feature. Default: empty.
    pub features: BTreeMap<String, FeatureConfig>,
    /// The degraded-response cache of every feature; a feature's own `cache` table
    /// (`[features."<name>".cache]`) changes single fields of it. Default: see
    /// [`CacheConfig`] (off).
    pub cache: CacheConfig,
    /// Backoff and the fleet-wide retry budget; `[features."<name>".retry]` changes single
    /// fields per feature. Default: see [`RetryConfig`].
    pub retry: RetryConfig,
    /// The fleet health signal. Default: see [`FallbackAlertConfig`].
    pub fallback_alert: FallbackAlertConfig,
    /// The proxy (`fusebox serve`). Default: see [`ServerConfig`].
    pub server: ServerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "default".to_owned(),
            redis: None,
            breaker: BreakerConfig::default(),
            targets: BTreeMap::new(),
            features: BTreeMap::new(),
            cache: CacheConfig::default(),
            retry: RetryConfig::default(),
            fallback_alert: FallbackAlertConfig::default(),
            server: ServerConfig::default(),
        }
    }
}

impl Config {
    /// A copy with passwords in Redis URLs and the admin token replaced by `***` (for
    /// printing).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.server = c.server.redacted();
        if let Some(r) = c.redis.as_mut() {
            r.url = r.url.as_deref().map(redact_url);
            r.cluster = r.cluster.iter().map(|u| redact_url(u)).collect();
        }
        c
    }

    /// The configuration as it takes effect: every default filled in, every target's
    /// breaker spelled out field by field (inherited fields included), each listed target's
    /// model and attempt timeout, and each chained feature's deadline. (`server.threads`
    /// stays unset when it is: its default, one per core, depends on the machine.)
    pub fn resolved(&self) -> Config {
        let mut c = self.clone();
        if let Some(r) = c.redis.as_mut() {
            r.operator_timeout = Some(r.resolved_operator_timeout());
        }
        for (name, t) in &mut c.targets {
            t.breaker = BreakerOverrides::all(&t.breaker(&self.breaker));
            t.model.get_or_insert_with(|| name.clone());
            t.timeout.get_or_insert(DEFAULT_ATTEMPT_TIMEOUT);
        }
        for f in c.features.values_mut() {
            if !f.chain.is_empty() {
                f.deadline.get_or_insert(DEFAULT_DEADLINE);
            }
        }
        c
    }

    /// The breaker settings `target` runs with: its own fields over `[breaker]`.
    pub fn breaker_for(&self, target: &str) -> BreakerConfig {
        match self.targets.get(target) {
            Some(t) => t.breaker(&self.breaker),
            None => self.breaker.clone(),
        }
    }

    /// Parses TOML and validates it. Syntax errors give line and column; unknown fields and
    /// wrong types name the field by its dotted path (`features.chat.max_concurrent`).
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let place = at(text, e.span()).map_or(String::new(), |p| format!("{p}: "));
            Error::config("", format!("{place}TOML syntax: {}", e.message()))
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_owned();
            if message.is_empty() {
                message = inner.to_string();
            }
            // "." is the document itself: no field to name.
            let field = if path == "." { String::new() } else { path };
            let mut reason = plain_words(&message);
            if let Some(place) = at(text, inner.span()) {
                reason = format!("{place}: {reason}");
            }
            Error::config(field, reason)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        validate::check_namespace("namespace", &self.namespace)?;
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        self.breaker.validate("breaker")?;
        self.cache.validate("cache")?;
        for (name, t) in &self.targets {
            check_name(&format!("targets.{name}"), name)?;
            t.breaker(&self.breaker)
                .validate(&format!("targets.{name}.breaker"))?;
            chain::validate_target(&format!("targets.{name}"), t)?;
        }
        for (name, f) in &self.features {
            check_name(&format!("features.{name}"), name)?;
            f.validate(&format!("features.{name}"))?;
            chain::validate_feature(&format!("features.{name}"), f)?;
            f.cache(&self.cache)
                .validate(&format!("features.{name}.cache"))?;
        }
        retry::validate(self)?;
        self.fallback_alert.validate("fallback_alert")?;
        self.server
            .validate(&|f: &str| self.features.contains_key(f))?;
        // What the proxy serves without being told the feature must be servable: a feature
        // without a chain answers every proxied request with a 500 (it serves library calls
        // only). Seen by the new-user review: `check` said valid, `serve` started, and
        // every request failed.
        let served = self
            .server
            .default_feature
            .iter()
            .map(|f| ("server.default_feature".to_owned(), f))
            .chain(
                self.server
                    .routes
                    .iter()
                    .map(|(key, f)| (format!("server.routes.{key:?}"), f)),
            );
        for (field, f) in served {
            if self.features.get(f).is_some_and(|x| x.chain.is_empty()) {
                return Err(Error::config(
                    field,
                    format!(
                        "feature {f:?} has no chain: the proxy cannot serve it (give it one: \
                         [features.{f:?}] chain = [\"<model>\", ...])"
                    ),
                ));
            }
        }
        if let Some(r) = &self.redis {
            self.check_idle_ttl(r.idle_ttl)?;
        }
        Ok(())
    }

    /// Applies the environment overrides and validates again: `FUSEBOX_LISTEN`
    /// (`server.listen`), `FUSEBOX_UPSTREAM` (`server.upstream`), `FUSEBOX_ADMIN_TOKEN`
    /// (`server.admin_token`), `FUSEBOX_REDIS_URL` (`redis.url`: a single node, replacing
    /// `redis.cluster`; adds a `[redis]` table with its defaults when there is none). An empty
    /// variable counts as unset.
    pub fn apply_env(&mut self) -> Result<(), Error> {
        self.apply_env_from(|name| std::env::var(name).ok())
    }

    /// [`Self::apply_env`] with the variables read from `var` (for tests).
    pub fn apply_env_from(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), Error> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        if let Some(v) = var("FUSEBOX_LISTEN") {
            self.server.listen = v;
        }
        if let Some(v) = var("FUSEBOX_UPSTREAM") {
            self.server.upstream = v;
        }
        if let Some(v) = var("FUSEBOX_ADMIN_TOKEN") {
            self.server.admin_token = Some(v);
        }
        if let Some(v) = var("FUSEBOX_REDIS_URL") {
            let redis = self.redis.get_or_insert_with(RedisConfig::default);
            redis.url = Some(v);
            redis.cluster.clear();
        }
        self.validate()
    }

    /// A breaker's hash must outlive an open period plus a probe that runs its whole
    /// timeout: otherwise it expires while open or half-open, and the breaker silently
    /// starts over closed (issue 5 §2.6).
    fn check_idle_ttl(&self, idle_ttl: std::time::Duration) -> Result<(), Error> {
        let breakers = std::iter::once(("breaker".to_owned(), self.breaker.clone())).chain(
            self.targets
                .keys()
                .map(|t| (format!("targets.{t}.breaker"), self.breaker_for(t))),
        );
        for (at, b) in breakers {
            // Without growth the open period is `open_duration`; with it, up to the cap.
            let longest_open = if b.open_duration_multiplier == 1.0 {
                b.open_duration
            } else {
                b.max_open_duration.max(b.open_duration)
            };
            let needed = longest_open + b.probe_timeout;
            if idle_ttl <= needed {
                return Err(Error::config(
                    "redis.idle_ttl",
                    format!(
                        "{} must be longer than {at}'s longest open period + probe_timeout \
                         ({}), or its state would expire while open or half-open",
                        validate::shown(idle_ttl),
                        validate::shown(needed),
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `line L, column C` of a byte span in `text`.
fn at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let start = span?.start.min(text.len());
    let before = text.get(..start)?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some(format!("line {line}, column {column}"))
}

/// serde's messages without Rust type names, and with the accepted form of durations.
fn plain_words(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, plain) in [
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
    ] {
        m = m.replace(rust, plain);
    }
    if m.starts_with("invalid value: integer") && m.ends_with("expected a whole number") {
        m.push_str(" from 0 to 4294967295");
    }
    let lower = m.to_ascii_lowercase();
    if (lower.contains("expected a duration")
        || lower.contains("time unit")
        || lower.contains("expected number"))
        && !m.contains(switch::DURATION_FORM)
    {
        m = format!("{m}; {}", switch::DURATION_FORM);
    }
    if m.starts_with("unknown field")
        && m.contains("expected one of `breaker`")
        && m.contains("`context_window`")
    {
        m.push_str(
            "; a target's breaker settings go in its own table: [targets.\"<name>\".breaker]",
        );
    }
    m
}
