//! The admin API: the fleet's breakers, bulkheads, retry budgets and replicas, and forcing a
//! breaker, through the coordinator's operator methods (fleet-wide: Redis when configured,
//! never this replica's local state passed off as the fleet's).
//!
//! | Request | Answer |
//! |---|---|
//! | `GET /admin/breakers` | every configured and known target's breaker |
//! | `GET /admin/breakers/{target}` | one target's breaker (404 if neither configured nor known) |
//! | `POST /admin/breakers/{target}/{open,closed,disable,reset}` | force it (`?create=true`: a target with no state yet) |
//! | `GET /admin/bulkheads` | permits in use and limit per configured feature |
//! | `GET /admin/budgets` | retry budget per configured target |
//! | `GET /admin/replicas` | live replicas of the namespace |
//!
//! Every request to `/admin` and below needs `Authorization: Bearer <[server] admin_token>`,
//! compared in constant time (SHA-256 of both sides, then `subtle`'s `ct_eq`, so neither
//! the content nor the length of the token leaks through timing). Missing or wrong: 401
//! `authentication_error`. No token configured: the admin API is off, every request gets a
//! 403 `permission_error` saying so (not a 404: an operator who forgot the token should be
//! told, and a 403 says nothing an attacker could use). A store that cannot be read: 503
//! `api_error` with the cause.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ProxyState;
use crate::breaker::BreakerSnapshot;
use crate::{CircuitState, Error, Force, Source};

/// The admin routes.
pub(super) fn router() -> Router<ProxyState> {
    Router::new()
        .route("/admin/breakers", get(breakers))
        .route("/admin/breakers/{target}", get(breaker))
        .route("/admin/breakers/{target}/{action}", post(force))
        .route("/admin/bulkheads", get(bulkheads))
        .route("/admin/budgets", get(budgets))
        .route("/admin/replicas", get(replicas))
        .route("/admin", any(unknown))
        .route("/admin/{*rest}", any(unknown))
}

/// A request that carried the configured admin token.
pub(super) struct Admin;

impl FromRequestParts<ProxyState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ProxyState,
    ) -> Result<Self, Self::Rejection> {
        let Some(token) = state.server().admin_token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "fusebox: the admin API is off: no admin token is configured ([server] \
                 admin_token or FUSEBOX_ADMIN_TOKEN)"
                    .to_owned(),
            )
            .into_response());
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
            });
        match given {
            Some(g) if token_matches(g, token) => Ok(Admin),
            _ => {
                let mut resp = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "fusebox: the admin API needs `Authorization: Bearer <admin token>`; the \
                     token is missing or wrong"
                        .to_owned(),
                )
                .into_response();
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"fusebox admin\""),
                );
                Err(resp)
            }
        }
    }
}

/// Constant time in the content and the length of both: the digests are compared.
fn token_matches(given: &str, token: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(token.as_bytes());
    a.ct_eq(&b).into()
}

/// A library error as the admin API answers it.
fn admin_error(e: Error) -> ApiError {
    match e {
        Error::UnknownTarget(t) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "fusebox: unknown target {t:?}: neither configured nor known to the store \
                 (add ?create=true to force a target that has no state yet)"
            ),
        ),
        Error::UnknownFeature(f) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("fusebox: unknown feature {f:?}"),
        ),
        Error::Config { .. } => ApiError::invalid(format!("fusebox: {e}")),
        Error::Store(s) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            format!("fusebox: the shared store cannot be read: {s}"),
        ),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            format!("fusebox: {other}"),
        ),
    }
}

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Shared => "shared",
        Source::Local => "local",
        Source::Embedded => "embedded",
    }
}

fn breaker_json(target: &str, s: &BreakerSnapshot, now_ms: u64) -> Value {
    let left = |at: Option<u64>| at.filter(|t| *t > now_ms).map(|t| t - now_ms);
    json!({
        "target": target,
        "state": s.state.as_str(),
        "generation": s.generation,
        "half_open_in_ms": if s.state == CircuitState::Open { left(s.open_until_ms) } else { None },
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
    })
}

async fn breakers(_: Admin, State(state): State<ProxyState>) -> Result<Json<Value>, ApiError> {
    let c = state.coordinator();
    let configured = c.configured_names().targets;
    let known = c.known_names().await.map_err(admin_error)?;
    let mut all = known.value.targets;
    all.extend(configured.iter().cloned());
    let mut rows = Vec::new();
    let mut now = known.now_ms;
    for t in &all {
        let r = c.read_breaker(t).await.map_err(admin_error)?;
        now = r.now_ms;
        let mut v = breaker_json(t, &r.value, r.now_ms);
        v["configured"] = json!(configured.contains(t));
        rows.push(v);
    }
    Ok(Json(json!({
        "store": source_name(known.source),
        "now_ms": now,
        "breakers": rows,
    })))
}

async fn breaker(
    _: Admin,
    State(state): State<ProxyState>,
    Path(target): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = state.coordinator();
    let configured = c.configured_names().targets.contains(&target);
    if !configured {
        crate::config::check_name("target", &target).map_err(admin_error)?;
        let known = c.known_names().await.map_err(admin_error)?;
        if !known.value.targets.contains(&target) {
            return Err(admin_error(Error::UnknownTarget(target)));
        }
    }
    let r = c.read_breaker(&target).await.map_err(admin_error)?;
    let mut v = breaker_json(&target, &r.value, r.now_ms);
    v["configured"] = json!(configured);
    v["store"] = json!(source_name(r.source));
    v["now_ms"] = json!(r.now_ms);
    Ok(Json(v))
}

async fn force(
    _: Admin,
    State(state): State<ProxyState>,
    Path((target, action)): Path<(String, String)>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let cmd = match action.as_str() {
        "open" => Force::Open,
        "closed" => Force::Closed,
        "disable" => Force::Disable,
        "reset" => Force::Reset,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("fusebox: unknown action {action:?}: use open, closed, disable or reset"),
            ))
        }
    };
    let create = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "create=true" || p == "create"));
    let c = state.coordinator();
    let done = if create {
        c.force_create(&target, cmd).await
    } else {
        c.force(&target, cmd).await
    }
    .map_err(admin_error)?;
    tracing::info!(target = %target, action = %action, changed = done.is_some(), "admin: breaker forced");
    let r = c.read_breaker(&target).await.map_err(admin_error)?;
    let mut v = json!({
        "target": target,
        "action": action,
        "changed": done.is_some(),
        "state": r.value.state.as_str(),
        "store": source_name(c.operator_source()),
    });
    if let Some(tr) = done {
        v["from"] = json!(tr.from.as_str());
        v["to"] = json!(tr.to.as_str());
        v["generation"] = json!(tr.generation);
    }
    Ok(Json(v))
}

async fn bulkheads(_: Admin, State(state): State<ProxyState>) -> Result<Json<Value>, ApiError> {
    let c = state.coordinator();
    let mut rows = Vec::new();
    for f in &c.configured_names().features {
        let r = c.read_in_flight(f).await.map_err(admin_error)?;
        rows.push(json!({
            "feature": f,
            "in_flight": r.value,
            "limit": c.bulkhead_limit(f).map_err(admin_error)?,
        }));
    }
    Ok(Json(json!({
        "store": source_name(c.operator_source()),
        "bulkheads": rows,
    })))
}

async fn budgets(_: Admin, State(state): State<ProxyState>) -> Result<Json<Value>, ApiError> {
    let c = state.coordinator();
    let mut rows = Vec::new();
    for t in &c.configured_names().targets {
        let row = match c.read_retry_budget(t).await.map_err(admin_error)? {
            None => json!({"target": t, "enabled": false}),
            Some(r) => json!({
                "target": t,
                "enabled": true,
                "requests": r.value.requests,
                "retries": r.value.retries,
                "allowed": r.value.allowed,
                "available": r.value.available(),
                "window_ms": r.value.window.as_millis() as u64,
            }),
        };
        rows.push(row);
    }
    Ok(Json(json!({
        "store": source_name(c.operator_source()),
        "budgets": rows,
    })))
}

async fn replicas(_: Admin, State(state): State<ProxyState>) -> Result<Json<Value>, ApiError> {
    let c = state.coordinator();
    let members = c.replicas().await.map_err(admin_error)?;
    Ok(Json(json!({
        "store": source_name(c.operator_source()),
        "live_replicas": members.len(),
        "replicas": members.iter().map(|m| json!({
            "id": m.id,
            "this": m.this,
            "expires_in_ms": m.expires_in.as_millis() as u64,
        })).collect::<Vec<_>>(),
    })))
}

/// Any other path under `/admin`: the token first, then a 404.
async fn unknown(_: Admin, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("fusebox: no admin endpoint at {}", uri.path()),
    )
}
