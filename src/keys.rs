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
        let t = target_keys("app", "claude-sonnet-4-5");
        assert_eq!(tag(&t.breaker), tag(&t.probes));
        assert_eq!(tag(&t.breaker), "app:t:claude-sonnet-4-5");
        let f = feature_keys("app", "chat");
        assert_eq!(tag(&f.rate), tag(&f.permits));
        assert_ne!(tag(&f.rate), tag(&t.breaker));
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
