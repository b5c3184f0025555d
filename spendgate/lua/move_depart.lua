-- move_depart: ARGV moved, n_leave, n_del, marker, tombstone_ttl_ms. In the old tree's slot,
-- once sg:tree names the new place. KEYS: M's old cfg and holds, acct holds of each ancestor
-- M left, the n_del old keys to delete, then the old cfg of every budget of the subtree.
-- Drops the subtree's holds at the levels it left, deletes its old keys and leaves each old
-- cfg as a tombstone {moved = marker} (a caller with a stale tree gets 'moved', never an
-- empty account). Idempotent: a tombstone (no currency) at M is 'done'.
local moved, n_leave, n_del = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[1], 'currency') == 0 then return {'done'} end
local holds = subtree_holds(KEYS[2], moved)
carry(levels_at(3, n_leave, false), holds, -1)
local first = 3 + 2 * n_leave
for i = first, first + n_del - 1 do redis.call('DEL', KEYS[i]) end
for i = first + n_del, #KEYS do
  redis.call('DEL', KEYS[i])
  redis.call('HSET', KEYS[i], 'moved', ARGV[4])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[5]))
end
return {'ok', #holds}
