-- reserve: ARGV now, request_id, key_id, estimate, currency, ttl_ms
-- Checks state, cost cap, rate limits and balance; on success holds `estimate`.
local now = now_ms(ARGV[1])
local rid, key_id, estimate, currency, ttl =
  ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])

if redis.call('EXISTS', K_IDEM) == 1 then return {'duplicate'} end
local existing = redis.call('HGET', K_HOLDS, rid)
if existing then
  local amount, deadline = parse_hold(existing)
  return {'ok', 0, 0, 0, -1, -1, 0, deadline}
end

local cfg = redis.call('HMGET', K_CFG, 'currency', 'mode', 'limit', 'period', 'max_cost', 'rl',
  'krl:' .. key_id)
if not cfg[1] then return {'unknown_customer'} end
if cfg[1] ~= currency then return {'currency_mismatch', cfg[1]} end

local suspended = redis.call('HGETALL', K_SUSP)
if #suspended > 0 then return {'suspended', suspended[1], suspended[2]} end

reap(now, 64)
local period_started = rollover(cfg[4], now)

local max_cost = num(cfg[5])
if max_cost > 0 and estimate > max_cost then return {'cost_cap', max_cost, estimate} end

local acct = redis.call('HMGET', K_ACCT, 'balance', 'held', 'spent')
local balance, held, spent = num(acct[1]), num(acct[2]), num(acct[3])
local limit = num(cfg[3])
local available
if cfg[2] == 'capped' then
  available = limit - spent - held
else
  available = balance - held
end
if estimate > available then
  return {cfg[2] == 'capped' and 'cap_reached' or 'insufficient', available, estimate}
end
if cfg[2] ~= 'capped' and limit > 0 and spent + held + estimate > limit then
  return {'cap_reached', limit - spent - held, estimate}
end

-- Rate limits: every limit must allow before any is charged.
local limits = rate_limits(cfg[6], cfg[7])
local new_tats = {}
local tightest_ratio, t_limit, t_remaining, t_reset = 2, -1, -1, 0
for i, l in ipairs(limits) do
  local units = (l.kind == 'cost') and estimate or 1
  local tat = num(redis.call('HGET', K_RL, l.id))
  local allowed, new_tat, retry, remaining, reset = gcra(l, tat, now, units)
  if not allowed then
    return {'rate_limited', math.ceil(retry), l.amount, remaining, math.ceil(reset), l.id}
  end
  new_tats[#new_tats + 1] = l.id
  new_tats[#new_tats + 1] = new_tat
  local ratio = remaining / l.amount
  if ratio < tightest_ratio then
    tightest_ratio, t_limit, t_remaining, t_reset = ratio, l.amount, remaining, math.ceil(reset)
  end
end
if #new_tats > 0 then
  redis.call('HSET', K_RL, unpack(new_tats))
  redis.call('PEXPIRE', K_RL, 2 * DAY_MS)
end

local deadline = now + ttl
redis.call('HSET', K_HOLDS, rid, encode_hold(estimate, deadline, key_id, estimate))
redis.call('ZADD', K_DEADLINES, deadline, rid)
redis.call('HINCRBY', K_ACCT, 'held', estimate)
return {'ok', balance, held + estimate, available - estimate, t_limit, t_remaining, t_reset,
  deadline}
