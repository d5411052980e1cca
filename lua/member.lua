-- member.lua: keep this replica in the fleet's membership and count the live members (the
-- fleet size local mode divides its limits by). Runs after lib.lua.
--
-- KEYS: [1] members zset (replica id -> membership expiry, ms since the epoch)
-- ARGV: [1] replica id  [2] ttl_ms (a missing or non-positive value counts as 1)
-- Returns: the number of live members (expiry > now) after this one was (re)entered: >= 1.
-- Invariants: an entry lives ttl_ms after its replica's latest renewal and is never counted
-- once expired (expired entries are removed here); the zset itself expires when its latest
-- entry does, so a fleet that is gone leaves nothing behind.

local now = now_ms()
local key, id = KEYS[1], ARGV[1]
local ttl = math.floor(tonumber(ARGV[2]) or 0)
if ttl < 1 then
  ttl = 1
end

redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
redis.call('ZADD', key, fmt(now + ttl), id)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
local latest = tonumber(last[2]) or (now + ttl)
redis.call('PEXPIRE', key, fmt(math.max(latest - now, 1)))
return redis.call('ZCARD', key)
