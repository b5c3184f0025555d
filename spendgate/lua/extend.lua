-- extend: ARGV now, request_id, extra, ttl_ms, origin (as for reserve)
-- Grows a live hold (a stream outrunning its reservation) at every level, if the money is
-- there at every level (and within the key's own cap). Refusals name the level as reserve does.
local now = now_ms(ARGV[1])
local rid, extra, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local cfgs = current_ancestor_cfgs()
if not cfgs then return {'moved'} end
if redis.call('EXISTS', K_IDEM) == 1 then return {'duplicate'} end
reap(now, 16)  -- first: an expired hold (this one included) is gone, not grown back
local raw = redis.call('HGET', K_HOLDS, rid)
if not raw then return {'no_hold'} end
for i, level in ipairs(LEVELS) do
  local suspended = redis.call('HGETALL', level.susp)
  if #suspended > 0 then return {'suspended', suspended[1], suspended[2], i} end
end

local cfg = redis.call('HMGET', K_CFG, 'mode', 'limit', 'period', 'max_cost')
local amount, _, key, estimate = parse_hold(raw)
local max_cost = num(cfg[4])
if max_cost > 0 and amount + extra > max_cost then return {'cost_cap', max_cost, amount + extra} end
local states = level_states(now, cfg[1], num(cfg[2]), cfg[3], cfgs)
local key_avail = key_available(key, redis.call('HGET', K_CFG, 'kcap:' .. key), now)
local at, available = tightest(states, key_avail)
if extra > available then return {'insufficient', available, extra, at} end

local deadline = now + ttl
put_hold(rid, amount + extra, extra, deadline, key, estimate, ARGV[5])
if key_avail then redis.call('HINCRBY', K_ACCT, key_prefix(key) .. 'held', extra) end
return {'ok', amount + extra, available - extra, deadline}
