"""Many ingest workers against one database and broker: each report stored once, none lost when a worker dies."""
import re
import time
import uuid

import pytest

import fleet_wire as wire
from tests.support.infra import close_mqtt, connect_mqtt
from tests.support.stack import Process, _command, _run, add_release_for_new_devices, eventually, server_env

pytestmark = pytest.mark.slow

REPORTS = 240


@pytest.fixture
def database(tmp_path, broker):
    """A migrated SQLite database holding REPORTS devices and one release that targets them all."""
    from fleet_server.app import create_app
    from fleet_server.extensions import db

    env = server_env(tmp_path, broker.url)
    env["FLEET_WORKER_ADOPT_AFTER"] = "3"
    _run(_command("fleet-server") + ["db", "upgrade", "heads"], env)
    # No broker for this app: the release's publications stay in the outbox for the workers.
    app = create_app({"SQLALCHEMY_DATABASE_URI": env["FLEET_DATABASE_URL"], "FLEET_MQTT_URL": broker.url})
    with app.app_context():
        fleet = add_release_for_new_devices(REPORTS)
    yield env, app, fleet["units"], (fleet["project"], fleet["release"])
    with app.app_context():
        db.engine.dispose()


def _deployments(app):
    from fleet_server import models
    from fleet_server.extensions import db

    with app.app_context():
        try:
            rows = db.session.execute(db.select(models.Deployment.device_id, models.Deployment.state)).all()
        finally:
            db.session.remove()
    return rows


def _start_worker(env, tmp_path, worker_id):
    return Process(_command("fleet-server") + ["worker", "--worker-id", worker_id], env,
                   tmp_path / f"worker-{worker_id}.log").start()


def _report(units, ids, start, stop, publisher):
    project_id, release_id = ids
    sent = []
    for unit_id in units[start:stop]:
        body = {"project_id": project_id, "release_id": release_id, "version_hash": "0badc0de",
                "state": "queued", "step": None, "detail": "", "ts": time.time()}
        sent.append(publisher.publish(wire.device_topic(unit_id, "deployments"),
                                      wire.encode(wire.from_builtins(wire.DeploymentReport, body)), qos=1))
    for info in sent:
        info.wait_for_publish(10)


def test_three_workers_store_every_report_once_even_when_one_is_killed(database, broker, tmp_path):
    env, app, units, ids = database
    names = [f"w{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    workers = [_start_worker(env, tmp_path, name) for name in names]
    publisher, _ = connect_mqtt(broker.host, broker.port, client_id=f"fleet-test-devices-{uuid.uuid4().hex[:6]}")
    try:
        for worker in workers:
            eventually(lambda: "connected and subscribed" in worker.log(), 30, message="every worker subscribed")

        _report(units, ids, 0, REPORTS // 2, publisher)
        workers[1].kill()  # mid-stream: some reports may sit unacknowledged in its session
        # These are split round robin across all three sessions, the dead one's too.
        _report(units, ids, REPORTS // 2, REPORTS, publisher)

        eventually(lambda: len(_deployments(app)) == REPORTS, 60,
                   message=f"{REPORTS} deployment rows\n" + "\n".join(w.log()[-3000:] for w in workers))
        rows = _deployments(app)
        assert len({device for device, _state in rows}) == REPORTS
        assert {state for _device, state in rows} == {"queued"}
        adopted = f"adopted session fleet-worker-{names[1]}: drained and ended"
        eventually(lambda: adopted in workers[0].log() + workers[2].log(), 20, message="a survivor to end the session")
        drained = re.search(re.escape(adopted) + r", (\d+) report", workers[0].log() + workers[2].log())
        assert int(drained[1]) >= REPORTS // 2 // 3 - 5  # its round-robin share of the second half at least
        time.sleep(1.0)  # nothing more trickles in: no duplicate or late rows
        assert len(_deployments(app)) == REPORTS
    finally:
        close_mqtt(publisher)
        for worker in workers:
            worker.stop()


def test_a_restarted_worker_resumes_its_own_session(database, broker, tmp_path):
    env, app, units, ids = database
    env = {**env, "FLEET_WORKER_ADOPT_AFTER": "300"}  # no peer adopts: only the owner can get these
    workers = [_start_worker(env, tmp_path, name) for name in ("keep", "restart")]
    name = workers[1].args[-1]
    publisher, _ = connect_mqtt(broker.host, broker.port, client_id=f"fleet-test-devices-{uuid.uuid4().hex[:6]}")
    try:
        for worker in workers:
            eventually(lambda: "connected and subscribed" in worker.log(), 30, message="both workers subscribed")
        workers[1].kill()
        _report(units, ids, 0, REPORTS, publisher)
        eventually(lambda: len(_deployments(app)) >= REPORTS // 2 - 5, 30, message="the live worker's half")
        assert len(_deployments(app)) < REPORTS  # the rest waits in the dead worker's session

        workers.append(_start_worker(env, tmp_path, name))
        eventually(lambda: len(_deployments(app)) == REPORTS, 60, message="the restarted worker's half")
    finally:
        close_mqtt(publisher)
        for worker in workers:
            worker.stop()
