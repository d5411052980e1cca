-- members.lua: the fleet's live membership, for operators. Read-only. Runs after lib.lua.
--
-- KEYS: [1] members zset (replica id -> membership expiry, ms since the epoch)
-- ARGV: none
-- Returns: a flat array {id1, ms_left1, id2, ms_left2, ...} of the members whose entry has
--   not expired (expiry > now), soonest expiry first (ties by id); ms_left >= 1.
-- Invariants: writes nothing; an expired entry is never listed.

local now = now_ms()
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. fmt(now), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #rows, 2 do
  local expiry = tonumber(rows[i + 1]) or now
  out[#out + 1] = rows[i]
  out[#out + 1] = math.max(math.floor(expiry - now), 1)
end
return out
