"""Helpers for deploy-engine tests: release documents, workload images and a Deployer on the real engine."""
from __future__ import annotations

import uuid

from fleet_device.deploy import LABEL_UNIT
from fleet_wire.release_policy import ReleasePolicy
from tests.support.infra import build_busybox_variant

# The engine and crash tests bind temporary directories and replace initial containers: they are about
# deploying, not about what a device trusts (that is tests/test_release_privileges.py).
TRUSTING = ReleasePolicy(allow_privileged=True)

# Exits at once on SIGTERM, so stopping it takes milliseconds, not the engine's stop timeout.
SERVE = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]


def workload(client, unique_name, hint="app", tag="v1", cmd=None, **kwargs) -> str:
    """Build a busybox image under a unique name; return its reference."""
    reference = unique_name.image(hint, tag=tag)
    return build_busybox_variant(client, reference, cmd=cmd or SERVE, **kwargs)


def spec(name, reference, **extra) -> dict:
    """One container of a release document, as the device receives it."""
    image, tag = reference.rsplit(":", 1)
    return {"name": name, "image": image, "tag": tag, "required_tags": [], "purge_data": False, "registry": None,
            "startup_parameters": {"environment": "", "binds": [], "network_mode": "none", "restart_policy": "no",
                                   "privileged": False},
            "fully_qualified_name": name, **extra}


def release(release_id, *containers, remove_containers=()) -> dict:
    return {"id": release_id, "version": f"{release_id}.0", "version_hash": uuid.uuid4().hex[:8],
            "containers": list(containers), "remove_containers": list(remove_containers)}


def message(project_id, release_doc, registries=()) -> dict:
    return {"v": 1, "project_id": project_id, "release": release_doc, "registries": list(registries)}


def owned_containers(client, unit_id, project_id=None):
    """The containers an agent labelled as its own, by name."""
    labels = [f"{LABEL_UNIT}={unit_id}"] + ([f"fleet.project={project_id}"] if project_id is not None else [])
    return {c.name: c for c in client.containers.list(all=True, filters={"label": labels})}
