"""Shared pytest fixtures. The real-Redis fixtures live in tests/redis_servers.py."""

from tests.redis_servers import (
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
