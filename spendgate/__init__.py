"""spendgate: hard spend caps in front of GPU inference."""

__version__ = "0.1.0"
