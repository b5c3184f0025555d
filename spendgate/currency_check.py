"""A budget's currency against the PriceBooks that price its requests, checked where both are
known (``spendgate apply``; the operator's budget conditions).

The ledger compares currencies exactly: a request priced in a currency other than the budget's
is refused (500 ``billing_misconfigured``) on every call. So a budget whose currency no PriceBook
charges in -- or ``usd`` where the PriceBooks say ``USD`` -- is an error when it is applied, not
a surprise at the first request.
"""

from __future__ import annotations

from collections.abc import Mapping

from .models import CustomerBudget


def currency_problems(budget: CustomerBudget, pricebooks: Mapping[str, str]) -> list[str]:
    """Problems (``field: message``) of ``budget`` given ``pricebooks``: every PriceBook known,
    as ``namespace/name`` -> currency.

    With ``spec.priceBooks`` each named PriceBook must be known and charge in the budget's
    currency; without, at least one known PriceBook must (none known: nothing to check yet).
    """
    spec = budget.spec
    problems: list[str] = []
    if spec.price_books:
        for index, name in enumerate(spec.price_books):
            ref = f"{budget.metadata.namespace}/{name}"
            currency = pricebooks.get(ref)
            if currency is None:
                problems.append(
                    f"spec.priceBooks[{index}]: PriceBook {ref} is neither in the input nor"
                    " configured in Redis (apply it first, or in the same command)"
                )
            elif currency != spec.currency:
                problems.append(
                    f"spec.priceBooks[{index}]: PriceBook {ref} charges in {currency!r}, the"
                    f" budget is in {spec.currency!r}{_same_letters(spec.currency, [currency])};"
                    " every request it prices would be refused"
                )
        return problems
    currencies = sorted(set(pricebooks.values()))
    if not currencies or spec.currency in currencies:
        return problems
    return [
        f"spec.currency: {spec.currency!r} is charged by no PriceBook (they charge in"
        f" {', '.join(repr(c) for c in currencies)}){_same_letters(spec.currency, currencies)};"
        " every request of this customer would be refused"
    ]


def _same_letters(currency: str, others: list[str]) -> str:
    """A hint when only the letter case differs: currencies are compared exactly."""
    close = [other for other in others if other.lower() == currency.lower()]
    if not close:
        return ""
    return f" -- did you mean {close[0]!r}? currencies are compared exactly"


__all__ = ["currency_problems"]
