"""Recording the deployment reports devices send: a batch's reports with a few statements for the lot."""
import fleet_wire as wire

from ..extensions import db
from ..messaging.ingest import Rejected
from ..models import Deployment, Release, release_devices


class DeploymentReports:
    """A batch's deployment reports, recorded with a few statements for the whole batch.

    Built from all the batch's reports, it reads in two queries what checking them needs: the
    project of each release they name, and each (release, device) pair those releases target
    with the deployment stored for it, if any. `record` checks one report against that and
    holds its write back; `store` writes what is held back, one INSERT and one UPDATE for the
    lot. A report `record` rejects has written nothing, so it needs no savepoint of its own.
    A `succeeded` report is written at once, with the others held back before it, because it
    supersedes the device's other succeeded deployments of the project: an UPDATE of rows this
    batch may not have read, which must see every earlier report of the batch.
    """

    def __init__(self, reports):
        """`reports`: [(device, report)], the device as an (id, unit_id) row."""
        connection = db.session.connection()
        release_ids = list({report.release_id for _device, report in reports})
        self.project_of = dict(connection.execute(_PROJECTS_OF_RELEASES, {"release_ids": release_ids}).all())
        self.targeted = set()
        # (release_id, device_id) -> the deployment's fields as they stand after the reports seen so far
        self.latest = {}
        for release_id, device_id, deployment_id, state, step, detail, reported_at in connection.execute(
                _TARGETED_DEPLOYMENTS,
                {"release_ids": release_ids, "device_ids": list({device.id for device, _report in reports})}):
            self.targeted.add((release_id, device_id))
            if deployment_id is not None:
                self.latest[release_id, device_id] = {
                    "state": state, "step": step, "detail": detail, "reported_at": reported_at}
        self.stored = set(self.latest)  # the pairs whose deployment row exists
        self.held_back = {}  # (release_id, device_id) -> the fields to write

    def record(self, device, report: wire.DeploymentReport):
        """Check one report of the batch and hold its write back; Rejected (nothing written) if it does not fit."""
        release_id = report.release_id
        if self.project_of.get(release_id) != report.project_id:
            raise Rejected(f"release {release_id} of project {report.project_id} does not exist")
        key = (release_id, device.id)
        if key not in self.targeted:
            raise Rejected(f"release {release_id} does not target device {device.id}")
        latest = self.latest.get(key)
        if latest is not None and report.ts < latest["reported_at"]:
            return  # QoS 1 may deliver late duplicates: older news never overwrites newer
        fields = {"state": report.state, "step": report.step, "detail": report.detail,
                  "reported_at": report.ts}
        if fields != latest:  # the same news again changes nothing, not even updated_at
            self.latest[key] = self.held_back[key] = fields
        if report.state == "succeeded":
            self.store()
            self._supersede_others(device, release_id)

    def store(self):
        """Write the held-back reports: new deployments in one INSERT, changed ones in one UPDATE."""
        if not self.held_back:
            return
        new, changed = [], []
        for (release_id, device_id), fields in self.held_back.items():
            if (release_id, device_id) in self.stored:
                changed.append({"key_release_id": release_id, "key_device_id": device_id, **fields})
            else:
                new.append({"release_id": release_id, "device_id": device_id, **fields})
        connection = db.session.connection()
        if new:
            connection.execute(_deployment.insert(), new)
        if changed:
            connection.execute(_UPDATE_DEPLOYMENT, changed)
        self.stored.update(self.held_back)
        self.held_back.clear()

    def _supersede_others(self, device, release_id: int):
        """A device runs one release per project: the others it ran are no longer deployed."""
        project_id, detail = self.project_of[release_id], f"replaced by release {release_id}"
        db.session.connection().execute(_SUPERSEDE, {
            "of_device": device.id, "succeeded_release": release_id, "of_project": project_id, "replaced_by": detail})
        # What this batch knows of those deployments must say what the UPDATE just did.
        for (other_release_id, device_id), fields in self.latest.items():
            if (device_id == device.id and other_release_id != release_id and fields["state"] == "succeeded"
                    and self.project_of[other_release_id] == project_id):
                fields.update(state="superseded", detail=detail)


_deployment, _release = Deployment.__table__, Release.__table__
# Built once: building a statement cost more than running it.
_PROJECTS_OF_RELEASES = db.select(_release.c.id, _release.c.project_id).where(
    _release.c.id.in_(db.bindparam("release_ids", expanding=True)))
_TARGETED_DEPLOYMENTS = (
    db.select(release_devices.c.release_id, release_devices.c.device_id, _deployment.c.id, _deployment.c.state,
              _deployment.c.step, _deployment.c.detail, _deployment.c.reported_at)
    .outerjoin(_deployment, db.and_(_deployment.c.release_id == release_devices.c.release_id,
                                    _deployment.c.device_id == release_devices.c.device_id))
    .where(release_devices.c.release_id.in_(db.bindparam("release_ids", expanding=True)),
           release_devices.c.device_id.in_(db.bindparam("device_ids", expanding=True)))
)
# The SET clause is the executemany rows' other keys: state, step, detail, reported_at (and updated_at).
_UPDATE_DEPLOYMENT = _deployment.update().where(_deployment.c.release_id == db.bindparam("key_release_id"),
                                                _deployment.c.device_id == db.bindparam("key_device_id"))
_SUPERSEDE = (
    _deployment.update()
    .where(_deployment.c.device_id == db.bindparam("of_device"), _deployment.c.state == "succeeded",
           _deployment.c.release_id != db.bindparam("succeeded_release"),
           _deployment.c.release_id.in_(
               db.select(_release.c.id).where(_release.c.project_id == db.bindparam("of_project"))))
    .values(state="superseded", detail=db.bindparam("replaced_by"))
)
