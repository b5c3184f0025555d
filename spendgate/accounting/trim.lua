-- trim: remove ledger entries older than ARGV[1] (a stream id), at most ARGV[2] of them, and
-- add what they did to the ledger base, so the audit can still add up the whole history.
-- Entries the spend rollup (abnormal-spend policy) has not read yet are kept.
-- KEYS 1 ledger  2 ledger base  3 rollup state.
-- Returns {entries removed, 1 if everything below minid is gone}.
local ledger, base, rollup = KEYS[1], KEYS[2], KEYS[3]
local minid, max = ARGV[1], tonumber(ARGV[2])
local entries
local rolled = redis.call('HGET', rollup, 'cursor')
if rolled then
  entries = redis.call('XRANGE', ledger, '-', rolled, 'COUNT', max)
  local kept = {}
  for _, entry in ipairs(entries) do
    local ms, seq = string.match(entry[1], '^(%d+)-(%d+)$')
    local lms, lseq = string.match(minid, '^(%d+)-?(%d*)$')
    ms, seq, lms, lseq = tonumber(ms), tonumber(seq), tonumber(lms), tonumber(lseq) or 0
    if ms < lms or (ms == lms and seq < lseq) then kept[#kept + 1] = entry end
  end
  if #kept < #entries then max = #kept + 1 end  -- stopped by minid: report done below
  entries = kept
else
  entries = redis.call('XRANGE', ledger, '-', '(' .. minid, 'COUNT', max)
end
if #entries == 0 then return {0, 1} end
local sums = {funded = 0, adjusted = 0, spec = 0, charged = 0, absorbed = 0}
for _, entry in ipairs(entries) do
  local f = {}
  local raw = entry[2]
  for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
  local kind = f['type']
  if kind == 'usage' then
    sums.charged = sums.charged + (tonumber(f['cost']) or 0)
    sums.absorbed = sums.absorbed + (tonumber(f['absorbed']) or 0)
  elseif kind == 'fund' then
    sums.funded = sums.funded + (tonumber(f['amount']) or 0)
  elseif kind == 'adjust' and f['source'] == 'spec' then
    sums.spec = sums.spec + (tonumber(f['amount']) or 0)
  elseif kind == 'adjust' then
    sums.adjusted = sums.adjusted + (tonumber(f['amount']) or 0)
  elseif kind == 'absorbed' then
    sums.absorbed = sums.absorbed + (tonumber(f['amount'] or f['cost']) or 0)
  end
end
for name, value in pairs(sums) do
  if value ~= 0 then redis.call('HINCRBY', base, name, string.format('%d', value)) end
end
redis.call('HINCRBY', base, 'entries', #entries)
local last = entries[#entries][1]
redis.call('HSET', base, 'upto', last)
local ms, seq = string.match(last, '^(%d+)-(%d+)$')
redis.call('XTRIM', ledger, 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
return {#entries, (#entries < max) and 1 or 0}
