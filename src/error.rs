//! The crate's one error type, and rejections as data.

use std::time::Duration;

use crate::breaker::CircuitState;
use crate::classify::{AnthropicPolicy, Classification, Failure, Policy, StatusFailure};

/// Everything fusebox can return instead of letting a call through.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call was refused by a breaker, bulkhead, rate limit or store policy. The
    /// [`Rejection`] says which, and when a retry could succeed.
    #[error("call rejected: {0}")]
    Rejected(Rejection),
    /// The configuration is invalid; `field` is the dotted path of the offending field.
    #[error("invalid configuration: {}{reason}", field_prefix(.field))]
    Config {
        /// Dotted path of the field, e.g. `features.chat.max_concurrent`; empty when the
        /// error is about the document as a whole (a TOML syntax error), and then left out
        /// of the message.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The feature named in a call is not configured.
    #[error("unknown feature {0:?}: add it under [features] in the configuration")]
    UnknownFeature(String),
    /// An operator command named a target that is neither listed under `[targets]` nor has
    /// state in the store (a typo, most likely): nothing was changed. See
    /// [`crate::Coordinator::force_create`] to force a target before its first call.
    #[error(
        "unknown target {0:?}: not under [targets] and no state in the store; check the name \
         (or force it anyway with --create / Coordinator::force_create)"
    )]
    UnknownTarget(String),
    /// The shared store failed (connection, timeout, script error, corrupted value).
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The upstream (the Anthropic API) failed; classified.
    #[error("{0}")]
    Upstream(Box<UpstreamError>),
}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Self {
        Error::Upstream(Box::new(e))
    }
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

/// What [`crate::Coordinator::call`] returns instead of the call's value: the call was not
/// sent ([`CallError::Rejected`], [`CallError::Fusebox`]), or it was sent and failed
/// ([`CallError::Inner`], recorded on the target's breaker as the classifier said).
#[derive(Debug)]
#[non_exhaustive]
pub enum CallError<E> {
    /// Not sent: refused by a breaker, bulkhead, rate limit, "not before" or store policy.
    Rejected(Rejection),
    /// Not sent: fusebox could not decide (an unknown feature, an invalid target name, a
    /// store error).
    Fusebox(Error),
    /// Sent, and the call itself failed with this error.
    Inner(E),
    /// A guarded call stopped before a weaker model (`stop_before`): try again later
    /// (`retry_after`: when, if known).
    RetryLater {
        /// When a new call could be answered, if known.
        retry_after: Option<Duration>,
    },
    /// A guarded call's deadline passed (or every attempt timed out) with no error to return.
    TimedOut,
}

impl<E> CallError<E> {
    /// The rejection, when the call was refused.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            CallError::Rejected(r) => Some(r),
            _ => None,
        }
    }

    /// When a retry of the same call could succeed, if fusebox knows (refusals only).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::RetryLater { retry_after } => *retry_after,
            _ => self.rejection().and_then(Rejection::retry_after),
        }
    }

    /// Whether the call was sent (and failed): [`CallError::Inner`].
    pub fn was_sent(&self) -> bool {
        matches!(self, CallError::Inner(_))
    }

    /// The call's own error, when it was sent and failed.
    pub fn into_inner(self) -> Option<E> {
        match self {
            CallError::Inner(e) => Some(e),
            _ => None,
        }
    }
}

impl<E> From<Error> for CallError<E> {
    fn from(e: Error) -> Self {
        match e {
            Error::Rejected(r) => CallError::Rejected(r),
            other => CallError::Fusebox(other),
        }
    }
}

impl<E: std::fmt::Display> std::fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Rejected(r) => write!(f, "call rejected: {r}"),
            CallError::Fusebox(e) => e.fmt(f),
            CallError::Inner(e) => write!(f, "the call failed: {e}"),
            CallError::RetryLater { .. } => {
                write!(f, "no model this call may use is available: retry later")
            }
            CallError::TimedOut => write!(f, "the call's deadline passed"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Rejected(r) => Some(r),
            CallError::Fusebox(e) => Some(e),
            CallError::Inner(e) => Some(e),
            CallError::RetryLater { .. } | CallError::TimedOut => None,
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
    #[error("target {target:?} asked callers to wait {}", readable(*retry_after))]
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

/// A failure of the shared store itself. Its `Display` names the cause and carries the
/// server's or the operating system's own message.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the configured timeout.
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    /// Nothing listens at the address (TCP connection refused).
    #[error("store connection refused: {0}")]
    Refused(String),
    /// The server refused the credentials (`WRONGPASS`, `NOAUTH`, ACL).
    #[error("store authentication failed: {0}")]
    Auth(String),
    /// The host name does not resolve.
    #[error("store host not found: {0}")]
    Dns(String),
    /// The TLS handshake failed (certificate, or TLS spoken to a plain port).
    #[error("store TLS failed: {0}")]
    Tls(String),
    /// The server answered, but not as the configuration expects (for example a `cluster`
    /// configuration pointed at a Redis without cluster mode).
    #[error("store protocol error: {0}")]
    Protocol(String),
    /// Another connection failure (reset, dropped, not serving yet).
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
            StoreError::Timeout(_)
                | StoreError::Refused(_)
                | StoreError::Auth(_)
                | StoreError::Dns(_)
                | StoreError::Tls(_)
                | StoreError::Protocol(_)
                | StoreError::Connection(_)
                | StoreError::Unavailable
        )
    }

    /// A stable, low-cardinality name of the cause, for metrics, logs and JSON output:
    /// `timeout`, `refused`, `auth`, `dns`, `tls`, `protocol`, `connection`, `command`,
    /// `reply`, `unavailable`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Refused(_) => "refused",
            StoreError::Auth(_) => "auth",
            StoreError::Dns(_) => "dns",
            StoreError::Tls(_) => "tls",
            StoreError::Protocol(_) => "protocol",
            StoreError::Connection(_) => "connection",
            StoreError::Command(_) => "command",
            StoreError::Reply(_) => "reply",
            StoreError::Unavailable => "unavailable",
        }
    }
}

/// A failed call to the upstream (the Anthropic API), with what its status, body and headers
/// said and what that means ([`UpstreamError::classification`]). Never carries the API key.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UpstreamError {
    /// How it failed.
    pub kind: UpstreamErrorKind,
    /// The HTTP status, when one arrived.
    pub status: Option<u16>,
    /// The body's (or the stream `error` event's) `error.type`.
    pub error_type: Option<String>,
    /// `error.details.error_code`.
    pub error_code: Option<String>,
    /// The upstream's message, or what went wrong on the way.
    pub message: String,
    /// The `request-id` header (or the body's `request_id`).
    pub request_id: Option<String>,
    /// The wait asked for (`retry-after-ms` / `retry-after`).
    pub retry_after: Option<Duration>,
    /// `x-should-retry`.
    pub should_retry: Option<bool>,
    /// What it means: retry, another target, or stop; and what the breaker records.
    pub classification: Classification,
}

/// How an upstream call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpstreamErrorKind {
    /// A non-2xx status.
    Status,
    /// An `error` event inside a stream, after the 200.
    StreamError,
    /// No connection (refused, reset before an answer, DNS, TLS).
    Connect,
    /// No answer within the attempt's timeout.
    Timeout,
    /// The answer was cut off (dropped mid-body, a stream ending before `message_stop`).
    Interrupted,
    /// A 2xx whose body is not the API's format.
    InvalidResponse,
}

impl UpstreamErrorKind {
    /// A stable, low-cardinality name: `status`, `stream_error`, `connect`, `timeout`,
    /// `interrupted`, `invalid_response`.
    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamErrorKind::Status => "status",
            UpstreamErrorKind::StreamError => "stream_error",
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Interrupted => "interrupted",
            UpstreamErrorKind::InvalidResponse => "invalid_response",
        }
    }
}

impl UpstreamError {
    /// An error of `kind` with `message`, classified by the default [`AnthropicPolicy`]
    /// (the fields set afterwards call for [`UpstreamError::reclassify`]).
    pub fn new(kind: UpstreamErrorKind, message: String) -> Self {
        let mut e = UpstreamError {
            kind,
            status: None,
            error_type: None,
            error_code: None,
            message,
            request_id: None,
            retry_after: None,
            should_retry: None,
            classification: Classification::final_(crate::classify::Reason::UnexpectedStatus),
        };
        e.reclassify(&AnthropicPolicy::new());
        e
    }

    /// Classifies it again with `policy`.
    pub fn reclassify(&mut self, policy: &dyn Policy) {
        self.classification = policy.classify(&self.failure());
    }

    /// The failure as the classifier sees it.
    pub fn failure(&self) -> Failure<'_> {
        match self.kind {
            UpstreamErrorKind::Status => Failure::Status(
                StatusFailure::new(self.status.unwrap_or(0))
                    .error_type(self.error_type.as_deref())
                    .error_code(self.error_code.as_deref())
                    .message(Some(self.message.as_str()))
                    .retry_after(self.retry_after)
                    .should_retry(self.should_retry),
            ),
            UpstreamErrorKind::StreamError => Failure::StreamError {
                error_type: self.error_type.as_deref().unwrap_or("api_error"),
            },
            UpstreamErrorKind::Connect => Failure::Connect,
            UpstreamErrorKind::Timeout => Failure::Timeout,
            UpstreamErrorKind::Interrupted => Failure::Interrupted,
            UpstreamErrorKind::InvalidResponse => Failure::InvalidResponse,
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream {}", self.kind.as_str())?;
        if let Some(s) = self.status {
            write!(f, " {s}")?;
        }
        if let Some(t) = &self.error_type {
            write!(f, " {t}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(id) = &self.request_id {
            write!(f, " (request {id})")?;
        }
        write!(f, " [{}]", self.classification.class.as_str())
    }
}

impl std::error::Error for UpstreamError {}

/// Classifies a redis-rs error by its cause, keeping the server's (or the OS's) message.
/// `timeout` is the bound that was in force, for [`StoreError::Timeout`].
/// A wait as people read it: `350 ms`, `12.4 s` (not `977.440144ms`).
fn readable(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

pub(crate) fn store_error_from_redis(e: &redis::RedisError, timeout: Duration) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    let message = e.to_string();
    let lower = message.to_ascii_lowercase();
    let code = e.code().unwrap_or_default();
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
    {
        return StoreError::Auth(message);
    }
    if e.is_connection_refusal() || lower.contains("connection refused") {
        return StoreError::Refused(message);
    }
    if lower.contains("failed to lookup address")
        || lower.contains("name or service not known")
        || lower.contains("nodename nor servname")
        || lower.contains("no such host")
    {
        return StoreError::Dns(message);
    }
    if lower.contains("tls")
        || lower.contains("certificate")
        || lower.contains("handshake")
        || lower.contains("invalidcontenttype")
    {
        return StoreError::Tls(message);
    }
    if lower.contains("cluster support disabled") {
        return StoreError::Protocol(format!(
            "{message} (redis.cluster points at a Redis that is not in cluster mode; use \
             redis.url for a single node)"
        ));
    }
    match e.kind() {
        ErrorKind::Parse => return StoreError::Protocol(message),
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => {
            return StoreError::Connection(message)
        }
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly,
        ) => return StoreError::Connection(message),
        // A script running too long on the server (BUSY) makes the store unavailable for now.
        ErrorKind::Extension if code == "BUSY" => return StoreError::Connection(message),
        _ => {}
    }
    if e.is_connection_dropped() {
        StoreError::Connection(message)
    } else {
        StoreError::Command(message)
    }
}

/// `"field: "`, or nothing for an error about the whole document (no field).
fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind, msg: &str) -> redis::RedisError {
        redis::RedisError::from(std::io::Error::new(kind, msg.to_owned()))
    }

    #[test]
    fn store_errors_keep_their_cause_and_message() {
        let t = Duration::from_millis(50);
        let refused = store_error_from_redis(
            &io(
                std::io::ErrorKind::ConnectionRefused,
                "Connection refused (os error 111)",
            ),
            t,
        );
        assert_eq!(refused.kind(), "refused");
        assert!(refused.to_string().contains("os error 111"), "{refused}");
        let dns = store_error_from_redis(
            &io(
                std::io::ErrorKind::Other,
                "failed to lookup address information: Name or service not known",
            ),
            t,
        );
        assert_eq!(dns.kind(), "dns", "{dns}");
        let timeout = store_error_from_redis(&io(std::io::ErrorKind::TimedOut, "timed out"), t);
        assert_eq!(timeout.to_string(), "store timed out after 50ms");
        let auth = store_error_from_redis(
            &redis::RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
            t,
        );
        assert_eq!(auth.kind(), "auth");
        assert!(auth.to_string().contains("Password authentication failed"));
        assert!(auth.is_unavailable());
    }
}

#[cfg(test)]
mod readable_tests {
    use super::*;

    /// Seen by the new-user review: the proxy's 529 said `asked callers to wait 977.440144ms`.
    #[test]
    fn a_not_before_says_its_wait_as_people_read_it() {
        let r = |ms: u64| {
            Rejection::NotBefore {
                target: "t".into(),
                retry_after: Duration::from_micros(ms * 1000 + 440),
            }
            .to_string()
        };
        assert_eq!(r(977), "target \"t\" asked callers to wait 977 ms");
        assert_eq!(r(12_400), "target \"t\" asked callers to wait 12.4 s");
    }
}
