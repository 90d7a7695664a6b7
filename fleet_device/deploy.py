"""The deploy engine: plan the change from what runs to what a release wants, then carry it out.

`plan()` is pure. `Deployer.apply()` runs a plan against the Docker engine and, when a
step fails, undoes what it did in reverse so the device keeps running what it ran.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from . import wire

log = logging.getLogger(__name__)

LABEL_UNIT = "fleet.unit_id"
LABEL_PROJECT = "fleet.project"
LABEL_RELEASE = "fleet.release"
LABEL_HASH = "fleet.version_hash"
LABEL_CONTAINER = "fleet.container"
OLD_SUFFIX = ".fleet-old"


class DeployError(Exception):
    """A deploy step failed; `step` names it for the report."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class Running:
    """A container as the plan sees it."""

    name: str
    project: str | None = None
    release: str | None = None
    version_hash: str | None = None
    running: bool = True


@dataclass
class Plan:
    project_id: int
    release: dict | None
    pulls: list[str] = field(default_factory=list)
    stop_owned: list[str] = field(default_factory=list)
    stop_initial: list[str] = field(default_factory=list)
    create: list[dict] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return not (self.pulls or self.stop_owned or self.stop_initial or self.create)


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


def plan(project_id: int, release: dict | None, current: list[Running], registries: dict[int, dict]) -> Plan:
    """What to do to move the project from `current` to `release` (None: remove the project)."""
    owned = [c for c in current if c.project == str(project_id)]
    result = Plan(project_id, release)
    if release is None:
        result.stop_owned = [c.name for c in owned]
        return result
    wanted = {c["fully_qualified_name"] for c in release["containers"]}
    in_place = (
        len(owned) == len(wanted)
        and all(c.release == str(release["id"]) and c.version_hash == release["version_hash"] for c in owned)
        and {c.name for c in owned} == wanted
        and all(c.running for c in owned)
    )
    initial_names = {c.name for c in current if c.running and c.project is None}
    initial = [name for name in release.get("remove_containers", []) if name in initial_names]
    if in_place and not initial:
        return result
    for container in release["containers"]:
        repository = image_reference(container, registries)
        for tag in [*container.get("required_tags", []), container["tag"]]:
            reference = f"{repository}:{tag}"
            if reference not in result.pulls:
                result.pulls.append(reference)
    result.stop_owned = [c.name for c in owned]
    result.stop_initial = initial
    result.create = list(release["containers"])
    return result


def restart_policy(text: str | None) -> dict | None:
    if not text or text == "no":
        return None
    name, _, count = text.partition(":")
    policy = {"Name": name}
    if name == "on-failure" and count:
        policy["MaximumRetryCount"] = int(count)
    return policy


class Deployer:
    """Runs plans against the Docker engine."""

    def __init__(self, unit_id: str, client: docker.DockerClient | None = None, settle_seconds: float = 10.0,
                 report=None):
        self.unit_id = unit_id
        self.client = client or docker.from_env(timeout=120)
        self.settle_seconds = settle_seconds
        self.report = report or (lambda state, step=None, detail="": None)

    # --- reading the engine ---------------------------------------------------

    def current(self) -> list[Running]:
        result = []
        for container in self.client.containers.list(all=True):
            labels = container.labels or {}
            # Containers another agent labelled (another unit on a shared engine) are nobody's business here.
            if labels.get(LABEL_UNIT) not in (None, self.unit_id):
                continue
            result.append(
                Running(
                    name=container.name,
                    project=labels.get(LABEL_PROJECT),
                    release=labels.get(LABEL_RELEASE),
                    version_hash=labels.get(LABEL_HASH),
                    running=container.status == "running",
                )
            )
        return result

    # --- applying ---------------------------------------------------------------

    def apply(self, project_id: int, release: dict | None, registries: dict[int, dict]) -> Plan:
        """Apply one project's release; raises DeployError after rolling back."""
        the_plan = plan(project_id, release, self.current(), registries)
        if the_plan.is_noop:
            return the_plan
        if release is None:
            self._remove_project(the_plan)
            return the_plan
        self._pull(the_plan, registries)
        undo: list = []
        try:
            self._stop(the_plan, undo)
            self._start(the_plan, release, registries, undo)
            self._verify(the_plan)
        except DeployError:
            self._roll_back(undo)
            raise
        self._clean_up(the_plan)
        return the_plan

    def _pull(self, the_plan: Plan, registries: dict[int, dict]):
        self.report("pulling", "pull")
        credentials = {registry_host(r["url"]): r for r in registries.values()}
        for reference in the_plan.pulls:
            try:
                self.client.images.get(reference)
                continue
            except ImageNotFound:
                pass
            except DockerException as exc:
                raise DeployError("pull", f"cannot inspect {reference}: {exc}") from None
            repository, _, tag = reference.rpartition(":")
            registry = credentials.get(repository.split("/", 1)[0])
            auth = {"username": registry["username"], "password": registry["password"]} if registry else None
            try:
                self.client.images.pull(repository, tag=tag, auth_config=auth)
            except DockerException as exc:
                raise DeployError("pull", f"cannot pull {reference}: {_reason(exc)}") from None

    def _stop(self, the_plan: Plan, undo: list):
        self.report("stopping", "stop")
        for name in the_plan.stop_initial:
            container = self._get(name, "stop")
            self._call("stop", container.stop, timeout=10)
            undo.append(("start", name))
        for name in the_plan.stop_owned:
            container = self._get(name, "stop")
            was_running = container.status == "running"
            self._call("stop", container.stop, timeout=10)
            # Free the name for the replacement; the old container stays until the new one is verified.
            self._call("stop", container.rename, name + OLD_SUFFIX)
            undo.append(("restore", name, was_running))

    def _start(self, the_plan: Plan, release: dict, registries: dict[int, dict], undo: list):
        self.report("starting", "start")
        for spec in the_plan.create:
            name = spec["fully_qualified_name"]
            parameters = spec.get("startup_parameters") or {}
            try:
                environment = wire.parse_environment(parameters.get("environment", ""))
            except wire.WireError as exc:
                raise DeployError("start", f"{name}: {exc}") from None
            try:
                container = self.client.containers.create(
                    f"{image_reference(spec, registries)}:{spec['tag']}",
                    name=name,
                    environment=environment,
                    volumes=list(parameters.get("binds") or []),
                    network_mode=parameters.get("network_mode") or None,
                    restart_policy=restart_policy(parameters.get("restart_policy")),
                    privileged=bool(parameters.get("privileged")),
                    labels={
                        LABEL_UNIT: self.unit_id,
                        LABEL_PROJECT: str(the_plan.project_id),
                        LABEL_RELEASE: str(release["id"]),
                        LABEL_HASH: release["version_hash"],
                        LABEL_CONTAINER: spec["name"],
                    },
                    detach=True,
                )
            except DockerException as exc:
                raise DeployError("start", f"cannot create {name}: {_reason(exc)}") from None
            undo.append(("remove", name))
            self._call("start", container.start)

    def _verify(self, the_plan: Plan):
        self.report("verifying", "verify")
        deadline = time.monotonic() + self.settle_seconds
        while True:
            for spec in the_plan.create:
                container = self._get(spec["fully_qualified_name"], "verify")
                if container.status != "running":
                    logs = container.logs(tail=5).decode(errors="replace").strip()
                    state = container.attrs.get("State", {})
                    raise DeployError(
                        "verify",
                        f"{container.name} is {container.status} (exit code {state.get('ExitCode')})"
                        + (f": {logs}" if logs else ""),
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _clean_up(self, the_plan: Plan):
        for name in the_plan.stop_owned:
            self._remove_quietly(name + OLD_SUFFIX)
        for name in the_plan.stop_initial:
            self._remove_quietly(name)

    def _remove_project(self, the_plan: Plan):
        self.report("stopping", "stop")
        for name in the_plan.stop_owned:
            self._remove_quietly(name)

    def _roll_back(self, undo: list):
        for action, name, *rest in reversed(undo):
            try:
                if action == "remove":
                    self._remove_quietly(name)
                elif action == "restore":
                    container = self.client.containers.get(name + OLD_SUFFIX)
                    container.rename(name)
                    if rest and rest[0]:
                        container.start()
                elif action == "start":
                    self.client.containers.get(name).start()
            except DockerException as exc:
                log.error("rollback step %s %s failed: %s", action, name, exc)

    # --- small engine helpers ---------------------------------------------------

    def _get(self, name: str, step: str):
        try:
            return self.client.containers.get(name)
        except NotFound:
            raise DeployError(step, f"container {name} disappeared") from None
        except DockerException as exc:
            raise DeployError(step, f"cannot inspect {name}: {_reason(exc)}") from None

    def _call(self, step: str, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except DockerException as exc:
            raise DeployError(step, _reason(exc)) from None

    def _remove_quietly(self, name: str):
        try:
            self.client.containers.get(name).remove(force=True)
        except NotFound:
            pass
        except DockerException as exc:
            log.error("could not remove container %s: %s", name, exc)


def _reason(exc: Exception) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)
