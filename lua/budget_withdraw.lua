-- budget_withdraw.lua: take one retry from a target's fleet-wide retry budget, if the window
-- allows it (Finagle RetryBudget). On the retry path only: a first attempt never runs it.
-- Also counts the requests this replica has not deposited yet, so the decision sees them.
-- Runs after lib.lua. The twin of BudgetWindow::withdraw (src/retry/budget.rs); keep them in
-- step.
--
-- KEYS: [1] budget hash (fields e<i> / q<i> / r<i>: epoch / requests / retries of bucket i)
-- ARGV: [1] bucket_ms (>= 1)  [2] buckets (1..1024)  [3] requests to add first (>= 0)
--       [4] ratio_ppm: retries earned per request, in millionths
--       [5] reserve: retries always available per window, in millionths
-- Returns: {granted (1/0), requests in the window, retries in the window (the one granted
-- included), now_ms}.
-- Invariants: granted iff (retries + 1) * 1e6 <= min(requests, 1e8) * ratio_ppm + reserve,
-- over the buckets whose epoch lies in (now_epoch - buckets, now_epoch]; every product stays
-- below 2^53 (requests <= 1e8, ratio_ppm <= 1e7 by configuration), so the doubles here and
-- the integers in Rust agree; a stale bucket is reset before it is written; the hash expires
-- one window + one bucket after its last write.

local UNIT = 1000000
local MAX_REQUESTS = 100000000
local MAX_RETRIES = 1000000000

local now = now_ms()
local key = KEYS[1]
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[1]) or 1))
local buckets = math.min(1024, math.max(1, math.floor(tonumber(ARGV[2]) or 1)))
local n = math.max(0, math.floor(tonumber(ARGV[3]) or 0))
local ratio_ppm = math.max(0, math.floor(tonumber(ARGV[4]) or 0))
local reserve = math.max(0, math.floor(tonumber(ARGV[5]) or 0))

local epoch = math.floor(now / bucket_ms)
local slot = epoch % buckets

local fields = {}
for i = 0, buckets - 1 do
  fields[#fields + 1] = 'e' .. i
  fields[#fields + 1] = 'q' .. i
  fields[#fields + 1] = 'r' .. i
end
local v = redis.call('HMGET', key, unpack(fields))

local cq, cr = 0, 0
local requests, retries = 0, 0
for i = 0, buckets - 1 do
  local e, q, r = u64(v[3 * i + 1]), u64(v[3 * i + 2]), u64(v[3 * i + 3])
  if i == slot then
    if e ~= epoch then
      q, r = 0, 0
    end
    q = math.min(q + n, MAX_REQUESTS)
    cq, cr = q, r
    requests = requests + q
    retries = retries + r
  elseif e <= epoch and e + buckets > epoch then
    requests = requests + q
    retries = retries + r
  end
end
requests = math.min(requests, MAX_REQUESTS)
retries = math.min(retries, MAX_RETRIES)

local granted = 0
if (retries + 1) * UNIT <= requests * ratio_ppm + reserve then
  granted = 1
  cr = math.min(cr + 1, MAX_RETRIES)
  retries = retries + 1
end
redis.call('HSET', key, 'e' .. slot, fmt(epoch), 'q' .. slot, fmt(cq), 'r' .. slot, fmt(cr))
redis.call('PEXPIRE', key, fmt(bucket_ms * (buckets + 1)))
return { granted, requests, retries, now }
