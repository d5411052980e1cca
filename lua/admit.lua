-- admit.lua: let one call through, or not: breaker, then rate limit (GCRA), then bulkhead,
-- in the order of MemoryStore::admit_now. Runs after lib.lua.
--
-- KEYS (by mode, so that in Redis Cluster each call touches one hash tag only):
--   both:    [1] breaker hash  [2] probes zset  [3] rate string  [4] permits zset
--   breaker: [1] breaker hash  [2] probes zset
--   feature: [1] rate string   [2] permits zset
-- ARGV:
--   [1] mode: 'both' | 'breaker' | 'feature'
--   [2] call id (bulkhead permit id and probe id)
--   [3] half_open_probes   [4] probe_timeout_ms   [5] idle_ttl_ms
--   [6] emission interval in µs (0: no rate limit)  [7] burst
--   [8] bulkhead limit (0: no bulkhead)  [9] lease_ms
-- Returns a flat array of 9 integers:
--   {code, a, b, c, t_from, t_to, t_generation, t_reason, now_ms}
--   code 0 admitted:      a = generation (breaker part; 0 in feature mode), b = 1 if a probe
--                         slot was taken, c = 1 if a bulkhead permit was taken
--   code 1 circuit open:  a = refusing state code, b = retry-after ms (-1: none), c = 0
--   code 2 not before:    a = retry-after ms
--   code 3 rate limited:  a = retry-after µs
--   code 4 bulkhead full: a = retry-after ms
--   t_*: the open -> half-open transition this call made (t_from = -1: none); it stands even
--   when the call is then refused.
-- Invariants: all or nothing: the probe slot, the rate slot (TAT) and the permit are committed
-- together, after every check has passed (every key is read with a command of its type before
-- the first commit, so a WRONGTYPE error cannot leave half a commit). The closed path of the
-- breaker is read-only (one HMGET). Expired permits and probes are reclaimed here.

local mode = ARGV[1]
local call_id = ARGV[2]
local half_open_probes = tonumber(ARGV[3]) or 1
local probe_timeout = tonumber(ARGV[4]) or 0
local idle = tonumber(ARGV[5]) or 0
local emission = tonumber(ARGV[6]) or 0
local burst = tonumber(ARGV[7]) or 1
local limit = tonumber(ARGV[8]) or 0
local lease = tonumber(ARGV[9]) or 0

local breaker_key, probes_key, rate_key, permits_key
if mode == 'both' then
  breaker_key, probes_key, rate_key, permits_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
elseif mode == 'breaker' then
  breaker_key, probes_key = KEYS[1], KEYS[2]
elseif mode == 'feature' then
  rate_key, permits_key = KEYS[1], KEYS[2]
else
  return redis.error_reply('ERR fusebox admit.lua: unknown mode')
end

local now = now_ms()
local t_from, t_to, t_gen, t_reason = -1, -1, -1, -1
local generation, probe, permit = 0, 0, 0

local function refuse(code, a, b)
  return { code, a, b, 0, t_from, t_to, t_gen, t_reason, now }
end

-- Breaker: BreakerState::evaluate
if breaker_key then
  local f = redis.call('HMGET', breaker_key, 's', 'g', 'ou', 'nb')
  local s, g, open_until, not_before = state_code(f[1]), u64(f[2]), u64(f[3]), u64(f[4])
  if s == FORCED_OPEN then
    return refuse(1, FORCED_OPEN, -1)
  end
  if s ~= DISABLED then
    if not_before > now then
      return refuse(2, not_before - now, 0)
    end
    if s == OPEN then
      if now < open_until then
        return refuse(1, OPEN, open_until - now)
      end
      g = g + 1
      redis.call('HSET', breaker_key, 's', fmt(HALF_OPEN), 'g', fmt(g), 'hs', '0')
      redis.call('DEL', probes_key)
      expire_breaker(breaker_key, HALF_OPEN, open_until, not_before, now, idle)
      t_from, t_to, t_gen, t_reason = OPEN, HALF_OPEN, g, R_OPEN_ELAPSED
      s = HALF_OPEN
    end
    if s == HALF_OPEN then
      redis.call('ZREMRANGEBYSCORE', probes_key, '-inf', fmt(now))
      if redis.call('ZCARD', probes_key) < half_open_probes then
        probe = 1
      else
        return refuse(1, HALF_OPEN, earliest_wait(probes_key, now))
      end
    end
  end
  generation = g
end

-- Feature: GCRA check (no commit yet), then bulkhead.
local new_tat = nil
if rate_key then
  local now_us = now * 1000
  if emission > 0 then
    local tat = stored_tat(redis.call('GET', rate_key)) or now_us
    if tat < now_us then
      tat = now_us
    end
    local candidate = tat + emission
    local allow_at = candidate - emission * burst
    if allow_at < 0 then
      allow_at = 0
    end
    if now_us < allow_at then
      return refuse(3, allow_at - now_us, 0)
    end
    new_tat = candidate
  end
  if limit > 0 then
    redis.call('ZREMRANGEBYSCORE', permits_key, '-inf', fmt(now))
    if redis.call('ZCARD', permits_key) >= limit then
      return refuse(4, earliest_wait(permits_key, now), 0)
    end
  end

  -- Commit the feature part.
  if limit > 0 then
    redis.call('ZADD', permits_key, fmt(now + lease), call_id)
    expire_leases(permits_key, now, now + lease)
    permit = 1
  end
  if new_tat then
    local ttl = math.ceil((new_tat - now_us) / 1000) + 1000
    redis.call('SET', rate_key, fmt(new_tat), 'PX', fmt(ttl))
  end
end

-- Commit the probe slot (BreakerState::take_probe).
if probe == 1 then
  redis.call('ZADD', probes_key, fmt(now + probe_timeout), call_id)
  redis.call('PEXPIRE', probes_key, fmt(probe_timeout + 1000))
end

return { 0, generation, probe, permit, t_from, t_to, t_gen, t_reason, now }
