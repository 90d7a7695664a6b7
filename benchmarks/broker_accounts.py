"""How fast the server creates and removes per-device broker accounts through the dynsec control topic.

Starts its own secured Mosquitto on free loopback ports in a temp dir (the test fixture's
set-up), issues N device accounts one after another as registrations would, removes them all,
and prints the figures. Bounded: N ≤ 2000, loopback only.

    .venv/bin/python -m benchmarks.broker_accounts [N]
"""
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fleet_server import broker_accounts
from fleet_server.app import create_app
from tests.support.secure_broker import start_secured_broker, stop_secured_broker


def main(count: int = 200) -> None:
    count = max(1, min(count, 2000))
    with tempfile.TemporaryDirectory(prefix="fleet-bench-accounts-") as tmp:
        broker = start_secured_broker(Path(tmp) / "broker")
        try:
            app = create_app({"SQLALCHEMY_DATABASE_URI": "sqlite:///:memory:", "FLEET_VAR_DIR": tmp,
                              "FLEET_MQTT_URL": broker.url, "FLEET_DYNSEC_USERNAME": broker.admin[0],
                              "FLEET_DYNSEC_PASSWORD": broker.admin[1]})
            unit_ids = [str(uuid.uuid4()) for _ in range(count)]
            with app.app_context():
                started = time.perf_counter()
                for unit_id in unit_ids:
                    broker_accounts.issue_device_credentials(unit_id)
                issue_seconds = time.perf_counter() - started
                started = time.perf_counter()
                for unit_id in unit_ids:
                    broker_accounts.remove_device_account(unit_id)
                remove_seconds = time.perf_counter() - started
                app.extensions["fleet_dynsec"].close()
        finally:
            stop_secured_broker(broker)
    print(f"issued {count} device accounts (role + ACLs + client) in {issue_seconds:.2f} s: "
          f"{count / issue_seconds:.0f} accounts/s, {1000 * issue_seconds / count:.1f} ms each")
    print(f"removed {count} device accounts in {remove_seconds:.2f} s: "
          f"{count / remove_seconds:.0f} accounts/s, {1000 * remove_seconds / count:.1f} ms each")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
