"""The registry of the commands the agent runs, from the server or the local API: one table, one function each.

A command is a function `(context, *arg, **kwarg)` registered with `@command(name)`; the
context (context.py) is all of the device a command may reach. Its
signature and type annotations are its argument schema: `check_arguments` binds the
caller's arguments to them first, so a wrong call fails naming the argument, and a
TypeError raised inside a command is never mistaken for a bad call.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from typing import Callable

from .context import CommandContext

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
        parameters = list(self.signature.parameters.values())[1:]  # without `context`
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


def execute(context: CommandContext | None, name: str, arg: list, kwarg: dict):
    """Run a command and return its value; CommandError when it cannot be run as asked."""
    return check_arguments(name, arg, kwarg).run(context, *arg, **kwarg)


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
