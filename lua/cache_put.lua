-- cache_put.lua: store one degraded-response cache entry and keep the feature's cache
-- within its cap (src/cache/memory.rs is its in-process twin). Self-contained.
--
-- KEYS: [1] entry hash  [2] the feature's cache index (sorted set: entry key -> expiry ms)
--       Both under the feature's hash tag, so the script runs on one Cluster slot.
-- ARGV: [1] body (JSON text)  [2] model  [3] exact digest of the request  [4] ttl_ms
--       [5] max_entries
-- Returns: {stored_at_ms, evicted} (evicted: entries removed for the cap).
-- Invariants:
--   * time comes only from redis.call('TIME'); stored_at is the server's;
--   * the entry is replaced whole (DEL first: a foreign value of another type under the key
--     is overwritten, never an error) and expires after ttl_ms (PEXPIRE, and its field x
--     holds the expiry instant, which cache_get.lua checks too);
--   * entry hash fields: b body, m model, e exact digest, at stored-at ms, x expiry ms;
--   * the index holds at most max_entries members: expired members (and what is left of
--     their entries) are dropped first, then
--     the members closest to expiry (ties: lowest key), and their entries deleted. The
--     evicted keys come from the index, so they cannot be passed in KEYS; they share the
--     feature's hash tag, hence the slot;
--   * the index lives at least as long as its longest-lived entry (PEXPIRE raised, never
--     lowered), so an idle feature leaves nothing behind.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry, index = KEYS[1], KEYS[2]
local ttl = tonumber(ARGV[4]) or 0
local cap = tonumber(ARGV[5]) or 1
if ttl < 1 then ttl = 1 end
if cap < 1 then cap = 1 end
local expiry = now + ttl

redis.call('DEL', entry)
redis.call('HSET', entry, 'b', ARGV[1], 'm', ARGV[2], 'e', ARGV[3],
  'at', string.format('%d', now), 'x', string.format('%d', expiry))
redis.call('PEXPIRE', entry, ttl)

local expired = redis.call('ZRANGEBYSCORE', index, '-inf', string.format('%d', now))
for _, v in ipairs(expired) do
  if v ~= entry then redis.call('DEL', v) end
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%d', now))
redis.call('ZADD', index, string.format('%d', expiry), entry)
local evicted = 0
local n = redis.call('ZCARD', index)
if n > cap then
  local victims = redis.call('ZRANGE', index, 0, n - cap - 1)
  for _, v in ipairs(victims) do
    redis.call('DEL', v)
  end
  redis.call('ZREMRANGEBYRANK', index, 0, n - cap - 1)
  evicted = #victims
end
local left = redis.call('PTTL', index)
if left < ttl then
  redis.call('PEXPIRE', index, ttl)
end
return { now, evicted }
