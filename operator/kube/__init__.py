"""The Kubernetes API as the operator sees it: the one client (Secrets, Events, Leases,
annotations, listing), metav1 conditions, reading kopf bodies, and the temporary failures a
reconciliation retries. Below every other sub-package but alerts; imports only the core."""
