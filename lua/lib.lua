-- lib.lua: the prelude of the operator and read scripts (force, not_before, snapshot,
-- in_flight, heartbeat). src/store/redis/scripts.rs prepends it to each of them (the text
-- Redis runs is lib.lua followed by the script). The hot-path scripts (admit.lua, settle.lua,
-- release.lua) are self-contained instead: defining these helpers costs more per call than
-- their decisions. They repeat the read rule below (and settle.lua the breaker rules of
-- src/breaker/state.rs and window.rs); keep them in step.
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
local R_OPERATOR = 7
local U32_MAX = 4294967295
local U64_STORED_MAX = 999999999999999 -- 15 digits: exact in a double
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
  -- A score no lease can reach (+inf, NaN, far future: written by something else) must not
  -- become PEXPIRE of a nonsense (negative) number, which would delete every permit.
  if not (latest <= now + 2592000000) then
    latest = fallback_latest
  end
  local ttl = latest - now
  if ttl < 0 then
    ttl = 0
  end
  redis.call('PEXPIRE', key, fmt(math.floor(ttl) + 1000))
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
