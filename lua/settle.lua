-- settle.lua: record the outcomes of calls to one target, in order (BreakerState::record for
-- each entry: probe release, generation check, window buckets, consecutive failures, half-open
-- successes, open with growing duration, close). Self-contained (no lib.lua prelude: this
-- runs for every settle batch); its number-reading rule is lib.lua's and its breaker rules
-- those of src/breaker/state.rs and window.rs.
--
-- On a single node the same call can also do release.lua's work for one feature (KEYS[3],
-- KEYS[4] and the release section of ARGV), so that settling a batch takes one round trip.
--
-- KEYS: [1] breaker hash  [2] probes zset  (and, with a release: [3] rate string  [4] permits
--       zset of the feature)
-- ARGV: [1..12] breaker parameters (consecutive_failures, failure_rate_pct, minimum_calls,
--       bucket_ms, buckets, slow_call_ms, slow_call_rate_pct, open_ms, open_multiplier,
--       max_open_ms, half_open_successes, idle_ttl_ms), [13] E: the number of entries, then
--       5 values per entry: generation, outcome code (0 success, 1 failure, 2 ignored),
--       elapsed ms, probe id ('' when the call held no probe slot), count: the entry stands
--       for `count` (>= 1) identical outcomes in a row. With a release, then: emission
--       interval in µs (0: no rate limit), rate slots to refund, permit ids to release (as
--       release.lua's ARGV).
-- Returns a flat integer array: {now_ms, then per transition made: from, to, generation,
--   reason}, in the order they happened; when a release part failed (a key of the wrong
--   type), its error message (a string) follows, and the release did nothing.
-- Invariants: an outcome of another generation changes nothing but frees its probe slot;
-- every transition increments the generation and is returned exactly once (to this caller).
-- The hash is read with one HMGET of the fields the rules need: the scalar fields and the
-- current bucket; all of every bucket only when a rate rule could trip. It is written at most once (HDEL of dropped buckets, HSET of the fields whose
-- value changed), then gets its expiry (lib.lua's expire_breaker rule). A corrupted or
-- missing field reads as its default, and is rewritten when its value changes. The probes
-- zset is written (ZREM) before the hash, so a WRONGTYPE error on either key leaves nothing
-- half-written. A release part is all or nothing on its own, as a separate release.lua call
-- would be: its rate string is read (for a refund) before its permits are written, and a
-- failure of either (redis.pcall) cancels the release and is reported, while the outcomes are
-- still recorded. The release part follows release.lua's rules.
--
-- Why buckets can go unread: only an entry that counts against the target (a failure, or a
-- slow call under the slow-call rule) is checked against the rules (BreakerState::record: a
-- success that is not slow never opens a closed breaker), so a batch that adds none cannot
-- trip a rate rule, and a success only bumps the current bucket. A run of `count` identical
-- entries is recorded at once: the counts grow linearly, each rule's predicate is monotone
-- in the number recorded, so the first entry that trips (if any) is found by bisection.
--
-- Breaker hash fields: s state, g generation, ou open_until ms, o opens, cf consecutive
-- failures, hs half-open successes, nb not_before ms, wn buckets laid out in the window (0:
-- empty window), we<i> / wc<i> / wf<i> / ws<i> epoch / calls / failures / slow of bucket i.

local A = ARGV
local CLOSED, HALF_OPEN, DISABLED = 0, 2, 5
local U32_MAX = 4294967295
local find = string.find

-- lib.lua's stored_uint (1 to `digits` ASCII digits and at most `max`; else 0), for a value
-- that is neither missing nor '0' (the callers test those inline: most fields are).
local function stored_uint(v, digits, max)
  if #v > digits or not find(v, '^%d+$') then
    return 0
  end
  local x = v + 0
  if x > max then
    return 0
  end
  return x
end
local U64, U32 = 999999999999999, U32_MAX

local p_consecutive, p_failure_rate, p_minimum_calls = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
local p_bucket_ms, p_slow_ms, p_slow_rate = tonumber(A[4]), tonumber(A[6]), tonumber(A[7])
local breaker_key, probes_key = KEYS[1], KEYS[2]
local FIRST = 14
local nargs = FIRST - 1 + 5 * (tonumber(A[13]) or 0) -- the last entry value
if nargs > #A then
  return redis.error_reply('ERR fusebox settle.lua: fewer entry values than announced')
end

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

-- Window geometry at `now` (Window::add / Window::totals).
local n = tonumber(A[5])
if n < 1 then
  n = 1
end
local epoch = math.floor(now / math.max(p_bucket_ms, 1))
local cur = epoch % n -- the bucket this instant writes
local fail_rule, slow_rule = p_failure_rate > 0, p_slow_rate > 0
local rates = fail_rule or slow_rule

-- One pass over the entries: the probe slots to free, and whether an entry adds to what a
-- rate rule counts (a failure, or a slow call).
local probe_ids, np = nil, 0
local adds_counted = false
for i = FIRST, nargs - 4, 5 do
  if A[i + 3] ~= '' then
    np = np + 1
    probe_ids = probe_ids or {}
    probe_ids[np] = A[i + 3]
  end
  if (rates and A[i + 1] == '1')
    or (slow_rule and p_slow_ms > 0 and (tonumber(A[i + 2]) or 0) >= p_slow_ms) then
    adds_counted = true
  end
end

-- Field names of the buckets (for up to 60 buckets, the most a config allows).
local function names(p)
  if n > 60 then
    local x = {}
    for i = 0, n - 1 do
      x[i + 1] = p .. i
    end
    return x
  end
  if p == 'we' then
    return { 'we0', 'we1', 'we2', 'we3', 'we4', 'we5', 'we6', 'we7', 'we8', 'we9', 'we10', 'we11',
      'we12', 'we13', 'we14', 'we15', 'we16', 'we17', 'we18', 'we19', 'we20', 'we21', 'we22',
      'we23', 'we24', 'we25', 'we26', 'we27', 'we28', 'we29', 'we30', 'we31', 'we32', 'we33',
      'we34', 'we35', 'we36', 'we37', 'we38', 'we39', 'we40', 'we41', 'we42', 'we43', 'we44',
      'we45', 'we46', 'we47', 'we48', 'we49', 'we50', 'we51', 'we52', 'we53', 'we54', 'we55',
      'we56', 'we57', 'we58', 'we59' }
  elseif p == 'wc' then
    return { 'wc0', 'wc1', 'wc2', 'wc3', 'wc4', 'wc5', 'wc6', 'wc7', 'wc8', 'wc9', 'wc10', 'wc11',
      'wc12', 'wc13', 'wc14', 'wc15', 'wc16', 'wc17', 'wc18', 'wc19', 'wc20', 'wc21', 'wc22',
      'wc23', 'wc24', 'wc25', 'wc26', 'wc27', 'wc28', 'wc29', 'wc30', 'wc31', 'wc32', 'wc33',
      'wc34', 'wc35', 'wc36', 'wc37', 'wc38', 'wc39', 'wc40', 'wc41', 'wc42', 'wc43', 'wc44',
      'wc45', 'wc46', 'wc47', 'wc48', 'wc49', 'wc50', 'wc51', 'wc52', 'wc53', 'wc54', 'wc55',
      'wc56', 'wc57', 'wc58', 'wc59' }
  elseif p == 'wf' then
    return { 'wf0', 'wf1', 'wf2', 'wf3', 'wf4', 'wf5', 'wf6', 'wf7', 'wf8', 'wf9', 'wf10', 'wf11',
      'wf12', 'wf13', 'wf14', 'wf15', 'wf16', 'wf17', 'wf18', 'wf19', 'wf20', 'wf21', 'wf22',
      'wf23', 'wf24', 'wf25', 'wf26', 'wf27', 'wf28', 'wf29', 'wf30', 'wf31', 'wf32', 'wf33',
      'wf34', 'wf35', 'wf36', 'wf37', 'wf38', 'wf39', 'wf40', 'wf41', 'wf42', 'wf43', 'wf44',
      'wf45', 'wf46', 'wf47', 'wf48', 'wf49', 'wf50', 'wf51', 'wf52', 'wf53', 'wf54', 'wf55',
      'wf56', 'wf57', 'wf58', 'wf59' }
  end
  return { 'ws0', 'ws1', 'ws2', 'ws3', 'ws4', 'ws5', 'ws6', 'ws7', 'ws8', 'ws9', 'ws10', 'ws11',
    'ws12', 'ws13', 'ws14', 'ws15', 'ws16', 'ws17', 'ws18', 'ws19', 'ws20', 'ws21', 'ws22',
    'ws23', 'ws24', 'ws25', 'ws26', 'ws27', 'ws28', 'ws29', 'ws30', 'ws31', 'ws32', 'ws33',
    'ws34', 'ws35', 'ws36', 'ws37', 'ws38', 'ws39', 'ws40', 'ws41', 'ws42', 'ws43', 'ws44',
    'ws45', 'ws46', 'ws47', 'ws48', 'ws49', 'ws50', 'ws51', 'ws52', 'ws53', 'ws54', 'ws55',
    'ws56', 'ws57', 'ws58', 'ws59' }
end

-- All four fields of every bucket, bucket by bucket.
local function all_buckets()
  local we, wc, wf, ws = names('we'), names('wc'), names('wf'), names('ws')
  local x = {}
  for i = 1, n do
    x[4 * i - 3], x[4 * i - 2], x[4 * i - 1], x[4 * i] = we[i], wc[i], wf[i], ws[i]
  end
  return x
end

-- The read: [1..8] scalars, [9..12] the current bucket, then, when the batch adds what a rate
-- rule counts (so a rate rule may trip), every bucket's four fields. Otherwise no entry can
-- trip a rate rule and the other buckets are not needed.
local sc = tostring(cur)
local we_cur, wc_cur, wf_cur, ws_cur = 'we' .. sc, 'wc' .. sc, 'wf' .. sc, 'ws' .. sc
local full = rates and adds_counted
local raw
if not full then
  raw = redis.call('HMGET', breaker_key, 's', 'g', 'ou', 'o', 'cf', 'hs', 'nb', 'wn', we_cur,
    wc_cur, wf_cur, ws_cur)
else
  raw = redis.call('HMGET', breaker_key, 's', 'g', 'ou', 'o', 'cf', 'hs', 'nb', 'wn', we_cur,
    wc_cur, wf_cur, ws_cur, unpack(all_buckets()))
end

-- Parse: the values as read (x0) and as they will be (x).
local v
local s0, g0, ou0, o0, cf0, hs0, nb0, wn0 = 0, 0, 0, 0, 0, 0, 0, 0
v = raw[1]
if v and v ~= '0' then
  s0 = stored_uint(v, 15, U64)
  if s0 > DISABLED then
    s0 = CLOSED
  end
end
v = raw[2]
if v and v ~= '0' then
  g0 = stored_uint(v, 15, U64)
end
v = raw[3]
if v and v ~= '0' then
  ou0 = stored_uint(v, 15, U64)
end
v = raw[4]
if v and v ~= '0' then
  o0 = stored_uint(v, 10, U32)
end
v = raw[5]
if v and v ~= '0' then
  cf0 = stored_uint(v, 10, U32)
end
v = raw[6]
if v and v ~= '0' then
  hs0 = stored_uint(v, 10, U32)
end
v = raw[7]
if v and v ~= '0' then
  nb0 = stored_uint(v, 15, U64)
end
v = raw[8]
if v and v ~= '0' then
  wn0 = stored_uint(v, 10, U32)
  if wn0 > 1024 then
    wn0 = 0
  end
end
local e0, c0, f0, sl0 = 0, 0, 0, 0 -- the current bucket's fields as stored
v = raw[9]
if v and v ~= '0' then
  e0 = stored_uint(v, 15, U64)
end
v = raw[10]
if v and v ~= '0' then
  c0 = stored_uint(v, 15, U64)
end
v = raw[11]
if v and v ~= '0' then
  f0 = stored_uint(v, 15, U64)
end
v = raw[12]
if v and v ~= '0' then
  sl0 = stored_uint(v, 15, U64)
end
local s, g, ou, o, cf, hs, nb, wn = s0, g0, ou0, o0, cf0, hs0, nb0, wn0

-- The release part (as release.lua: its own all or nothing; its failure leaves the outcomes
-- to be recorded, and is returned after them): its read, then its permits. Then the probe
-- slots (the probes zset is written before the hash; with a release, type-checked first).
local release = KEYS[4] ~= nil
local release_error = nil
local tat, emission, refunds = nil, 0, 0
if release then
  if np > 0 then
    redis.call('ZCARD', probes_key) -- its type, before the release writes
  end
  emission, refunds = tonumber(A[nargs + 1]) or 0, tonumber(A[nargs + 2]) or 0
  if emission > 0 and refunds > 0 then
    v = redis.pcall('GET', KEYS[3])
    if type(v) == 'table' then
      release_error = v.err
    elseif v and #v <= 16 and find(v, '^%d+$') then
      tat = v + 0
      if tat > 9007199254740991 then -- 2^53 - 1
        tat = nil
      end
    end
  end
  for i = nargs + 3, #A, 1000 do
    if release_error then
      break
    end
    local r = redis.pcall('ZREM', KEYS[4], unpack(A, i, math.min(i + 999, #A)))
    if type(r) == 'table' then
      release_error = r.err
    end
  end
  if release_error then
    tat = nil
  end
end
if np > 0 then
  for i = 1, np, 1000 do
    redis.call('ZREM', probes_key, unpack(probe_ids, i, math.min(i + 999, np)))
  end
end

-- The window: `laid` while it has n buckets (any other layout is dropped by the first add);
-- cb_* the current bucket; other_* the totals of the other live buckets (no entry changes
-- them). `quiet`: no rate rule can trip on this batch (no entry counts against the target),
-- so the other buckets were not needed.
local laid = wn == n
local cb_e, cb_c, cb_f, cb_s = 0, 0, 0, 0
if laid then
  cb_e, cb_c, cb_f, cb_s = e0, c0, f0, sl0
end
local other_c, other_f, other_s = 0, 0, 0
local quiet = not rates or not adds_counted
if rates and laid and s == CLOSED then
  if not quiet then
    local other, at = raw, 12 -- where every bucket's we, wc, wf, ws are: other[at + 1 ..]
    local oldest = math.max(epoch - (n - 1), 0)
    for i = 0, n - 1 do
      if i ~= cur then
        local j = at + 4 * i + 1
        v = other[j]
        local e = v and stored_uint(v, 15, U64) or 0
        if e >= oldest and e <= epoch then
          v = other[j + 1]
          local c = v and stored_uint(v, 15, U64) or 0
          if c > 0 then
            v = other[j + 2]
            other_f = other_f + (v and stored_uint(v, 15, U64) or 0)
            v = other[j + 3]
            other_s = other_s + (v and stored_uint(v, 15, U64) or 0)
            other_c = other_c + c
          end
        end
      end
    end
  end
end

local wclear = 0 -- buckets laid out before a clear / resize: their fields are deleted
local cur_dirty, dirty, drop_probes = false, false, false
local out = { now }

-- Everything but "successes on a closed breaker that cannot trip": built when first needed.
local record
local function make_record()
  local R_CONSECUTIVE, R_FAILURE_RATE, R_SLOW_RATE = 1, 2, 3
  local R_PROBE_FAILED, R_PROBES_SUCCEEDED = 5, 6
  local OPEN = 1

  local function window_clear()
    if wn > wclear then
      wclear = wn
    end
    wn = 0
    laid = false
    cur_dirty = false
    cb_e, cb_c, cb_f, cb_s = 0, 0, 0, 0
    other_c, other_f, other_s = 0, 0, 0
  end

  -- BreakerParams::open_duration_ms: multiply (unrounded) per re-open, ceil once, cap
  local function open_duration(opens)
    local open_ms, mult, max_open = tonumber(A[8]), tonumber(A[9]), tonumber(A[10])
    local cap = math.max(max_open, open_ms)
    local d = open_ms
    local i = 1
    while i < opens and d < cap and mult > 1 do
      d = d * mult
      i = i + 1
    end
    return math.min(math.ceil(d), cap)
  end

  local function transition(to, reason)
    out[#out + 1] = s
    s = to
    g = g + 1
    dirty = true
    out[#out + 1] = to
    out[#out + 1] = g
    out[#out + 1] = reason
  end

  -- BreakerState::open / close
  local function breaker_open(reason)
    o = math.min(o + 1, U32_MAX)
    ou = now + open_duration(o)
    hs = 0
    cf = 0
    drop_probes = true
    window_clear()
    transition(OPEN, reason)
  end

  local function breaker_close(reason)
    o = 0
    ou = 0
    hs = 0
    cf = 0
    drop_probes = true
    window_clear()
    transition(CLOSED, reason)
  end

  -- The least j in [lo, hi] for which pred holds (pred monotone in j), or nil.
  local function first(pred, lo, hi)
    if pred(lo) then
      return lo
    end
    if not pred(hi) then
      return nil
    end
    while hi - lo > 1 do
      local mid = math.floor((lo + hi) / 2)
      if pred(mid) then
        hi = mid
      else
        lo = mid
      end
    end
    return hi
  end

  -- `count` closed-state records of one outcome (Window::add, consecutive failures,
  -- BreakerState::trip_reason after each), stopping at the first that trips.
  local function record_closed(count, failure, slow)
    if not laid then
      local upto = math.max(wn, n)
      if upto > wclear then
        wclear = upto
      end
      wn = n
      laid = true
      cb_e, cb_c, cb_f, cb_s = 0, 0, 0, 0
      other_c, other_f, other_s = 0, 0, 0
    end
    if cb_e ~= epoch then
      cb_e, cb_c, cb_f, cb_s = epoch, 0, 0, 0
    end
    local fl, sl = 0, 0
    if failure then
      fl = 1
    end
    if slow then
      sl = 1
    end
    -- totals before the run; after j more records: calls c + j, failures f + j * fl, ...
    local c, f, sw = other_c + cb_c, other_f + cb_f, other_s + cb_s
    local function fail_trip(j)
      return (f + j * fl) * 100 >= p_failure_rate * (c + j)
    end
    local function slow_trip(j)
      return (sw + j * sl) * 100 >= p_slow_rate * (c + j)
    end
    local trip = nil -- the record (1-based) that trips
    if failure and p_consecutive > 0 then
      local j = math.max(p_consecutive - cf, 1)
      if j <= count then
        trip = j
      end
    end
    if rates and not quiet and (failure or (slow and slow_rule)) then
      local lo, hi = math.max(p_minimum_calls - c, 1), (trip or (count + 1)) - 1
      if lo <= hi then
        local j = fail_rule and first(fail_trip, lo, hi)
        if j then
          hi = j - 1
          trip = j
        end
        if slow_rule and lo <= hi then
          j = first(slow_trip, lo, hi)
          if j then
            trip = j
          end
        end
      end
    end
    local added = trip or count
    cb_c = cb_c + added
    cb_f = cb_f + added * fl
    cb_s = cb_s + added * sl
    cur_dirty = true
    dirty = true
    if failure then
      cf = math.min(cf + added, U32_MAX)
    else
      cf = 0
    end
    if trip then
      if failure and p_consecutive > 0 and cf >= p_consecutive then
        breaker_open(R_CONSECUTIVE)
      elseif fail_rule and fail_trip(trip) then
        breaker_open(R_FAILURE_RATE)
      else
        breaker_open(R_SLOW_RATE)
      end
    end
  end

  -- BreakerState::record of `count` identical outcomes (the generation already matched).
  return function(generation, failure, slow, probe, count)
    if s == HALF_OPEN then
      if probe then
        for _ = 1, count do
          if s ~= HALF_OPEN or generation ~= g then
            break
          end
          if failure or (slow and slow_rule) then
            breaker_open(R_PROBE_FAILED)
          else
            hs = math.min(hs + 1, U32_MAX)
            dirty = true
            if hs >= tonumber(A[11]) then
              breaker_close(R_PROBES_SUCCEEDED)
            end
          end
        end
      end
    elseif s == CLOSED then
      record_closed(count, failure, slow)
    end
  end
end

-- Each entry, in order.
for i = FIRST, nargs - 4, 5 do
  local outcome = A[i + 1]
  local count = tonumber(A[i + 4]) or 0
  if (outcome == '0' or outcome == '1') and count >= 1 and tonumber(A[i]) == g then
    local slow = p_slow_ms > 0 and (tonumber(A[i + 2]) or 0) >= p_slow_ms
    if s == CLOSED and outcome == '0' and quiet then
      -- successes that cannot trip anything: Window::add, consecutive failures back to 0
      if not laid then
        wclear = math.max(wclear, wn, n)
        wn = n
        laid = true
        cb_e, cb_c, cb_f, cb_s = 0, 0, 0, 0
      end
      if cb_e ~= epoch then
        cb_e, cb_c, cb_f, cb_s = epoch, 0, 0, 0
      end
      cb_c = cb_c + count
      if slow then
        cb_s = cb_s + count
      end
      cf = 0
      cur_dirty = true
      dirty = true
    elseif s == CLOSED or s == HALF_OPEN then
      record = record or make_record()
      record(g, outcome == '1', slow, A[i + 3] ~= '', count)
    end
  end
end

if drop_probes then
  redis.call('DEL', probes_key)
end

-- Write back what changed, then the expiry.
if dirty then
  local fmt = string.format
  local set, ns = {}, 0
  if s ~= s0 then
    set[ns + 1], set[ns + 2], ns = 's', fmt('%d', s), ns + 2
  end
  if g ~= g0 then
    set[ns + 1], set[ns + 2], ns = 'g', fmt('%d', g), ns + 2
  end
  if ou ~= ou0 then
    set[ns + 1], set[ns + 2], ns = 'ou', fmt('%d', ou), ns + 2
  end
  if o ~= o0 then
    set[ns + 1], set[ns + 2], ns = 'o', fmt('%d', o), ns + 2
  end
  if cf ~= cf0 then
    set[ns + 1], set[ns + 2], ns = 'cf', fmt('%d', cf), ns + 2
  end
  if hs ~= hs0 then
    set[ns + 1], set[ns + 2], ns = 'hs', fmt('%d', hs), ns + 2
  end
  if wn ~= wn0 then
    set[ns + 1], set[ns + 2], ns = 'wn', fmt('%d', wn), ns + 2
  end
  if cur_dirty then
    if cb_e ~= e0 then
      set[ns + 1], set[ns + 2], ns = we_cur, fmt('%d', cb_e), ns + 2
    end
    if cb_c ~= c0 then
      set[ns + 1], set[ns + 2], ns = wc_cur, fmt('%d', cb_c), ns + 2
    end
    if cb_f ~= f0 then
      set[ns + 1], set[ns + 2], ns = wf_cur, fmt('%d', cb_f), ns + 2
    end
    if cb_s ~= sl0 then
      set[ns + 1], set[ns + 2], ns = ws_cur, fmt('%d', cb_s), ns + 2
    end
  end
  if wclear > 0 then
    local del, nd = {}, 0
    for i = 0, wclear - 1 do
      if not (cur_dirty and i == cur) then
        del[nd + 1], del[nd + 2], del[nd + 3], del[nd + 4] = 'we' .. i, 'wc' .. i, 'wf' .. i,
          'ws' .. i
        nd = nd + 4
      end
    end
    for i = 1, nd, 1000 do
      redis.call('HDEL', breaker_key, unpack(del, i, math.min(i + 999, nd)))
    end
  end
  if ns > 0 then
    redis.call('HSET', breaker_key, unpack(set, 1, ns))
  end
  if s == 3 or s == 4 or s == DISABLED then -- operator states
    redis.call('PERSIST', breaker_key)
  else
    local idle = tonumber(A[12])
    local ttl = idle
    if ou - now + idle > ttl then
      ttl = ou - now + idle
    end
    if nb - now + idle > ttl then
      ttl = nb - now + idle
    end
    if ttl < 1 then
      ttl = 1
    end
    redis.call('PEXPIRE', breaker_key, fmt('%d', ttl))
  end
end

-- The refund (release.lua: one emission interval per slot, never below now).
if tat then
  local now_us = now * 1000
  tat = tat - refunds * emission
  if tat < now_us then
    tat = now_us
  end
  local ttl = math.ceil((tat - now_us) / 1000) + 1000
  redis.call('SET', KEYS[3], string.format('%d', tat), 'PX', string.format('%d', ttl))
end

if release_error then
  out[#out + 1] = tostring(release_error)
end
return out
