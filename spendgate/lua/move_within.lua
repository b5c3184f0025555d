-- move_within: ARGV now, moved, old_parent, new_parent, n_leave, n_join. A move inside one
-- tree (same root, so every key is in one slot and the move is this one script).
-- KEYS: M's cfg and holds, then acct holds of each ancestor M leaves, then cfg acct holds of
-- each ancestor it joins. Each hold of M's subtree leaves the ancestors it is no longer under
-- and is added at the ones it joins, if the holds fit every joined level (else 'no_room',
-- nothing changed); then M's cfg names its new parent, which is what every script checks.
-- Idempotent: M already under new_parent is 'done'.
local now = now_ms(ARGV[1])
local moved, old_parent, new_parent = ARGV[2], ARGV[3], ARGV[4]
local n_leave, n_join = tonumber(ARGV[5]), tonumber(ARGV[6])
local parent = redis.call('HGET', KEYS[1], 'parent')
if parent == new_parent then return {'done'} end
if parent ~= old_parent then return {'conflict', parent or ''} end
local leaving = levels_at(3, n_leave, false)
local joining = levels_at(3 + 2 * n_leave, n_join, true)
local holds, total = subtree_holds(KEYS[2], moved)
local at, available = no_room(joining, total, now)
if at then return {'no_room', at, available, total, #holds} end
carry(leaving, holds, -1)
carry(joining, holds, 1)
redis.call('HSET', KEYS[1], 'parent', new_parent)
return {'ok', total, #holds}
