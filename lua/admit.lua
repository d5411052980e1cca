-- admit.lua: let calls through, or not: breaker, then rate limit (GCRA), then bulkhead, in the
-- order of MemoryStore::admit_now. One call of the script decides k >= 1 calls of one
-- (target, feature) exactly as k admissions one after the other at the same instant would.
-- Self-contained (no lib.lua prelude: this runs on every admission, and the prelude would cost
-- more than the decision); its number-reading rule is lib.lua's.
--
-- Why k calls take no loop: a refused call changes nothing, so the call after it meets the same
-- state and is refused the same way. The admitted calls are therefore a prefix of the k, and
-- its length m is the least of: k, the free probe slots (half-open), the calls the GCRA admits
-- from its TAT (call i of the run, 0-based, fits iff (i + 1) * e <= now - max(tat, now) +
-- e * burst), and the free permits. The first refused call is refused by the first of those
-- checks (in that order) that ran out at m.
--
-- KEYS (by mode, so that in Redis Cluster each call touches one hash tag only):
--   both:    [1] breaker hash  [2] probes zset  [3] rate string  [4] permits zset
--   breaker: [1] breaker hash  [2] probes zset
--   feature: [1] rate string   [2] permits zset
-- ARGV:
--   [1] mode: 'both' | 'breaker' | 'feature'
--   [2] half_open_probes   [3] probe_timeout_ms   [4] idle_ttl_ms
--   [5] emission interval in µs (0: no rate limit)  [6] burst
--   [7] bulkhead limit (0: no bulkhead)  [8] lease_ms
--   [9 ..] the calls' ids, in order (k >= 1 of them; each is the call's bulkhead permit id
--          and probe id; distinct)
-- Returns a flat array of 12 integers:
--   {now_ms, t_from, t_to, t_generation, t_reason,
--    m, generation, probe, permit, code, a, b}
--   t_*: the open -> half-open transition the first call made (t_from = -1: none); it stands
--        even when the calls are then refused.
--   m: the first m calls are admitted, each with: generation (breaker part; 0 in feature
--      mode), probe = 1 if it took a probe slot, permit = 1 if it took a bulkhead permit.
--   code, a, b: how each of the other k - m calls is refused (0, 0, 0 when m = k):
--     code 1 circuit open:  a = refusing state code, b = retry-after ms (-1: none)
--     code 2 not before:    a = retry-after ms
--     code 3 rate limited:  a = retry-after µs
--     code 4 bulkhead full: a = retry-after ms
-- Invariants:
--   * per call all or nothing: its probe slot, rate slot (TAT) and permit are committed only
--     when every check passed for it; a refused call takes nothing;
--   * every key is read with a command of its type (HMGET, ZCOUNT, GET, ZCARD) before the
--     first write, so a WRONGTYPE error leaves nothing committed;
--   * the closed path of the breaker is read-only (one HMGET);
--   * expired permits are reclaimed (ZREMRANGEBYSCORE) only when the permits counted with them
--     would not leave room for every call, then counted again: the same decisions as
--     reclaiming on every call. Half-open probes are counted live (ZCOUNT above now), the
--     expired ones dropped when a slot is taken;
--   * stored numbers are read by lib.lua's rule (digits only, bounded; anything else reads as
--     the default) and written with string.format('%d');
--   * a permits zset that grows past 32 permits is switched to skiplist encoding (by adding
--     and removing a long dummy member within this script: nothing else changes), so
--     acquiring and releasing stay O(log n);
--   * expiries: permits zset lease + 1 s after an acquire (every permit of a feature has the
--     same lease, and heartbeat.lua extends the zset's own expiry, so this only ever moves it
--     later); probes zset probe_timeout + 1 s; rate string (TAT - now) + 1 s; breaker hash
--     as lib.lua's expire_breaker on the open -> half-open write, and at least
--     probe_timeout + idle after a probe slot is taken (PEXPIRE GT: only moved later).

local A = ARGV
local mode = A[1]
local FIRST_ID = 9
local k = #A - FIRST_ID + 1

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
if k < 1 then
  return redis.error_reply('ERR fusebox admit.lua: no call ids')
end

local OPEN, HALF_OPEN, FORCED_OPEN, DISABLED = 1, 2, 3, 5
local find, fmt = string.find, string.format

-- lib.lua's u64 rule: 1 to 15 ASCII digits; anything else (or missing) reads as 0.
local function u64(v)
  if v and v ~= '0' and #v <= 15 and find(v, '^%d+$') then
    return v + 0
  end
  return 0
end

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

-- Breaker: BreakerState::evaluate, judged once for the run.
local generation, probe_room = 0, k
local opening, half_open, live_probes = false, false, 0
local g, open_until, not_before = 0, 0, 0
if breaker_key then
  local f = redis.call('HMGET', breaker_key, 's', 'g', 'ou', 'nb')
  local s = u64(f[1])
  if s > DISABLED then
    s = 0 -- closed (lib.lua's state_code)
  end
  g, open_until, not_before = u64(f[2]), u64(f[3]), u64(f[4])
  local code, a, b = 0, 0, 0
  if s == FORCED_OPEN then
    code, a, b = 1, FORCED_OPEN, -1
  elseif s ~= DISABLED then
    if not_before > now then
      code, a = 2, not_before - now
    elseif s == OPEN then
      if now < open_until then
        code, a, b = 1, OPEN, open_until - now
      else
        -- open -> half-open, written below once every key has been read; no probes then.
        opening, half_open = true, true
      end
    elseif s == HALF_OPEN then
      half_open = true
      live_probes = redis.call('ZCOUNT', probes_key, '(' .. now, '+inf')
    end
  end
  if code ~= 0 then
    return { now, -1, -1, -1, -1, 0, 0, 0, 0, code, a, b }
  end
  if half_open then
    local slots = tonumber(A[2])
    if tonumber(A[3]) > 0 then
      probe_room = slots - live_probes
      if probe_room < 0 then
        probe_room = 0
      end
    elseif live_probes >= slots then
      probe_room = 0 -- (a slot that ends now is reclaimed by the next call: no limit on k)
    end
  end
  generation = g
end

-- Feature reads (only when a call can get past the breaker).
local emission, limit = 0, 0
local tat, count = nil, 0
if rate_key and probe_room > 0 then
  emission, limit = tonumber(A[5]), tonumber(A[7])
  if emission > 0 then
    local v = redis.call('GET', rate_key)
    if v and #v <= 16 and find(v, '^%d+$') then
      tat = v + 0
      if tat > 9007199254740991 then -- 2^53 - 1
        tat = nil
      end
    end
  end
  if limit > 0 then
    count = redis.call('ZCARD', permits_key)
  end
end

-- First write: the open -> half-open transition (it stands whatever the calls get).
local idle = tonumber(A[4])
local out = { now, -1, -1, -1, -1 }
if opening then
  generation = g + 1
  redis.call('HSET', breaker_key, 's', HALF_OPEN, 'g', fmt('%d', generation), 'hs', '0')
  redis.call('DEL', probes_key)
  local ttl = idle
  if open_until - now + idle > ttl then
    ttl = open_until - now + idle
  end
  if not_before - now + idle > ttl then
    ttl = not_before - now + idle
  end
  if ttl < 1 then
    ttl = 1
  end
  redis.call('PEXPIRE', breaker_key, fmt('%d', ttl))
  out[2], out[3], out[4], out[5] = OPEN, HALF_OPEN, generation, 4 -- reason: open elapsed
end

-- m: the admitted prefix; why: the check that refuses the call after it.
local m, why = k, nil
if probe_room < m then
  m, why = probe_room, 1
end
local now_us = now * 1000
local base
if m > 0 and emission > 0 then
  base = tat or now_us
  if base < now_us then
    base = now_us
  end
  local burst = tonumber(A[6])
  local d = now_us - base + emission * burst
  local room = 0
  if d >= emission then
    room = math.floor(d / emission)
    while room * emission > d do
      room = room - 1
    end
    while (room + 1) * emission <= d do
      room = room + 1
    end
  end
  if room < m then
    m, why = room, 3
  end
end
local lease = tonumber(A[8])
local reclaimed = false
if m > 0 and limit > 0 and count + m > limit then
  redis.call('ZREMRANGEBYSCORE', permits_key, '-inf', now)
  reclaimed = true
  count = redis.call('ZCARD', permits_key)
  local room = limit - count
  if lease <= 0 and room > 0 then
    room = m -- a permit that ends now is reclaimed by the next call: never more than count
  end
  if room < m then
    if room < 0 then
      room = 0
    end
    m, why = room, 4
  end
end

-- Milliseconds until the earliest live lease of `key` (nil: none to look at) or of the m
-- admitted calls (ending at `pending_end`, when they took one) ends; at least 1.
local function earliest_wait(key, pending_end)
  local earliest = nil
  if key then
    local first = redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    earliest = tonumber(first[2])
  end
  if pending_end and (earliest == nil or pending_end < earliest) then
    earliest = pending_end
  end
  local wait = math.floor((earliest or (now + 1)) - now)
  if wait < 1 then
    wait = 1
  end
  -- A score no lease can reach (a foreign +inf or a 20-digit number) or NaN: at most a day,
  -- never a number that does not fit the reply's integer.
  if not (wait <= 86400000) then
    wait = 86400000
  end
  return wait
end

local probe_timeout = tonumber(A[3])
local code, a, b = 0, 0, 0
if m < k then
  if why == 1 then
    local key = probes_key
    if opening then
      key = nil -- deleted above
    end
    local pending = nil
    if m > 0 and probe_timeout > 0 then
      pending = now + probe_timeout
    end
    code, a, b = 1, HALF_OPEN, earliest_wait(key, pending)
  elseif why == 3 then
    code, a = 3, base + (m + 1) * emission - emission * tonumber(A[6]) - now_us
  else
    local pending = nil
    if m > 0 and lease > 0 then
      pending = now + lease
    end
    -- a refusal by the bulkhead always comes after a reclaim
    code, a = 4, earliest_wait(permits_key, pending)
  end
end

-- Commit what the m admitted calls took.
local probe, permit = 0, 0
if half_open then
  probe = 1
end
if m > 0 then
  if limit > 0 then
    permit = 1
    if count < 32 and count + m >= 32
      and redis.call('OBJECT', 'ENCODING', permits_key) == 'listpack' then
      -- Keep a large permits zset in skiplist encoding: listpack finds a member by a linear
      -- scan, which makes every acquire O(n). A member longer than zset-max-listpack-value
      -- converts it (for good, until the key empties); it is removed at once. Looked at when
      -- the zset grows past 32 permits.
      local big = string.rep('~', 65)
      redis.call('ZADD', permits_key, 0, big)
      redis.call('ZREM', permits_key, big)
    end
    local score = fmt('%d', now + lease)
    for i = 1, m, 500 do
      local args, n = {}, 0
      for j = i, math.min(i + 499, m) do
        args[n + 1] = score
        args[n + 2] = A[FIRST_ID + j - 1]
        n = n + 2
      end
      redis.call('ZADD', permits_key, unpack(args))
    end
    redis.call('PEXPIRE', permits_key, fmt('%d', lease + 1000))
  end
  if emission > 0 then
    local new_tat = base + m * emission
    local ttl = math.ceil((new_tat - now_us) / 1000) + 1000
    redis.call('SET', rate_key, fmt('%d', new_tat), 'PX', fmt('%d', ttl))
  end
  if half_open then
    local score = fmt('%d', now + probe_timeout)
    local args = {}
    for j = 1, m do
      args[2 * j - 1] = score
      args[2 * j] = A[FIRST_ID + j - 1]
    end
    redis.call('ZREMRANGEBYSCORE', probes_key, '-inf', now)
    redis.call('ZADD', probes_key, unpack(args))
    redis.call('PEXPIRE', probes_key, fmt('%d', probe_timeout + 1000))
    -- The half-open breaker outlives its probes by the idle time: a probe slower than the
    -- idle TTL must still find its generation when it settles (only ever moved later).
    redis.call('PEXPIRE', breaker_key, fmt('%d', probe_timeout + idle), 'GT')
  end
end

out[6], out[7], out[8], out[9], out[10], out[11], out[12] = m, generation, probe, permit, code, a, b
return out
