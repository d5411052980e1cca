//! The operations endpoints, merged into [`super::app`]:
//!
//! * `GET /healthz`: the process is up and serving (always 200, no store read): for a
//!   liveness probe, which should restart a replica only when it is wedged.
//! * `GET /readyz`: whether the replica can serve, and on which store. 200 with
//!   `"store": "shared"` (Redis answered), `"embedded"` (no `[redis]`), or `"local"`
//!   (`"status": "degraded"`: Redis is unreachable and the replica decides alone, its limits
//!   divided by the fleet size). Local mode is still a 200 on purpose: every replica loses
//!   Redis at the same moment, and a load balancer that pulled them all out would turn a
//!   degraded fleet into an outage; alert on `fusebox_store_mode{mode="local"}` instead.
//!   `GET /readyz?strict` answers 503 in local mode, for setups that would rather drain. The
//!   store check waits at most 500 ms (a stalled Redis counts as local mode), so that the
//!   probe answers within the usual probe timeouts.
//! * `GET /metrics`: Prometheus text ([`super::prom`]).
//! * `/admin/...`: the admin API, behind the bearer token (see the README, "Operate the proxy").

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::ProxyState;
use crate::Source;

/// The operations routes (health, readiness, metrics, admin), to merge into the proxy's
/// router before its state is given.
pub fn router() -> Router<ProxyState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(super::prom::metrics))
        .merge(super::admin::router())
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Longest wait for the store in `/readyz` (and before the gauges of `/metrics`), below the
/// usual probe timeouts (Kubernetes: 1 s): a stalled Redis must not make the probe itself time
/// out, which a load balancer would read as "not ready" for every replica at once.
const READY_CHECK_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// What `/readyz` found: the store the replica decides on, and why not the shared one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Readiness {
    /// `shared`, `local` or `embedded`.
    pub(super) store: &'static str,
    /// Why the replica is in local mode.
    pub(super) reason: Option<String>,
    /// Whether the store answered the check (the embedded store always does).
    pub(super) answered: bool,
}

/// Asks the shared store (over the operator's connection, bounded by
/// `redis.operator_timeout`) and the replica's own health: local mode when either says so.
pub(super) async fn readiness(state: &ProxyState) -> Readiness {
    let c = state.coordinator();
    let Ok(checked) = tokio::time::timeout(READY_CHECK_MAX, c.check_store()).await else {
        return Readiness {
            store: "local",
            reason: Some(format!(
                "the shared store did not answer within {} ms",
                READY_CHECK_MAX.as_millis()
            )),
            answered: false,
        };
    };
    match checked {
        Ok(r) if r.source == Source::Embedded => Readiness {
            store: "embedded",
            reason: None,
            answered: true,
        },
        Ok(_) if c.is_degraded() => Readiness {
            store: "local",
            reason: Some(
                "Redis answers again; this replica returns to it at its next health check"
                    .to_owned(),
            ),
            answered: true,
        },
        Ok(_) => Readiness {
            store: "shared",
            reason: None,
            answered: true,
        },
        Err(e) => Readiness {
            store: "local",
            reason: Some(format!("the shared store cannot be reached: {e}")),
            answered: false,
        },
    }
}

async fn readyz(State(state): State<ProxyState>, uri: Uri) -> Response {
    let strict = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "strict" || p == "strict=true"));
    let r = readiness(&state).await;
    let local = r.store == "local";
    let status = if local && strict {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut body = json!({
        "status": if local { "degraded" } else { "ready" },
        "store": r.store,
    });
    if let Some(reason) = r.reason {
        body["reason"] = json!(reason);
    }
    (status, Json(body)).into_response()
}
