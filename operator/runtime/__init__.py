"""The running operator: settings and flags, the kopf handlers, leader election, health and
metrics, and main, which starts it all. The top layer: it imports every other sub-package."""
