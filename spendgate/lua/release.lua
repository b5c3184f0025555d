-- release: ARGV now, request_id, idem_ttl_ms. Frees a hold without charging, and gives back
-- what it counted against cost-based rate limits (a free request consumes no cost limit).
local now = now_ms(ARGV[1])
local rid, idem_ttl = ARGV[2], tonumber(ARGV[3])

local done = redis.call('GET', K_IDEM)
if done then return {'duplicate', done} end
local raw = redis.call('HGET', K_HOLDS, rid)
local amount = 0
if raw then
  local _, _, key_id, estimate = parse_hold(raw)
  amount = parse_hold(raw)
  drop_hold(rid, amount)
  local cfg = redis.call('HMGET', K_CFG, 'rl', 'krl:' .. key_id)
  correct_cost_limits(cfg[1], cfg[2], 0 - estimate, now)
end
redis.call('SET', K_IDEM, 'released', 'PX', idem_ttl)
return {'ok', amount, now}
