"""Outgoing alerts: Slack-compatible JSON to a webhook URL, retried, never blocking."""
