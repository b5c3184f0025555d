-- move_fence: ARGV marker. KEYS: the cfg of every budget of the moved subtree at its old
-- place. From now on every script there answers 'moved' (tree_consistent): nothing is
-- admitted, held or charged against the old state while it is copied.
for _, cfg in ipairs(KEYS) do redis.call('HSET', cfg, 'moved', ARGV[1]) end
return {'ok', #KEYS}
