-- Shared helpers, prepended to every spendgate script. Amounts are integer micro-units; they
-- stay below 2^53, so Lua doubles hold them exactly. Numbers reach Redis through redis.call
-- (never tostring, which would round to 14 digits); fmt_int formats them for strings.
--
-- Per-customer KEYS, the same order for every script:
--   1 cfg (hash, written by configure)   2 acct (balance, held, spent, pstart)
--   3 holds (hash rid -> "amount|deadline|key|estimate")   4 hold deadlines (zset)
--   5 rate-limit TATs (hash)   6 suspensions (hash source -> reason)   7 ledger (stream)
--   8 the operation's idempotency key (request id or funding id)

local K_CFG, K_ACCT, K_HOLDS, K_DEADLINES, K_RL, K_SUSP, K_LEDGER, K_IDEM =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

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

-- Reset spent at the start of a new period; returns the current period start.
local function rollover(period, now)
  if not period or period == '' then return 0 end
  local start = period_start(period, now)
  if num(redis.call('HGET', K_ACCT, 'pstart')) ~= start then
    redis.call('HSET', K_ACCT, 'spent', 0, 'pstart', start)
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

local function drop_hold(rid, amount)
  redis.call('HINCRBY', K_ACCT, 'held', 0 - amount)  -- never -0, which HINCRBY refuses
  redis.call('HDEL', K_HOLDS, rid)
  redis.call('ZREM', K_DEADLINES, rid)
end

-- Release holds whose deadline has passed (a crashed or partitioned sidecar never settles).
local function reap(now, max)
  local expired = redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', now, 'LIMIT', 0, max)
  for _, rid in ipairs(expired) do
    local raw = redis.call('HGET', K_HOLDS, rid)
    if raw then
      local amount = parse_hold(raw)
      drop_hold(rid, amount or 0)
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

-- Move cost-based rate limits by `delta` (positive: more was spent than counted at reserve;
-- negative: a refund for what a release or a cheaper settle did not spend). GCRA: the
-- difference arrives now, so it starts from max(tat, now) like a request; a refund never
-- moves the arrival time into the past.
local function correct_cost_limits(cfg_rl, key_rl, delta, now)
  if delta == 0 then return end
  for _, l in ipairs(rate_limits(cfg_rl, key_rl)) do
    if l.kind == 'cost' then
      local tat = num(redis.call('HGET', K_RL, l.id))
      if tat > 0 then
        local base = math.max(tat, now)
        redis.call('HSET', K_RL, l.id, math.max(now, base + delta * l.window_ms / l.amount))
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

local function ledger_append(fields)
  return redis.call('XADD', K_LEDGER, '*', unpack(fields))
end
