"""kopf's settings for production (documented in docs/operator.md, "kopf settings")."""

from __future__ import annotations

import logging
import socket

import kopf

from .settings import OperatorSettings

PREFIX = "spendgate.dev"  # kopf's progress and diff-base annotations: spendgate.dev/...
FINALIZER = "spendgate.dev/finalizer"


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
    # A deleted object keeps its finalizer until its timers have exited; kopf checks again
    # every ``cancellation_polling`` seconds (60 by default: a minute in Terminating).
    ks.background.cancellation_polling = 1.0
    ks.queueing.worker_limit = settings.max_workers
    # No kopf peering: the Lease (operator/runtime/leading.py) decides which replica runs kopf.
    ks.peering.standalone = True
    ks.peering.mandatory = False
    # Watching namespaces by name: kopf would list and watch every Namespace to follow them
    # (cluster-wide rights the chart's Roles do not grant: "forbidden" at every start). The
    # names are exact, so there is nothing to follow; CRDs are then found once, at start.
    ks.scanning.disabled = bool(settings.namespaces)


__all__ = ["FINALIZER", "PREFIX", "configure_kopf"]
