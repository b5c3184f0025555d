"""CustomerBudget reconciliation: parse and check the spec, apply it to Redis, then status,
conditions, Events and alerts. Plain functions; the kopf handlers live in runtime/."""
