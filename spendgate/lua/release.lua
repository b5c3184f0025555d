-- release: ARGV now, request_id, idem_ttl_ms. Frees a hold without charging.
local now = now_ms(ARGV[1])
local rid, idem_ttl = ARGV[2], tonumber(ARGV[3])

local done = redis.call('GET', K_IDEM)
if done then return {'duplicate', done} end
local raw = redis.call('HGET', K_HOLDS, rid)
local amount = 0
if raw then
  amount = parse_hold(raw)
  drop_hold(rid, amount)
end
redis.call('SET', K_IDEM, 'released', 'PX', idem_ttl)
return {'ok', amount, now}
