"""A namespaced operator (the chart's operator.watchNamespaces) makes only calls that the chart
renders for that case: recorded from a real run on the emulator, not derived from the
cluster-wide run -- kopf itself would list and watch Namespaces cluster-wide to follow the
watched ones, which the chart's Roles (rightly) do not allow."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio

from spendgate.operator.runtime.settings import OperatorSettings
from tests.support.helm_chart import (
    NAMESPACE,
    RELEASE,
    ApiCall,
    allowed,
    granted,
    helm_installed,  # noqa: F401 (fixture)
    render,
)
from tests.support.kube_emulator import API_CALLS, Kubectl, started_emulator
from tests.support.operator_runs import operator_on_emulator

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("helm_installed")]
WATCHED = ("models", "team-b")  # the chart's "namespaced" value set


async def test_a_namespaced_operator_calls_only_what_its_roles_allow(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    settings = OperatorSettings(
        redis_url=redis_url,
        namespace=NAMESPACE,
        namespaces=WATCHED,
        status_interval_s=0.5,
        kube_timeout_s=3.0,
        leader_election=False,
    )
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        for namespace in (*WATCHED, "elsewhere"):
            await kubectl.create("v1/namespaces", {"metadata": {"name": namespace}})
        first = len(API_CALLS)
        async with operator_on_emulator(settings, client, url):
            await kubectl.create(
                "spendgate.dev/v1alpha1/customerbudgets",
                {
                    "apiVersion": "spendgate.dev/v1alpha1",
                    "kind": "CustomerBudget",
                    "metadata": {"name": "acme", "namespace": "models"},
                    "spec": {"customerId": "acme", "currency": "USD", "balance": "5"},
                },
            )

            def active() -> Any:
                body = kubectl.get("spendgate.dev/v1alpha1/customerbudgets", "models", "acme")
                return ((body or {}).get("status") or {}).get("state") == "Active"

            await kubectl.wait_for(active, within=20, what="reconciled")
    calls = [
        ApiCall(c.verb, c.api_group, c.resource, c.subresource, c.namespace, c.name)
        for c in API_CALLS[first:]
        if c.api_group is not None and c.resource is not None
    ]
    assert not [c for c in calls if c.resource == "namespaces" and c.verb in ("list", "watch")]
    pairs = granted(render("namespaced"), NAMESPACE, f"{RELEASE}-spendgate-operator")
    refused = sorted({c for c in calls if not allowed(pairs, c)}, key=str)
    assert not refused, "the chart's namespaced RBAC refuses:\n" + "\n".join(map(str, refused))
    assert {c.namespace for c in calls if c.resource == "customerbudgets"} <= set(WATCHED)
