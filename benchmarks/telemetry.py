"""Telemetry benchmark: sustained ingest end to end, and the logbook's 24 h read among 1,000,000 rows.

Everything runs on loopback and is bounded in count and time:

- a Mosquitto broker (the system binary) on a free port;
- the database: a SQLite file, and/or a throwaway PostgreSQL cluster (Debian's, initdb'd in
  a temp dir, trust auth on 127.0.0.1 only) — removed afterwards;
- `fleet-server worker` (the real ingest worker) and `fleet-server serve` (gunicorn);
- the device side in this process: the agent's own `Telemetry` buffer and batch publisher
  on a paho client, fed by a producer thread.

Ingest: READINGS readings go device buffer → broker → worker → database; the figure is
readings / (first add → last row committed), checked for loss and duplicates.
Read: STORED rows (20 devices × STORED/20 readings 10 s apart) are loaded, then
`GET /logbook/storage/read/` for 24 h of one device is timed over HTTP, raw and aggregated,
from the request sent on a new connection to the whole body received, with two clients in
turn (see measure_reads).

    .venv/bin/python benchmarks/telemetry.py [--database sqlite|postgresql|both]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode

import paho.mqtt.client as paho
import requests
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from harness import answers, free_port, lean_request, wait_for  # noqa: E402  (also puts the checkout on sys.path)
import fleet_wire as wire
from fleet_device.telemetry import Telemetry, TelemetryConfig
from fleet_server.logbook import service

BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
DAY_US = 86_400 * 1_000_000
START_US = 1_594_252_800 * 1_000_000  # 2020-07-09T00:00:00Z


@contextlib.contextmanager
def process(args, log_path: Path, env=None, user=None):
    with open(log_path, "ab") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, user=user,
                                 start_new_session=True)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)


@contextlib.contextmanager
def mosquitto(tmp: Path):
    port = free_port()
    (tmp / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 100000\n"
    )
    with process(["mosquitto", "-c", str(tmp / "mosquitto.conf")], tmp / "mosquitto.log"):
        def up():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return True
            return False
        wait_for(up, 10, "mosquitto")
        yield f"mqtt://127.0.0.1:{port}"


@contextlib.contextmanager
def postgresql(tmp: Path):
    """A throwaway cluster owned by the postgres user in a temp dir, listening on 127.0.0.1 only."""
    if PG_BIN is None:
        raise SystemExit("PostgreSQL binaries not found: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-pg-"))
    shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, user="postgres", timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True, user="postgres", timeout=60)
    try:
        admin = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                                 isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text("CREATE DATABASE fleet_bench"))
        admin.dispose()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/fleet_bench"
    finally:
        subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True,
                       user="postgres", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def fleet_env(tmp: Path, database_url: str, broker_url: str) -> dict:
    return {**os.environ, "FLEET_DATABASE_URL": database_url, "FLEET_MQTT_URL": broker_url,
            "FLEET_VAR_DIR": str(tmp / "var"), "FLEET_MQTT_GROUP": f"bench-{uuid.uuid4().hex[:6]}",
            "FLEET_LOG_LEVEL": "WARNING"}


def fleet(env, *args) -> str:
    result = subprocess.run([str(BIN / "fleet-server"), *args], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise SystemExit(f"fleet-server {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


# --- ingest -------------------------------------------------------------------

def measure_ingest(tmp: Path, env: dict, engine, readings: int, batch_size: int, timeout: float) -> dict:
    device_id, unit_id = fleet(env, "devices", "create", "--name", "bench-ingest").split()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-device-{unit_id}",
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.max_queued_messages_set(10000)
    connected = threading.Event()
    # The device sends its next batch once the server confirmed the last one, as the agent does:
    # the broker orders this subscription before the batches published after it.
    confirmations = wire.device_topic(unit_id, "confirmations")
    client.on_connect = lambda c, u, f, rc, p: rc.is_failure or (c.subscribe(confirmations, qos=1), connected.set())
    client.on_message = lambda c, u, message: telemetry.confirm(wire.decode(wire.Confirmation, message.payload).ids)
    host, port = env["FLEET_MQTT_URL"].removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    config = TelemetryConfig(sources=(), capacity=readings * 2, batch_size=batch_size)
    telemetry = Telemetry(unit_id, tmp / f"device-{unit_id[:8]}", client, connected, config)
    chunk = 100

    def produce():
        for offset in range(0, readings, chunk):
            telemetry.add([{"field": "obd.bat.voltage", "type": "double", "ts": (START_US + i * 1000) / 1e6,
                            "value": float(i)} for i in range(offset, min(offset + chunk, readings))])

    count = sa.text("SELECT count(*), count(DISTINCT ts_us) FROM telemetry_reading WHERE device_id = :d")
    worker_log = tmp / "worker.log"
    with process([str(BIN / "fleet-server"), "worker", "--worker-id", "bench"], worker_log,
                 {**env, "FLEET_LOG_LEVEL": "INFO"}):
        wait_for(connected.is_set, 10, "the device's broker connection")
        # A shared subscription nobody holds yet drops what is published to it.
        wait_for(lambda: worker_log.exists() and b"subscribed" in worker_log.read_bytes(), 60, "the worker")
        started = time.perf_counter()
        telemetry.start()
        producer = threading.Thread(target=produce)
        producer.start()
        stored = distinct = 0
        deadline = time.monotonic() + timeout
        while stored < readings and time.monotonic() < deadline:
            time.sleep(0.05)
            with engine.connect() as connection:
                stored, distinct = connection.execute(count, {"d": device_id}).one()
        elapsed = time.perf_counter() - started
        producer.join(timeout)
        time.sleep(1)  # anything arriving late would be a duplicate
        with engine.connect() as connection:
            stored, distinct = connection.execute(count, {"d": device_id}).one()
        telemetry.stop()
    client.disconnect()
    client.loop_stop()
    return {"readings": readings, "stored": stored, "distinct": distinct, "seconds": elapsed,
            "per_second": stored / elapsed, "batches": telemetry.sent_batches}


# --- read latency -----------------------------------------------------------------

def load_rows(engine, database: str, stored: int, layout: str, devices: int = 20) -> str:
    """Insert `stored` readings for `devices` devices, 10 s apart; return one device's id.

    `interleaved` stores them as a fleet reporting at once does, the devices' readings of each
    moment side by side, so one device's day is spread over the whole table; `contiguous`
    stores one device after the other, so its day sits on a few pages (the easy case).
    """
    per_device = stored // devices
    ids = [str(uuid.uuid4()) for _ in range(devices)]
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO device (id, unit_id, name, description, tags, created_at, online) "
            "VALUES (:id, :unit, 'bench', '', '[]', :now, false)"),
            [{"id": i, "unit": str(uuid.uuid4()), "now": now} for i in ids])

    def row(device_id, n):
        # Rows exactly as the worker stores them (including the rendered entry of a raw read).
        reading = wire.Reading(field="obd.bat.voltage", type="double", ts=(START_US + n * 10_000_000) / 1e6,
                               value=12.0 + (n % 100) / 100)
        return service.reading_row(device_id, reading)

    if layout == "interleaved":
        rows = (row(device_id, n) for n in range(per_device) for device_id in ids)
    else:
        rows = (row(device_id, n) for device_id in ids for n in range(per_device))
    columns = ", ".join(service.READING_COLUMNS)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if database == "postgresql":
            with cursor.copy(f"COPY telemetry_reading ({columns}) FROM STDIN") as copy:
                for values in rows:
                    copy.write_row(values)
        else:
            cursor.executemany(f"INSERT INTO telemetry_reading ({columns}) VALUES ({', '.join('?' * 8)})", rows)
        raw.commit()
        if database == "postgresql":
            # What autovacuum does on its own to a table that only grows (PostgreSQL ≥ 13): the
            # statistics, and the visibility map that lets a read use the index alone.
            raw.driver_connection.autocommit = True
            cursor.execute("VACUUM ANALYZE telemetry_reading")
        else:
            cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return ids[devices // 2]


def raw_read_plan(engine, database: str, device_id: str) -> list[str]:
    """The database's plan for the raw 24 h read, as the logbook service runs it."""
    params = {"device_id": device_id, "field": "obd.bat.voltage", "field_type": "double",
              "start": START_US + DAY_US, "end": START_US + 2 * DAY_US, "limit": service.MAX_RAW_READINGS + 1}
    explain = "EXPLAIN QUERY PLAN " if database == "sqlite" else "EXPLAIN "
    with engine.connect() as connection:
        rows = connection.execute(sa.text(explain + service.RAW_READ_SQL[database]), params).all()
    return [str(row[-1]) for row in rows]


def measure_reads(tmp: Path, env: dict, device_id: str, token: str, repeats: int) -> dict:
    """Each case's requests, timed with two clients in turn on the same server.

    `requests` reads a body in 10 KB chunks through several layers: for the raw read's 440 KB
    that is a few milliseconds of the client's own CPU, on the two cores the server uses too.
    The lean client (http.client, the body read in one call) is what the target is read
    against; both are printed.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    day = {"from_utc": "2020-07-10T00:00:00Z", "to_utc": "2020-07-11T00:00:00Z"}
    cases = {
        "raw 24 h": {},
        "avg per 10m": {"aggregation": "avg", "interval": "10m"},
        "max per 1h": {"aggregation": "max", "interval": "1h"},
    }
    results = {}
    headers = {"Authorization": f"APIToken {token}"}
    with process([str(BIN / "fleet-server"), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
                 tmp / "serve.log", env):
        wait_for(lambda: answers(url + "/health"), 30, "the API server")
        session = requests.Session()
        session.headers.update(headers)
        for name, extra in cases.items():
            params = {"device_id": device_id, "field": "obd.bat.voltage", "field_type": "double", **day, **extra}
            target = "/logbook/storage/read/?" + urlencode(params)
            status, body = lean_request(port, "GET", target, headers)
            assert status == 200, body[:500]
            entries = len(json.loads(body))
            timings = {"lean": [], "requests": []}
            for _ in range(repeats):
                began = time.perf_counter()
                status, body = lean_request(port, "GET", target, headers)
                timings["lean"].append((time.perf_counter() - began) * 1000)
                assert status == 200 and len(body) > 1, body[:500]
                began = time.perf_counter()
                response = session.get(url + "/logbook/storage/read/", params=params, timeout=30)
                timings["requests"].append((time.perf_counter() - began) * 1000)
                assert response.status_code == 200, response.text
            results[name] = {"entries": entries}
            for client, values in timings.items():
                values.sort()
                results[name][client] = {"median_ms": statistics.median(values),
                                         "p95_ms": values[int(len(values) * 0.95) - 1]}
    return results


def run(database: str, args) -> None:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-telemetry-") as workdir:
        tmp = Path(workdir)
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(mosquitto(tmp))
            url = stack.enter_context(postgresql(tmp)) if database == "postgresql" else f"sqlite:///{tmp / 'fleet.db'}"
            env = fleet_env(tmp, url, broker)
            fleet(env, "db", "upgrade", "heads")
            token = fleet(env, "tokens", "create", "--name", "bench")
            engine = sa.create_engine(url)
            ingest = measure_ingest(tmp, env, engine, args.readings, args.batch, args.timeout)
            print(f"[{database}] ingest: {ingest['stored']}/{ingest['readings']} readings stored "
                  f"({ingest['distinct']} distinct) in {ingest['seconds']:.2f} s = {ingest['per_second']:,.0f} readings/s"
                  f" over {ingest['batches']} batches of ≤{args.batch}", flush=True)
            began = time.perf_counter()
            device_id = load_rows(engine, database, args.stored, args.layout)
            with engine.connect() as connection:
                total = connection.execute(sa.text("SELECT count(*) FROM telemetry_reading")).scalar()
            print(f"[{database}] loaded {args.stored:,} rows ({args.layout}) in {time.perf_counter() - began:.1f} s "
                  f"({total:,} rows stored in all)", flush=True)
            for line in raw_read_plan(engine, database, device_id):
                print(f"[{database}] raw read plan: {line}", flush=True)
            for name, figures in measure_reads(tmp, env, device_id, token, args.repeats).items():
                lean, heavy = figures["lean"], figures["requests"]
                print(f"[{database}] read {name}: {figures['entries']} entries, median {lean['median_ms']:.1f} ms, "
                      f"p95 {lean['p95_ms']:.1f} ms over {args.repeats} requests (with requests as the client: "
                      f"median {heavy['median_ms']:.1f} ms, p95 {heavy['p95_ms']:.1f} ms)", flush=True)
            engine.dispose()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--readings", type=int, default=50_000, help="readings sent end to end (default 50000)")
    parser.add_argument("--batch", type=int, default=1000, help="readings per batch (default 1000)")
    parser.add_argument("--stored", type=int, default=1_000_000, help="rows stored for the read test (default 1e6)")
    parser.add_argument("--layout", choices=("interleaved", "contiguous"), default="interleaved",
                        help="how the stored rows lie: the devices' readings side by side as a fleet reports them "
                             "(default), or one device after another")
    parser.add_argument("--repeats", type=int, default=50, help="requests per read case (default 50)")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for the ingest (default 120 s)")
    args = parser.parse_args()
    for database in (("sqlite", "postgresql") if args.database == "both" else (args.database,)):
        run(database, args)


if __name__ == "__main__":
    main()
