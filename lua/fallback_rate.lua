-- fallback_rate.lua: count a feature's guarded calls and those not answered by the primary
-- target in its fleet-wide window, and say whether an alert episode starts or ends (the fleet
-- health signal). Sent in batches from a background task, never on a caller's way. Runs
-- after lib.lua. The twin of RateWindow::add (src/pipeline/alert.rs); keep them in step.
--
-- KEYS: [1] rate hash (fields e<i> / c<i> / f<i>: epoch / calls / fallbacks of bucket i;
--       a: 1 while an episode lasts)
-- ARGV: [1] bucket_ms (>= 1)  [2] buckets (1..1024)  [3] calls to add  [4] fallbacks to add
--       [5] threshold (millionths of the calls)  [6] min_calls
-- Returns: {fired (0/1), recovered (0/1), calls in the window, fallbacks in the window}.
-- Invariants: only the update that tips the window over the threshold returns fired = 1
-- (one alert per episode fleet-wide); fallbacks per bucket never exceed its calls; the hash
-- expires one window + one bucket after its last write.

local MAX_CALLS = 1000000000

local now = now_ms()
local key = KEYS[1]
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[1]) or 1))
local buckets = math.min(1024, math.max(1, math.floor(tonumber(ARGV[2]) or 1)))
local calls = math.max(0, math.floor(tonumber(ARGV[3]) or 0))
local fallbacks = math.max(0, math.floor(tonumber(ARGV[4]) or 0))
local threshold = math.max(0, math.floor(tonumber(ARGV[5]) or 0))
local min_calls = math.max(1, math.floor(tonumber(ARGV[6]) or 1))

local epoch = math.floor(now / bucket_ms)
local slot = epoch % buckets
local f = redis.call('HMGET', key, 'e' .. slot, 'c' .. slot, 'f' .. slot)
local e, c, fb = u64(f[1]), u64(f[2]), u64(f[3])
if e ~= epoch then
  c, fb = 0, 0
end
c = math.min(c + calls, MAX_CALLS)
fb = math.min(fb + fallbacks, c)
redis.call('HSET', key, 'e' .. slot, fmt(epoch), 'c' .. slot, fmt(c), 'f' .. slot, fmt(fb))

local total, fell = 0, 0
for i = 0, buckets - 1 do
  local v = redis.call('HMGET', key, 'e' .. i, 'c' .. i, 'f' .. i)
  local be = u64(v[1])
  if v[1] and be <= epoch and be + buckets > epoch then
    total = total + u64(v[2])
    fell = fell + u64(v[3])
  end
end
-- fell / total > threshold / 1e6, in integers: exact below 2^53.
local over = total >= min_calls and fell * 1000000 > threshold * total
local alerting = redis.call('HGET', key, 'a') == '1'
local fired, recovered = 0, 0
if over and not alerting then
  fired = 1
  redis.call('HSET', key, 'a', '1')
elseif alerting and not over then
  recovered = 1
  redis.call('HSET', key, 'a', '0')
end
redis.call('PEXPIRE', key, fmt(bucket_ms * (buckets + 1)))
return {fired, recovered, total, fell}
