"""Fleet simulator: thousands of devices on loopback, each a real fleet_device.agent.Agent without containers.

Every simulated device is the agent's own code — its paho client set-up, its message
handling (fleet_wire decoding, fleet_device.state.ReleaseQueue written atomically,
the `queued` report, the manual acknowledgement) and its reconnection policy — with the
Docker side left out. A few processes hold all of them; in `fanout` each process drives
its clients' sockets from one selector loop (10,000 paho threads would measure the
simulator, not Fleet), in `storm` each agent runs its own paho thread because the
reconnection timing under test lives there.

Scenarios (each bounded in devices and seconds, loopback only, prints its figures):

    python benchmarks/fleet_sim.py fanout --sizes 1000,5000,10000
    python benchmarks/fleet_sim.py storm --devices 1000
    python benchmarks/fleet_sim.py commands --devices 1000
    python benchmarks/fleet_sim.py telemetry --devices 1000 --batches 2 --per-batch 100
    python benchmarks/fleet_sim.py reports --devices 1000

In `storm` and `reports` the devices can also apply the releases they queued: a simulated
deploy (SimulatedDeploy) reports its steps as the real one would, and the agent keeps and
resends each report until the server confirms it, with its own code (pending_reports.py).

Adding a scenario: write a function taking the parsed arguments, register it in
SCENARIOS, and give the device processes a command for what the devices must do
(see `Fleet.ask`).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import queue
import random
import selectors
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Broker, Server, machine, percentile, print_figures, wait_for, workdir  # noqa: E402

import paho.mqtt.client as paho  # noqa: E402
import requests  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

import fleet_wire as wire  # noqa: E402
from fleet_device.agent import Agent, AgentConfig  # noqa: E402
from fleet_device.telemetry import TelemetryConfig  # noqa: E402

log = logging.getLogger("fleet_sim")

HARD_TIMEOUT = 300.0  # no single wait of a scenario lasts longer than this


class NoEngine:
    """Stands in for the Deployer: simulated devices queue releases but never apply them."""

    report = None


class SimulatedDeploy:
    """Stands in for the Deployer where a scenario applies releases: reports each step after a
    pause, as a deploy would, and starts nothing. Reports, their ids, keeping and resending are
    the agent's own (fleet_device.pending_reports)."""

    report = None

    def __init__(self, pause: float = 0.3):
        self.pause = pause

    def apply(self, project_id, release, registries, previous=None, needed_elsewhere=frozenset(), context=None):
        for step in ("pulling", "starting", "verifying"):
            time.sleep(self.pause)
            self.report(step, step)
        time.sleep(self.pause)
        return ["simulated"]

    def recover(self):
        return []

    def settled(self, project_id):
        return True  # no deploy was ever interrupted

    def login_all(self, registries):
        return {}

    def forget(self, project_id):
        pass


def _agent(unit_id: str, port: int, state_root: Path, deployer=None, **config) -> Agent:
    settings = AgentConfig(unit_id=unit_id, broker_port=port, state_dir=state_root / unit_id,
                           minion_id_file=None, **config)
    return Agent(settings, deployer=deployer or NoEngine())


def _connect_properties(agent: Agent) -> Properties:
    # The same session settings Agent.start() uses: persistent session, clean_start off.
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = agent.config.session_expiry
    return properties


# --- device processes ----------------------------------------------------------


def _selector_devices(unit_ids, port, state_root, conn):
    """Many agents in one thread: their paho clients driven by hand from one selector."""
    logging.basicConfig(level=logging.WARNING)
    # No telemetry sources: a scenario adds the readings itself.
    agents = [_agent(unit_id, port, state_root, keepalive=600, telemetry=TelemetryConfig(sources=()))
              for unit_id in unit_ids]
    selector = selectors.DefaultSelector()
    connected = set()
    handled: dict[int, list[float]] = {}
    handling_cpu: dict[int, float] = {}  # project id → this thread's CPU seconds spent handling its releases
    expected: dict[int, int] = {}

    for agent in agents:
        on_connect = agent.mqtt.client.on_connect

        def record_connect(client, userdata, flags, reason_code, properties, agent=agent, on_connect=on_connect):
            on_connect(client, userdata, flags, reason_code, properties)
            if not reason_code.is_failure:
                connected.add(agent.unit_id)

        agent.mqtt.client.on_connect = record_connect

    def pump(timeout):
        for key, _mask in selector.select(timeout):
            agent = key.data
            agent.mqtt.client.loop_read()
            while True:
                try:
                    message = agent.inbox.get_nowait()
                except queue.Empty:
                    break
                began = time.thread_time()
                agent._handle(message)  # decode, ReleaseQueue.put, `queued` report, then the ack
                spent = time.thread_time() - began
                if "/releases/" in message.topic:
                    project_id = int(message.topic.rsplit("/", 1)[1])
                    handled.setdefault(project_id, []).append(time.time())
                    handling_cpu[project_id] = handling_cpu.get(project_id, 0.0) + spent
            # paho writes a report or ack at once when no loop thread runs; only what the socket
            # did not take waits here. Asking every agent each round costs more than the devices' work.
            if agent.mqtt.client.want_write():
                agent.mqtt.client.loop_write()

    for index, agent in enumerate(agents):
        agent.mqtt.client.connect("127.0.0.1", port, keepalive=600, clean_start=False,
                                  properties=_connect_properties(agent))
        selector.register(agent.mqtt.client.socket(), selectors.EVENT_READ, agent)
        if index % 100 == 99:
            pump(0)
    last_misc = time.monotonic()
    while True:
        pump(0.02)
        if time.monotonic() - last_misc > 1:
            # Keepalives, and writes from other threads (command results, telemetry batches).
            for agent in agents:
                if agent.mqtt.client.want_write():
                    agent.mqtt.client.loop_write()
                agent.mqtt.client.loop_misc()
            last_misc = time.monotonic()
        while conn.poll():
            command, *args = conn.recv()
            if command == "connected":
                conn.send(len(connected))
            elif command == "expect":
                project_id, count = args
                expected[project_id] = count
            elif command == "telemetry":
                # Each device buffers its readings (the agent's own SQLite buffer), then its batch
                # publisher thread sends them; this loop reads the PUBACKs it waits for.
                batches, per_batch, start_ts = args
                for agent in agents:
                    readings = [{"field": "sim.value", "type": "double", "value": float(i),
                                 "ts": start_ts + i * 0.001} for i in range(batches * per_batch)]
                    for offset in range(0, len(readings), per_batch):
                        agent.telemetry.add(readings[offset:offset + per_batch])
                    agent.telemetry.start()
                conn.send(len(agents) * batches * per_batch)
            elif command == "stop":
                for agent in agents:
                    agent.stopping.set()
                    agent.mqtt.client.disconnect()
                conn.send("stopped")
                return
        for project_id, count in list(expected.items()):
            if len(handled.get(project_id, ())) >= count:
                conn.send(("handled", project_id, handled.pop(project_id), handling_cpu.pop(project_id, 0.0)))
                del expected[project_id]


def _threaded_devices(unit_ids, port, state_root, conn, backoff, agent_options):
    """Agents as the real one runs: Agent.start(), paho's network thread reconnecting on its own."""
    logging.basicConfig(level=logging.ERROR)
    agents = [_agent(unit_id, port, state_root, deployer=SimulatedDeploy(), **agent_options) for unit_id in unit_ids]
    connects: dict[str, list[float]] = {}
    last_deployment_report: dict[str, dict] = {}
    for agent in agents:
        _record_deployment_reports(agent, last_deployment_report)
        if backoff == "paho":
            # The baseline: the agent's reconnection policy before jitter (paho's doubling from 1-2 s).
            agent.mqtt._jitter_next_reconnect = lambda: None
            agent.mqtt.client.on_connect_fail = None
            agent.mqtt.client.reconnect_delay_set(min_delay=1 + random.random(), max_delay=30 + random.random() * 30)
        on_connect = agent.mqtt.client.on_connect

        def record_connect(client, userdata, flags, reason_code, properties, agent=agent, on_connect=on_connect):
            on_connect(client, userdata, flags, reason_code, properties)
            if not reason_code.is_failure:
                connects.setdefault(agent.unit_id, []).append(time.time())

        agent.mqtt.client.on_connect = record_connect
        agent.start()
        time.sleep(0.002)  # do not open every socket in the same millisecond
    while True:
        command, *args = conn.recv()
        if command == "connected":
            conn.send(len(connects))
        elif command == "connects":
            conn.send(connects)
        elif command == "deploy":
            # Each device applies its queued release at a moment of its own within `spread` seconds.
            (spread,) = args
            for agent in agents:
                threading.Timer(random.uniform(0, spread), agent.apply_queued).start()
            conn.send(len(agents))
        elif command == "deployment_reports":
            conn.send(dict(last_deployment_report))
        elif command == "unconfirmed":
            conn.send({"pending": sum(len(agent.pending_reports) for agent in agents),
                       "resent": sum(agent.pending_reports.resent for agent in agents)})
        elif command == "stop":
            for agent in agents:
                agent.stopping.set()
                agent.mqtt.client.disconnect()
                agent.mqtt.client.loop_stop()
            conn.send("stopped")
            return


def _record_deployment_reports(agent: Agent, last: dict):
    """Keep the last deployment report each device sent, to compare with what the server stored."""
    send = agent.pending_reports.send

    def recording_send(kind, body, **options):
        result = send(kind, body, **options)
        if kind == "deployments":
            last[agent.unit_id] = body
        return result

    agent.pending_reports.send = recording_send


class Fleet:
    """N simulated devices split over a few processes.

    `agent_options` are AgentConfig fields for every device (threads mode only).
    """

    def __init__(self, unit_ids, port, processes, mode="selector", backoff="agent", **agent_options):
        self.state_root = Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=_state_parent()))
        self.slices = [unit_ids[i::processes] for i in range(processes)]
        self.links = []
        self.workers = []
        for units in self.slices:
            parent, child = multiprocessing.Pipe()
            if mode == "selector":
                target, args = _selector_devices, (units, port, self.state_root, child)
            else:
                target, args = _threaded_devices, (units, port, self.state_root, child, backoff, agent_options)
            process = multiprocessing.Process(target=target, args=args, daemon=True)
            process.start()
            self.links.append(parent)
            self.workers.append(process)

    def ask(self, *command):
        for link in self.links:
            link.send(command)
        return [self._recv(link) for link in self.links]

    def _recv(self, link, timeout=HARD_TIMEOUT):
        if not link.poll(timeout):
            raise SystemExit(f"a device process did not answer within {timeout:.0f} s")
        return link.recv()

    def connected(self) -> int:
        return sum(self.ask("connected"))

    def expect(self, project_id: int, per_process: list[int]):
        """Tell each process how many of its devices will receive a release of `project_id`."""
        for link, count in zip(self.links, per_process):
            link.send(("expect", project_id, count))

    def handled(self, per_process: list[int]) -> tuple[list[float], float]:
        """When each expected device had the release queued and acknowledged (epoch seconds), and the
        CPU seconds the device processes spent handling those release messages (the agent's `_handle`)."""
        stamps, cpu = [], 0.0
        for link, count in zip(self.links, per_process):
            if count:
                _kind, _project_id, times, spent = self._recv(link, 120)
                stamps.extend(times)
                cpu += spent
        return stamps, cpu

    def stop(self):
        with contextlib.suppress(Exception, SystemExit):
            self.ask("stop")
        for process in self.workers:
            process.join(10)
            if process.is_alive():
                process.kill()
        shutil.rmtree(self.state_root, ignore_errors=True)


def _state_parent():
    # Each real device fsyncs its own flash; 10,000 simulated ones fsyncing one disk would
    # measure this machine's disk. A tmpfs keeps the agent's write-fsync-rename path intact.
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


# --- fan-out -------------------------------------------------------------------------


def _register_devices(server: Server, count: int) -> list[tuple[str, str]]:
    """Insert `count` devices straight into the database (what POST /dongle/devices/ stores)."""
    from fleet_server import models
    from fleet_server.extensions import db

    app = server.app()
    rows = [{"id": str(uuid.uuid4()), "unit_id": str(uuid.uuid4()), "name": f"sim-{i}", "description": "",
             "tags": [], "online": False} for i in range(count)]
    with app.app_context():
        db.session.execute(db.insert(models.Device), rows)
        db.session.commit()
    return [(row["id"], row["unit_id"]) for row in rows]


def _count_deployments(app, release_id: int) -> int:
    from fleet_server import models
    from fleet_server.extensions import db

    with app.app_context():
        try:
            return db.session.scalar(db.select(db.func.count()).select_from(models.Deployment)
                                     .where(models.Deployment.release_id == release_id))
        finally:
            db.session.remove()


def _release_body(device_ids, version):
    return {"version": version, "devices": device_ids, "remove_containers": [], "containers": [{
        "name": "app", "image": "example/app", "tag": version, "required_tags": [],
        "startup_parameters": {"environment": "", "binds": [], "network_mode": "none", "restart_policy": "no",
                               "privileged": False}, "purge_data": False}]}


@contextlib.contextmanager
def _fleet_stack(prefix: str, devices: int, args, web_workers: int):
    """A broker, the server (web and ingest workers) and `devices` simulated devices, all connected
    and settled; yields (broker, server, [(device id, unit id)], fleet) and stops them all after."""
    with workdir(prefix) as work:
        broker = Broker(work).start()
        server = Server(work, broker.url, web_workers=web_workers, ingest_workers=args.ingest_workers).start()
        fleet = None
        try:
            registered = _register_devices(server, devices)
            started = time.monotonic()
            fleet = Fleet([unit for _id, unit in registered], broker.port, args.processes)
            wait_for(lambda: fleet.connected() == devices, 180, f"{devices} simulated devices to connect", 0.5)
            print(f"{devices} devices connected in {time.monotonic() - started:.1f} s", file=sys.stderr)
            time.sleep(args.settle)  # let the workers store the devices' `online` statuses first
            yield broker, server, registered, fleet
        finally:
            if fleet:
                fleet.stop()
            server.stop()
            broker.stop()


def fanout(args):
    sizes = [int(size) for size in args.sizes.split(",")]
    total = max(sizes)
    if total > 20000:
        raise SystemExit("--sizes: at most 20,000 devices")
    with _fleet_stack("fleet-fanout-", total, args, web_workers=2) as (broker, server, devices, fleet):
        app = server.app()
        rows = []
        for size in sizes:
            targets = devices[:size]
            targeted = {unit for _id, unit in targets}
            per_process = [sum(unit in targeted for unit in units) for units in fleet.slices]
            project = requests.post(server.url + "/docker/projects/", json={"name": f"fanout-{size}"},
                                    headers=server.headers, timeout=60).json()
            fleet.expect(project["id"], per_process)
            t0 = time.time()
            response = requests.post(f"{server.url}/docker/projects/{project['id']}/releases/",
                                     json=_release_body([i for i, _u in targets], f"{size}.0"),
                                     headers=server.headers, timeout=HARD_TIMEOUT)
            t_response = time.time()
            if response.status_code != 201:
                raise SystemExit(f"release of {size} devices: {response.status_code} {response.text[:500]}")
            stamps, handling_cpu = fleet.handled(per_process)
            release_id = response.json()["id"]
            wait_for(lambda: _count_deployments(app, release_id) >= size, 300, f"{size} queued reports stored", 0.05)
            t_stored = time.time()
            floor = _broker_floor(broker, fleet, targets, project["id"] + 100000, per_process)
            rows.append({
                "devices": size,
                "release_acknowledged_by_all_s": round(max(stamps) - t0, 3),
                "release_acknowledged_by_half_s": round(percentile(stamps, 0.5) - t0, 3),
                "post_release_response_s": round(t_response - t0, 3),
                "queued_reports_stored_s": round(t_stored - t0, 3),
                "baseline_broker_only_all_s": round(floor, 3),
                "devices_received": len(stamps),
                "device_cpu_ms_per_release_message": round(1000 * handling_cpu / len(stamps), 3),
            })
            print(rows[-1], file=sys.stderr)
        print_figures(f"release fan-out ({machine()})", rows)


def _broker_floor(broker: Broker, fleet: Fleet, targets, project_id: int, per_process) -> float:
    """The same release to the same devices published by a bare paho client: the broker and devices alone."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                         client_id=f"fleet-sim-floor-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        release = wire.ReleaseSpec(id=project_id, version="floor", version_hash="0000beef", containers=[])
        payload = wire.encode(wire.ReleaseMessage(project_id=project_id, release=release))
        fleet.expect(project_id, per_process)
        t0 = time.time()
        handles = [client.publish(wire.release_topic(unit, project_id), payload, qos=1, retain=True)
                   for _id, unit in targets]
        for handle in handles:
            handle.wait_for_publish(60)
        elapsed = max(fleet.handled(per_process)[0]) - t0
        for _id, unit in targets:  # clear the retained copies again
            client.publish(wire.release_topic(unit, project_id), b"", qos=1, retain=True)
        return elapsed
    finally:
        client.disconnect()
        client.loop_stop()


# --- reconnect storm -------------------------------------------------------------------


def storm(args):
    if args.devices > 5000:
        raise SystemExit("--devices: at most 5,000")
    rows = []
    for backoff in args.backoff.split(","):
        with workdir("fleet-storm-") as work:
            broker = Broker(work).start()
            unit_ids = [str(uuid.uuid4()) for _ in range(args.devices)]
            fleet = Fleet(unit_ids, broker.port, args.processes, mode="threads", backoff=backoff)
            try:
                wait_for(lambda: fleet.connected() == args.devices, 180, f"{args.devices} agents to connect", 0.5)
                broker.stop()
                t_down = time.time()
                time.sleep(args.down)
                t_up = time.time()  # from the broker's start: a device may connect before it reports ready
                broker.start()

                def reconnected():
                    merged = {}
                    for connects in fleet.ask("connects"):
                        merged.update(connects)
                    return [max(times) - t_up for times in merged.values() if max(times) > t_down]

                back = wait_for(lambda: (lambda times: times if len(times) == args.devices else None)(reconnected()),
                                args.timeout, f"{args.devices} agents to reconnect", 1.0)
                per_second = {}
                for delay in back:
                    per_second[int(delay)] = per_second.get(int(delay), 0) + 1
                rows.append({
                    "backoff": backoff,
                    "devices": args.devices,
                    "reconnected": len(back),
                    "first_s": round(min(back), 2),
                    "median_s": round(statistics.median(back), 2),
                    "last_s": round(max(back), 2),
                    "spread_s": round(max(back) - min(back), 2),
                    "peak_connects_per_s": max(per_second.values()),
                    "broker_down_s": args.down,
                })
                print(rows[-1], file=sys.stderr)
            finally:
                fleet.stop()
                broker.stop()
    print_figures(f"reconnect storm ({machine()})", rows)


# --- command round trip at fleet scale ------------------------------------------------


def commands(args):
    """`test.ping` to every device at once (POSTs from --clients threads); created → result stored, per command."""
    from concurrent.futures import ThreadPoolExecutor

    from fleet_server.commands.models import Command
    from fleet_server.extensions import db

    with _fleet_stack("fleet-commands-", args.devices, args, web_workers=2) as (_broker, server, devices, fleet):
        app = server.app()
        session = requests.Session()

        def ping(device_id):
            response = session.post(f"{server.url}/dongle/devices/{device_id}/execute/",
                                    json={"command": "test.ping"}, headers=server.headers, timeout=60)
            if response.status_code != 201:
                raise SystemExit(f"test.ping: {response.status_code} {response.text[:300]}")

        t0 = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(ping, [device_id for device_id, _unit in devices]))
        t_posted = time.time()

        def finished():
            with app.app_context():
                try:
                    return db.session.scalar(db.select(db.func.count()).select_from(Command)
                                             .where(Command.completed_at.is_not(None))) >= args.devices
                finally:
                    db.session.remove()

        wait_for(finished, HARD_TIMEOUT, f"{args.devices} results stored", 0.05)
        t_done = time.time()
        with app.app_context():
            rows = db.session.execute(db.select(Command.state, Command.created_at, Command.completed_at)).all()
            db.session.remove()
        trips = [(done - created).total_seconds() * 1000 for _state, created, done in rows]
        print_figures(f"command round trip at fleet scale ({machine()})", [{
            "devices": args.devices,
            "commands": len(rows),
            "succeeded": sum(state == "succeeded" for state, _c, _d in rows),
            "created_to_stored_p50_ms": round(percentile(trips, 0.5), 1),
            "created_to_stored_p99_ms": round(percentile(trips, 0.99), 1),
            "created_to_stored_max_ms": round(max(trips), 1),
            "all_posted_s": round(t_posted - t0, 2),
            "all_stored_s": round(t_done - t0, 2),
            "post_clients": args.clients,
        }])


# --- telemetry at fleet scale --------------------------------------------------------


def telemetry(args):
    """Every device buffers --batches x --per-batch readings and publishes them; readings/s until all are committed."""
    from fleet_server.extensions import db
    from fleet_server.logbook.models import TelemetryReading

    with _fleet_stack("fleet-telemetry-", args.devices, args, web_workers=1) as (_broker, server, _devices, fleet):
        app = server.app()
        expected = args.devices * args.batches * args.per_batch

        def counts():
            with app.app_context():
                try:
                    stored = db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading))
                    pairs = db.select(TelemetryReading.device_id, TelemetryReading.ts_us).distinct().subquery()
                    return stored, db.session.scalar(db.select(db.func.count()).select_from(pairs))
                finally:
                    db.session.remove()

        t0 = time.time()
        sent = sum(fleet.ask("telemetry", args.batches, args.per_batch, 1_600_000_000.0))
        t_buffered = time.time()
        wait_for(lambda: counts()[0] >= expected, HARD_TIMEOUT, f"{expected} readings committed", 0.2)
        t_done = time.time()
        time.sleep(2)  # anything late would be a duplicate
        stored, distinct = counts()
        print_figures(f"telemetry ingest at fleet scale ({machine()})", [{
            "devices": args.devices,
            "readings_sent": sent,
            "readings_stored": stored,
            "duplicates": stored - distinct,
            "lost": sent - distinct,
            "readings_per_s": round(expected / (t_done - t0)),
            "devices_buffered_s": round(t_buffered - t0, 2),
            "all_committed_s": round(t_done - t0, 2),
            "batch_readings": args.per_batch,
        }])


# --- deployment reports across a broker killed mid-deploy ---------------------------------


def _deployment_states(app, release_id: int) -> dict[str, int]:
    from fleet_server import models
    from fleet_server.extensions import db

    with app.app_context():
        try:
            return dict(db.session.execute(
                db.select(models.Deployment.state, db.func.count()).where(models.Deployment.release_id == release_id)
                .group_by(models.Deployment.state)).all())
        finally:
            db.session.remove()


def reports(args):
    """Every device deploys within --spread s; --kill-at s in the broker is killed with SIGKILL and
    started again --down s later: how long until every final state is stored, and how many reports
    the devices had to send again."""
    with workdir("fleet-reports-") as work:
        broker = Broker(work).start()
        server = Server(work, broker.url, web_workers=1, ingest_workers=args.ingest_workers).start()
        fleet = None
        try:
            app = server.app()
            registered = _register_devices(server, args.devices)
            fleet = Fleet([unit for _id, unit in registered], broker.port, args.processes, mode="threads",
                          reconnect_window=args.reconnect_window, report_resend_interval=args.resend_interval)
            wait_for(lambda: fleet.connected() == args.devices, 180, f"{args.devices} agents to connect", 0.5)
            project = requests.post(server.url + "/docker/projects/", json={"name": "reports"},
                                    headers=server.headers, timeout=60).json()
            response = requests.post(f"{server.url}/docker/projects/{project['id']}/releases/",
                                     json=_release_body([i for i, _u in registered], "1.0"), headers=server.headers,
                                     timeout=HARD_TIMEOUT)
            release_id = response.json()["id"]
            wait_for(lambda: _deployment_states(app, release_id).get("queued") == args.devices, HARD_TIMEOUT,
                     "every queued report stored", 0.5)
            fleet.ask("deploy", args.spread)
            time.sleep(args.kill_at)
            broker.process.kill()  # SIGKILL: nothing of the broker's state is saved
            broker.process.wait(10)
            time.sleep(args.down)
            broker.start()
            t_up = time.time()
            wait_for(lambda: _deployment_states(app, release_id).get("succeeded") == args.devices, HARD_TIMEOUT,
                     f"{args.devices} succeeded deployments", 0.2)
            t_done = time.time()
            unconfirmed = fleet.ask("unconfirmed")
            print_figures(f"deployment reports across a broker killed mid-deploy ({machine()})", [{
                "devices": args.devices,
                "final_states_stored": _deployment_states(app, release_id).get("succeeded", 0),
                "all_stored_after_broker_restart_s": round(t_done - t_up, 2),
                "reports_resent": sum(u["resent"] for u in unconfirmed),
                "resend_interval_s": args.resend_interval,
                "reconnect_window_s": args.reconnect_window,
                "broker_down_s": args.down,
            }])
        finally:
            if fleet:
                fleet.stop()
            server.stop()
            broker.stop()


SCENARIOS = {"fanout": fanout, "storm": storm, "commands": commands, "telemetry": telemetry, "reports": reports}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="scenario", required=True)
    run = commands.add_parser("fanout", help="time until N devices received and acknowledged a release")
    run.add_argument("--sizes", default="1000,5000,10000")
    run.add_argument("--processes", type=int, default=4)
    run.add_argument("--ingest-workers", type=int, default=2)
    run.add_argument("--settle", type=float, default=20.0, help="seconds to let start-up reports drain")
    run = commands.add_parser("storm", help="broker restart under N connected agents")
    run.add_argument("--devices", type=int, default=1000)
    run.add_argument("--processes", type=int, default=4)
    run.add_argument("--down", type=float, default=3.0, help="seconds the broker stays down")
    run.add_argument("--backoff", default="agent,paho", help="agent (jittered) and/or paho (the old baseline)")
    run.add_argument("--timeout", type=float, default=240.0)
    for name, helptext in (("commands", "test.ping to N devices: created -> result stored"),
                           ("telemetry", "N devices each publishing telemetry batches: readings/s committed")):
        run = commands.add_parser(name, help=helptext)
        run.add_argument("--devices", type=int, default=1000)
        run.add_argument("--processes", type=int, default=4)
        run.add_argument("--ingest-workers", type=int, default=2)
        run.add_argument("--settle", type=float, default=10.0, help="seconds to let start-up reports drain")
        if name == "commands":
            run.add_argument("--clients", type=int, default=8, help="threads posting the commands")
        else:
            run.add_argument("--batches", type=int, default=2)
            run.add_argument("--per-batch", type=int, default=100)
    run = commands.add_parser("reports", help="N devices deploying while the broker is killed: all final states stored")
    run.add_argument("--devices", type=int, default=1000)
    run.add_argument("--processes", type=int, default=4)
    run.add_argument("--ingest-workers", type=int, default=2)
    run.add_argument("--spread", type=float, default=10.0, help="seconds over which the devices start deploying")
    run.add_argument("--kill-at", type=float, default=3.0, help="seconds into the deploys the broker is killed")
    run.add_argument("--down", type=float, default=2.0, help="seconds the broker stays down")
    run.add_argument("--reconnect-window", type=float, default=12.0)
    run.add_argument("--resend-interval", type=float, default=30.0)
    args = parser.parse_args(argv)
    if getattr(args, "devices", 0) > 10000:
        raise SystemExit("--devices: at most 10,000")
    logging.basicConfig(level=logging.WARNING)
    SCENARIOS[args.scenario](args)


if __name__ == "__main__":
    main()
