"""The commands the agent runs, from the server or the local API. One table, one function each.

A command is a function `(agent, *arg, **kwarg)` registered with `@command(name)`. Its
signature and type annotations are its argument schema: `check_arguments` binds the
caller's arguments to them first, so a wrong call fails naming the argument, and a
TypeError raised inside a command is never mistaken for a bad call.
"""
from __future__ import annotations

import inspect
import logging
import platform
import socket
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from docker.errors import DockerException, NotFound

from .. import __version__
from ..deploy import LABEL_PROJECT, LABEL_UNIT

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


class CommandError(Exception):
    """The command is unknown or its arguments are wrong; the message says which."""


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable
    help: str
    signature: inspect.Signature
    hints: dict
    timeout: float  # seconds it may run when the caller sets no timeout
    # Only reads: running it twice does no harm, so the journal need not reach the disk
    # before it runs (see execution.CommandJournal).
    read_only: bool = False
    # Answers at once from memory (no engine, no disk, no lock held by anything slow): run on
    # the agent's message thread where it is decoded, sparing the hand-over to a command thread.
    instant: bool = False

    @property
    def usage(self) -> str:
        parameters = list(self.signature.parameters.values())[1:]  # without `agent`
        return f"{self.name}({', '.join(str(p) for p in parameters)})"


COMMANDS: dict[str, Command] = {}


def command(name: str, timeout: float = DEFAULT_TIMEOUT, read_only: bool = False, instant: bool = False):
    if instant and not read_only:
        raise ValueError(f"{name}: an instant command must be read-only (it is journaled without fsync)")

    def register(function):
        hints = typing.get_type_hints(function)
        hints.pop("return", None)
        COMMANDS[name] = Command(name, function, (function.__doc__ or "").strip(), inspect.signature(function), hints,
                                 timeout, read_only, instant)
        return function

    return register


def check_arguments(name, arg, kwarg) -> Command:
    """The command `name` after checking that `arg`/`kwarg` fit its signature; CommandError if not."""
    if not isinstance(name, str) or name not in COMMANDS:
        raise CommandError(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
    if not isinstance(arg, list):
        raise CommandError("arg must be a list")
    if not isinstance(kwarg, dict):
        raise CommandError("kwarg must be an object")
    entry = COMMANDS[name]
    try:
        bound = entry.signature.bind(None, *arg, **kwarg)
    except TypeError as exc:
        raise CommandError(f"{name}: bad arguments: {exc}; usage: {entry.usage}") from None
    for parameter, value in list(bound.arguments.items())[1:]:
        hint = entry.hints.get(parameter)
        if hint is not None and not _matches(value, hint):
            raise CommandError(
                f"{name}: argument {parameter!r} must be {_describe(hint)}, not {_shorten(repr(value))}; "
                f"usage: {entry.usage}"
            )
    return entry


def execute(agent, name: str, arg: list, kwarg: dict):
    """Run a command and return its value; CommandError when it cannot be run as asked."""
    return check_arguments(name, arg, kwarg).run(agent, *arg, **kwarg)


def timeout_of(name: str) -> float:
    entry = COMMANDS.get(name)
    return entry.timeout if entry else DEFAULT_TIMEOUT


def is_read_only(name: str) -> bool:
    """Whether running `name` twice is harmless (unknown names are not: they are treated with care)."""
    entry = COMMANDS.get(name)
    return entry is not None and entry.read_only


def is_instant(name: str) -> bool:
    """Whether `name` answers at once from memory, so it may run on the thread that received it."""
    entry = COMMANDS.get(name)
    return entry is not None and entry.instant


# --- the argument schema, read from annotations ------------------------------------

def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is typing.Any:
        return True
    return isinstance(value, origin or hint)


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- agent and deploys -----------------------------------------------------------------

@command("test.ping", read_only=True, instant=True)
def test_ping(agent):
    """Answer True: the agent is alive."""
    return True


@command("state.sls", timeout=900)
def state_sls(agent, sls: str, budget=None):
    """`state.sls docker.release [budget=SECONDS]`: apply the queued releases now and return their outcomes.

    With a budget no deploy starts once it is spent (one under way is finished first); the
    rest stays queued and is listed with state "queued".
    """
    if sls != "docker.release":
        raise CommandError(f"state.sls: unknown state {sls!r}; known: docker.release")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
        raise CommandError(f"state.sls: budget must be a number of seconds >= 0, not {budget!r}")
    return [outcome.as_dict() for outcome in agent.apply_queued(budget=budget)]


@command("grains.items", read_only=True)
def grains_items(agent):
    """Facts about the device: agent version, unit id, OS, engine version, releases it runs."""
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        os_name = platform.system()
    try:
        version = agent.deployer.client.version()
        engine = {"version": version.get("Version"), "api_version": version.get("ApiVersion")}
    except DockerException as exc:
        engine = {"error": f"the Docker engine does not answer: {exc}"}
    releases = {
        str(project_id): {"id": release["id"], "version": release.get("version"),
                          "version_hash": release.get("version_hash")}
        for project_id, release in sorted(agent.queue.applied_releases().items())
    }
    return {
        "agent_version": __version__,
        "unit_id": agent.unit_id,
        "hostname": socket.gethostname(),
        "os": {"name": os_name, "kernel": platform.release(), "arch": platform.machine()},
        "engine": engine,
        "releases": releases,
    }


@command("minionutil.last_logs", read_only=True, instant=True)
def last_logs(agent, num: int = 100, level: str | None = None):
    """The agent's own most recent log lines, oldest first; `level` (e.g. warning) drops quieter ones."""
    if num < 1:
        raise CommandError(f"minionutil.last_logs: num must be at least 1, not {num}")
    threshold = logging.NOTSET
    if level is not None:
        threshold = logging.getLevelName(level.upper())
        if not isinstance(threshold, int):
            raise CommandError(f"minionutil.last_logs: unknown level {level!r}; use debug, info, warning, error")
    return agent.recent_logs.lines(num, threshold)


# --- containers ----------------------------------------------------------------------
#
# Commands reach only the containers Fleet manages on this device (those its deploy engine
# labelled, see deploy.LABEL_PROJECT), whoever asks: the server or a program through the
# local API. Anything else on the engine (a database the owner runs, another tool's
# containers) is out of reach unless the device's configuration lets it in.

@dataclass(frozen=True)
class ContainerScope:
    """Which containers commands may act on: Fleet's own, plus `names`, or every one with `any_container`."""

    any_container: bool = False
    names: frozenset = frozenset()

    def allows(self, unit_id: str, name: str, labels: dict | None) -> bool:
        labels = labels or {}
        managed = LABEL_PROJECT in labels and labels.get(LABEL_UNIT) in (None, unit_id)
        return managed or self.any_container or name in self.names


def scope_of(agent) -> ContainerScope:
    return agent.config.container_scope


def _refuse_unmanaged(name: str):
    raise CommandError(
        f"container {name!r} is not managed by Fleet (it has no {LABEL_PROJECT} label of this device); "
        "commands act on it only if the device allows it (fleet-device run --commands-container NAME "
        "or --commands-any-container)"
    )


def _container(agent, name: str):
    try:
        container = agent.deployer.client.containers.get(name)
    except NotFound:
        raise CommandError(f"no container named {name!r}") from None
    if not scope_of(agent).allows(agent.unit_id, container.name, container.labels):
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
def docker_logs(agent, name: str, tail: int | str = "all", since: int | float | str | None = None,
                timestamps: bool = False):
    """A container's output (stdout and stderr); `tail` lines from the end, `since` epoch seconds or ISO 8601."""
    if tail != "all" and (not isinstance(tail, int) or tail < 0):
        raise CommandError(f"docker.logs: tail must be a number of lines or 'all', not {tail!r}")
    logs = _container(agent, name).logs(stdout=True, stderr=True, tail=tail, since=_since(since),
                                        timestamps=timestamps)
    return logs.decode("utf-8", errors="replace")


@command("docker.ps", read_only=True)
def docker_ps(agent, all: bool = False, label: str | list[str] | None = None):
    """Containers commands may act on (running ones unless `all`), optionally only those with the label(s)
    KEY or KEY=VALUE."""
    labels = [label] if isinstance(label, str) else list(label or [])
    scope = scope_of(agent)
    if not scope.any_container and not scope.names:
        labels.append(LABEL_PROJECT)  # the engine filters; the unit label is checked below
    listed = agent.deployer.client.api.containers(all=all, filters={"label": labels} if labels else None)
    summaries = [summary for summary in listed
                 if scope.allows(agent.unit_id, (summary.get("Names") or ["?"])[0].lstrip("/"), summary.get("Labels"))]
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
def docker_inspect(agent, name: str):
    """Everything the engine knows about a container (one Fleet manages, or the device allows)."""
    try:
        attributes = agent.deployer.client.api.inspect_container(name)
    except NotFound:
        raise CommandError(f"no container named {name!r}") from None
    if not scope_of(agent).allows(agent.unit_id, attributes.get("Name", "").lstrip("/"),
                                  (attributes.get("Config") or {}).get("Labels")):
        _refuse_unmanaged(name)
    return attributes


def _status(container) -> dict:
    container.reload()
    return {"name": container.name, "status": container.status}


@command("docker.restart")
def docker_restart(agent, name: str, timeout: int = 10):
    """Restart a container; `timeout` seconds for it to stop before it is killed."""
    container = _container(agent, name)
    container.restart(timeout=timeout)
    return _status(container)


@command("docker.stop")
def docker_stop(agent, name: str, timeout: int = 10):
    """Stop a container; `timeout` seconds before it is killed."""
    container = _container(agent, name)
    container.stop(timeout=timeout)
    return _status(container)


@command("docker.start")
def docker_start(agent, name: str):
    """Start a stopped container."""
    container = _container(agent, name)
    container.start()
    return _status(container)
