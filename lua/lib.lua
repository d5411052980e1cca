-- lib.lua: the prelude shared by every fusebox script. It is prepended to each script by
-- src/store/redis/scripts.rs (the text Redis runs is lib.lua followed by the script), so the
-- breaker rules exist once in Lua, mirroring src/breaker/state.rs and src/breaker/window.rs.
--
-- KEYS / ARGV: none read here; helpers take keys and values as parameters.
-- Returns: nothing (defines local functions only).
-- Invariants:
--   * time comes only from redis.call('TIME') (one clock for the fleet);
--   * a stored number is read by one rule (digits only, bounded length and value); anything
--     else, or a missing field, reads as the default of BreakerState::default() (0 / closed),
--     so a corrupted value heals on the next write instead of raising a Lua error. The Rust
--     rebuild for snapshots (src/store/redis/reply.rs) applies the same rule;
--   * numbers are written with string.format('%d') (Lua's tostring would print 1.7e+15 and
--     lose precision);
--   * the breaker hash gets PEXPIRE max(idle, open_until - now + idle, not_before - now + idle)
--     on every write, except operator states, which PERSIST until an operator resets them.
--
-- Breaker hash fields: s state, g generation, ou open_until ms, o opens, cf consecutive
-- failures, hs half-open successes, nb not_before ms, wn buckets laid out in the window (0:
-- empty window), we<i> / wc<i> / wf<i> / ws<i> epoch / calls / failures / slow of bucket i.

local CLOSED, OPEN, HALF_OPEN, FORCED_OPEN, FORCED_CLOSED, DISABLED = 0, 1, 2, 3, 4, 5
local SUCCESS, FAILURE = 0, 1
local R_CONSECUTIVE, R_FAILURE_RATE, R_SLOW_RATE, R_OPEN_ELAPSED = 1, 2, 3, 4
local R_PROBE_FAILED, R_PROBES_SUCCEEDED, R_OPERATOR = 5, 6, 7
local U32_MAX = 4294967295
local U64_STORED_MAX = 999999999999999 -- 15 digits: exact in a double
local TAT_MAX = 9007199254740991 -- 2^53 - 1: largest exact integer of a double
local MAX_BUCKETS = 1024

local function fmt(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A stored unsigned integer: 1 to `digits` ASCII digits and at most `max`; else 0.
local function stored_uint(v, digits, max)
  if type(v) ~= 'string' or #v == 0 or #v > digits or not string.find(v, '^%d+$') then
    return 0
  end
  local n = tonumber(v)
  if n == nil or n > max then
    return 0
  end
  return n
end

local function u64(v)
  return stored_uint(v, 15, U64_STORED_MAX)
end

local function u32(v)
  return stored_uint(v, 10, U32_MAX)
end

local function state_code(v)
  local s = u64(v)
  if s > DISABLED then
    return CLOSED
  end
  return s
end

local function bucket_count(v)
  local n = u32(v)
  if n > MAX_BUCKETS then
    return 0
  end
  return n
end

-- A stored GCRA TAT in µs, or nil when missing or corrupted (treated as no key).
local function stored_tat(v)
  if type(v) ~= 'string' or #v == 0 or #v > 16 or not string.find(v, '^%d+$') then
    return nil
  end
  local n = tonumber(v)
  if n == nil or n > TAT_MAX then
    return nil
  end
  return n
end

local function is_operator_state(s)
  return s == FORCED_OPEN or s == FORCED_CLOSED or s == DISABLED
end

-- Expiry of the breaker hash after a write.
local function expire_breaker(key, s, open_until, not_before, now, idle)
  if is_operator_state(s) then
    redis.call('PERSIST', key)
    return
  end
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
  redis.call('PEXPIRE', key, fmt(ttl))
end

-- Expiry of a sorted set of leases: (latest expiry - now) + 1 s.
local function expire_leases(key, now, fallback_latest)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local latest = tonumber(last[2]) or fallback_latest
  local ttl = latest - now
  if ttl < 0 then
    ttl = 0
  end
  redis.call('PEXPIRE', key, fmt(math.floor(ttl) + 1000))
end

-- Milliseconds until the earliest lease of a sorted set ends (at least 1).
local function earliest_wait(key, now)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local earliest = tonumber(first[2]) or (now + 1)
  local wait = math.floor(earliest - now)
  if wait < 1 then
    wait = 1
  end
  return wait
end

-- Breaker parameters from ARGV[i .. i+13] (the order of src/store/redis/scripts.rs).
local function breaker_params(i)
  local function n(k)
    return tonumber(ARGV[i + k]) or 0
  end
  return {
    consecutive_failures = n(0),
    failure_rate = n(1),
    minimum_calls = n(2),
    bucket_ms = n(3),
    buckets = n(4),
    slow_ms = n(5),
    slow_rate = n(6),
    open_ms = n(7),
    open_mult = n(8),
    max_open_ms = n(9),
    half_open_probes = n(10),
    half_open_successes = n(11),
    probe_timeout_ms = n(12),
    idle_ms = n(13),
  }
end

-- The whole breaker hash as a state table (BreakerState minus probes, which stay in Redis).
local function load_breaker(key)
  local raw = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #raw, 2 do
    h[raw[i]] = raw[i + 1]
  end
  local st = {
    s = state_code(h['s']),
    g = u64(h['g']),
    ou = u64(h['ou']),
    o = u32(h['o']),
    cf = u32(h['cf']),
    hs = u32(h['hs']),
    nb = u64(h['nb']),
    wn = bucket_count(h['wn']),
    w = {},
    wdirty = {},
    wclear = 0,
    dirty = false,
    tr = {},
  }
  for i = 0, st.wn - 1 do
    st.w[i] = {
      e = u64(h['we' .. i]),
      c = u64(h['wc' .. i]),
      f = u64(h['wf' .. i]),
      sl = u64(h['ws' .. i]),
    }
  end
  return st
end

-- Writes a changed state back (HDEL of dropped buckets, HSET of the rest) and sets expiry.
local function save_breaker(key, st, now, idle)
  if not st.dirty then
    return
  end
  if st.wclear > 0 then
    local del = {}
    for i = 0, st.wclear - 1 do
      if not st.wdirty[i] then
        del[#del + 1] = 'we' .. i
        del[#del + 1] = 'wc' .. i
        del[#del + 1] = 'wf' .. i
        del[#del + 1] = 'ws' .. i
      end
    end
    if #del > 0 then
      redis.call('HDEL', key, unpack(del))
    end
  end
  local args = {
    's', fmt(st.s), 'g', fmt(st.g), 'ou', fmt(st.ou), 'o', fmt(st.o), 'cf', fmt(st.cf),
    'hs', fmt(st.hs), 'nb', fmt(st.nb), 'wn', fmt(st.wn),
  }
  for i, _ in pairs(st.wdirty) do
    local b = st.w[i]
    args[#args + 1] = 'we' .. i
    args[#args + 1] = fmt(b.e)
    args[#args + 1] = 'wc' .. i
    args[#args + 1] = fmt(b.c)
    args[#args + 1] = 'wf' .. i
    args[#args + 1] = fmt(b.f)
    args[#args + 1] = 'ws' .. i
    args[#args + 1] = fmt(b.sl)
  end
  redis.call('HSET', key, unpack(args))
  expire_breaker(key, st.s, st.ou, st.nb, now, idle)
end

-- Window::clear
local function window_clear(st)
  if st.wn > st.wclear then
    st.wclear = st.wn
  end
  st.wn = 0
  st.w = {}
  st.wdirty = {}
end

-- Window::add
local function window_add(st, now, bucket_ms, n, failure, slow)
  if n < 1 then
    n = 1
  end
  if st.wn ~= n then
    local upto = math.max(st.wn, n)
    if upto > st.wclear then
      st.wclear = upto
    end
    st.wn = n
    st.w = {}
    st.wdirty = {}
    for i = 0, n - 1 do
      st.w[i] = { e = 0, c = 0, f = 0, sl = 0 }
    end
  end
  local epoch = math.floor(now / math.max(bucket_ms, 1))
  local i = epoch % n
  local b = st.w[i]
  if b.e ~= epoch then
    b = { e = epoch, c = 0, f = 0, sl = 0 }
    st.w[i] = b
  end
  b.c = b.c + 1
  if failure then
    b.f = b.f + 1
  end
  if slow then
    b.sl = b.sl + 1
  end
  st.wdirty[i] = true
end

-- Window::totals: calls, failures, slow
local function window_totals(st, now, bucket_ms, n)
  local epoch = math.floor(now / math.max(bucket_ms, 1))
  local oldest = epoch - (math.max(n, 1) - 1)
  if oldest < 0 then
    oldest = 0
  end
  local c, f, sl = 0, 0, 0
  for i = 0, st.wn - 1 do
    local b = st.w[i]
    if b.e >= oldest and b.e <= epoch and b.c > 0 then
      c = c + b.c
      f = f + b.f
      sl = sl + b.sl
    end
  end
  return c, f, sl
end

-- BreakerParams::open_duration_ms: repeated multiply-and-floor (at least +1 ms per step when
-- the multiplier is above 1), capped. Stops early at a fixed point (multiplier 1).
local function open_duration(p, opens)
  local cap = math.max(p.max_open_ms, p.open_ms)
  local d = p.open_ms
  local i = 1
  while i < opens and d < cap do
    local nd = math.floor(d * p.open_mult)
    if p.open_mult > 1 and nd <= d then
      nd = d + 1
    end
    if nd == d then
      break
    end
    d = math.min(nd, cap)
    i = i + 1
  end
  return math.min(d, cap)
end

local function transition(st, to, reason)
  local from = st.s
  st.s = to
  st.g = st.g + 1
  st.dirty = true
  local tr = st.tr
  tr[#tr + 1] = from
  tr[#tr + 1] = to
  tr[#tr + 1] = st.g
  tr[#tr + 1] = reason
end

-- BreakerState::open
local function breaker_open(st, p, reason, now, probes_key)
  st.o = math.min(st.o + 1, U32_MAX)
  st.ou = now + open_duration(p, st.o)
  st.hs = 0
  st.cf = 0
  redis.call('DEL', probes_key)
  window_clear(st)
  transition(st, OPEN, reason)
end

-- BreakerState::close
local function breaker_close(st, reason, probes_key)
  st.o = 0
  st.ou = 0
  st.hs = 0
  st.cf = 0
  redis.call('DEL', probes_key)
  window_clear(st)
  transition(st, CLOSED, reason)
end

-- BreakerState::trip_reason (nil: no trip)
local function trip_reason(st, p, now)
  if p.consecutive_failures > 0 and st.cf >= p.consecutive_failures then
    return R_CONSECUTIVE
  end
  local calls, failures, slow = window_totals(st, now, p.bucket_ms, p.buckets)
  if calls == 0 or calls < p.minimum_calls then
    return nil
  end
  if p.failure_rate > 0 and failures * 100 >= p.failure_rate * calls then
    return R_FAILURE_RATE
  end
  if p.slow_rate > 0 and slow * 100 >= p.slow_rate * calls then
    return R_SLOW_RATE
  end
  return nil
end

-- BreakerState::record (probe_id '' = not a probe)
local function breaker_record(st, p, now, generation, outcome, elapsed, probe_id, probes_key)
  if probe_id ~= '' then
    redis.call('ZREM', probes_key, probe_id)
  end
  if generation ~= st.g or (outcome ~= SUCCESS and outcome ~= FAILURE) then
    return
  end
  local slow = p.slow_ms > 0 and elapsed >= p.slow_ms
  local failure = outcome == FAILURE
  if st.s == HALF_OPEN then
    if probe_id == '' then
      return
    end
    if failure or (slow and p.slow_rate > 0) then
      breaker_open(st, p, R_PROBE_FAILED, now, probes_key)
    else
      st.hs = math.min(st.hs + 1, U32_MAX)
      st.dirty = true
      if st.hs >= p.half_open_successes then
        breaker_close(st, R_PROBES_SUCCEEDED, probes_key)
      end
    end
  elseif st.s == CLOSED then
    window_add(st, now, p.bucket_ms, p.buckets, failure, slow)
    if failure then
      st.cf = math.min(st.cf + 1, U32_MAX)
    else
      st.cf = 0
    end
    st.dirty = true
    local reason = trip_reason(st, p, now)
    if reason then
      breaker_open(st, p, reason, now, probes_key)
    end
  end
end

