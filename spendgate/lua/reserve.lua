-- reserve: ARGV now, request_id, key_id, hold, currency, ttl_ms, minimum, origin (the budget's
-- customerId, for its ancestors' copies of the hold), then, when the request may be
-- downgraded to a cheaper model, that model's hold and minimum.
-- Checks state, cost cap, rate limits and balance at every level (the budget, each ancestor,
-- the key's own cap); on success holds `hold` at every level, or, when less is available, as
-- much as is available everywhere down to `minimum` (the sidecar then lowers the request's
-- output limit to what was held). Returns the amount held. Refusals name the level: 1 is the
-- budget, 2 its parent, ..., 0 the key's own cap. Soft limits act first: a level's active
-- throttles add their rate limits to its own, and an active downgrade at any level makes the
-- request the cheaper one (the last value returned names that level, 0 for none). Every hard
-- check then applies to the amounts held.
local now = now_ms(ARGV[1])
local rid, key_id, wanted, currency, ttl =
  ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local minimum = math.min(tonumber(ARGV[7]) or wanted, wanted)

if redis.call('EXISTS', K_IDEM) == 1 then return {'duplicate'} end
local existing = redis.call('HGET', K_HOLDS, rid)
if existing then
  local amount, deadline = parse_hold(existing)
  return {'ok', 0, 0, 0, -1, -1, 0, deadline, amount, 0}
end

local cfg = redis.call('HMGET', K_CFG, 'currency', 'mode', 'limit', 'period', 'max_cost', 'rl',
  'krl:' .. key_id, 'parent', 'kcap:' .. key_id, 'soft')
if not cfg[1] then return {'unknown_customer'} end
if cfg[1] ~= currency then return {'currency_mismatch', cfg[1]} end
local cfgs = ancestor_cfgs()
if not tree_consistent(cfg[8], cfgs) then return {'moved'} end
for i = 2, #LEVELS do
  if cfgs[i][1] ~= currency then return {'currency_mismatch', cfgs[i][1], i} end
end

for i, level in ipairs(LEVELS) do
  local suspended = redis.call('HGETALL', level.susp)
  if #suspended > 0 then return {'suspended', suspended[1], suspended[2], i} end
end

reap(now, 64)

local states = level_states(now, cfg[2], num(cfg[3]), cfg[4], cfgs)
local softs = {soft_limits(cfg[10])}  -- each level's, decoded once
for i = 2, #LEVELS do softs[i] = soft_limits(cfgs[i][7]) end
local alt_wanted, downgraded = tonumber(ARGV[9]), 0
if alt_wanted then
  for i = 1, #LEVELS do
    for _, soft in ipairs(softs[i]) do
      if downgraded == 0 and soft.action == 'downgrade' and soft_active(soft, states[i]) then
        downgraded = i
      end
    end
  end
  if downgraded > 0 then
    wanted = alt_wanted
    minimum = math.min(tonumber(ARGV[10]) or alt_wanted, alt_wanted)
  end
end
local max_cost = num(cfg[5])
if max_cost > 0 and minimum > max_cost then return {'cost_cap', max_cost, minimum} end
local at, available = tightest(states, key_available(key_id, cfg[9], now))
if minimum > available then
  local by_limit = at == 0 or states[at][4] == 'capped'
    or minimum <= states[at][2] - states[at][3]
  return {by_limit and 'cap_reached' or 'insufficient', available, minimum, at}
end
local amount = math.min(wanted, available)
if max_cost > 0 then amount = math.min(amount, max_cost) end

-- Rate limits at every level: every limit must allow before any is charged.
local updates = {}
local tightest_ratio, t_limit, t_remaining, t_reset = 2, -1, -1, 0
for i, level in ipairs(LEVELS) do
  local limits
  if i == 1 then limits = rate_limits(cfg[6], cfg[7]) else limits = rate_limits(cfgs[i][5]) end
  for _, l in ipairs(throttle_limits(softs[i], states[i])) do limits[#limits + 1] = l end
  local new_tats = {}
  for _, l in ipairs(limits) do
    local units = (l.kind == 'cost') and amount or 1
    local tat = num(redis.call('HGET', level.rl, l.id))
    local allowed, new_tat, retry, remaining, reset = gcra(l, tat, now, units)
    if not allowed then
      return {'rate_limited', math.ceil(retry), l.amount, remaining, math.ceil(reset), l.id, i}
    end
    new_tats[#new_tats + 1] = l.id
    new_tats[#new_tats + 1] = new_tat
    local ratio = remaining / l.amount
    if ratio < tightest_ratio then
      tightest_ratio, t_limit, t_remaining, t_reset = ratio, l.amount, remaining, math.ceil(reset)
    end
  end
  if #new_tats > 0 then updates[#updates + 1] = {level.rl, new_tats} end
end
for _, update in ipairs(updates) do
  redis.call('HSET', update[1], unpack(update[2]))
  redis.call('PEXPIRE', update[1], 2 * DAY_MS)
end

local deadline = now + ttl
put_hold(rid, amount, amount, deadline, key_id, amount, ARGV[8])
if cfg[9] then redis.call('HINCRBY', K_ACCT, key_prefix(key_id) .. 'held', amount) end
return {'ok', states[1][2], states[1][3] + amount, available - amount, t_limit, t_remaining,
  t_reset, deadline, amount, downgraded}
