-- move_arrive: ARGV now, moved, new_parent ('' for a new root), n_nodes. In the new tree's
-- slot, after the copy. KEYS: M's holds, the cfg of every budget of the subtree (M first),
-- then cfg acct holds of each ancestor M joins. Adds the subtree's holds at the joined levels
-- if they fit (else 'no_room', nothing changed: the move is undone), lifts the fence the copy
-- brought along and names M's new parent. Idempotent: an unfenced M is 'done'.
local now = now_ms(ARGV[1])
local moved, new_parent, n_nodes = ARGV[2], ARGV[3], tonumber(ARGV[4])
local m_cfg = KEYS[2]
if redis.call('HEXISTS', m_cfg, 'moved') == 0 then return {'done'} end
local joining = levels_at(2 + n_nodes, (#KEYS - 1 - n_nodes) / 3, true)
local holds, total = subtree_holds(KEYS[1], moved)
local at, available = no_room(joining, total, now)
if at then return {'no_room', at, available, total, #holds} end
carry(joining, holds, 1)
for i = 2, 1 + n_nodes do redis.call('HDEL', KEYS[i], 'moved') end
if new_parent == '' then
  redis.call('HDEL', m_cfg, 'parent')
else
  redis.call('HSET', m_cfg, 'parent', new_parent)
end
return {'ok', total, #holds}
