-- not_before.lua: set a target's fleet-wide "not before" instant from an upstream retry-after
-- (BreakerState::set_not_before). Not a breaker failure. Runs after lib.lua.
--
-- KEYS: [1] breaker hash
-- ARGV: [1] retry_after_ms  [2] idle_ttl_ms
-- Returns: {now_ms, not_before_ms} (the instant in force after the call).
-- Invariants: the instant only moves later (max of the stored one and now + retry_after);
-- the hash keeps its expiry rule (and lives at least until the instant + idle TTL).

local now = now_ms()
local breaker_key = KEYS[1]
local retry_after = tonumber(ARGV[1]) or 0
local idle = tonumber(ARGV[2]) or 0

local f = redis.call('HMGET', breaker_key, 's', 'ou', 'nb')
local s, open_until, not_before = state_code(f[1]), u64(f[2]), u64(f[3])
local want = now + retry_after
if want > not_before then
  not_before = want
  redis.call('HSET', breaker_key, 'nb', fmt(not_before))
  expire_breaker(breaker_key, s, open_until, not_before, now, idle)
end
return { now, not_before }
