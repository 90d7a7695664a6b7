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
