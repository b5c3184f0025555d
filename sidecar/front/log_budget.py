"""Log lines a client can cause, within a budget: a burst, then a steady rate.

Lines over budget are counted, not written; the next line written says how many were dropped
(``suppressed``), so a flood costs one line a tick instead of one line a request.
"""

from __future__ import annotations

import logging
import time
from typing import Any


class LogBudget:
    def __init__(self, logger: logging.Logger, *, per_second: float = 5.0, burst: int = 20) -> None:
        self.logger = logger
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def log(self, level: int, msg: str, extra: dict[str, Any], **kwargs: Any) -> bool:
        """Writes the line if the budget allows; returns whether it did."""
        if not self.logger.isEnabledFor(level) or not self.allow():
            return False
        if self.suppressed:
            extra = {**extra, "suppressed": self.suppressed}
            self.suppressed = 0
        self.logger.log(level, msg, extra=extra, **kwargs)
        return True
