//! The proxy's own errors, in the Messages API's error shape:
//! `{"type":"error","error":{"type":...,"message":...}}` with the matching status, and
//! `retry-after` on every refusal. Upstream errors that end the chain are rebuilt from what
//! the upstream said (status, `error.type`, message with any API key masked, `details`'
//! `error_code`, `request_id`).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::{CallError, Error, Rejection, UpstreamError, UpstreamErrorKind};

/// An error answer: status, `error.type`, message, and the headers that go with it.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) error_type: &'static str,
    pub(crate) message: String,
    /// `retry-after`, whole seconds rounded up (at least 1).
    pub(crate) retry_after: Option<Duration>,
    /// `x-should-retry: false`: the proxy's retry policy already decided (or it refused on
    /// purpose).
    pub(crate) no_retry: bool,
    /// What the upstream said, for an upstream error.
    pub(crate) echo: Option<Box<Echo>>,
}

/// What an upstream error said that the proxy repeats.
#[derive(Debug, Default)]
pub(crate) struct Echo {
    /// Its `error.type`.
    pub(crate) error_type: Option<String>,
    /// `error.details.error_code`.
    pub(crate) error_code: Option<String>,
    /// Its request id.
    pub(crate) request_id: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error_type: &'static str, message: String) -> Self {
        ApiError {
            status,
            error_type,
            message,
            retry_after: None,
            no_retry: false,
            echo: None,
        }
    }

    /// A 400 `invalid_request_error`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        )
    }

    /// The error body, as JSON bytes.
    pub(crate) fn body(&self) -> Bytes {
        let echo = self.echo.as_deref();
        let mut error = serde_json::json!({
            "type": echo.and_then(|e| e.error_type.as_deref()).unwrap_or(self.error_type),
            "message": self.message,
        });
        if let Some(code) = echo.and_then(|e| e.error_code.as_ref()) {
            error["details"] = serde_json::json!({ "error_code": code });
        }
        let mut body = serde_json::json!({"type": "error", "error": error});
        if let Some(id) = echo.and_then(|e| e.request_id.as_ref()) {
            body["request_id"] = serde_json::Value::String(id.clone());
        }
        Bytes::from(body.to_string())
    }

    /// How a guarded call that gave no answer is told to the client.
    ///
    /// An error that ends the chain says `x-should-retry: false` however many attempts were
    /// made: the proxy's policy decided (an overloaded model is not retried on itself, a
    /// retryable one was retried within the fleet's retry budget), and an SDK retrying on
    /// top (twice by default) would triple the calls that reach an upstream already failing,
    /// outside that budget. Seen before this: a one-model chain's 529 went back without it,
    /// and the official SDK sent 3 requests (fleet lane, `tests/sdk.rs`).
    pub(crate) fn of_call(e: CallError<UpstreamError>) -> Self {
        match e {
            CallError::Inner(u) => ApiError::of_upstream(&u, true),
            CallError::Rejected(r) => {
                let mut a = ApiError::of_rejection(&r);
                // A chain moves past a target its breaker refuses: such a refusal here
                // means every model of the chain was refused (this one reopens first).
                if matches!(
                    r,
                    Rejection::CircuitOpen { .. } | Rejection::NotBefore { .. }
                ) {
                    a.message = format!(
                        "fusebox: every model of the chain is unavailable; the first to \
                         reopen: {r}"
                    );
                }
                a
            }
            CallError::RetryLater { retry_after } => {
                let mut a = ApiError::new(
                    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "overloaded_error",
                    "fusebox: the feature's preferred models are unavailable and its chain \
                     stops before weaker ones; try again later"
                        .to_owned(),
                );
                a.retry_after = Some(retry_after.unwrap_or(Duration::from_secs(1)));
                a.no_retry = true;
                a
            }
            CallError::TimedOut => {
                let mut a = ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    "fusebox: no answer within the feature's deadline".to_owned(),
                );
                a.no_retry = true;
                a
            }
            CallError::Fusebox(e) => ApiError::of_fusebox(&e),
        }
    }

    /// A fusebox error (configuration, store) as the client sees it.
    pub(crate) fn of_fusebox(e: &Error) -> Self {
        match e {
            Error::UnknownFeature(f) => ApiError::invalid(format!(
                "fusebox: unknown feature {f:?}: not under [features] in the proxy's \
                 configuration"
            )),
            Error::Rejected(r) => ApiError::of_rejection(r),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                format!("fusebox: {other}"),
            ),
        }
    }

    /// A refusal: 429 for the feature's own limits, 529 when every model is shut, 503 when
    /// the store is down for a fail-closed feature; always with `retry-after`.
    pub(crate) fn of_rejection(r: &Rejection) -> Self {
        let (status, error_type) = match r {
            Rejection::BulkheadFull { .. } | Rejection::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            Rejection::StoreUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "api_error"),
            _ => (
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "overloaded_error",
            ),
        };
        let mut a = ApiError::new(status, error_type, format!("fusebox: {r}"));
        a.retry_after = Some(match r {
            // The bulkhead's own hint is when the earliest held permit's lease ends: only the
            // worst case (a holder that crashed), while calls usually end far sooner. A client
            // honouring it waited 30 s for a slot that came back in 1.5 s (new-user review).
            Rejection::BulkheadFull { .. } => Duration::from_secs(1),
            _ => r.retry_after().unwrap_or(Duration::from_secs(1)),
        });
        // The refusal is the answer, made at once: an SDK retrying it would sleep out
        // `retry-after` (an open breaker's whole open period: 30 s of the official SDK
        // blocked per call, seen by the new-user review) and ask again. The caller has the
        // `retry-after` to decide with.
        a.no_retry = true;
        a
    }

    /// An upstream failure as the upstream said it. `decided`: it ended a chain, whose retry
    /// policy already ran (`x-should-retry: false`); `false` for a plain pass-through
    /// (`count_tokens`), which a client may retry.
    pub(crate) fn of_upstream(u: &UpstreamError, decided: bool) -> Self {
        let mut a = match (u.kind, u.status) {
            (UpstreamErrorKind::Status, Some(s)) => {
                let status = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut a = ApiError::new(status, known_type(s), u.message.clone());
                a.retry_after = u.retry_after;
                a
            }
            (UpstreamErrorKind::StreamError, _) => {
                let t = u.error_type.as_deref().unwrap_or("api_error");
                let s = crate::classify::status_of_error_type(t);
                let status = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY);
                ApiError::new(status, known_type(s), u.message.clone())
            }
            (UpstreamErrorKind::Timeout, _) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                format!("fusebox: upstream timed out: {}", u.message),
            ),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "api_error",
                format!(
                    "fusebox: upstream failed ({}): {}",
                    u.kind.as_str(),
                    u.message
                ),
            ),
        };
        a.echo = Some(Box::new(Echo {
            error_type: u.error_type.clone(),
            error_code: u.error_code.clone(),
            request_id: u.request_id.clone(),
        }));
        a.no_retry = decided;
        a
    }
}

/// The API's `error.type` for a status.
fn known_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// Whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(d) = self.retry_after {
            h.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(d)),
            );
        }
        if self.no_retry {
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Some(id) = self.echo.as_ref().and_then(|e| e.request_id.as_deref()) {
            if let Ok(v) = HeaderValue::from_str(id) {
                h.insert("request-id", v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CircuitState;

    #[test]
    fn every_refusal_has_its_status_type_and_a_retry_after() {
        let s = |d| Some(Duration::from_millis(d));
        let cases = [
            (
                Rejection::BulkheadFull {
                    feature: "f".into(),
                    limit: 1,
                    retry_after: None,
                },
                429,
                "rate_limit_error",
                1,
            ),
            (
                Rejection::RateLimited {
                    feature: "f".into(),
                    retry_after: Duration::from_millis(2500),
                },
                429,
                "rate_limit_error",
                3,
            ),
            (
                Rejection::CircuitOpen {
                    target: "t".into(),
                    state: CircuitState::Open,
                    retry_after: s(12_000),
                },
                529,
                "overloaded_error",
                12,
            ),
            (
                Rejection::NotBefore {
                    target: "t".into(),
                    retry_after: Duration::from_millis(1),
                },
                529,
                "overloaded_error",
                1,
            ),
            (
                Rejection::StoreUnavailable {
                    feature: "f".into(),
                },
                503,
                "api_error",
                1,
            ),
        ];
        for (r, status, error_type, secs) in cases {
            let e = ApiError::of_rejection(&r);
            assert_eq!(e.status.as_u16(), status, "{r:?}");
            assert_eq!(e.error_type, error_type, "{r:?}");
            let resp = e.into_response();
            let after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok());
            assert_eq!(after, Some(secs.to_string().as_str()), "{r:?}");
            assert_eq!(
                resp.headers()
                    .get("x-should-retry")
                    .and_then(|v| v.to_str().ok()),
                Some("false"),
                "{r:?}: an SDK would sleep out retry-after and ask again"
            );
        }
    }

    #[test]
    fn an_upstream_error_keeps_what_the_upstream_said() {
        let mut u = UpstreamError::new(UpstreamErrorKind::Status, "spend cap".to_owned());
        u.status = Some(429);
        u.error_type = Some("rate_limit_error".into());
        u.error_code = Some("enforced_spend_limit_reached".into());
        u.request_id = Some("req_1".into());
        let e = ApiError::of_upstream(&u, true);
        assert_eq!(e.status.as_u16(), 429);
        assert!(e.no_retry, "the chain's policy decided");
        let body: serde_json::Value = serde_json::from_slice(&e.body()).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"type": "error", "request_id": "req_1", "error": {
                "type": "rate_limit_error", "message": "spend cap",
                "details": {"error_code": "enforced_spend_limit_reached"}}})
        );
        assert!(!ApiError::of_upstream(&u, false).no_retry, "a pass-through");
        let t = UpstreamError::new(UpstreamErrorKind::Timeout, "slow".to_owned());
        assert_eq!(ApiError::of_upstream(&t, true).status.as_u16(), 504);
        let c = UpstreamError::new(UpstreamErrorKind::Connect, "refused".to_owned());
        assert_eq!(ApiError::of_upstream(&c, true).status.as_u16(), 502);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
