//! The Messages client with the whole guarded-call pipeline preconfigured: one call walks
//! a feature's fallback chain, classified by the client's policy, with the feature's
//! degraded-response cache and canned last resort ([`Guarded`]).

use std::sync::Arc;

use serde_json::Value;

use super::client::{ApiKey, Client, MessageStream, Reply};
use super::types::MessagesRequest;
use crate::cache::{Answer, Caller};
use crate::classify::Classification;
use crate::error::UpstreamError;
use crate::pipeline::{Answered, CacheUse, ChainTarget, Retry};
use crate::retry::BackoffPolicy;
use crate::{CallError, Coordinator};

/// A [`Client`] bound to a [`Coordinator`] and one of its features: every call runs the
/// feature's chain (`[features."x"] chain`), each attempt sent with its target's `model`
/// (and `max_tokens`, when `[targets."x"] max_tokens` is set), failures classified by the
/// client's [`Policy`](crate::classify::Policy) ([`AnthropicPolicy`] by default) and routed
/// as [`crate::pipeline`] describes (retryable failures retried with the feature's `[retry]`
/// backoff within the target's fleet retry budget, unless [`Guarded::retry`] says
/// otherwise; the breaker records the classification's health). Successful plain answers are stored in the feature's
/// degraded-response cache under the caller's tenant (a salted hash of the API key, never
/// the key), and served from it, marked degraded with their age, when every model fails;
/// then the canned answer.
///
/// Made by [`Client::guarded`]. Cheap to clone.
///
/// [`AnthropicPolicy`]: crate::classify::AnthropicPolicy
#[derive(Clone)]
pub struct Guarded {
    client: Client,
    coordinator: Coordinator,
    feature: String,
    retry: Option<Arc<dyn Retry>>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("client", &self.client)
            .field("feature", &self.feature)
            .finish_non_exhaustive()
    }
}

/// The answer of a guarded plain call: the target's [`Reply`], a cached answer or the
/// canned text, with what answered.
pub type GuardedReply = Answered<Reply>;

/// The answer of a guarded stream: the target's [`MessageStream`] (whose first event already
/// arrived), a cached answer or the canned text, with what answered.
pub type GuardedStream = Answered<MessageStream>;

impl Client {
    /// This client with `coordinator`'s pipeline for `feature` (see [`Guarded`]).
    pub fn guarded(&self, coordinator: Coordinator, feature: impl Into<String>) -> Guarded {
        Guarded {
            client: self.clone(),
            coordinator,
            feature: feature.into(),
            retry: None,
        }
    }
}

/// `request` as the target asks it: its model, and its `max_tokens` when configured.
fn for_target(request: &MessagesRequest, t: &ChainTarget) -> MessagesRequest {
    let mut r = request.clone();
    r.model = t.model.clone();
    if let Some(m) = t.max_tokens {
        r.max_tokens = u64::from(m);
    }
    r
}

fn classify(e: &UpstreamError) -> Classification {
    e.classification
}

impl Guarded {
    /// With a retry policy for retryable failures instead of the default: the feature's
    /// `[retry]` backoff ([`BackoffPolicy`]), each retry drawing on the target's fleet-wide
    /// retry budget, as [`Coordinator::guarded_call`] does. [`crate::pipeline::NoRetry`]
    /// makes one attempt per target.
    pub fn retry(mut self, retry: Arc<dyn Retry>) -> Self {
        self.retry = Some(retry);
        self
    }

    /// The retry policy of a call: the one given, else the feature's backoff.
    fn policy(&self) -> Result<Arc<dyn Retry>, crate::Error> {
        match &self.retry {
            Some(r) => Ok(Arc::clone(r)),
            None => Ok(Arc::new(BackoffPolicy::new(
                self.coordinator.retry_backoff(&self.feature)?,
            ))),
        }
    }

    /// The feature.
    pub fn feature(&self) -> &str {
        &self.feature
    }

    /// The client sending `api_key` (an error when it cannot be a header value).
    fn keyed(&self, api_key: &str) -> Result<Client, crate::Error> {
        Ok(self.client.with_api_key(ApiKey::new(api_key)?))
    }

    /// Sends `request` with `api_key` through the feature's chain as a plain request (its
    /// `stream` field is ignored) and returns the best answer available.
    ///
    /// Errors as [`Coordinator::guarded_call`]: with a canned answer configured, only a
    /// fusebox error (unknown feature, a key that cannot be a header) and a final error of
    /// the request or the caller (a 400, a 401) are an `Err`.
    pub async fn messages(
        &self,
        request: &MessagesRequest,
        api_key: &str,
    ) -> Result<GuardedReply, CallError<UpstreamError>> {
        let client = self.keyed(api_key).map_err(CallError::Fusebox)?;
        let retry = self.policy().map_err(CallError::Fusebox)?;
        let as_json = serde_json::to_value(request).unwrap_or(Value::Null);
        let to_answer = |r: &Reply, t: &ChainTarget| {
            let body = serde_json::to_value(&r.message).ok()?;
            Answer::success(r.status, t.model.clone(), body).ok()
        };
        let cache = CacheUse {
            caller: Caller {
                api_key: Some(api_key),
                tenant_id: None,
            },
            request: &as_json,
            answer: &to_answer,
        };
        let client = &client;
        let call = |t: &ChainTarget, _n: u32| {
            let r = for_target(request, t);
            async move { client.send(&r).await }
        };
        self.coordinator
            .guarded_call_cached(&self.feature, &*retry, Some(cache), call, classify)
            .await
    }

    /// Sends `request` with `api_key` through the feature's chain as a stream. An attempt
    /// counts as answered once its first event (`message_start`) arrived: a failure before
    /// that (a status, a dropped connection, an `error` event as the first event) moves on
    /// along the chain; a failure after it is the caller's, from [`MessageStream::next`],
    /// since bytes were already handed over. Streams are not stored in the cache; a cached
    /// plain answer can serve one when every model fails.
    pub async fn stream(
        &self,
        request: &MessagesRequest,
        api_key: &str,
    ) -> Result<GuardedStream, CallError<UpstreamError>> {
        let client = self.keyed(api_key).map_err(CallError::Fusebox)?;
        let retry = self.policy().map_err(CallError::Fusebox)?;
        let as_json = serde_json::to_value(request).unwrap_or(Value::Null);
        let no_store = |_: &MessageStream, _: &ChainTarget| None;
        let cache = CacheUse {
            caller: Caller {
                api_key: Some(api_key),
                tenant_id: None,
            },
            request: &as_json,
            answer: &no_store,
        };
        let client = &client;
        let call = |t: &ChainTarget, _n: u32| {
            let r = for_target(request, t);
            async move {
                let mut s = client.stream(&r).await?;
                match s.next().await {
                    Some(Ok(first)) => {
                        s.unread(first);
                        Ok(s)
                    }
                    Some(Err(e)) => Err(e),
                    // Ended well with no event: nothing to hand over, still an answer.
                    None => Ok(s),
                }
            }
        };
        self.coordinator
            .guarded_call_cached(&self.feature, &*retry, Some(cache), call, classify)
            .await
    }
}
