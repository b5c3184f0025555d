"""The operator's plumbing: kopf settings, health endpoints, the API client, the CLI, services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest
import pytest_asyncio
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.backoff import NoBackoff
from redis.retry import Retry

from spendgate import cli
from spendgate.operator.kube.client import KubeClient
from spendgate.operator.kube.retry import KubernetesUnavailable
from spendgate.operator.kube.status_writer import StatusWriter
from spendgate.operator.runtime import cli_args, handlers, kopf_settings
from spendgate.operator.runtime.health import Health
from spendgate.operator.runtime.main import run_operator
from spendgate.operator.runtime.settings import OperatorSettings
from tests.support.kube_emulator import started_emulator
from tests.support.redis_servers import RedisServer

# --------------------------------------------------------------------------- kopf settings


def test_configure_kopf_for_production() -> None:
    ks = kopf.OperatorSettings()
    kopf_settings.configure_kopf(ks, OperatorSettings(pod_name="spendgate-operator-7d9f-x2"))
    assert isinstance(ks.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert ks.persistence.progress_storage.prefix == "spendgate.dev"
    assert isinstance(ks.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert ks.persistence.diffbase_storage.prefix == "spendgate.dev"
    assert ks.persistence.finalizer == "spendgate.dev/finalizer"
    assert (ks.posting.enabled, ks.posting.loggers, ks.posting.level) == (True, False, logging.INFO)
    assert ks.posting.reporting_instance == "spendgate-operator-7d9f-x2"
    assert ks.posting.reporting_component == "spendgate-operator"
    assert ks.networking.request_timeout and ks.networking.connect_timeout
    assert ks.watching.server_timeout and ks.watching.client_timeout
    assert ks.watching.client_timeout > ks.watching.server_timeout
    # One election, the Lease: kopf never peers (only the leader runs it).
    assert ks.peering.standalone and not ks.peering.mandatory
    assert ks.queueing.worker_limit == 100
    assert ks.background.cancellation_polling <= 1  # a deleted budget is released promptly


def test_namespaced_kopf_does_not_scan_the_cluster() -> None:
    """Watching namespaces by name: no cluster-wide list/watch of Namespaces (nor of CRDs)."""
    clusterwide = kopf.OperatorSettings()
    kopf_settings.configure_kopf(clusterwide, OperatorSettings())
    namespaced = kopf.OperatorSettings()
    kopf_settings.configure_kopf(namespaced, OperatorSettings(namespaces=("models",)))
    assert namespaced.scanning.disabled and not clusterwide.scanning.disabled


def test_registry_has_the_handlers() -> None:
    kube = KubeClient()
    runtime = handlers.Runtime(
        settings=OperatorSettings(),
        store=None,  # type: ignore[arg-type]
        kube=kube,
        status=StatusWriter(kube),
    )
    registry = handlers.build_registry(runtime)
    changing = {h.id for h in registry._changing.get_all_handlers()}
    assert {"reconcile", "finalize"} <= changing
    assert {h.id for h in registry._spawning.get_all_handlers()} == {"status"}
    assert {h.id for h in registry._indexing.get_all_handlers()} == {"budget_refs"}
    assert {h.id for h in registry._watching.get_all_handlers()} == {"secret_changed"}
    finalizing = [h for h in registry._changing.get_all_handlers() if h.id == "finalize"]
    assert all(h.requires_finalizer for h in finalizing)


# --------------------------------------------------------------------------- health


@pytest_asyncio.fixture
async def quick_redis(fresh_redis_server: RedisServer) -> AsyncIterator[Any]:
    client = redis.asyncio.Redis.from_url(
        fresh_redis_server.url,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    yield client
    await client.aclose()


async def test_health_endpoints(quick_redis: Any, fresh_redis_server: RedisServer) -> None:
    """/readyz (the webhook Service's probe) never depends on Redis; /readyz/full does."""
    ready = asyncio.Event()
    alive = {"value": True}
    admission: dict[str, str | None] = {"problem": "the admission webhook is not listening yet"}
    health = Health(
        quick_redis,
        ready,
        lambda: alive["value"],
        checks=[lambda: admission["problem"]],
        info=[lambda: "Stripe: no API key"],
    )
    async with TestClient(TestServer(health.app())) as client:
        assert (await client.get("/healthz")).status == 200
        response = await client.get("/readyz")
        assert response.status == 503
        problems = (await response.json())["problems"]
        assert "the operator has not started" in problems
        assert "the admission webhook is not listening yet" in problems
        ready.set()
        admission["problem"] = None
        assert (await client.get("/readyz")).status == 200
        full = await client.get("/readyz/full")
        assert full.status == 200
        assert (await full.json())["notes"] == ["Stripe: no API key"]
        fresh_redis_server.stop()
        assert (await client.get("/readyz")).status == 200  # admission keeps being served
        response = await client.get("/readyz/full")
        assert response.status == 503
        assert any("Redis" in p for p in (await response.json())["problems"])
        metrics = await client.get("/metrics")
        assert metrics.status == 200 and metrics.content_type == "text/plain"
        text = await metrics.text()
        for name in (
            "spendgate_operator_redis_up 0.0",
            "spendgate_operator_leader ",
            "spendgate_operator_reconciles_total",
            "spendgate_stripe_export_lag_seconds ",
            "spendgate_stripe_webhook_requests_total",
        ):
            assert name in text, name
        alive["value"] = False
        assert (await client.get("/healthz")).status == 503


# --------------------------------------------------------------------------- API client


async def test_kube_client_errors_and_absence() -> None:
    seen: list[dict[str, Any]] = []

    async def secret(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        name = request.match_info["name"]
        if name == "gone":
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        if name == "forbidden":
            return web.json_response(
                {"kind": "Status", "message": 'secrets "forbidden" is forbidden'}, status=403
            )
        return web.json_response({"kind": "Secret", "data": {}})

    async def annotate(request: web.Request) -> web.Response:
        assert request.content_type == "application/merge-patch+json"
        return web.json_response(await request.json())

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", secret)
    app.router.add_patch(
        "/apis/spendgate.dev/v1alpha1/namespaces/{ns}/customerbudgets/{name}", annotate
    )
    kube = KubeClient(timeout_s=2)
    with pytest.raises(KubernetesUnavailable, match="not logged in"):
        await kube.read_secret("a", "b")
    async with TestServer(app) as server:
        kube.configure(kopf.ConnectionInfo(server=str(server.make_url("")), token="t0k3n"))
        assert await kube.read_secret("ns", "present") == {"kind": "Secret", "data": {}}
        assert seen[0]["Authorization"] == "Bearer t0k3n"
        assert await kube.read_secret("ns", "gone") is None
        with pytest.raises(KubernetesUnavailable, match=r"HTTP 403 .*forbidden"):
            await kube.read_secret("ns", "forbidden")
        assert await kube.annotate("customerbudgets", "ns", "b", {"x.y/z": "1"})
    with pytest.raises(KubernetesUnavailable):
        await kube.read_secret("ns", "present")  # the server is gone
    await kube.aclose()
    with pytest.raises(KubernetesUnavailable, match="stopping"):
        await kube.read_secret("ns", "present")


# --------------------------------------------------------------------------- CLI


def _parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(["operator", *argv])


def test_operator_settings_from_flags_and_env() -> None:
    env = {
        "SPENDGATE_REDIS_URL": "redis://redis:6379/1",
        "SPENDGATE_WATCH_NAMESPACES": "team-a, team-b",
        "SPENDGATE_STATUS_INTERVAL": "15",
        "SPENDGATE_ALERT_WEBHOOK_URL": "https://hooks.example.com/x",
        "POD_NAME": "op-0",
        "POD_NAMESPACE": "spendgate",
    }
    settings = cli_args.operator_settings_from_args(_parse(), env)
    assert settings.redis_url == "redis://redis:6379/1"
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.status_interval_s == 15.0
    assert settings.alert_webhook_url == "https://hooks.example.com/x"
    assert (settings.pod_name, settings.namespace) == ("op-0", "spendgate")
    flags = cli_args.operator_settings_from_args(
        _parse(
            "--watch-namespace",
            "x",
            "--status-interval",
            "2",
            "--health-port",
            "9000",
        ),
        env,
    )
    assert flags.namespaces == ("x",) and flags.status_interval_s == 2.0
    assert flags.health_port == 9000
    defaults = cli_args.operator_settings_from_args(_parse(), {})
    assert defaults == OperatorSettings()


def test_leader_election_bypass_check_and_stripe_settings() -> None:
    env = {
        "SPENDGATE_LEASE_NAME": "sg-spendgate-operator-leader",
        "SPENDGATE_BYPASS_CHECK_INTERVAL": "0",
        "SPENDGATE_STRIPE_ENABLED": "true",
        "SPENDGATE_STRIPE_WEBHOOK_PORT": "9444",
        "SPENDGATE_OPERATOR_NAMESPACE": "billing",
    }
    settings = cli_args.operator_settings_from_args(_parse(), env)
    assert settings.leader_election and settings.lease_name == "sg-spendgate-operator-leader"
    assert settings.lease_ns == "billing" and settings.bypass_check_interval_s == 0
    assert settings.stripe is not None and settings.stripe.webhook_port == 9444
    off = cli_args.operator_settings_from_args(
        _parse("--no-leader-election", "--lease-name", "x", "--bypass-check-interval", "5"),
        {"SPENDGATE_STRIPE_ENABLED": "false", "SPENDGATE_STRIPE_WEBHOOK_PORT": "x"},
    )
    assert not off.leader_election and off.lease_name == "x"
    assert off.bypass_check_interval_s == 5 and off.stripe is None
    assert not cli_args.operator_settings_from_args(
        _parse(), {"SPENDGATE_LEADER_ELECTION": "false"}
    ).leader_election


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"SPENDGATE_LEADER_ELECTION": "maybe"}, "true or false"),
        (["--bypass-check-interval", "-1"], {}, "0 \\(off\\)"),
        ([], {"SPENDGATE_STRIPE_ENABLED": "1", "SPENDGATE_STRIPE_WEBHOOK_PORT": "x"}, "STRIPE"),
        ([], {"SPENDGATE_STRIPE_ENABLED": "1", "SPENDGATE_STRIPE_METER_VALUE_UNIT": "$"}, "STRIPE"),
        (["--no-leader-election"], {"SPENDGATE_STRIPE_ENABLED": "1"}, "needs leader election"),
        ([], {"SPENDGATE_STRIPE_ENABLED": "1", "SPENDGATE_LEADER_ELECTION": "no"}, "Lease"),
        (["--status-interval", "0"], {}, "positive"),
        ([], {"SPENDGATE_STATUS_INTERVAL": "soon"}, "expected a number"),
        (["--health-port", "70000"], {}, "TCP port"),
        (["--alert-webhook-url", "ftp://x"], {}, "http"),
    ],
)
def test_bad_operator_settings(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli_args.operator_settings_from_args(_parse(*argv), env)


def test_operator_subcommand_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["operator", "--status-interval", "-1"]) == 2
    assert "positive" in capsys.readouterr().err
    assert cli.main(["operator", "--help"]) == 0
    assert "--watch-namespace" in capsys.readouterr().out


# --------------------------------------------------------------------------- services


async def test_services_run_beside_kopf_and_their_failure_stops_it(redis_url: str) -> None:
    """The hook the admission webhook uses: a service that fails takes the operator down."""
    started = asyncio.Event()

    async def admission_like(settings: OperatorSettings) -> None:
        started.set()
        await asyncio.sleep(0.2)
        raise RuntimeError("the admission server crashed")

    async with started_emulator() as (_emulator, url):
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            with pytest.raises(RuntimeError, match="admission server crashed"):
                await asyncio.wait_for(
                    run_operator(
                        OperatorSettings(redis_url=redis_url),
                        redis_client=client,
                        login=lambda **_: kopf.ConnectionInfo(server=url),
                        services=[admission_like],
                        health=False,
                    ),
                    15,
                )
            assert started.is_set()
        finally:
            await client.aclose()


def test_sidecar_injection_defaults_from_env() -> None:
    env = {
        "SPENDGATE_SIDECAR_IMAGE": "registry.example.com/spendgate:1.2.3",
        "SPENDGATE_SIDECAR_PORT": "9090",
        "SPENDGATE_SIDECAR_REDIS_CLUSTER": "true",
        "SPENDGATE_SIDECAR_NATIVE_SIDECARS": "auto",
        "SPENDGATE_SIDECAR_FAIL_MODE": "open",
        "SPENDGATE_SIDECAR_CPU_LIMIT": "",  # empty: the default
    }
    injection = cli_args.operator_settings_from_args(_parse(), env).injection
    assert injection.image == "registry.example.com/spendgate:1.2.3"
    assert (injection.port, injection.redis_cluster, injection.native_sidecars) == (
        9090,
        True,
        None,
    )
    assert injection.fail_mode == "open" and injection.cpu_limit == "1"
    assert cli_args.injection_defaults_from_env({"SPENDGATE_SIDECAR_NATIVE_SIDECARS": "false"}) == (
        cli_args.injection_defaults_from_env({}).__class__(native_sidecars=False)
    )
    with pytest.raises(cli.UsageError, match="SPENDGATE_SIDECAR_PORT"):
        cli_args.injection_defaults_from_env({"SPENDGATE_SIDECAR_PORT": "eighty"})
    with pytest.raises(cli.UsageError, match="true or false"):
        cli_args.injection_defaults_from_env({"SPENDGATE_SIDECAR_REDIS_CLUSTER": "auto"})


# --------------------------------------------------------------------------- admission wired


def test_admission_runs_when_its_certificate_is_configured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from spendgate.operator.runtime.main import AdmissionService, default_services

    assert default_services(OperatorSettings()) == []
    assert "the admission webhook is disabled" in caplog.text
    [service] = default_services(
        OperatorSettings(webhook_cert_file="/tls/tls.crt", webhook_key_file="/tls/tls.key")
    )
    assert isinstance(service, AdmissionService)
    assert service.readiness() == "the admission webhook is not listening yet"


async def test_admission_is_served_beside_kopf_and_gates_readiness(
    quick_redis: Any, fresh_redis_server: RedisServer, tmp_path: Any
) -> None:
    """Every replica serves admission; /readyz (the webhook Service's probe) waits for it and
    stays ready when Redis is gone."""
    import ssl

    from spendgate.operator.runtime.main import AdmissionService
    from tests.support.redis_servers import _free_ports
    from tests.support.webhook_certs import WebhookCA

    ca = WebhookCA.create(tmp_path)
    ca.issue()

    class Api:
        async def namespace_labels(self, name: str) -> dict[str, str]:
            return {}

        async def server_version(self) -> tuple[int, int]:
            return (1, 30)

    webhook_port, health_port = _free_ports(2)
    settings = OperatorSettings(
        redis_url=fresh_redis_server.url,
        leader_election=False,
        webhook_host="127.0.0.1",
        webhook_port=webhook_port,
        webhook_cert_file=str(ca.cert_file),
        webhook_key_file=str(ca.key_file),
        health_host="127.0.0.1",
        health_port=health_port,
        shutdown_drain_s=0.2,
    )
    admission = AdmissionService(Api())
    stop = asyncio.Event()
    async with started_emulator() as (_emulator, url):
        task = asyncio.create_task(
            run_operator(
                settings,
                redis_client=quick_redis,
                login=lambda **_: kopf.ConnectionInfo(server=url),
                services=[admission],
                stop_flag=stop,
            )
        )
        try:
            context = ssl.create_default_context(cafile=str(ca.ca_file))
            async with aiohttp.ClientSession() as session:

                async def status(path: str) -> int:
                    try:
                        async with session.get(f"http://127.0.0.1:{health_port}{path}") as r:
                            return r.status
                    except aiohttp.ClientConnectionError:
                        return 0

                for _ in range(200):
                    if await status("/readyz") == 200:
                        break
                    await asyncio.sleep(0.05)
                assert await status("/readyz") == 200 and admission.port == webhook_port
                review = {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {
                        "uid": "u1",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE",
                        "namespace": "default",
                        "object": {"metadata": {"name": "p"}, "spec": {"containers": []}},
                    },
                }
                async with session.post(
                    f"https://localhost:{webhook_port}/mutate-pods", json=review, ssl=context
                ) as response:
                    assert response.status == 200
                    assert (await response.json())["response"]["allowed"] is True
                fresh_redis_server.stop()
                assert await status("/readyz") == 200
                assert await status("/readyz/full") == 503
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
    assert admission.readiness() is not None
