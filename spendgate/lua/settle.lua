-- settle: ARGV now, request_id, cost, key_id, idem_ttl_ms, then ledger field/value pairs.
-- Charges the actual cost at every level (an ancestor also counts it in `dspent`, what its
-- descendants spent), frees the hold, corrects cost-based rate limits, appends to every
-- level's ledger. A settle without a live hold (expired, or served while Redis was down)
-- still charges.
--
-- The charge never exceeds the bound, and is the same at every level: with a hold, at most the
-- hold; without one, at most what is available at every level (so no prepaid balance goes
-- below zero, no capped budget past its limit, no key past its cap). Anything above is
-- recorded as `absorbed` at every level: the platform's measured loss.
local now = now_ms(ARGV[1])
local rid, cost, key_id, idem_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])

local cfgs = current_ancestor_cfgs()
if not cfgs then return {'moved'} end
local done = redis.call('GET', K_IDEM)
if done then return {'duplicate', done} end

local estimate, hold = 0, -1
local raw = redis.call('HGET', K_HOLDS, rid)
if raw then
  local amount, _, hold_key, hold_estimate = parse_hold(raw)
  drop_hold(rid, amount, hold_key)
  estimate, hold = hold_estimate, amount
  if key_id == '' then key_id = hold_key end
end

local cfg = redis.call('HMGET', K_CFG, 'period', 'rl', 'krl:' .. key_id, 'mode', 'limit',
  'kcap:' .. key_id, 'soft')
local states = level_states(now, cfg[4], num(cfg[5]), cfg[1], cfgs)
local key_avail = key_available(key_id, cfg[6], now)
local charged = cost
if hold >= 0 then
  charged = math.min(cost, hold)
else
  local _, available = tightest(states, key_avail)
  charged = math.max(0, math.min(cost, available))
end
local absorbed = cost - charged

local fields = {'type', 'usage', 'request_id', rid, 'key', key_id, 'cost', fmt_int(charged),
  'estimate', fmt_int(estimate), 'absorbed', fmt_int(absorbed), 'ts', fmt_int(now)}
for i = 6, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
local entry
for i, level in ipairs(LEVELS) do
  redis.call('HINCRBY', level.acct, 'balance', 0 - charged)  -- never -0
  redis.call('HINCRBY', level.acct, 'spent', charged)
  if i > 1 then redis.call('HINCRBY', level.acct, 'dspent', charged) end
  redis.call('HINCRBY', level.acct, 'charged', charged)
  if absorbed > 0 then
    redis.call('HINCRBY', level.acct, 'absorbed', absorbed)
  end
  if i == 1 then
    correct_cost_limits(cfg[2], cfg[3], charged - estimate, now, K_RL, cfg[7])
    entry = ledger_append(fields)
  else
    correct_cost_limits(cfgs[i][5], nil, charged - estimate, now, level.rl, cfgs[i][7])
    ledger_append(fields, level.ledger)
  end
end
if key_avail then
  redis.call('HINCRBY', K_ACCT, key_prefix(key_id) .. 'spent', charged)
end
redis.call('SET', K_IDEM, 'settled:' .. fmt_int(charged), 'PX', idem_ttl)
local acct = redis.call('HMGET', K_ACCT, 'balance', 'held', 'spent')
return {'ok', num(acct[1]), num(acct[2]), num(acct[3]), entry, charged, absorbed}
