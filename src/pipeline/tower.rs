//! The guarded call as a tower [`Layer`] / [`Service`] (feature `tower`, on by default).
//!
//! [`GuardedLayer`] wraps a service that makes one attempt at one target: it receives a
//! [`Routed`] request (the caller's request, the [`ChainTarget`] to ask and the attempt
//! number) and answers or fails. The wrapped service takes the caller's request and answers
//! with [`Answered`], running the feature's fallback chain exactly as
//! [`Coordinator::guarded_call`] does.
//!
//! ```no_run
//! # async fn demo(coordinator: fusebox::Coordinator) {
//! use fusebox::classify::Class;
//! use fusebox::pipeline::{GuardedLayer, Routed};
//! use tower_layer::Layer;
//! use tower_service::Service;
//!
//! #[derive(Clone)]
//! struct Upstream;
//! impl Service<Routed<String>> for Upstream {
//!     type Response = String;
//!     type Error = std::io::Error;
//!     type Future = std::future::Ready<Result<String, std::io::Error>>;
//!     fn poll_ready(
//!         &mut self,
//!         _: &mut std::task::Context<'_>,
//!     ) -> std::task::Poll<Result<(), Self::Error>> {
//!         std::task::Poll::Ready(Ok(()))
//!     }
//!     fn call(&mut self, r: Routed<String>) -> Self::Future {
//!         std::future::ready(Ok(format!("{} says hi to {}", r.target.model, r.request)))
//!     }
//! }
//!
//! let layer = GuardedLayer::new(coordinator, "chat", |_: &std::io::Error| Class::Retryable {
//!     retry_after: None,
//! });
//! let mut svc = layer.layer(Upstream);
//! let answered = svc.call("you".to_owned()).await;
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Answered, ChainTarget, Class};
use crate::{CallError, Coordinator};

/// One attempt's request as the wrapped service receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Routed<R> {
    /// The caller's request.
    pub request: R,
    /// The target to ask (name, model, max_tokens, timeout).
    pub target: ChainTarget,
    /// The attempt's number over the whole chain (1-based).
    pub attempt: u32,
}

/// Wraps a per-attempt service in a feature's fallback chain. Configuration only; cheap to
/// clone.
pub struct GuardedLayer<C> {
    coordinator: Coordinator,
    feature: Arc<str>,
    classify: C,
}

impl<C: Clone> Clone for GuardedLayer<C> {
    fn clone(&self) -> Self {
        GuardedLayer {
            coordinator: self.coordinator.clone(),
            feature: Arc::clone(&self.feature),
            classify: self.classify.clone(),
        }
    }
}

impl<C> std::fmt::Debug for GuardedLayer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedLayer")
            .field("feature", &self.feature)
            .finish_non_exhaustive()
    }
}

impl<C> GuardedLayer<C> {
    /// Calls of `feature` through `coordinator`, errors classified by `classify`.
    pub fn new(coordinator: Coordinator, feature: &str, classify: C) -> Self {
        GuardedLayer {
            coordinator,
            feature: Arc::from(feature),
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for GuardedLayer<C> {
    type Service = Guarded<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GuardedLayer`] makes.
pub struct Guarded<S, C> {
    inner: S,
    layer: GuardedLayer<C>,
}

impl<S: Clone, C: Clone> Clone for Guarded<S, C> {
    fn clone(&self) -> Self {
        Guarded {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, C> std::fmt::Debug for Guarded<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("feature", &self.layer.feature)
            .finish_non_exhaustive()
    }
}

impl<S, C, R> Service<R> for Guarded<S, C>
where
    S: Service<Routed<R>> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    C: Fn(&S::Error) -> Class + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
{
    type Response = Answered<S::Response>;
    type Error = CallError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    /// Always ready: the chain asks the wrapped service for readiness before each attempt.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        // Behind a mutex so that services that are `Send` but not `Sync` fit: each attempt
        // clones its own.
        let inner = std::sync::Mutex::new(self.inner.clone());
        let layer = self.layer.clone();
        Box::pin(async move {
            let call = |target: &ChainTarget, attempt: u32| {
                let mut svc = inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let routed = Routed {
                    request: request.clone(),
                    target: target.clone(),
                    attempt,
                };
                async move {
                    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                    svc.call(routed).await
                }
            };
            let classify = &layer.classify;
            layer
                .coordinator
                .guarded_call(&layer.feature, call, |e| classify(e))
                .await
        })
    }
}
