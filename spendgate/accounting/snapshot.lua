-- snapshot: everything the audit compares, read at one instant (read-only).
-- KEYS 1 acct  2 holds  3 hold deadlines  4 ledger  5 ledger base  6 stripe link  7 exported
local acct = redis.call('HGETALL', KEYS[1])
local holds = redis.call('HGETALL', KEYS[2])
local deadlines = redis.call('ZRANGE', KEYS[3], 0, -1)
local length, added, last = 0, 0, '0-0'
if redis.call('EXISTS', KEYS[4]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[4])
  for i = 1, #info, 2 do
    if info[i] == 'length' then length = info[i + 1] end
    if info[i] == 'entries-added' then added = info[i + 1] end
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local base = redis.call('HGETALL', KEYS[5])
local linked = redis.call('HGET', KEYS[6], 'customer') or ''
local exported = redis.call('HGETALL', KEYS[7])
return {acct, holds, deadlines, length, added, last, base, linked, exported}
