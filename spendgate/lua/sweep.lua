-- sweep: ARGV now, max. Releases up to `max` expired holds of one customer (a crashed sidecar's
-- holds on an account that sees no traffic); returns how many, and how many remain expired.
local now = now_ms(ARGV[1])
if not current_ancestor_cfgs() then return {'moved'} end
local released = reap(now, tonumber(ARGV[2]))
local left = redis.call('ZCOUNT', K_DEADLINES, '-inf', now)
return {'ok', released, left}
