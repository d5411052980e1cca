//! What an upstream error means for a chained call: the class the fallback chain routes by,
//! and what it tells the target's breaker. Generic and pure: the pipeline takes a classifier
//! `Fn(&E) -> Class` for the caller's own error type. (Minimal for now: the Anthropic
//! lane's classification of the Messages API errors maps onto these classes.)

use std::time::Duration;

use crate::breaker::CallOutcome;

/// How a failed attempt is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Class {
    /// Worth another attempt at the same target after a backoff (408, 500, 502, 503, 504, a
    /// dropped connection, an attempt timeout), within the retry budget; then the next target.
    /// `retry_after`: the upstream's hint, if it gave one. Counts as a breaker failure.
    Retryable {
        /// The upstream's `retry-after`, if any.
        retry_after: Option<Duration>,
    },
    /// The target is overloaded or rate limited (429 with `retry-after`, 529, an
    /// `overloaded_error` event): go to the next target at once. A `retry_after` also sets
    /// the target's fleet-wide "not before". Counts as a breaker failure.
    Overloaded {
        /// The upstream's `retry-after`, if any.
        retry_after: Option<Duration>,
    },
    /// The request does not fit this target's context window (413, a context-length 400): go
    /// to a later target with a larger `context_window`. Not the target's fault.
    ContextTooLarge,
    /// No retry or other target can fix it (400, 401, 403, 404, a spend cap): the chain ends.
    /// Not the target's fault.
    Final,
}

impl Class {
    /// What the attempt tells its target's breaker: failures for what says the target is
    /// unhealthy, nothing for what the request or the caller's key caused.
    pub fn outcome(self) -> CallOutcome {
        match self {
            Class::Retryable { .. } | Class::Overloaded { .. } => CallOutcome::Failure,
            Class::ContextTooLarge | Class::Final => CallOutcome::Ignored,
        }
    }
}
