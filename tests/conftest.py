"""Shared pytest fixtures. The real-Redis fixtures live in tests/redis_servers.py."""

import sys
from pathlib import Path

# Make `tests.*` importable however pytest is started. Appended, never prepended: the project
# root holds `operator/`, which must not shadow the standard library's `operator`.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from tests.redis_servers import (  # noqa: E402
    fresh_redis_server,
    ledger_redis,
    ledger_redis_target,
    redis_client,
    redis_cluster,
    redis_cluster_url,
    redis_server,
    redis_url,
)

__all__ = [
    "fresh_redis_server",
    "ledger_redis",
    "ledger_redis_target",
    "redis_client",
    "redis_cluster",
    "redis_cluster_url",
    "redis_server",
    "redis_url",
]
