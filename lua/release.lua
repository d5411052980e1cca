-- release.lua: give back what calls of one feature held: bulkhead permits and, for calls that
-- never ran (compensation), their rate-limit slots. Self-contained (no lib.lua prelude: this
-- runs for every settle batch); its number-reading rule is lib.lua's.
--
-- KEYS: [1] rate string (GCRA TAT, µs)  [2] permits zset
-- ARGV: [1] emission interval in µs (0: the feature has no rate limit)
--       [2] number of rate slots to refund
--       [3..] permit ids to release
-- Returns: the number of permits actually removed (integer).
-- Invariants: releasing a permit twice, or one that expired and was reclaimed, is harmless
-- (ZREM). A refund only applies to an existing TAT (as RateParams::refund does), one emission
-- interval per refunded call, never below now: tat = max(now_us, tat - n * emission), the same
-- value as refunding n times in a row. The rate key keeps expiring when its TAT has passed
-- (+ 1 s). The rate key is read (GET) before the permits zset is written, so a WRONGTYPE error
-- on either key leaves nothing half-done. TIME is read only for a refund.

local rate_key, permits_key = KEYS[1], KEYS[2]
local emission = tonumber(ARGV[1]) or 0
local refunds = tonumber(ARGV[2]) or 0

-- The stored TAT (lib.lua's stored_tat: digits only, at most 2^53 - 1), or nil.
local tat = nil
if emission > 0 and refunds > 0 then
  local v = redis.call('GET', rate_key)
  if type(v) == 'string' and #v > 0 and #v <= 16 and string.find(v, '^%d+$') then
    tat = tonumber(v)
    if tat ~= nil and tat > 9007199254740991 then
      tat = nil
    end
  end
end

local removed = 0
for i = 3, #ARGV, 1000 do
  removed = removed + redis.call('ZREM', permits_key, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end

if tat then
  local t = redis.call('TIME')
  local now_us = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) * 1000
  tat = tat - refunds * emission
  if tat < now_us then
    tat = now_us
  end
  local ttl = math.ceil((tat - now_us) / 1000) + 1000
  redis.call('SET', rate_key, string.format('%d', tat), 'PX', string.format('%d', ttl))
end

return removed
