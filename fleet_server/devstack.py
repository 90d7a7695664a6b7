"""`make run`: the whole product on one machine — broker, API server, ingest worker and a local device agent.

Everything it creates lives under the var dir (FLEET_VAR_DIR, default ./var); rerunning it
reuses the database, the admin token, the broker's keys and accounts, and the local device.
The broker runs secured (anonymous off, dynamic security, TLS): the server uses its own
account, and the local agent registers with a provisioning token like any device and
connects over TLS with the account it was given. A component that exits is started again
(with a line saying so, and a growing pause while it keeps dying); Ctrl-C stops them all.
"""
import json
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


def _port(name, default):
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"{name}={raw!r}: expected a TCP port number")
    return int(raw)


def _registered_identity(state_dir: Path) -> tuple[str, str] | None:
    """(device_id, unit_id) from the identity file `fleet-device register` writes in its state dir; None before.

    Read as the agent's file, not through the agent's code: the server does not import the agent.
    """
    try:
        document = json.loads((state_dir / "identity.json").read_text())
        return document["device_id"], document["unit_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bin(name):
    return str(Path(sys.executable).parent / name)


def _wait_for(url, seconds, what, process=None):
    """Wait for `url` to answer; a `process` that exits meanwhile is left to `Stack.watch` to restart."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not answer at {url} within {seconds} s; see the logs under var/")


def _private_log(path: Path):
    """The log file opened for appending, readable by this user only (also one left by an older run)."""
    # Logs hold command results (docker.inspect shows containers' environments).
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(descriptor, 0o600)
    return os.fdopen(descriptor, "ab")


class Stack:
    def __init__(self):
        self.var = Path(os.environ.get("FLEET_VAR_DIR", "var")).resolve()
        self.broker_port = _port("FLEET_BROKER_PORT", 1883)
        self.broker_tls_port = _port("FLEET_BROKER_TLS_PORT", 8883)
        self.http_port = _port("FLEET_HTTP_PORT", 8000)
        self.device_port = _port("FLEET_DEVICE_API_PORT", 9000)
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.commands: dict[str, list[str]] = {}
        self.restarts: dict[str, list[float]] = {}  # when each component was last restarted
        self.env = {
            **os.environ,
            "FLEET_VAR_DIR": str(self.var),
            "FLEET_MQTT_URL": f"mqtt://127.0.0.1:{self.broker_port}",
        }

    def spawn(self, name, args):
        log_file = _private_log(self.var / f"{name}.log")
        process = subprocess.Popen(args, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log_file.close()  # the child has its own copy
        self.commands[name] = args
        self.processes = [(other, running) for other, running in self.processes if other != name]
        self.processes.append((name, process))
        return process

    def prepare(self):
        from .broker_accounts.bootstrap import ADMIN_USERNAME, SERVER_USERNAME, prepare
        from .config import private_dir

        private_dir(self.var)
        self.broker = prepare(self.var / "broker", port=self.broker_port, tls_port=self.broker_tls_port)
        self.env.update({
            "FLEET_MQTT_USERNAME": SERVER_USERNAME,
            "FLEET_MQTT_PASSWORD": self.broker.server_password.read_text().strip(),
            "FLEET_DYNSEC_USERNAME": ADMIN_USERNAME,
            "FLEET_DYNSEC_PASSWORD": self.broker.admin_password.read_text().strip(),
            "FLEET_DEVICE_BROKER_URL": f"mqtts://127.0.0.1:{self.broker_tls_port}",
            "FLEET_DEVICE_BROKER_CA_FILE": str(self.broker.ca_certificate),
        })
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

    def broker_accounts(self):
        """Wait for the broker, then create (or refresh) the server's account through dynsec."""
        from .broker_accounts import BrokerAccountError, DynSecControl, ensure_server_account

        deadline = time.monotonic() + 30
        while True:
            control = DynSecControl("127.0.0.1", self.broker_port, self.env["FLEET_DYNSEC_USERNAME"],
                                    self.env["FLEET_DYNSEC_PASSWORD"], timeout=2)
            try:
                ensure_server_account(control, self.env["FLEET_MQTT_USERNAME"], self.env["FLEET_MQTT_PASSWORD"])
                return
            except BrokerAccountError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the broker did not accept its admin account: {exc}; see {self.var}/broker.log")
            finally:
                control.close()
            time.sleep(0.5)

    def local_device(self, api: str) -> tuple[str, str]:
        """Register this machine like any device (once); its identity and broker account stay in its state dir."""
        device_dir = self.var / "device"
        state_dir = device_dir / "state"
        identity = _registered_identity(state_dir)
        if identity is None:
            hardware_file = device_dir / "hardware_id"
            if not hardware_file.exists():
                device_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                hardware_file.write_text(f"local-{uuid.uuid4()}\n")
            token = subprocess.run(
                [_bin("fleet-server"), "provisioning-tokens", "create", "--name", "make run", "--expires-in", "600"],
                env=self.env, check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            registered = subprocess.run(
                [_bin("fleet-device"), "register", "--server", api, "--token", token, "--state-dir", str(state_dir),
                 "--hardware-id", hardware_file.read_text().strip(), "--name", f"local ({os.uname().nodename})"],
                env=self.env, capture_output=True, text=True,
            )
            if registered.returncode != 0:
                raise SystemExit(f"the local device could not register: {registered.stderr.strip()}")
            identity = _registered_identity(state_dir)
            if identity is None:
                raise SystemExit(f"fleet-device register left no identity in {state_dir}")
        device_id, unit_id = identity
        (device_dir / "unit_id").write_text(unit_id + "\n")
        return device_id, unit_id

    def start(self):
        self.prepare()
        token = self.admin_token()
        self.spawn("broker", ["mosquitto", "-c", str(self.broker.config)])
        self.broker_accounts()
        self.spawn("server", [_bin("fleet-server"), "serve", "--bind", f"127.0.0.1:{self.http_port}"])
        self.spawn("worker", [_bin("fleet-server"), "worker", "--worker-id", "local"])
        api = f"http://127.0.0.1:{self.http_port}"
        _wait_for(f"{api}/health", 30, "the API server")
        device_id, unit_id = self.local_device(api)
        device_dir = self.var / "device"
        # Unit id, broker URL (TLS), account and CA all come from the identity `register` stored.
        device = self.spawn("device", [
            _bin("fleet-device"), "run",
            "--state-dir", str(device_dir / "state"),
            "--api", f"127.0.0.1:{self.device_port}",
            "--minion-id-file", str(device_dir / "minion_id"),
        ])
        _wait_for(f"http://127.0.0.1:{self.device_port}/", 30, "the device agent", process=device)
        print(
            f"""
Fleet is running.
  API             {api}   (OpenAPI: {api}/api/openapi.json)
  admin token     {token}   (also in {self.var / 'admin-token'})
  broker          mqtt://127.0.0.1:{self.broker_port} (loopback, accounts only)
                  mqtts://127.0.0.1:{self.broker_tls_port} (TLS, CA {self.broker.ca_certificate})
  broker accounts dynsec admin and server passwords in {self.broker.directory} (mode 0600)
  local device    id {device_id}  unit_id {unit_id}
  device API      http://127.0.0.1:{self.device_port}/
  logs            {self.var}/*.log

Try:
  curl -H "Authorization: APIToken {token}" {api}/dongle/devices/
A component that exits is restarted. Ctrl-C stops everything.
""",
            flush=True,
        )

    def watch(self):
        """Restart any component that exits, until Ctrl-C or SIGTERM; then the caller stops them all."""
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        due: dict[str, float] = {}  # components waiting out their back-off, and when they start again
        try:
            while not stopping:
                for name, process in list(self.processes):
                    if name not in due and process.poll() is not None:
                        due[name] = time.monotonic() + self.back_off(name)
                        print(f"{name} exited with code {process.returncode}; restarting it in "
                              f"{max(0.0, due[name] - time.monotonic()):.0f} s (log: {self.var / (name + '.log')})",
                              file=sys.stderr, flush=True)
                for name, when in list(due.items()):
                    if time.monotonic() >= when:
                        del due[name]
                        process = self.spawn(name, self.commands[name])
                        print(f"{name} restarted (pid {process.pid})", file=sys.stderr, flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0

    def back_off(self, name) -> float:
        """Seconds before restarting `name`: none at first, doubling (to 30 s) while it keeps dying within a minute."""
        now = time.monotonic()
        recent = [moment for moment in self.restarts.get(name, []) if now - moment < 60]
        self.restarts[name] = recent + [now]
        return 0.0 if not recent else min(30.0, 2.0 ** (len(recent) - 1))

    def stop(self, grace: float = 10.0):
        """SIGTERM to every component, then SIGKILL to those still running `grace` seconds later."""
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for name, process in reversed(self.processes):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {grace:.0f} s; killing it", file=sys.stderr, flush=True)
                process.kill()
                process.wait()
        print("stopped", flush=True)


def run() -> int:
    logging.basicConfig(level=logging.INFO)
    # Ctrl-C is how the stack stops, even when started from a shell that runs background jobs with
    # SIGINT ignored (Python then leaves it ignored, and so would every component it starts).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = Stack()
    try:
        stack.start()
        return stack.watch()
    finally:
        stack.stop()
