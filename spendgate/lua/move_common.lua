-- Helpers of the move scripts (spendgate.tree_moves), after prelude.lua. A moved budget M
-- holds a copy of every hold of its subtree (put_hold writes one at every level from the
-- budget whose key made the request up to the root), so M's holds hash lists them all.

-- The holds of M's subtree: {rid, amount, value for an ancestor's copy}, and their total.
local function subtree_holds(holds_key, moved)
  local raw = redis.call('HGETALL', holds_key)
  local holds, total = {}, 0
  for i = 1, #raw, 2 do
    local amount, deadline, key, estimate = parse_hold(raw[i + 1])
    if amount then
      if not string.find(key, '/', 1, true) then key = moved .. '/' .. key end
      holds[#holds + 1] = {raw[i], amount, encode_hold(amount, deadline, key, estimate)}
      total = total + amount
    end
  end
  return holds, total
end

-- Levels given as KEYS from `first`, `width` keys each: {cfg?, acct, holds}.
local function levels_at(first, count, with_cfg)
  local levels, width = {}, with_cfg and 3 or 2
  for i = 0, count - 1 do
    local b = first + i * width
    if with_cfg then
      levels[#levels + 1] = {cfg = KEYS[b], acct = KEYS[b + 1], holds = KEYS[b + 2]}
    else
      levels[#levels + 1] = {acct = KEYS[b], holds = KEYS[b + 1]}
    end
  end
  return levels
end

-- The first level (index, available) where `total` does not fit, after its period rollover.
local function no_room(levels, total, now)
  if total <= 0 then return nil end
  for i, level in ipairs(levels) do
    local cfg = redis.call('HMGET', level.cfg, 'mode', 'limit', 'period')
    rollover(cfg[3], now, level.acct)
    local acct = redis.call('HMGET', level.acct, 'balance', 'held', 'spent')
    local available = available_of(cfg[1], num(cfg[2]), num(acct[1]), num(acct[2]), num(acct[3]))
    if total > available then return i, available end
  end
  return nil
end

-- Add (sign 1) or drop (sign -1) each hold's copy at the levels.
local function carry(levels, holds, sign)
  for _, level in ipairs(levels) do
    for _, hold in ipairs(holds) do
      if sign > 0 then
        redis.call('HSET', level.holds, hold[1], hold[3])
        redis.call('HINCRBY', level.acct, 'held', hold[2])
      elseif redis.call('HDEL', level.holds, hold[1]) == 1 then
        redis.call('HINCRBY', level.acct, 'held', 0 - hold[2])
      end
    end
  end
end
