//! Defensive parsing of script replies: a reply of an unexpected shape is a
//! [`StoreError::Reply`], never a panic. Also the rebuild of a [`BreakerState`] from the raw
//! hash that `snapshot.lua` returns, with the same self-healing read rule as `lua/lib.lua`.

use std::collections::BTreeMap;

use redis::Value;

use crate::breaker::window::{Bucket, Window};
use crate::breaker::{BreakerState, CircuitState, Transition, TransitionReason};
use crate::StoreError;

/// Largest value a stored 15-digit field may hold (exact in a Lua double).
const U64_STORED_MAX: u64 = 999_999_999_999_999;
/// Most window buckets a stored layout may claim (more reads as an empty window).
const MAX_BUCKETS: u64 = 1024;

fn bad(what: &str, v: &Value) -> StoreError {
    let mut shown = format!("{v:?}");
    if shown.len() > 200 {
        let mut end = 200;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push('…');
    }
    StoreError::Reply(format!("{what}: {shown}"))
}

/// The elements of an array reply.
pub(super) fn array(v: Value, what: &str) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(bad(&format!("{what}: expected an array"), &other)),
    }
}

/// An integer reply.
pub(super) fn int(v: &Value, what: &str) -> Result<i64, StoreError> {
    match v {
        Value::Int(n) => Ok(*n),
        other => Err(bad(&format!("{what}: expected an integer"), other)),
    }
}

/// An array reply of integers only.
pub(super) fn ints(v: Value, what: &str) -> Result<Vec<i64>, StoreError> {
    array(v, what)?.iter().map(|x| int(x, what)).collect()
}

/// A non-negative integer.
pub(super) fn unsigned(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Reply(format!("{what}: negative value {n}")))
}

/// A string-ish reply element as bytes.
fn bytes<'a>(v: &'a Value, what: &str) -> Result<&'a [u8], StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        other => Err(bad(&format!("{what}: expected a string"), other)),
    }
}

/// A transition from its four reply integers.
pub(super) fn transition(target: &str, quad: &[i64], at_ms: u64) -> Result<Transition, StoreError> {
    let [from, to, generation, reason] = quad else {
        return Err(StoreError::Reply(format!(
            "transition: expected 4 integers, got {quad:?}"
        )));
    };
    let state = |code: i64| {
        CircuitState::from_code(code)
            .ok_or_else(|| StoreError::Reply(format!("transition: unknown state code {code}")))
    };
    Ok(Transition {
        target: target.to_owned(),
        from: state(*from)?,
        to: state(*to)?,
        generation: unsigned(*generation, "transition generation")?,
        reason: TransitionReason::from_code(*reason).ok_or_else(|| {
            StoreError::Reply(format!("transition: unknown reason code {reason}"))
        })?,
        at_ms,
    })
}

/// `{now, (from, to, generation, reason)*}` as returned by `settle.lua` and `force.lua`.
pub(super) fn transitions(
    v: Value,
    target: &str,
    what: &str,
) -> Result<Vec<Transition>, StoreError> {
    let xs = ints(v, what)?;
    let Some((now, rest)) = xs.split_first() else {
        return Err(StoreError::Reply(format!("{what}: empty reply")));
    };
    let now = unsigned(*now, what)?;
    if !rest.len().is_multiple_of(4) {
        return Err(StoreError::Reply(format!(
            "{what}: {} transition integers is not a multiple of 4",
            rest.len()
        )));
    }
    rest.chunks_exact(4)
        .map(|quad| transition(target, quad, now))
        .collect()
}

/// A `settle.lua` reply whose release part failed ends with the error message (a string):
/// the reply without it, and the failure.
pub(super) fn split_release_error(v: Value) -> (Value, Option<StoreError>) {
    let Value::Array(mut items) = v else {
        return (v, None);
    };
    let message = match items.last() {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => return (Value::Array(items), None),
    };
    items.pop();
    let e = StoreError::Command(format!("settle.lua (release part): {message}"));
    (Value::Array(items), Some(e))
}

/// A stored unsigned integer by the rule of `lua/lib.lua`: 1 to `digits` ASCII digits and at
/// most `max`; anything else (missing, corrupted) reads as 0.
fn stored_uint(v: Option<&[u8]>, digits: usize, max: u64) -> u64 {
    let Some(v) = v else { return 0 };
    if v.is_empty() || v.len() > digits || !v.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|n| *n <= max)
        .unwrap_or(0)
}

fn u64_field(v: Option<&[u8]>) -> u64 {
    stored_uint(v, 15, U64_STORED_MAX)
}

fn u32_field(v: Option<&[u8]>) -> u32 {
    u32::try_from(stored_uint(v, 10, u64::from(u32::MAX))).unwrap_or(0)
}

/// The reply of `snapshot.lua`: server time, and the state rebuilt as `BreakerState`.
pub(super) fn snapshot_state(v: Value) -> Result<(u64, BreakerState), StoreError> {
    const WHAT: &str = "snapshot";
    let items = array(v, WHAT)?;
    let (Some(now), Some(n)) = (items.first(), items.get(1)) else {
        return Err(StoreError::Reply(format!("{WHAT}: reply too short")));
    };
    let now = unsigned(int(now, WHAT)?, WHAT)?;
    let n = usize::try_from(int(n, WHAT)?)
        .map_err(|_| StoreError::Reply(format!("{WHAT}: negative hash length")))?;
    let rest = items.get(2..).unwrap_or_default();
    if !n.is_multiple_of(2) || n > rest.len() || !(rest.len() - n).is_multiple_of(2) {
        return Err(StoreError::Reply(format!(
            "{WHAT}: hash length {n} does not fit a reply of {} items",
            items.len()
        )));
    }
    let (hash_items, probe_items) = rest.split_at(n);
    let mut hash: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
    for pair in hash_items.chunks_exact(2) {
        if let [k, v] = pair {
            hash.insert(bytes(k, WHAT)?, bytes(v, WHAT)?);
        }
    }
    let field = |name: &str| hash.get(name.as_bytes()).copied();
    let state = CircuitState::from_code(i64::try_from(u64_field(field("s"))).unwrap_or(0))
        .unwrap_or(CircuitState::Closed);
    let wn = stored_uint(field("wn"), 10, u64::from(u32::MAX));
    let wn = if wn > MAX_BUCKETS { 0 } else { wn };
    let buckets = (0..wn)
        .map(|i| Bucket {
            epoch: u64_field(field(&format!("we{i}"))),
            calls: u64_field(field(&format!("wc{i}"))),
            failures: u64_field(field(&format!("wf{i}"))),
            slow: u64_field(field(&format!("ws{i}"))),
        })
        .collect();
    let mut probes = BTreeMap::new();
    for pair in probe_items.chunks_exact(2) {
        if let [id, score] = pair {
            let id = String::from_utf8_lossy(bytes(id, WHAT)?).into_owned();
            let score = std::str::from_utf8(bytes(score, WHAT)?)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| bad("snapshot: probe score is not a number", score))?;
            // Scores are ms instants; clamp anything odd (negative, NaN, inf) into u64.
            let expiry = if score.is_nan() || score <= 0.0 {
                0
            } else if score >= u64::MAX as f64 {
                u64::MAX
            } else {
                score as u64
            };
            probes.insert(id, expiry);
        }
    }
    Ok((
        now,
        BreakerState {
            state,
            generation: u64_field(field("g")),
            open_until: u64_field(field("ou")),
            opens: u32_field(field("o")),
            consecutive_failures: u32_field(field("cf")),
            half_open_successes: u32_field(field("hs")),
            not_before: u64_field(field("nb")),
            window: Window { buckets },
            probes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn stored_numbers_heal_to_the_default() {
        assert_eq!(u64_field(Some(b"42")), 42);
        assert_eq!(u64_field(Some(b"-5")), 0);
        assert_eq!(u64_field(Some(b"banana")), 0);
        assert_eq!(u64_field(Some(b"1e3")), 0);
        assert_eq!(u64_field(Some(b"+5")), 0);
        assert_eq!(u64_field(Some(b"")), 0);
        assert_eq!(u64_field(Some(b"1234567890123456")), 0);
        assert_eq!(u64_field(None), 0);
        assert_eq!(u32_field(Some(b"4294967295")), u32::MAX);
        assert_eq!(u32_field(Some(b"4294967296")), 0);
    }

    #[test]
    fn snapshot_rebuilds_and_heals() {
        let reply = Value::Array(vec![
            Value::Int(1000),
            Value::Int(8),
            bulk("s"),
            bulk("banana"),
            bulk("g"),
            bulk("-5"),
            bulk("ou"),
            bulk("900"),
            bulk("wn"),
            bulk("99999"),
            bulk("p1"),
            bulk("1500"),
        ]);
        let (now, st) = snapshot_state(reply).expect("parses");
        assert_eq!(now, 1000);
        assert_eq!(st.state, CircuitState::Closed);
        assert_eq!(st.generation, 0);
        assert_eq!(st.open_until, 900);
        assert!(st.window.buckets.is_empty());
        assert_eq!(st.probes.get("p1"), Some(&1500));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(snapshot_state(Value::Nil).is_err());
        assert!(snapshot_state(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(
            snapshot_state(Value::Array(vec![Value::Int(1), Value::Int(3), bulk("s")])).is_err()
        );
        assert!(snapshot_state(Value::Array(vec![Value::Int(1), Value::Int(-2)])).is_err());
        assert!(transitions(Value::Array(vec![]), "t", "x").is_err());
        assert!(transitions(Value::Array(vec![Value::Int(1), Value::Int(0)]), "t", "x").is_err());
        assert!(transitions(
            Value::Array(vec![
                Value::Int(1),
                Value::Int(0),
                Value::Int(9),
                Value::Int(1),
                Value::Int(1)
            ]),
            "t",
            "x"
        )
        .is_err());
        assert!(ints(Value::Array(vec![bulk("x")]), "x").is_err());
    }
}
