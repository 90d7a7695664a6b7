"""The import floors hold: lint-imports keeps every contract of .importlinter, and breaks on a circle put back."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("fleet_wire", "fleet_server", "fleet_device")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / ".importlinter")], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": ""}, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_import_contract():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def tree_copy(tmp_path):
    """The three packages and the contract, copied where an import can be put back without touching the tree."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("fleet_server/models.py", "from .commands import models as command_models", "Inside the server"),
    ("fleet_server/messaging/ingest.py", "from ..commands.service import record_result", "Inside the server"),
    ("fleet_server/messaging/outbox.py", "from ..releases.service import release_document", "Inside the server"),
    ("fleet_server/devstack.py", "from fleet_device.provisioning import load_identity", "do not import each other"),
    ("fleet_wire/topics.py", "import flask", "imports neither side"),
    ("fleet_wire/topics.py", "import paho.mqtt.client", "imports neither side"),
    ("fleet_server/releases/service.py", "from ..deployments import service", "No circles"),
])
def test_a_circle_or_a_crossing_put_back_breaks_a_contract(tree_copy, module, line, broken):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = _lint_imports(tree_copy)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout.split("Broken contracts")[-1], result.stdout
