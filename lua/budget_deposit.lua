-- budget_deposit.lua: count requests to a target in its fleet-wide retry budget (Finagle
-- RetryBudget). Sent in batches from a background task, never on a caller's way: each
-- replica counts its requests locally and deposits the sum. Runs after lib.lua. The twin of
-- BudgetWindow::deposit (src/retry/budget.rs); keep them in step.
--
-- KEYS: [1] budget hash (fields e<i> / q<i> / r<i>: epoch / requests / retries of bucket i)
-- ARGV: [1] bucket_ms (>= 1)  [2] buckets (1..1024)  [3] requests to add (>= 0)
-- Returns: now_ms.
-- Invariants: bucket i holds epoch floor(now / bucket_ms) with epoch % buckets == i; a bucket
-- whose epoch is not the current one is reset before it is written; requests per bucket are
-- at most 100000000 (BudgetWindow's MAX_REQUESTS); the hash expires one window + one bucket
-- after its last write.

local MAX_REQUESTS = 100000000

local now = now_ms()
local key = KEYS[1]
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[1]) or 1))
local buckets = math.min(1024, math.max(1, math.floor(tonumber(ARGV[2]) or 1)))
local n = math.max(0, math.floor(tonumber(ARGV[3]) or 0))

local epoch = math.floor(now / bucket_ms)
local slot = epoch % buckets
local f = redis.call('HMGET', key, 'e' .. slot, 'q' .. slot, 'r' .. slot)
local e, q, r = u64(f[1]), u64(f[2]), u64(f[3])
if e ~= epoch then
  q, r = 0, 0
end
q = math.min(q + n, MAX_REQUESTS)
redis.call('HSET', key, 'e' .. slot, fmt(epoch), 'q' .. slot, fmt(q), 'r' .. slot, fmt(r))
redis.call('PEXPIRE', key, fmt(bucket_ms * (buckets + 1)))
return now
