"""The deploy engine's one exception, and how an engine error reads in a report."""
from __future__ import annotations

import requests
from docker.errors import APIError, DockerException

# Errors that mean "the engine (or its socket) did not do what was asked".
ENGINE_ERRORS = (DockerException, requests.RequestException, OSError)


class DeployError(Exception):
    """A deploy step failed; `step` names it for the report, `reason` says why."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def reason(exc: Exception) -> str:
    """One line saying why an engine call failed."""
    if isinstance(exc, requests.ConnectionError) or "Connection aborted" in str(exc):
        return f"the Docker engine does not answer ({exc})"
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
