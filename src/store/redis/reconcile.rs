//! Reconciliation after local mode: the permits a replica granted on local state while Redis
//! was unavailable, still running when it answers again, are counted in the fleet's bulkhead
//! (`lua/adopt.lua`) before the replica decides anything on shared state again.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation};

use super::{reply, RedisStore};
use crate::store::FeatureSpec;
use crate::StoreError;

pub(super) static ADOPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../../../lua/lib.lua"),
        "\n",
        include_str!("../../../lua/adopt.lua")
    ))
});

fn adopt_inv(
    script: &'static Script,
    permits_key: &str,
    permits: &[(String, u64)],
) -> ScriptInvocation<'static> {
    let mut inv = script.key(permits_key);
    for (id, left) in permits {
        inv.arg(id.as_str()).arg(*left);
    }
    inv
}

impl RedisStore {
    /// Counts `permits` ((id, ms of lease left), granted on local state and still running)
    /// in the feature's shared bulkhead; returns how many were added. Safe to repeat.
    pub(crate) async fn adopt(
        &self,
        feature: &FeatureSpec,
        permits: &[(String, u64)],
    ) -> Result<u32, StoreError> {
        if permits.is_empty() {
            return Ok(0);
        }
        let v = self
            .call_idempotent(&adopt_inv(&ADOPT, &feature.keys.permits, permits))
            .await?;
        let n = reply::unsigned(reply::int(&v, "adopt.lua")?, "adopt.lua")?;
        u32::try_from(n).map_err(|_| StoreError::Reply(format!("adopt.lua: count {n}")))
    }
}

#[cfg(test)]
mod difftest {
    //! `adopt.lua` against `MemoryStore::adopt_now`, step by step on one test-controlled
    //! clock, interleaved with admissions and releases (the permits it adds must count, and
    //! be released and reclaimed, like any other).

    use std::sync::{Arc, LazyLock};
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use redis::Script;

    use super::*;
    use crate::bulkhead::BulkheadParams;
    use crate::clock::{Clock, ManualClock};
    use crate::keys::feature_keys;
    use crate::store::MemoryStore;

    use super::super::difftest::{set_clock, support, with_lib};

    static T_ADOPT: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/adopt.lua")));
    static T_IN_FLIGHT: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/in_flight.lua")));

    #[test]
    fn adopt_matches_the_memory_store() {
        let server = support::RedisServer::start();
        let mut con = support::sync_connection(&server.url());
        let clock = ManualClock::default();
        let memory = MemoryStore::new(Arc::new(clock.clone()));
        let feature = FeatureSpec {
            name: "chat".into(),
            keys: feature_keys("difftest", "chat"),
            bulkhead: Some(BulkheadParams {
                limit: 3,
                lease_ms: 1000,
            }),
            rate: None,
        };
        let mut rng = StdRng::seed_from_u64(11);
        for step in 0..300 {
            clock.advance(Duration::from_millis(rng.random_range(0..300)));
            let now = clock.now_ms();
            set_clock(&mut con, now);
            let _: () = redis::cmd("PERSIST")
                .arg(&feature.keys.permits)
                .query(&mut con)
                .expect("persist");
            match rng.random_range(0..3) {
                0 => {
                    let n = rng.random_range(0..4);
                    let permits: Vec<(String, u64)> = (0..n)
                        .map(|_| {
                            (
                                format!("p{}", rng.random_range(0..8)),
                                rng.random_range(0..1500),
                            )
                        })
                        .collect();
                    let v: redis::Value = adopt_inv(&T_ADOPT, &feature.keys.permits, &permits)
                        .invoke(&mut con)
                        .expect("adopt.lua");
                    let redis_n = reply::int(&v, "adopt.lua").expect("count");
                    let memory_n = memory.adopt_now(&feature, &permits);
                    assert_eq!(
                        redis_n,
                        i64::from(memory_n),
                        "step {step}: adopt {permits:?}"
                    );
                }
                1 => {
                    let id = format!("p{}", rng.random_range(0..8));
                    let _: i64 = redis::cmd("ZREM")
                        .arg(&feature.keys.permits)
                        .arg(&id)
                        .query(&mut con)
                        .expect("release");
                    memory.release_now(&feature, &id);
                }
                _ => {}
            }
            let v: redis::Value = T_IN_FLIGHT
                .key(&feature.keys.permits)
                .invoke(&mut con)
                .expect("in_flight.lua");
            let redis_live = reply::int(&v, "in_flight.lua").expect("count");
            let memory_live = memory.live_permits(&feature).len() as i64;
            assert_eq!(
                redis_live, memory_live,
                "step {step}: permits in flight at {now}"
            );
        }
    }
}
