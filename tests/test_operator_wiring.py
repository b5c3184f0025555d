"""The pieces wired into the running operator, end to end on the API emulator and a real Redis:
leader election on a Lease, the leader's Service bypass check, and Stripe (webhook receiver on
every replica, leader work, budgets linked, status fields, Stripe events as Kubernetes Events).

Their API calls are recorded like those of tests/test_operator_e2e.py, for tests/test_rbac.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import jsonpatch
import kopf
import pytest

from spendgate.operator import metrics, stripe_wiring
from spendgate.operator.injection import Injection, plan_injection
from spendgate.operator.kube import KubeClient
from spendgate.operator.services import BypassCheck
from spendgate.operator.settings import InjectionDefaults, OperatorSettings
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe_wiring import PENDING_UNLINKS
from tests.kube_emulator import Kubectl, started_emulator
from tests.model_pods import vllm_pod
from tests.redis_servers import _free_ports
from tests.stripe_fakes import (  # noqa: F401  (fixture)
    API_KEY,
    WEBHOOK_SECRET,
    StripeDouble,
    make_event,
    sign,
    stripe_double,
)
from tests.test_operator_e2e import BUDGETS, NS, SECRETS, budget, running_operator, secret

pytestmark = pytest.mark.timeout(30)

OPERATOR_NS = "spendgate-system"
LEASES = "coordination.k8s.io/v1/leases"
MODELS = "models"


def injected_pod(name: str) -> dict[str, Any]:
    pod = vllm_pod()
    plan = plan_injection(
        pod,
        MODELS,
        None,
        InjectionDefaults(),
        native_sidecars=True,
        operator_namespace=OPERATOR_NS,
    )
    assert isinstance(plan, Injection) and plan.patch
    pod = jsonpatch.apply_patch(pod, plan.patch)
    pod["metadata"].pop("generateName")
    pod["metadata"]["name"] = name
    return pod


def service(name: str, target: Any, namespace: str = MODELS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"app": "llama-3-8b"},
            "ports": [{"name": "http", "port": 80, "targetPort": target}],
        },
    }


async def test_the_leader_warns_about_services_that_bypass_the_meter(redis_url: str) -> None:
    async def cluster(kubectl: Kubectl) -> None:
        await kubectl.create("v1/namespaces", {"metadata": {"name": MODELS}})
        await kubectl.create("v1/pods", injected_pod("llama-3-8b-6b7c9d5f4-x2x9k"))
        await kubectl.create("v1/services", service("llama-direct", 8000))
        await kubectl.create("v1/services", service("llama-by-name", "http"))
        await kubectl.create("v1/services", service("llama", "spendgate"))

    async with running_operator(
        redis_url, before=cluster, bypass_check_interval_s=0.2, lease_retry_s=0.2
    ) as env:
        kubectl = env.kubectl

        def warnings() -> dict[str, list[dict[str, Any]]]:
            found: dict[str, list[dict[str, Any]]] = {}
            for event in kubectl.events(MODELS):
                if event["reason"] == "SpendgateMeterBypassed":
                    found.setdefault(event["involvedObject"]["name"], []).append(event)
            return found

        await env.wait(lambda: len(warnings()) == 2, "warnings on both bypassing Services")
        lease = kubectl.get(LEASES, OPERATOR_NS, "spendgate-leader")
        assert lease is not None and lease["spec"]["holderIdentity"] == "operator-test-0"
        await asyncio.sleep(0.6)  # three more checks: the same findings are not repeated
        found = warnings()
        assert set(found) == {"llama-direct", "llama-by-name"}
        assert [len(events) for events in found.values()] == [1, 1]
        [event] = found["llama-direct"]
        direct = kubectl.get("v1/services", MODELS, "llama-direct")
        assert event["type"] == "Warning" and event["involvedObject"]["kind"] == "Service"
        assert event["involvedObject"]["uid"] == direct["metadata"]["uid"]  # type: ignore[index]
        assert "targetPort: spendgate" in event["message"]
        assert event["reportingComponent"] == "spendgate-operator"
        assert metrics.METER_BYPASSES._value.get() == 2
        assert metrics.LEADER._value.get() == 1
    lease = env.kubectl.get(LEASES, OPERATOR_NS, "spendgate-leader")
    assert lease is not None and "holderIdentity" not in lease["spec"]  # released on shutdown
    assert metrics.LEADER._value.get() == 0


async def test_without_leader_election_no_singleton_work_runs(redis_url: str) -> None:
    async def cluster(kubectl: Kubectl) -> None:
        await kubectl.create("v1/namespaces", {"metadata": {"name": MODELS}})
        await kubectl.create("v1/pods", injected_pod("llama-3-8b-6b7c9d5f4-x2x9k"))
        await kubectl.create("v1/services", service("llama-direct", 8000))

    async with running_operator(
        redis_url, before=cluster, bypass_check_interval_s=0.1, leader_election=False
    ) as env:
        await asyncio.sleep(0.5)
        assert env.kubectl.get(LEASES, OPERATOR_NS, "spendgate-leader") is None
        assert env.kubectl.events(MODELS) == []


# --------------------------------------------------------------------------- Stripe


def stripe_secret(**data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "spendgate-stripe", "namespace": OPERATOR_NS},
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    }


def stripe_settings(double: StripeDouble) -> StripeSettings:
    return StripeSettings(
        enabled=True,
        api_base=double.url,
        webhook_host="127.0.0.1",
        webhook_port=_free_ports(1)[0],
        reconcile_interval_s=0.3,
        export_interval_s=0.2,
        processor_block_ms=100,
        replay_events=False,
    )


async def post_event(settings: StripeSettings, event: dict[str, Any], signed: bool = True) -> int:
    body = json.dumps(event)
    headers = {"Stripe-Signature": sign(body) if signed else "t=1,v1=forged"}
    url = f"http://127.0.0.1:{settings.webhook_port}{settings.webhook_path}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as r,
    ):
        return r.status


async def test_stripe_in_the_running_operator(
    redis_url: str,
    stripe_double: StripeDouble,  # noqa: F811
) -> None:
    stripe_double.customers["cus_ACME"] = {"id": "cus_ACME", "object": "customer", "metadata": {}}
    settings = stripe_settings(stripe_double)

    async def cluster(kubectl: Kubectl) -> None:
        await kubectl.create("v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
        await kubectl.create(
            SECRETS, stripe_secret(**{"api-key": API_KEY, "webhook-secret": WEBHOOK_SECRET})
        )

    accepted = metrics.STRIPE_WEBHOOKS.labels("accepted")._value.get()
    rejected = metrics.STRIPE_WEBHOOKS.labels("rejected")._value.get()
    async with running_operator(
        redis_url, before=cluster, stripe=settings, lease_retry_s=0.2, shutdown_drain_s=0
    ) as env:
        redis = env.store.redis
        await env.kubectl.create(SECRETS, secret())
        await env.kubectl.create(BUDGETS, budget(stripe={"customerId": "cus_ACME"}))
        await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready")
        assert await redis.hget("sg:stripe:customers", "cus_ACME") == b"acme"
        await env.wait(
            lambda: (
                env.status().get("lastStripeSync") and env.status().get("exportLagSeconds") == 0
            ),
            "lastStripeSync and exportLagSeconds from the leader's reconciliation",
        )

        # A payment failure reaches the sidecars (Redis), the status and the budget's Events.
        event = make_event(
            "invoice.payment_failed",
            {"id": "in_1", "object": "invoice", "customer": "cus_ACME", "status": "open"},
        )
        assert await post_event(settings, event, signed=False) == 400
        assert await post_event(settings, event) == 200
        await env.wait(lambda: env.status().get("state") == "Suspended", "Suspended in status")

        def stripe_events() -> list[dict[str, Any]]:
            return [e for e in env.kubectl.events(NS, "acme") if e["reason"] == "Suspended"]

        await env.wait(stripe_events, "the Stripe event as a Kubernetes Event")
        [posted] = stripe_events()
        assert posted["type"] == "Warning"
        assert posted["involvedObject"]["uid"] == env.budget()["metadata"]["uid"]  # type: ignore[index]
        assert (
            "stripe:Suspended@"
            in env.budget()["metadata"]["annotations"][  # type: ignore[index]
                "refresh.spendgate.dev/trigger"
            ]
        )
        assert metrics.STRIPE_WEBHOOKS.labels("accepted")._value.get() == accepted + 1
        assert metrics.STRIPE_WEBHOOKS.labels("rejected")._value.get() == rejected + 1
        assert metrics.STRIPE_CONFIGURED._value.get() == 1

        # Another budget claiming the same Stripe customer: applied, but not linked.
        await env.kubectl.create(SECRETS, secret("copy-keys", "sk-e2e-copy-0123456789abcdef"))
        await env.kubectl.create(
            BUDGETS, budget("copy", customer="copy", stripe={"customerId": "cus_ACME"})
        )
        await env.wait(
            lambda: (env.ready("copy") or {}).get("reason") == "StripeCustomerConflict",
            "StripeCustomerConflict",
        )
        assert "already linked to customerId 'acme'" in env.ready("copy")["message"]  # type: ignore[index]
        await env.wait(
            lambda: ("Warning", "StripeCustomerConflict") in env.event_reasons("copy"),
            "a Warning Event",
        )
        assert await redis.hget("sg:stripe:customers", "cus_ACME") == b"acme"

        # Deleted: the link stays until its usage is exported (the leader's sweep releases it).
        await env.kubectl.delete(BUDGETS, NS, "acme")
        await env.wait(lambda: env.budget() is None, "the budget gone")
        assert await redis.zscore(PENDING_UNLINKS, "acme") is not None
        assert await redis.hget("sg:stripe:customers", "cus_ACME") == b"acme"


async def test_stripe_without_its_secret_leaves_the_rest_running(
    redis_url: str,
    stripe_double: StripeDouble,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stripe_wiring, "RETRY_CONFIG_S", 0.2)
    settings = stripe_settings(stripe_double)
    async with running_operator(redis_url, stripe=settings, shutdown_drain_s=0) as env:
        await env.kubectl.create(SECRETS, secret())
        await env.kubectl.create(BUDGETS, budget())
        await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready")
        assert metrics.STRIPE_CONFIGURED._value.get() == 0
        with pytest.raises(aiohttp.ClientConnectionError):  # the receiver waits for its keys
            await post_event(settings, make_event("invoice.paid", {}))
        # The Secret arrives after the install: Stripe starts without a restart.
        await env.kubectl.create("v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
        await env.kubectl.create(
            SECRETS, stripe_secret(**{"api-key": API_KEY, "webhook-secret": WEBHOOK_SECRET})
        )
        await env.wait(lambda: metrics.STRIPE_CONFIGURED._value.get() == 1, "configured")
        assert await post_event(settings, make_event("invoice.paid", {"id": "in_x"})) == 200


async def test_bypass_check_of_watched_namespaces() -> None:
    """Namespaced: Services listed per watched namespace; the operator's own namespace and
    kube-system are never judged; a finding is repeated after bypass_rewarn_s, and forgotten
    once fixed."""
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        for namespace in (MODELS, "team-b", OPERATOR_NS, "kube-system"):
            await kubectl.create("v1/namespaces", {"metadata": {"name": namespace}})
            pod = injected_pod("llama-0")
            pod["metadata"]["namespace"] = namespace
            await kubectl.create("v1/pods", pod)
            await kubectl.create("v1/services", service("direct", 8000, namespace))
        kube = KubeClient(timeout_s=3)
        kube.configure(kopf.ConnectionInfo(server=url))
        now = [0.0]
        check = BypassCheck(
            OperatorSettings(namespaces=(MODELS, OPERATOR_NS, "kube-system"), bypass_rewarn_s=60),
            kube,
            clock=lambda: now[0],
        )
        try:
            assert await check.check() == 1
            assert [e["involvedObject"]["namespace"] for e in kubectl.events()] == [MODELS]
            now[0] = 30
            assert await check.check() == 0
            now[0] = 61
            assert await check.check() == 1
            await kubectl.patch(
                "v1/services",
                MODELS,
                "direct",
                {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}},
            )
            assert await check.check() == 0 and check.warned == {}
            assert metrics.METER_BYPASSES._value.get() == 0
        finally:
            await kube.aclose()
