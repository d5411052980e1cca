//! Range and name checks shared by every section; errors name the field by its dotted path
//! and show values the way they are written in TOML (`"1m"`, not `60s` or `Duration`).

use std::time::Duration;

use crate::Error;

pub(crate) const MS: Duration = Duration::from_millis(1);
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);

/// A duration as TOML writes it: `"250ms"`, `"1m 30s"`, `"0s"`; in one unit when one says it
/// exactly (`"31d"`, not `"1month 13h 26m 24s"`: what a user wrote comes back as written).
pub(crate) fn shown(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos().is_multiple_of(1_000_000) && ms > 0 {
        for (unit, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms.is_multiple_of(per) {
                return format!("\"{}{unit}\"", ms / per);
            }
        }
        if ms < 1000 {
            return format!("\"{ms}ms\"");
        }
    }
    format!("\"{}\"", humantime_serde::re::humantime::format_duration(d))
}

pub(crate) fn check_range(
    field: &str,
    v: Duration,
    lo: Duration,
    hi: Duration,
) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::config(
            field,
            format!(
                "{} is out of range ({} to {})",
                shown(v),
                shown(lo),
                shown(hi)
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_count(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::config(
            field,
            format!("{v} is out of range ({lo} to {hi})"),
        ));
    }
    Ok(())
}

pub(crate) fn check_pct(field: &str, v: f64) -> Result<(), Error> {
    if !(v > 0.0 && v <= 100.0) {
        return Err(Error::config(
            field,
            format!("{v} must be a percentage over 0 and at most 100"),
        ));
    }
    Ok(())
}

/// Checks a target or feature name: non-empty, at most 200 bytes, letters, digits and
/// `._-:/@` only (no braces, so names cannot break a Redis Cluster hash tag).
pub fn check_name(field: &str, name: &str) -> Result<(), Error> {
    check_chars(field, name, "._-:/@")
}

/// Checks a namespace: like a name, without `:` (the first `:` after `{` in a key ends the
/// namespace, so namespace `a:t` + target `m` could share keys with namespace `a` + target
/// `t:m`).
pub(crate) fn check_namespace(field: &str, name: &str) -> Result<(), Error> {
    check_chars(field, name, "._-/@")
}

fn check_chars(field: &str, name: &str, allowed: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 200 {
        return Err(Error::config(field, "must be 1 to 200 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || allowed.contains(*c)))
    {
        return Err(Error::config(
            field,
            format!("{name:?} contains {c:?}; use letters, digits and {allowed}"),
        ));
    }
    Ok(())
}
