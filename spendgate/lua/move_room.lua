-- move_room: ARGV now, total. KEYS: cfg acct holds of each level a moved subtree joins.
-- Whether holds of `total` fit every level: 'ok', or 'no_room' with the level and its amount.
local now = now_ms(ARGV[1])
local at, available = no_room(levels_at(1, #KEYS / 3, true), tonumber(ARGV[2]), now)
if at then return {'no_room', at, available} end
return {'ok'}
