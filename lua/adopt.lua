-- adopt.lua: count in the fleet's bulkhead the permits a replica granted on local state
-- while Redis was unavailable and that are still running (reconciliation on recovery). Runs
-- after lib.lua.
--
-- KEYS: [1] permits zset (permit id -> lease expiry, ms)
-- ARGV: pairs: [2k-1] permit id  [2k] ms of lease left (entries with less than 1 ms are
--   skipped)
-- Returns: the number of permits added (an id already present, live or expired, is left as
--   it is: adopting twice adds nothing).
-- Invariants: adds without checking the limit: these calls are already running, the count
-- must include them, and admit.lua refuses new ones until enough of them end. An adopted
-- permit is an ordinary one (released by its id, reclaimed when its lease ends). The zset
-- expires (latest expiry - now) + 1 s, as with every lease.

local now = now_ms()
local key = KEYS[1]
local added = 0
local latest = now
for i = 1, #ARGV - 1, 2 do
  local left = math.floor(tonumber(ARGV[i + 1]) or 0)
  if left >= 1 then
    added = added + redis.call('ZADD', key, 'NX', fmt(now + left), ARGV[i])
    if now + left > latest then
      latest = now + left
    end
  end
end
if added > 0 then
  expire_leases(key, now, latest)
end
return added
