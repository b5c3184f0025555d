-- fund / adjust: ARGV now, funding_id, amount (signed for adjust), type ('fund'|'adjust'),
-- allow_negative ('1'|'0'), then ledger pairs.
-- Applied once per funding id; the idempotency key is kept for good (funding is rare) and
-- remembers what the id was used for, "amount@entry@type", so that reusing an id for another
-- amount or type is refused (as Stripe treats a reused idempotency key), never taken for a
-- replay. Older records are "amount@entry" (type unknown); "0@..." marks an id as spent with
-- nothing applied (a voided Stripe grant), which every later call with that id replays.
local now = now_ms(ARGV[1])
local fid, amount, kind, allow_negative = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1'

if redis.call('HEXISTS', K_CFG, 'moved') == 1 then return {'moved'} end  -- see tree_moves
local balance = num(redis.call('HGET', K_ACCT, 'balance'))
local done = redis.call('GET', K_IDEM)
if done then
  local used, used_kind = string.match(done, '^(-?%d+)@[^@]*@?(%l*)$')
  used = tonumber(used)
  if used == nil or (used ~= 0 and (used ~= amount or (used_kind ~= '' and used_kind ~= kind)))
  then
    return {'conflict', balance, done}
  end
  return {'duplicate', balance, done}
end

if redis.call('HGET', K_CFG, 'mode') == 'capped' then
  return {'capped', balance}
end
if amount < 0 and balance + amount < 0 and not allow_negative then
  return {'negative', balance}
end

balance = redis.call('HINCRBY', K_ACCT, 'balance', amount)
if kind == 'fund' then
  redis.call('HINCRBY', K_ACCT, 'funded', amount)
else
  redis.call('HINCRBY', K_ACCT, 'adjusted', amount)
end
local fields = {'type', kind, 'funding_id', fid, 'amount', fmt_int(amount),
  'balance', fmt_int(balance), 'ts', fmt_int(now)}
for i = 6, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
local entry = ledger_append(fields)
redis.call('SET', K_IDEM, fmt_int(amount) .. '@' .. entry .. '@' .. kind)
return {'ok', balance, entry}
