"""The deploy journal: per project, the deploy in progress, its steps and how far each got.

Layout: `<state_dir>/projects/<project_id>/journal.json`, rewritten atomically before and after
every step, so after a crash or power loss the agent knows exactly what to undo. `DeployRecord`
is the one declaration of that file; a step is stored flat, every field present (`StepEntry`),
as agents have always written it, so a journal left by an older agent is recovered by a newer
one and the other way round.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import msgspec

from ..state import write_atomically
from .steps import STEP_TYPES, Step

log = logging.getLogger(__name__)

# Journal phases. Terminal ones only wait for the agent to record the outcome.
CHANGING, ROLLING_BACK, COMMITTING, SUCCEEDED, ROLLED_BACK = (
    "changing", "rolling_back", "committing", "succeeded", "rolled_back")
TERMINAL_PHASES = (SUCCEEDED, ROLLED_BACK)

# Progress of one step.
STARTED, DONE, UNDONE = "started", "done", "undone"


class StepEntry(msgspec.Struct):
    """A step as the journal stores it: its action, target and phase, and every other field of every step type.

    A step type's fields are stored under their own names when this declares them, and its one
    other field (a container name, image reference, host or path) is the `target`.
    """

    action: str
    target: str
    phase: str
    image: str | None = None
    spec: dict[str, Any] | None = None
    rename_to: str | None = None
    initial: bool = False
    names: list[str] = []

    @classmethod
    def of(cls, step: Step) -> StepEntry:
        own = {f.name: getattr(step, f.name) for f in dataclasses.fields(step) if f.name in _STORED_BY_NAME}
        if "names" in own:
            own["names"] = list(own["names"])
        return cls(action=step.action, target=step.target, phase=step.phase, **own)

    def to_step(self) -> Step:
        kind = STEP_TYPES.get(self.action)
        if kind is None:
            raise ValueError(f"unknown deploy step {self.action!r}")
        own = {f.name: getattr(self, f.name) if f.name in _STORED_BY_NAME else self.target
               for f in dataclasses.fields(kind)}
        if "names" in own:
            own["names"] = tuple(own["names"])
        return kind(**own)


_STORED_BY_NAME = frozenset(StepEntry.__struct_fields__) - {"action", "target", "phase"}


class StepProgress(msgspec.Struct, omit_defaults=True):
    """How far a step got, and what its undo needs to know, read before it acted."""

    status: str  # started | done | undone
    existed: bool | None = None  # stop: the container was there
    was_running: bool | None = None  # stop: and running, so the undo starts it again
    cleared: bool | None = None  # purge undo: what the new container wrote is gone already


class Failure(msgspec.Struct, omit_defaults=True):
    step: str | None
    reason: str
    interrupted: bool = False  # the agent stopped mid-deploy: nothing failed, it was rolled back


class DeployRecord(msgspec.Struct):
    """One project's deploy in progress. `context` is the caller's (the release message), kept for recovery."""

    project_id: int
    release_id: int | None
    version_hash: str | None
    context: Any
    phase: str
    steps: list[StepEntry]
    progress: dict[str, StepProgress] = {}  # by the step's index, as text
    failure: Failure | None = None
    started_at: float = 0.0

    @classmethod
    def begin(cls, project_id: int, release: dict | None, steps: list[Step], context) -> DeployRecord:
        return cls(project_id=project_id, release_id=release["id"] if release else None,
                   version_hash=release["version_hash"] if release else None, context=context, phase=CHANGING,
                   steps=[StepEntry.of(step) for step in steps], progress={}, failure=None, started_at=time.time())

    def step(self, index: int) -> Step:
        return self.steps[index].to_step()

    def progress_of(self, index: int) -> StepProgress | None:
        return self.progress.get(str(index))

    def set_progress(self, index: int, progress: StepProgress):
        self.progress[str(index)] = progress

    def begun(self) -> list[int]:
        """The indexes of the steps that began, in order."""
        return sorted(int(index) for index in self.progress)

    @property
    def settled(self) -> bool:
        return self.phase in TERMINAL_PHASES


_decoder = msgspec.json.Decoder(DeployRecord)
_encoder = msgspec.json.Encoder()


class DeployJournal:
    """The journals of every project, one file each."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "projects"

    def _path(self, project_id: int) -> Path:
        return self.root / str(int(project_id)) / "journal.json"

    def save(self, record: DeployRecord):
        write_atomically(self._path(record.project_id), _encoder.encode(record))

    def load(self, project_id: int) -> DeployRecord | None:
        return self._read(self._path(project_id))

    def discard(self, project_id: int):
        self._path(project_id).unlink(missing_ok=True)

    def records(self) -> list[DeployRecord]:
        """Every journal on disk, by project id."""
        if not self.root.is_dir():
            return []
        found = []
        for directory in sorted(self.root.iterdir(), key=lambda p: (len(p.name), p.name)):
            record = self._read(directory / "journal.json") if directory.name.isdigit() else None
            if record is not None:
                found.append(record)
        return found

    @staticmethod
    def _read(path: Path) -> DeployRecord | None:
        """The record in `path`; None when missing or unreadable (logged: the deploy it held cannot be resumed)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("ignoring unreadable deploy journal %s: %s", path, exc)
            return None
        try:
            record = _decoder.decode(data)
            for entry in record.steps:
                entry.to_step()
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            log.error("ignoring unreadable deploy journal %s: %s", path, exc)
            return None
        return record
