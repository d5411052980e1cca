//! The coordinator's degraded-response cache: reads and writes routed through [`Tiered`]
//! (Redis through the cache pool when configured and healthy, the embedded store without
//! Redis, nothing while Redis is down), keyed as `crate::cache` describes.

use std::sync::Arc;

use serde_json::Value;

use super::tiered::Tried;
use super::{Coordinator, Shared};
use crate::cache::{Answer, CacheSpec, Cached, Caller, RequestKey, Stored, Tenant};
use crate::config::{CacheConfig, TenantSource};
use crate::keys::cache_keys;
use crate::observer::Event;
use crate::{Error, StoreError};

/// One feature's cache settings, resolved at build.
#[derive(Debug)]
pub(crate) struct FeatureCache {
    spec: CacheSpec,
    config: CacheConfig,
}

impl FeatureCache {
    pub(crate) fn new(namespace: &str, feature: &str, config: CacheConfig) -> Self {
        FeatureCache {
            spec: CacheSpec {
                feature: feature.to_owned(),
                keys: cache_keys(namespace, feature),
                ttl_ms: config.ttl.as_millis() as u64,
                max_entries: config.max_entries,
            },
            config,
        }
    }
}

/// A write ready to go: key and value computed, nothing sent yet.
struct Write {
    cache: Arc<FeatureCache>,
    key: String,
    exact: String,
    model: String,
    body: String,
}

impl Shared {
    fn cache_of(&self, feature: &str) -> Result<Arc<FeatureCache>, Error> {
        self.caches
            .get(feature)
            .cloned()
            .ok_or_else(|| Error::UnknownFeature(feature.to_owned()))
    }

    fn tenant(&self, source: TenantSource, caller: Caller<'_>) -> Option<Tenant> {
        match source {
            TenantSource::ApiKey => caller
                .api_key
                .map(|k| Tenant::from_api_key(&self.namespace, k)),
            TenantSource::TenantId => caller
                .tenant_id
                .map(|t| Tenant::from_id(&self.namespace, t)),
            TenantSource::Shared => Some(Tenant::shared(&self.namespace)),
        }
    }

    fn cache_failed(&self, feature: &str, op: &'static str, error: StoreError) {
        self.emit(Event::CacheFailed {
            feature: feature.to_owned(),
            op,
            error,
        });
    }

    /// Key and value of a write, or why there is none.
    fn prepare(
        &self,
        feature: &str,
        caller: Caller<'_>,
        request: &Value,
        answer: &Answer,
    ) -> Result<Result<Write, Stored>, Error> {
        let cache = self.cache_of(feature)?;
        if !cache.config.enabled {
            return Ok(Err(Stored::Disabled));
        }
        let Some(tenant) = self.tenant(cache.config.tenant, caller) else {
            return Ok(Err(Stored::NoTenant));
        };
        let Some(rk) = RequestKey::of(request, cache.config.similar) else {
            return Ok(Err(Stored::NotCacheable));
        };
        let body = answer.body().to_string();
        if body.len() as u64 > cache.config.max_value_bytes {
            return Ok(Err(Stored::TooLarge {
                bytes: body.len(),
                max: cache.config.max_value_bytes,
            }));
        }
        Ok(Ok(Write {
            key: cache.spec.keys.entry(tenant.as_str(), &rk.lookup),
            exact: rk.exact,
            model: answer.model().to_owned(),
            body,
            cache,
        }))
    }

    async fn write(&self, w: Write) -> Stored {
        let spec = &w.cache.spec;
        let bound = w.cache.config.timeout;
        let tried = self
            .tiered
            .remote_side(|s| s.cache_put(spec, &w.key, &w.model, &w.exact, &w.body, bound))
            .await;
        let error = match tried {
            Tried::Done(_) => return Stored::Yes,
            Tried::Embedded => {
                self.tiered
                    .local
                    .cache_put(spec, &w.key, &w.model, &w.exact, &w.body);
                return Stored::Yes;
            }
            Tried::Failed(e) => e,
            Tried::Skipped => StoreError::Unavailable,
        };
        self.cache_failed(&spec.feature, "put", error.clone());
        Stored::Dropped(error)
    }
}

impl Coordinator {
    /// Whether `feature`'s degraded-response cache is on (`false` for an unknown feature).
    pub fn cache_enabled(&self, feature: &str) -> bool {
        self.shared
            .caches
            .get(feature)
            .is_some_and(|c| c.config.enabled)
    }

    /// The cached answer for `request` of `feature`, for this caller's tenant, if there is
    /// one: call it when every model failed. `Ok(None)` on a miss, when the feature's cache
    /// is off, when the caller has no tenant, and when the store cannot be read (Redis down:
    /// reported as [`Event::CacheFailed`]). Fails only for an unknown feature.
    pub async fn cache_get(
        &self,
        feature: &str,
        caller: Caller<'_>,
        request: &Value,
    ) -> Result<Option<Cached>, Error> {
        let s = &self.shared;
        let cache = s.cache_of(feature)?;
        if !cache.config.enabled {
            return Ok(None);
        }
        let Some(tenant) = s.tenant(cache.config.tenant, caller) else {
            return Ok(None);
        };
        let Some(rk) = RequestKey::of(request, cache.config.similar) else {
            return Ok(None);
        };
        let key = cache.spec.keys.entry(tenant.as_str(), &rk.lookup);
        let bound = cache.config.timeout;
        let entry = match s.tiered.remote_side(|st| st.cache_get(&key, bound)).await {
            Tried::Done(e) => e,
            Tried::Embedded => s.tiered.local.cache_get(&cache.spec, &key),
            Tried::Failed(e) => {
                s.cache_failed(feature, "get", e);
                return Ok(None);
            }
            Tried::Skipped => {
                s.cache_failed(feature, "get", StoreError::Unavailable);
                return Ok(None);
            }
        };
        let Some(entry) = entry else { return Ok(None) };
        match entry.served(&rk.exact) {
            Some(c) => Ok(Some(c)),
            None => {
                s.cache_failed(
                    feature,
                    "get",
                    StoreError::Reply("cached body is not JSON".to_owned()),
                );
                Ok(None)
            }
        }
    }

    /// Stores a successful answer for `request` of `feature` under this caller's tenant and
    /// waits for the store. Only an [`Answer`] can be stored, and only a 2xx response makes
    /// one. Fails only for an unknown feature; everything else is in [`Stored`].
    pub async fn cache_put(
        &self,
        feature: &str,
        caller: Caller<'_>,
        request: &Value,
        answer: &Answer,
    ) -> Result<Stored, Error> {
        match self.shared.prepare(feature, caller, request, answer)? {
            Ok(w) => Ok(self.shared.write(w).await),
            Err(not) => Ok(not),
        }
    }

    /// Like [`Self::cache_put`] without waiting: the key and size check happen now, the
    /// write in a background task (for the hot path: a successful call does not wait for
    /// the cache). A dropped write is reported as [`Event::CacheFailed`].
    pub fn cache_put_in_background(
        &self,
        feature: &str,
        caller: Caller<'_>,
        request: &Value,
        answer: &Answer,
    ) -> Result<Stored, Error> {
        match self.shared.prepare(feature, caller, request, answer)? {
            Ok(w) => {
                let shared = Arc::clone(&self.shared);
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(async move { shared.write(w).await });
                        Ok(Stored::Yes)
                    }
                    Err(_) => Ok(Stored::Dropped(StoreError::Connection(
                        "no Tokio runtime to write the cache from".to_owned(),
                    ))),
                }
            }
            Err(not) => Ok(not),
        }
    }
}
