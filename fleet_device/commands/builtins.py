"""The commands every agent has: pings, facts, its own logs, deploys on request, and the containers it manages."""
from __future__ import annotations

import logging
import platform
import socket
from datetime import datetime

from docker.errors import DockerException, NotFound

from .. import __version__
from ..deploy import LABEL_PROJECT
from .context import CommandContext
from .registry import CommandError, command

log = logging.getLogger(__name__)


# --- agent and deploys -----------------------------------------------------------------

@command("test.ping", read_only=True, instant=True)
def test_ping(context: CommandContext):
    """Answer True: the agent is alive."""
    return True


@command("state.sls", timeout=900)
def state_sls(context: CommandContext, sls: str, budget=None):
    """`state.sls docker.release [budget=SECONDS]`: apply the queued releases now and return their outcomes.

    With a budget no deploy starts once it is spent (one under way is finished first); the
    rest stays queued and is listed with state "queued".
    """
    if sls != "docker.release":
        raise CommandError(f"state.sls: unknown state {sls!r}; known: docker.release")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
        raise CommandError(f"state.sls: budget must be a number of seconds >= 0, not {budget!r}")
    return [outcome.as_dict() for outcome in context.apply_queued(budget=budget)]


@command("grains.items", read_only=True)
def grains_items(context: CommandContext):
    """Facts about the device: agent version, unit id, OS, engine version, releases it runs."""
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        os_name = platform.system()
    try:
        version = context.docker().version()
        engine = {"version": version.get("Version"), "api_version": version.get("ApiVersion")}
    except DockerException as exc:
        engine = {"error": f"the Docker engine does not answer: {exc}"}
    releases = {
        str(project_id): {"id": release["id"], "version": release.get("version"),
                          "version_hash": release.get("version_hash")}
        for project_id, release in sorted(context.releases.applied_releases().items())
    }
    return {
        "agent_version": __version__,
        "unit_id": context.unit_id,
        "hostname": socket.gethostname(),
        "os": {"name": os_name, "kernel": platform.release(), "arch": platform.machine()},
        "engine": engine,
        "releases": releases,
    }


@command("minionutil.last_logs", read_only=True, instant=True)
def last_logs(context: CommandContext, num: int = 100, level: str | None = None):
    """The agent's own most recent log lines, oldest first; `level` (e.g. warning) drops quieter ones."""
    if num < 1:
        raise CommandError(f"minionutil.last_logs: num must be at least 1, not {num}")
    threshold = logging.NOTSET
    if level is not None:
        threshold = logging.getLevelName(level.upper())
        if not isinstance(threshold, int):
            raise CommandError(f"minionutil.last_logs: unknown level {level!r}; use debug, info, warning, error")
    return context.recent_logs.lines(num, threshold)


# --- containers ----------------------------------------------------------------------
#
# Commands reach only the containers Fleet manages on this device (those its deploy engine
# labelled, see deploy.LABEL_PROJECT), whoever asks: the server or a program through the
# local API. Anything else on the engine (a database the owner runs, another tool's
# containers) is out of reach unless the device's configuration lets it in.

def _refuse_unmanaged(name: str):
    raise CommandError(
        f"container {name!r} is not managed by Fleet (it has no {LABEL_PROJECT} label of this device); "
        "commands act on it only if the device allows it (fleet-device run --commands-container NAME "
        "or --commands-any-container)"
    )


def _container(context: CommandContext, name: str):
    try:
        container = context.docker().containers.get(name)
    except NotFound:
        raise CommandError(f"no container named {name!r}") from None
    if not context.container_scope.allows(context.unit_id, container.name, container.labels):
        _refuse_unmanaged(name)
    return container


def _since(value):
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"docker.logs: since must be epoch seconds or ISO 8601, not {value!r}") from None


@command("docker.logs", read_only=True)
def docker_logs(context: CommandContext, name: str, tail: int | str = "all", since: int | float | str | None = None,
                timestamps: bool = False):
    """A container's output (stdout and stderr); `tail` lines from the end, `since` epoch seconds or ISO 8601."""
    if tail != "all" and (not isinstance(tail, int) or tail < 0):
        raise CommandError(f"docker.logs: tail must be a number of lines or 'all', not {tail!r}")
    logs = _container(context, name).logs(stdout=True, stderr=True, tail=tail, since=_since(since),
                                        timestamps=timestamps)
    return logs.decode("utf-8", errors="replace")


@command("docker.ps", read_only=True)
def docker_ps(context: CommandContext, all: bool = False, label: str | list[str] | None = None):
    """Containers commands may act on (running ones unless `all`), optionally only those with the label(s)
    KEY or KEY=VALUE."""
    labels = [label] if isinstance(label, str) else list(label or [])
    scope = context.container_scope
    if not scope.any_container and not scope.names:
        labels.append(LABEL_PROJECT)  # the engine filters; the unit label is checked below
    listed = context.docker().api.containers(all=all, filters={"label": labels} if labels else None)
    summaries = [summary for summary in listed
                 if scope.allows(context.unit_id, (summary.get("Names") or ["?"])[0].lstrip("/"),
                                 summary.get("Labels"))]
    return [
        {
            "id": summary["Id"][:12],
            "name": (summary.get("Names") or ["?"])[0].lstrip("/"),
            "image": summary.get("Image"),
            "state": summary.get("State"),
            "status": summary.get("Status"),
            "labels": summary.get("Labels") or {},
            "created": summary.get("Created"),
        }
        for summary in summaries
    ]


@command("docker.inspect", read_only=True)
def docker_inspect(context: CommandContext, name: str):
    """Everything the engine knows about a container (one Fleet manages, or the device allows)."""
    try:
        attributes = context.docker().api.inspect_container(name)
    except NotFound:
        raise CommandError(f"no container named {name!r}") from None
    if not context.container_scope.allows(context.unit_id, attributes.get("Name", "").lstrip("/"),
                                  (attributes.get("Config") or {}).get("Labels")):
        _refuse_unmanaged(name)
    return attributes


def _status(container) -> dict:
    container.reload()
    return {"name": container.name, "status": container.status}


@command("docker.restart")
def docker_restart(context: CommandContext, name: str, timeout: int = 10):
    """Restart a container; `timeout` seconds for it to stop before it is killed."""
    container = _container(context, name)
    container.restart(timeout=timeout)
    return _status(container)


@command("docker.stop")
def docker_stop(context: CommandContext, name: str, timeout: int = 10):
    """Stop a container; `timeout` seconds before it is killed."""
    container = _container(context, name)
    container.stop(timeout=timeout)
    return _status(container)


@command("docker.start")
def docker_start(context: CommandContext, name: str):
    """Start a stopped container."""
    container = _container(context, name)
    container.start()
    return _status(container)
