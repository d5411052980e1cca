//! Rules that can be switched off from TOML. Such a field takes its value, or `false` (also
//! `"off"`) to switch the rule off; leaving it out keeps the default (or, in a target's
//! `breaker` table, inherits `[breaker]`'s). Written back as TOML, a switched-off rule is
//! `false`, so the output of `fusebox check` parses to the same configuration.
//!
//! Values go through [`toml::Value`] first, so every error says what the field accepts,
//! without Rust type names.

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::feature::RateConfig;

/// A value read from TOML, turned into a field's type, or a message for the user.
type Conv<T> = fn(toml::Value) -> Result<T, String>;

/// `false` / `"off"` -> `None`; anything else converted by `conv`.
fn switch<'de, D: Deserializer<'de>, T>(d: D, conv: Conv<T>) -> Result<Option<T>, D::Error> {
    let v = toml::Value::deserialize(d)?;
    match &v {
        toml::Value::Boolean(false) => Ok(None),
        toml::Value::String(s) if s == "off" => Ok(None),
        toml::Value::Boolean(true) => Err(D::Error::custom(
            "true is not a setting: give a value, or false to switch the rule off",
        )),
        _ => conv(v)
            .map(Some)
            .map_err(|m| D::Error::custom(format!("{m} (or false to switch the rule off)"))),
    }
}

pub(crate) fn count(v: toml::Value) -> Result<u32, String> {
    match v {
        toml::Value::Integer(n) => u32::try_from(n)
            .map_err(|_| format!("{n} is out of range (a whole number, 0 to 4294967295)")),
        other => Err(format!("{} is not a whole number", shown(&other))),
    }
}

pub(crate) fn percent(v: toml::Value) -> Result<f64, String> {
    match v {
        toml::Value::Integer(n) => Ok(n as f64),
        toml::Value::Float(x) => Ok(x),
        other => Err(format!("{} is not a number", shown(&other))),
    }
}

pub(crate) fn duration(v: toml::Value) -> Result<Duration, String> {
    match &v {
        toml::Value::String(s) => humantime_serde::re::humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); {DURATION_FORM}")),
        other => Err(format!(
            "{} is not a duration; {DURATION_FORM}",
            shown(other)
        )),
    }
}

fn rate(v: toml::Value) -> Result<RateConfig, String> {
    RateConfig::deserialize(v).map_err(|e| e.message().to_owned())
}

/// How a duration is written, for error messages.
pub(crate) const DURATION_FORM: &str =
    "write it as a string such as \"250ms\", \"30s\", \"5m\", \"1h\" or \"1d\"";

fn shown(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Table(_) => "a table".to_owned(),
        toml::Value::Array(_) => "a list".to_owned(),
        other => other.to_string(),
    }
}

macro_rules! switchable {
    ($name:ident, $some:ident, $ty:ty, $conv:expr, $ser:expr) => {
        /// A switchable field: `Option<T>` (`None`: switched off).
        pub(crate) mod $name {
            use super::*;

            pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
                d: D,
            ) -> Result<Option<$ty>, D::Error> {
                switch(d, $conv)
            }

            pub(crate) fn serialize<S: Serializer>(
                v: &Option<$ty>,
                s: S,
            ) -> Result<S::Ok, S::Error> {
                match v {
                    None => s.serialize_bool(false),
                    Some(x) => ($ser)(x, s),
                }
            }
        }

        /// An inheriting switchable field: `None` inherits, `Some(None)` switches off.
        #[allow(dead_code)] // not every switchable field is in a target's table
        pub(crate) mod $some {
            use super::*;

            pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
                d: D,
            ) -> Result<Option<Option<$ty>>, D::Error> {
                switch(d, $conv).map(Some)
            }

            pub(crate) fn serialize<S: Serializer>(
                v: &Option<Option<$ty>>,
                s: S,
            ) -> Result<S::Ok, S::Error> {
                match v {
                    None | Some(None) => s.serialize_bool(false),
                    Some(Some(x)) => ($ser)(x, s),
                }
            }
        }
    };
}

fn ser_plain<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    v.serialize(s)
}

fn ser_duration<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    humantime_serde::serialize(v, s)
}

switchable!(count_or_off, inherit_count_or_off, u32, count, ser_plain);
switchable!(
    percent_or_off,
    inherit_percent_or_off,
    f64,
    percent,
    ser_plain
);
switchable!(
    duration_or_off,
    inherit_duration_or_off,
    Duration,
    duration,
    ser_duration
);
switchable!(
    rate_or_off,
    inherit_rate_or_off,
    RateConfig,
    rate,
    ser_plain
);

/// Plain (not switchable) inheriting fields: `None` inherits.
pub(crate) mod inherit_count {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        count(toml::Value::deserialize(d)?)
            .map(Some)
            .map_err(D::Error::custom)
    }
}

pub(crate) mod inherit_percent {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        percent(toml::Value::deserialize(d)?)
            .map(Some)
            .map_err(D::Error::custom)
    }
}

pub(crate) mod inherit_duration {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration(toml::Value::deserialize(d)?)
            .map(Some)
            .map_err(D::Error::custom)
    }

    pub(crate) fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::option::serialize(v, s)
    }
}
