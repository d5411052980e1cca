//! The fleet-wide retry budget per target (`lua/budget_deposit.lua`,
//! `lua/budget_withdraw.lua`; arithmetic in [`crate::retry::budget`]). Requests are deposited
//! in batches by a background task; a withdrawal (one script call) happens only on the retry
//! path, so a successful first attempt never waits for either.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{reply, RedisStore};
use crate::retry::budget::{BudgetParams, Withdrawn};
use crate::StoreError;

pub(super) static DEPOSIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../../../lua/lib.lua"),
        "\n",
        include_str!("../../../lua/budget_deposit.lua")
    ))
});
pub(super) static WITHDRAW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../../../lua/lib.lua"),
        "\n",
        include_str!("../../../lua/budget_withdraw.lua")
    ))
});

fn deposit_inv(
    script: &'static Script,
    key: &str,
    p: &BudgetParams,
    n: u64,
) -> ScriptInvocation<'static> {
    let mut inv = script.key(key);
    inv.arg(p.bucket_ms).arg(p.buckets).arg(n);
    inv
}

fn withdraw_inv(
    script: &'static Script,
    key: &str,
    p: &BudgetParams,
    n: u64,
) -> ScriptInvocation<'static> {
    let mut inv = script.key(key);
    inv.arg(p.bucket_ms)
        .arg(p.buckets)
        .arg(n)
        .arg(p.ratio_ppm)
        .arg(p.reserve);
    inv
}

/// `budget_withdraw.lua`'s reply.
fn parse_withdraw(v: Value) -> Result<Withdrawn, StoreError> {
    const S: &str = "budget_withdraw.lua";
    match reply::ints(v, S)?[..] {
        [granted @ (0 | 1), requests, retries, _now] => Ok(Withdrawn {
            granted: granted == 1,
            requests: reply::unsigned(requests, S)?,
            retries: reply::unsigned(retries, S)?,
        }),
        ref other => Err(StoreError::Reply(format!(
            "{S}: unexpected reply {other:?}"
        ))),
    }
}

impl RedisStore {
    /// Counts `n` requests in the budget at `key`.
    pub(crate) async fn budget_deposit(
        &self,
        key: &str,
        p: &BudgetParams,
        n: u64,
    ) -> Result<(), StoreError> {
        // Not retried after a dropped connection: a deposit counted twice would allow more
        // retries than configured; one lost allows fewer.
        let v = self.core.call(&deposit_inv(&DEPOSIT, key, p, n)).await?;
        reply::int(&v, "budget_deposit.lua").map(|_| ())
    }

    /// Counts `n` requests, then takes one retry from the budget at `key` if it allows one.
    pub(crate) async fn budget_withdraw(
        &self,
        key: &str,
        p: &BudgetParams,
        n: u64,
    ) -> Result<Withdrawn, StoreError> {
        let v = self.core.call(&withdraw_inv(&WITHDRAW, key, p, n)).await?;
        parse_withdraw(v)
    }
}

#[cfg(test)]
mod difftest {
    //! The budget scripts against `MemoryStore`'s budget, step by step on one
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

    static T_DEPOSIT: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/budget_deposit.lua")));
    static T_WITHDRAW: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/budget_withdraw.lua")));

    #[test]
    fn budget_scripts_match_the_memory_store() {
        let server = support::RedisServer::start();
        let mut con = support::sync_connection(&server.url());
        let clock = ManualClock::default();
        let memory = MemoryStore::new(Arc::new(clock.clone()));
        let mut rng = StdRng::seed_from_u64(11);
        let params = [
            BudgetParams::new(0.2, Duration::from_secs(10), 0.0),
            BudgetParams::new(0.5, Duration::from_secs(1), 2.0),
            BudgetParams::new(0.1, Duration::from_millis(100), 0.5),
        ];
        let mut granted = 0;
        let mut refused = 0;
        for (k, p) in params.iter().enumerate() {
            let key = format!("fusebox:{{difftest:t:m{k}}}:v1:budget");
            for step in 0..600 {
                // Mostly within a bucket, sometimes across several, sometimes past the window.
                let jump = match rng.random_range(0..10) {
                    0 => p.bucket_ms * rng.random_range(1..15),
                    1..=3 => rng.random_range(0..p.bucket_ms.max(2)),
                    _ => 0,
                };
                clock.advance(Duration::from_millis(jump));
                let now = clock.now_ms();
                set_clock(&mut con, now);
                // The key expires on Redis's own clock, which the test does not move.
                let _: () = redis::cmd("PERSIST")
                    .arg(&key)
                    .query(&mut con)
                    .expect("persist");
                let n = rng.random_range(0..4u64);
                if rng.random_bool(0.4) {
                    let v: Value = deposit_inv(&T_DEPOSIT, &key, p, n)
                        .invoke(&mut con)
                        .expect("budget_deposit.lua");
                    assert_eq!(reply::int(&v, "deposit").expect("now") as u64, now);
                    memory.budget_deposit_now(&key, p, n);
                } else {
                    let v: Value = withdraw_inv(&T_WITHDRAW, &key, p, n)
                        .invoke(&mut con)
                        .expect("budget_withdraw.lua");
                    let redis_w = parse_withdraw(v).expect("budget_withdraw.lua reply");
                    let memory_w = memory.budget_withdraw_now(&key, p, n);
                    assert_eq!(
                        redis_w, memory_w,
                        "params {k} step {step}: withdraw after {n} requests at {now}"
                    );
                    if redis_w.granted {
                        granted += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
        }
        assert!(
            granted > 20 && refused > 20,
            "{granted} granted, {refused} refused"
        );
    }

    #[test]
    fn malformed_budget_replies_are_errors_not_panics() {
        assert!(parse_withdraw(Value::Int(1)).is_err());
        assert!(parse_withdraw(Value::Array(vec![Value::Int(2); 4])).is_err());
        assert!(parse_withdraw(Value::Array(vec![Value::Int(1); 3])).is_err());
        assert!(parse_withdraw(Value::Array(vec![
            Value::Int(1),
            Value::Int(-1),
            Value::Int(0),
            Value::Int(0)
        ]))
        .is_err());
        assert_eq!(
            parse_withdraw(Value::Array(vec![
                Value::Int(1),
                Value::Int(5),
                Value::Int(1),
                Value::Int(0)
            ]))
            .expect("well formed"),
            Withdrawn {
                granted: true,
                requests: 5,
                retries: 1
            }
        );
    }
}
