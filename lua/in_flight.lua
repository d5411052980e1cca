-- in_flight.lua: bulkhead permits held and unexpired for one feature. Read-only. Runs after
-- lib.lua.
--
-- KEYS: [1] permits zset
-- ARGV: none
-- Returns: the count (integer) of permits whose lease ends after now (ZCOUNT (now +inf).
-- Invariants: writes nothing. Expired permits may still be in the zset (admit.lua reclaims
-- them when they would fill the bulkhead; heartbeat.lua drops one it finds); they are not
-- counted.

local now = now_ms()
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
