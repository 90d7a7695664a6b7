"""The distribution: what each extra brings, the console scripts' hint for a missing extra, the agent installed alone."""
from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fleet_entry import DISTRIBUTION, requirement_names

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / "var" / "wheelhouse"
OWN_PACKAGES = {"fleet_wire", "fleet_server", "fleet_device", "fleet_entry"}


def _declared() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def _requirements(text: str) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in text.splitlines() if line.strip()}


def _base() -> set[str]:
    return _requirements(_declared()["options"]["install_requires"])


def _extra(name: str) -> set[str]:
    return _requirements(_declared()["options.extras_require"][name])


def _third_party_imports(package: str) -> set[str]:
    """The top-level modules a package's sources import, leaving out the standard library and Fleet's own."""
    modules = set()
    for source in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - OWN_PACKAGES - {"__future__"}


def _distributions(modules: set[str]) -> set[str]:
    """The installed distributions that provide `modules` (every module must be provided by one)."""
    providers = metadata.packages_distributions()
    unprovided = sorted(module for module in modules if module not in providers)
    assert not unprovided, f"no installed distribution provides {unprovided}"
    return {canonicalize_name(name) for module in modules for name in providers[module]}


@pytest.mark.parametrize("package, extras", [
    ("fleet_wire", []),
    ("fleet_device", ["device"]),
    ("fleet_server", ["server"]),
])
def test_each_package_imports_only_what_the_base_and_its_extra_declare(package, extras):
    declared = _base().union(*(_extra(extra) for extra in extras))
    undeclared = _distributions(_third_party_imports(package)) - declared
    assert not undeclared, f"{package} imports {sorted(undeclared)}, declared by neither the base nor {extras}"


def test_the_base_holds_neither_side():
    sides = {"paho-mqtt", "docker", "flask", "sqlalchemy", "gunicorn", "requests", "click"}
    assert not _base() & sides


def test_the_operator_extra_brings_neither_the_agent_nor_the_server():
    heavy = (_extra("device") | _extra("server")) - {"requests", "click"}
    assert _extra("cli") and not _extra("cli") & heavy


def test_the_test_extra_pulls_every_other_extra():
    pulled = [Requirement(line) for line in _declared()["options.extras_require"]["test"].splitlines() if line]
    own = [requirement for requirement in pulled if canonicalize_name(requirement.name) == DISTRIBUTION]
    assert len(own) == 1 and own[0].extras == {"device", "server", "cli", "postgres"}


def test_requirement_names_are_read_per_extra_from_the_distribution_metadata():
    requires = [
        "msgspec<1,>=0.19",
        'paho-mqtt<3,>=2.1; extra == "device"',
        "docker<8,>=7.1 ; extra == 'device'",
        'Flask<4,>=3.0; extra == "server"',
        'psycopg[binary]<4,>=3.1; extra == "postgres"',
        'fleet-containers[device,server]; extra == "test"',
    ]
    assert requirement_names(requires, "device") == ["paho-mqtt", "docker"]
    assert requirement_names(requires, "postgres") == ["psycopg"]
    assert requirement_names(requires, "cli") == []


# --- the agent installed alone, from the wheelhouse ----------------------------------


def _offline_environment() -> dict:
    """The environment for pip and the new virtualenv: no pip configuration (its indexes and links), no tree on the path."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PIP_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _run(command: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _succeeds(command: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    completed = _run(command, env, timeout)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


def _project_wheel(tmp_path: Path, env: dict) -> Path:
    """The project's wheel, built from a copy of the tree (so the build leaves nothing in it) with no index."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "benchmarks"))
    wheels = tmp_path / "dist"
    _succeeds([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links", WHEELHOUSE,
               "--wheel-dir", wheels, source], env)
    [wheel] = wheels.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv holding the project's wheel with the device extra, installed from the wheelhouse alone."""
    if not (WHEELHOUSE / ".built").is_file():
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: run `make install`")
    tmp_path = tmp_path_factory.mktemp("packaging")
    env = _offline_environment()
    wheel = _project_wheel(tmp_path, env)
    venv = tmp_path / "venv"
    _succeeds([sys.executable, "-m", "venv", venv], env)
    _succeeds([venv / "bin" / "python", "-m", "pip", "install", "--no-index", "--find-links", WHEELHOUSE,
               f"{wheel}[device]"], env)
    return venv


@pytest.mark.slow
def test_the_agent_installed_alone_starts_and_imports(device_venv):
    env = _offline_environment()
    helped = _succeeds([device_venv / "bin" / "fleet-device", "--help"], env, timeout=60)
    assert "usage: fleet-device" in helped.stdout
    _succeeds([device_venv / "bin" / "python", "-c", "import fleet_device.agent"], env, timeout=60)


@pytest.mark.slow
def test_the_agent_installed_alone_has_no_server_dependencies(device_venv):
    env = _offline_environment()
    for module in ("flask", "sqlalchemy", "gunicorn"):
        imported = _run([device_venv / "bin" / "python", "-c", f"import {module}"], env, timeout=60)
        assert imported.returncode != 0 and "ModuleNotFoundError" in imported.stderr, module


@pytest.mark.slow
def test_the_server_command_without_its_extra_names_the_extra_in_one_line(device_venv):
    served = _run([device_venv / "bin" / "fleet-server", "--help"], _offline_environment(), timeout=60)
    assert served.returncode == 1
    assert served.stdout == ""
    [line] = served.stderr.splitlines()
    assert line.startswith(f"fleet-server needs the server extra: pip install '{DISTRIBUTION}[server]' (missing: ")
