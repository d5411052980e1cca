-- settle.lua: record the outcomes of calls to one target, in order (BreakerState::record for
-- each entry: probe release, generation check, window buckets, consecutive failures, half-open
-- successes, open with growing duration, close). Runs after lib.lua.
--
-- KEYS: [1] breaker hash  [2] probes zset
-- ARGV: [1..14] breaker parameters (consecutive_failures, failure_rate_pct, minimum_calls,
--       bucket_ms, buckets, slow_call_ms, slow_call_rate_pct, open_ms, open_multiplier,
--       max_open_ms, half_open_probes, half_open_successes, probe_timeout_ms, idle_ttl_ms),
--       then 4 values per outcome: generation, outcome code (0 success, 1 failure,
--       2 ignored), elapsed ms, probe id ('' when the call held no probe slot).
-- Returns a flat integer array: {now_ms, then per transition made: from, to, generation,
--   reason}, in the order they happened.
-- Invariants: an outcome of another generation changes nothing but frees its probe slot;
-- every transition increments the generation and is returned exactly once (to this caller);
-- the hash is read once and written once (with its expiry) per call, only if it changed.

local p = breaker_params(1)
local now = now_ms()
local breaker_key, probes_key = KEYS[1], KEYS[2]
local st = load_breaker(breaker_key)

local i = 15
while i + 3 <= #ARGV do
  local generation = tonumber(ARGV[i]) or -1
  local outcome = tonumber(ARGV[i + 1]) or 2
  local elapsed = tonumber(ARGV[i + 2]) or 0
  breaker_record(st, p, now, generation, outcome, elapsed, ARGV[i + 3], probes_key)
  i = i + 4
end

save_breaker(breaker_key, st, now, p.idle_ms)

local out = { now }
for _, v in ipairs(st.tr) do
  out[#out + 1] = v
end
return out
