"""A log call can never fail because of its fields: ``extra`` may use any name."""

from __future__ import annotations

import importlib
import io
import json
import logging
import pkgutil

from spendgate.logs import FieldSafeLogger, JsonFormatter, RedactingFilter

# The operator and the sidecar are installed as sub-packages from folders of their own.
PACKAGES = ("spendgate", "spendgate.operator", "spendgate.sidecar")


def _spendgate_loggers() -> dict[str, logging.Logger]:
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        for module in pkgutil.walk_packages(path, f"{package}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    return {
        name: logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith("spendgate") and isinstance(logger, logging.Logger)
    }


def test_every_spendgate_logger_accepts_any_field_name() -> None:
    loggers = _spendgate_loggers()
    assert len(loggers) > 20, sorted(loggers)
    plain = [name for name, logger in loggers.items() if not isinstance(logger, FieldSafeLogger)]
    assert not plain, f"loggers made before spendgate.logs installed its class: {plain}"


def test_a_field_named_like_a_record_attribute_is_kept_under_its_own_name() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("spendgate.test.fields")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("imported", extra={"created": 2, "name": "acme", "msg": "x", "ok": 1})
    finally:
        logger.removeHandler(handler)
    entry = json.loads(out.getvalue())
    assert entry["msg"] == "imported"
    assert entry["logger"] == "spendgate.test.fields"
    assert (entry["created_"], entry["name_"], entry["msg_"], entry["ok"]) == (2, "acme", "x", 1)
