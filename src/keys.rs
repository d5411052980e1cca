//! The Redis key layout. Every key of one Lua script shares one hash tag (`{...}`), so the
//! scripts run unchanged on Redis Cluster: a target's keys are tagged by namespace + target,
//! a feature's by namespace + feature. `v1` versions the layout: a release that changes what
//! a key holds bumps it, so mixed versions during a rolling deploy never read each other's
//! values.

/// Layout version embedded in every key.
pub const LAYOUT: &str = "v1";

/// Keys of one target's breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetKeys {
    /// Hash: state, generation, open-until, counters, window buckets, not-before.
    pub breaker: String,
    /// Sorted set: half-open probe id -> lease expiry (ms).
    pub probes: String,
}

/// Keys of one feature's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureKeys {
    /// String: GCRA theoretical arrival time (µs).
    pub rate: String,
    /// Sorted set: bulkhead permit id -> lease expiry (ms).
    pub permits: String,
}

/// The keys of `target` in `namespace` (names checked by [`crate::config::check_name`]).
pub fn target_keys(namespace: &str, target: &str) -> TargetKeys {
    let base = format!("fusebox:{{{namespace}:t:{target}}}:{LAYOUT}");
    TargetKeys {
        breaker: format!("{base}:breaker"),
        probes: format!("{base}:probes"),
    }
}

/// The keys of `feature` in `namespace`.
pub fn feature_keys(namespace: &str, feature: &str) -> FeatureKeys {
    let base = format!("fusebox:{{{namespace}:f:{feature}}}:{LAYOUT}");
    FeatureKeys {
        rate: format!("{base}:rate"),
        permits: format!("{base}:permits"),
    }
}

/// Keys of one feature's degraded-response cache: under the feature's hash tag, so
/// `cache_put.lua` updates an entry and the feature's index in one slot on Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKeys {
    /// Sorted set: entry key -> expiry (ms); trimmed to the feature's cap.
    pub index: String,
    /// Prefix of the entry keys (hashes: body, model, exact digest, stored-at).
    entry_prefix: String,
}

impl CacheKeys {
    /// The key of one entry: `tenant` and `request` are hex digests (never the API key).
    pub fn entry(&self, tenant: &str, request: &str) -> String {
        format!("{}:{tenant}:{request}", self.entry_prefix)
    }
}

/// The cache keys of `feature` in `namespace`.
pub fn cache_keys(namespace: &str, feature: &str) -> CacheKeys {
    let base = format!("fusebox:{{{namespace}:f:{feature}}}:{LAYOUT}");
    CacheKeys {
        index: format!("{base}:cache-index"),
        entry_prefix: format!("{base}:cache"),
    }
}

/// The key of `target`'s fleet-wide retry budget (a hash of window buckets), under the
/// target's hash tag.
pub fn budget_key(namespace: &str, target: &str) -> String {
    format!("fusebox:{{{namespace}:t:{target}}}:{LAYOUT}:budget")
}

/// The key of `feature`'s fleet-wide fallback rate window (the health signal), under the
/// feature's hash tag.
pub fn fallback_rate_key(namespace: &str, feature: &str) -> String {
    format!("fusebox:{{{namespace}:f:{feature}}}:{LAYOUT}:fallback-rate")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: &str) -> &str {
        let open = key.find('{').unwrap_or(0);
        let close = key[open..].find('}').map_or(key.len(), |c| open + c);
        &key[open + 1..close]
    }

    #[test]
    fn keys_of_one_script_share_one_hash_tag() {
        let t = target_keys("app", "claude-sonnet-4-6");
        assert_eq!(tag(&t.breaker), tag(&t.probes));
        assert_eq!(tag(&t.breaker), "app:t:claude-sonnet-4-6");
        let f = feature_keys("app", "chat");
        assert_eq!(tag(&f.rate), tag(&f.permits));
        assert_ne!(tag(&f.rate), tag(&t.breaker));
        let c = cache_keys("app", "chat");
        assert_eq!(tag(&c.index), tag(&f.rate));
        assert_eq!(tag(&c.entry("ab", "cd")), tag(&c.index));
        assert_eq!(
            tag(&budget_key("app", "claude-sonnet-4-6")),
            tag(&t.breaker)
        );
    }

    #[test]
    fn namespaces_do_not_collide() {
        assert_ne!(target_keys("a", "m").breaker, target_keys("b", "m").breaker);
        assert_ne!(
            feature_keys("a", "chat").permits,
            feature_keys("b", "chat").permits
        );
    }
}
