"""The local base image the compose stack's Dockerfiles build on, and a docker-compose runner for tests.

Base images cannot be pulled on this machine, so the Dockerfiles take `ARG BASE_IMAGE`
(debian:bookworm-slim for users) and the tests build a Debian bookworm root with
mmdebstrap under a local name instead.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet

import docker

from tests.support.infra import _check_import_result, _image_build_lock, _split_ref, image_exists

log = logging.getLogger(__name__)

BASE_IMAGE = "fleet-test/bookworm-base:1"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Inside the image, where the host's trust store is copied. Package downloads from
# the container go through the same TLS-inspecting proxy as the host's, so the image
# must trust what the host trusts; users' debian:bookworm-slim needs none of this.
IMAGE_CA_BUNDLE = "/etc/ssl/host-ca-bundle.crt"


def ensure_base_image(client: docker.DockerClient, *, timeout: float = 900) -> str:
    """Build fleet-test/bookworm-base:1 (Debian bookworm minbase) unless the engine has it."""
    if image_exists(client, BASE_IMAGE):
        return BASE_IMAGE
    with _image_build_lock(BASE_IMAGE):
        if image_exists(client, BASE_IMAGE):
            return BASE_IMAGE
        if shutil.which("mmdebstrap") is None:
            raise RuntimeError("mmdebstrap not found: install it (`make install`)")
        started = time.monotonic()
        changes = []
        hooks = []
        if HOST_CA_BUNDLE.is_file():
            hooks = [f"--customize-hook=mkdir -p \"$1/etc/ssl\" && cp {HOST_CA_BUNDLE} \"$1{IMAGE_CA_BUNDLE}\""]
            changes = [f"ENV PIP_CERT={IMAGE_CA_BUNDLE}"]
        with tempfile.TemporaryDirectory(prefix="fleet-test-base-") as workdir:
            rootfs = Path(workdir) / "rootfs.tar"
            command = ["mmdebstrap", "--quiet", "--variant=minbase", *hooks, "bookworm", str(rootfs)]
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                       stdin=subprocess.DEVNULL)
            if completed.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
            repository, tag = _split_ref(BASE_IMAGE)
            result = client.api.import_image_from_file(str(rootfs), repository=repository, tag=tag, changes=changes)
            _check_import_result(result, BASE_IMAGE)
        log.info("built %s in %.1fs", BASE_IMAGE, time.monotonic() - started)
    return BASE_IMAGE


REPO = Path(__file__).resolve().parents[2]
# Built images are kept under this prefix between runs (like fleet-test/mosquitto:2):
# a rebuild with the layer cache takes seconds, from nothing several minutes.
IMAGE_PREFIX = "fleet-test-compose"


@dataclass
class ComposeProject:
    """docker-compose on the repository's docker-compose.yml, under a project name of its own."""

    name: str
    env: dict

    def run(self, *args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "-p", self.name, "--profile", "demo",
                   *args]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                                 f"{result.stderr[-6000:]}")
        return result

    def build(self, client: docker.DockerClient):
        # Two test runs building the same tags at once would race; one waits for the other.
        with _image_build_lock(f"{IMAGE_PREFIX}/stack"):
            started = time.monotonic()
            self.run("build", timeout=1500)
            log.info("compose build took %.1fs", time.monotonic() - started)

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", check=False).stdout


def compose_environment(base_image: str, **settings) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLEET_", "COMPOSE_"))}
    env.update({"BASE_IMAGE": base_image, "FLEET_IMAGE_PREFIX": IMAGE_PREFIX, "FLEET_BIND": "127.0.0.1",
                "FLEET_SECRET_KEY": Fernet.generate_key().decode()})
    env.update({key: str(value) for key, value in settings.items()})
    return env
