//! Fleet membership: every coordinator that admits calls keeps an expiring entry in one
//! sorted set (`lua/member.lua`), so the fleet measures its own size for local mode, and
//! operators can list the live members (`lua/members.lua`). Cold path: one call per renewal
//! interval per replica, from a background task; never on a caller's way.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{reply, RedisStore};
use crate::StoreError;

pub(super) static MEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../../../lua/lib.lua"),
        "\n",
        include_str!("../../../lua/member.lua")
    ))
});
pub(super) static MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../../../lua/lib.lua"),
        "\n",
        include_str!("../../../lua/members.lua")
    ))
});

fn member_inv(
    script: &'static Script,
    key: &str,
    id: &str,
    ttl_ms: u64,
) -> ScriptInvocation<'static> {
    let mut inv = script.key(key);
    inv.arg(id).arg(ttl_ms);
    inv
}

fn members_inv(script: &'static Script, key: &str) -> ScriptInvocation<'static> {
    script.key(key)
}

/// `member.lua`'s reply: the live member count.
fn parse_member(v: &Value) -> Result<u32, StoreError> {
    let n = reply::int(v, "member.lua")?;
    u32::try_from(n)
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| StoreError::Reply(format!("member.lua: member count {n}")))
}

/// `members.lua`'s reply: (replica id, ms until its entry expires).
fn parse_members(v: Value) -> Result<Vec<(String, u64)>, StoreError> {
    let items = reply::array(v, "members.lua")?;
    if items.len() % 2 != 0 {
        return Err(StoreError::Reply(format!(
            "members.lua: {} elements, expected pairs",
            items.len()
        )));
    }
    items
        .chunks(2)
        .map(|pair| {
            let id = match &pair[0] {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                other => {
                    return Err(StoreError::Reply(format!(
                        "members.lua: member id {other:?}"
                    )))
                }
            };
            let left = reply::unsigned(reply::int(&pair[1], "members.lua")?, "members.lua")?;
            Ok((id, left))
        })
        .collect()
}

impl RedisStore {
    /// Enters (or renews) replica `id` in the membership at `key` for `ttl_ms`; returns the
    /// number of live members, this one included.
    pub(crate) async fn join(&self, key: &str, id: &str, ttl_ms: u64) -> Result<u32, StoreError> {
        let v = self
            .call_idempotent(&member_inv(&MEMBER, key, id, ttl_ms))
            .await?;
        parse_member(&v)
    }

    /// The live members at `key`: (replica id, ms until its entry expires), soonest first.
    pub(crate) async fn members(&self, key: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let v = self.call_idempotent(&members_inv(&MEMBERS, key)).await?;
        parse_members(v)
    }
}

#[cfg(test)]
mod difftest {
    //! `member.lua` and `members.lua` against `MemoryStore`'s membership, step by step on one
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

    static T_MEMBER: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/member.lua")));
    static T_MEMBERS: LazyLock<Script> =
        LazyLock::new(|| with_lib(include_str!("../../../lua/members.lua")));

    #[test]
    fn membership_scripts_match_the_memory_store() {
        let server = support::RedisServer::start();
        let mut con = support::sync_connection(&server.url());
        let clock = ManualClock::default();
        let memory = MemoryStore::new(Arc::new(clock.clone()));
        let key = "fusebox:{difftest:fleet}:v1:members".to_owned();
        let ids = ["a", "b", "c", "d", "e"];
        let mut rng = StdRng::seed_from_u64(7);
        for step in 0..400 {
            clock.advance(Duration::from_millis(rng.random_range(0..400)));
            let now = clock.now_ms();
            set_clock(&mut con, now);
            // The key expires on Redis's own clock, which the test does not move.
            let _: () = redis::cmd("PERSIST")
                .arg(&key)
                .query(&mut con)
                .expect("persist");
            if rng.random_bool(0.7) {
                let id = ids[rng.random_range(0..ids.len())];
                // Includes 0 and odd values: the script and the model clamp alike.
                let ttl = rng.random_range(0..1500u64);
                let v = member_inv(&T_MEMBER, &key, id, ttl)
                    .invoke(&mut con)
                    .expect("member.lua");
                let redis_n = parse_member(&v).expect("member.lua reply");
                let memory_n = memory.join_now(&key, id, ttl);
                assert_eq!(
                    redis_n, memory_n,
                    "step {step}: join {id} ttl {ttl} at {now}"
                );
            } else {
                let v: redis::Value = members_inv(&T_MEMBERS, &key)
                    .invoke(&mut con)
                    .expect("members.lua");
                let redis_m = parse_members(v).expect("members.lua reply");
                let memory_m = memory.members_now(&key);
                assert_eq!(redis_m, memory_m, "step {step}: members at {now}");
            }
        }
    }

    #[test]
    fn malformed_membership_replies_are_errors_not_panics() {
        assert!(parse_member(&Value::Int(0)).is_err());
        assert!(parse_member(&Value::Int(-3)).is_err());
        assert!(parse_member(&Value::Nil).is_err());
        assert!(parse_members(Value::Int(1)).is_err());
        assert!(parse_members(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(parse_members(Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::Int(-1)
        ]))
        .is_err());
        assert_eq!(
            parse_members(Value::Array(vec![
                Value::BulkString(b"a".to_vec()),
                Value::Int(5)
            ]))
            .expect("well formed"),
            vec![("a".to_owned(), 5)]
        );
    }
}
