//! The degraded-response cache: successful answers kept per feature and tenant, served when
//! every model of a feature's chain fails, marked as degraded with their age.
//!
//! # The key
//!
//! `feature + tenant + request`, the model left out, so that any model's earlier answer can
//! serve when every model is down:
//!
//! * **tenant**: a salted SHA-256 hash ([`Tenant`]) of the caller's API key, of a tenant id,
//!   or one shared tenant, as `[cache] tenant` says. An answer is served only to the tenant
//!   that stored it; the key itself is never stored, logged or put in a Redis key.
//! * **request**: the Messages request in canonical form ([`normalize::exact`]): `model`,
//!   `stream`, `metadata`, `service_tier` and `cache_control` markers dropped, string content
//!   unified with a text block, object keys sorted; system, messages, tools, temperature,
//!   max_tokens and every other field kept exactly.
//!
//! # What "similar" means
//!
//! With `similar = true` (the default) two requests match when their exact forms are equal
//! except for the text of the **last message, when it is the user's**, and those texts are
//! equal after [`normalize::fold_text`]: Unicode lower case, whitespace runs collapsed,
//! punctuation (Unicode category P*) stripped from the edges of words. So `"What is the
//! capital of France?"`, `"what is the capital of  france"` and `"What is the capital of
//! France ?!"` match; `"What is the capital of Spain?"` does not, nor `2.5` and `25` (inner
//! punctuation is kept), nor `2+2` and `2-2` (symbols are kept), nor the same question after
//! a different system prompt or earlier turn. Word order and word choice always matter: no
//! token sets, no embeddings, because a wrong cached answer is worse than the canned one.
//! Unicode normalization forms (NFC vs NFD) are not unified.
//!
//! An entry is stored under its similar form's digest (exact when `similar = false` or the
//! last message is not a user text), so one lookup finds it; the entry keeps its exact
//! digest, and a hit says whether it was [`Match::Exact`] or [`Match::Similar`]. Two
//! requests of one similar class share one entry (the later answer replaces the earlier).
//!
//! # Where it lives
//!
//! In the coordinator's store: the embedded [`MemoryStore`](crate::store::MemoryStore), or
//! Redis through a connection pool of its own (deadpool-redis), never the admission
//! connection, so a large write cannot delay an admission. When Redis is configured but
//! unreachable the cache fails soft: a read is a miss, a write is dropped (both reported as
//! [`crate::Event::CacheFailed`] and to the store's health); there is no local fallback,
//! since a replica's own cache would only hold what it stored since Redis went away.

pub(crate) mod key;
pub(crate) mod memory;
pub mod normalize;

use std::time::Duration;

use serde_json::Value;

pub use self::key::{RequestKey, Tenant};

/// A successful answer, the only thing the cache stores: made from a 2xx response whose
/// body is not an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    model: String,
    body: Value,
}

/// Why a response cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotStorable {
    /// Not a 2xx status.
    #[error("status {0} is not a success")]
    Status(u16),
    /// A body of `"type": "error"` (an error delivered with a 2xx status).
    #[error("the body is an error")]
    ErrorBody,
}

impl Answer {
    /// The answer of a response with HTTP `status`, from `model`, with JSON `body`; refused
    /// unless the status is 2xx and the body is not an error object.
    pub fn success(
        status: u16,
        model: impl Into<String>,
        body: Value,
    ) -> Result<Self, NotStorable> {
        if !(200..300).contains(&status) {
            return Err(NotStorable::Status(status));
        }
        if body.get("type").and_then(Value::as_str) == Some("error") {
            return Err(NotStorable::ErrorBody);
        }
        Ok(Answer {
            model: model.into(),
            body,
        })
    }

    /// The model that answered.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The response body.
    pub fn body(&self) -> &Value {
        &self.body
    }
}

/// How a cached entry matched the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Match {
    /// Same canonical request.
    Exact,
    /// Same except case, whitespace and edge punctuation of the last user message.
    Similar,
}

/// Where a degraded answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DegradedSource {
    /// The degraded-response cache.
    Cache,
}

impl DegradedSource {
    /// A stable name: `cache`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DegradedSource::Cache => "cache",
        }
    }
}

/// An answer served from the cache: always degraded, with its source and age.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    /// The stored response body.
    pub body: Value,
    /// The model that gave it.
    pub model: String,
    /// Time since it was stored, by the store's clock (Redis `TIME`, or the memory store's).
    pub age: Duration,
    /// When it was stored (ms since the Unix epoch, store's clock).
    pub stored_at_ms: u64,
    /// Exact or similar match.
    pub matched: Match,
    /// Always [`DegradedSource::Cache`].
    pub source: DegradedSource,
}

impl Cached {
    /// Always true: a cached answer is a degraded one.
    pub fn is_degraded(&self) -> bool {
        true
    }
}

/// Who is calling, for the cache's tenant (which part is used is `[cache] tenant`). Its
/// `Debug` output never shows the API key.
#[derive(Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The caller's API key (hashed, never stored).
    pub api_key: Option<&'a str>,
    /// The caller's tenant id.
    pub tenant_id: Option<&'a str>,
}

impl std::fmt::Debug for Caller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("api_key", &self.api_key.map(|_| "***"))
            .field("tenant_id", &self.tenant_id)
            .finish()
    }
}

/// What a cache write came to.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Stored {
    /// Stored.
    Yes,
    /// The feature's cache is off.
    Disabled,
    /// Not a cacheable request (not a Messages request object).
    NotCacheable,
    /// No tenant: the caller gave no API key (or tenant id) and the cache is not shared.
    NoTenant,
    /// The body is larger than `max_value_bytes`.
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The bound.
        max: u64,
    },
    /// The store failed or was skipped (Redis down): the write is dropped.
    Dropped(crate::StoreError),
}

/// One feature's cache as the store sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    /// The feature.
    pub feature: String,
    /// Its keys.
    pub keys: crate::keys::CacheKeys,
    /// Entry lifetime, ms.
    pub ttl_ms: u64,
    /// Most entries kept.
    pub max_entries: u32,
}

/// An entry as a store returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntry {
    /// The body, as stored (JSON text).
    pub body: String,
    /// The model that answered.
    pub model: String,
    /// The exact digest of the request that stored it.
    pub exact: String,
    /// When it was stored (ms, store's clock).
    pub stored_at_ms: u64,
    /// The store's clock when it was read (ms).
    pub now_ms: u64,
}

impl StoredEntry {
    /// The entry as served to a request with exact digest `exact`; `None` when the body is
    /// not JSON (a corrupted or foreign value: a miss, never a panic).
    pub fn served(self, exact: &str) -> Option<Cached> {
        let body: Value = serde_json::from_str(&self.body).ok()?;
        Some(Cached {
            body,
            model: self.model,
            age: Duration::from_millis(self.now_ms.saturating_sub(self.stored_at_ms)),
            stored_at_ms: self.stored_at_ms,
            matched: if self.exact == exact {
                Match::Exact
            } else {
                Match::Similar
            },
            source: DegradedSource::Cache,
        })
    }
}
