"""Every port a replica listens on, bound before anything starts (a port in use is one clear
line and exit 1, with nothing started)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from spendgate.listening import ListenError, bind_listener

from .settings import OperatorSettings

# A long-running coroutine every replica runs beside kopf (the admission webhook); one with a
# ``bind(settings)`` method binds its port in :func:`bind_ports`, ``release()`` undoes it.
Service = Callable[[OperatorSettings], Coroutine[Any, Any, None]]


@dataclass
class Listeners:
    """The sockets :func:`bind_ports` bound, handed to the servers that use them."""

    health: socket.socket | None = None
    stripe: socket.socket | None = None  # the Stripe webhook receiver's

    def close(self) -> None:
        for sock in (self.health, self.stripe):
            if sock is not None:
                sock.close()


def bind_ports(
    settings: OperatorSettings, services: Sequence[Service], *, health: bool
) -> Listeners:
    """Every port this replica listens on, bound before anything starts or says it started:
    the health endpoints', the Stripe webhook receiver's (with Stripe enabled) and each
    service's with a ``bind`` method (the admission webhook). A port in use is a
    :class:`ListenError`, with nothing left bound."""
    bound = Listeners()
    try:
        if health:
            what = "the operator's health endpoints"
            bound.health = bind_listener(settings.health_host, settings.health_port, what=what)
        stripe = settings.stripe
        if stripe is not None and stripe.enabled:
            # Reserved, not listening: until its keys are read, Stripe's deliveries are refused
            # (and retried), not left hanging.
            what = "the Stripe webhook receiver"
            bound.stripe = bind_listener(
                stripe.webhook_host, stripe.webhook_port, what=what, listen=False
            )
        for service in services:
            bind = getattr(service, "bind", None)
            if callable(bind):
                bind(settings)
    except ListenError:
        bound.close()
        for service in services:
            release = getattr(service, "release", None)
            if callable(release):
                release()
        raise
    return bound


__all__ = ["Listeners", "Service", "bind_ports"]
