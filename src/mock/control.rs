//! The run-time control API under `/_mock/`, on the fake upstream's own port.
//!
//! The routes are listed in the module documentation of [`crate::mock`].
//!
//! `POST` works wherever `PUT` does. Errors are `{"error": "<message naming the field>"}`
//! with status 400 (or 409 in the fixed-response mode, which has no plans).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

use super::spec::PlanSpec;
use super::state::Shared;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/_mock/stats", get(stats))
        .route(
            "/_mock/models/{model}",
            put(set_model).post(set_model).delete(unset_model),
        )
        .route("/_mock/default", put(set_default).post(set_default))
        .route("/_mock/reset", post(reset))
        .route("/_mock/reset_counts", post(reset_counts))
}

fn reply(status: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn refuse(status: StatusCode, message: &str) -> Response {
    reply(status, &json!({ "error": message }))
}

async fn stats(State(shared): State<Shared>) -> Response {
    let models = shared.stats();
    reply(
        StatusCode::OK,
        &json!({
            "total_requests": shared.total(),
            "fixed_response": shared.fixed.is_some(),
            "models": models,
        }),
    )
}

/// The plan in `body`, or the refusal to send (status and message).
fn parse(shared: &Shared, body: &[u8]) -> Result<(PlanSpec, super::Plan), (StatusCode, String)> {
    if shared.fixed.is_some() {
        return Err((
            StatusCode::CONFLICT,
            "the fixed-response mode answers every request the same; it has no plans".to_owned(),
        ));
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let spec: PlanSpec = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_slice(body),
    )
    .map_err(|e| {
        let at = e.path().to_string();
        let message = if at.is_empty() || at == "." || at == "?" {
            format!("plan: {}", e.inner())
        } else {
            format!("plan: {at}: {}", e.inner())
        };
        (StatusCode::BAD_REQUEST, message)
    })?;
    let plan = spec.to_plan().map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    Ok((spec, plan))
}

async fn set_model(
    State(shared): State<Shared>,
    Path(model): Path<String>,
    body: Bytes,
) -> Response {
    match parse(&shared, &body) {
        Ok((spec, plan)) => {
            shared.lock().plans.insert(model.clone(), plan);
            reply(StatusCode::OK, &json!({ "model": model, "plan": spec }))
        }
        Err((status, message)) => refuse(status, &message),
    }
}

async fn unset_model(State(shared): State<Shared>, Path(model): Path<String>) -> Response {
    let mut s = shared.lock();
    match s.start_plans.get(&model).cloned() {
        Some(plan) => {
            s.plans.insert(model.clone(), plan);
        }
        None => {
            s.plans.remove(&model);
        }
    }
    drop(s);
    reply(
        StatusCode::OK,
        &json!({ "model": model, "plan": "as at start" }),
    )
}

async fn set_default(State(shared): State<Shared>, body: Bytes) -> Response {
    match parse(&shared, &body) {
        Ok((spec, plan)) => {
            shared.lock().default = plan;
            reply(StatusCode::OK, &json!({ "default": spec }))
        }
        Err((status, message)) => refuse(status, &message),
    }
}

async fn reset(State(shared): State<Shared>) -> Response {
    shared.reset();
    reply(StatusCode::OK, &json!({ "reset": "plans and counts" }))
}

async fn reset_counts(State(shared): State<Shared>) -> Response {
    shared.reset_counts();
    reply(StatusCode::OK, &json!({ "reset": "counts" }))
}
