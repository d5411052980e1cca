//! `[targets."<name>"]`: one target (a model or endpoint). Today it holds breaker settings,
//! in a `breaker` table of its own (`[targets."claude-sonnet-4-6".breaker]`), so that the
//! target can grow (model, upstream, timeout, max_tokens) without moving them.
//!
//! Breaker fields inherit from `[breaker]` one by one: a field set here replaces
//! `[breaker]`'s, a field left out keeps it, and `false` switches a rule off for this target
//! only.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::breaker::BreakerConfig;
use super::switch;

/// One target's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetConfig {
    /// Breaker settings that differ from `[breaker]`. Default: none (all inherited).
    pub breaker: BreakerOverrides,
    /// The upstream model this target calls (chained calls hand it to the call). Default:
    /// the target's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `max_tokens` for this target's calls. Default: none (the call decides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// One attempt's timeout in a chained call. 1 ms to 1 h. Default: `15s`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// The model's context window in tokens: a request too large for one target goes to a
    /// later target of the chain with a larger one. Default: unknown (never chosen for a
    /// request that was too large elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u32>,
}

impl From<BreakerConfig> for TargetConfig {
    /// A target whose every breaker field is set (nothing inherited).
    fn from(b: BreakerConfig) -> Self {
        TargetConfig {
            breaker: BreakerOverrides::all(&b),
            ..TargetConfig::default()
        }
    }
}

impl TargetConfig {
    /// This target's breaker: `[breaker]` with this target's fields over it.
    pub fn breaker(&self, base: &BreakerConfig) -> BreakerConfig {
        self.breaker.apply(base)
    }
}

/// Breaker fields a target sets; `None` inherits `[breaker]`'s. See [`BreakerConfig`] for
/// what each means and its range.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct BreakerOverrides {
    /// `Some(None)`: switched off for this target (`false` in TOML).
    #[serde(
        with = "switch::inherit_count_or_off",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_failures: Option<Option<u32>>,
    /// `Some(None)`: switched off for this target (`false` in TOML).
    #[serde(
        with = "switch::inherit_percent_or_off",
        skip_serializing_if = "Option::is_none"
    )]
    pub failure_rate: Option<Option<f64>>,
    #[serde(
        deserialize_with = "switch::inherit_count::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub minimum_calls: Option<u32>,
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
    #[serde(
        deserialize_with = "switch::inherit_count::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub window_buckets: Option<u32>,
    /// `Some(None)`: slow calls not tracked for this target (`false` in TOML).
    #[serde(
        with = "switch::inherit_duration_or_off",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_call_duration: Option<Option<Duration>>,
    #[serde(
        deserialize_with = "switch::inherit_percent::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_call_rate: Option<f64>,
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub open_duration: Option<Duration>,
    #[serde(
        deserialize_with = "switch::inherit_percent::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub open_duration_multiplier: Option<f64>,
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_open_duration: Option<Duration>,
    #[serde(
        deserialize_with = "switch::inherit_count::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub half_open_probes: Option<u32>,
    #[serde(
        deserialize_with = "switch::inherit_count::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub half_open_successes: Option<u32>,
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub probe_timeout: Option<Duration>,
}

/// `BreakerOverrides::all` and `apply` from one list of the fields (both build every field
/// of their struct, so a field added to one struct and not listed here does not compile).
macro_rules! overrides {
    ($($field:ident),* $(,)?) => {
        impl BreakerOverrides {
            /// Every field set from `b`.
            pub fn all(b: &BreakerConfig) -> Self {
                BreakerOverrides {
                    $($field: Some(b.$field),)*
                }
            }

            /// `base` with the fields set here over it.
            pub fn apply(&self, base: &BreakerConfig) -> BreakerConfig {
                BreakerConfig {
                    $($field: self.$field.unwrap_or(base.$field),)*
                }
            }
        }
    };
}

overrides!(
    consecutive_failures,
    failure_rate,
    minimum_calls,
    window,
    window_buckets,
    slow_call_duration,
    slow_call_rate,
    open_duration,
    open_duration_multiplier,
    max_open_duration,
    half_open_probes,
    half_open_successes,
    probe_timeout,
);
