-- in_flight.lua: bulkhead permits held and unexpired for one feature. Read-only. Runs after
-- lib.lua.
--
-- KEYS: [1] permits zset
-- ARGV: none
-- Returns: the count (integer) of permits whose lease ends after now (ZCOUNT (now +inf).
-- Invariants: writes nothing (expired permits are reclaimed by admit.lua).

local now = now_ms()
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
