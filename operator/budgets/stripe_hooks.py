"""What reconciling a budget asks of Stripe (implemented by operator/stripe/wiring.py, which
sits beside this package: the budgets only know this Protocol)."""

from __future__ import annotations

from typing import Any, Protocol


class StripeHooks(Protocol):
    """Stripe's part of reconciling a budget; Redis errors propagate (retried)."""

    async def link(self, spec: Any) -> str | None:
        """Record the budget's Stripe link (or drop it: no ``spec.stripe``); a message when
        another budget holds the Stripe customer (nothing is linked then)."""
        ...

    async def status(self, spec: Any) -> dict[str, Any]:
        """``lastStripeSync``, ``exportLagSeconds``, ``exchangeRate`` (None when not linked)."""
        ...

    async def unlink(self, customer_id: str) -> None:
        """The budget is deleted: release its link once its usage is exported."""
        ...


__all__ = ["StripeHooks"]
