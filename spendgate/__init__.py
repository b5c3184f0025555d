"""spendgate: hard spend caps in front of GPU inference."""

__version__ = "0.1.0"

# Installs the logger class that keeps ``extra`` fields from clashing with LogRecord
# attributes, before any spendgate module asks for its logger.
from . import logs as _logs  # noqa: F401
