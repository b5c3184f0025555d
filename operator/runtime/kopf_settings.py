"""kopf's settings for production (documented in docs/operator.md, "kopf settings")."""

from __future__ import annotations

import logging
import random
import socket

import kopf

from .settings import OperatorSettings

PREFIX = "spendgate.dev"  # kopf's progress and diff-base annotations: spendgate.dev/...
FINALIZER = "spendgate.dev/finalizer"


def default_priority() -> int:
    """A random peering priority: replicas differ, so exactly one of them is active."""
    return random.SystemRandom().randint(1, 2**30)


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """kopf settings for production (documented in docs/operator.md, "kopf settings")."""
    ks = kopf_settings
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX, v1=False)
    ks.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration", v1=False
    )
    ks.persistence.finalizer = FINALIZER
    ks.posting.enabled = True
    ks.posting.loggers = False  # only the Events the handlers post on purpose
    ks.posting.level = logging.INFO  # Normal and Warning Events
    ks.posting.reporting_component = "spendgate-operator"
    ks.posting.reporting_instance = settings.pod_name or socket.gethostname()
    ks.posting.event_name_prefix = "spendgate-"
    ks.networking.connect_timeout = 10
    ks.networking.request_timeout = 60
    ks.watching.connect_timeout = 10
    ks.watching.server_timeout = 300  # the API server ends each watch after 5 minutes
    ks.watching.client_timeout = 330
    ks.process.ultimate_exiting_timeout = 60
    ks.queueing.worker_limit = settings.max_workers
    ks.peering.name = settings.peering
    ks.peering.clusterwide = True  # one ClusterKopfPeering, also for namespaced operators
    ks.peering.standalone = settings.peering_standalone
    ks.peering.mandatory = not settings.peering_standalone
    ks.peering.priority = (
        settings.peering_priority if settings.peering_priority is not None else default_priority()
    )
    ks.peering.lifetime = settings.peering_lifetime_s
    ks.peering.stealth = True  # keep-alives are not logged


__all__ = ["FINALIZER", "PREFIX", "configure_kopf", "default_priority"]
