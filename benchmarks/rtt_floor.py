"""The floor under benchmarks/command_rtt.py: the same round trip with none of Fleet's code in it.

Three bare parts, each doing the least any implementation of the round trip must do, on the
machinery Fleet runs on: gunicorn's sync workers, paho-mqtt (MQTT v5, TCP_NODELAY), the same
Mosquitto, and Fleet's own SQLite database file (its schema, WAL, full sync), so that the rows
and index pages written are Fleet's.

- web (`web_app`, a WSGI function under gunicorn): reads the JSON body, checks the API token's
  hash and reads the device's unit id (one indexed SELECT each), INSERTs the command and
  commits, publishes it at QoS 1 with the MQTT v5 response topic, correlation data and expiry,
  waits for the PUBACK, answers 201 with the command's id;
- agent: in paho's callback, decodes the command, appends it to a journal file (no fsync: the
  command only reads), publishes the result at QoS 1;
- worker: in paho's callback, decodes the result, stores it with one UPDATE guarded by the
  device and the command's unfinished state, commits, acknowledges the message.

No validation schemas, no ORM, no web framework, no thread of its own. What Fleet's round trip
takes beyond this one is what Fleet's own code costs. It uses topics of its own, so that no
process of Fleet's left running could take its messages. Configured by FLOOR_*
environment variables; started by command_rtt.py (`python -m benchmarks.rtt_floor agent|worker`,
gunicorn `benchmarks.rtt_floor:web_app`).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Topics of its own: no process of Fleet's may take the floor's messages.
TOPIC_ROOT = "fleet-floor/v1/devices"


def _stored_time(moment: float) -> str:
    """A timestamp as Fleet's SQLite rows hold it (UTC, naive, microseconds)."""
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def _database() -> sqlite3.Connection:
    connection = sqlite3.connect(os.environ["FLOOR_DATABASE"], isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def _connected_client(client_id: str, *, manual_ack: bool = False) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
                         manual_ack=manual_ack)
    client.on_socket_open = lambda _client, _userdata, sock: sock.setsockopt(socket.IPPROTO_TCP,
                                                                             socket.TCP_NODELAY, 1)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", int(os.environ["FLOOR_BROKER_PORT"]), keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("the floor's MQTT client did not connect within 10 s")
    return client


# --- web -------------------------------------------------------------------------------------

_web: dict = {}


def _web_parts():
    if not _web:  # after gunicorn forked the worker
        _web["database"] = _database()
        _web["client"] = _connected_client(f"floor-web-{os.getpid()}")
    return _web["database"], _web["client"]


def _answer(start_response, status: str, document: dict):
    body = json.dumps(document).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def web_app(environ, start_response):
    """POST /dongle/devices/{device_pk}/execute/ with {"command": ...}."""
    if environ["REQUEST_METHOD"] != "POST":
        return _answer(start_response, "405 Method Not Allowed", {"message": "POST only"})
    database, client = _web_parts()
    body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
    token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")[2]
    digest = hashlib.sha256(token.encode()).hexdigest()
    if database.execute("SELECT role FROM api_token WHERE token_hash = ?", (digest,)).fetchone() is None:
        return _answer(start_response, "401 Unauthorized", {"message": "bad token"})
    device_id = environ["PATH_INFO"].split("/")[3]
    found = database.execute("SELECT unit_id FROM device WHERE id = ?", (device_id,)).fetchone()
    if found is None:
        return _answer(start_response, "400 Bad Request", {"message": "no such device"})
    unit_id, command_id, now = found[0], str(uuid.uuid4()), time.time()
    created = _stored_time(now)
    database.execute(
        "INSERT INTO command (id, device_id, command, arg, kwarg, timeout, ttl, state, truncated, created_at,"
        " expires_at, published_at, attempts, next_attempt_at) VALUES (?, ?, ?, '[]', '{}', NULL, 3600, 'queued',"
        " 0, ?, ?, ?, 1, ?)",
        (command_id, device_id, body["command"], created, _stored_time(now + 3600), created,
         _stored_time(now + 10)))
    database.commit()
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = f"{TOPIC_ROOT}/{unit_id}/results"
    properties.CorrelationData = command_id.encode()
    properties.MessageExpiryInterval = 3600
    message = json.dumps({"id": command_id, "command": body["command"], "arg": [], "kwarg": {}, "timeout": None,
                          "deadline": now + 3600, "v": 1})
    client.publish(f"{TOPIC_ROOT}/{unit_id}/commands", message, qos=1, properties=properties).wait_for_publish(5)
    return _answer(start_response, "201 Created", {"id": command_id, "state": "queued"})


# --- agent -----------------------------------------------------------------------------------

def run_agent(unit_id: str, journal_path: str):
    journal = open(journal_path, "a")
    client = None

    def on_message(_client, _userdata, message):
        command = json.loads(message.payload)
        journal.write(json.dumps({"accepted": command["id"]}) + "\n")
        journal.flush()
        started = time.time()
        value = True if command["command"] == "test.ping" else None
        result = {"id": command["id"], "state": "succeeded", "return": value, "error": None, "truncated": False,
                  "started_at": started, "finished_at": time.time(), "ts": time.time(), "v": 1}
        properties = Properties(PacketTypes.PUBLISH)
        properties.CorrelationData = message.properties.CorrelationData
        client.publish(message.properties.ResponseTopic, json.dumps(result), qos=1, properties=properties)

    client = _connected_client(f"floor-agent-{unit_id}")
    client.on_message = on_message
    client.subscribe(f"{TOPIC_ROOT}/{unit_id}/commands", qos=1)
    threading.Event().wait()


# --- worker ----------------------------------------------------------------------------------

def run_worker():
    database = _database()
    client = None

    def on_message(_client, _userdata, message):
        unit_id = message.topic.split("/")[3]
        result = json.loads(message.payload)
        database.execute(
            "UPDATE command SET state = ?, return_value = ?, error = ?, truncated = ?, device_reported_at = ?,"
            " delivered_at = coalesce(delivered_at, ?), started_at = ?, finished_at = ?, completed_at = ?,"
            " next_attempt_at = NULL WHERE id = ? AND state IN ('queued', 'delivered', 'running')"
            " AND device_id = (SELECT id FROM device WHERE unit_id = ?)",
            (result["state"], json.dumps(result["return"]), result["error"], result["truncated"], result["ts"],
             _stored_time(time.time()), _stored_time(result["started_at"]), _stored_time(result["finished_at"]),
             _stored_time(time.time()), result["id"], unit_id))
        database.commit()
        client.ack(message.mid, message.qos)

    client = _connected_client(f"floor-worker-{os.getpid()}", manual_ack=True)
    client.on_message = on_message
    client.subscribe(f"{TOPIC_ROOT}/+/results", qos=1)  # only the floor's devices use its topics
    threading.Event().wait()


def stamps(database_path: str, command_ids: list[str]) -> dict[str, tuple[float, float | None]]:
    """command id → (created_at, completed_at) as epoch seconds, read from the floor's rows."""
    wanted, connection = set(command_ids), sqlite3.connect(database_path)
    try:
        found = {}
        for command_id, created_at, completed_at in connection.execute(
                "SELECT id, created_at, completed_at FROM command"):
            if command_id in wanted:
                found[command_id] = tuple(
                    None if text is None else datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
                    for text in (created_at, completed_at))
        return found
    finally:
        connection.close()


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "agent":
        run_agent(os.environ["FLOOR_UNIT_ID"], os.environ["FLOOR_JOURNAL"])
    elif role == "worker":
        run_worker()
    else:
        raise SystemExit("usage: python -m benchmarks.rtt_floor agent|worker")
