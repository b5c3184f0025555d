"""Real Redis processes on loopback: a single server and a 3-master Redis Cluster.

Shared by the tests (``tests/support/redis_servers.py`` wraps these in fixtures) and
``make bench``. Nothing here assumes a Redis is already running: ``redis-server`` (7.x) is
started on free loopback ports in temporary directories, without persistence, and killed
afterwards. ``make test`` and ``make bench`` install redis-server; set
``SPENDGATE_REDIS_SERVER`` / ``SPENDGATE_REDIS_CLI`` to use other binaries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from spendgate.local_processes import HOST, PRE_EXEC, cpu_seconds, free_ports

STARTUP_TIMEOUT_S = 10.0
CLUSTER_TIMEOUT_S = 20.0


class RedisBinaryMissing(RuntimeError):
    pass


def _binary(env: str, name: str) -> str:
    path = shutil.which(os.environ.get(env, name))
    if path is None:
        raise RedisBinaryMissing(
            f"{name} not found (looked for {os.environ.get(env, name)!r} on PATH). The Redis "
            f"tests start real Redis processes: run `make test`, which installs redis-server "
            f"(Debian: apt-get install redis-server), or set {env} to the binary."
        )
    return path


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 in its own temp dir, no persistence.

    ``stop()`` kills it (SIGKILL, like a crash); ``start()`` brings it back on the same port
    (empty, since nothing is persisted). ``freeze()``/``thaw()`` SIGSTOP/SIGCONT it to simulate
    a hung Redis (connections accepted by the kernel, no answers).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        self.binary = _binary("SPENDGATE_REDIS_SERVER", "redis-server")
        self._fixed_port = port is not None
        self.port = port if port is not None else free_ports(1)[0]
        self.extra_args = list(extra_args)
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="spendgate-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    def _spawn(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=PRE_EXEC,
        )

    def _wait_ready(self, deadline: float) -> None:
        client = self.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with {self.proc.returncode}:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.01)
        finally:
            client.close()

    def spawn(self) -> None:
        """Start the process without waiting (see :meth:`wait_ready`); no-op if running."""
        if not self.is_running():
            self._spawn()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        try:
            self._wait_ready(time.monotonic() + timeout)
        except Exception:
            self.stop()
            raise
        self._started_once = True

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start (or restart on the same port) and wait until PING answers."""
        if self.is_running():
            return
        for attempt in range(3):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError:
                # Lost a race for an auto-picked port before the first start: pick another.
                if self._fixed_port or self._started_once or attempt == 2:
                    raise
                self.port = free_ports(1)[0]

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time the running server has used so far."""
        assert self.proc is not None, "not running"
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """Kill the server (SIGKILL: no clean shutdown, like a crashed or lost Redis)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the server and remove its temp dir."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client; unlike redis-py's default (10 retries with backoff) it does not retry,
        so a stopped/frozen server shows up at once."""
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    def flushall(self) -> None:
        with self.client(socket_timeout=5) as c:
            c.flushall()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisCluster:
    """Redis Cluster of ``masters`` nodes (no replicas) on 127.0.0.1, made by
    ``redis-cli --cluster create``; :meth:`start` returns once every node reports
    ``cluster_state:ok`` and knows every other node."""

    def __init__(self, masters: int = 3) -> None:
        self.cli = _binary("SPENDGATE_REDIS_CLI", "redis-cli")
        self.dir = Path(tempfile.mkdtemp(prefix="spendgate-redis-cluster-"))
        self.nodes: list[RedisServer] = []
        self.masters = masters

    def _make_nodes(self) -> None:
        # The cluster bus port defaults to port + 10000, which may be taken or > 65535:
        # pick it explicitly (redis >= 7).
        ports = free_ports(2 * self.masters)
        self.nodes = []
        for i in range(self.masters):
            node_dir = self.dir / f"node{i}"
            node_dir.mkdir(exist_ok=True)
            for stale in node_dir.iterdir():
                stale.unlink()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(ports[2 * i + 1]),
            ]  # fmt: skip
            self.nodes.append(RedisServer(port=ports[2 * i], extra_args=args, workdir=node_dir))

    def start(self) -> None:
        for attempt in range(3):
            self._make_nodes()
            try:
                for node in self.nodes:  # spawn all first: they boot in parallel
                    node.spawn()
                for node in self.nodes:
                    node.wait_ready()
                break
            except RuntimeError:  # lost a port race: retry with other ports
                self.stop()
                if attempt == 2:
                    raise
        try:
            self._create()
            self._wait_ok(time.monotonic() + CLUSTER_TIMEOUT_S)
        except Exception:
            self.close()
            raise

    def _create(self) -> None:
        cmd = [
            self.cli, "--cluster", "create", *(n.address for n in self.nodes),
            "--cluster-replicas", "0", "--cluster-yes",
        ]  # fmt: skip
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CLUSTER_TIMEOUT_S, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{res.stdout}\n{res.stderr}")

    def _wait_ok(self, deadline: float) -> None:
        clients = [n.client(socket_timeout=2, decode_responses=True) for n in self.nodes]
        try:
            while True:
                infos = [c.execute_command("CLUSTER INFO") for c in clients]
                if all(
                    info.get("cluster_state") == "ok"
                    and int(info.get("cluster_known_nodes", 0)) == self.masters
                    and int(info.get("cluster_slots_ok", 0)) == 16384
                    for info in infos
                ):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster not ok in time: {infos}")
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def cpu_seconds(self) -> float:
        """CPU time all nodes have used so far."""
        return sum(node.cpu_seconds() for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
