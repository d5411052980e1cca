-- force.lua: an operator command on a target's breaker (BreakerState::force). Runs after
-- lib.lua.
--
-- KEYS: [1] breaker hash  [2] probes zset
-- ARGV: [1] target state code (0 reset to closed, 3 forced open, 4 forced closed,
--       5 disabled)  [2] idle_ttl_ms
-- Returns: {now_ms} when the breaker already was in that state (a reset of a closed breaker
--   still empties its window and counters), else
--   {now_ms, from, to, generation, reason} (reason 7, operator).
-- Invariants: operator states (3, 4, 5) PERSIST until an operator resets; reset closes with
-- an empty window and forgets the open count; any other command also frees the probes,
-- clears the window and the counters. Reset (0) and forced closed (4) also clear not_before
-- (an operator who closes a target wants calls sent to it); open and disable keep it.

local now = now_ms()
local breaker_key, probes_key = KEYS[1], KEYS[2]
local to = tonumber(ARGV[1])
local idle = tonumber(ARGV[2]) or 0
if to ~= CLOSED and to ~= FORCED_OPEN and to ~= FORCED_CLOSED and to ~= DISABLED then
  return redis.error_reply('ERR fusebox force.lua: unknown command')
end

local st = load_breaker(breaker_key)
if (to == CLOSED or to == FORCED_CLOSED) and st.nb ~= 0 then
  st.nb = 0
  if st.s == to then
    -- no transition, but the cleared not_before is written
    st.dirty = true
    if to == FORCED_CLOSED then
      save_breaker(breaker_key, st, now, idle)
    end
  end
end
if st.s == to then
  if to == CLOSED then
    -- reset of a closed breaker: no transition, but start from an empty window (written
    -- only if there was something to forget: a fresh breaker gets no key)
    st.dirty = st.dirty or st.o ~= 0 or st.ou ~= 0 or st.hs ~= 0 or st.cf ~= 0 or st.wn > 0
    st.o = 0
    st.ou = 0
    st.hs = 0
    st.cf = 0
    redis.call('DEL', probes_key)
    window_clear(st)
    save_breaker(breaker_key, st, now, idle)
  end
  return { now }
end
if to == CLOSED then
  breaker_close(st, R_OPERATOR, probes_key)
else
  redis.call('DEL', probes_key)
  st.hs = 0
  st.cf = 0
  window_clear(st)
  st.ou = 0
  transition(st, to, R_OPERATOR)
end
save_breaker(breaker_key, st, now, idle)

local out = { now }
for _, v in ipairs(st.tr) do
  out[#out + 1] = v
end
return out
