//! The fake upstream's HTTP side: one route, `POST /v1/messages`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use serde_json::Value;

use super::reply::{error_body, event, Asked, ErrorReply, HANG};
use super::{Reply, Seen, Shared};

pub(super) fn app(shared: Shared) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .with_state(shared)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn messages(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
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
    let (reply, latency, id) = shared.decide(seen);
    let request_id = id.replace("msg_", "req_");
    let Some(asked) = asked.filter(|a| !a.model.is_empty()) else {
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
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match reply {
        Reply::Answer if asked.stream => sse(&request_id, chunks(asked.events(&id))),
        Reply::Answer => json(StatusCode::OK, &request_id, asked.message(&id).to_string()),
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
