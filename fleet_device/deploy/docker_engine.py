"""The deploy engine's view of the Docker engine: reading the device's state, registry logins, finding containers.

The agent owns containers by label, never by guessing from names: these labels are how.
"""
from __future__ import annotations

import logging

import docker
from docker.errors import NotFound

from .errors import ENGINE_ERRORS, DeployError, reason
from .plan import DeviceState, Running, registry_host

log = logging.getLogger(__name__)

LABEL_UNIT = "fleet.unit_id"
LABEL_PROJECT = "fleet.project"
LABEL_RELEASE = "fleet.release"
LABEL_HASH = "fleet.version_hash"
LABEL_CONTAINER = "fleet.container"


class DockerEngine:
    """The Docker client of one unit, made on first use, and the registries it may log in to."""

    def __init__(self, unit_id: str, client: docker.DockerClient | None = None):
        self.unit_id = unit_id
        self._client = client
        self.registries: dict[int, dict] = {}  # those of the deploy in progress: pulls use their credentials

    @property
    def client(self) -> docker.DockerClient:
        # Made on first use, so an agent starts (and queues releases) while the engine is down.
        if self._client is None:
            self._client = docker.from_env(timeout=120)
        return self._client

    def observe(self, previous: dict | None = None, needed_elsewhere=frozenset()) -> DeviceState:
        """The device as `plan()` needs it; DeployError("engine", ...) when the engine does not answer."""
        try:
            # Containers another agent labelled (another unit on a shared engine) are nobody's business here.
            containers = [self._as_running(c) for c in self.client.containers.list(all=True)
                          if (c.labels or {}).get(LABEL_UNIT) in (None, self.unit_id)]
            images = frozenset(tag for image in self.client.images.list() for tag in image.tags)
        except ENGINE_ERRORS as exc:
            raise DeployError("engine", f"the Docker engine does not answer: {reason(exc)}") from None
        return DeviceState(tuple(containers), images, previous, frozenset(needed_elsewhere))

    @staticmethod
    def _as_running(container) -> Running:
        labels = container.labels or {}
        return Running(name=container.name, project=labels.get(LABEL_PROJECT), release=labels.get(LABEL_RELEASE),
                       version_hash=labels.get(LABEL_HASH), running=container.status == "running",
                       image=(container.attrs.get("Config") or {}).get("Image"))

    def find(self, name: str):
        """The container named `name`, or None."""
        try:
            return self.client.containers.get(name)
        except NotFound:
            return None

    def remove_if_ours(self, name: str, release_id):
        """Remove `name` if this unit created it for `release_id`: a container of that name may be someone else's."""
        container = self.find(name)
        if container is None:
            return
        labels = container.labels or {}
        if labels.get(LABEL_UNIT) == self.unit_id and labels.get(LABEL_RELEASE) == str(release_id):
            container.remove(force=True)

    # --- registries -------------------------------------------------------------

    def login_all(self, registries: dict[int, dict]) -> dict[str, str]:
        """Log in to every registry with credentials; returns {host: reason} for those that refused."""
        failures = {}
        for registry in registries.values():
            if not registry.get("username"):
                continue
            host = registry_host(registry["url"])
            try:
                self.login(host, registry)
            except DeployError as exc:
                failures[host] = exc.reason
                log.warning("registry login failed host=%s reason=%s", host, exc.reason)
            else:
                log.info("logged in to registry %s as %s", host, registry["username"])
        return failures

    def login(self, host: str, registry: dict):
        try:
            self.client.login(username=registry["username"], password=registry["password"], registry=host,
                              reauth=True)
        except ENGINE_ERRORS as exc:
            raise DeployError("login", f"registry {host} refused the credentials of user "
                                       f"{registry['username']!r}: {reason(exc)}") from None

    def credentials(self, host: str) -> dict | None:
        """The registry with credentials whose host is `host`, among those of the deploy in progress."""
        for registry in self.registries.values():
            if registry_host(registry["url"]) == host and registry.get("username"):
                return registry
        return None
