"""Pytest plugin: real Docker engine, Mosquitto broker and private registry fixtures for Fleet's tests."""
from __future__ import annotations

import os

# testcontainers reads its configuration when it is imported, so these must be
# in place first. The reaper image cannot be pulled here, and published ports
# must be reached through loopback rather than the bridge gateway. setdefault
# keeps whatever the caller (the Makefile, a developer) chose.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
os.environ.setdefault("TC_HOST", "127.0.0.1")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import docker  # noqa: E402
import docker.errors  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
from docker.models.containers import Container  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from testcontainers.core.container import DockerContainer  # noqa: E402

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NAME_PREFIX = "fleet-test-"

# Every container this plugin starts carries this label, so the end-of-session
# sweep can tell this run's leftovers from anything else on the engine (a
# developer's `make run` stack, a concurrent test run).
SESSION_ID = uuid.uuid4().hex[:8]
SESSION_LABEL = "fleet.test.session"
SESSION_LABELS = {SESSION_LABEL: SESSION_ID}

BUSYBOX_IMAGE = "fleet-test/busybox:1"
MOSQUITTO_IMAGE = "fleet-test/mosquitto:2"
MOSQUITTO_CMD = ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]
MOSQUITTO_PORT = 1883
DEBIAN_SUITE = "bookworm"

# Image builds are shared by every pytest run on the machine; the lock keeps
# two concurrent runs from building (and tagging) the same image twice.
IMAGE_LOCK_DIR = Path(tempfile.gettempdir())

_session_names: set[str] = set()
_session_used_engine = False


# --- small helpers ----------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll `predicate` until it is true; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _short_id() -> str:
    return uuid.uuid4().hex[:8]


def _slug(text: str, limit: int) -> str:
    """Lowercase [a-z0-9-] form of text, valid in container and image names."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].strip("-")


def _new_container_name(role: str) -> str:
    name = f"{NAME_PREFIX}{role}-{_short_id()}"
    _session_names.add(name)
    return name


def image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


@contextlib.contextmanager
def _image_build_lock(ref: str) -> Iterator[None]:
    path = IMAGE_LOCK_DIR / f"fleet-test-image-{_slug(ref, 60)}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_import_result(result: Any, ref: str) -> None:
    # The import endpoint answers 200 even when it fails, with the error in the body.
    text = result if isinstance(result, str) else json.dumps(result)
    if "error" in text.lower():
        raise RuntimeError(f"docker import of {ref} failed: {text}")


def _split_ref(ref: str) -> tuple[str, str]:
    """("repo", "tag") of an image reference; the tag defaults to latest."""
    repository, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repository, tag


# --- busybox workload images ------------------------------------------------


def _busybox_binary() -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file():
            return candidate
    raise RuntimeError("busybox not found: install busybox-static (`make install`)")


@functools.lru_cache(maxsize=1)
def busybox_root_tar() -> bytes:
    """A root filesystem holding a static busybox and a link for each of its applets.

    Built in memory with fixed timestamps, so every image imported from it
    shares one identical layer (one blob in a registry, however many tags).
    """
    binary = _busybox_binary()
    applets = subprocess.run(
        [str(binary), "--list"], check=True, capture_output=True, text=True, timeout=10
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for directory in ("bin", "dev", "etc", "proc", "sys", "var", "var/www", "usr", "usr/bin"):
            add_dir(directory)
        add_dir("root", 0o700)
        add_dir("tmp", 0o1777)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("bin/busybox", binary.read_bytes(), 0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            if "/" in applet:
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def _import_busybox(client: docker.DockerClient, ref: str, changes: Sequence[str]) -> None:
    repository, tag = _split_ref(ref)
    result = client.api.import_image_from_data(
        busybox_root_tar(), repository=repository, tag=tag, changes=list(changes)
    )
    _check_import_result(result, ref)
    log.info("imported busybox image %s", ref)


def ensure_busybox_image(client: docker.DockerClient) -> str:
    """Build fleet-test/busybox:1 unless the engine already has it; return its reference."""
    if image_exists(client, BUSYBOX_IMAGE):
        return BUSYBOX_IMAGE
    with _image_build_lock(BUSYBOX_IMAGE):
        if not image_exists(client, BUSYBOX_IMAGE):
            _import_busybox(client, BUSYBOX_IMAGE, ['CMD ["/bin/sh"]'])
    return BUSYBOX_IMAGE


def _healthcheck_instruction(healthcheck: str | Mapping[str, Any]) -> str:
    """HEALTHCHECK instruction from a shell command or a mapping of its options.

    A mapping takes `test` (shell string, or exec list) and optional
    `interval`, `timeout`, `start_period` (seconds) and `retries`. The defaults
    are short so tests see a verdict within seconds.
    """
    if isinstance(healthcheck, str):
        if healthcheck.upper() == "NONE":
            return "HEALTHCHECK NONE"
        healthcheck = {"test": healthcheck}
    options = {"interval": 1, "timeout": 2, "retries": 2, **healthcheck}
    test = options["test"]
    command = json.dumps(list(test)) if not isinstance(test, str) else test
    flags = f"--interval={options['interval']}s --timeout={options['timeout']}s --retries={options['retries']}"
    # The engine rejects a zero start period, so it is only passed when set.
    if options.get("start_period"):
        flags += f" --start-period={options['start_period']}s"
    return f"HEALTHCHECK {flags} CMD {command}"


def build_busybox_variant(
    client: docker.DockerClient,
    ref: str,
    cmd: str | Sequence[str] | None = None,
    healthcheck: str | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Import another image from the busybox root under `ref`; return `ref`.

    `cmd` is a shell string or an exec list (default /bin/sh); `healthcheck`
    is a shell command, "NONE", or a mapping (see _healthcheck_instruction).
    Each call makes an image with its own ID (a label records a nonce), so
    two "releases" built alike are still told apart by the engine, while the
    filesystem layer stays shared. The engine accepts HEALTHCHECK as an
    import change, so no Dockerfile build is needed. The image carries this
    session's label, so the end-of-session sweep removes it even when a
    container outside the test's names still held it as its tags went.
    """
    ensure_busybox_image(client)
    if cmd is None:
        cmd = ["/bin/sh"]
    changes = [f"CMD {json.dumps(list(cmd)) if not isinstance(cmd, str) else cmd}"]
    for key, value in (env or {}).items():
        changes.append(f"ENV {key}={json.dumps(str(value))}")
    if healthcheck is not None:
        changes.append(_healthcheck_instruction(healthcheck))
    changes.append(
        f"LABEL fleet.test.variant={json.dumps(ref)} fleet.test.nonce={_short_id()} "
        f"{SESSION_LABEL}={SESSION_ID}"
    )
    _import_busybox(client, ref, changes)
    return ref


# --- the Mosquitto image ----------------------------------------------------


def ensure_mosquitto_image(client: docker.DockerClient, *, timeout: float = 600) -> str:
    """Build fleet-test/mosquitto:2 (Debian's mosquitto) unless the engine has it."""
    if image_exists(client, MOSQUITTO_IMAGE):
        return MOSQUITTO_IMAGE
    with _image_build_lock(MOSQUITTO_IMAGE):
        if image_exists(client, MOSQUITTO_IMAGE):
            return MOSQUITTO_IMAGE
        if shutil.which("mmdebstrap") is None:
            raise RuntimeError("mmdebstrap not found: install it (`make install`)")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fleet-test-mosquitto-") as workdir:
            rootfs = Path(workdir) / "rootfs.tar"
            command = [
                "mmdebstrap", "--quiet", "--variant=essential", "--include=mosquitto",
                DEBIAN_SUITE, str(rootfs),
            ]
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
            if completed.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(command)} failed ({completed.returncode}):\n"
                    f"{completed.stderr[-4000:]}"
                )
            repository, tag = _split_ref(MOSQUITTO_IMAGE)
            result = client.api.import_image_from_file(
                str(rootfs), repository=repository, tag=tag,
                changes=[f"CMD {json.dumps(MOSQUITTO_CMD)}"],
            )
            _check_import_result(result, MOSQUITTO_IMAGE)
        log.info("built %s in %.1fs", MOSQUITTO_IMAGE, time.monotonic() - started)
    return MOSQUITTO_IMAGE


# --- MQTT -------------------------------------------------------------------


def connect_mqtt(
    host: str,
    port: int,
    *,
    client_id: str | None = None,
    clean_start: bool = True,
    session_expiry: int | None = None,
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
    timeout: float = 10.0,
) -> tuple[mqtt.Client, bool]:
    """A paho MQTTv5 client connected to host:port with its network loop running.

    Returns (client, session_present). The CONNACK is awaited synchronously
    before the loop thread starts, so a refused or dropped connection raises
    here instead of turning into paho's background reconnect attempts.
    on_message is installed before connecting because a resumed session's
    queued messages arrive right behind the CONNACK.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{NAME_PREFIX}{_short_id()}",
        protocol=mqtt.MQTTv5,
    )
    if on_message is not None:
        client.on_message = on_message
    connack: dict[str, Any] = {}

    def on_connect(_client, _userdata, flags, reason_code, _properties):
        connack["reason_code"] = reason_code
        connack["session_present"] = flags.session_present

    client.on_connect = on_connect
    properties = None
    if session_expiry is not None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
    try:
        client.connect(host, port, keepalive=30, clean_start=clean_start, properties=properties)
        deadline = time.monotonic() + timeout
        while "reason_code" not in connack:
            status = client.loop(timeout=0.1)
            if status != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"MQTT connection to {host}:{port} lost before CONNACK ({status.name})")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no CONNACK from {host}:{port} within {timeout:.0f}s")
        if connack["reason_code"].is_failure:
            raise ConnectionError(f"MQTT broker {host}:{port} refused: {connack['reason_code']}")
    except BaseException:
        sock = client.socket()
        if sock is not None:
            sock.close()
        raise
    client.loop_start()
    return client, bool(connack["session_present"])


def subscribe_and_wait(client: mqtt.Client, topic: str, qos: int = 1, *, timeout: float = 10.0) -> None:
    """Subscribe and block until the broker grants it (SUBACK), bounded by timeout."""
    # Keyed by mid: the SUBACK can be handled before subscribe() has returned the mid.
    acks: dict[int, list[Any]] = {}

    def on_subscribe(_client, _userdata, mid, reason_codes, _properties):
        acks[mid] = reason_codes

    client.on_subscribe = on_subscribe
    status, mid = client.subscribe(topic, qos=qos)
    if status != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise ConnectionError(f"subscribe to {topic} failed: {status.name}")
    wait_until(lambda: mid in acks, timeout=timeout, interval=0.01, what=f"SUBACK for {topic}")
    failures = [code for code in acks[mid] if code.is_failure]
    if failures:
        raise ConnectionError(f"subscription to {topic} refused: {failures}")


def close_mqtt(client: mqtt.Client) -> None:
    """Disconnect cleanly and stop the network loop."""
    with contextlib.suppress(Exception):
        client.disconnect()
    client.loop_stop()


def wait_for_mqtt(host: str, port: int, *, timeout: float = 30.0) -> None:
    """Block until an MQTTv5 client can connect (CONNACK success), bounded by timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client, _ = connect_mqtt(host, port, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        except (OSError, TimeoutError) as exc:
            last_error = exc
            time.sleep(0.2)
            continue
        close_mqtt(client)
        return
    raise TimeoutError(f"MQTT broker {host}:{port} not ready after {timeout:.0f}s: {last_error}")


# --- broker containers ------------------------------------------------------

TEST_BROKER_CONFIG = """\
# Written by tests/support/infra.py for one test broker container.
listener 1883 0.0.0.0
allow_anonymous true
persistence true
persistence_location /var/lib/mosquitto/
set_tcp_nodelay true
max_queued_messages 10000
log_dest stdout
log_type error
log_type warning
log_type notice
log_type information
"""


@dataclass(frozen=True)
class Broker:
    """Where a test broker listens: host, port and mqtt:// url."""

    host: str
    port: int
    url: str


@dataclass(frozen=True)
class RestartableBroker(Broker):
    """A broker a test may stop and start again (same container, port and persistence)."""

    container: Container = field(repr=False, compare=False)

    def stop(self, timeout: int = 10) -> None:
        """Stop gracefully: SIGTERM lets mosquitto write its persistence file."""
        self.container.stop(timeout=timeout)
        self.container.reload()
        log.info("broker %s stopped (status=%s)", self.container.name, self.container.status)

    def start(self, timeout: float = 30.0) -> None:
        """Start the same container again and wait until it accepts MQTT clients."""
        self.container.start()
        wait_for_mqtt(self.host, self.port, timeout=timeout)
        log.info("broker %s started again on %s", self.container.name, self.url)


def start_broker_container(
    image: str, config_dir: Path, *, host_port: int | None = None, timeout: float = 30.0
) -> tuple[DockerContainer, int]:
    """Start a Mosquitto container published on loopback; return it with its host port.

    Without host_port the engine picks one. The binding names 127.0.0.1
    explicitly so the broker stays loopback-only even on an engine that was
    not started with --ip 127.0.0.1.
    """
    config_path = config_dir / "mosquitto.conf"
    config_path.write_text(TEST_BROKER_CONFIG)
    container = DockerContainer(image, name=_new_container_name("broker"), labels=SESSION_LABELS)
    container.with_volume_mapping(str(config_path), "/etc/mosquitto/mosquitto.conf", "ro")
    # with_bind_ports() cannot express a host address; docker-py takes a tuple.
    container.ports[f"{MOSQUITTO_PORT}/tcp"] = (LOOPBACK, host_port) if host_port else (LOOPBACK,)
    container.start()
    try:
        port = int(container.get_exposed_port(MOSQUITTO_PORT))
        wait_for_mqtt(LOOPBACK, port, timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            log.error("broker container logs:\n%s", container.get_wrapped_container().logs().decode(errors="replace"))
        container.stop()
        raise
    return container, port


# --- private registry -------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    """A private registry on loopback that requires username/password."""

    url: str  # host:port, as it appears in image references
    username: str
    password: str

    @property
    def auth_config(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password, "serveraddress": self.url}

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"{self.url}/{repository}:{tag}"

    def push(self, client: docker.DockerClient, local_ref: str, repository: str, tag: str = "latest") -> str:
        return push_image(client, self, local_ref, repository, tag)


def push_image(
    client: docker.DockerClient, registry: Registry, local_ref: str, repository: str, tag: str = "latest"
) -> str:
    """Tag local_ref as registry/repository:tag, push it with the registry's credentials, return that reference.

    The login is remembered by this docker-py client, so later pulls from the
    same registry work without passing auth_config.
    """
    remote_repository = f"{registry.url}/{repository}"
    client.login(username=registry.username, password=registry.password, registry=registry.url, reauth=True)
    client.images.get(local_ref).tag(remote_repository, tag)
    for event in client.api.push(
        remote_repository, tag, stream=True, decode=True, auth_config=registry.auth_config
    ):
        if "error" in event:
            raise RuntimeError(f"push of {remote_repository}:{tag} failed: {event['error']}")
    log.info("pushed %s as %s:%s", local_ref, remote_repository, tag)
    return f"{remote_repository}:{tag}"


def _registry_config(root: Path, port: int) -> str:
    return f"""\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / 'storage'}
  delete:
    enabled: true
http:
  addr: {LOOPBACK}:{port}
  secret: {secrets.token_hex(16)}
auth:
  htpasswd:
    realm: fleet-test
    path: {root / 'htpasswd'}
"""


@contextlib.contextmanager
def run_registry(root: Path, *, timeout: float = 30.0) -> Iterator[Registry]:
    """Run Debian's docker-registry under root/ with htpasswd auth until the block ends."""
    executable = shutil.which("docker-registry")
    htpasswd = shutil.which("htpasswd")
    if executable is None or htpasswd is None:
        raise RuntimeError("docker-registry/htpasswd not found: install them (`make install`)")
    username, password = f"fleet-{_short_id()}", secrets.token_urlsafe(18)
    entry = subprocess.run(
        [htpasswd, "-Bbn", username, password], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    (root / "htpasswd").write_text(entry + "\n")
    port = free_port()
    (root / "config.yml").write_text(_registry_config(root, port))
    log_path = root / "registry.log"
    registry = Registry(url=f"{LOOPBACK}:{port}", username=username, password=password)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [executable, "serve", str(root / "config.yml")],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                return requests.get(f"http://{registry.url}/v2/", timeout=1).status_code == 401
            except requests.RequestException:
                return False

        wait_until(answers, timeout=timeout, what=f"docker-registry on {registry.url}")
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --- cleanup ----------------------------------------------------------------


def _container_name(summary: Mapping[str, Any]) -> str:
    names = summary.get("Names") or ["/"]
    return names[0].lstrip("/")


def remove_containers(client: docker.DockerClient, keep: Callable[[Mapping[str, Any]], bool], name_filter: str) -> list[str]:
    """Force-remove containers whose name contains name_filter unless keep(summary); return their names."""
    removed = []
    for summary in client.api.containers(all=True, filters={"name": name_filter}):
        if keep(summary):
            continue
        name = _container_name(summary)
        try:
            client.api.remove_container(summary["Id"], force=True, v=True)
            removed.append(name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("could not remove container %s: %s", name, exc)
    return removed


def prune_session_images(client: docker.DockerClient) -> None:
    """Delete this session's images that lost all their tags and no container uses."""
    try:
        client.images.prune(filters={"dangling": True, "label": f"{SESSION_LABEL}={SESSION_ID}"})
    except docker.errors.APIError as exc:
        log.warning("could not prune this session's untagged images: %s", exc)


def remove_image_tags(client: docker.DockerClient, matches: Callable[[str], bool]) -> list[str]:
    """Remove every local image tag for which matches(tag) is true; return the tags removed."""
    removed = []
    for image in client.images.list():
        for tag in image.tags:
            if not matches(tag):
                continue
            try:
                client.images.remove(tag, force=True)
                removed.append(tag)
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("could not remove image %s: %s", tag, exc)
    return removed


class UniqueNames:
    """Hands out unique fleet-test-* names and removes what carries them afterwards.

    Call it for a container/project/client name; `.image()` for an image
    reference. cleanup() force-removes containers whose name starts with a
    handed-out name and image tags whose repository's last component does
    (so `127.0.0.1:PORT/<name>:v2` pushed to a test registry goes too).
    """

    def __init__(self, test_name: str) -> None:
        slug = _slug(re.sub(r"^test_?", "", test_name), 30)
        self._stem = f"{NAME_PREFIX}{slug}-" if slug else NAME_PREFIX
        self.names: list[str] = []

    def __call__(self, hint: str = "") -> str:
        hint = _slug(hint, 16)
        name = f"{self._stem}{hint + '-' if hint else ''}{_short_id()}"
        self.names.append(name)
        _session_names.add(name)
        return name

    def image(self, hint: str = "", tag: str = "1") -> str:
        return f"{self(hint)}:{tag}"

    def owns(self, name: str) -> bool:
        return any(name.startswith(given) for given in self.names)

    def cleanup(self, client: docker.DockerClient) -> None:
        if not self.names:
            return
        containers = remove_containers(client, lambda s: not self.owns(_container_name(s)), NAME_PREFIX)
        images = remove_image_tags(
            client, lambda tag: self.owns(_split_ref(tag)[0].rsplit("/", 1)[-1])
        )
        prune_session_images(client)
        if containers or images:
            log.info("removed containers=%s images=%s", containers, images)


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _sweep_session_leftovers() -> Iterator[None]:
    """At session end, force-remove leftover containers and images that this session created, and only those."""
    yield
    if not (_session_used_engine or _session_names):
        return
    try:
        client = docker.from_env(timeout=60)
    except docker.errors.DockerException as exc:
        log.warning("end-of-session sweep skipped, engine unreachable: %s", exc)
        return
    try:

        def created_elsewhere(summary: Mapping[str, Any]) -> bool:
            name = _container_name(summary)
            labels = summary.get("Labels") or {}
            ours = labels.get(SESSION_LABEL) == SESSION_ID or any(name.startswith(n) for n in _session_names)
            return not (name.startswith(NAME_PREFIX) and ours)

        removed = remove_containers(client, created_elsewhere, NAME_PREFIX)
        # Images built this session: those a test forgot, and those whose tags
        # were removed while some container still used them (left untagged).
        for image in client.api.images(filters={"label": f"{SESSION_LABEL}={SESSION_ID}"}):
            with contextlib.suppress(docker.errors.APIError):
                client.api.remove_image(image["Id"], force=True)
    finally:
        client.close()
    if removed:
        log.warning("end-of-session sweep removed leftover containers: %s", removed)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A docker-py client for the local engine; fails the test if the engine does not answer."""
    global _session_used_engine
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        pytest.fail(f"Docker engine not reachable ({exc}); start it with `make engine`", pytrace=False)
    _session_used_engine = True
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """Reference of the local busybox workload image (built on first use)."""
    return ensure_busybox_image(docker_client)


@pytest.fixture(scope="session")
def mosquitto_image(docker_client: docker.DockerClient) -> str:
    """Reference of the local Mosquitto 2 image (built with mmdebstrap on first use)."""
    return ensure_mosquitto_image(docker_client)


@pytest.fixture(scope="session")
def broker(mosquitto_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto broker in a container, shared by the session, on a random loopback port."""
    container, port = start_broker_container(mosquitto_image, tmp_path_factory.mktemp("broker"))
    try:
        yield Broker(host=LOOPBACK, port=port, url=f"mqtt://{LOOPBACK}:{port}")
    finally:
        container.stop()


@pytest.fixture
def restartable_broker(mosquitto_image: str, tmp_path: Path) -> Iterator[RestartableBroker]:
    """A broker of this test's own, with stop()/start() that keep its port and persistence."""
    # An engine-chosen port may change across stop/start; a fixed one does not.
    port = free_port()
    config_dir = tmp_path / "restartable-broker"
    config_dir.mkdir()
    container, _ = start_broker_container(mosquitto_image, config_dir, host_port=port)
    try:
        yield RestartableBroker(
            host=LOOPBACK, port=port, url=f"mqtt://{LOOPBACK}:{port}",
            container=container.get_wrapped_container(),
        )
    finally:
        container.stop()


@pytest.fixture
def registry(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[Registry]:
    """A private registry of this test's own on a free loopback port, with random credentials."""
    root = tmp_path / "registry"
    root.mkdir()
    with run_registry(root) as running:
        try:
            yield running
        finally:
            remove_image_tags(docker_client, lambda tag: tag.startswith(f"{running.url}/"))


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Iterator[UniqueNames]:
    """Factory of fleet-test-<test>-<hint>-<id> names; removes their containers and images afterwards."""
    names = UniqueNames(request.node.name)
    yield names
    if not names.names:
        return
    # A client of its own: the test may never have asked for docker_client.
    client = docker.from_env(timeout=60)
    try:
        names.cleanup(client)
    finally:
        client.close()
