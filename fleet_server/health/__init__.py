"""Liveness and readiness, the one endpoint without a token."""
