-- release.lua: give back what calls of one feature held: bulkhead permits and, for calls that
-- never ran (compensation), their rate-limit slots. Runs after lib.lua.
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
-- (+ 1 s).

local now = now_ms()
local rate_key, permits_key = KEYS[1], KEYS[2]
local emission = tonumber(ARGV[1]) or 0
local refunds = tonumber(ARGV[2]) or 0

local removed = 0
local ids = {}
for i = 3, #ARGV do
  ids[#ids + 1] = ARGV[i]
  if #ids == 1000 then
    removed = removed + redis.call('ZREM', permits_key, unpack(ids))
    ids = {}
  end
end
if #ids > 0 then
  removed = removed + redis.call('ZREM', permits_key, unpack(ids))
end

if emission > 0 and refunds > 0 then
  local tat = stored_tat(redis.call('GET', rate_key))
  if tat then
    local now_us = now * 1000
    tat = tat - refunds * emission
    if tat < now_us then
      tat = now_us
    end
    local ttl = math.ceil((tat - now_us) / 1000) + 1000
    redis.call('SET', rate_key, fmt(tat), 'PX', fmt(ttl))
  end
end

return removed
