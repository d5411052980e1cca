//! `GET /metrics`: Prometheus text format. Two parts:
//!
//! * the guarded call pipeline's metrics (the [`metrics`] facade: calls, attempts, retries,
//!   fallbacks, degraded answers, transitions, durations), rendered by the
//!   `metrics-exporter-prometheus` recorder that `fusebox serve` installs once per process
//!   ([`install`]; a [`ProxyState`] without one serves the second part only);
//! * gauges read from the store at scrape time: breaker state per target, permits in use and
//!   the limit per feature, retry budgets per target, the store this replica decides on, and
//!   live replicas. Fleet gauges come from the shared store only: when it cannot be read,
//!   `fusebox_store_up` is 0 and they are left out (local state is never passed off as the
//!   fleet's).
//!
//! Labels are configured target and feature names and fixed vocabularies: never a caller,
//! a tenant or an API key.

use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::ProxyState;
use crate::{CircuitState, Error};

/// Buckets of the duration histograms (seconds).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// How often the installed recorder's upkeep runs.
const UPKEEP: Duration = Duration::from_secs(5);

/// The recorder `/metrics` renders, not installed (tests install it locally with
/// `metrics::set_default_local_recorder` and give [`PrometheusRecorder::handle`] to
/// [`ProxyState::with_metrics`]).
pub fn recorder() -> Result<PrometheusRecorder, Error> {
    Ok(PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| Error::config("metrics", e.to_string()))?
        .build_recorder())
}

/// Installs the recorder as the process's global `metrics` recorder (once per process: a
/// second call fails) and runs its upkeep every 5 s on the current runtime. For `fusebox
/// serve`; give the handle to [`ProxyState::with_metrics`].
pub fn install() -> Result<PrometheusHandle, Error> {
    let recorder = recorder()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| Error::config("metrics", e.to_string()))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

pub(super) async fn metrics(State(state): State<ProxyState>) -> Response {
    let mut out = state.metrics().map(|h| h.render()).unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&gauges(&state).await);
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Every state a breaker can be in, for the state set.
const STATES: [CircuitState; 6] = [
    CircuitState::Closed,
    CircuitState::Open,
    CircuitState::HalfOpen,
    CircuitState::ForcedOpen,
    CircuitState::ForcedClosed,
    CircuitState::Disabled,
];

/// The gauges read at scrape time, as Prometheus text.
async fn gauges(state: &ProxyState) -> String {
    let c = state.coordinator();
    let mut g = Gauges::default();
    let ready = super::ops::readiness(state).await;
    g.help(
        "fusebox_store_mode",
        "The store this replica decides on: shared (Redis), local (Redis unreachable: \
         decides alone) or embedded (no [redis]).",
    );
    for mode in ["shared", "local", "embedded"] {
        g.sample(
            "fusebox_store_mode",
            &[("mode", mode)],
            u64::from(ready.store == mode),
        );
    }
    g.help(
        "fusebox_fleet_size",
        "The fleet size this replica last observed (local mode divides limits by it).",
    );
    g.sample("fusebox_fleet_size", &[], u64::from(c.fleet_size()));
    // Fleet gauges only from a store that answers (embedded: this process is the fleet).
    let up = ready.answered;
    g.help(
        "fusebox_store_up",
        "Whether the store answered this scrape (1) or not (0, and the fleet gauges are \
         left out).",
    );
    g.sample("fusebox_store_up", &[], u64::from(up));
    if !up {
        return g.out;
    }
    let mut errors = 0u64;
    let names = c.configured_names();

    if let Ok(members) = c.replicas().await {
        g.help(
            "fusebox_live_replicas",
            "Replicas of the namespace that admitted a call recently (fleet membership).",
        );
        g.sample("fusebox_live_replicas", &[], members.len() as u64);
    } else {
        errors += 1;
    }

    let mut breakers = Vec::new();
    let mut budgets = Vec::new();
    for t in &names.targets {
        match c.read_breaker(t).await {
            Ok(r) => breakers.push((t, r.value)),
            Err(_) => errors += 1,
        }
        match c.read_retry_budget(t).await {
            Ok(Some(r)) => budgets.push((t, r.value)),
            Ok(None) => {}
            Err(_) => errors += 1,
        }
    }
    g.help(
        "fusebox_breaker_state",
        "The breaker's state, fleet-wide (1 for the state it is in, 0 for the others).",
    );
    for (t, s) in &breakers {
        for st in STATES {
            g.sample(
                "fusebox_breaker_state",
                &[("target", t), ("state", st.as_str())],
                u64::from(s.state == st),
            );
        }
    }
    g.help(
        "fusebox_breaker_consecutive_failures",
        "Consecutive failures the breaker has counted.",
    );
    for (t, s) in &breakers {
        g.sample(
            "fusebox_breaker_consecutive_failures",
            &[("target", t)],
            u64::from(s.consecutive_failures),
        );
    }
    g.help(
        "fusebox_breaker_window_calls",
        "Calls in the breaker's sliding window.",
    );
    for (t, s) in &breakers {
        g.sample(
            "fusebox_breaker_window_calls",
            &[("target", t)],
            s.window.calls,
        );
    }
    g.help(
        "fusebox_breaker_window_failures",
        "Failed calls in the breaker's sliding window.",
    );
    for (t, s) in &breakers {
        g.sample(
            "fusebox_breaker_window_failures",
            &[("target", t)],
            s.window.failures,
        );
    }
    g.help(
        "fusebox_breaker_probes_in_flight",
        "Half-open probes in flight fleet-wide.",
    );
    for (t, s) in &breakers {
        g.sample(
            "fusebox_breaker_probes_in_flight",
            &[("target", t)],
            u64::from(s.probes_in_flight),
        );
    }

    let mut permits = Vec::new();
    for f in &names.features {
        match c.read_in_flight(f).await {
            Ok(r) => permits.push((f, r.value, c.bulkhead_limit(f).ok().flatten())),
            Err(_) => errors += 1,
        }
    }
    g.help(
        "fusebox_bulkhead_permits_in_use",
        "Bulkhead permits held fleet-wide (calls in flight) per feature.",
    );
    for (f, n, _) in &permits {
        g.sample(
            "fusebox_bulkhead_permits_in_use",
            &[("feature", f)],
            u64::from(*n),
        );
    }
    g.help(
        "fusebox_bulkhead_limit",
        "The feature's bulkhead limit (features with a bulkhead only).",
    );
    for (f, _, limit) in &permits {
        if let Some(l) = limit {
            g.sample("fusebox_bulkhead_limit", &[("feature", f)], u64::from(*l));
        }
    }

    for (name, help, pick) in [
        (
            "fusebox_retry_budget_requests",
            "Requests to the target in its retry budget's window, fleet-wide.",
            (|b: &crate::BudgetStatus| b.requests) as fn(&crate::BudgetStatus) -> u64,
        ),
        (
            "fusebox_retry_budget_retries",
            "Retries to the target in its retry budget's window, fleet-wide.",
            |b| b.retries,
        ),
        (
            "fusebox_retry_budget_available",
            "Retries the target's budget still allows in its window.",
            |b| b.available(),
        ),
    ] {
        g.help(name, help);
        for (t, b) in &budgets {
            g.sample(name, &[("target", t)], pick(b));
        }
    }

    g.help(
        "fusebox_scrape_read_errors",
        "Store reads of this scrape that failed (their gauges are left out).",
    );
    g.sample("fusebox_scrape_read_errors", &[], errors);
    g.out
}

/// Prometheus text, gauges only.
#[derive(Default)]
struct Gauges {
    out: String,
}

impl Gauges {
    fn help(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} gauge");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format writes it: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut g = Gauges::default();
        g.sample("m", &[("target", "a\"b\\c\nd")], 1);
        assert_eq!(g.out, "m{target=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
