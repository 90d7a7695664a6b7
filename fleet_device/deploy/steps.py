"""The steps of a deploy: one small frozen type per action, each knowing its phase.

A plan is a list of these; the executor looks each type up in its table of actions. `target`
is what a step acts on (a registry host, an image reference, a container name or a host path),
for reports and logs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

# Phases of a step: prepare changes nothing, change is undone on failure, commit runs only
# once the new containers are verified and is never undone.
PREPARE, CHANGE, VERIFY, COMMIT = "prepare", "change", "verify", "commit"


class Step:
    """What every step says about itself: its action, phase, target and the progress it reports."""

    action: ClassVar[str]
    phase: ClassVar[str]
    progress: ClassVar[str | None] = None  # the progress state reported when a step of this kind begins

    @property
    def target(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.action} {self.target}".strip()


@dataclass(frozen=True)
class Login(Step):
    """Log in to a registry before pulling from it."""

    host: str
    action: ClassVar[str] = "login"
    phase: ClassVar[str] = PREPARE
    progress: ClassVar[str] = "pulling"

    @property
    def target(self) -> str:
        return self.host


@dataclass(frozen=True)
class Pull(Step):
    """Pull an image reference the engine does not hold."""

    reference: str
    action: ClassVar[str] = "pull"
    phase: ClassVar[str] = PREPARE
    progress: ClassVar[str] = "pulling"

    @property
    def target(self) -> str:
        return self.reference


@dataclass(frozen=True)
class Stop(Step):
    """Stop a container the release replaces; renamed when its name is wanted by the replacement."""

    name: str
    rename_to: str | None = None
    initial: bool = False  # a container named in remove_containers, not one of the project's
    action: ClassVar[str] = "stop"
    phase: ClassVar[str] = CHANGE
    progress: ClassVar[str] = "stopping"

    @property
    def target(self) -> str:
        return self.name


@dataclass(frozen=True)
class Purge(Step):
    """Move a purge_data bind directory's content aside, so the new container starts on an empty one."""

    path: str
    action: ClassVar[str] = "purge"
    phase: ClassVar[str] = CHANGE
    progress: ClassVar[str] = "stopping"

    @property
    def target(self) -> str:
        return self.path


@dataclass(frozen=True)
class Start(Step):
    """Create and start one container of the release."""

    name: str
    image: str  # the image reference to run
    spec: dict = field(hash=False)  # the release's container entry
    action: ClassVar[str] = "start"
    phase: ClassVar[str] = CHANGE
    progress: ClassVar[str] = "starting"

    @property
    def target(self) -> str:
        return self.name


@dataclass(frozen=True)
class Verify(Step):
    """Watch the new containers until they have run (and are healthy) long enough."""

    names: tuple[str, ...]
    action: ClassVar[str] = "verify"
    phase: ClassVar[str] = VERIFY
    progress: ClassVar[str] = "verifying"

    @property
    def target(self) -> str:
        return ""


@dataclass(frozen=True)
class Remove(Step):
    """Remove a replaced container once the new release is verified."""

    name: str
    action: ClassVar[str] = "remove"
    phase: ClassVar[str] = COMMIT

    @property
    def target(self) -> str:
        return self.name


@dataclass(frozen=True)
class DropBackup(Step):
    """Delete the content a purge moved aside, once the new release is verified."""

    path: str
    action: ClassVar[str] = "drop_backup"
    phase: ClassVar[str] = COMMIT

    @property
    def target(self) -> str:
        return self.path


@dataclass(frozen=True)
class Prune(Step):
    """Remove an image the project used before and nothing on the device needs any more."""

    reference: str
    action: ClassVar[str] = "prune"
    phase: ClassVar[str] = COMMIT

    @property
    def target(self) -> str:
        return self.reference


STEP_TYPES: dict[str, type[Step]] = {kind.action: kind for kind in
                                     (Login, Pull, Stop, Purge, Start, Verify, Remove, DropBackup, Prune)}
