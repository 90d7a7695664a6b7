"""The deploy engine: plan the change from what runs to what a release wants, then carry it out.

`plan()` is pure: current device state + target release → an ordered list of `Step`s.
`Deployer` runs those steps against the Docker engine, writing each one to a journal in the
state dir before and after it acts, and knows how to undo every step. When a step fails it
undoes what it did, in reverse, so the device keeps running what it ran; when the agent was
killed mid-deploy, `Deployer.recover()` reads the journal and completes or rolls back.
See docs/deploy.md for the state machine and the failure modes.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

import fleet_wire as wire


from fleet_wire import release_policy
from fleet_wire.release_policy import ReleasePolicy
from .state import Journal

log = logging.getLogger(__name__)

LABEL_UNIT = "fleet.unit_id"
LABEL_PROJECT = "fleet.project"
LABEL_RELEASE = "fleet.release"
LABEL_HASH = "fleet.version_hash"
LABEL_CONTAINER = "fleet.container"
OLD_SUFFIX = ".fleet-old"

# Phases of a step: prepare changes nothing, change is undone on failure, commit runs only
# once the new containers are verified and is never undone.
PREPARE, CHANGE, VERIFY, COMMIT = "prepare", "change", "verify", "commit"

# The progress state reported when a step of this kind begins.
PROGRESS = {"login": "pulling", "pull": "pulling", "stop": "stopping", "purge": "stopping",
            "start": "starting", "verify": "verifying"}

# Journal phases. Terminal ones only wait for the agent to record the outcome.
CHANGING, ROLLING_BACK, COMMITTING, SUCCEEDED, ROLLED_BACK = (
    "changing", "rolling_back", "committing", "succeeded", "rolled_back")
TERMINAL_PHASES = (SUCCEEDED, ROLLED_BACK)

# Errors that mean "the engine (or its socket) did not do what was asked".
ENGINE_ERRORS = (DockerException, requests.RequestException, OSError)


class DeployError(Exception):
    """A deploy step failed; `step` names it for the report, `reason` says why."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


# --- what the plan sees and produces -------------------------------------------------


@dataclass(frozen=True)
class Running:
    """A container as the plan sees it."""

    name: str
    project: str | None = None
    release: str | None = None
    version_hash: str | None = None
    running: bool = True
    image: str | None = None  # the reference it was created from


@dataclass(frozen=True)
class DeviceState:
    """Everything `plan()` needs to know about the device, read beforehand."""

    containers: tuple[Running, ...] = ()
    images: frozenset[str] = frozenset()  # image references (repo:tag) present on the engine
    previous: dict | None = None  # the project's release applied last
    needed_elsewhere: frozenset[str] = frozenset()  # references other projects' releases need


@dataclass(frozen=True)
class Step:
    """One thing to do to the device. `phase` says whether it is undone on failure."""

    action: str  # login | pull | stop | purge | start | verify | remove | drop_backup | prune
    target: str  # registry host, image reference, container name or host path
    phase: str
    image: str | None = None  # start: the image reference to run
    spec: dict | None = field(default=None, compare=True, hash=False)  # start: the container spec
    rename_to: str | None = None  # stop: free the name for its replacement
    initial: bool = False  # stop: a container named in remove_containers
    names: tuple[str, ...] = ()  # verify: the new containers

    def describe(self) -> str:
        return f"{self.action} {self.target}".strip()


def registry_host(url: str) -> str:
    """`https://host:5000/` → `host:5000`; a bare `host:5000` stays as it is."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    return parts.netloc or url


def image_reference(container: dict, registries: dict[int, dict]) -> str:
    """The repository to pull: the image, prefixed with its registry's host when it has none."""
    image = container["image"]
    registry = registries.get(container.get("registry"))
    if registry is None:
        return image
    host = registry_host(registry["url"])
    return image if image.startswith(host + "/") else f"{host}/{image}"


def release_image_refs(release: dict | None, registries: dict[int, dict]) -> list[str]:
    """Every image reference a release needs, required tags before each container's tag."""
    refs: list[str] = []
    for container in (release or {}).get("containers", []):
        repository = image_reference(container, registries)
        for tag in [*container.get("required_tags", []), container["tag"]]:
            if f"{repository}:{tag}" not in refs:
                refs.append(f"{repository}:{tag}")
    return refs


def purge_paths(release: dict) -> list[str]:
    """Host directories bound writable by the release's purge_data containers."""
    paths: list[str] = []
    for container in release["containers"]:
        if not container.get("purge_data"):
            continue
        for bind in (container.get("startup_parameters") or {}).get("binds") or []:
            parts = bind.split(":")
            # A read-only bind is configuration the container is given, not data it wrote.
            if len(parts) >= 2 and parts[-1] != "ro" and parts[0] not in paths:
                paths.append(parts[0])
    return paths


def _already_runs(project: str, release: dict, owned: list[Running]) -> bool:
    wanted = sorted(c["fully_qualified_name"] for c in release["containers"])
    return sorted(c.name for c in owned) == wanted and all(
        c.running and c.release == str(release["id"]) and c.version_hash == release["version_hash"] for c in owned
    )


def initial_containers(release: dict, state: DeviceState) -> list[Running]:
    """The containers `remove_containers` names that exist and carry no project's label: Fleet does not manage them."""
    by_name = {c.name: c for c in state.containers}
    return [by_name[n] for n in dict.fromkeys(release.get("remove_containers") or [])
            if n in by_name and by_name[n].project is None]


def check_policy(release: dict, state: DeviceState, policy: ReleasePolicy):
    """Refuse a release this device is not configured to trust, whoever sent it, before anything is done.

    Bind paths are checked with their symbolic links followed too: a link that a container left
    in an allowed directory must not lead a later bind out of it.
    """
    unmanaged = [c.name for c in initial_containers(release, state)]
    found = release_policy.violations(release, policy, unmanaged, resolve=os.path.realpath)
    if found:
        raise DeployError("policy", f"this device does not allow {release_policy.describe(found)} "
                                    "(see --allow-privileged and --allowed-bind-roots)")


def plan(project_id: int, release: dict | None, state: DeviceState, registries: dict[int, dict]) -> list[Step]:
    """The steps that move the project from `state` to `release` (None: remove the project).

    An empty list means the release already runs. Raises DeployError("plan", ...) when the
    release cannot be applied at all (a name held by a container it may not touch, an unknown
    registry); nothing has changed then.
    """
    project = str(project_id)
    owned = sorted((c for c in state.containers if c.project == project), key=lambda c: (-len(c.name), c.name))
    old_refs = release_image_refs(state.previous, registries) + [c.image for c in owned if c.image]
    if release is None:
        steps = [Step("remove", c.name, COMMIT) for c in owned]
        return steps + _prunes(old_refs, set(), state)

    by_name = {c.name: c for c in state.containers}
    initial = initial_containers(release, state)
    if _already_runs(project, release, owned) and not initial:
        return []
    wanted = [c["fully_qualified_name"] for c in release["containers"]]
    for name in wanted:
        holder = by_name.get(name)
        if holder is not None and holder.project != project and holder not in initial:
            raise DeployError("plan", f"a container named {name} exists and is not managed by project {project}; "
                                      "name it in remove_containers to replace it")
    for container in release["containers"]:
        if container.get("registry") is not None and container["registry"] not in registries:
            raise DeployError("plan", f"container {container['name']} names registry {container['registry']}, "
                                      "which this device has no credentials for")

    refs = release_image_refs(release, registries)
    hosts = [registry_host(registries[c["registry"]]["url"]) for c in release["containers"]
             if c.get("registry") is not None and registries[c["registry"]].get("username")]
    steps = [Step("login", host, PREPARE) for host in dict.fromkeys(hosts)]
    steps += [Step("pull", ref, PREPARE) for ref in refs if ref not in state.images]
    stopped = []
    for container in initial:
        rename_to = container.name + OLD_SUFFIX if container.name in wanted else None
        stopped.append(Step("stop", container.name, CHANGE, rename_to=rename_to, initial=True))
    for container in owned:
        stopped.append(Step("stop", container.name, CHANGE, rename_to=container.name + OLD_SUFFIX))
    steps += stopped
    purged = purge_paths(release)
    steps += [Step("purge", path, CHANGE) for path in purged]
    for container in release["containers"]:
        repository = image_reference(container, registries)
        steps.append(Step("start", container["fully_qualified_name"], CHANGE,
                          image=f"{repository}:{container['tag']}", spec=container))
    steps.append(Step("verify", "", VERIFY, names=tuple(wanted)))
    steps += [Step("remove", s.rename_to or s.target, COMMIT) for s in stopped]
    steps += [Step("drop_backup", path, COMMIT) for path in purged]
    return steps + _prunes(old_refs, set(refs), state)


def _prunes(old_refs: list[str], keep: set[str], state: DeviceState) -> list[Step]:
    """Images the project used before that nothing on the device needs any more."""
    keep = keep | state.needed_elsewhere
    return [Step("prune", ref, COMMIT) for ref in dict.fromkeys(old_refs) if ref not in keep and ref in state.images]


def restart_policy(text: str | None) -> dict | None:
    if not text or text == "no":
        return None
    name, _, count = text.partition(":")
    policy = {"Name": name}
    if name == "on-failure" and count:
        policy["MaximumRetryCount"] = int(count)
    return policy


def backup_path(host_path: str, project_id: int) -> Path:
    """Where purge_data keeps a bind directory's old content: beside it, so moving is a rename."""
    path = Path(host_path)
    return path.parent / f".{path.name}.fleet-backup-{project_id}"


@dataclass
class Recovery:
    """What became of a deploy the agent found in its journal at start-up."""

    project_id: int
    context: dict | None
    state: str  # succeeded | failed | rolled_back
    step: str | None
    detail: str
    settled: bool = True  # False: the rollback could not finish yet (engine away); retried later


# --- carrying it out ----------------------------------------------------------------


class Deployer:
    """Runs plans against the Docker engine, journalled, undoing them when a step fails."""

    def __init__(self, unit_id: str, state_dir: Path, client: docker.DockerClient | None = None,
                 settle_seconds: float = 10.0, health_timeout: float = 60.0, stop_timeout: int = 10,
                 report: Callable | None = None, on_step: Callable | None = None,
                 policy: ReleasePolicy = ReleasePolicy()):
        self.unit_id = unit_id
        self.policy = policy  # what a release may hold; anything more is refused before the plan
        self.journal = Journal(state_dir)
        self._client = client
        self.settle_seconds = settle_seconds
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        # report(state, step, detail): progress for the deployments topic.
        self.report = report or (lambda state, step=None, detail="": None)
        # on_step(step, "started" | "done"): a hook for observers (and crash tests).
        self.on_step = on_step or (lambda step, when: None)
        self._registries: dict[int, dict] = {}

    @property
    def client(self) -> docker.DockerClient:
        # Made on first use, so an agent starts (and queues releases) while the engine is down.
        if self._client is None:
            self._client = docker.from_env(timeout=120)
        return self._client

    # --- reading the engine ---------------------------------------------------

    def observe(self, previous: dict | None = None, needed_elsewhere=frozenset()) -> DeviceState:
        """The device as `plan()` needs it; DeployError("engine", ...) when the engine does not answer."""
        try:
            containers = []
            for container in self.client.containers.list(all=True):
                labels = container.labels or {}
                # Containers another agent labelled (another unit on a shared engine) are nobody's business here.
                if labels.get(LABEL_UNIT) not in (None, self.unit_id):
                    continue
                containers.append(Running(
                    name=container.name,
                    project=labels.get(LABEL_PROJECT),
                    release=labels.get(LABEL_RELEASE),
                    version_hash=labels.get(LABEL_HASH),
                    running=container.status == "running",
                    image=(container.attrs.get("Config") or {}).get("Image"),
                ))
            images = frozenset(tag for image in self.client.images.list() for tag in image.tags)
        except ENGINE_ERRORS as exc:
            raise DeployError("engine", f"the Docker engine does not answer: {_reason(exc)}") from None
        return DeviceState(tuple(containers), images, previous, frozenset(needed_elsewhere))

    # --- registries -------------------------------------------------------------

    def login_all(self, registries: dict[int, dict]) -> dict[str, str]:
        """Log in to every registry with credentials; returns {host: reason} for those that refused."""
        failures = {}
        for registry in registries.values():
            if not registry.get("username"):
                continue
            host = registry_host(registry["url"])
            try:
                self._login(host, registry)
            except DeployError as exc:
                failures[host] = exc.reason
                log.warning("registry login failed host=%s reason=%s", host, exc.reason)
            else:
                log.info("logged in to registry %s as %s", host, registry["username"])
        return failures

    def _login(self, host: str, registry: dict):
        try:
            self.client.login(username=registry["username"], password=registry["password"], registry=host,
                              reauth=True)
        except ENGINE_ERRORS as exc:
            raise DeployError("login", f"registry {host} refused the credentials of user "
                                       f"{registry['username']!r}: {_reason(exc)}") from None

    def _credentials(self, host: str) -> dict | None:
        for registry in self._registries.values():
            if registry_host(registry["url"]) == host and registry.get("username"):
                return registry
        return None

    # --- applying ---------------------------------------------------------------

    def apply(self, project_id: int, release: dict | None, registries: dict[int, dict], previous: dict | None = None,
              needed_elsewhere=frozenset(), context: dict | None = None) -> list[Step]:
        """Apply one project's release; returns the steps taken ([] when it already runs).

        Raises DeployError after rolling back. The journal stays until `forget()` so the
        caller can record the outcome first; `context` is kept in it for `recover()`.
        """
        pending = self.journal.load(project_id)
        if pending is not None and pending.get("phase") not in TERMINAL_PHASES:
            raise DeployError("recover", "an interrupted deploy of this project is not resolved yet "
                                         "(the engine did not answer the rollback); it is retried first")
        self._registries = registries
        state = self.observe(previous, needed_elsewhere)
        if release is not None:
            check_policy(release, state, self.policy)
        steps = plan(project_id, release, state, registries)
        if not steps:
            return steps
        record = {
            "project_id": project_id,
            "release_id": release["id"] if release else None,
            "version_hash": release["version_hash"] if release else None,
            "context": context,
            "phase": CHANGING,
            "steps": [asdict(step) for step in steps],
            "progress": {},
            "failure": None,
            "started_at": time.time(),
        }
        self.journal.save(project_id, record)
        announced = None
        try:
            for index, step in enumerate(steps):
                if step.phase == COMMIT:
                    break
                if PROGRESS[step.action] != announced:
                    announced = PROGRESS[step.action]
                    self.report(announced, step.action)
                self._run(record, index, step)
        except DeployError as exc:
            self._roll_back(record, exc)
        self._commit(record)
        return steps

    def forget(self, project_id: int):
        """Drop a finished deploy's journal once its outcome is recorded; an unfinished one stays."""
        record = self.journal.load(project_id)
        if record is not None and record.get("phase") in TERMINAL_PHASES:
            self.journal.discard(project_id)

    def recover(self) -> list[Recovery]:
        """Resolve every deploy the journal holds: finish committed ones, roll back the rest."""
        results = []
        for project_id, record in self.journal.records():
            results.append(self._recover(project_id, record))
        return results

    def _recover(self, project_id: int, record: dict) -> Recovery:
        phase = record.get("phase")
        context = record.get("context")
        failure = record.get("failure")
        if phase in (COMMITTING, SUCCEEDED):
            if phase == COMMITTING:
                log.info("project=%s: completing a verified deploy interrupted while cleaning up", project_id)
                self._commit(record)
            return Recovery(project_id, context, "succeeded", "commit", "completed after the agent restarted")
        if phase in (CHANGING, ROLLING_BACK):
            if failure is None:
                failure = {"step": self._interrupted_step(record),
                           "reason": f"the agent stopped during {self._interrupted_step(record)}",
                           "interrupted": True}
                record["failure"] = failure
            record["phase"] = ROLLING_BACK
            self.journal.save(project_id, record)
            problems = self._undo_all(record)
            if problems:
                return Recovery(project_id, context, "failed", failure["step"],
                                f"{failure['reason']}; rollback incomplete: {'; '.join(problems)}", settled=False)
            record["phase"] = ROLLED_BACK
            self.journal.save(project_id, record)
        state = "rolled_back" if failure and failure.get("interrupted") else "failed"
        failure = failure or {"step": None, "reason": "rolled back"}
        suffix = "; rolled back to what ran before" if state == "rolled_back" else ""
        return Recovery(project_id, context, state, failure["step"], failure["reason"] + suffix)

    def _interrupted_step(self, record: dict) -> str:
        progress = record.get("progress") or {}
        if not progress:
            return "prepare"
        last = max(int(index) for index in progress)
        return record["steps"][last]["action"]

    def _run(self, record: dict, index: int, step: Step):
        entry = {"status": "started", **self._undo_facts(step)}
        record["progress"][str(index)] = entry
        self.journal.save(record["project_id"], record)
        self.on_step(step, "started")
        try:
            getattr(self, f"_do_{step.action}")(step, record)
        except DeployError:
            raise
        except ENGINE_ERRORS as exc:
            raise DeployError(step.action, f"{step.describe()}: {_reason(exc)}") from None
        entry["status"] = "done"
        self.journal.save(record["project_id"], record)
        self.on_step(step, "done")

    def _undo_facts(self, step: Step) -> dict:
        """What the undo of a step needs to know, read before the step acts."""
        if step.action == "stop":
            try:
                container = self.client.containers.get(step.target)
            except NotFound:
                return {"existed": False, "was_running": False}
            except ENGINE_ERRORS as exc:
                raise DeployError("stop", f"cannot inspect {step.target}: {_reason(exc)}") from None
            return {"existed": True, "was_running": container.status in ("running", "restarting")}
        return {}

    def _roll_back(self, record: dict, failure: DeployError):
        log.warning("project=%s release=%s step=%s failed: %s; rolling back", record["project_id"],
                    record["release_id"], failure.step, failure.reason)
        record["phase"] = ROLLING_BACK
        record["failure"] = {"step": failure.step, "reason": failure.reason}
        self.journal.save(record["project_id"], record)
        problems = self._undo_all(record)
        if problems:
            raise DeployError(failure.step, f"{failure.reason}; rollback incomplete ({'; '.join(problems)}), "
                                            "retried before the next deploy")
        record["phase"] = ROLLED_BACK
        self.journal.save(record["project_id"], record)
        raise failure

    def _undo_all(self, record: dict) -> list[str]:
        """Undo every step that began, newest first; returns what could not be undone."""
        problems = []
        for index in sorted((int(i) for i in record["progress"]), reverse=True):
            entry = record["progress"][str(index)]
            if entry.get("status") == "undone":
                continue
            step = Step(**{**record["steps"][index], "names": tuple(record["steps"][index]["names"])})
            try:
                self._undo(record, step, entry)
            except (DeployError, *ENGINE_ERRORS) as exc:
                problems.append(f"undo {step.describe()}: {_reason(exc)}")
                log.error("project=%s could not undo %s: %s", record["project_id"], step.describe(), exc)
                continue
            entry["status"] = "undone"
            self.journal.save(record["project_id"], record)
        return problems

    def _undo(self, record: dict, step: Step, entry: dict):
        if step.action == "start":
            self._remove_if_ours(step.target, record["release_id"])
        elif step.action == "stop" and entry.get("existed"):
            container = None
            if step.rename_to:
                container = self._find(step.rename_to)
                if container is not None and self._find(step.target) is None:
                    container.rename(step.target)
            container = container or self._find(step.target)
            if container is not None and entry.get("was_running"):
                container.start()
        elif step.action == "purge":
            self._restore(record, step, entry)

    def _commit(self, record: dict):
        """Remove what the new release replaced; failures here are logged, the new release runs."""
        record["phase"] = COMMITTING
        self.journal.save(record["project_id"], record)
        for index, raw in enumerate(record["steps"]):
            step = Step(**{**raw, "names": tuple(raw["names"])})
            if step.phase != COMMIT or record["progress"].get(str(index), {}).get("status") == "done":
                continue
            record["progress"][str(index)] = {"status": "started"}
            self.on_step(step, "started")
            try:
                getattr(self, f"_do_{step.action}")(step, record)
            except ENGINE_ERRORS as exc:
                log.warning("project=%s clean-up %s failed: %s", record["project_id"], step.describe(), _reason(exc))
            record["progress"][str(index)] = {"status": "done"}
            self.journal.save(record["project_id"], record)
            self.on_step(step, "done")
        record["phase"] = SUCCEEDED
        self.journal.save(record["project_id"], record)

    # --- the steps ----------------------------------------------------------------

    def _do_login(self, step: Step, record: dict):
        registry = self._credentials(step.target)
        if registry is None:
            raise DeployError("login", f"no credentials for registry {step.target}")
        self._login(step.target, registry)

    def _do_pull(self, step: Step, record: dict):
        repository, _, tag = step.target.rpartition(":")
        registry = self._credentials(repository.split("/", 1)[0])
        auth = {"username": registry["username"], "password": registry["password"]} if registry else None
        try:
            self.client.images.pull(repository, tag=tag, auth_config=auth)
            self.client.images.get(step.target)
        except ENGINE_ERRORS as exc:
            raise DeployError("pull", f"cannot pull {step.target}: {_reason(exc)}") from None

    def _do_stop(self, step: Step, record: dict):
        container = self._find(step.target)
        if container is None:
            return  # gone since the plan was made: nothing to stop or to restore
        container.stop(timeout=self.stop_timeout)
        if step.rename_to:
            # Frees the name for the replacement; the old container stays until the new one is verified.
            container.rename(step.rename_to)

    def _do_purge(self, step: Step, record: dict):
        path = Path(step.target)
        if not path.is_dir():
            return  # nothing there yet: the engine creates it empty
        backup = backup_path(step.target, record["project_id"])
        if backup.exists() and any(backup.iterdir()):
            raise DeployError("purge", f"{backup} already holds a backup of {path}; restore or remove it first")
        backup.mkdir(mode=0o700, exist_ok=True)
        for child in path.iterdir():
            _move(child, backup / child.name)

    def _restore(self, record: dict, step: Step, entry: dict):
        path = Path(step.target)
        backup = backup_path(step.target, record["project_id"])
        if not backup.is_dir():
            return
        if entry.get("status") == "done" and not entry.get("cleared"):
            # The directory was emptied, so everything in it now was written by the new container.
            for child in path.iterdir():
                _delete(child)
            entry["cleared"] = True
            self.journal.save(record["project_id"], record)
        for child in backup.iterdir():
            if os.path.lexists(path / child.name):
                _delete(path / child.name)
            _move(child, path / child.name)
        backup.rmdir()

    def _do_drop_backup(self, step: Step, record: dict):
        backup = backup_path(step.target, record["project_id"])
        if backup.exists():
            shutil.rmtree(backup)

    def _do_start(self, step: Step, record: dict):
        spec = step.spec
        parameters = spec.get("startup_parameters") or {}
        try:
            environment = wire.parse_environment(parameters.get("environment", ""))
        except wire.WireError as exc:
            raise DeployError("start", f"{step.target}: {exc}") from None
        try:
            container = self.client.containers.create(
                step.image,
                name=step.target,
                environment=environment,
                volumes=list(parameters.get("binds") or []),
                network_mode=parameters.get("network_mode") or None,
                restart_policy=restart_policy(parameters.get("restart_policy")),
                privileged=bool(parameters.get("privileged")),
                labels={
                    LABEL_UNIT: self.unit_id,
                    LABEL_PROJECT: str(record["project_id"]),
                    LABEL_RELEASE: str(record["release_id"]),
                    LABEL_HASH: record["version_hash"],
                    LABEL_CONTAINER: spec["name"],
                },
                detach=True,
            )
        except ENGINE_ERRORS as exc:
            raise DeployError("start", f"cannot create {step.target}: {_reason(exc)}") from None
        try:
            container.start()
        except ENGINE_ERRORS as exc:
            raise DeployError("start", f"cannot start {step.target}: {_reason(exc)}") from None

    def _do_verify(self, step: Step, record: dict):
        started = time.monotonic()
        settled_at = started + self.settle_seconds
        give_up_at = started + max(self.settle_seconds, self.health_timeout)
        first_started = {}  # name -> the State.StartedAt first seen
        while True:
            waiting = []
            for name in step.names:
                container = self._find(name)
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
                if health is not None:
                    if health.get("Status") == "unhealthy":
                        last = (health.get("Log") or [{}])[-1].get("Output", "").strip()
                        raise DeployError("verify", f"{name} is unhealthy" + (f": {last}" if last else ""))
                    if health.get("Status") != "healthy":
                        waiting.append(name)
            now = time.monotonic()
            if now >= settled_at and not waiting:
                return
            if now >= give_up_at:
                raise DeployError("verify", f"{', '.join(waiting)} not healthy within {self.health_timeout:g} s")
            time.sleep(min(0.25, max(0.01, settled_at - now if now < settled_at else 0.25)))

    def _do_remove(self, step: Step, record: dict):
        container = self._find(step.target)
        if container is not None:
            container.remove(force=True)

    def _do_prune(self, step: Step, record: dict):
        try:
            self.client.images.remove(step.target)
        except ImageNotFound:
            pass
        except APIError as exc:
            # 409: a container still uses it (one the agent does not own, perhaps); it stays.
            log.info("image %s kept: %s", step.target, _reason(exc))

    # --- small engine helpers ---------------------------------------------------

    def _find(self, name: str):
        try:
            return self.client.containers.get(name)
        except NotFound:
            return None

    def _remove_if_ours(self, name: str, release_id):
        container = self._find(name)
        if container is None:
            return
        labels = container.labels or {}
        if labels.get(LABEL_UNIT) == self.unit_id and labels.get(LABEL_RELEASE) == str(release_id):
            container.remove(force=True)


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


def _reason(exc: Exception) -> str:
    if isinstance(exc, requests.ConnectionError) or "Connection aborted" in str(exc):
        return f"the Docker engine does not answer ({exc})"
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
