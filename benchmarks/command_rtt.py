"""Round trip of `test.ping`: from POST /dongle/devices/{id}/execute/ to the result stored.

Runs its own Mosquitto (set_tcp_nodelay) on a free loopback port, a fresh SQLite database,
the REST server (gunicorn), one ingest worker and one device agent, all as real processes
from this checkout, then posts `test.ping` `--runs` times one after another and prints:

- server-side: the command's created_at → completed_at (the worker stored the result; it is
  stamped in the storing transaction, just before its commit), both by the server's clock,
  so polling does not blur them, split at the agent's started_at/finished_at;
- POST sent (the client's clock) → completed_at: the same, plus HTTP, the token check and
  the request's parsing (one machine, one clock);
- hop by hop: when a bystander (`mosquitto_sub`, stamping each arrival) saw the command and
  the result pass the broker, its own delivery included;
- client-side, in a second phase (`--client-runs`): POST sent → a GET first shows the final
  state (polled every `--poll` s).

- the floor: then, with Fleet's processes stopped, as many round trips through bare parts on
  the same machinery (rtt_floor.py: gunicorn, paho, the same Mosquitto and database file, none
  of Fleet's code), and Fleet's ratio to it at p50.

The timed POSTs are sent with http.client on a fresh connection (`--client requests` for a
requests session, which spends about 1.5 ms of its own CPU on each POST here before it leaves).
The timed phase stands for a client on another machine: after the POST is answered it sleeps
`--settle` seconds, then reads the stamps (polling only if the result is not stored yet), so
neither its GETs nor a watcher written in Python compete for the two cores during the round
trip they measure. The bystander is a C program whose output is read at the end.

Bounded: at most `--warmup` + `--runs` commands per phase and `--budget` seconds (default 120) each.
Nothing leaves loopback; everything lives in a temporary directory removed at the end.

    .venv/bin/python benchmarks/command_rtt.py [--runs 200] [--warmup 100] [--client lean|requests] [--no-floor]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

from harness import REPO, answers, free_port, lean_request, percentile, wait_for  # noqa: E402  (also puts the checkout on sys.path)
from benchmarks import rtt_floor  # noqa: E402

log = logging.getLogger("command_rtt")
BIN = Path(sys.executable).parent
PING = {"command": "test.ping"}


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
    """A bystander on the command and result topics: when each message passed the broker.

    `mosquitto_sub` stamps every arrival (its own delivery included) and writes it to a file
    that is read only at the end, so watching costs the round trips next to no CPU.
    """

    def __init__(self, port: int, directory: Path, processes: Processes):
        self.process = processes.start("bystander", [
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "0", "-F", r"%U %t %p\n",
            "-t", "fleet/v1/devices/+/commands", "-t", "fleet/v1/devices/+/results"], dict(os.environ))
        self.output_file = directory / "bystander.log"
        self.probe_topic = "fleet/v1/devices/00000000-0000-0000-0000-000000000000/commands"
        deadline = time.monotonic() + 10
        # Subscribed once it prints a probe published after it started.
        while time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", self.probe_topic,
                            "-m", '{"id": "probe"}'], check=True, timeout=10)
            time.sleep(0.2)
            if b"probe" in self.output_file.read_bytes():
                return
        raise RuntimeError("the bystander did not subscribe within 10 s")

    def arrivals(self) -> dict[tuple[str, str], float]:
        """(kind, command id) → when it passed the broker; for results, when the final one did."""
        self.process.terminate()
        self.process.wait(10)
        seen: dict[tuple[str, str], float] = {}
        for line in self.output_file.read_text().splitlines():
            if not line.strip():
                continue
            when, topic, payload = line.split(" ", 2)
            kind, body = topic.rsplit("/", 1)[-1], json.loads(payload)
            if kind == "commands" or body.get("state") in ("succeeded", "failed"):
                seen.setdefault((kind, str(body["id"])), float(when))
        return seen


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
        fleet = [processes.start("server", server + ["serve", "--bind", f"127.0.0.1:{http_port}", "--workers", "2"],
                                 env),
                 processes.start("worker", server + ["worker", "--worker-id", "bench"], env)]
        fleet += [processes.start("agent", [str(BIN / "fleet-device"), "run", "--unit-id", unit_id,
                                  "--broker", f"mqtt://127.0.0.1:{broker_port}", "--state-dir", str(work / "agent"),
                                  "--api", f"127.0.0.1:{api_port}", "--minion-id-file", str(work / "minion_id")], env)]
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: answers(base + "/health"), 60, "the server")
        wait_for(lambda: answers(f"http://127.0.0.1:{api_port}/"), 60, "the agent")

        monitor = Monitor(broker_port, work, processes)
        session = requests.Session()
        session.headers["Authorization"] = f"APIToken {token}"
        url = f"{base}/dongle/devices/{device_id}/execute/"
        path, ping_body = url[len(base):], json.dumps(PING).encode()
        post_headers = {"Authorization": f"APIToken {token}", "Content-Type": "application/json"}
        client_side, failures = [], 0
        timed = []  # (command id, the client's clock when it sent the POST, the stored command)
        deadline = time.monotonic() + args.budget

        def post_lean() -> dict:
            # `requests` spends about 1.5 ms of CPU on each POST here before it leaves; http.client does not.
            return json.loads(lean_request(http_port, "POST", path, post_headers, ping_body, timeout=10)[1])

        def poll_until_final(command_id: str, sent: float) -> dict:
            while True:
                body = session.get(f"{url}{command_id}/", timeout=10).json()
                if body["state"] not in ("queued", "delivered", "running"):
                    return body
                if time.perf_counter() - sent > 10:
                    raise RuntimeError(f"command {command_id} did not finish within 10 s: {body}")
                time.sleep(args.poll)

        # Round trips, timed by the server's stamps. Nothing runs beside them: the client sleeps
        # `--settle` after the POST answered, then reads the stamps.
        for number in range(args.warmup + args.runs):
            if time.monotonic() > deadline:
                log.warning("time budget of %.0f s spent after %d commands", args.budget, number)
                break
            sent, sent_epoch = time.perf_counter(), time.time()
            created = post_lean() if args.client == "lean" else session.post(url, json=PING, timeout=10).json()
            time.sleep(args.settle)
            body = poll_until_final(created["id"], sent)
            if number >= args.warmup:
                timed.append((created["id"], sent_epoch, body))

        # What a client sees: POST, then GET every --poll seconds until the result shows.
        for number in range(args.client_runs):
            if time.monotonic() > deadline:
                break
            sent = time.perf_counter()
            created = session.post(url, json=PING, timeout=10).json()
            if poll_until_final(created["id"], sent)["state"] == "succeeded":
                client_side.append(time.perf_counter() - sent)
            else:
                failures += 1
        arrivals = monitor.arrivals()
        server_side, post_to_stored, to_agent, from_agent = [], [], [], []
        hops = {name: [] for name in ("created → on the broker", "on the broker → agent starts",
                                      "agent done → result on the broker", "result on the broker → stored")}
        for command_id, sent_epoch, body in timed:
            if body["state"] != "succeeded":
                failures += 1
                continue
            created_at, started_at, finished_at, completed_at = (
                datetime.fromisoformat(body[key]).timestamp()
                for key in ("created_at", "started_at", "finished_at", "completed_at")
            )
            server_side.append(completed_at - created_at)
            post_to_stored.append(completed_at - sent_epoch)
            to_agent.append(started_at - created_at)
            from_agent.append(completed_at - finished_at)
            seen_command, seen_result = arrivals.get(("commands", command_id)), arrivals.get(("results", command_id))
            if seen_command and seen_result:
                hops["created → on the broker"].append(seen_command - created_at)
                hops["on the broker → agent starts"].append(started_at - seen_command)
                hops["agent done → result on the broker"].append(seen_result - finished_at)
                hops["result on the broker → stored"].append(completed_at - seen_result)
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
        print(f"failed: {failures}")
        if not args.no_floor and server_side and not failures:
            for process in fleet:  # nothing of Fleet's runs during the floor's round trips
                process.terminate()
                process.wait(10)
            floor = Floor(processes, work, env, broker_port, token, device_id, unit_id)
            floor_deadline = time.monotonic() + args.budget
            for number in range(args.warmup + args.runs):
                if time.monotonic() > floor_deadline:
                    log.warning("time budget spent after %d floor commands", number)
                    break
                floor.post(timed=number >= args.warmup)
                time.sleep(args.settle)
            floor_server, floor_post = floor.timings()
            print("the floor: the same round trip through bare parts (benchmarks/rtt_floor.py), same run, "
                  "after Fleet's processes stopped")
            print(summary("created → result stored (floor)", floor_server))
            print(summary("POST sent → result stored (floor)", floor_post))
            print(f"Fleet / floor at p50: created → stored "
                  f"{percentile(server_side, 0.5) / percentile(floor_server, 0.5):.2f}x, POST sent → stored "
                  f"{percentile(post_to_stored, 0.5) / percentile(floor_post, 0.5):.2f}x")
        return 0 if server_side and not failures else 1
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)



class Floor:
    """The bare parts of rtt_floor.py, running; `post()` times one round trip through them."""

    def __init__(self, processes: Processes, work: Path, env: dict, broker_port: int, token: str, device_id: str,
                 unit_id: str):
        self.port = free_port()
        floor_env = {**env, "FLOOR_DATABASE": env["FLEET_DATABASE_URL"].removeprefix("sqlite:///"),
                     "FLOOR_BROKER_PORT": str(broker_port), "FLOOR_UNIT_ID": unit_id,
                     "FLOOR_JOURNAL": str(work / "floor-journal"),
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
        self.database = floor_env["FLOOR_DATABASE"]
        processes.start("floor-worker", [sys.executable, "-m", "benchmarks.rtt_floor", "worker"], floor_env)
        processes.start("floor-agent", [sys.executable, "-m", "benchmarks.rtt_floor", "agent"], floor_env)
        processes.start("floor-web", [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
                                      "--workers", "2", "--pythonpath", str(REPO), "benchmarks.rtt_floor:web_app"],
                        floor_env)
        self.path = f"/dongle/devices/{device_id}/execute/"
        self.headers = {"Authorization": f"APIToken {token}", "Content-Type": "application/json"}
        self.sent_at: dict[str, float] = {}
        wait_for(lambda: answers(f"http://127.0.0.1:{self.port}/"), 60, "the floor's web server")
        # Its agent and worker may still be subscribing: the first round trip must come back.
        wait_for(lambda: self._stored(self.post(timed=False)), 30, "the floor's first result", interval=0.5)

    def post(self, timed: bool = True) -> str:
        sent_epoch = time.time()
        _status, body = lean_request(self.port, "POST", self.path, self.headers, json.dumps(PING).encode(), timeout=10)
        command_id = json.loads(body)["id"]
        if timed:
            self.sent_at[command_id] = sent_epoch
        return command_id

    def _stored(self, command_id: str) -> bool:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if rtt_floor.stamps(self.database, [command_id]).get(command_id, (0, None))[1] is not None:
                return True
            time.sleep(0.05)
        return False

    def timings(self) -> tuple[list[float], list[float]]:
        """(created → stored, POST sent → stored) in seconds, of every timed round trip."""
        stored = rtt_floor.stamps(self.database, list(self.sent_at))
        missing = [command_id for command_id in self.sent_at if stored.get(command_id, (0, None))[1] is None]
        if missing:
            raise RuntimeError(f"the floor stored {len(self.sent_at) - len(missing)} of {len(self.sent_at)} results")
        return ([stored[command_id][1] - stored[command_id][0] for command_id in self.sent_at],
                [stored[command_id][1] - sent for command_id, sent in self.sent_at.items()])

def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="measured commands (default 200)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="commands before measuring (default 100: a fresh database's write-ahead log grows "
                             "over its first 4 MB, and each commit that lengthens the file costs more than one "
                             "that reuses it, as a running server's do)")
    parser.add_argument("--poll", type=float, default=0.005, help="seconds between a client's GETs (default 0.005)")
    parser.add_argument("--settle", type=float, default=0.03,
                        help="seconds the timed runs wait after the POST answered before reading the stamps "
                             "(default 0.03; they poll every --poll s if the result is not stored by then)")
    parser.add_argument("--client", choices=("lean", "requests"), default="lean",
                        help="HTTP client of the timed POSTs: http.client on a fresh connection (default), "
                             "or a requests session, which adds its own CPU before the request leaves")
    parser.add_argument("--client-runs", type=int, default=50,
                        help="commands polled for as a client would, after the timed ones (default 50)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the floor: as many round trips through bare parts (rtt_floor.py) on the same "
                             "machinery, timed after Fleet's processes stopped")
    parser.add_argument("--budget", type=float, default=120.0, help="stop after this many seconds (default 120)")
    args = parser.parse_args()
    if not 0 < args.runs <= 10000 or not 0 <= args.warmup <= 1000 or not 0 <= args.client_runs <= 10000:
        parser.error("--runs must be 1..10000, --warmup 0..1000 and --client-runs 0..10000")
    if not 0 <= args.settle <= 1:
        parser.error("--settle must be 0..1 seconds")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
