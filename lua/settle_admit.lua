-- settle_admit.lua: apply this replica's queued settles for the keys of an admission, then
-- decide the admission: one atomic operation, so a replica's own outcomes and releases always
-- take effect before its next admission on the same keys (also when a script had to be
-- re-sent after NOSCRIPT, or on Cluster, where nothing can reorder the two halves).
--
-- Built, not copied: src/store/redis/ride.rs assembles the script Redis runs at compile time
-- as
--     local settle_part = function(KEYS, ARGV) <settle.lua> end
--     local release_part = function(KEYS, ARGV) <release.lua> end
--     local admit_part = function(KEYS, ARGV) <admit.lua> end
--     <this file>
-- so settle.lua, release.lua and admit.lua run unchanged (their KEYS / ARGV are the function
-- parameters) and each keeps a single source.
--
-- KEYS: admit.lua's, by mode (both: breaker, probes, rate, permits; breaker: breaker, probes;
--       feature: rate, permits). The settle part uses the target's two keys (and, for
--       'settle+release', the feature's two as well); the release part the feature's two.
-- ARGV:
--   [1] what rides: 'none' | 'settle' (outcomes of the target) | 'settle+release' (outcomes
--       and releases, single node) | 'release' (releases of the feature)
--   [2] n: how many of the following values are the riding part's ARGV (settle.lua's, or
--       release.lua's)
--   [3 .. 2 + n] the riding part's ARGV
--   [3 + n ..] admit.lua's ARGV
-- Returns a two-element array: {admission, settled}
--   admission: admit.lua's reply (12 integers), or a string: the error admit.lua raised (it
--              reads every key before its first write, so it then took nothing);
--   settled:   settle.lua's reply (with 'settle' / 'settle+release'), release.lua's (with
--              'release'), or 0 (with 'none').
-- Invariants:
--   * the riding part runs first and completely, exactly as its own script call would, so
--     the admission sees its effects;
--   * an error in the riding part (a key of the wrong type) aborts the script before any
--     write: settle.lua and release.lua read (type-check) their keys first. The caller then
--     knows nothing was applied and gives the settles back to its queue;
--   * an error in the admission part does not undo the riding part: it is returned as a
--     string after the riding part's result, which the caller reports as delivered.

local what = ARGV[1]
local n = tonumber(ARGV[2]) or -1
if n < 0 or n + 2 > #ARGV then
  return redis.error_reply('ERR fusebox settle_admit.lua: bad riding part length')
end
local ride_argv = {}
for i = 1, n do
  ride_argv[i] = ARGV[2 + i]
end
local admit_argv = {}
for i = 3 + n, #ARGV do
  admit_argv[#admit_argv + 1] = ARGV[i]
end
local mode = admit_argv[1]

local settled = 0
if what == 'settle' or what == 'settle+release' then
  if mode == 'feature' then
    return redis.error_reply('ERR fusebox settle_admit.lua: outcomes ride with the breaker')
  end
  local keys = { KEYS[1], KEYS[2] }
  if what == 'settle+release' then
    if mode ~= 'both' then
      return redis.error_reply('ERR fusebox settle_admit.lua: settle+release needs both')
    end
    keys[3], keys[4] = KEYS[3], KEYS[4]
  end
  settled = settle_part(keys, ride_argv)
elseif what == 'release' then
  local keys
  if mode == 'both' then
    keys = { KEYS[3], KEYS[4] }
  elseif mode == 'feature' then
    keys = { KEYS[1], KEYS[2] }
  else
    return redis.error_reply('ERR fusebox settle_admit.lua: releases ride with the feature')
  end
  settled = release_part(keys, ride_argv)
elseif what ~= 'none' then
  return redis.error_reply('ERR fusebox settle_admit.lua: unknown riding part')
end
if type(settled) == 'table' and settled.err then
  return settled -- nothing was written (see the invariants)
end

local ok, admission = pcall(admit_part, KEYS, admit_argv)
if not ok then
  if type(admission) == 'table' then
    admission = admission.err
  end
  admission = tostring(admission)
elseif type(admission) == 'table' and admission.err then
  admission = tostring(admission.err)
end
return { admission, settled }
