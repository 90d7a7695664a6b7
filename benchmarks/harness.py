"""Processes the benchmarks run on loopback: the project's broker, the server and ingest workers, on a throwaway directory.

Every benchmark is bounded in count and time and talks only to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

SHARED_BROKER_CONF = REPO / "broker" / "conf.d"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"gave up after {timeout:.0f} s waiting for {what}")


def answers(url: str) -> bool:
    """Whether something serves `url` without a server error."""
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


def lean_request(port: int, method: str, target: str, headers: dict, body: bytes | None = None,
                 timeout: float = 30) -> tuple[int, bytes]:
    """One request to 127.0.0.1:`port` on a new connection with the standard library's client, the
    whole answer read in one call: (status, body). `requests` spends milliseconds of its own CPU
    on a request here, on the two cores the server uses too."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def percentile(values, fraction: float) -> float:
    """Nearest-rank percentile (fraction 0.5 for the median, 0.99 for p99)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Linux {platform.release()}, Python {platform.python_version()}"


class Broker:
    """The host's mosquitto with the project's tuned settings (broker/conf.d), anonymous, on a free loopback port.

    Benchmarks measure the transport, so they leave out the dynamic security plugin.
    """

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.data = workdir / "broker"
        self.data.mkdir()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
            f"persistence_location {self.data}/\ninclude_dir {SHARED_BROKER_CONF}\n"
        )
        self.log = workdir / "broker.log"
        self.process = None

    @property
    def url(self):
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self):
        handle = open(self.log, "ab")
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=handle, stderr=subprocess.STDOUT)

        def accepts():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
            return False

        wait_for(accepts, 20, "the broker")
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.process.wait(30)


class Server:
    """Migrated SQLite database, gunicorn with N workers and M ingest workers, all on loopback."""

    def __init__(self, workdir: Path, broker_url: str, web_workers: int = 2, ingest_workers: int = 1):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "FLEET_VAR_DIR": str(workdir / "var"),
            "FLEET_DATABASE_URL": f"sqlite:///{workdir / 'fleet.db'}",
            "FLEET_MQTT_URL": broker_url,
            "FLEET_LOG_LEVEL": "WARNING",
            "FLEET_PUBLISH_TIMEOUT": "30",
        }
        self.web_workers = web_workers
        self.ingest_workers = ingest_workers
        self.processes = []

    def cli(self, *args) -> str:
        return subprocess.run([str(BIN / "fleet-server"), *args], env=self.env, check=True, capture_output=True,
                              text=True, timeout=300).stdout.strip()

    def spawn(self, name, *args):
        handle = open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen([str(BIN / "fleet-server"), *args], env=self.env, stdout=handle,
                                   stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start(self):
        self.cli("db", "upgrade", "heads")
        self.token = self.cli("tokens", "create", "--name", "benchmark").splitlines()[-1]
        self.spawn("api", "serve", "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.web_workers))
        for index in range(self.ingest_workers):
            self.spawn(f"worker-{index}", "worker", "--worker-id", f"bench-{index}-{os.getpid()}")

        def healthy():
            with contextlib.suppress(requests.RequestException):
                return requests.get(self.url + "/health", timeout=1).status_code == 200
            return False

        wait_for(healthy, 30, "the API server")
        return self

    @property
    def headers(self):
        return {"Authorization": f"APIToken {self.token}"}

    def app(self):
        """The Flask app on the same database, for bulk set-up and counting rows."""
        from fleet_server.app import create_app

        return create_app({"SQLALCHEMY_DATABASE_URI": self.env["FLEET_DATABASE_URL"],
                           "FLEET_MQTT_URL": self.env["FLEET_MQTT_URL"], "FLEET_VAR_DIR": self.env["FLEET_VAR_DIR"]})

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def workdir(prefix: str):
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if os.environ.get("FLEET_BENCH_KEEP"):
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def print_figures(title: str, rows: list[dict]):
    print(f"\n## {title}")
    print(json.dumps(rows, indent=1))
