//! Streaming `POST /v1/messages`, by phase: while nothing has reached the client, a failure
//! (a status, a dropped connection, an `error` event, silence) moves on along the chain;
//! once the first events are out, a failure becomes one SSE `error` event that ends the
//! stream, and counts against the answering target's breaker. The request's bulkhead
//! permit is held, its lease kept alive, while the stream runs, and released as soon as the
//! stream ends or the client goes away (the body is dropped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use super::body;
use super::error::{retry_after_secs, ApiError};
use super::messages::{canned_message, mark, passback, with_attempts, Routed};
use super::ProxyState;
use crate::anthropic::sse::{MessageStreamDecoder, StreamEvent};
use crate::anthropic::Client;
use crate::cache::Caller;
use crate::classify::Classified;
use crate::pipeline::{CacheUse, ChainTarget, Held, Reply};
use crate::retry::BackoffPolicy;
use crate::{CallOutcome, Heartbeat, UpstreamError, UpstreamErrorKind};

/// A stream whose first events arrived, nothing forwarded yet.
pub(super) struct Started {
    headers: HeaderMap,
    resp: reqwest::Response,
    decoder: MessageStreamDecoder,
    first: Vec<StreamEvent>,
    idle: Duration,
    status: u16,
    request_id: Option<String>,
}

/// Sends one attempt and waits for its first events.
async fn start(
    client: &Client,
    url: reqwest::Url,
    forward: &HeaderMap,
    body: Bytes,
    idle: Duration,
) -> Result<Started, UpstreamError> {
    let (mut resp, rh) = client.send_raw(url, forward, body).await?;
    let status = resp.status().as_u16();
    let headers = passback(resp.headers());
    let request_id = rh.request_id;
    let mut decoder = MessageStreamDecoder::new();
    let mut first = Vec::new();
    loop {
        let chunk = tokio::time::timeout(idle, resp.chunk()).await;
        let step = match chunk {
            Ok(Ok(Some(bytes))) => decoder.push(&bytes, &mut first),
            Ok(Ok(None)) => decoder.finish(),
            Ok(Err(e)) => return Err(client.interrupted(&e)),
            Err(_) => {
                return Err(client.failed(
                    UpstreamErrorKind::Timeout,
                    format!("stream stalled before its first event: nothing for {idle:?}"),
                ))
            }
        };
        if let Err(e) = step {
            return Err(client.stream_failed(e, status, request_id.as_deref()));
        }
        if !first.is_empty() {
            return Ok(Started {
                headers,
                resp,
                decoder,
                first,
                idle,
                status,
                request_id,
            });
        }
    }
}

pub(super) async fn messages(
    state: ProxyState,
    r: Routed,
    mut cut: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let coordinator = &state.inner.coordinator;
    let retry = match coordinator.retry_backoff(&r.feature) {
        Ok(b) => BackoffPolicy::new(b),
        Err(e) => return ApiError::of_fusebox(&e).into_response(),
    };
    // Streams are not stored; a stored plain answer can serve one when every model fails.
    let request_json = coordinator
        .cache_enabled(&r.feature)
        .then(|| serde_json::from_slice::<Value>(&r.body).ok())
        .flatten();
    let no_store = |_: &Started, _: &ChainTarget| None;
    let cache = request_json.as_ref().map(|request| CacheUse {
        caller: Caller {
            api_key: r.key.as_deref(),
            tenant_id: None,
        },
        request,
        answer: &no_store,
    });
    let url = &state.inner.messages_url;
    let tried = AtomicU32::new(0);
    let call = |t: &ChainTarget, n: u32| {
        tried.fetch_max(n, Ordering::Relaxed);
        let body = body::for_target(&r.body, &r.head.model, t);
        let started = start(&r.client, url.clone(), &r.forward, body, t.timeout);
        let (feature, target) = (r.feature.as_str(), t.name.clone());
        async move {
            let r = started.await;
            if let Err(e) = &r {
                super::messages::attempt_failed(feature, &target, e);
            }
            r
        }
    };
    let classify = |e: &UpstreamError| e.classification;
    let result = tokio::select! {
        biased;
        result = coordinator.guarded_call_held(&r.feature, r.start, &retry, cache, call, classify) => result,
        _ = cut.wait_for(|c| *c) => return super::messages::shutting_down().into_response(),
    };
    let a = match result {
        Ok((a, held)) => (a, held),
        Err(e) => {
            tracing::debug!(feature = %r.feature, error = %e, "no answer");
            let attempts = tried.load(Ordering::Relaxed);
            return with_attempts(ApiError::of_call(e).into_response(), attempts);
        }
    };
    let (a, held) = a;
    let (mut resp, status) = match a.reply {
        Reply::Fresh(s) => {
            let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
            let headers = s.headers.clone();
            let mut resp = Response::new(Body::from_stream(pump(
                s,
                held,
                r.client.clone(),
                r.feature.clone(),
                cut,
            )));
            *resp.headers_mut() = headers;
            (resp, status)
        }
        Reply::Cached(c) => {
            let mut resp = Response::new(Body::from(synthesize(&c.body)));
            if let Ok(v) = HeaderValue::from_str(&c.age.as_secs().to_string()) {
                resp.headers_mut().insert("x-fusebox-cache-age", v);
            }
            (resp, StatusCode::OK)
        }
        Reply::Canned { text, retry_after } => {
            let mut resp = Response::new(Body::from(synthesize(&canned_message(&text))));
            if let Some(d) = retry_after {
                resp.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(d)),
                );
            }
            (resp, StatusCode::OK)
        }
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    mark(h, &a.model, &a.target, a.tier, a.attempts, a.degraded);
    resp
}

/// Forwards a started stream: its first events, then the rest as they come.
struct Pump {
    resp: Option<reqwest::Response>,
    decoder: MessageStreamDecoder,
    out: VecDeque<Bytes>,
    held: Option<Held>,
    _heartbeat: Option<Heartbeat>,
    feature: String,
    /// The shutdown's cut (see `Inner::cut`).
    cut: tokio::sync::watch::Receiver<bool>,
    client: Client,
    idle: Duration,
    status: u16,
    request_id: Option<String>,
}

impl Pump {
    /// Ends the stream: reports `outcome` to the target's breaker, releases the permit.
    fn end(&mut self, outcome: CallOutcome) {
        self.resp = None;
        if let Some(h) = self.held.take() {
            h.finish(outcome);
        }
    }

    /// A late failure: one `error` event, then the end.
    fn fail(&mut self, e: UpstreamError) {
        let target = self.held.as_ref().map_or("", Held::target);
        tracing::info!(
            feature = %self.feature,
            target_name = target,
            error = %e,
            "stream failed after its first event"
        );
        crate::pipeline::metrics::stream_failed(
            &self.feature,
            target,
            e.classification.class.as_str(),
        );
        let mut b = BytesMut::new();
        let data = error_event(&e);
        write_event(&mut b, "error", &data);
        self.out.push_back(b.freeze());
        self.end(e.classification.health());
    }

    /// The proxy is shutting down and the grace ran out: one `error` event, then the end;
    /// nothing is recorded on the breaker (not the target's doing).
    fn shut(&mut self) {
        let mut b = BytesMut::new();
        let data = serde_json::json!({"type": "error", "error": {"type": "overloaded_error",
            "message": "fusebox: the proxy is shutting down; send the request again"}});
        write_event(&mut b, "error", &data.to_string());
        self.out.push_back(b.freeze());
        self.end(CallOutcome::Ignored);
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            let resp = self.resp.as_mut()?;
            let idle = self.idle;
            let cut = &mut self.cut;
            let chunk = tokio::select! {
                biased;
                chunk = tokio::time::timeout(idle, resp.chunk()) => Some(chunk),
                _ = cut.wait_for(|c| *c) => None,
            };
            let Some(chunk) = chunk else {
                self.shut();
                continue;
            };
            let mut events = Vec::new();
            match chunk {
                Ok(Ok(Some(bytes))) => {
                    let step = self.decoder.push(&bytes, &mut events);
                    if !events.is_empty() {
                        self.out.push_back(encode(&events));
                    }
                    if let Err(e) = step {
                        let e =
                            self.client
                                .stream_failed(e, self.status, self.request_id.as_deref());
                        self.fail(e);
                    }
                }
                Ok(Ok(None)) => match self.decoder.finish() {
                    Ok(()) => self.end(CallOutcome::Success),
                    Err(e) => {
                        let e =
                            self.client
                                .stream_failed(e, self.status, self.request_id.as_deref());
                        self.fail(e);
                    }
                },
                Ok(Err(e)) => {
                    let e = self.client.interrupted(&e);
                    self.fail(e);
                }
                Err(_) => {
                    let e = self.client.failed(
                        UpstreamErrorKind::Timeout,
                        format!("stream stalled: nothing for {:?}", self.idle),
                    );
                    self.fail(e);
                }
            }
        }
    }
}

fn pump(
    s: Started,
    held: Option<Held>,
    client: Client,
    feature: String,
    cut: tokio::sync::watch::Receiver<bool>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let heartbeat = held.as_ref().and_then(Held::keep_alive);
    let mut out = VecDeque::new();
    out.push_back(encode(&s.first));
    let mut pump = Pump {
        resp: Some(s.resp),
        decoder: s.decoder,
        out,
        held,
        _heartbeat: heartbeat,
        feature,
        cut,
        client,
        idle: s.idle,
        status: s.status,
        request_id: s.request_id,
    };
    // A stream that already ended within its first chunk.
    if pump.decoder.finished() {
        pump.end(CallOutcome::Success);
    }
    futures_util::stream::unfold(pump, |mut p| async move {
        let b = p.next().await?;
        Some((Ok(b), p))
    })
}

/// The `error` event's data for a failure after the first event.
fn error_event(e: &UpstreamError) -> String {
    let (t, m) = match e.kind {
        UpstreamErrorKind::StreamError => (
            e.error_type
                .clone()
                .unwrap_or_else(|| "api_error".to_owned()),
            e.message.clone(),
        ),
        UpstreamErrorKind::Timeout => (
            "timeout_error".to_owned(),
            format!("fusebox: the upstream stream stalled: {}", e.message),
        ),
        _ => (
            "api_error".to_owned(),
            format!(
                "fusebox: the upstream stream failed ({}): {}",
                e.kind.as_str(),
                e.message
            ),
        ),
    };
    serde_json::json!({"type": "error", "error": {"type": t, "message": m}}).to_string()
}

/// Events as SSE bytes.
fn encode(events: &[StreamEvent]) -> Bytes {
    let mut b = BytesMut::new();
    for ev in events {
        write_event(&mut b, &ev.raw.event, &ev.raw.data);
    }
    b.freeze()
}

fn write_event(b: &mut BytesMut, event: &str, data: &str) {
    b.put_slice(b"event: ");
    b.put_slice(event.as_bytes());
    b.put_slice(b"\n");
    for line in data.split('\n') {
        b.put_slice(b"data: ");
        b.put_slice(line.as_bytes());
        b.put_slice(b"\n");
    }
    b.put_slice(b"\n");
}

/// A whole message as the events of a stream (a cached or canned answer to a streaming
/// request).
fn synthesize(message: &Value) -> Bytes {
    let mut b = BytesMut::new();
    let mut start = message.clone();
    if let Some(o) = start.as_object_mut() {
        o.insert("content".to_owned(), Value::Array(Vec::new()));
        o.insert("stop_reason".to_owned(), Value::Null);
        o.insert("stop_sequence".to_owned(), Value::Null);
    }
    let ev = |b: &mut BytesMut, name: &str, v: Value| write_event(b, name, &v.to_string());
    ev(
        &mut b,
        "message_start",
        serde_json::json!({"type": "message_start", "message": start}),
    );
    let empty = Vec::new();
    let content = message
        .get("content")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, block) in content.iter().enumerate() {
        let text = block
            .get("text")
            .and_then(Value::as_str)
            .filter(|_| block.get("type").and_then(Value::as_str) == Some("text"));
        match text {
            Some(t) => {
                ev(
                    &mut b,
                    "content_block_start",
                    serde_json::json!({"type": "content_block_start", "index": i,
                        "content_block": {"type": "text", "text": ""}}),
                );
                ev(
                    &mut b,
                    "content_block_delta",
                    serde_json::json!({"type": "content_block_delta", "index": i,
                        "delta": {"type": "text_delta", "text": t}}),
                );
            }
            None => ev(
                &mut b,
                "content_block_start",
                serde_json::json!({"type": "content_block_start", "index": i,
                    "content_block": block}),
            ),
        }
        ev(
            &mut b,
            "content_block_stop",
            serde_json::json!({"type": "content_block_stop", "index": i}),
        );
    }
    let output_tokens = message
        .pointer("/usage/output_tokens")
        .cloned()
        .unwrap_or(Value::from(0));
    ev(
        &mut b,
        "message_delta",
        serde_json::json!({"type": "message_delta",
            "delta": {"stop_reason": message.get("stop_reason").cloned().unwrap_or(Value::Null),
                      "stop_sequence": message.get("stop_sequence").cloned().unwrap_or(Value::Null)},
            "usage": {"output_tokens": output_tokens}}),
    );
    ev(
        &mut b,
        "message_stop",
        serde_json::json!({"type": "message_stop"}),
    );
    b.freeze()
}
