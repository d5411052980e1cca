//! The fleet health signal per feature (`lua/fallback_rate.lua`; arithmetic in
//! [`crate::pipeline::alert`]). Counts are delivered in batches by a background task, never
//! on a caller's way.

use std::sync::LazyLock;

use redis::{Script, Value};

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
        let mut inv = FALLBACK_RATE.key(key);
        inv.arg(p.bucket_ms)
            .arg(p.buckets)
            .arg(calls)
            .arg(fallbacks)
            .arg(p.threshold_ppm)
            .arg(p.min_calls);
        // Not retried after a dropped connection: counted twice, it would skew the rate.
        parse(self.core.call(&inv).await?)
    }
}
