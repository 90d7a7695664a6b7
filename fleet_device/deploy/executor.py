"""Carrying out deploy steps: a table of actions, each step type → what does it and what undoes it.

Every step is journalled before and after it acts. When one fails, `undo_all` undoes what began,
newest first; `commit` runs the clean-up steps once the new containers are verified, and those
are never undone.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import fleet_wire as wire
from docker.errors import APIError, ImageNotFound, NotFound

from .docker_engine import LABEL_CONTAINER, LABEL_HASH, LABEL_PROJECT, LABEL_RELEASE, LABEL_UNIT, DockerEngine
from .errors import ENGINE_ERRORS, DeployError, reason
from .journal import COMMITTING, DONE, STARTED, SUCCEEDED, UNDONE, DeployJournal, DeployRecord, StepProgress
from .steps import COMMIT, DropBackup, Login, Prune, Pull, Purge, Remove, Start, Step, Stop, Verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    settle_seconds: float = 10.0  # how long new containers must keep running before they count as verified
    health_timeout: float = 60.0  # how long a healthcheck may take to say healthy
    stop_timeout: int = 10  # the grace a stopped container gets before it is killed


@dataclass
class Deploy:
    """What an action works with: the engine, the deploy's journal record and the timing settings."""

    engine: DockerEngine
    record: DeployRecord
    journal: DeployJournal
    timing: Timing

    def save(self):
        self.journal.save(self.record)


class Action(NamedTuple):
    do: Callable[[Deploy, Step], None]
    # undo(deploy, step, progress): called for a step that began, even if it did not finish.
    undo: Callable[[Deploy, Step, StepProgress], None] | None = None
    # facts(deploy, step): what the undo needs to know, read before the step acts.
    facts: Callable[[Deploy, Step], dict] | None = None


# --- the actions ------------------------------------------------------------------


def login(deploy: Deploy, step: Login):
    registry = deploy.engine.credentials(step.host)
    if registry is None:
        raise DeployError("login", f"no credentials for registry {step.host}")
    deploy.engine.login(step.host, registry)


def pull(deploy: Deploy, step: Pull):
    repository, _, tag = step.reference.rpartition(":")
    registry = deploy.engine.credentials(repository.split("/", 1)[0])
    auth = {"username": registry["username"], "password": registry["password"]} if registry else None
    try:
        deploy.engine.client.images.pull(repository, tag=tag, auth_config=auth)
        deploy.engine.client.images.get(step.reference)
    except ENGINE_ERRORS as exc:
        raise DeployError("pull", f"cannot pull {step.reference}: {reason(exc)}") from None


def stop_facts(deploy: Deploy, step: Stop) -> dict:
    try:
        container = deploy.engine.client.containers.get(step.name)
    except NotFound:
        return {"existed": False, "was_running": False}
    except ENGINE_ERRORS as exc:
        raise DeployError("stop", f"cannot inspect {step.name}: {reason(exc)}") from None
    return {"existed": True, "was_running": container.status in ("running", "restarting")}


def stop(deploy: Deploy, step: Stop):
    container = deploy.engine.find(step.name)
    if container is None:
        return  # gone since the plan was made: nothing to stop or to restore
    container.stop(timeout=deploy.timing.stop_timeout)
    if step.rename_to:
        # Frees the name for the replacement; the old container stays until the new one is verified.
        container.rename(step.rename_to)


def undo_stop(deploy: Deploy, step: Stop, progress: StepProgress):
    if not progress.existed:
        return
    container = None
    if step.rename_to:
        container = deploy.engine.find(step.rename_to)
        if container is not None and deploy.engine.find(step.name) is None:
            container.rename(step.name)
    container = container or deploy.engine.find(step.name)
    if container is not None and progress.was_running:
        container.start()


def backup_path(host_path: str, project_id: int) -> Path:
    """Where purge_data keeps a bind directory's old content: beside it, so moving is a rename."""
    path = Path(host_path)
    return path.parent / f".{path.name}.fleet-backup-{project_id}"


def purge(deploy: Deploy, step: Purge):
    path = Path(step.path)
    if not path.is_dir():
        return  # nothing there yet: the engine creates it empty
    backup = backup_path(step.path, deploy.record.project_id)
    if backup.exists() and any(backup.iterdir()):
        raise DeployError("purge", f"{backup} already holds a backup of {path}; restore or remove it first")
    backup.mkdir(mode=0o700, exist_ok=True)
    for child in path.iterdir():
        _move(child, backup / child.name)


def restore(deploy: Deploy, step: Purge, progress: StepProgress):
    path = Path(step.path)
    backup = backup_path(step.path, deploy.record.project_id)
    if not backup.is_dir():
        return
    if progress.status == DONE and not progress.cleared:
        # The directory was emptied, so everything in it now was written by the new container.
        for child in path.iterdir():
            _delete(child)
        progress.cleared = True
        deploy.save()
    for child in backup.iterdir():
        if os.path.lexists(path / child.name):
            _delete(path / child.name)
        _move(child, path / child.name)
    backup.rmdir()


def drop_backup(deploy: Deploy, step: DropBackup):
    backup = backup_path(step.path, deploy.record.project_id)
    if backup.exists():
        shutil.rmtree(backup)


def restart_policy(text: str | None) -> dict | None:
    if not text or text == "no":
        return None
    name, _, count = text.partition(":")
    policy = {"Name": name}
    if name == "on-failure" and count:
        policy["MaximumRetryCount"] = int(count)
    return policy


def start(deploy: Deploy, step: Start):
    parameters = step.spec.get("startup_parameters") or {}
    try:
        environment = wire.parse_environment(parameters.get("environment", ""))
    except wire.WireError as exc:
        raise DeployError("start", f"{step.name}: {exc}") from None
    record = deploy.record
    try:
        container = deploy.engine.client.containers.create(
            step.image,
            name=step.name,
            environment=environment,
            volumes=list(parameters.get("binds") or []),
            network_mode=parameters.get("network_mode") or None,
            restart_policy=restart_policy(parameters.get("restart_policy")),
            privileged=bool(parameters.get("privileged")),
            labels={
                LABEL_UNIT: deploy.engine.unit_id,
                LABEL_PROJECT: str(record.project_id),
                LABEL_RELEASE: str(record.release_id),
                LABEL_HASH: record.version_hash,
                LABEL_CONTAINER: step.spec["name"],
            },
            detach=True,
        )
    except ENGINE_ERRORS as exc:
        raise DeployError("start", f"cannot create {step.name}: {reason(exc)}") from None
    try:
        container.start()
    except ENGINE_ERRORS as exc:
        raise DeployError("start", f"cannot start {step.name}: {reason(exc)}") from None


def undo_start(deploy: Deploy, step: Start, progress: StepProgress):
    deploy.engine.remove_if_ours(step.name, deploy.record.release_id)


def verify(deploy: Deploy, step: Verify):
    timing = deploy.timing
    started = time.monotonic()
    settled_at = started + timing.settle_seconds
    give_up_at = started + max(timing.settle_seconds, timing.health_timeout)
    first_started: dict[str, str] = {}  # name -> the State.StartedAt first seen
    while True:
        waiting = [name for name in step.names if not _verified(deploy, name, first_started)]
        now = time.monotonic()
        if now >= settled_at and not waiting:
            return
        if now >= give_up_at:
            raise DeployError("verify", f"{', '.join(waiting)} not healthy within {timing.health_timeout:g} s")
        time.sleep(min(0.25, max(0.01, settled_at - now if now < settled_at else 0.25)))


def _verified(deploy: Deploy, name: str, first_started: dict[str, str]) -> bool:
    """Whether `name` is healthy (or has no healthcheck); False while its healthcheck has not said yet.

    Raises DeployError when it stopped, restarted or became unhealthy."""
    container = deploy.engine.find(name)
    if container is None:
        raise DeployError("verify", f"container {name} disappeared")
    state = container.attrs.get("State") or {}
    # An engine that restarts starts its containers again without counting a restart,
    # and may do it between two looks: a new start time is a restart all the same.
    if first_started.setdefault(name, state.get("StartedAt")) != state.get("StartedAt"):
        raise DeployError("verify", f"{name} was started again while it was verified "
                                    f"(at {state.get('StartedAt')}): the engine restarted it")
    if state.get("Status") != "running" or container.attrs.get("RestartCount", 0) > 0:
        logs = container.logs(tail=5).decode(errors="replace").strip()
        raise DeployError("verify", f"{name} is {state.get('Status')} (exit code {state.get('ExitCode')}, "
                                    f"restarted {container.attrs.get('RestartCount', 0)} times)"
                                    + (f": {logs}" if logs else ""))
    health = state.get("Health")
    if health is None:
        return True
    if health.get("Status") == "unhealthy":
        last = (health.get("Log") or [{}])[-1].get("Output", "").strip()
        raise DeployError("verify", f"{name} is unhealthy" + (f": {last}" if last else ""))
    return health.get("Status") == "healthy"


def remove(deploy: Deploy, step: Remove):
    container = deploy.engine.find(step.name)
    if container is not None:
        container.remove(force=True)


def prune(deploy: Deploy, step: Prune):
    try:
        deploy.engine.client.images.remove(step.reference)
    except ImageNotFound:
        pass
    except APIError as exc:
        # 409: a container still uses it (one the agent does not own, perhaps); it stays.
        log.info("image %s kept: %s", step.reference, reason(exc))


ACTIONS: dict[type[Step], Action] = {
    Login: Action(login),
    Pull: Action(pull),
    Stop: Action(stop, undo=undo_stop, facts=stop_facts),
    Purge: Action(purge, undo=restore),
    Start: Action(start, undo=undo_start),
    Verify: Action(verify),
    Remove: Action(remove),
    DropBackup: Action(drop_backup),
    Prune: Action(prune),
}


# --- running, undoing, committing ----------------------------------------------------


def run(deploy: Deploy, index: int, step: Step, on_step: Callable):
    """Carry out one step, journalled before and after; engine errors become DeployError naming the step."""
    action = ACTIONS[type(step)]
    progress = StepProgress(STARTED, **(action.facts(deploy, step) if action.facts else {}))
    deploy.record.set_progress(index, progress)
    deploy.save()
    on_step(step, "started")
    try:
        action.do(deploy, step)
    except DeployError:
        raise
    except ENGINE_ERRORS as exc:
        raise DeployError(step.action, f"{step.describe()}: {reason(exc)}") from None
    progress.status = DONE
    deploy.save()
    on_step(step, "done")


def undo_all(deploy: Deploy) -> list[str]:
    """Undo every step that began, newest first; returns what could not be undone."""
    problems = []
    for index in reversed(deploy.record.begun()):
        progress = deploy.record.progress_of(index)
        if progress.status == UNDONE:
            continue
        step = deploy.record.step(index)
        undo = ACTIONS[type(step)].undo
        try:
            if undo is not None:
                undo(deploy, step, progress)
        except (DeployError, *ENGINE_ERRORS) as exc:
            problems.append(f"undo {step.describe()}: {reason(exc)}")
            log.error("project=%s could not undo %s: %s", deploy.record.project_id, step.describe(), exc)
            continue
        progress.status = UNDONE
        deploy.save()
    return problems


def commit(deploy: Deploy, on_step: Callable):
    """Remove what the new release replaced; failures here are logged, the new release runs."""
    record = deploy.record
    record.phase = COMMITTING
    deploy.save()
    for index in range(len(record.steps)):
        step = record.step(index)
        progress = record.progress_of(index)
        if step.phase != COMMIT or (progress is not None and progress.status == DONE):
            continue
        record.set_progress(index, StepProgress(STARTED))
        on_step(step, "started")
        try:
            ACTIONS[type(step)].do(deploy, step)
        except ENGINE_ERRORS as exc:
            log.warning("project=%s clean-up %s failed: %s", record.project_id, step.describe(), reason(exc))
        record.set_progress(index, StepProgress(DONE))
        deploy.save()
        on_step(step, "done")
    record.phase = SUCCEEDED
    deploy.save()


def _move(source: Path, destination: Path):
    try:
        os.rename(source, destination)
    except OSError:
        shutil.move(str(source), str(destination))  # across file systems (a bind that is a mount point)


def _delete(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
