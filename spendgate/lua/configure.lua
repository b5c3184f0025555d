-- configure: ARGV now, spec_balance (-1 = none), spec_suspended ('1'|'0'), then cfg pairs.
-- Replaces the customer's configuration atomically. The spec's opening balance is applied as
-- the difference to what the spec granted before, so re-applying the same spec is a no-op.
local now = now_ms(ARGV[1])
local spec_balance, spec_suspended = tonumber(ARGV[2]), ARGV[3]

if redis.call('HEXISTS', K_CFG, 'moved') == 1 then return {'moved'} end  -- tree_moves
redis.call('DEL', K_CFG)
local pairs_ = {}
for i = 4, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', K_CFG, unpack(pairs_))
redis.call('HSETNX', K_ACCT, 'balance', 0)
redis.call('HSETNX', K_ACCT, 'held', 0)
redis.call('HSETNX', K_ACCT, 'spent', 0)
rollover(redis.call('HGET', K_CFG, 'period'), now)

local delta = 0
if spec_balance >= 0 then
  local granted = num(redis.call('HGET', K_ACCT, 'spec_granted'))
  delta = spec_balance - granted
  if delta ~= 0 then
    local balance = redis.call('HINCRBY', K_ACCT, 'balance', delta)
    redis.call('HSET', K_ACCT, 'spec_granted', spec_balance)
    ledger_append({'type', 'adjust', 'funding_id', 'spec:' .. fmt_int(spec_balance),
      'amount', fmt_int(delta), 'balance', fmt_int(balance), 'source', 'spec', 'ts', fmt_int(now)})
  end
end
if spec_suspended == '1' then
  redis.call('HSET', K_SUSP, 'spec', 'suspended in the CustomerBudget spec')
else
  redis.call('HDEL', K_SUSP, 'spec')
end
return {'ok', delta}
