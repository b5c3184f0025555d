"""PriceBook reconciliation: validate, store in Redis, report Ready."""
