"""A budget's access as Stripe decides it: one suspension source at a time (``payment``,
``subscription``, ``dispute``, ``stripe-deleted``, ``payment-method``), suspended or lifted in
the order of Stripe's ``created`` timestamps, with grace periods (:class:`.apply.Applier` runs
these scripts; its timer reads ``GRACE_INDEX``)."""

from __future__ import annotations

from .actions import SetAccess
from .links import SRC_PAYMENT_METHOD

GRACE_INDEX = "sg:stripe:grace"

# KEYS: stripe state hash, suspensions. ARGV: source, mode, created (s), reason, deadline (ms).
SET_ACCESS = """
local src, mode, created, reason, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts:' .. src) or '0')
if created < ts then return 'stale' end
redis.call('HSET', KEYS[1], 'ts:' .. src, ARGV[3])
local was = redis.call('HEXISTS', KEYS[2], src)
if mode == 'lift' then
  redis.call('HDEL', KEYS[1], 'grace:' .. src)
  if was == 1 then redis.call('HDEL', KEYS[2], src); return 'lifted' end
  return 'unchanged'
elseif mode == 'suspend' then
  redis.call('HDEL', KEYS[1], 'grace:' .. src)
  redis.call('HSET', KEYS[2], src, reason)
  if was == 1 then return 'unchanged' end
  return 'suspended'
end
if was == 1 then return 'unchanged' end
if redis.call('HEXISTS', KEYS[1], 'grace:' .. src) == 1 then return 'unchanged' end
redis.call('HSET', KEYS[1], 'grace:' .. src, deadline .. '|' .. reason)
return 'grace'
"""

# KEYS: stripe state hash, suspensions. ARGV: source, now (ms).
GRACE_DUE = """
local raw = redis.call('HGET', KEYS[1], 'grace:' .. ARGV[1])
if not raw then return {'gone', ''} end
local deadline, reason = string.match(raw, '^(%d+)|(.*)$')
if tonumber(deadline) > tonumber(ARGV[2]) then return {'later', deadline} end
redis.call('HDEL', KEYS[1], 'grace:' .. ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], reason)
return {'suspended', reason}
"""


def payment_method_access(has_payment_method: bool, created: int) -> SetAccess:
    if has_payment_method:
        return SetAccess(SRC_PAYMENT_METHOD, False, "payment method on file", created)
    return SetAccess(SRC_PAYMENT_METHOD, True, "no payment method on file in Stripe", created)


__all__ = ["GRACE_DUE", "GRACE_INDEX", "SET_ACCESS", "payment_method_access"]
