//! Readable and JSON forms of what the store holds: pure functions over plain data, tested
//! without Redis.

use fusebox::breaker::BreakerSnapshot;
use fusebox::{CircuitState, RateConfig, Source};
use serde_json::json;

/// `350 ms`, `12.4 s`, `4 min 12 s`, `2 h 3 min`.
pub(crate) fn duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

pub(crate) fn source_name(source: Source) -> &'static str {
    match source {
        Source::Shared => "shared",
        Source::Local => "local",
        Source::Embedded => "embedded",
        _ => "other",
    }
}

/// One line: the state and what happens next.
pub(crate) fn breaker_line(s: &BreakerSnapshot, now_ms: u64) -> String {
    let mut line = match s.state {
        CircuitState::Closed => {
            let mut l = "closed".to_owned();
            if s.consecutive_failures > 0 {
                l.push_str(&format!(
                    ", {} consecutive failure{}",
                    s.consecutive_failures,
                    plural(u64::from(s.consecutive_failures))
                ));
            }
            l
        }
        CircuitState::Open => match s.open_until_ms {
            Some(until) if until > now_ms => {
                format!("open, half-opens in {}", duration_ms(until - now_ms))
            }
            _ => "open, half-opens at the next call".to_owned(),
        },
        CircuitState::HalfOpen => format!(
            "half-open, {} probe{} in flight, {} successful",
            s.probes_in_flight,
            plural(u64::from(s.probes_in_flight)),
            s.half_open_successes
        ),
        CircuitState::ForcedOpen => "forced open by an operator (refuses every call)".to_owned(),
        CircuitState::ForcedClosed => "forced closed by an operator (admits every call)".to_owned(),
        CircuitState::Disabled => "disabled by an operator (nothing is counted)".to_owned(),
        other => other.to_string(),
    };
    if let Some(nb) = s.not_before_ms.filter(|nb| *nb > now_ms) {
        line.push_str(&format!(
            "; upstream asked to wait {} more",
            duration_ms(nb - now_ms)
        ));
    }
    line
}

/// `window: 10 calls, 4 failed, 0 slow`.
pub(crate) fn window_line(s: &BreakerSnapshot) -> String {
    format!(
        "{} call{}, {} failed, {} slow",
        s.window.calls,
        plural(s.window.calls),
        s.window.failures,
        s.window.slow
    )
}

/// `3 of 20`, `3 (no bulkhead)`.
pub(crate) fn permits_line(in_flight: Option<u32>, limit: Option<u32>) -> String {
    match (in_flight, limit) {
        (Some(n), Some(l)) => format!("{n} of {l} in flight"),
        (Some(n), None) => format!("{n} in flight (no bulkhead)"),
        (None, Some(l)) => format!("? of {l}"),
        (None, None) => "no bulkhead".to_owned(),
    }
}

/// `100 per 1m (burst 20)`, `none`.
pub(crate) fn rate_line(rate: Option<&RateConfig>) -> String {
    match rate {
        None => "no rate limit".to_owned(),
        Some(r) => {
            let per = humantime_serde::re::humantime::format_duration(r.per);
            match r.burst {
                Some(b) if b != r.requests => format!("{} per {per} (burst {b})", r.requests),
                _ => format!("{} per {per}", r.requests),
            }
        }
    }
}

pub(crate) fn breaker_json(s: &BreakerSnapshot, now_ms: u64) -> serde_json::Value {
    let left = |at: Option<u64>| at.filter(|t| *t > now_ms).map(|t| t - now_ms);
    json!({
        "state": s.state.as_str(),
        "generation": s.generation,
        "half_open_in_ms": if s.state == CircuitState::Open { left(s.open_until_ms) } else { None },
        "open_until_ms": s.open_until_ms,
        "not_before_in_ms": left(s.not_before_ms),
        "opens": s.opens,
        "consecutive_failures": s.consecutive_failures,
        "window": {
            "calls": s.window.calls,
            "failures": s.window.failures,
            "slow": s.window.slow,
        },
        "probes_in_flight": s.probes_in_flight,
        "half_open_successes": s.half_open_successes,
        "summary": breaker_line(s, now_ms),
    })
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_prose() {
        assert_eq!(duration_ms(350), "350 ms");
        assert_eq!(duration_ms(12_400), "12.4 s");
        assert_eq!(duration_ms(252_000), "4 min 12 s");
        assert_eq!(duration_ms(7_380_000), "2 h 3 min");
    }

    fn snap(state: CircuitState) -> BreakerSnapshot {
        BreakerSnapshot {
            state,
            generation: 3,
            open_until_ms: Some(1_000_000 + 12_400),
            not_before_ms: None,
            opens: 1,
            consecutive_failures: 0,
            window: Default::default(),
            probes_in_flight: 0,
            half_open_successes: 0,
        }
    }

    #[test]
    fn an_open_breaker_says_when_it_half_opens() {
        assert_eq!(
            breaker_line(&snap(CircuitState::Open), 1_000_000),
            "open, half-opens in 12.4 s"
        );
        let j = breaker_json(&snap(CircuitState::Open), 1_000_000);
        assert_eq!(j["half_open_in_ms"], 12_400);
        assert_eq!(j["state"], "open");
        assert!(breaker_line(&snap(CircuitState::ForcedOpen), 0).starts_with("forced open"));
    }
}
