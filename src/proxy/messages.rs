//! `POST /v1/messages` and `POST /v1/messages/count_tokens`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use super::body::{self, Head};
use super::error::{retry_after_secs, ApiError};
use super::stream;
use super::ProxyState;
use crate::anthropic::gathered::Gathered;
use crate::anthropic::{ApiKey, Client};
use crate::cache::{Answer, Caller};
use crate::pipeline::{Answered, CacheUse, ChainTarget, Reply};
use crate::retry::BackoffPolicy;
use crate::UpstreamError;

/// A target's plain answer, as it came.
pub(super) struct Fresh {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// One request, read and routed: what every path needs.
pub(super) struct Routed {
    pub(super) feature: String,
    pub(super) start: usize,
    pub(super) head: Head,
    pub(super) body: Bytes,
    /// The upstream client carrying the caller's `x-api-key`.
    pub(super) client: Client,
    /// `authorization` and `anthropic-*` headers to forward.
    pub(super) forward: HeaderMap,
    /// The caller's key (x-api-key, else authorization), for the cache's tenant.
    pub(super) key: Option<String>,
}

pub(super) async fn not_found(uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!(
            "fusebox: no route {:?}: the proxy serves POST /v1/messages and \
             /v1/messages/count_tokens",
            uri.path()
        ),
    )
    .into_response()
}

pub(super) async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("fusebox: {method} {} is not served: use POST", uri.path()),
    )
    .into_response()
}

/// Request bodies up to this size are parsed on the serving thread; larger ones on the
/// blocking pool.
const PARSE_INLINE_BYTES: usize = 256 * 1024;

/// `x-fusebox-attempts` on an answer without a body from the chain (an error).
pub(super) fn with_attempts(mut resp: Response, attempts: u32) -> Response {
    resp.headers_mut()
        .insert(X_ATTEMPTS, HeaderValue::from(attempts));
    resp
}

/// Reads the body, refusing more than `limit` bytes with a 413.
/// The request body, at most `limit` bytes, arrived within `within` (else a 408: a client
/// trickling its body must not hold a connection and a buffer for ever).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    within: Duration,
) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(within, read_body_unbounded(headers, body, limit)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout_error",
            format!(
                "fusebox: the request body did not arrive within server.read_timeout ({})",
                humantime_serde::re::humantime::format_duration(within)
            ),
        )),
    }
}

async fn read_body_unbounded(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("fusebox: the request body is larger than server.max_body_bytes ({limit})"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut gathered = match declared {
        Some(n) => Gathered::with_capacity(n as usize),
        None => Gathered::default(),
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid(format!("fusebox: the request body could not be read: {e}"))
        })?;
        if (gathered.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        gathered.push(chunk);
    }
    Ok(gathered.into_bytes())
}

/// The headers forwarded upstream, and the caller's key.
fn forwarded(headers: &HeaderMap) -> (HeaderMap, Option<HeaderValue>, Option<String>) {
    let mut forward = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if n == "authorization" || n.starts_with("anthropic-") {
            let mut v = value.clone();
            if n == "authorization" {
                v.set_sensitive(true);
            }
            forward.append(name.clone(), v);
        }
    }
    let api_key = headers.get("x-api-key").cloned();
    let key = api_key
        .as_ref()
        .or_else(|| headers.get(axum::http::header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (forward, api_key, key)
}

/// The upstream client for a request: sending its `x-api-key`, or masking the bearer token
/// of its forwarded `authorization` header in error messages (an upstream may echo it).
fn keyed(
    client: &crate::anthropic::Client,
    api_key: Option<HeaderValue>,
    forward: &HeaderMap,
) -> crate::anthropic::Client {
    // The bearer token is masked whether or not an `x-api-key` comes too (both may be
    // forwarded), and whatever the case of its scheme (`bearer`, `BEARER`: the scheme is
    // case-insensitive). Seen by the adversarial review: both leaked through an upstream
    // message that echoed them.
    let bearer = forward
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let v = v.trim();
            match v.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                _ => v,
            }
        })
        .filter(|t| !t.is_empty())
        .and_then(|t| HeaderValue::from_str(t).ok());
    let client = match api_key {
        Some(k) => client.with_api_key(ApiKey::from_header(k)),
        None => client.clone(),
    };
    match bearer {
        Some(t) => client.masking(ApiKey::from_header(t)),
        None => client,
    }
}

impl ProxyState {
    /// The feature of a request: header, path route, model route, default; and whether a
    /// model route picked it.
    fn feature_of(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        model: &str,
    ) -> Result<(String, bool), ApiError> {
        let s = &self.inner.server;
        if let Some(v) = headers.get(&self.inner.feature_header) {
            let f = v.to_str().ok().filter(|f| !f.is_empty()).ok_or_else(|| {
                ApiError::invalid(format!(
                    "fusebox: the {} header must name a feature",
                    s.feature_header
                ))
            })?;
            return Ok((f.to_owned(), false));
        }
        if !s.routes.is_empty() {
            let path = uri.path();
            let prefix = path
                .strip_suffix("/v1/messages")
                .or_else(|| path.strip_suffix("/v1/messages/count_tokens"))
                .unwrap_or("");
            if !prefix.is_empty() {
                if let Some(f) = s.routes.get(prefix) {
                    return Ok((f.clone(), false));
                }
            }
            if let Some(f) = s.routes.get(model) {
                return Ok((f.clone(), true));
            }
        }
        s.default_feature
            .clone()
            .map(|f| (f, false))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "fusebox: no feature: send the {} header, or configure server.default_feature \
                 or [server.routes]",
                    s.feature_header
                ))
            })
    }

    /// Reads and routes a request.
    async fn route(&self, uri: &Uri, headers: &HeaderMap, body: Body) -> Result<Routed, ApiError> {
        let s = &self.inner.server;
        let body = read_body(headers, body, s.max_body_bytes, s.read_timeout).await?;
        let head = if body.len() > PARSE_INLINE_BYTES {
            // A large body is read off the serving thread, whose other connections would
            // wait for it (a 30 MB body takes tens of milliseconds).
            let b = body.clone();
            tokio::task::spawn_blocking(move || Head::parse(&b))
                .await
                .map_err(|e| {
                    ApiError::invalid(format!("fusebox: the body could not be read: {e}"))
                })??
        } else {
            Head::parse(&body)?
        };
        let (feature, model_routed) = self.feature_of(uri, headers, &head.model)?;
        let plan = self
            .inner
            .coordinator
            .plan(&feature)
            .map_err(|e| ApiError::of_fusebox(&e))?;
        if plan.targets.is_empty() {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                format!(
                    "fusebox: feature {feature:?} has no chain ([features.{feature:?}] chain): \
                     the proxy cannot serve it"
                ),
            ));
        }
        let start = plan
            .targets
            .iter()
            .position(|t| t.model == head.model)
            .or_else(|| plan.targets.iter().position(|t| t.name == head.model))
            // A model routed to the feature on purpose is served by its whole chain.
            .or(model_routed.then_some(0))
            .ok_or_else(|| {
                let models: Vec<&str> = plan.targets.iter().map(|t| t.model.as_str()).collect();
                ApiError::invalid(format!(
                    "model: {:?} is not in feature {feature:?}'s chain ({}); ask for one of \
                     those, or route the model to a feature that has it ([server.routes])",
                    head.model,
                    models.join(", ")
                ))
            })?;
        let (forward, api_key, key) = forwarded(headers);
        let client = keyed(&self.client, api_key, &forward);
        Ok(Routed {
            feature,
            start,
            head,
            body,
            client,
            forward,
            key,
        })
    }
}

/// `POST /v1/messages`.
pub(super) async fn messages(
    State(state): State<ProxyState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let routed = match state.route(&uri, &headers, body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut cut = state.inner.cut.subscribe();
    if routed.head.stream {
        return stream::messages(state, routed, cut).await;
    }
    tokio::select! {
        biased;
        resp = plain(state, routed) => resp,
        _ = cut.wait_for(|c| *c) => shutting_down().into_response(),
    }
}

/// A request ended by the shutdown (the grace ran out).
pub(super) fn shutting_down() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "api_error",
        "fusebox: the proxy is shutting down; send the request again".to_owned(),
    );
    e.retry_after = Some(std::time::Duration::from_secs(1));
    e
}

async fn plain(state: ProxyState, r: Routed) -> Response {
    let coordinator = &state.inner.coordinator;
    let retry = match coordinator.retry_backoff(&r.feature) {
        Ok(b) => BackoffPolicy::new(b),
        Err(e) => return ApiError::of_fusebox(&e).into_response(),
    };
    let request_json = coordinator
        .cache_enabled(&r.feature)
        .then(|| serde_json::from_slice::<Value>(&r.body).ok())
        .flatten();
    let to_answer = |f: &Fresh, t: &ChainTarget| {
        let v = serde_json::from_slice::<Value>(&f.body).ok()?;
        Answer::success(f.status.as_u16(), t.model.clone(), v).ok()
    };
    let cache = request_json.as_ref().map(|request| CacheUse {
        caller: Caller {
            api_key: r.key.as_deref(),
            tenant_id: None,
        },
        request,
        answer: &to_answer,
    });
    let url = &state.inner.messages_url;
    let tried = AtomicU32::new(0);
    let call = |t: &ChainTarget, n: u32| {
        tried.fetch_max(n, Ordering::Relaxed);
        let body = body::for_target(&r.body, &r.head.model, t);
        let client = &r.client;
        let forward = &r.forward;
        let feature = r.feature.as_str();
        let target = t.name.clone();
        async move {
            let sent = async {
                let (resp, _) = client.send_raw(url.clone(), forward, body).await?;
                let status = resp.status();
                let headers = passback(resp.headers());
                let body = client.read_body(resp).await?;
                if !body::is_object(&body) {
                    return Err(client.failed(
                        crate::UpstreamErrorKind::InvalidResponse,
                        format!("{status} with a body that is not a JSON object"),
                    ));
                }
                Ok(Fresh {
                    status,
                    headers,
                    body,
                })
            }
            .await;
            if let Err(e) = &sent {
                attempt_failed(feature, &target, e);
            }
            sent
        }
    };
    let classify = |e: &UpstreamError| e.classification;
    let result = coordinator
        .guarded_call_held(&r.feature, r.start, &retry, cache, call, classify)
        .await;
    match result {
        Ok((answered, held)) => {
            if let Some(h) = held {
                h.finish(crate::CallOutcome::Success);
            }
            answer(answered, &r)
        }
        Err(e) => {
            tracing::debug!(feature = %r.feature, error = %e, "no answer");
            let attempts = tried.load(Ordering::Relaxed);
            with_attempts(ApiError::of_call(e).into_response(), attempts)
        }
    }
}

/// Logs an attempt's failure: the client may see only a fallback or degraded answer, and an
/// operator must be able to tell a wrong upstream URL from an overloaded model. The message
/// has any API key masked ([`crate::anthropic::Client`] masks it).
pub(super) fn attempt_failed(feature: &str, target: &str, e: &UpstreamError) {
    tracing::warn!(
        target: "fusebox",
        feature = %feature,
        breaker.target = %target,
        error = %e,
        "upstream attempt failed"
    );
}

/// The response of an answer.
fn answer(a: Answered<Fresh>, r: &Routed) -> Response {
    let mut resp = match a.reply {
        Reply::Fresh(f) => {
            let mut resp = Response::new(Body::from(f.body));
            *resp.status_mut() = f.status;
            *resp.headers_mut() = f.headers;
            resp
        }
        Reply::Cached(c) => {
            let mut resp = Response::new(Body::from(c.body.to_string()));
            if let Ok(v) = HeaderValue::from_str(&c.age.as_secs().to_string()) {
                resp.headers_mut().insert("x-fusebox-cache-age", v);
            }
            resp
        }
        Reply::Canned { text, retry_after } => {
            let mut resp = Response::new(Body::from(canned_message(&text).to_string()));
            if let Some(d) = retry_after {
                resp.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(d)),
                );
            }
            resp
        }
    };
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    mark(h, &a.model, &a.target, a.tier, a.attempts, a.degraded);
    tracing::debug!(feature = %r.feature, tier = a.tier.as_str(), attempts = a.attempts, "answered");
    resp
}

/// The `x-fusebox-*` header names (constants: no name is parsed per response).
const X_MODEL: HeaderName = HeaderName::from_static("x-fusebox-model");
const X_TARGET: HeaderName = HeaderName::from_static("x-fusebox-target");
const X_TIER: HeaderName = HeaderName::from_static("x-fusebox-tier");
pub(super) const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-fusebox-attempts");
const X_DEGRADED: HeaderName = HeaderName::from_static("x-fusebox-degraded");

/// Sets the `x-fusebox-*` headers.
pub(super) fn mark(
    h: &mut HeaderMap,
    model: &Option<String>,
    target: &Option<String>,
    tier: crate::pipeline::Tier,
    attempts: u32,
    degraded: bool,
) {
    if let Some(v) = model.as_deref().and_then(|m| HeaderValue::from_str(m).ok()) {
        h.insert(X_MODEL, v);
    }
    if let Some(v) = target
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        h.insert(X_TARGET, v);
    }
    h.insert(X_TIER, HeaderValue::from_static(tier.as_str()));
    h.insert(X_ATTEMPTS, HeaderValue::from(attempts));
    h.insert(
        X_DEGRADED,
        HeaderValue::from_static(if degraded { "true" } else { "false" }),
    );
}

/// The canned text as a Messages response.
pub(super) fn canned_message(text: &str) -> Value {
    serde_json::json!({
        "id": format!("msg_fusebox_canned_{:016x}", rand::random::<u64>()),
        "type": "message",
        "role": "assistant",
        "model": "fusebox-canned",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    })
}

/// The upstream's headers worth passing back: `request-id`, `anthropic-ratelimit-*`,
/// `retry-after(-ms)`.
pub(super) fn passback(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        let n = name.as_str();
        if n == "request-id"
            || n.starts_with("anthropic-ratelimit-")
            || n == "anthropic-organization-id"
        {
            out.append(HeaderName::clone(name), value.clone());
        }
    }
    out
}

/// `POST /v1/messages/count_tokens`: passed through as it came, without the chain (counting
/// is free and says nothing about a model's health).
pub(super) async fn count_tokens(
    State(state): State<ProxyState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let s = &state.inner.server;
    let body = match read_body(&headers, body, s.max_body_bytes, s.read_timeout).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (forward, api_key, _) = forwarded(&headers);
    let client = keyed(&state.client, api_key, &forward);
    let url = state.inner.count_tokens_url.clone();
    let sent = tokio::time::timeout(client.timeout(), async {
        let (resp, _) = client.send_raw(url, &forward, body).await?;
        let status = resp.status();
        let headers = passback(resp.headers());
        let body = client.read_body(resp).await?;
        Ok::<_, UpstreamError>((status, headers, body))
    })
    .await;
    match sent {
        Ok(Ok((status, headers, body))) => {
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            resp.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Ok(Err(e)) => ApiError::of_upstream(&e, false).into_response(),
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "fusebox: count_tokens: no answer from the upstream in time".to_owned(),
        )
        .into_response(),
    }
}
