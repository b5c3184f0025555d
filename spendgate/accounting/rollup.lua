-- rollup: add settled usage after the rollup cursor into per-minute and per-hour spend buckets.
-- KEYS 1 ledger  2 state hash (cursor)  3 minute buckets  4 hour buckets
-- ARGV 1 max entries  2 keep minute buckets newer than (ms)  3 keep hour buckets newer than (ms)
-- Returns {entries read, 1 if the ledger has nothing more after the cursor}.
local ledger, state, minutes, hours = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max, keep_minutes, keep_hours = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cursor = redis.call('HGET', state, 'cursor')
local start = cursor and ('(' .. cursor) or '-'
local entries = redis.call('XRANGE', ledger, start, '+', 'COUNT', max)
local by_minute, by_hour = {}, {}
for _, entry in ipairs(entries) do
  local f = {}
  local raw = entry[2]
  for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
  local cost = tonumber(f['cost']) or 0
  if f['type'] == 'usage' and cost > 0 then
    local ts = tonumber(f['ts']) or tonumber(string.match(entry[1], '^(%d+)'))
    local minute = ts - ts % 60000
    local hour = ts - ts % 3600000
    by_minute[minute] = (by_minute[minute] or 0) + cost
    by_hour[hour] = (by_hour[hour] or 0) + cost
  end
end
for minute, cost in pairs(by_minute) do
  if minute >= keep_minutes then
    redis.call('HINCRBY', minutes, string.format('%d', minute), string.format('%d', cost))
  end
end
for hour, cost in pairs(by_hour) do
  if hour >= keep_hours then
    redis.call('HINCRBY', hours, string.format('%d', hour), string.format('%d', cost))
  end
end
if #entries > 0 then
  redis.call('HSET', state, 'cursor', entries[#entries][1])
end
for _, pair in ipairs({{minutes, keep_minutes}, {hours, keep_hours}}) do
  local old = {}
  for _, name in ipairs(redis.call('HKEYS', pair[1])) do
    if tonumber(name) < pair[2] then old[#old + 1] = name end
  end
  if #old > 0 then redis.call('HDEL', pair[1], unpack(old)) end
end
return {#entries, (#entries < max) and 1 or 0}
