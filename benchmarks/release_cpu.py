"""CPU a simulated device spends on each release message: the agent's whole handling, and the decoding alone.

One agent as fleet_sim.py runs it (the real `Agent`, no Docker engine), connected to its own
Mosquitto on a free loopback port, receives `--messages` release documents (one per project,
as a server publishes them, QoS 1) from a bare paho client. This thread drives the agent's
socket as fleet_sim's device processes do and times, with `time.thread_time()`, each call of
the agent's message handling: decode, release queue written to disk, the `queued` report
published, the acknowledgement. Then the same payloads are decoded alone, in a loop.

Unlike the other scripts, this one does not put its own checkout on the import path: it
measures whichever tree PYTHONPATH names, so benchmarks/before_after.py can run it against
a revision older than itself. What differs between revisions is confined to `TreeAdapter`.

    PYTHONPATH=/path/to/tree .venv/bin/python benchmarks/release_cpu.py [--messages 2000]

The first entry of PYTHONPATH is the tree measured.

Prints one JSON object. Bounded in messages (at most 20,000) and time (`--budget` seconds).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class TreeAdapter:
    """Everything this script needs from the measured tree, for each shape the tree has had.

    The wire contract is `fleet_wire` or, in older trees, `fleet_device.wire`; a release message
    is decoded with a msgspec Struct (`decode(ReleaseMessage, payload)`) or, in older trees, a
    marshmallow schema (`decode(release_message, payload)`). The wire module must lie in `tree`:
    an installed checkout elsewhere on the path could otherwise answer for a package the tree lacks.
    """

    def __init__(self, tree: Path):
        self.wire = self._wire_module()
        if not Path(self.wire.__file__).resolve().is_relative_to(tree):
            raise SystemExit(f"the wire contract imported is {self.wire.__file__}, not in the measured tree {tree}")
        struct = getattr(self.wire, "ReleaseMessage", None)
        self.release_type = struct if struct is not None else self.wire.release_message
        self.decoder = "msgspec Struct" if struct is not None else "marshmallow schema"

    @staticmethod
    def _wire_module():
        """The wire module the tree's agent decodes with."""
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module("fleet_device.agent").wire
        try:
            return importlib.import_module("fleet_wire")
        except ImportError:
            return importlib.import_module("fleet_device.wire")

    def where(self) -> str:
        return str(Path(self.wire.__file__).resolve().parent)

    def decode_release(self, payload: bytes):
        return self.wire.decode(self.release_type, payload)

    @staticmethod
    def paho_client(agent):
        """The agent's paho client: behind its MQTT session object (`agent.mqtt`) or, in older trees, its own."""
        session = getattr(agent, "mqtt", None)
        return session.client if session is not None else agent.client

    def release_topic(self, unit_id: str, project_id: int) -> str:
        return self.wire.release_topic(unit_id, project_id)

    def agent(self, unit_id: str, port: int, state_dir: Path):
        """The tree's agent as fleet_sim.py builds a simulated device: no engine, no telemetry sources."""
        from fleet_device.agent import Agent, AgentConfig
        from fleet_device.telemetry import TelemetryConfig

        class NoEngine:
            report = None

        config = AgentConfig(unit_id=unit_id, broker_port=port, state_dir=state_dir, minion_id_file=None,
                             keepalive=600, telemetry=TelemetryConfig(sources=()))
        return Agent(config, deployer=NoEngine())


def release_document(protocol_version: int, seq: int, project_id: int) -> dict:
    """A release of one container for one project, as the server publishes it to a device."""
    container = {"name": "app", "image": "example/app", "tag": "1.0", "required_tags": [],
                 "startup_parameters": {"environment": "", "binds": [], "network_mode": "none",
                                        "restart_policy": "no", "privileged": False},
                 "purge_data": False, "registry": None, "fully_qualified_name": f"p{project_id}-app"}
    return {"v": protocol_version, "seq": seq, "project_id": project_id, "registries": [],
            "release": {"id": project_id, "version": "1.0", "version_hash": "0000beef", "containers": [container],
                        "remove_containers": []}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def broker(work: Path):
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                         "set_tcp_nodelay true\nmax_inflight_messages 1000\n")
    with open(work / "broker.log", "ab") as log:
        process = subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the broker did not accept connections within 20 s")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def handling_cpu(tree: TreeAdapter, payloads: dict[int, bytes], port: int, state_dir: Path, budget: float) -> dict:
    """Thread CPU of the agent's handling of each release message received through the broker."""
    unit_id = str(uuid.uuid4())
    agent = tree.agent(unit_id, port, state_dir)
    client = tree.paho_client(agent)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = agent.config.session_expiry
    client.connect("127.0.0.1", port, keepalive=600, clean_start=False, properties=properties)
    deadline = time.monotonic() + budget
    while not agent.connected.is_set():  # CONNACK, then the agent's subscriptions
        client.loop(0.05)
        if time.monotonic() > deadline:
            raise SystemExit("the agent did not connect within the budget")
    for _ in range(20):  # let the SUBACKs and start-up status go out and come back
        client.loop(0.02)

    publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                            client_id=f"release-cpu-{uuid.uuid4().hex[:6]}")
    publisher.max_inflight_messages_set(1000)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    try:
        for project_id, payload in payloads.items():
            publisher.publish(tree.release_topic(unit_id, project_id), payload, qos=1)
        spent, handled, rejected_before = 0.0, 0, agent.rejected
        while handled < len(payloads):
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent handled {handled} of {len(payloads)} releases within the budget")
            client.loop_read()
            while True:
                try:
                    message = agent.inbox.get_nowait()
                except queue.Empty:
                    break
                began = time.thread_time()
                agent._handle(message)  # decode, release queue on disk, `queued` report, then the ack
                elapsed = time.thread_time() - began
                if "/releases/" in message.topic:
                    spent += elapsed
                    handled += 1
            if client.want_write():
                client.loop_write()
        if agent.rejected != rejected_before:
            raise SystemExit(f"the agent rejected {agent.rejected - rejected_before} release messages")
        return {"messages": handled, "cpu_ms_per_message": round(1000 * spent / handled, 4)}
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        agent.stopping.set()
        client.disconnect()


def decoding_cpu(tree: TreeAdapter, payloads: list[bytes], repeats: int) -> dict:
    """Process CPU of decoding the same payloads alone, the best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        began = time.process_time()
        for payload in payloads:
            tree.decode_release(payload)
        best = min(best, time.process_time() - began)
    return {"messages": len(payloads), "cpu_ms_per_message": round(1000 * best / len(payloads), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="release messages, one per project (default 2000)")
    parser.add_argument("--budget", type=float, default=120.0, help="stop after this many seconds (default 120)")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 20000:
        parser.error("--messages: 1..20000")
    logging.basicConfig(level=logging.ERROR)
    if not os.environ.get("PYTHONPATH"):
        parser.error("PYTHONPATH must name the tree to measure")
    tree = TreeAdapter(Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]).resolve())
    payloads = {project_id: json.dumps(release_document(tree.wire.PROTOCOL_VERSION, project_id, project_id),
                                       separators=(",", ":"), sort_keys=True).encode()
                for project_id in range(1, args.messages + 1)}
    # Each real device fsyncs its own flash; a tmpfs keeps the agent's write-fsync-rename path without the disk.
    work = Path(tempfile.mkdtemp(prefix="fleet-release-cpu-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        with broker(work) as port:
            try:
                handling = handling_cpu(tree, payloads, port, work / "agent", args.budget)
            except (ImportError, AttributeError, TypeError) as exc:
                # An agent whose shape TreeAdapter.agent does not know: the decoding is still measured.
                handling = {"error": f"the tree's agent could not be run as a simulated device: {exc!r}"}
        decoding = decoding_cpu(tree, list(payloads.values()), repeats=3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"wire": tree.where(), "decoder": tree.decoder, "payload_bytes": len(payloads[1]),
                      "handling": handling, "decoding": decoding}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
