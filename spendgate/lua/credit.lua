-- fund / adjust: ARGV now, funding_id, amount (signed for adjust), type, then ledger pairs.
-- Applied once per funding id; the idempotency key is kept for good (funding is rare).
local now = now_ms(ARGV[1])
local fid, amount, kind = ARGV[2], tonumber(ARGV[3]), ARGV[4]

local done = redis.call('GET', K_IDEM)
if done then
  return {'duplicate', num(redis.call('HGET', K_ACCT, 'balance')), done}
end
local balance = redis.call('HINCRBY', K_ACCT, 'balance', amount)
if kind == 'fund' then
  redis.call('HINCRBY', K_ACCT, 'funded', amount)
else
  redis.call('HINCRBY', K_ACCT, 'adjusted', amount)
end
local fields = {'type', kind, 'funding_id', fid, 'amount', fmt_int(amount),
  'balance', fmt_int(balance), 'ts', fmt_int(now)}
for i = 5, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
local entry = ledger_append(fields)
redis.call('SET', K_IDEM, fmt_int(amount) .. '@' .. entry)
return {'ok', balance, entry}
