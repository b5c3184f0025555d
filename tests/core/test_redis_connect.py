"""One way from a Redis URL to a client (spendgate/redis_connect.py), for the CLI, the operator
and the sidecar: URL parsing, the client each URL gives, and a real Sentinel on loopback
(``redis-server --sentinel``) in front of a password-protected primary."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster

from spendgate import cli, redis_connect
from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.operator.runtime import cli_args
from spendgate.operator.runtime.main import make_redis
from spendgate.operator.runtime.settings import OperatorSettings
from spendgate.redis_connect import SentinelRedis, SentinelTarget, parse_redis_url
from spendgate.script_channel import ClusterScriptChannel, ScriptChannel
from spendgate.sidecar.server import Sidecar, pipelined, script_channel
from spendgate.sidecar.settings import SidecarSettings
from tests.support.redis_servers import HOST, RedisServer, _die_with_parent, _free_ports, _libc

# --------------------------------------------------------------------------- parsing


def test_sentinel_url_as_the_chart_writes_it() -> None:
    url = "redis+sentinel://:s3cret@sentinel-0.redis:26379,sentinel-1.redis:26379/billing/0"
    assert parse_redis_url(url) == SentinelTarget(
        sentinels=(("sentinel-0.redis", 26379), ("sentinel-1.redis", 26379)),
        master="billing",
        db=0,
        password="s3cret",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://h1/mymaster",
            SentinelTarget(sentinels=(("h1", 26379),), master="mymaster"),
        ),
        (
            "rediss+sentinel://app:p%40ss%3Aw0rd@h1:1,[::1]:26380/main/3",
            SentinelTarget(
                sentinels=(("h1", 1), ("::1", 26380)),
                master="main",
                db=3,
                username="app",
                password="p@ss:w0rd",
                ssl=True,
            ),
        ),
        (
            "redis+sentinel://h1:26379/m/?sentinel_password=s%2Bp&sentinel_username=sen",
            SentinelTarget(
                sentinels=(("h1", 26379),),
                master="m",
                sentinel_username="sen",
                sentinel_password="s+p",
            ),
        ),
    ],
)
def test_sentinel_url_forms(url: str, expected: SentinelTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "cluster", "message"),
    [
        ("redis+sentinel://h1:26379", False, "master's name"),
        ("redis+sentinel://:pw@/m", False, "at least one host"),
        ("redis+sentinel://h1:port/m", False, "bad port"),
        ("redis+sentinel://h1:70000/m", False, "bad port"),
        ("redis+sentinel://h1/m/zero", False, "must be a number"),
        ("redis+sentinel://h1/m?timeout=1", False, "unknown Sentinel URL options"),
        ("redis+sentinel://h1/m", True, "Redis Cluster"),
        ("http://h1:6379", False, "unsupported scheme 'http'"),
        ("unix:///tmp/redis.sock", True, "Redis Cluster"),
    ],
)
def test_bad_urls(url: str, cluster: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url, cluster=cluster)


def test_bad_url_messages_never_show_the_password() -> None:
    with pytest.raises(ValueError) as error:
        parse_redis_url("redis+sentinel://:hunter2@h1:bad/m")
    assert "hunter2" not in str(error.value)


def test_plain_urls_are_what_the_pipelined_channel_speaks() -> None:
    assert redis_connect.is_plain_url("redis://:pw@h:6379/0")
    assert redis_connect.is_plain_url("rediss://h:6380/1")
    assert not redis_connect.is_plain_url("redis+sentinel://h1/m")
    assert not redis_connect.is_plain_url("rediss://h/0?ssl_cert_reqs=none")
    assert not redis_connect.is_plain_url("unix:///tmp/r.sock")
    base = SidecarSettings(upstream="http://127.0.0.1:8000")
    assert pipelined(base)
    assert not pipelined(SidecarSettings(upstream="x", redis_url="redis+sentinel://h1/m"))
    # Redis Cluster: one pipelined channel per primary (issue 8), so it is pipelined too.
    cluster = SidecarSettings(upstream="x", cluster=True)
    assert pipelined(cluster)
    assert isinstance(script_channel(cluster), ClusterScriptChannel)
    assert isinstance(script_channel(base), ScriptChannel)
    assert script_channel(SidecarSettings(upstream="x", pipelined_scripts=False)) is None


# --------------------------------------------------------------------------- clients


async def test_each_url_gives_its_client() -> None:
    single = redis_connect.connect("redis://:pw@h:6380/2", timeout_s=1.5)
    assert type(single) is redis.asyncio.Redis
    kwargs = single.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "h",
        6380,
        2,
        "pw",
    )
    assert kwargs["socket_timeout"] == 1.5
    await single.aclose()

    cluster = redis_connect.connect(
        "redis://h:7000/0", cluster=True, health_check_interval=10, max_connections=5
    )
    assert isinstance(cluster, redis.asyncio.cluster.RedisCluster)
    assert cluster.nodes_manager.connection_kwargs["max_connections"] == 5  # per node, kept
    await cluster.aclose()

    sentinel = redis_connect.connect(
        "rediss+sentinel://app:pw@s1:1,s2:2/main/4?sentinel_password=sp",
        timeout_s=2,
        connect_timeout_s=1,
        health_check_interval=7,
    )
    assert isinstance(sentinel, SentinelRedis) and sentinel.sentinel is not None
    pool = sentinel.connection_pool
    assert pool.service_name == "main" and pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (4, "app", "pw")
    assert kwargs["socket_timeout"] == 2 and kwargs["health_check_interval"] == 7
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    sentinels = [s.connection_pool.connection_kwargs for s in sentinel.sentinel.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("s1", 1), ("s2", 2)]
    assert all(s["password"] == "sp" and s["socket_connect_timeout"] == 1 for s in sentinels)
    assert all(not s.get("health_check_interval") for s in sentinels)
    await sentinel.aclose()
    assert sentinel.sentinel is None


def test_operator_and_sidecar_build_their_clients_here() -> None:
    url = "redis+sentinel://:pw@s1:26379/main/0"
    assert isinstance(make_redis(OperatorSettings(redis_url=url)), SentinelRedis)
    sidecar = Sidecar(SidecarSettings(upstream="http://127.0.0.1:8000", redis_url=url))
    assert isinstance(sidecar.redis, SentinelRedis)
    assert sidecar.channel is None  # the hot path stays on redis-py, which follows failovers


def test_cli_refuses_bad_urls_as_usage_errors() -> None:
    ns = cli.build_parser().parse_args(["operator"])
    with pytest.raises(cli.UsageError, match="invalid Redis URL"):
        cli_args.operator_settings_from_args(ns, {"SPENDGATE_REDIS_URL": "redis+sentinel://h1"})


# --------------------------------------------------------------------------- a real Sentinel


class SentinelProcess:
    """``redis-server --sentinel`` watching one primary, on a free loopback port."""

    def __init__(self, master: RedisServer, password: str, name: str = "mymaster") -> None:
        self.port = _free_ports(1)[0]
        self.dir = master.dir / "sentinel"
        self.dir.mkdir(exist_ok=True)
        self.config = self.dir / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind {HOST}\ndaemonize no\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {name} {HOST} {master.port} 1\n"
            f"sentinel auth-pass {name} {password}\n"
            f"sentinel down-after-milliseconds {name} 5000\n"
        )
        self.proc = subprocess.Popen(
            [master.binary, str(self.config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if _libc is not None else None,
        )
        deadline = time.monotonic() + 10
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1)
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.execute_command("SENTINEL", "get-master-addr-by-name", name):
                        return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = Path(self.dir / "sentinel.log")
                    raise RuntimeError("sentinel did not start:\n" + log.read_text()[-2000:])
                time.sleep(0.05)
        finally:
            client.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def sentinel() -> Iterator[tuple[RedisServer, SentinelProcess]]:
    with RedisServer() as master:
        with master.client() as client:
            client.config_set("requirepass", "s3cret")
        process = SentinelProcess(master, "s3cret")
        try:
            yield master, process
        finally:
            process.close()


async def test_through_a_real_sentinel(
    sentinel: tuple[RedisServer, SentinelProcess], tmp_path: Path
) -> None:
    master, process = sentinel
    url = f"redis+sentinel://:s3cret@{HOST}:{process.port}/mymaster/0"
    client = redis_connect.connect(url, timeout_s=2)
    try:
        assert await client.ping()
        await client.set("through", "sentinel")
        addr = client.connection_pool.connection_kwargs
        assert addr.get("password") == "s3cret"
        primary = redis.Redis(host=HOST, port=master.port, password="s3cret")
        assert primary.get("through") == b"sentinel"
        primary.close()
        # The ledger's scripts (what the sidecar and the operator run) work through it.
        ledger = Ledger(client)
        await ledger.load_scripts()
        assert (await ConfigStore(client, ledger).list_pricebooks()) == []
    finally:
        await client.aclose()


def test_the_cli_through_a_real_sentinel(
    sentinel: tuple[RedisServer, SentinelProcess], tmp_path: Path
) -> None:
    _master, process = sentinel
    url = f"redis+sentinel://:s3cret@{HOST}:{process.port}/mymaster/0"
    manifest = tmp_path / "budget.yaml"
    manifest.write_text(
        "apiVersion: spendgate.dev/v1alpha1\nkind: CustomerBudget\n"
        "metadata: {name: acme, namespace: default}\n"
        'spec: {customerId: acme, currency: USD, balance: "5.00"}\n'
    )
    assert cli.main(["apply", "-f", str(manifest), "--redis", url]) == 0
    assert cli.main(["balance", "acme", "--redis", url]) == 0
