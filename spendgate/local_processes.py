"""Supervising the local processes of `make demo` and `make bench`.

Subprocesses (redis-server, the stand-in model, the sidecar, ...) on free ports of
127.0.0.1, each logging to a file in one temp dir, probed until they are up, stopped in
reverse order and cleaned up on success, failure, Ctrl-C or SIGTERM. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

Probe = Callable[[], bool]


class StartupFailure(Exception):
    """A subprocess exited, or did not come up in time, while being waited for."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (sockets held together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


LIBC: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here, not in the forked child


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the child SIGKILLed if this process dies without cleaning up."""
    if LIBC is not None:
        LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ``preexec_fn`` for children that must not outlive us (None where prctl is unavailable).
PRE_EXEC: Callable[[], None] | None = die_with_parent if LIBC is not None else None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in kB."""
        found = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
        return found

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(empty log)"


@dataclass
class Processes:
    """Subprocesses logging to files in one temp dir; ``close`` stops them all, then removes it."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                preexec_fn=PRE_EXEC,  # only prctl(2): safe between fork and exec
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            if child.alive():
                child.proc.terminate()
        deadline = time.monotonic() + 5
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def tails(self) -> str:
        parts = [f"--- {c.name} ({c.log.name}, last lines)\n{c.tail()}" for c in self.children]
        return "\n".join(parts)


def wait_until(child: Child, what: str, probe: Probe, *, timeout: float) -> None:
    """Poll ``probe`` until it is true; StartupFailure if ``child`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupFailure(
                f"{child.name} exited with code {child.proc.returncode} before {what}"
            )
        with contextlib.suppress(OSError):
            if probe():
                return
        time.sleep(0.05)
    raise StartupFailure(f"{child.name} was not {what} within {timeout:.0f} s")


def accepts(port: int) -> Probe:
    def probe() -> bool:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True

    return probe


def redis_pings(port: int) -> Probe:
    def probe() -> bool:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    return probe


def http_ok(url: str) -> Probe:
    """GET ``url`` answers 200 (a readiness endpoint answers 503 while not ready)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False

    return probe


def start_redis(procs: Processes, *, timeout: float) -> tuple[Child, str]:
    """A throwaway redis-server (no persistence) answering PING: the child and its URL."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise StartupFailure(
            "redis-server is not on PATH; `make demo` and `make bench` install it"
            " (Debian: apt-get install redis-server)"
        )
    port = free_port()
    child = procs.start(
        "redis",
        [
            redis_server, "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(procs.workdir),
        ],
    )  # fmt: skip
    wait_until(child, "answering PING", redis_pings(port), timeout=timeout)
    return child, f"redis://{HOST}:{port}/0"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so cleanup runs as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
