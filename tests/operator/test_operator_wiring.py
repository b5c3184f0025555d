"""The pieces wired into the running operator, end to end on the API emulator and a real Redis:
leader election on a Lease, the leader's Service bypass check, and Stripe (webhook receiver on
every replica, leader work, budgets linked, status fields, Stripe events as Kubernetes Events).

Their API calls are recorded like those of tests/operator/test_operator_e2e.py, for
tests/operator/test_rbac.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kopf
import pytest
import pytest_asyncio
import redis.asyncio
import stripe

from spendgate.operator.admission.injection import Injection, InjectionDefaults, plan_injection
from spendgate.operator.admission.services import METER_BYPASSES, BypassCheck
from spendgate.operator.kube.client import KubeClient
from spendgate.operator.runtime import metrics
from spendgate.operator.runtime.settings import OperatorSettings
from spendgate.operator.stripe import metrics as stripe_metrics
from spendgate.operator.stripe import wiring as stripe_wiring
from spendgate.operator.stripe.budget_import import BudgetImport, load_import_template
from spendgate.operator.stripe.client import StripeGateway
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.sync import kubernetes_name
from spendgate.operator.stripe.wiring import PENDING_UNLINKS
from tests.operator.test_operator_e2e import BUDGETS, NS, SECRETS, budget, running_operator, secret
from tests.support.kube_emulator import Kubectl, started_emulator
from tests.support.model_pods import vllm_pod
from tests.support.redis_servers import _free_ports
from tests.support.stripe_fakes import (  # noqa: F401  (fixtures)
    API_KEY,
    WEBHOOK_SECRET,
    LocalStripe,
    StripeDouble,
    localstripe,
    localstripe_server,
    make_event,
    sign,
    stripe_double,
)

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
        assert METER_BYPASSES._value.get() == 2
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

    accepted = stripe_metrics.STRIPE_WEBHOOKS.labels("accepted")._value.get()
    rejected = stripe_metrics.STRIPE_WEBHOOKS.labels("rejected")._value.get()
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
        assert stripe_metrics.STRIPE_WEBHOOKS.labels("accepted")._value.get() == accepted + 1
        assert stripe_metrics.STRIPE_WEBHOOKS.labels("rejected")._value.get() == rejected + 1
        assert stripe_metrics.STRIPE_CONFIGURED._value.get() == 1

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
        assert stripe_metrics.STRIPE_CONFIGURED._value.get() == 0
        with pytest.raises(aiohttp.ClientConnectionError):  # the receiver waits for its keys
            await post_event(settings, make_event("invoice.paid", {}))
        # The Secret arrives after the install: Stripe starts without a restart.
        await env.kubectl.create("v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
        await env.kubectl.create(
            SECRETS, stripe_secret(**{"api-key": API_KEY, "webhook-secret": WEBHOOK_SECRET})
        )
        await env.wait(lambda: stripe_metrics.STRIPE_CONFIGURED._value.get() == 1, "configured")
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
            [event] = kubectl.events()
            assert event["involvedObject"]["namespace"] == MODELS
            assert event["action"] == "CheckServices"
            now[0] = 30
            assert await check.check() == 0
            # A restart (a new replica, nothing in memory) finds the Event: not posted again.
            restarted = BypassCheck(check.settings, kube, clock=lambda: now[0])
            assert await restarted.check() == 0 and len(kubectl.events()) == 1
            now[0] = 61
            assert await check.check() == 1
            assert await restarted.check() == 0  # it saw the new one too
            await kubectl.patch(
                "v1/services",
                MODELS,
                "direct",
                {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}},
            )
            assert await check.check() == 0 and check.warned == {}
            assert METER_BYPASSES._value.get() == 0
        finally:
            await kube.aclose()


# --------------------------------------------------------------------------- budgets from Stripe

IMPORT_TEMPLATE = """\
# A CustomerBudget with placeholders (operator/stripe/sync.py), as in the chart's ConfigMap.
apiVersion: spendgate.dev/v1alpha1
kind: CustomerBudget
metadata:
  name: ${name}
  labels:
    team: billing
spec:
  customerId: ${customerId}
  displayName: ${customer.email}
  currency: USD
  balance: ${metadata.credit}
"""
IMPORTED = {"spendgate.dev/imported-from": "stripe"}


@pytest_asyncio.fixture
async def stripe_customers(
    localstripe: LocalStripe,  # noqa: F811
    stripe_double: StripeDouble,  # noqa: F811
) -> AsyncIterator[stripe.StripeClient]:
    """Stripe customers are made straight at localstripe (the test plays Stripe's customer);
    the operator talks to the recording double, which proxies customers to localstripe."""
    stripe_double.upstream = localstripe.url
    http = stripe.AIOHTTPClient(timeout=10)
    client = stripe.StripeClient(
        API_KEY, base_addresses={"api": localstripe.url}, http_client=http, max_network_retries=0
    )
    try:
        yield client
    finally:
        await http.close_async()


async def stripe_customer(client: stripe.StripeClient, email: str, **metadata: str) -> str:
    customer = await client.v1.customers.create_async({"email": email, "metadata": metadata})
    return str(customer.id)


def import_settings(double: StripeDouble, tmp_path: Path, **overrides: Any) -> StripeSettings:
    template = tmp_path / "template.yaml"
    template.write_text(IMPORT_TEMPLATE)
    return replace(
        stripe_settings(double),
        import_enabled=True,
        import_template_file=str(template),
        import_namespace=NS,
        import_interval_s=0.3,
        **overrides,
    )


def imported_budgets(kubectl: Kubectl) -> list[dict[str, Any]]:
    return [
        b
        for b in kubectl.list(BUDGETS, NS)
        if IMPORTED.items() <= (b["metadata"].get("labels") or {}).items()
    ]


def naming(kubectl: Kubectl, stripe_id: str) -> list[str]:
    """The budgets whose spec.stripe names this Stripe customer."""
    return [
        b["metadata"]["name"]
        for b in kubectl.list(BUDGETS)
        if ((b.get("spec") or {}).get("stripe") or {}).get("customerId") == stripe_id
    ]


async def test_marked_stripe_customers_become_budgets_and_stay_when_deleted_in_stripe(
    redis_url: str,
    stripe_double: StripeDouble,  # noqa: F811
    stripe_customers: stripe.StripeClient,
    tmp_path: Path,
) -> None:
    marked = await stripe_customer(
        stripe_customers,
        "ops@acme-gpu.test",
        spendgate="true",
        spendgate_customer_id="acme-gpu",
        credit="25.00",
    )
    unmarked = await stripe_customer(stripe_customers, "nobody@x.test", credit="1")
    taken = await stripe_customer(stripe_customers, "ops@acme.test", spendgate="true", credit="1")
    settings = import_settings(stripe_double, tmp_path)

    async def cluster(kubectl: Kubectl) -> None:
        await kubectl.create("v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
        await kubectl.create(
            SECRETS, stripe_secret(**{"api-key": API_KEY, "webhook-secret": WEBHOOK_SECRET})
        )
        # kubectl-applied, naming a marked Stripe customer: it wins, nothing is imported.
        await kubectl.create(SECRETS, secret())
        await kubectl.create(BUDGETS, budget(stripe={"customerId": taken}))

    created = stripe_metrics.STRIPE_IMPORTS.labels("created")._value.get()
    skipped = stripe_metrics.STRIPE_IMPORTS.labels("skipped")._value.get()
    async with running_operator(
        redis_url, before=cluster, stripe=settings, lease_retry_s=0.2, shutdown_drain_s=0
    ) as env:
        redis = env.store.redis
        name = kubernetes_name(marked)
        await env.wait(lambda: env.budget(name), "the imported CustomerBudget", within=15)
        obj = env.budget(name)
        assert obj is not None
        assert obj["metadata"]["labels"] == {"team": "billing", **IMPORTED}
        assert obj["metadata"]["annotations"]["spendgate.dev/stripe-customer"] == marked
        assert obj["spec"]["customerId"] == "acme-gpu"
        assert obj["spec"]["displayName"] == "ops@acme-gpu.test"
        assert obj["spec"]["stripe"] == {"customerId": marked}
        # ... and reconciled like any other: configured in Redis, linked to Stripe.
        await env.wait(lambda: (env.ready(name) or {}).get("status") == "True", "Ready")
        assert await env.store.owner_of("acme-gpu") == f"{NS}/{name}"
        assert await redis.hget("sg:stripe:customers", marked) == b"acme-gpu"
        assert env.status(name)["balance"] == "25.00"
        assert ("Normal", "StripeImported") in env.event_reasons(name)
        await env.wait(lambda: env.ready().get("status") == "True", "the kubectl budget Ready")  # type: ignore[union-attr]

        # Import rounds go on (every 0.3 s): nothing twice, nothing for the others.
        await env.wait(
            lambda: stripe_metrics.STRIPE_IMPORTS.labels("skipped")._value.get() >= skipped + 4,
            "more import rounds",
        )
        assert [b["metadata"]["name"] for b in imported_budgets(env.kubectl)] == [name]
        assert stripe_metrics.STRIPE_IMPORTS.labels("created")._value.get() == created + 1
        assert naming(env.kubectl, taken) == ["acme"]
        assert naming(env.kubectl, unmarked) == []
        assert stripe_metrics.STRIPE_IMPORT_LAST_SUCCESS._value.get() > 0

        # Deleted in Stripe: suspended by the leader's reconciliation; budget and ledger stay.
        await env.store.ledger.settle("acme-gpu", "req-1", 1_000_000)
        await stripe_customers.v1.customers.delete_async(marked)
        await env.wait(lambda: env.status(name).get("state") == "Suspended", "Suspended")
        account = await env.store.ledger.account("acme-gpu")
        assert "stripe-deleted" in account.suspensions and account.configured
        rounds = stripe_metrics.STRIPE_IMPORTS.labels("skipped")._value.get()
        await env.wait(
            lambda: stripe_metrics.STRIPE_IMPORTS.labels("skipped")._value.get() >= rounds + 2,
            "more import rounds after the deletion",
        )
        assert env.budget(name) is not None
        assert [b["metadata"]["name"] for b in imported_budgets(env.kubectl)] == [name]
        assert (await env.store.ledger.ledger_entries("acme-gpu"))[-1]["request_id"] == "req-1"
        assert await redis.hget("sg:stripe:customers", marked) == b"acme-gpu"


async def test_importing_again_creates_no_duplicate(
    redis_url: str,
    stripe_double: StripeDouble,  # noqa: F811
    stripe_customers: stripe.StripeClient,
    tmp_path: Path,
) -> None:
    """Idempotent: a listed budget is skipped; a create that meets one anyway (HTTP 409: a
    stale list, another leader) is skipped too. A name held by another budget, a customer the
    template does not fit: failed, logged, counted, nothing created."""
    marked = await stripe_customer(stripe_customers, "a@x.test", spendgate="true", credit="5")
    squatted = await stripe_customer(stripe_customers, "b@x.test", spendgate="true", credit="5")
    misfit = await stripe_customer(stripe_customers, "c@x.test", spendgate="true", credit="lots")
    settings = import_settings(stripe_double, tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    gateway = StripeGateway.create(API_KEY, settings)
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        await kubectl.create("v1/namespaces", {"metadata": {"name": NS}})
        # A budget already named like the second customer's, for somebody else.
        await kubectl.create(BUDGETS, budget(kubernetes_name(squatted), customer="someone-else"))
        kube = KubeClient(timeout_s=3)
        kube.configure(kopf.ConnectionInfo(server=url))
        importer = BudgetImport(
            settings,
            kube=kube,
            redis=client,
            template=load_import_template(settings),
            instance="op-0",
        )
        failed = stripe_metrics.STRIPE_IMPORTS.labels("failed")._value.get()
        try:
            first = await importer.import_once(gateway)
            assert first.created == [f"{NS}/{kubernetes_name(marked)}"]
            assert first.skipped == []
            taken, misfits = sorted(first.failed, key=lambda m: not m.startswith(squatted))
            assert taken == (
                f"{squatted}: the budget name {NS}/{kubernetes_name(squatted)} is taken by a"
                " budget that does not name this Stripe customer"
            )
            assert misfits.startswith(f"{misfit}: ") and "spec.balance" in misfits
            assert stripe_metrics.STRIPE_IMPORTS.labels("failed")._value.get() == failed + 2

            again = await importer.import_once(gateway)  # listed: skipped before any POST
            assert (again.created, again.skipped) == ([], [marked])

            async def stale() -> tuple[set[str], set[tuple[str, str]]]:
                return set(), set()

            importer.claimed = stale  # type: ignore[method-assign]
            posts = len([c for c in emulator_calls() if c.verb == "create"])
            raced = await importer.import_once(gateway)  # POSTed: 409 AlreadyExists
            assert (raced.created, raced.skipped) == ([], [marked, squatted])
            assert len([c for c in emulator_calls() if c.verb == "create"]) > posts
            assert [b["metadata"]["name"] for b in imported_budgets(kubectl)] == [
                kubernetes_name(marked)
            ]
            assert kubectl.get(BUDGETS, NS, kubernetes_name(squatted))["spec"]["customerId"] == (  # type: ignore[index]
                "someone-else"
            )
            [event] = kubectl.events(NS, kubernetes_name(marked))
            assert (event["reason"], event["reportingInstance"]) == ("StripeImported", "op-0")
        finally:
            await kube.aclose()
            await gateway.close()
            await client.aclose()


def emulator_calls() -> list[Any]:
    from tests.support.kube_emulator import API_CALLS

    return [c for c in API_CALLS if c.resource == "customerbudgets"]
