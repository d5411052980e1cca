//! Metrics of guarded calls through the [`metrics`] facade crate: whatever recorder the
//! application installed (Prometheus, StatsD, OpenTelemetry exporters...) sees them; without
//! one they cost next to nothing. Names and labels are listed in the README
//! ("Observability"). Labels are feature and target names and fixed vocabularies only:
//! never a caller, tenant or API key.

use std::time::Duration;

use metrics::{counter, histogram};

use crate::breaker::Transition;

/// A guarded call ended: `outcome` is the tier that answered, or `error`.
pub(crate) fn call(feature: &str, outcome: &'static str, elapsed: Duration) {
    let feature = feature.to_owned();
    counter!("fusebox_calls_total", "feature" => feature.clone(), "outcome" => outcome)
        .increment(1);
    histogram!("fusebox_call_duration_seconds", "feature" => feature, "outcome" => outcome)
        .record(elapsed.as_secs_f64());
}

/// An attempt was sent to `target` (`retry`: not the request's first attempt there).
pub(crate) fn attempt(feature: &str, target: &str, retry: bool) {
    counter!("fusebox_attempts_total", "feature" => feature.to_owned(), "target" => target.to_owned())
        .increment(1);
    if retry {
        counter!("fusebox_retries_total", "feature" => feature.to_owned(), "target" => target.to_owned())
            .increment(1);
    }
}

/// An attempt at `target` ended after `elapsed`; `failure`: its class (or `timeout`) when it
/// failed.
pub(crate) fn attempt_ended(
    feature: &str,
    target: &str,
    elapsed: Duration,
    failure: Option<&'static str>,
) {
    histogram!(
        "fusebox_attempt_duration_seconds",
        "feature" => feature.to_owned(),
        "target" => target.to_owned()
    )
    .record(elapsed.as_secs_f64());
    if let Some(class) = failure {
        counter!(
            "fusebox_attempt_failures_total",
            "feature" => feature.to_owned(),
            "target" => target.to_owned(),
            "class" => class
        )
        .increment(1);
    }
}

/// A streamed answer of `target` failed after its first event reached the caller (the
/// attempt itself was counted as answered); `class` as for [`attempt_ended`].
#[cfg(feature = "proxy")]
pub(crate) fn stream_failed(feature: &str, target: &str, class: &'static str) {
    counter!(
        "fusebox_stream_failures_total",
        "feature" => feature.to_owned(),
        "target" => target.to_owned(),
        "class" => class
    )
    .increment(1);
}

/// A retry of `target` was not sent: its fleet retry budget is spent.
pub(crate) fn budget_spent(feature: &str, target: &str) {
    counter!(
        "fusebox_retry_budget_spent_total",
        "feature" => feature.to_owned(),
        "target" => target.to_owned()
    )
    .increment(1);
}

/// A later target of the chain answered.
pub(crate) fn fallback(feature: &str, target: &str) {
    counter!("fusebox_fallbacks_total", "feature" => feature.to_owned(), "target" => target.to_owned())
        .increment(1);
}

/// A degraded answer that is not a target's was served (`source`: `cache` or `canned`).
pub(crate) fn degraded(feature: &str, source: &'static str) {
    counter!("fusebox_degraded_answers_total", "feature" => feature.to_owned(), "source" => source)
        .increment(1);
}

/// A breaker changed state (reported once, by the replica whose call made the change).
pub(crate) fn transition(t: &Transition) {
    counter!(
        "fusebox_breaker_transitions_total",
        "target" => t.target.clone(),
        "from" => t.from.as_str(),
        "to" => t.to.as_str(),
        "reason" => t.reason.as_str()
    )
    .increment(1);
}
