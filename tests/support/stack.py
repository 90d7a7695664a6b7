"""Fixtures that run Fleet itself: the app in-process, and the real server, worker and agents as processes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.support.infra import free_port

VENV_BIN = Path(sys.executable).parent


def eventually(predicate, timeout=30.0, interval=0.2, message="condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}; last value: {last!r}")


def _command(name):
    path = VENV_BIN / name
    return [str(path)] if path.exists() else [sys.executable, "-m", f"fleet_{name.split('-')[1]}.cli"]


@dataclass
class Process:
    """A Fleet process started by a test, its output kept in a log file."""

    args: list
    env: dict
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self):
        self.log_handle = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, env=self.env, stdout=self.log_handle, stderr=subprocess.STDOUT)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if getattr(self, "log_handle", None):
            self.log_handle.close()

    def kill(self):
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Agent:
    unit_id: str
    state_dir: Path
    api_url: str
    process: Process

    def sleep(self, budget=120) -> subprocess.CompletedProcess:
        """Run `fleet-device sleep` against this agent, as a power manager would."""
        host_port = self.api_url.removeprefix("http://")
        return subprocess.run(
            _command("fleet-device") + ["sleep", "--api", host_port, "--budget", str(budget)],
            capture_output=True, text=True, timeout=budget + 30, env=self.process.env,
        )


@dataclass
class Stack:
    """A running server + worker on their own SQLite database, against the session broker."""

    url: str
    token: str
    env: dict
    tmp: Path
    broker_url: str
    processes: list = field(default_factory=list)
    agents: list = field(default_factory=list)

    def request(self, method, path, **kwargs) -> requests.Response:
        headers = {"Authorization": f"APIToken {self.token}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def create_device(self, name="device") -> dict:
        response = self.post("/dongle/devices/", json={"name": name})
        assert response.status_code == 201, response.text
        return response.json()

    def start_agent(self, device: dict, settle=1.0, state_dir: Path | None = None, extra_args=()) -> Agent:
        unit_id = device["unit_id"]
        state_dir = state_dir or self.tmp / f"agent-{unit_id[:8]}"
        port = free_port()
        env = {**self.env, "FLEET_LOG_LEVEL": "DEBUG"}
        args = _command("fleet-device") + [
            "run", "--unit-id", unit_id, "--broker", self.broker_url, "--state-dir", str(state_dir),
            "--api", f"127.0.0.1:{port}", "--minion-id-file", str(state_dir / "minion_id"), "--settle", str(settle),
            # One agent needs no spreading; tests that restart the broker should not wait for it.
            "--reconnect-window", "2",
            *extra_args,
        ]
        process = Process(args, env, self.tmp / f"agent-{unit_id[:8]}.log").start()
        self.processes.append(process)
        agent = Agent(unit_id, state_dir, f"http://127.0.0.1:{port}", process)
        self.agents.append(agent)
        eventually(lambda: _answers(agent.api_url + "/"), 20, message=f"agent {unit_id} local API")
        return agent

    def start_worker(self, worker_id=None) -> Process:
        worker_id = worker_id or f"test-{uuid.uuid4().hex[:8]}"
        process = Process(
            _command("fleet-server") + ["worker", "--worker-id", worker_id], self.env, self.tmp / f"worker-{worker_id}.log"
        ).start()
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-6000:]}" for p in self.processes)


def _answers(url) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


def _run(args, env) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


def server_env(tmp: Path, broker_url: str, database_url: str | None = None) -> dict:
    return {
        **os.environ,
        "FLEET_VAR_DIR": str(tmp / "var"),
        "FLEET_DATABASE_URL": database_url or f"sqlite:///{tmp / 'fleet.db'}",
        "FLEET_MQTT_URL": broker_url,
        # Each test's workers form their own shared-subscription group on the shared broker.
        "FLEET_MQTT_GROUP": f"fleet-test-{uuid.uuid4().hex[:8]}",
        "FLEET_LOG_LEVEL": "INFO",
    }


def remove_agent_containers(docker_client, unit_ids):
    """Remove every container the given agents labelled as theirs."""
    for unit_id in set(unit_ids):
        for container in docker_client.containers.list(all=True, filters={"label": f"fleet.unit_id={unit_id}"}):
            container.remove(force=True)


@contextlib.contextmanager
def running_stack(broker_url: str, docker_client, tmp: Path, database_url: str | None = None, *,
                  extra_env: dict | None = None, worker_id: str | None = None, web_workers: int = 2):
    """Server (gunicorn) and ingest worker as real processes on a fresh database (SQLite in `tmp` by default)."""
    env = {**server_env(tmp, broker_url, database_url), **(extra_env or {})}
    _run(_command("fleet-server") + ["db", "upgrade", "heads"], env)
    token = _run(_command("fleet-server") + ["tokens", "create", "--name", "tests"], env).splitlines()[-1]
    port = free_port()
    running = Stack(f"http://127.0.0.1:{port}", token, env, tmp, broker_url)
    server = Process(
        _command("fleet-server") + ["serve", "--bind", f"127.0.0.1:{port}", "--workers", str(web_workers)], env,
        tmp / "server.log",
    ).start()
    running.processes.append(server)
    running.worker = running.start_worker(worker_id)
    try:
        eventually(lambda: _answers(running.url + "/health"), 30, message="the server's /health")
        yield running
    finally:
        for process in reversed(running.processes):
            process.stop()
        remove_agent_containers(docker_client, [a.unit_id for a in running.agents])


@pytest.fixture
def stack(request, broker, docker_client, tmp_path):
    """Server (gunicorn) and ingest worker as real processes on a fresh SQLite database.

    Parametrise it indirectly with "postgresql" to run on a fresh PostgreSQL database instead.
    """
    from tests.support.databases import fresh_database

    kind = getattr(request, "param", "sqlite")
    database_url = fresh_database(kind, request, tmp_path) if kind != "sqlite" else None
    with running_stack(broker.url, docker_client, tmp_path, database_url) as running:
        yield running


def make_app(database_url: str, tmp_path: Path, mqtt_url: str | None = None):
    """The Flask app on an already migrated database; without mqtt_url nothing listens and publications stay queued."""
    from fleet_server.app import create_app

    return create_app(
        {
            "SQLALCHEMY_DATABASE_URI": database_url,
            "FLEET_MQTT_URL": mqtt_url or f"mqtt://127.0.0.1:{free_port()}",
            "FLEET_PUBLISH_TIMEOUT": 2.0 if mqtt_url else 0.2,
            "FLEET_VAR_DIR": str(tmp_path / "var"),
            "TESTING": True,
        }
    )


def add_release_for_new_devices(count: int) -> dict:
    """Commit `count` new devices, a project and a release targeting them all (in an app context).

    Returns the device units and ids, and the project's and release's ids: what a device's reports name.
    """
    from fleet_server import models
    from fleet_server.extensions import db

    devices = [models.Device(name=f"d{i}") for i in range(count)]
    project = models.Project(name="fleet")
    release = models.Release(project=project, version="1", version_hash="0badc0de", devices=devices)
    db.session.add_all([project, release, *devices])
    db.session.commit()
    return {"units": [d.unit_id for d in devices], "ids": [d.id for d in devices], "project": project.id,
            "release": release.id}


def close_app(application):
    from fleet_server.extensions import db

    publisher = application.extensions.get("fleet_publisher")
    if publisher is not None:
        publisher.close()
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def app(database_url, tmp_path):
    """The Flask app on a fresh, migrated database (SQLite, then PostgreSQL), with no broker."""
    application = make_app(database_url, tmp_path)
    yield application
    close_app(application)


class LiveServer:
    """The app served over real HTTP on a free loopback port, from a thread of the test process."""

    def __init__(self, application, token: str):
        from werkzeug.serving import make_server

        self.app = application
        self.token = token
        self.server = make_server("127.0.0.1", free_port(), application, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="live-server", daemon=True)
        self.thread.start()

    def request(self, method, path, token=None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"APIToken {token or self.token}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def put(self, path, **kwargs):
        return self.request("PUT", path, **kwargs)

    def patch(self, path, **kwargs):
        return self.request("PATCH", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def create_token(self, role="admin", name="tests") -> str:
        from fleet_server.tokens import service

        with self.app.app_context():
            return service.create(name, None, role)[1]

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)
        close_app(self.app)


@pytest.fixture
def live(database_url, broker, tmp_path):
    """The API over real HTTP on a fresh database (SQLite, then PostgreSQL), publishing to the session broker."""
    server = LiveServer(make_app(database_url, tmp_path, broker.url), token="")
    server.token = server.create_token()
    yield server
    server.stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def token(app):
    from fleet_server.tokens import service

    with app.app_context():
        return service.create("tests")[1]


@pytest.fixture
def auth(token):
    return {"Authorization": f"APIToken {token}"}


def release_payload(devices, image, tag, **container) -> dict:
    """A release body as an operator would post it, with one container."""
    spec = {
        "name": container.pop("name", "app"),
        "image": image,
        "tag": tag,
        "required_tags": [],
        "startup_parameters": container.pop(
            "startup_parameters",
            {"environment": "", "binds": [], "network_mode": "none", "restart_policy": "no", "privileged": False},
        ),
        "purge_data": False,
        **container,
    }
    return {"version": "1.0.0", "devices": list(devices), "containers": [spec], "remove_containers": []}


def dump(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True)
