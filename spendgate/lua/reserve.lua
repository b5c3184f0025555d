-- reserve: ARGV now, request_id, key_id, hold, currency, ttl_ms, minimum
-- Checks state, cost cap, rate limits and balance; on success holds `hold`, or, when less is
-- available, as much as is available down to `minimum` (the sidecar then lowers the request's
-- output limit to what was held). Returns the amount held.
local now = now_ms(ARGV[1])
local rid, key_id, wanted, currency, ttl =
  ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local minimum = math.min(tonumber(ARGV[7]) or wanted, wanted)

if redis.call('EXISTS', K_IDEM) == 1 then return {'duplicate'} end
local existing = redis.call('HGET', K_HOLDS, rid)
if existing then
  local amount, deadline = parse_hold(existing)
  return {'ok', 0, 0, 0, -1, -1, 0, deadline, amount}
end

local cfg = redis.call('HMGET', K_CFG, 'currency', 'mode', 'limit', 'period', 'max_cost', 'rl',
  'krl:' .. key_id)
if not cfg[1] then return {'unknown_customer'} end
if cfg[1] ~= currency then return {'currency_mismatch', cfg[1]} end

local suspended = redis.call('HGETALL', K_SUSP)
if #suspended > 0 then return {'suspended', suspended[1], suspended[2]} end

reap(now, 64)
rollover(cfg[4], now)

local max_cost = num(cfg[5])
if max_cost > 0 and minimum > max_cost then return {'cost_cap', max_cost, minimum} end

local acct = redis.call('HMGET', K_ACCT, 'balance', 'held', 'spent')
local balance, held, spent = num(acct[1]), num(acct[2]), num(acct[3])
local limit = num(cfg[3])
local mode = cfg[2]
local available = available_of(mode, limit, balance, held, spent)
if minimum > available then
  local by_limit = mode == 'capped' or minimum <= balance - held
  return {by_limit and 'cap_reached' or 'insufficient', available, minimum}
end
local amount = math.min(wanted, available)
if max_cost > 0 then amount = math.min(amount, max_cost) end

-- Rate limits: every limit must allow before any is charged.
local limits = rate_limits(cfg[6], cfg[7])
local new_tats = {}
local tightest_ratio, t_limit, t_remaining, t_reset = 2, -1, -1, 0
for i, l in ipairs(limits) do
  local units = (l.kind == 'cost') and amount or 1
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
redis.call('HSET', K_HOLDS, rid, encode_hold(amount, deadline, key_id, amount))
redis.call('ZADD', K_DEADLINES, deadline, rid)
redis.call('HINCRBY', K_ACCT, 'held', amount)
return {'ok', balance, held + amount, available - amount, t_limit, t_remaining, t_reset,
  deadline, amount}
