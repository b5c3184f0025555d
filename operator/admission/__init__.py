"""The mutating admission webhook (sidecar injection, TLS from rotating files) and the check
for Services that bypass the sidecar. Runs on every replica; the bypass check on the leader."""
