"""Deployment reports through the ingest's `handle_batch`, in process: time and statements per batch.

What a release fan-out makes the ingest worker store: one `queued` report from each of DEVICES
devices, handed to `ingest.handle_batch` in batches of BATCH (as the worker does with what
waits in its inbox), then a `pulling` report from each (every deployment exists now: the
update path). No broker and no network: this measures the database side alone, on a SQLite
file and on a throwaway PostgreSQL cluster (Debian's, trust auth on 127.0.0.1 only, removed
afterwards). Each round uses a new release targeting the same devices; the figures are the
median of ROUNDS rounds.

    .venv/bin/python benchmarks/ingest_reports.py [--database sqlite|postgresql|both] [--devices 2000]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import event

from harness import REPO  # noqa: F401  (puts the checkout on sys.path)
from telemetry import postgresql

import fleet_wire as wire

BATCH = 500
ROUNDS = 3


def _app(database_url: str, var_dir: Path):
    from flask_migrate import upgrade

    from fleet_server.app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "FLEET_VAR_DIR": str(var_dir)})
    with app.app_context():
        upgrade(directory=app.config["MIGRATIONS_DIR"], revision="heads")
    return app


def _new_release(devices, version: str) -> tuple[int, int]:
    from fleet_server import models
    from fleet_server.extensions import db

    project = db.session.scalar(db.select(models.Project).filter_by(name="bench"))
    if project is None:
        project = models.Project(name="bench")
    release = models.Release(project=project, version=version, version_hash="0badc0de", devices=devices)
    db.session.add(release)
    db.session.commit()
    return project.id, release.id


def _reports(units, project_id: int, release_id: int, state: str) -> list[tuple[str, bytes]]:
    return [(wire.device_topic(unit, "deployments"),
             wire.encode(wire.DeploymentReport(project_id=project_id, release_id=release_id,
                                               version_hash="0badc0de", state=state, ts=time.time())))
            for unit in units]


def _store(messages) -> tuple[float, int]:
    """Seconds and statements to store `messages` in batches of BATCH; every one must be stored."""
    from fleet_server.messaging import ingest
    from fleet_server.extensions import db

    statements = 0

    def count(*_args):
        nonlocal statements
        statements += 1

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        started = time.perf_counter()
        for start in range(0, len(messages), BATCH):
            verdicts = ingest.handle_batch(messages[start:start + BATCH])
            if not all(verdicts):
                raise SystemExit(f"{verdicts.count(False)} reports were rejected")
        elapsed = time.perf_counter() - started
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
        db.session.remove()
    return elapsed, statements


def measure(database: str, database_url: str, tmp: Path, devices: int) -> dict:
    from fleet_server import models
    from fleet_server.extensions import db

    app = _app(database_url, tmp / "var")
    with app.app_context():
        fleet = [models.Device(name=f"d{i}") for i in range(devices)]
        db.session.add_all(fleet)
        db.session.commit()
        units = [device.unit_id for device in fleet]
        new, existing = [], []
        for round_number in range(ROUNDS):
            project_id, release_id = _new_release(fleet, f"{round_number}")
            db.session.remove()
            new.append(_store(_reports(units, project_id, release_id, "queued")))
            existing.append(_store(_reports(units, project_id, release_id, "pulling")))
            fleet = db.session.scalars(db.select(models.Device)).all()
        stored = db.session.scalar(db.select(db.func.count()).select_from(models.Deployment))
        if stored != devices * ROUNDS:
            raise SystemExit(f"{stored} deployments stored, {devices * ROUNDS} expected")
        db.engine.dispose()
    batches = -(-devices // BATCH)

    def figures(runs):
        seconds = statistics.median(elapsed for elapsed, _ in runs)
        return {"seconds": round(seconds, 3), "reports_per_s": round(devices / seconds),
                "statements_per_batch": round(statistics.median(count for _, count in runs) / batches, 1)}

    return {"database": database, "devices": devices, "batch": BATCH, "queued (new)": figures(new),
            "pulling (existing)": figures(existing)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--devices", type=int, default=2000)
    args = parser.parse_args()
    if not 1 <= args.devices <= 20000:
        raise SystemExit("--devices must be between 1 and 20000")
    logging.basicConfig(level=logging.WARNING)
    for database in ("sqlite", "postgresql") if args.database == "both" else (args.database,):
        with tempfile.TemporaryDirectory(prefix="fleet-bench-reports-") as tmp:
            with contextlib.ExitStack() as stack:
                url = (f"sqlite:///{tmp}/fleet.db" if database == "sqlite"
                       else stack.enter_context(postgresql(Path(tmp))))
                print(measure(database, url, Path(tmp), args.devices), flush=True)


if __name__ == "__main__":
    main()
