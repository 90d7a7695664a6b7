"""Round trip of `test.ping`: from POST /dongle/devices/{id}/execute/ to the result stored.

Runs its own Mosquitto (set_tcp_nodelay) on a free loopback port, a fresh SQLite database,
the REST server (gunicorn), one ingest worker and one device agent, all as real processes
from this checkout, then posts `test.ping` `--runs` times one after another and prints:

- server-side: the command's created_at → completed_at (the worker stored the result; it is
  stamped in the storing transaction, just before its commit), both by the server's clock,
  so polling does not blur them, split at the agent's started_at/finished_at;
- POST sent (the client's clock) → completed_at: the same, plus HTTP, the token check and
  the request's parsing (one machine, one clock);
- hop by hop: when a bystander client (in a process of its own) saw the command and the
  result pass the broker, its own delivery included;
- client-side, in a second phase (`--client-runs`): POST sent → a GET first shows the final
  state (polled every `--poll` s). The first phase does not poll: a client's GETs would
  compete for the same two cores as the round trip they measure.

Bounded: at most `--runs` commands (default 200) and `--budget` seconds (default 120).
Nothing leaves loopback; everything lives in a temporary directory removed at the end.

    .venv/bin/python benchmarks/command_rtt.py [--runs 200] [--warmup 20]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as paho
import requests
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from harness import answers, free_port, percentile, wait_for  # noqa: E402  (also puts the checkout on sys.path)

log = logging.getLogger("command_rtt")
BIN = Path(sys.executable).parent


def summary(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name:<34} n={len(ms):<4} p50={percentile(ms, 0.5):6.2f} ms  p99={percentile(ms, 0.99):6.2f} ms  "
            f"mean={statistics.fmean(ms):6.2f} ms  max={max(ms):6.2f} ms")


class Processes:
    def __init__(self, directory: Path):
        self.directory = directory
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        output = open(self.directory / f"{name}.log", "ab")
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        self.running.append(process)
        return process

    def stop_all(self):
        for process in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


class Monitor:
    """A bystander client on the command and result topics: when each message passed the broker.

    It runs in a process of its own: in this one the polling loop would hold the interpreter
    lock and delay its timestamps.
    """

    def __init__(self, port: int):
        self.arrivals: dict[tuple[str, str], float] = {}
        self.events = multiprocessing.Queue()
        self.ready = multiprocessing.Event()
        self.process = multiprocessing.Process(target=_watch, args=(port, self.events, self.ready), daemon=True)
        self.process.start()
        if not self.ready.wait(10):
            raise RuntimeError("the monitoring client did not subscribe within 10 s")

    def wait_for(self, command_id: str, timeout: float = 1.0) -> tuple[float | None, float | None]:
        deadline = time.monotonic() + timeout
        while ("results", command_id) not in self.arrivals:
            try:
                kind, arrived_id, when = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.arrivals.setdefault((kind, arrived_id), when)
        return self.arrivals.get(("commands", command_id)), self.arrivals.get(("results", command_id))

    def close(self):
        self.process.terminate()
        self.process.join(5)


def _watch(port: int, events, ready):
    def on_message(client, userdata, message):
        now = time.time()
        kind = message.topic.rsplit("/", 1)[-1]
        body = json.loads(message.payload)
        if kind == "commands" or body.get("state") in ("succeeded", "failed"):
            events.put((kind, str(body["id"]), now))

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-monitor", protocol=MQTTProtocolVersion.MQTTv5)
    client.on_socket_open = lambda c, userdata, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.on_message = on_message
    client.on_subscribe = lambda *args: ready.set()
    client.connect("127.0.0.1", port)
    client.subscribe([("fleet/v1/devices/+/commands", 0), ("fleet/v1/devices/+/results", 0)])
    client.loop_forever()


def run(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-rtt-"))
    processes = Processes(work)
    try:
        broker_port, http_port, api_port = free_port(), free_port(), free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        )
        processes.start("broker", ["mosquitto", "-c", str(work / "mosquitto.conf")], dict(os.environ))
        env = {
            **os.environ,
            "FLEET_VAR_DIR": str(work / "var"),
            "FLEET_DATABASE_URL": f"sqlite:///{work / 'fleet.db'}",
            "FLEET_MQTT_URL": f"mqtt://127.0.0.1:{broker_port}",
            "FLEET_MQTT_GROUP": "fleet-bench",
            "FLEET_LOG_LEVEL": "WARNING",
        }
        server = [str(BIN / "fleet-server")]
        subprocess.run(server + ["db", "upgrade", "heads"], env=env, check=True, capture_output=True, timeout=120)
        token = subprocess.run(server + ["tokens", "create", "--name", "bench"], env=env, check=True,
                               capture_output=True, text=True, timeout=60).stdout.split()[-1]
        device_id, unit_id = subprocess.run(server + ["devices", "create", "--name", "bench"], env=env, check=True,
                                            capture_output=True, text=True, timeout=60).stdout.split()
        processes.start("server", server + ["serve", "--bind", f"127.0.0.1:{http_port}", "--workers", "2"], env)
        processes.start("worker", server + ["worker", "--worker-id", "bench"], env)
        processes.start("agent", [str(BIN / "fleet-device"), "run", "--unit-id", unit_id,
                                  "--broker", f"mqtt://127.0.0.1:{broker_port}", "--state-dir", str(work / "agent"),
                                  "--api", f"127.0.0.1:{api_port}", "--minion-id-file", str(work / "minion_id")], env)
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: answers(base + "/health"), 60, "the server")
        wait_for(lambda: answers(f"http://127.0.0.1:{api_port}/"), 60, "the agent")

        monitor = Monitor(broker_port)
        session = requests.Session()
        session.headers["Authorization"] = f"APIToken {token}"
        url = f"{base}/dongle/devices/{device_id}/execute/"
        server_side, client_side, to_agent, from_agent, failures = [], [], [], [], 0
        post_to_stored = []  # the client's clock when it sent the POST → the server's when it stored (one machine)
        hops = {name: [] for name in ("created → on the broker", "on the broker → agent starts",
                                      "agent done → result on the broker", "result on the broker → stored")}
        deadline = time.monotonic() + args.budget

        def poll_until_final(command_id: str, sent: float) -> dict:
            while True:
                body = session.get(f"{url}{command_id}/", timeout=10).json()
                if body["state"] not in ("queued", "delivered", "running"):
                    return body
                if time.perf_counter() - sent > 10:
                    raise RuntimeError(f"command {command_id} did not finish within 10 s: {body}")
                time.sleep(args.poll)

        # Round trips, timed by the server's stamps. Nothing polls meanwhile: the client waits
        # (blocked, no CPU) until the bystander saw the result pass, and `--settle` longer, so
        # that its GET does not compete with the worker storing that result, then reads the stamps.
        for number in range(args.warmup + args.runs):
            if time.monotonic() > deadline:
                log.warning("time budget of %.0f s spent after %d commands", args.budget, number)
                break
            sent, sent_epoch = time.perf_counter(), time.time()
            created = session.post(url, json={"command": "test.ping"}, timeout=10).json()
            seen_command, seen_result = monitor.wait_for(created["id"], timeout=10)
            time.sleep(args.settle)
            body = poll_until_final(created["id"], sent)
            if number < args.warmup:
                continue
            if body["state"] != "succeeded":
                failures += 1
                continue
            created_at, started_at, finished_at, completed_at = (
                datetime.fromisoformat(body[key]) for key in ("created_at", "started_at", "finished_at", "completed_at")
            )
            server_side.append((completed_at - created_at).total_seconds())
            post_to_stored.append(completed_at.timestamp() - sent_epoch)
            if seen_command and seen_result:
                hops["created → on the broker"].append(seen_command - created_at.timestamp())
                hops["on the broker → agent starts"].append(started_at.timestamp() - seen_command)
                hops["agent done → result on the broker"].append(seen_result - finished_at.timestamp())
                hops["result on the broker → stored"].append(completed_at.timestamp() - seen_result)
            to_agent.append((started_at - created_at).total_seconds())
            from_agent.append((completed_at - finished_at).total_seconds())

        # What a client sees: POST, then GET every --poll seconds until the result shows.
        for number in range(args.client_runs):
            if time.monotonic() > deadline:
                break
            sent = time.perf_counter()
            created = session.post(url, json={"command": "test.ping"}, timeout=10).json()
            if poll_until_final(created["id"], sent)["state"] == "succeeded":
                client_side.append(time.perf_counter() - sent)
            else:
                failures += 1
        print(f"test.ping round trips through a real broker, server, worker and agent ({os.cpu_count()} CPUs)")
        print(summary("created → result stored (server)", server_side))
        print(summary("  of which created → agent starts", to_agent))
        print(summary("  of which agent done → stored", from_agent))
        print(summary("POST sent → result stored", post_to_stored))
        if client_side:
            print(summary(f"POST → GET shows it (client, polls every {args.poll * 1000:g} ms)", client_side))
        print("hop by hop (a watching client's arrival times, its own delivery included):")
        for name, values in hops.items():
            if values:
                print(summary("  " + name, values))
        monitor.close()
        print(f"failed: {failures}")
        return 0 if server_side and not failures else 1
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="measured commands (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="commands before measuring (default 20)")
    parser.add_argument("--poll", type=float, default=0.005, help="seconds between a client's GETs (default 0.005)")
    parser.add_argument("--settle", type=float, default=0.02,
                        help="seconds the timed runs wait after the result passed the broker before reading "
                             "the stamps (default 0.02; 0 reads at once, as before)")
    parser.add_argument("--client-runs", type=int, default=50,
                        help="commands polled for as a client would, after the timed ones (default 50)")
    parser.add_argument("--budget", type=float, default=120.0, help="stop after this many seconds (default 120)")
    args = parser.parse_args()
    if not 0 < args.runs <= 10000 or not 0 <= args.warmup <= 1000 or not 0 <= args.client_runs <= 10000:
        parser.error("--runs must be 1..10000, --warmup 0..1000 and --client-runs 0..10000")
    if not 0 <= args.settle <= 1:
        parser.error("--settle must be 0..1 seconds")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
