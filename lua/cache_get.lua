-- cache_get.lua: read one degraded-response cache entry with the server's clock, in one
-- round trip (src/cache/memory.rs is its in-process twin). Self-contained.
--
-- KEYS: [1] entry hash
-- ARGV: none
-- Returns: {now_ms} when there is no entry; {now_ms, body, model, exact digest, stored_at_ms}
--          when there is (any field may be false when a foreign value lacks it: the caller
--          treats an incomplete or unparsable entry as a miss).
-- Invariants: reads only; an entry past its TTL is never returned (Redis expiry, and its
-- expiry field x checked against TIME, as the in-memory twin does). A key of another type raises WRONGTYPE (a command error: a miss for the caller).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'b', 'm', 'e', 'at', 'x')
if not f[1] and not f[2] and not f[3] and not f[4] then
  return { now }
end
local x = tonumber(f[5])
if x and x <= now then
  return { now }
end
return { now, f[1], f[2], f[3], f[4] }
