-- settle: ARGV now, request_id, cost, key_id, idem_ttl_ms, then ledger field/value pairs.
-- Charges the actual cost, frees the hold, corrects cost-based rate limits, appends to the
-- ledger. A settle without a live hold (expired, or served while Redis was down) still charges.
local now = now_ms(ARGV[1])
local rid, cost, key_id, idem_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])

local done = redis.call('GET', K_IDEM)
if done then return {'duplicate', done} end

local estimate = 0
local raw = redis.call('HGET', K_HOLDS, rid)
if raw then
  local amount, _, hold_key, hold_estimate = parse_hold(raw)
  drop_hold(rid, amount)
  estimate = hold_estimate
  if key_id == '' then key_id = hold_key end
end

local cfg = redis.call('HMGET', K_CFG, 'period', 'rl', 'krl:' .. key_id)
rollover(cfg[1], now)
redis.call('HINCRBY', K_ACCT, 'balance', 0 - cost)  -- never -0
redis.call('HINCRBY', K_ACCT, 'spent', cost)
redis.call('HINCRBY', K_ACCT, 'charged', cost)

local delta = cost - estimate
if delta ~= 0 then
  for _, l in ipairs(rate_limits(cfg[2], cfg[3])) do
    if l.kind == 'cost' then
      local tat = num(redis.call('HGET', K_RL, l.id))
      if tat > 0 then
        -- GCRA: the difference arrives now, so it starts from max(tat, now) like a request;
        -- a refund never moves the arrival time into the past.
        local base = math.max(tat, now)
        redis.call('HSET', K_RL, l.id, math.max(now, base + delta * l.window_ms / l.amount))
      end
    end
  end
end

local fields = {'type', 'usage', 'request_id', rid, 'key', key_id, 'cost', fmt_int(cost),
  'estimate', fmt_int(estimate), 'ts', fmt_int(now)}
for i = 6, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
local entry = ledger_append(fields)
redis.call('SET', K_IDEM, 'settled:' .. fmt_int(cost), 'PX', idem_ttl)
local acct = redis.call('HMGET', K_ACCT, 'balance', 'held', 'spent')
return {'ok', num(acct[1]), num(acct[2]), num(acct[3]), entry}
