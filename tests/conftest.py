"""Shared pytest fixtures. The real-Redis fixtures live in tests/support/redis_servers.py."""

import os
import sys
from pathlib import Path
from typing import Any

import pytest

# Make `tests.*` importable however pytest is started. Appended, never prepended: the project
# root holds `operator/`, which must not shadow the standard library's `operator`.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from tests.support.redis_servers import (  # noqa: E402
    fresh_redis_server,
    ledger_redis,
    ledger_redis_target,
    redis_client,
    redis_cluster,
    redis_cluster_url,
    redis_server,
    redis_url,
)


@pytest.fixture(scope="session")
def kube_api_calls() -> list[Any]:
    """Every Kubernetes API call the operator made in this session's end-to-end tests, as
    ``tests.support.kube_emulator.ApiCall`` (``rbac_rules(...)`` turns them into RBAC triples)."""
    from tests.support.kube_emulator import API_CALLS

    return API_CALLS


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With SPENDGATE_KUBE_CALLS_FILE set, write the recorded API calls there as JSON."""
    path = os.environ.get("SPENDGATE_KUBE_CALLS_FILE")
    emulator = sys.modules.get("tests.support.kube_emulator")
    if path and emulator is not None:
        emulator.write_calls(path)


__all__ = [
    "fresh_redis_server",
    "kube_api_calls",
    "ledger_redis",
    "ledger_redis_target",
    "redis_client",
    "redis_cluster",
    "redis_cluster_url",
    "redis_server",
    "redis_url",
]
