"""Reading the money: ledger entries, usage totals, the audit, settlement state, abnormal spend.

Plain functions over a ``redis.asyncio`` client (single or Cluster); the CLI, the operator and
the sidecar call them. Nothing here imports kopf or aiohttp.
"""
