"""Stripe: money in (funding), usage out (meter events), access from billing state."""
