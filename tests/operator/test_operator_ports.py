"""The operator binds every port it serves before it starts anything: a port in use is one
line from ``spendgate operator`` (exit 1), never a traceback after a start-up line."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from spendgate.listening import ListenError
from spendgate.operator.admission.services import AdmissionService
from spendgate.operator.runtime.listeners import bind_ports
from spendgate.operator.runtime.main import run_operator
from spendgate.operator.runtime.settings import OperatorSettings
from spendgate.operator.stripe.settings import StripeSettings


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_spendgate_operator_on_a_port_in_use_is_one_line(busy_port: int) -> None:
    process = subprocess.run(
        [
            *(sys.executable, "-m", "spendgate.cli", "operator", "--no-leader-election"),
            *("--health-port", str(busy_port), "--redis", "redis://127.0.0.1:9/0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SPENDGATE_LOG_FORMAT": "text"},
    )
    assert process.returncode == 1, process.stderr
    assert process.stderr.splitlines()[-1] == (
        f"spendgate operator: cannot listen on 0.0.0.0:{busy_port} for the operator's health"
        " endpoints: the address is already in use (another process listens on that port)"
    )
    assert "Traceback" not in process.stderr and "operator starting" not in process.stderr


def test_a_busy_webhook_port_releases_the_health_port(busy_port: int) -> None:
    health = free_port()
    settings = OperatorSettings(health_host="127.0.0.1", health_port=health, webhook_port=busy_port)
    admission = AdmissionService()
    with pytest.raises(ListenError, match=f"0.0.0.0:{busy_port} for the admission webhook"):
        bind_ports(settings, [admission], health=True)
    assert admission.sock is None
    with socket.socket() as again:  # nothing was left holding the health port
        again.bind(("127.0.0.1", health))


def test_both_ports_bound_then_handed_over() -> None:
    settings = OperatorSettings(
        health_host="127.0.0.1", health_port=0, webhook_host="127.0.0.1", webhook_port=0
    )
    admission = AdmissionService()
    listeners = bind_ports(settings, [admission], health=True)
    try:
        assert listeners.health is not None and admission.sock is not None
        assert listeners.health.getsockname()[1] != admission.sock.getsockname()[1]
        assert listeners.stripe is None  # Stripe is not enabled
    finally:
        listeners.close()
        admission.release()
    assert admission.sock is None


def test_the_stripe_receivers_port_is_bound_first_too(busy_port: int) -> None:
    health = free_port()
    stripe = StripeSettings(enabled=True, webhook_host="127.0.0.1", webhook_port=busy_port)
    settings = OperatorSettings(health_host="127.0.0.1", health_port=health, stripe=stripe)
    with pytest.raises(ListenError, match="for the Stripe webhook receiver: the address is"):
        bind_ports(settings, [], health=True)
    with socket.socket() as again:
        again.bind(("127.0.0.1", health))


async def test_run_operator_says_nothing_started_when_a_port_is_taken(
    busy_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = OperatorSettings(health_port=busy_port)
    with pytest.raises(ListenError):
        await run_operator(settings, services=[])
    assert not [r for r in caplog.records if "start" in r.getMessage()]
