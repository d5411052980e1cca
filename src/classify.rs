//! What a failed upstream call means for the pipeline: the [`Class`] the fallback chain routes
//! by (the same target again, the next target, a target with a larger context, or the end),
//! and whether the failure says something about the target's health (recorded on its breaker).
//!
//! Pure: no I/O, no clock. The generic pipeline takes a classifier `Fn(&E) -> Class` for the
//! caller's own error type. For the Anthropic Messages API the input is a [`Failure`] (an HTTP
//! error status with what its body and headers said, an `error` event inside a stream, a
//! connection error, a timeout...) and the output a [`Classification`]: the class, a
//! low-cardinality [`Reason`], and what the breaker records. The default [`AnthropicPolicy`]
//! follows the API; users override single statuses with [`AnthropicPolicy::with_status`] or
//! implement [`Policy`] themselves (delegating to [`AnthropicPolicy`] for the rest).
//!
//! The default policy, in one table:
//!
//! | failure | class | recorded on the breaker |
//! |---|---|---|
//! | 408, 500, 502, 503, 504, other 5xx | retryable | failure |
//! | 529, or any status / stream event of type `overloaded_error` | overloaded | failure |
//! | 429 (rate limit; `retry-after` kept) | overloaded | failure |
//! | 429 with `error.details.error_code = "enforced_spend_limit_reached"` | final | ignored |
//! | 409 conflict | retryable | ignored |
//! | connection error, timeout, body cut off, garbage body on a 2xx | retryable | failure |
//! | `error` event inside a stream (`api_error`, ...) | as its status | as its status |
//! | 413, or a 400 saying the prompt exceeds the context window | context too large | ignored |
//! | 404 whose message names the model (`model: claude-...`: retired, or unknown to the key) | overloaded (the next target at once) | ignored |
//! | 400, 401, 402, 403, other 404s | final | ignored |
//! | other statuses | final | failure |
//!
//! `x-should-retry: true` makes any failure retryable; `x-should-retry: false` turns a
//! retryable failure into [`Class::Overloaded`] (no repeat on this target, the next one at
//! once: the upstream, often a proxy that already retried, asks not to be called again).
//! Neither changes what is recorded on the breaker.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::breaker::CallOutcome;

/// A failed upstream call, as the classifier sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure<'a> {
    /// The upstream answered with a non-2xx status.
    Status(StatusFailure<'a>),
    /// An `error` event inside a stream that had started with a 200 (e.g. `overloaded_error`).
    StreamError {
        /// The event's `error.type`.
        error_type: &'a str,
    },
    /// The connection could not be made, or was refused or reset before an answer.
    Connect,
    /// No answer within the attempt's timeout.
    Timeout,
    /// The answer started but was cut off (connection dropped mid-body, a stream ending
    /// without `message_stop`).
    Interrupted,
    /// A 2xx whose body could not be read as the API's format (garbage JSON, invalid SSE).
    InvalidResponse,
}

/// An HTTP error status with what its body and headers said.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusFailure<'a> {
    /// The HTTP status code.
    pub status: u16,
    /// The body's `error.type` (e.g. `rate_limit_error`), when the body could be read.
    pub error_type: Option<&'a str>,
    /// The body's `error.details.error_code` (e.g. `enforced_spend_limit_reached`).
    pub error_code: Option<&'a str>,
    /// The body's `error.message`.
    pub message: Option<&'a str>,
    /// The wait the upstream asked for (`retry-after-ms` / `retry-after`), parsed.
    pub retry_after: Option<Duration>,
    /// The `x-should-retry` header, when it was `true` or `false`.
    pub should_retry: Option<bool>,
}

impl<'a> StatusFailure<'a> {
    /// A status with nothing else known.
    pub fn new(status: u16) -> Self {
        StatusFailure {
            status,
            error_type: None,
            error_code: None,
            message: None,
            retry_after: None,
            should_retry: None,
        }
    }

    /// With the body's `error.type`.
    pub fn error_type(mut self, error_type: Option<&'a str>) -> Self {
        self.error_type = error_type;
        self
    }

    /// With the body's `error.details.error_code`.
    pub fn error_code(mut self, error_code: Option<&'a str>) -> Self {
        self.error_code = error_code;
        self
    }

    /// With the body's `error.message`.
    pub fn message(mut self, message: Option<&'a str>) -> Self {
        self.message = message;
        self
    }

    /// With the parsed `retry-after-ms` / `retry-after`.
    pub fn retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// With the `x-should-retry` header.
    pub fn should_retry(mut self, should_retry: Option<bool>) -> Self {
        self.should_retry = should_retry;
        self
    }
}

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
    /// unhealthy, nothing for what the request or the caller's key caused. (A
    /// [`Classification`] can say otherwise for a single case, e.g. a 409.)
    pub fn outcome(self) -> CallOutcome {
        match self {
            Class::Retryable { .. } | Class::Overloaded { .. } => CallOutcome::Failure,
            Class::ContextTooLarge | Class::Final => CallOutcome::Ignored,
        }
    }

    /// The wait the upstream asked for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Class::Retryable { retry_after } | Class::Overloaded { retry_after } => *retry_after,
            Class::ContextTooLarge | Class::Final => None,
        }
    }

    /// A stable, low-cardinality name for metrics and tracing: `retryable`, `overloaded`,
    /// `context_too_large` or `final`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Class::Retryable { .. } => "retryable",
            Class::Overloaded { .. } => "overloaded",
            Class::ContextTooLarge => "context_too_large",
            Class::Final => "final",
        }
    }
}

/// Why an attempt failed, as a low-cardinality label (metrics, tracing, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// 429 rate limit.
    RateLimited,
    /// 529 `overloaded_error` (status or stream event).
    Overloaded,
    /// 500, 502, 503 or another 5xx.
    ServerError,
    /// 504, or 408 from the upstream.
    UpstreamTimeout,
    /// 409 conflict.
    Conflict,
    /// No answer within the attempt's timeout.
    Timeout,
    /// The connection failed before an answer.
    Connect,
    /// The answer was cut off.
    Interrupted,
    /// A 2xx body that could not be read.
    InvalidResponse,
    /// The request does not fit this target's context (413 `request_too_large`, or a 400
    /// saying the prompt is too long).
    ContextTooLarge,
    /// The upstream said `x-should-retry: true` about a failure that is otherwise final.
    UpstreamAsked,
    /// 400: the request itself.
    BadRequest,
    /// 401: the caller's API key.
    Credentials,
    /// 403: the key lacks permission.
    Permission,
    /// 404: the model or endpoint does not exist.
    NotFound,
    /// 404 naming the model (`model: claude-...`): this target's model is retired or unknown
    /// to the key, so the next target may well answer. Not recorded on the breaker: it may
    /// be one key's access, and one tenant must not shut a model for every other.
    ModelNotFound,
    /// The account: a spend cap (429 `enforced_spend_limit_reached`) or billing (402). No
    /// model of the same account can answer.
    Account,
    /// A status no rule covers.
    UnexpectedStatus,
}

impl Reason {
    /// A stable, low-cardinality name for metrics and tracing.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::Overloaded => "overloaded",
            Reason::ServerError => "server_error",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::Conflict => "conflict",
            Reason::Timeout => "timeout",
            Reason::Connect => "connect",
            Reason::Interrupted => "interrupted",
            Reason::InvalidResponse => "invalid_response",
            Reason::ContextTooLarge => "context_too_large",
            Reason::UpstreamAsked => "upstream_asked",
            Reason::BadRequest => "bad_request",
            Reason::Credentials => "credentials",
            Reason::Permission => "permission",
            Reason::NotFound => "not_found",
            Reason::ModelNotFound => "model_not_found",
            Reason::Account => "account",
            Reason::UnexpectedStatus => "unexpected_status",
        }
    }
}

/// A failure's meaning: how to route it, why, and what to record on the target's breaker
/// ([`CallOutcome::Failure`] when it says something about the target's health,
/// [`CallOutcome::Ignored`] when it does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// How to route it.
    pub class: Class,
    /// Why.
    pub reason: Reason,
    /// What to record on the target's breaker.
    pub health: CallOutcome,
}

impl Classification {
    /// `class` for `reason`, recorded on the breaker as [`Class::outcome`] says.
    pub fn new(class: Class, reason: Reason) -> Self {
        Classification {
            class,
            reason,
            health: class.outcome(),
        }
    }

    /// Retryable on the same target.
    pub fn retryable(reason: Reason, retry_after: Option<Duration>) -> Self {
        Self::new(Class::Retryable { retry_after }, reason)
    }

    /// Overloaded or rate limited: the next target at once.
    pub fn overloaded(reason: Reason, retry_after: Option<Duration>) -> Self {
        Self::new(Class::Overloaded { retry_after }, reason)
    }

    /// Final: the chain ends.
    pub fn final_(reason: Reason) -> Self {
        Self::new(Class::Final, reason)
    }

    /// The same, recorded on the breaker as `health`.
    pub fn with_health(mut self, health: CallOutcome) -> Self {
        self.health = health;
        self
    }
}

/// What the guarded call needs from a classifier's answer: how to route the failure, and
/// what the target's breaker records. A bare [`Class`] records [`Class::outcome`]; a
/// [`Classification`] records its own `health` (a 409: retryable, yet not the target's fault;
/// an unexpected 3xx: final, yet the target's).
pub trait Classified {
    /// How to route the failure.
    fn class(&self) -> Class;
    /// What the target's breaker records.
    fn health(&self) -> CallOutcome {
        self.class().outcome()
    }
}

impl Classified for Class {
    fn class(&self) -> Class {
        *self
    }
}

impl Classified for Classification {
    fn class(&self) -> Class {
        self.class
    }

    fn health(&self) -> CallOutcome {
        self.health
    }
}

/// Turns a [`Failure`] into a [`Classification`]. Implement it to change the policy; delegate
/// to [`AnthropicPolicy`] for what you do not change.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The meaning of one failure.
    fn classify(&self, failure: &Failure<'_>) -> Classification;
}

/// The Anthropic Messages API's policy (the table in the [module docs](self)), with per-status
/// overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnthropicPolicy {
    overrides: BTreeMap<u16, Classification>,
    ignore_should_retry: bool,
}

/// The `error.details.error_code` of a spend-cap 429.
pub const SPEND_LIMIT_CODE: &str = "enforced_spend_limit_reached";

impl AnthropicPolicy {
    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Classifies every failure with HTTP status `status` as `classification` (the status's
    /// `retry-after` is kept when the override is retryable without one of its own).
    pub fn with_status(mut self, status: u16, classification: Classification) -> Self {
        self.overrides.insert(status, classification);
        self
    }

    /// Whether `x-should-retry` is obeyed (default: yes).
    pub fn obey_should_retry(mut self, obey: bool) -> Self {
        self.ignore_should_retry = !obey;
        self
    }

    fn status(&self, f: &StatusFailure<'_>) -> Classification {
        if let Some(c) = self.overrides.get(&f.status) {
            let mut c = *c;
            if let Class::Retryable { retry_after } | Class::Overloaded { retry_after } =
                &mut c.class
            {
                *retry_after = retry_after.or(f.retry_after);
            }
            return c;
        }
        let retryable = |reason| Classification::retryable(reason, f.retry_after);
        let overloaded = |reason| Classification::overloaded(reason, f.retry_after);
        match f.status {
            429 if f.error_code == Some(SPEND_LIMIT_CODE) => {
                Classification::final_(Reason::Account)
            }
            _ if f.error_type == Some("overloaded_error") => overloaded(Reason::Overloaded),
            408 => retryable(Reason::UpstreamTimeout),
            409 => retryable(Reason::Conflict).with_health(CallOutcome::Ignored),
            429 => overloaded(Reason::RateLimited),
            529 => overloaded(Reason::Overloaded),
            504 => retryable(Reason::UpstreamTimeout),
            500..=599 => retryable(Reason::ServerError),
            413 => Classification::new(Class::ContextTooLarge, Reason::ContextTooLarge),
            400 if f.error_type == Some("request_too_large")
                || f.message.is_some_and(says_context_too_large) =>
            {
                Classification::new(Class::ContextTooLarge, Reason::ContextTooLarge)
            }
            400 => Classification::final_(Reason::BadRequest),
            401 => Classification::final_(Reason::Credentials),
            402 => Classification::final_(Reason::Account),
            403 => Classification::final_(Reason::Permission),
            // The API's answer for a model it does not serve (a retired one, say):
            // `{"type":"not_found_error","message":"model: claude-..."}`. That is the target's
            // model, not the request: another model of the chain can answer.
            // Not recorded on the breaker: the same 404 is the answer for a model one key may
            // not use, and a breaker is shared by every caller (adversarial review: three
            // requests with a restricted key opened the model for everyone).
            404 if f.message.is_some_and(names_the_model) => {
                Classification::overloaded(Reason::ModelNotFound, None)
                    .with_health(CallOutcome::Ignored)
            }
            404 => Classification::final_(Reason::NotFound),
            _ => Classification::final_(Reason::UnexpectedStatus).with_health(CallOutcome::Failure),
        }
    }
}

/// Whether a 404's message is the API's "no such model" (`model: claude-sonnet-9`).
fn names_the_model(message: &str) -> bool {
    message
        .trim_start()
        .get(..6)
        .is_some_and(|head| head.eq_ignore_ascii_case("model:"))
}

/// Whether an error message says the prompt does not fit the model's context window
/// (Anthropic: "prompt is too long: 215000 tokens > 200000 maximum", "input length and
/// `max_tokens` exceed context limit").
fn says_context_too_large(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("prompt is too long")
        || m.contains("context window")
        || m.contains("context limit")
        || m.contains("context length")
}

/// The HTTP status the API gives an error of type `error_type` (for `error` events inside a
/// stream, which carry a type but no status). Unknown types map to 500.
pub fn status_of_error_type(error_type: &str) -> u16 {
    match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "conflict_error" => 409,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

impl Policy for AnthropicPolicy {
    fn classify(&self, failure: &Failure<'_>) -> Classification {
        match failure {
            Failure::Status(f) => {
                let c = self.status(f);
                if self.ignore_should_retry {
                    return c;
                }
                match (f.should_retry, c.class) {
                    (Some(true), Class::Final | Class::ContextTooLarge) => Classification {
                        class: Class::Retryable {
                            retry_after: f.retry_after,
                        },
                        reason: Reason::UpstreamAsked,
                        health: c.health,
                    },
                    (Some(false), Class::Retryable { retry_after }) => Classification {
                        class: Class::Overloaded { retry_after },
                        ..c
                    },
                    _ => c,
                }
            }
            Failure::StreamError { error_type } => self.status(
                &StatusFailure::new(status_of_error_type(error_type)).error_type(Some(error_type)),
            ),
            Failure::Connect => Classification::retryable(Reason::Connect, None),
            Failure::Timeout => Classification::retryable(Reason::Timeout, None),
            Failure::Interrupted => Classification::retryable(Reason::Interrupted, None),
            Failure::InvalidResponse => Classification::retryable(Reason::InvalidResponse, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Classification {
        AnthropicPolicy::new().classify(&Failure::Status(StatusFailure::new(s)))
    }

    const SECS: Option<Duration> = Some(Duration::from_secs(7));

    #[test]
    fn server_errors_are_retryable_failures_of_the_target() {
        for s in [408, 500, 502, 503, 504, 599] {
            let c = status(s);
            assert_eq!(c.class, Class::Retryable { retry_after: None }, "{s}");
            assert_eq!(c.health, CallOutcome::Failure, "{s}");
        }
        assert_eq!(status(504).reason, Reason::UpstreamTimeout);
    }

    #[test]
    fn overload_and_rate_limits_go_to_the_next_target_with_their_retry_after() {
        let c = AnthropicPolicy::new().classify(&Failure::Status(
            StatusFailure::new(429)
                .error_type(Some("rate_limit_error"))
                .retry_after(SECS),
        ));
        assert_eq!(c, Classification::overloaded(Reason::RateLimited, SECS));
        assert_eq!(c.class.retry_after(), SECS);
        assert_eq!(c.health, CallOutcome::Failure);
        assert_eq!(
            status(529),
            Classification::overloaded(Reason::Overloaded, None)
        );
        assert_eq!(c.class.as_str(), "overloaded");
    }

    #[test]
    fn the_spend_cap_is_final_and_the_accounts_fault() {
        let c = AnthropicPolicy::new().classify(&Failure::Status(
            StatusFailure::new(429)
                .error_type(Some("rate_limit_error"))
                .error_code(Some(SPEND_LIMIT_CODE)),
        ));
        assert_eq!(
            c,
            Classification {
                class: Class::Final,
                reason: Reason::Account,
                health: CallOutcome::Ignored
            }
        );
    }

    #[test]
    fn caller_errors_are_final_and_not_the_targets_fault() {
        for (s, reason) in [
            (400, Reason::BadRequest),
            (401, Reason::Credentials),
            (402, Reason::Account),
            (403, Reason::Permission),
            (404, Reason::NotFound),
        ] {
            let c = status(s);
            assert_eq!(c, Classification::final_(reason), "{s}");
            assert_eq!(c.health, CallOutcome::Ignored, "{s}");
        }
    }

    /// A model the API does not serve (retired, as `claude-sonnet-4-5` is from 2026-11-30, or
    /// unknown to the key) moves the chain to its next target, and is not recorded on the
    /// target's breaker (it may be one key's access); a 404 that does not name the model (a wrong path) stays final.
    /// Seen before: a retired primary ended every request with its 404 and the fallback was
    /// never tried.
    #[test]
    fn a_model_the_api_does_not_serve_moves_to_the_next_target() {
        for message in ["model: claude-sonnet-4-5", "  Model: x"] {
            let c = AnthropicPolicy::new().classify(&Failure::Status(
                StatusFailure::new(404)
                    .error_type(Some("not_found_error"))
                    .message(Some(message)),
            ));
            assert_eq!(
                c,
                Classification::overloaded(Reason::ModelNotFound, None)
                    .with_health(CallOutcome::Ignored),
                "{message}"
            );
            assert_eq!(
                c.health,
                CallOutcome::Ignored,
                "one key's access opens nothing"
            );
        }
        for message in [
            None,
            Some("Not Found"),
            Some("the model is fine"),
            Some("mod"),
        ] {
            let c = AnthropicPolicy::new().classify(&Failure::Status(
                StatusFailure::new(404)
                    .error_type(Some("not_found_error"))
                    .message(message),
            ));
            assert_eq!(c, Classification::final_(Reason::NotFound), "{message:?}");
        }
        let event = AnthropicPolicy::new().classify(&Failure::StreamError {
            error_type: "not_found_error",
        });
        assert_eq!(event, Classification::final_(Reason::NotFound));
    }

    #[test]
    fn too_large_goes_to_a_larger_target() {
        let too_large = Classification::new(Class::ContextTooLarge, Reason::ContextTooLarge);
        assert_eq!(status(413), too_large);
        assert_eq!(too_large.health, CallOutcome::Ignored);
        let c = AnthropicPolicy::new().classify(&Failure::Status(
            StatusFailure::new(400)
                .error_type(Some("invalid_request_error"))
                .message(Some("prompt is too long: 215000 tokens > 200000 maximum")),
        ));
        assert_eq!(c, too_large);
        let c = AnthropicPolicy::new().classify(&Failure::Status(
            StatusFailure::new(400)
                .error_type(Some("invalid_request_error"))
                .message(Some("messages: at least one message is required")),
        ));
        assert_eq!(c, Classification::final_(Reason::BadRequest));
    }

    #[test]
    fn should_retry_changes_the_route_not_the_health() {
        let p = AnthropicPolicy::new();
        let c = p.classify(&Failure::Status(
            StatusFailure::new(400).should_retry(Some(true)),
        ));
        assert_eq!(c.class, Class::Retryable { retry_after: None });
        assert_eq!(c.reason, Reason::UpstreamAsked);
        assert_eq!(c.health, CallOutcome::Ignored);
        let c = p.classify(&Failure::Status(
            StatusFailure::new(503)
                .should_retry(Some(false))
                .retry_after(SECS),
        ));
        assert_eq!(c.class, Class::Overloaded { retry_after: SECS });
        assert_eq!(c.health, CallOutcome::Failure);
        let c = p
            .clone()
            .obey_should_retry(false)
            .classify(&Failure::Status(
                StatusFailure::new(503).should_retry(Some(false)),
            ));
        assert_eq!(c.class, Class::Retryable { retry_after: None });
    }

    #[test]
    fn transport_failures_are_retryable_failures() {
        let p = AnthropicPolicy::new();
        for (f, r) in [
            (Failure::Connect, Reason::Connect),
            (Failure::Timeout, Reason::Timeout),
            (Failure::Interrupted, Reason::Interrupted),
            (Failure::InvalidResponse, Reason::InvalidResponse),
        ] {
            assert_eq!(p.classify(&f), Classification::retryable(r, None));
        }
    }

    #[test]
    fn stream_errors_classify_as_their_status() {
        let p = AnthropicPolicy::new();
        let c = p.classify(&Failure::StreamError {
            error_type: "overloaded_error",
        });
        assert_eq!(c, Classification::overloaded(Reason::Overloaded, None));
        let c = p.classify(&Failure::StreamError {
            error_type: "invalid_request_error",
        });
        assert_eq!(c, Classification::final_(Reason::BadRequest));
        let c = p.classify(&Failure::StreamError {
            error_type: "brand_new_error",
        });
        assert_eq!(c, Classification::retryable(Reason::ServerError, None));
    }

    #[test]
    fn overrides_replace_one_status_and_keep_retry_after() {
        let p = AnthropicPolicy::new()
            .with_status(
                429,
                Classification::overloaded(Reason::RateLimited, None)
                    .with_health(CallOutcome::Ignored),
            )
            .with_status(409, Classification::final_(Reason::Conflict));
        let c = p.classify(&Failure::Status(StatusFailure::new(429).retry_after(SECS)));
        assert_eq!(c.class.retry_after(), SECS);
        assert_eq!(c.health, CallOutcome::Ignored);
        let c = p.classify(&Failure::Status(StatusFailure::new(409)));
        assert_eq!(c.class, Class::Final);
        assert_eq!(
            status(409),
            Classification::retryable(Reason::Conflict, None).with_health(CallOutcome::Ignored)
        );
    }

    #[test]
    fn unknown_statuses_never_panic_and_have_a_class() {
        for s in 0..=1000u16 {
            let c = status(s);
            let _ = (c.class.as_str(), c.reason.as_str(), c.health);
        }
        assert_eq!(
            status(302),
            Classification::final_(Reason::UnexpectedStatus).with_health(CallOutcome::Failure)
        );
    }
}
