//! The fleet health signal per feature (`lua/fallback_rate.lua`; arithmetic in
//! [`crate::pipeline::alert`]). Counts are delivered in batches by a background task, never
//! on a caller's way.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{reply, RedisStore};
use crate::pipeline::alert::{AlertParams, RateReading};
use crate::StoreError;

pub(super) static FALLBACK_RATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../../../lua/lib.lua"),
        "\n",
        include_str!("../../../lua/fallback_rate.lua")
    ))
});

fn rate_inv(
    script: &'static Script,
    key: &str,
    p: &AlertParams,
    calls: u64,
    fallbacks: u64,
) -> ScriptInvocation<'static> {
    let mut inv = script.key(key);
    inv.arg(p.bucket_ms)
        .arg(p.buckets)
        .arg(calls)
        .arg(fallbacks)
        .arg(p.threshold_ppm)
        .arg(p.min_calls);
    inv
}

fn parse(v: Value) -> Result<RateReading, StoreError> {
    const S: &str = "fallback_rate.lua";
    match reply::ints(v, S)?[..] {
        [fired @ (0 | 1), recovered @ (0 | 1), calls, fallbacks] => Ok(RateReading {
            fired: fired == 1,
            recovered: recovered == 1,
            calls: reply::unsigned(calls, S)?,
            fallbacks: reply::unsigned(fallbacks, S)?,
        }),
        ref other => Err(StoreError::Reply(format!(
            "{S}: unexpected reply {other:?}"
        ))),
    }
}

impl RedisStore {
    /// Counts `calls` guarded calls of which `fallbacks` fell back, in the window at `key`.
    pub(crate) async fn fallback_rate(
        &self,
        key: &str,
        p: &AlertParams,
        calls: u64,
        fallbacks: u64,
    ) -> Result<RateReading, StoreError> {
        let inv = rate_inv(&FALLBACK_RATE, key, p, calls, fallbacks);
        // Not retried after a dropped connection: counted twice, it would skew the rate.
        parse(self.core.call(&inv).await?)
    }
}

#[cfg(test)]
mod difftest {
    //! `fallback_rate.lua` against `MemoryStore`'s window, step by step on one
    //! test-controlled clock (TIME replaced by a hash the test sets, as in `difftest.rs`).

    use std::sync::{Arc, LazyLock};
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use redis::Script;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::store::MemoryStore;

    use super::super::difftest::{set_clock, support, with_lib};

    static T_RATE: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/fallback_rate.lua")));

    #[test]
    fn fallback_rate_script_matches_the_memory_store() {
        let server = support::RedisServer::start();
        let mut con = support::sync_connection(&server.url());
        let clock = ManualClock::default();
        let memory = MemoryStore::new(Arc::new(clock.clone()));
        let mut rng = StdRng::seed_from_u64(7);
        let params = [
            AlertParams::new(0.05, Duration::from_secs(10), 20),
            AlertParams::new(0.5, Duration::from_secs(1), 5),
            AlertParams::new(0.2, Duration::from_millis(100), 1),
        ];
        let (mut fired, mut recovered) = (0, 0);
        for (k, p) in params.iter().enumerate() {
            let key = format!("fusebox:{{difftest:f:m{k}}}:v1:fallback-rate");
            for step in 0..600 {
                let jump = match rng.random_range(0..10) {
                    0 => p.bucket_ms * rng.random_range(1..15),
                    1..=3 => rng.random_range(0..p.bucket_ms.max(2)),
                    _ => 0,
                };
                clock.advance(Duration::from_millis(jump));
                let now = clock.now_ms();
                set_clock(&mut con, now);
                let _: () = redis::cmd("PERSIST")
                    .arg(&key)
                    .query(&mut con)
                    .expect("persist");
                let calls = rng.random_range(0..6u64);
                // Phases of mostly fallbacks and mostly primary answers.
                let bad = (step / 50) % 2 == 0;
                let fallbacks = if bad {
                    rng.random_range(0..=calls)
                } else {
                    u64::from(calls > 0 && rng.random_bool(0.02))
                };
                let v: Value = rate_inv(&T_RATE, &key, p, calls, fallbacks)
                    .invoke(&mut con)
                    .expect("fallback_rate.lua");
                let redis_r = parse(v).expect("fallback_rate.lua reply");
                let memory_r = memory.fallback_rate_now(&key, p, calls, fallbacks);
                assert_eq!(
                    redis_r, memory_r,
                    "params {k} step {step}: {calls} calls, {fallbacks} fallbacks at {now}"
                );
                fired += usize::from(redis_r.fired);
                recovered += usize::from(redis_r.recovered);
            }
        }
        assert!(
            fired > 3 && recovered > 3,
            "{fired} fired, {recovered} recovered"
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(parse(Value::Int(1)).is_err());
        assert!(parse(Value::Array(vec![Value::Int(2); 4])).is_err());
        assert!(parse(Value::Array(vec![Value::Int(1); 3])).is_err());
        assert!(parse(Value::Array(vec![
            Value::Int(1),
            Value::Int(0),
            Value::Int(-1),
            Value::Int(0)
        ]))
        .is_err());
    }
}
