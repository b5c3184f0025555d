"""``spendgate operator`` as a process against the e2e tier's API server, run as the chart runs
it: the Deployment's command and environment (tests/support/e2e_chart.py), the chart's
ServiceAccount token in a kubeconfig (out of cluster, so ``KUBECONFIG``), the chart's webhook
certificate, free loopback ports for the webhook and health servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spendgate.config_store import ConfigStore
from tests.support import e2e_chart
from tests.support.e2e_chart import ChartInstall
from tests.support.kube_control_plane import ControlPlane, free_port

BIN = Path(sys.executable).parent


@dataclass
class OperatorProcess:
    popen: subprocess.Popen[bytes]
    log: Path
    health_port: int

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log records so far (non-JSON lines as ``{"raw": line}``)."""
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"raw": line}
            records.append(record if isinstance(record, dict) else {"raw": line})
        return records

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for record in self.lines():
                if predicate(record):
                    return record
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no such operator log line in {timeout_s}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError as error:  # not listening (yet, or any more)
            return 0, str(error)

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"the operator exited ({self.popen.returncode}):\n{self.tail()}"
                )
            with contextlib.suppress(OSError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the operator is not ready in {timeout_s}s:\n{self.tail()}")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        return int(self.popen.returncode)


def start_operator(
    plane: ControlPlane,
    install: ChartInstall,
    chart_objects: Sequence[dict[str, Any]],
    redis_url: str,
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
    pod_name: str = "sg-spendgate-operator-0",
    kubeconfig: Path | None = None,
) -> OperatorProcess:
    """Start the operator; it is not waited for (see :meth:`OperatorProcess.wait_ready`)."""
    directory.mkdir(parents=True, exist_ok=True)
    health_port = free_port()
    overrides = {
        "SPENDGATE_HEALTH_PORT": str(health_port),
        "SPENDGATE_WEBHOOK_PORT": str(install.webhook_port),
        "SPENDGATE_WEBHOOK_CERT_FILE": str(install.cert_file),
        "SPENDGATE_WEBHOOK_KEY_FILE": str(install.key_file),
        "SPENDGATE_STATUS_INTERVAL": "2",
        **(env or {}),
    }
    environment = e2e_chart.operator_environment(
        chart_objects, pod_name=pod_name, redis_url=redis_url, overrides=overrides
    )
    command = e2e_chart.operator_command(chart_objects)
    command[0] = str(BIN / command[0])
    full_env = {
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(directory),
        "KUBECONFIG": str(kubeconfig or install.kubeconfig),
        **environment,
    }
    log = directory / f"{pod_name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
        )
    return OperatorProcess(popen, log, health_port)


@contextlib.contextmanager
def running_operator(*args: Any, ready: bool = True, **kwargs: Any) -> Iterator[OperatorProcess]:
    process = start_operator(*args, **kwargs)
    try:
        if ready:
            process.wait_ready()
        yield process
    finally:
        process.stop()


def eventually(check: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as error:
            last = error
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what} (last: {last})")


def store_lookup(redis_url: str, api_key: str) -> Any:
    async def lookup() -> Any:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await ConfigStore(client).lookup_key(
                hashlib.sha256(api_key.encode()).hexdigest()
            )
        finally:
            await client.aclose()

    return asyncio.run(lookup())


def budget(plane: ControlPlane, name: str) -> dict[str, Any]:
    result: dict[str, Any] = plane.get_json(
        f"customerbudgets.spendgate.dev/{name}", "-n", "default"
    )
    return result


def condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for item in (body.get("status") or {}).get("conditions") or []:
        if item.get("type") == type_:
            return dict(item)
    return None
