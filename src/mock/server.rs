//! The fake upstream's HTTP side: `POST /v1/messages` (and the `/_mock/` control API).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use serde_json::Value;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::reply::{error_body, event, Asked, ErrorReply, HANG};
use super::state::{Fixed, InFlight, Shared};
use super::{control, Reply, Seen};

pub(super) fn app(shared: Shared) -> Router {
    let control = control::routes()
        .route("/v1/messages/count_tokens", post(count_tokens))
        .with_state(shared.clone());
    match shared.fixed.clone() {
        Some(fixed) => Router::new()
            .route("/v1/messages", post(fixed_answer))
            .with_state(fixed)
            .merge(control),
        None => Router::new()
            .route("/v1/messages", post(messages))
            .with_state(shared)
            .merge(control),
    }
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, N a rough count (a token per four
/// bytes of the text in `system` and `messages`, at least 1), the way the API answers; a body
/// that is not a JSON object with `model` and `messages` is a 400 `invalid_request_error`.
/// Never subject to plans (counting says nothing about a model's health).
async fn count_tokens(body: Bytes) -> Response {
    fn text_bytes(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(text_bytes).sum(),
            Value::Object(fields) => fields.values().map(text_bytes).sum(),
            _ => 0,
        }
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let (status, answer) = match parsed.as_ref().and_then(Value::as_object) {
        Some(req)
            if req.get("model").is_some_and(Value::is_string)
                && req.get("messages").is_some_and(Value::is_array) =>
        {
            let bytes =
                req.get("system").map_or(0, text_bytes) + req.get("messages").map_or(0, text_bytes);
            (
                StatusCode::OK,
                serde_json::json!({"input_tokens": (bytes / 4).max(1)}),
            )
        }
        _ => (
            StatusCode::BAD_REQUEST,
            error_body(
                "invalid_request_error",
                "count_tokens: the body must be a JSON object with `model` and `messages`",
                None,
                "req_mock_count_tokens",
            ),
        ),
    };
    let mut resp = Response::new(Body::from(answer.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

/// The fixed-response mode's hot path: no parsing, no lock, no draw; one relaxed count.
async fn fixed_answer(State(fixed): State<Arc<Fixed>>, _body: Bytes) -> Response {
    fixed.requests.fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::new(Body::from(fixed.body.clone()));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert("request-id", HeaderValue::from_static("req_mock_fixed"));
    resp
}

/// A response body that holds the request's [`InFlight`] guard until it is sent in full or
/// dropped (the client went away).
struct Guarded {
    inner: Body,
    _in_flight: InFlight,
}

impl axum::body::HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn messages(state: State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (resp, in_flight) = answer(state, headers, body).await;
    let (parts, inner) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(Guarded {
            inner,
            _in_flight: in_flight,
        }),
    )
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn answer(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (Response, InFlight) {
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let asked = parsed.as_ref().map(Asked::from_body);
    let seen = Seen {
        model: asked.as_ref().map(|a| a.model.clone()).unwrap_or_default(),
        api_key: header(&headers, "x-api-key"),
        version: header(&headers, "anthropic-version"),
        beta: header(&headers, "anthropic-beta"),
        stream: asked.as_ref().is_some_and(|a| a.stream),
        body: parsed.clone().unwrap_or(Value::Null),
    };
    let decision = shared.decide(seen);
    let in_flight = decision.in_flight;
    let resp = respond(
        asked,
        decision.reply,
        decision.latency,
        &decision.id,
        decision.text,
    )
    .await;
    (resp, in_flight)
}

async fn respond(
    asked: Option<Asked>,
    reply: Reply,
    latency: std::time::Duration,
    id: &str,
    text: Option<String>,
) -> Response {
    let request_id = id.replace("msg_", "req_");
    let Some(mut asked) = asked.filter(|a| !a.model.is_empty()) else {
        return error(
            &ErrorReply {
                status: 400,
                error_type: "invalid_request_error".to_owned(),
                message: "mock: the body is not a Messages request".to_owned(),
                details: None,
                retry_after: None,
                retry_after_ms: None,
                should_retry: None,
            },
            &request_id,
        );
    };
    asked.answer = text;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let id = id.to_owned();
    match reply {
        Reply::Answer if asked.stream => sse(&request_id, chunks(asked.events(&id))),
        Reply::Answer => json(StatusCode::OK, &request_id, asked.message(&id).to_string()),
        // A 404 plan answers as the API does for a model it does not serve (retired, or
        // unknown to the key): `not_found_error`, "model: <the model asked for>".
        Reply::Error(mut e) if e.status == 404 && e.message == Reply::status(404).message() => {
            e.message = format!("model: {}", asked.model);
            error(&e, &request_id)
        }
        Reply::Error(e) => error(&e, &request_id),
        Reply::ErrorAfterStart { error_type } if asked.stream => {
            let mut events = vec![asked.message_start(&id)];
            events.push(event("ping", &serde_json::json!({"type": "ping"})));
            events.push(event(
                "error",
                &error_body(&error_type, "mock error after the 200", None, &request_id),
            ));
            sse(&request_id, chunks(events))
        }
        Reply::ErrorAfterStart { error_type } => {
            let status = crate::classify::status_of_error_type(&error_type);
            let mut e = match Reply::status(status) {
                Reply::Error(e) => e,
                _ => return plain(StatusCode::INTERNAL_SERVER_ERROR, "mock"),
            };
            e.error_type = error_type;
            error(&e, &request_id)
        }
        Reply::DropMidBody => {
            let whole = if asked.stream {
                asked.events(&id).concat()
            } else {
                asked.message(&id).to_string().into_bytes()
            };
            let half = Bytes::copy_from_slice(&whole[..whole.len() / 2]);
            // The half is sent (headers and all) before the connection drops, as when an
            // upstream dies mid-answer.
            let body = stream::iter([Ok(half)]).chain(stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "mock: connection dropped mid-body",
                ))
            }));
            let mut resp = Response::new(Body::from_stream(body));
            set(&mut resp, "content-type", content_type(asked.stream));
            set(&mut resp, "request-id", &request_id);
            resp
        }
        Reply::Garbage if asked.stream => sse(
            &request_id,
            chunks(vec![
                asked.message_start(&id),
                Bytes::from_static(b"event: content_block_delta\ndata: {\"type\": oops\n\n"),
            ]),
        ),
        Reply::Garbage => json(
            StatusCode::OK,
            &request_id,
            "{\"id\": \"msg_\", garbage".into(),
        ),
        Reply::Truncated if asked.stream => {
            let mut events = asked.events(&id);
            events.truncate(events.len() - 3);
            sse(&request_id, chunks(events))
        }
        Reply::Truncated => {
            let whole = asked.message(&id).to_string();
            json(
                StatusCode::OK,
                &request_id,
                whole[..whole.len() / 2].to_owned(),
            )
        }
        Reply::StallMidStream if asked.stream => {
            let body = stream::iter([Ok(asked.message_start(&id))]).chain(stream::once(async {
                tokio::time::sleep(HANG).await;
                Err(std::io::Error::other("mock: stalled"))
            }));
            sse(&request_id, Body::from_stream(body))
        }
        Reply::Hang | Reply::StallMidStream => {
            tokio::time::sleep(HANG).await;
            plain(StatusCode::GATEWAY_TIMEOUT, "mock: hung")
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => {
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            resp
        }
    }
}

fn content_type(stream: bool) -> &'static str {
    if stream {
        "text/event-stream"
    } else {
        "application/json"
    }
}

fn chunks(events: Vec<Bytes>) -> Body {
    Body::from_stream(stream::iter(
        events.into_iter().map(Ok::<_, std::io::Error>),
    ))
}

fn sse(request_id: &str, body: Body) -> Response {
    let mut resp = Response::new(body);
    set(&mut resp, "content-type", "text/event-stream");
    set(&mut resp, "cache-control", "no-cache");
    set(&mut resp, "request-id", request_id);
    resp
}

fn json(status: StatusCode, request_id: &str, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    set(&mut resp, "content-type", "application/json");
    set(&mut resp, "request-id", request_id);
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp
}

fn error(e: &ErrorReply, request_id: &str) -> Response {
    let body = error_body(&e.error_type, &e.message, e.details.as_ref(), request_id);
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json(status, request_id, body.to_string());
    if let Some(v) = &e.retry_after {
        set(&mut resp, "retry-after", v);
    }
    if let Some(v) = &e.retry_after_ms {
        set(&mut resp, "retry-after-ms", v);
    }
    if let Some(v) = e.should_retry {
        set(
            &mut resp,
            "x-should-retry",
            if v { "true" } else { "false" },
        );
    }
    resp
}

fn set(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}
