//! The cache on the in-process store: the twin of `lua/cache_put.lua` / `cache_get.lua`.
//! Per feature: entries by key, an index by expiry (ms) then insertion order; a put drops
//! expired entries, then the entries closest to expiry beyond the cap.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{CacheSpec, StoredEntry};

#[derive(Debug, Clone)]
struct Entry {
    body: String,
    model: String,
    exact: String,
    stored_at_ms: u64,
    /// Its place in the index: (expiry ms, sequence).
    slot: (u64, u64),
}

#[derive(Debug, Default)]
struct Feature {
    entries: HashMap<String, Entry>,
    index: BTreeMap<(u64, u64), String>,
}

impl Feature {
    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.index.remove(&e.slot);
        }
    }

    fn drop_expired(&mut self, now: u64) {
        while let Some((&slot, _)) = self.index.first_key_value() {
            if slot.0 > now {
                break;
            }
            if let Some(key) = self.index.remove(&slot) {
                self.entries.remove(&key);
            }
        }
    }
}

/// Every feature's cache, by index key.
#[derive(Debug, Default)]
pub(crate) struct MemoryCache {
    inner: Mutex<(HashMap<String, Feature>, u64)>,
}

impl MemoryCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Feature>, u64)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an entry under `key` for `spec.ttl_ms`; returns how many entries were evicted
    /// for the cap.
    pub(crate) fn put(
        &self,
        spec: &CacheSpec,
        key: &str,
        model: &str,
        exact: &str,
        body: &str,
        now: u64,
    ) -> u32 {
        let mut guard = self.lock();
        let (features, seq) = &mut *guard;
        *seq += 1;
        let slot = (now.saturating_add(spec.ttl_ms), *seq);
        let f = features.entry(spec.keys.index.clone()).or_default();
        f.remove(key);
        f.drop_expired(now);
        f.entries.insert(
            key.to_owned(),
            Entry {
                body: body.to_owned(),
                model: model.to_owned(),
                exact: exact.to_owned(),
                stored_at_ms: now,
                slot,
            },
        );
        f.index.insert(slot, key.to_owned());
        let mut evicted = 0;
        while f.entries.len() > spec.max_entries.max(1) as usize {
            let Some((_, victim)) = f.index.pop_first() else {
                break;
            };
            f.entries.remove(&victim);
            evicted += 1;
        }
        evicted
    }

    /// The unexpired entry under `key`.
    pub(crate) fn get(&self, spec: &CacheSpec, key: &str, now: u64) -> Option<StoredEntry> {
        let guard = self.lock();
        let e = guard.0.get(&spec.keys.index)?.entries.get(key)?;
        if e.slot.0 <= now {
            return None;
        }
        Some(StoredEntry {
            body: e.body.clone(),
            model: e.model.clone(),
            exact: e.exact.clone(),
            stored_at_ms: e.stored_at_ms,
            now_ms: now,
        })
    }

    /// Entries held for the feature (expired ones not yet dropped included).
    pub(crate) fn len(&self, spec: &CacheSpec) -> usize {
        self.lock()
            .0
            .get(&spec.keys.index)
            .map_or(0, |f| f.entries.len())
    }
}
