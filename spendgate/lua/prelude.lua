-- Shared helpers, prepended to every spendgate script. Amounts are integer micro-units; they
-- stay below 2^53, so Lua doubles hold them exactly. Numbers reach Redis through redis.call
-- (never tostring, which would round to 14 digits); fmt_int formats them for strings.
--
-- Per-customer KEYS, the same order for every script:
--   1 cfg (hash, written by configure)   2 acct (balance, held, spent, dspent, pstart)
--   3 holds (hash rid -> "amount|deadline|key|estimate")   4 hold deadlines (zset)
--   5 rate-limit TATs (hash)   6 suspensions (hash source -> reason)   7 ledger (stream)
--   8 the operation's idempotency key (request id or funding id)
-- then, for a budget in a tree, 7 keys per ancestor (parent first, the root last), in the
-- order of 1..7. LEVELS[1] is the budget itself, LEVELS[#LEVELS] the root.

local K_CFG, K_ACCT, K_HOLDS, K_DEADLINES, K_RL, K_SUSP, K_LEDGER, K_IDEM =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local LEVELS = {{cfg = K_CFG, acct = K_ACCT, holds = K_HOLDS, dl = K_DEADLINES, rl = K_RL,
  susp = K_SUSP, ledger = K_LEDGER}}
for b = 9, #KEYS - 6, 7 do
  LEVELS[#LEVELS + 1] = {cfg = KEYS[b], acct = KEYS[b + 1], holds = KEYS[b + 2],
    dl = KEYS[b + 3], rl = KEYS[b + 4], susp = KEYS[b + 5], ledger = KEYS[b + 6]}
end

local DAY_MS = 86400000

local function fmt_int(n)
  return string.format('%d', n)
end

local function now_ms(arg)
  local n = tonumber(arg)
  if n and n > 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(value)
  return tonumber(value) or 0
end

-- Start (ms since epoch, UTC) of the day, ISO week or calendar month containing now.
local function period_start(period, now)
  local day = math.floor(now / DAY_MS)
  if period == 'day' then return day * DAY_MS end
  if period == 'week' then return (day - ((day + 3) % 7)) * DAY_MS end
  if period == 'month' then
    local z = day + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
      - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local dom = doy - math.floor((153 * mp + 2) / 5) + 1
    return (day - dom + 1) * DAY_MS
  end
  return 0
end

-- Reset spent at the start of a new period; returns the current period start. `acct` is a
-- level's account (the budget's own by default); `prefix` names a key's own counters in it.
-- A level's `dspent` (what its descendants spent this period, so own = spent - dspent) resets
-- with its `spent`.
local function rollover(period, now, acct, prefix)
  if not period or period == '' then return 0 end
  acct, prefix = acct or K_ACCT, prefix or ''
  local start = period_start(period, now)
  if num(redis.call('HGET', acct, prefix .. 'pstart')) ~= start then
    redis.call('HSET', acct, prefix .. 'spent', 0, prefix .. 'pstart', start)
    if prefix == '' then redis.call('HDEL', acct, 'dspent') end
  end
  return start
end

local function parse_hold(raw)
  local amount, deadline, key, estimate = string.match(raw, '^(%d+)|(%d+)|([^|]*)|(%d+)$')
  return tonumber(amount), tonumber(deadline), key, tonumber(estimate)
end

local function encode_hold(amount, deadline, key, estimate)
  return fmt_int(amount) .. '|' .. fmt_int(deadline) .. '|' .. key .. '|' .. fmt_int(estimate)
end

-- Per-key spend cap "limit|period" (cfg kcap:<key>); counters k:<key>:spent|held|pstart in acct.
local function key_prefix(key)
  return 'k:' .. key .. ':'
end

local function parse_key_cap(raw)
  if not raw or raw == '' then return nil end
  local limit, period = string.match(raw, '^(%d+)|(%a*)$')
  return tonumber(limit), period
end

-- Take `delta` off a key's held counter, if the key counts one (never below zero: a cap added
-- while its holds were in flight did not count them).
local function key_unhold(key, amount)
  local field = key_prefix(key) .. 'held'
  if amount ~= 0 and redis.call('HEXISTS', K_ACCT, field) == 1 then
    if redis.call('HINCRBY', K_ACCT, field, 0 - amount) < 0 then
      redis.call('HSET', K_ACCT, field, 0)
    end
  end
end

-- Drop a hold at every level (the deadline lives only at the budget itself).
local function drop_hold(rid, amount, key)
  for i, level in ipairs(LEVELS) do
    redis.call('HINCRBY', level.acct, 'held', 0 - amount)  -- never -0, which HINCRBY refuses
    redis.call('HDEL', level.holds, rid)
  end
  redis.call('ZREM', K_DEADLINES, rid)
  if key then key_unhold(key, amount) end
end

-- Take (or grow to) a hold at every level. An ancestor's copy names "origin/key" (its deadline
-- lives with the origin, the budget whose key made the request).
local function put_hold(rid, amount, extra, deadline, key, estimate, origin)
  local encoded = encode_hold(amount, deadline, key, estimate)
  local above = encode_hold(amount, deadline, (origin or '') .. '/' .. key, estimate)
  for i, level in ipairs(LEVELS) do
    redis.call('HSET', level.holds, rid, i == 1 and encoded or above)
    redis.call('HINCRBY', level.acct, 'held', extra)
  end
  redis.call('ZADD', K_DEADLINES, deadline, rid)
end

-- Release holds whose deadline has passed (a crashed or partitioned sidecar never settles).
local function reap(now, max)
  local expired = redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', now, 'LIMIT', 0, max)
  for _, rid in ipairs(expired) do
    local raw = redis.call('HGET', K_HOLDS, rid)
    if raw then
      local amount, _, key = parse_hold(raw)
      drop_hold(rid, amount or 0, key)
    else
      redis.call('ZREM', K_DEADLINES, rid)
    end
    redis.call('HINCRBY', K_ACCT, 'expired', 1)
  end
  return #expired
end

local function rate_limits(cfg_rl, key_rl)
  local limits = {}
  if cfg_rl and cfg_rl ~= '' then
    for _, l in ipairs(cjson.decode(cfg_rl)) do table.insert(limits, l) end
  end
  if key_rl and key_rl ~= '' then
    for _, l in ipairs(cjson.decode(key_rl)) do table.insert(limits, l) end
  end
  return limits
end

-- GCRA over one limit {id, kind ('requests'|'cost'), amount, window_ms, burst}.
-- Returns allowed, new_tat, retry_after_ms, remaining, reset_ms.
local function gcra(limit, tat, now, units)
  local interval = limit.window_ms / limit.amount
  local tolerance = interval * limit.burst
  local base = math.max(tat, now)
  local new_tat = base + interval * units
  local allow_at = new_tat - tolerance
  if allow_at > now then
    local retry = allow_at - now
    if interval * units > tolerance then retry = limit.window_ms end
    local remaining = math.max(0, math.floor((tolerance - (base - now)) / interval))
    return false, tat, retry, remaining, base - now
  end
  local remaining = math.floor((tolerance - (new_tat - now)) / interval)
  return true, new_tat, 0, remaining, new_tat - now
end

-- A level's soft limits that scripts act on (cfg `soft`, JSON; notify is the operator's):
-- {action = 'throttle'|'downgrade', used = N | left = N, rl = {limits}}. `used` acts once
-- spent + held reaches N; `left` once what is available falls below N.
local function soft_limits(raw)
  if not raw or raw == '' then return {} end
  return cjson.decode(raw)
end

-- `state` is a level's entry of level_states.
local function soft_active(soft, state)
  if soft.used then return state[5] + state[3] >= soft.used end
  return state[1] < soft.left
end

-- The rate limits of a level's throttles (`softs`, as soft_limits decoded them): the active
-- ones (given the level's state), or all of them (for corrections of what was counted).
local function throttle_limits(softs, state)
  local limits = {}
  for _, soft in ipairs(softs) do
    if soft.action == 'throttle' and (not state or soft_active(soft, state)) then
      for _, l in ipairs(soft.rl) do limits[#limits + 1] = l end
    end
  end
  return limits
end

-- Move cost-based rate limits by `delta` (positive: more was spent than counted at reserve;
-- negative: a refund for what a release or a cheaper settle did not spend). GCRA: the
-- difference arrives now, so it starts from max(tat, now) like a request; a refund never
-- moves the arrival time into the past. `rl` is a level's rate-limit hash (own by default),
-- `soft` its soft limits (a throttle's cost limits are corrected too, once they count).
local function correct_cost_limits(cfg_rl, key_rl, delta, now, rl, soft)
  if delta == 0 then return end
  rl = rl or K_RL
  local limits = rate_limits(cfg_rl, key_rl)
  for _, l in ipairs(throttle_limits(soft_limits(soft))) do limits[#limits + 1] = l end
  for _, l in ipairs(limits) do
    if l.kind == 'cost' then
      local tat = num(redis.call('HGET', rl, l.id))
      if tat > 0 then
        local base = math.max(tat, now)
        redis.call('HSET', rl, l.id, math.max(now, base + delta * l.window_ms / l.amount))
      end
    end
  end
end

-- What may still be spent: prepaid `balance - held`, capped `limit - spent - held`; a prepaid
-- budget with a limit takes the smaller.
local function available_of(mode, limit, balance, held, spent)
  if mode == 'capped' then return limit - spent - held end
  local available = balance - held
  if limit > 0 then available = math.min(available, limit - spent - held) end
  return available
end

-- Each ancestor's configuration: {currency, mode, limit, period, rl, parent, soft}. A level whose
-- `parent` presence disagrees with the levels passed means the caller's tree is stale.
local function ancestor_cfgs()
  local cfgs = {}
  for i = 2, #LEVELS do
    cfgs[i] = redis.call('HMGET', LEVELS[i].cfg, 'currency', 'mode', 'limit', 'period', 'rl',
      'parent', 'soft')
  end
  return cfgs
end

-- A level's customerId, from its cfg key: sg:{root}@<id>:cfg, or sg:{<id>}:cfg for a root.
local function level_id(cfg_key)
  return string.match(cfg_key, '@([^:{}]+):cfg$') or string.match(cfg_key, '{([^}]+)}:cfg$')
end

-- The levels passed are the budget's current place: each level's cfg names the next level as
-- its parent, the root names none, and the budget is not fenced by a move in progress
-- (`moved` in its cfg: its keys are being migrated to another tree, or were).
local function tree_consistent(own_parent, cfgs)
  if redis.call('HEXISTS', K_CFG, 'moved') == 1 then return false end
  local parents = {own_parent}
  for i = 2, #LEVELS do
    if not cfgs[i][1] then return false end
    parents[i] = cfgs[i][6]
  end
  for i = 1, #LEVELS do
    local parent = parents[i]
    if parent == nil then parent = false end
    if i < #LEVELS then
      if parent ~= level_id(LEVELS[i + 1].cfg) then return false end
    elseif parent ~= false then
      return false
    end
  end
  return true
end

-- For the scripts that change a hold or charge (settle, release, extend, sweep): the
-- ancestors' configurations (as ancestor_cfgs), or nil when the levels passed are not the
-- budget's current place (the caller reads its tree again).
local function current_ancestor_cfgs()
  local cfgs = ancestor_cfgs()
  if not tree_consistent(redis.call('HGET', K_CFG, 'parent'), cfgs) then return nil end
  return cfgs
end

-- Every level's state, after its period rollover: {available, balance, held, mode, spent}. The own
-- level's configuration is (mode, limit, period); the ancestors' come from ancestor_cfgs.
local function level_states(now, mode, limit, period, cfgs)
  local states = {}
  for i, level in ipairs(LEVELS) do
    local m, l, p = mode, limit, period
    if i > 1 then m, l, p = cfgs[i][2], num(cfgs[i][3]), cfgs[i][4] end
    rollover(p, now, level.acct)
    local acct = redis.call('HMGET', level.acct, 'balance', 'held', 'spent')
    local balance, held, spent = num(acct[1]), num(acct[2]), num(acct[3])
    states[i] = {available_of(m, l, balance, held, spent), balance, held, m, spent}
  end
  return states
end

-- A key's own cap: its available amount after rollover, or nil without a cap.
local function key_available(key, raw_cap, now)
  local limit, period = parse_key_cap(raw_cap)
  if not limit then return nil end
  local prefix = key_prefix(key)
  rollover(period, now, K_ACCT, prefix)
  local acct = redis.call('HMGET', K_ACCT, prefix .. 'spent', prefix .. 'held')
  return limit - num(acct[1]) - num(acct[2])
end

-- The tightest level: (index, available); index 0 is the key's own cap. Ties go to the level
-- closest to the key.
local function tightest(states, key_avail)
  local at, least = 1, states[1][1]
  for i = 2, #states do
    if states[i][1] < least then at, least = i, states[i][1] end
  end
  if key_avail and key_avail < least then at, least = 0, key_avail end
  return at, least
end

local function ledger_append(fields, ledger)
  return redis.call('XADD', ledger or K_LEDGER, '*', unpack(fields))
end
