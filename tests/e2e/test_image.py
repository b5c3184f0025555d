"""The built container image, run with podman as the chart runs it: non-root (65532), read-only
root filesystem, ``/tmp`` writable (the chart's emptyDir), no capabilities, no privilege
escalation. ``make image`` builds it (scripts/e2e/build-image.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kube_control_plane import CACHE, free_port
from tests.support.redis_servers import RedisServer

_digest = importlib.util.spec_from_file_location(
    "source_digest", Path(__file__).resolve().parents[2] / "scripts" / "e2e" / "source_digest.py"
)
assert _digest is not None and _digest.loader is not None
_digest_module = importlib.util.module_from_spec(_digest)
_digest.loader.exec_module(_digest_module)
source_digest = _digest_module.source_digest
LABEL = _digest_module.LABEL

IMAGE = os.environ.get("SPENDGATE_IMAGE", "localhost/spendgate:dev")
CONTAINERS_CONF = CACHE / "containers.conf"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API_KEY = "sk-image-test-0123456789abcdef"
# As the chart's sidecar and operator containers run (values.yaml securityContext).
BUDGET = f"""
apiVersion: v1
kind: Secret
metadata: {{name: imageco-keys, namespace: default}}
stringData: {{api-key: {API_KEY}}}
---
apiVersion: spendgate.dev/v1alpha1
kind: CustomerBudget
metadata: {{name: imageco, namespace: default}}
spec:
  customerId: imageco
  mode: prepaid
  currency: USD
  balance: "1.00"
  apiKeys:
    - name: main
      secretRef: {{name: imageco-keys}}
"""
RUN_AS_CHART = [
    "--user=65532:65532",
    "--read-only",
    "--tmpfs=/tmp:rw,size=16m",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman; `make image` does it)")
    if os.geteuid() != 0:
        pytest.skip("the image test runs podman as root (its storage is the system one)")
    if not CONTAINERS_CONF.is_file() or podman("image", "exists", IMAGE).returncode != 0:
        pytest.skip(f"image {IMAGE} is not built here: run `make image`")
    label = podman("image", "inspect", "--format", f'{{{{ index .Labels "{LABEL}" }}}}', IMAGE)
    if label.stdout.strip() != source_digest():
        pytest.skip(f"image {IMAGE} is older than this checkout: run `make image`")
    return IMAGE


def test_image_runs_non_root_read_only_and_prints_help(image: str) -> None:
    result = podman("run", "--rm", *RUN_AS_CHART, image, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("sidecar", "operator", "apply"):
        assert command in result.stdout
    whoami = podman("run", "--rm", *RUN_AS_CHART, "--entrypoint=id", image, "-u")
    assert whoami.stdout.strip() == "65532", whoami.stderr
    # the root filesystem is read-only, /tmp is not
    touch = podman(
        "run",
        "--rm",
        *RUN_AS_CHART,
        "--entrypoint=sh",
        image,
        "-c",
        "touch /tmp/ok && ! touch /opt/spendgate/nope 2>/dev/null",
    )
    assert touch.returncode == 0, touch.stderr


@pytest.fixture
def data_plane(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Redis with one funded budget, and the stand-in model on the host's loopback."""
    server = RedisServer()
    server.start()
    model_port = free_port()
    model = subprocess.Popen(
        [str(BIN / "spendgate"), "standin-model", "--host", "127.0.0.1", "--port", str(model_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    manifests = tmp_path / "budget.yaml"
    manifests.write_text(BUDGET)
    try:
        applied = subprocess.run(
            [
                *(str(BIN / "spendgate"), "apply", "--redis", server.url),
                *("-f", str(ROOT / "examples" / "pricebook.yaml"), "-f", str(manifests)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
        yield server.url, model_port
    finally:
        model.terminate()
        model.wait(10)
        server.close()


def account_of(redis_url: str) -> dict[str, str]:
    result = subprocess.run(
        [str(BIN / "spendgate"), "balance", "--redis", redis_url, "--json", "imageco"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    account: dict[str, str] = json.loads(result.stdout)
    return account


def test_sidecar_in_the_image_meters_a_request_to_the_model_on_the_host(
    image: str, data_plane: tuple[str, int]
) -> None:
    redis_url, model_port = data_plane
    port = free_port()
    name = f"spendgate-image-test-{port}"
    started = podman(
        "run", "--detach", "--rm", "--name", name, "--network=host", *RUN_AS_CHART,
        "--env", f"SPENDGATE_REDIS_URL={redis_url}",
        "--env", f"SPENDGATE_UPSTREAM=http://127.0.0.1:{model_port}",
        "--env", f"SPENDGATE_LISTEN=127.0.0.1:{port}",
        "--env", "SPENDGATE_POD=image-test",
        image, "sidecar",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        ).encode()
        deadline = time.monotonic() + 30
        while True:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=body,
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 200
                    answer = json.loads(response.read())
                    break
            except (urllib.error.URLError, ConnectionError) as error:
                if time.monotonic() > deadline:
                    logs = podman("logs", name).stdout
                    raise AssertionError(
                        f"sidecar in the image not serving: {error}\n{logs}"
                    ) from None
                time.sleep(0.3)
        assert answer["usage"]["completion_tokens"] == 5
        deadline = time.monotonic() + 10
        while True:  # the charge settles just after the response
            account = account_of(redis_url)
            if account["spentThisPeriod"] != "0.00" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert float(account["spentThisPeriod"]) > 0, account
        assert float(account["balance"]) < 1, account
    finally:
        podman("stop", "--time=5", name)
