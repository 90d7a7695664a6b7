"""`make run`: the whole product on one machine — broker, API server, ingest worker and a local device agent.

Everything it creates lives under the var dir (FLEET_VAR_DIR, default ./var); rerunning it
reuses the database, the admin token and the local device.
"""
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BROKER_TEMPLATE = REPO / "broker" / "mosquitto.conf"
BROKER_SHARED_CONF = REPO / "broker" / "conf.d"


def render_broker_config(port: int, data_dir: Path) -> str:
    """broker/mosquitto.conf with its placeholders filled in, for `mosquitto -c`."""
    config = BROKER_TEMPLATE.read_text().replace("@PORT@", str(port))
    config = config.replace("@DATA_DIR@", str(data_dir).rstrip("/"))
    return config.replace("@CONF_DIR@", str(BROKER_SHARED_CONF))


def _port(name, default):
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"{name}={raw!r}: expected a TCP port number")
    return int(raw)


def _bin(name):
    return str(Path(sys.executable).parent / name)


def _wait_for(url, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not answer at {url} within {seconds} s; see the logs under var/")


class Stack:
    def __init__(self):
        self.var = Path(os.environ.get("FLEET_VAR_DIR", "var")).resolve()
        self.broker_port = _port("FLEET_BROKER_PORT", 1883)
        self.http_port = _port("FLEET_HTTP_PORT", 8000)
        self.device_port = _port("FLEET_DEVICE_API_PORT", 9000)
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.env = {
            **os.environ,
            "FLEET_VAR_DIR": str(self.var),
            "FLEET_MQTT_URL": f"mqtt://127.0.0.1:{self.broker_port}",
        }

    def spawn(self, name, args):
        log_file = open(self.var / f"{name}.log", "ab")
        process = subprocess.Popen(args, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def prepare(self):
        self.var.mkdir(parents=True, exist_ok=True)
        broker_data = self.var / "broker"
        broker_data.mkdir(exist_ok=True)
        (self.var / "mosquitto.conf").write_text(render_broker_config(self.broker_port, broker_data))
        subprocess.run([_bin("fleet-server"), "db", "upgrade", "heads"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def admin_token(self) -> str:
        path = self.var / "admin-token"
        if path.exists():
            return path.read_text().strip()
        token = subprocess.run([_bin("fleet-server"), "tokens", "create", "--name", "admin (make run)"],
                               env=self.env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        path.touch(mode=0o600)
        path.write_text(token + "\n")
        return token

    def local_device(self) -> tuple[str, str]:
        unit_file = self.var / "device" / "unit_id"
        unit_file.parent.mkdir(parents=True, exist_ok=True)
        if not unit_file.exists():
            unit_file.write_text(str(uuid.uuid4()) + "\n")
        unit_id = unit_file.read_text().strip()
        out = subprocess.run(
            [_bin("fleet-server"), "devices", "create", "--name", f"local ({os.uname().nodename})",
             "--unit-id", unit_id, "--if-missing"],
            env=self.env, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        device_id, unit_id = out.split()
        return device_id, unit_id

    def start(self):
        self.prepare()
        token = self.admin_token()
        device_id, unit_id = self.local_device()
        self.spawn("broker", ["mosquitto", "-c", str(self.var / "mosquitto.conf")])
        self.spawn("server", [_bin("fleet-server"), "serve", "--bind", f"127.0.0.1:{self.http_port}"])
        self.spawn("worker", [_bin("fleet-server"), "worker", "--worker-id", "local"])
        device_dir = self.var / "device"
        self.spawn("device", [
            _bin("fleet-device"), "run", "--unit-id", unit_id,
            "--broker", f"mqtt://127.0.0.1:{self.broker_port}",
            "--state-dir", str(device_dir / "state"),
            "--api", f"127.0.0.1:{self.device_port}",
            "--minion-id-file", str(device_dir / "minion_id"),
        ])
        api = f"http://127.0.0.1:{self.http_port}"
        _wait_for(f"{api}/health", 30, "the API server")
        _wait_for(f"http://127.0.0.1:{self.device_port}/", 30, "the device agent")
        print(
            f"""
Fleet is running.
  API             {api}   (OpenAPI: {api}/api/openapi.json)
  admin token     {token}   (also in {self.var / 'admin-token'})
  broker          mqtt://127.0.0.1:{self.broker_port}
  local device    id {device_id}  unit_id {unit_id}
  device API      http://127.0.0.1:{self.device_port}/
  logs            {self.var}/*.log

Try:
  curl -H "Authorization: APIToken {token}" {api}/dongle/devices/
Ctrl-C stops everything.
""",
            flush=True,
        )

    def watch(self):
        """Wait for Ctrl-C or for any component to exit, then stop them all."""
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        try:
            while not stopping:
                for name, process in self.processes:
                    if process.poll() is not None:
                        print(f"{name} exited with code {process.returncode}; see {self.var / (name + '.log')}",
                              file=sys.stderr)
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0

    def stop(self):
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for name, process in reversed(self.processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        print("stopped", flush=True)


def run() -> int:
    logging.basicConfig(level=logging.INFO)
    stack = Stack()
    try:
        stack.start()
        return stack.watch()
    finally:
        stack.stop()
