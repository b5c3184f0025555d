-- release: ARGV now, request_id, idem_ttl_ms. Frees a hold at every level without charging,
-- and gives back what it counted against cost-based rate limits (a free request consumes no
-- cost limit).
local now = now_ms(ARGV[1])
local rid, idem_ttl = ARGV[2], tonumber(ARGV[3])

if not current_ancestor_cfgs() then return {'moved'} end
local done = redis.call('GET', K_IDEM)
if done then return {'duplicate', done} end
local raw = redis.call('HGET', K_HOLDS, rid)
local amount = 0
if raw then
  local held, _, key_id, estimate = parse_hold(raw)
  amount = held
  drop_hold(rid, amount, key_id)
  local cfg = redis.call('HMGET', K_CFG, 'rl', 'krl:' .. key_id, 'soft')
  correct_cost_limits(cfg[1], cfg[2], 0 - estimate, now, K_RL, cfg[3])
  for i = 2, #LEVELS do
    local above = redis.call('HMGET', LEVELS[i].cfg, 'rl', 'soft')
    correct_cost_limits(above[1], nil, 0 - estimate, now, LEVELS[i].rl, above[2])
  end
end
redis.call('SET', K_IDEM, 'released', 'PX', idem_ttl)
return {'ok', amount, now}
