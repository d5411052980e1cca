//! The crate's one error type, and rejections as data.

use std::time::Duration;

use crate::breaker::CircuitState;

/// Everything fusebox can return instead of letting a call through.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call was refused by a breaker, bulkhead, rate limit or store policy. The
    /// [`Rejection`] says which, and when a retry could succeed.
    #[error("call rejected: {0}")]
    Rejected(Rejection),
    /// The configuration is invalid; `field` is the dotted path of the offending field.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// Dotted path of the field, e.g. `features.chat.max_concurrent`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The feature named in a call is not configured.
    #[error("unknown feature {0:?}: add it under [features] in the configuration")]
    UnknownFeature(String),
    /// The shared store failed (connection, timeout, script error, corrupted value).
    #[error("store error: {0}")]
    Store(#[from] StoreError),
}

impl Error {
    /// The rejection, when this error is one.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Error::Rejected(r) => Some(r),
            _ => None,
        }
    }

    /// When a retry of the same call could succeed, if fusebox knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.rejection().and_then(Rejection::retry_after)
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Why a call was not let through. Data to act on, not a string to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The target's breaker does not admit calls (open, forced open, or half-open with every
    /// probe slot taken).
    #[error("circuit for target {target:?} is {state}")]
    CircuitOpen {
        /// The target (model or endpoint).
        target: String,
        /// The breaker state that refused the call.
        state: CircuitState,
        /// When the breaker may admit again (`None` when forced open).
        retry_after: Option<Duration>,
    },
    /// An upstream `retry-after` set a fleet-wide "not before" instant for the target.
    #[error("target {target:?} asked callers to wait {retry_after:?}")]
    NotBefore {
        /// The target.
        target: String,
        /// Time left until the instant.
        retry_after: Duration,
    },
    /// The feature's fleet-wide concurrency limit is reached.
    #[error("bulkhead of feature {feature:?} is full ({limit} in flight)")]
    BulkheadFull {
        /// The feature.
        feature: String,
        /// The limit in force (the local share when the store is unavailable).
        limit: u32,
        /// A hint: when the earliest held permit's lease ends.
        retry_after: Option<Duration>,
    },
    /// The feature's rate limit is exhausted.
    #[error("rate limit of feature {feature:?} exceeded")]
    RateLimited {
        /// The feature.
        feature: String,
        /// When the next call would be allowed.
        retry_after: Duration,
    },
    /// The shared store is unreachable and the feature is configured to fail closed.
    #[error("store unavailable and feature {feature:?} fails closed")]
    StoreUnavailable {
        /// The feature.
        feature: String,
    },
}

impl Rejection {
    /// When a retry could succeed, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Rejection::CircuitOpen { retry_after, .. } => *retry_after,
            Rejection::NotBefore { retry_after, .. } => Some(*retry_after),
            Rejection::BulkheadFull { retry_after, .. } => *retry_after,
            Rejection::RateLimited { retry_after, .. } => Some(*retry_after),
            Rejection::StoreUnavailable { .. } => None,
        }
    }

    /// A stable, low-cardinality name for metrics and tracing fields.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::CircuitOpen { .. } => "circuit_open",
            Rejection::NotBefore { .. } => "not_before",
            Rejection::BulkheadFull { .. } => "bulkhead_full",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::StoreUnavailable { .. } => "store_unavailable",
        }
    }
}

/// A failure of the shared store itself.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the configured timeout.
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    /// Connection or protocol failure.
    #[error("store connection failed: {0}")]
    Connection(String),
    /// A script or command failed inside Redis (e.g. WRONGTYPE on a corrupted key).
    #[error("store command failed: {0}")]
    Command(String),
    /// A reply had an unexpected shape (a corrupted or foreign value under a fusebox key).
    #[error("unexpected store reply: {0}")]
    Reply(String),
    /// The store is marked unavailable (its own breaker is open) and was not tried.
    #[error("store unavailable (in local mode until it recovers)")]
    Unavailable,
}

impl StoreError {
    /// True when the failure says the store is unreachable or slow (as opposed to a bad value):
    /// these count toward switching to local mode.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout(_) | StoreError::Connection(_) | StoreError::Unavailable
        )
    }
}
