-- heartbeat.lua: extend a held bulkhead permit's lease (Permits::heartbeat). Runs after lib.lua.
--
-- KEYS: [1] permits zset
-- ARGV: [1] permit id  [2] lease_ms
-- Returns: 1 if the lease now ends at now + lease, 0 if the permit is gone (released, or
--   expired: an expired permit found here is removed, never revived).
-- Invariants: a permit that expired stays expired (its slot may already be someone else's);
-- the permits zset expires (latest expiry - now) + 1 s.

local now = now_ms()
local permits_key, id = KEYS[1], ARGV[1]
local lease = tonumber(ARGV[2]) or 0

local score = tonumber(redis.call('ZSCORE', permits_key, id))
if score == nil then
  return 0
end
if score > now then
  redis.call('ZADD', permits_key, 'XX', fmt(now + lease), id)
  expire_leases(permits_key, now, now + lease)
  return 1
end
redis.call('ZREM', permits_key, id)
return 0
