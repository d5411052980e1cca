//! The Anthropic-compatible proxy (feature `proxy`; `fusebox serve`): `POST /v1/messages`
//! (plain and streaming) and `POST /v1/messages/count_tokens`, forwarded to an upstream
//! (the Anthropic API by default) through a feature's fallback chain, with its breakers,
//! bulkhead, rate limit, retries, degraded cache and canned answer.
//!
//! * **Feature**: the `x-fusebox-feature` header ([`ServerConfig::feature_header`]), else a
//!   path route (`/support/v1/messages` with `"/support" = "chat"` under `[server.routes]`),
//!   else a model route, else `server.default_feature`. An unknown feature is a 400.
//! * **Model**: the request's `model` picks where the feature's chain starts: the first
//!   target whose model (or target name) it is. A model the chain does not have is a 400
//!   naming the chain's models (route it to a feature that has it). Each target is sent its
//!   own model (and `max_tokens`, when set); every other body field is forwarded untouched,
//!   and when the target's model is the requested one, the original bytes are.
//! * **Headers passed**: `x-api-key`, `authorization` and every `anthropic-*` header to the
//!   upstream; `request-id` and `anthropic-ratelimit-*` back. Set by the proxy:
//!   `x-fusebox-model`, `x-fusebox-target`, `x-fusebox-tier`
//!   (`primary|fallback|cache|canned`), `x-fusebox-attempts`, `x-fusebox-degraded`,
//!   `x-fusebox-cache-age` (seconds, cached answers only).
//! * **Degraded answers** are normal Messages responses (or streams) marked by those headers:
//!   a cached answer is the stored message; the canned text is a message of one text block,
//!   `stop_reason` `end_turn`, zero usage, with `retry-after` when a hint is known.
//! * **Errors** the proxy makes use the API's shape (`{"type":"error","error":{...}}`);
//!   refusals carry `retry-after`; an error that ends the chain, `x-should-retry: false`.
//!   Upstream errors that end the chain keep the upstream's status, `error.type`, message
//!   (any API key masked) and request id.
//! * **Streams** fail over while nothing has reached the client; after the first event, an
//!   upstream failure becomes an SSE `error` event that ends the stream and counts against
//!   the target's breaker. The request's bulkhead permit is held (and its lease kept alive)
//!   as long as the stream runs, and given back the moment the client goes away.
//!
//! Run it with [`serve`] on a listener of your own, or with `fusebox serve`.

mod admin;
mod body;
mod error;
mod messages;
pub mod ops;
pub mod prom;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderName;
use axum::routing::post;
use axum::Router;

use crate::anthropic::Client;
use crate::config::ServerConfig;
use crate::{Coordinator, Error};

/// The proxy's state: the coordinator, the `[server]` settings and the one upstream client
/// (one connection pool, keep-alive, TCP_NODELAY). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyState {
    inner: Arc<Inner>,
    /// What `/metrics` renders of the `metrics` facade ([`prom`]); `None`: gauges only.
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

#[derive(Debug)]
struct Inner {
    coordinator: Coordinator,
    server: ServerConfig,
    client: Client,
    messages_url: reqwest::Url,
    count_tokens_url: reqwest::Url,
    feature_header: HeaderName,
    /// Set when the shutdown grace ran out: requests still in flight end at once (each holds
    /// a receiver, so the receiver count is the number still running).
    cut: tokio::sync::watch::Sender<bool>,
}

impl ProxyState {
    /// The state for `coordinator` with `server`'s settings; an error names the field that
    /// is wrong.
    pub fn new(coordinator: Coordinator, server: ServerConfig) -> Result<Self, Error> {
        let base = server.upstream.trim_end_matches('/');
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|e| Error::config("server.upstream", format!("{base:?}: {e}")))
        };
        let messages_url = url("/v1/messages")?;
        let count_tokens_url = url("/v1/messages/count_tokens")?;
        let client = Client::builder().base_url(base).build()?;
        let feature_header = HeaderName::from_bytes(server.feature_header.as_bytes())
            .map_err(|_| Error::config("server.feature_header", "not a header name"))?;
        Ok(ProxyState {
            inner: Arc::new(Inner {
                coordinator,
                server,
                client,
                messages_url,
                count_tokens_url,
                feature_header,
                cut: tokio::sync::watch::Sender::new(false),
            }),
            metrics: None,
        })
    }

    /// `/metrics` renders the pipeline's metrics from this recorder's handle (see
    /// [`prom::install`]; tests: [`prom::recorder`]).
    pub fn with_metrics(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The Prometheus handle `/metrics` renders, if any.
    pub fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle> {
        self.metrics.as_ref()
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        &self.inner.coordinator
    }

    /// The `[server]` settings.
    pub fn server(&self) -> &ServerConfig {
        &self.inner.server
    }
}

/// The proxy's routes: `POST /v1/messages`, `POST /v1/messages/count_tokens`, and the same
/// under every path route of `[server.routes]`; `/healthz`, `/readyz`, `/metrics` and the
/// admin API under `/admin` ([`ops::router`]).
pub fn app(state: ProxyState) -> Router {
    let mut router = Router::new()
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens));
    for prefix in state.inner.server.routes.keys() {
        if prefix.starts_with('/') {
            router = router
                .route(&format!("{prefix}/v1/messages"), post(messages::messages))
                .route(
                    &format!("{prefix}/v1/messages/count_tokens"),
                    post(messages::count_tokens),
                );
        }
    }
    // After every route: it applies to the method routers registered before it.
    router
        .merge(ops::router())
        .method_not_allowed_fallback(messages::method_not_allowed)
        .fallback(messages::not_found)
        .with_state(state)
}

/// Longest wait for the coordinator's queued settles once the server stopped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for requests cut at the end of the grace to let go of their permits.
const CUT_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until `shutdown`, then waits for the open ones to finish their
/// request in flight (keep-alive connections close after it).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            // A failed accept (out of file descriptors, a connection reset before it was
            // taken) is not the end of the server: wait a little, as axum's serve does.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let conn =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves [`app`] on `listener` (TCP_NODELAY on every accepted socket) until `shutdown`
/// completes; then stops accepting, lets requests in flight finish for up to
/// `server.shutdown_grace` (streams included), ends those still running (a stream with an
/// SSE `error` event, a plain request with a 503), so that their permits are released, and
/// flushes the coordinator's queued settles (at most 5 s). Returns once all that is done.
///
/// Each connection is served by hyper's HTTP/1.1 server with a timer, so that a client must
/// send a request's headers within `server.read_timeout` (axum's own `serve` sets no timer:
/// a client trickling header lines, or thousands of half-open requests, held connections and
/// file descriptors for ever, seen by the adversarial review; the body's bound is in the
/// handler).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ProxyState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.inner.server.shutdown_grace;
    let read_timeout = state.inner.server.read_timeout;
    let coordinator = state.inner.coordinator.clone();
    let inner = Arc::clone(&state.inner);
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = accept_loop(listener, app(state), read_timeout, async move {
        shutdown.await;
        let _ = stopping.send(());
    });
    let server = std::pin::pin!(server);
    let out_of_grace = async move {
        if stopped.await.is_ok() {
            tracing::info!(grace = ?grace, "shutting down: finishing requests in flight");
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = server => r,
        () = out_of_grace => {
            let running = inner.cut.receiver_count();
            tracing::warn!(grace = ?grace, running, "shutdown grace ran out: ending requests still in flight");
            inner.cut.send_replace(true);
            let until = tokio::time::Instant::now() + CUT_TIMEOUT;
            while inner.cut.receiver_count() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        }
    };
    let report = coordinator.flush(FLUSH_TIMEOUT).await;
    if !report.is_complete() {
        tracing::warn!(?report, "not every queued settle reached the store");
    }
    result
}
