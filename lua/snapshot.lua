-- snapshot.lua: read one breaker as it stands, for status pages and tests. Read-only. Runs
-- after lib.lua. The arithmetic (open -> half-open due, window totals, live probes) is done in
-- Rust by BreakerState::snapshot over the state rebuilt from this raw reply, so the rules are
-- not written twice.
--
-- KEYS: [1] breaker hash  [2] probes zset
-- ARGV: none
-- Returns: {now_ms, n, field1, value1, ..., field(n/2), value(n/2), probe1, expiry1, ...}:
--   now (integer), n = number of hash items that follow (HGETALL), then the probes zset
--   (ZRANGE 0 -1 WITHSCORES) to the end. Field values and scores are strings.
-- Invariants: writes nothing.

local now = now_ms()
local hash = redis.call('HGETALL', KEYS[1])
local probes = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local out = { now, #hash }
for _, v in ipairs(hash) do
  out[#out + 1] = v
end
for _, v in ipairs(probes) do
  out[#out + 1] = v
end
return out
