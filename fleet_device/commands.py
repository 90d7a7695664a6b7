"""The commands the agent runs, from the server or the local API. One table, one function each."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


class CommandError(Exception):
    """The command is unknown or its arguments are wrong; the message says which."""


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable
    help: str


COMMANDS: dict[str, Command] = {}


def command(name: str):
    def register(function):
        COMMANDS[name] = Command(name, function, (function.__doc__ or "").strip())
        return function

    return register


def execute(agent, name: str, arg: list, kwarg: dict):
    """Run a command and return its value; CommandError when it cannot be run as asked."""
    if not isinstance(name, str) or name not in COMMANDS:
        raise CommandError(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
    if not isinstance(arg, list):
        raise CommandError("arg must be a list")
    if not isinstance(kwarg, dict):
        raise CommandError("kwarg must be an object")
    try:
        return COMMANDS[name].run(agent, *arg, **kwarg)
    except TypeError as exc:
        raise CommandError(f"{name}: bad arguments: {exc}") from None


@command("test.ping")
def test_ping(agent):
    """Answer True: the agent is alive."""
    return True


@command("state.sls")
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
