-- extend: ARGV now, request_id, extra, ttl_ms
-- Grows a live hold (a stream outrunning its reservation) if the money is there.
local now = now_ms(ARGV[1])
local rid, extra, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

if redis.call('EXISTS', K_IDEM) == 1 then return {'duplicate'} end
local raw = redis.call('HGET', K_HOLDS, rid)
if not raw then return {'no_hold'} end
local suspended = redis.call('HGETALL', K_SUSP)
if #suspended > 0 then return {'suspended', suspended[1], suspended[2]} end

local cfg = redis.call('HMGET', K_CFG, 'mode', 'limit', 'period', 'max_cost')
local amount, _, key, estimate = parse_hold(raw)
local max_cost = num(cfg[4])
if max_cost > 0 and amount + extra > max_cost then return {'cost_cap', max_cost, amount + extra} end
reap(now, 16)
rollover(cfg[3], now)
local acct = redis.call('HMGET', K_ACCT, 'balance', 'held', 'spent')
local balance, held, spent = num(acct[1]), num(acct[2]), num(acct[3])
local limit = num(cfg[2])
local available = (cfg[1] == 'capped') and (limit - spent - held) or (balance - held)
if cfg[1] ~= 'capped' and limit > 0 then
  available = math.min(available, limit - spent - held)
end
if extra > available then return {'insufficient', available, extra} end

local deadline = now + ttl
redis.call('HSET', K_HOLDS, rid, encode_hold(amount + extra, deadline, key, estimate))
redis.call('ZADD', K_DEADLINES, deadline, rid)
redis.call('HINCRBY', K_ACCT, 'held', extra)
return {'ok', amount + extra, available - extra, deadline}
