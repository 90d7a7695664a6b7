"""Project operations, callable without HTTP."""
import logging

from ..errors import Conflict, NotFound
from ..extensions import db
from ..messaging import outbox
from ..models import Device, Project, Release, release_devices

log = logging.getLogger(__name__)


def create_project(data) -> Project:
    project = Project(**data)
    db.session.add(project)
    db.session.commit()
    return project


def get_project(project_id: int) -> Project:
    project = db.session.get(Project, project_id)
    if project is None:
        raise NotFound(f"project {project_id} does not exist")
    return project


def projects_query():
    return db.select(Project).order_by(Project.id)


def update_project(project: Project, data) -> Project:
    for field, value in data.items():
        setattr(project, field, value)
    db.session.commit()
    return project


def delete_project(project: Project, force: bool = False):
    """Delete a project; with releases only when forced, and then every device it reached gets a tombstone."""
    release_count = db.session.scalar(db.select(db.func.count(Release.id)).filter_by(project_id=project.id))
    if release_count and not force:
        raise Conflict(
            f"project {project.id} has {release_count} release(s); delete them first or pass ?force=true "
            "to delete the project and retract its releases from devices",
            {"force": [f"required: the project has {release_count} release(s)"]},
        )
    unit_ids = db.session.scalars(
        db.select(Device.unit_id)
        .join(release_devices, release_devices.c.device_id == Device.id)
        .join(Release, Release.id == release_devices.c.release_id)
        .where(Release.project_id == project.id)
        .distinct()
    )
    outbox.enqueue(list(unit_ids), project.id)
    db.session.delete(project)
    db.session.commit()
    log.info("project=%s deleted releases=%s", project.id, release_count)
    outbox.flush_after_commit()
