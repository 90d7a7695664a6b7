"""Project operations, callable without HTTP."""
from ..errors import NotFound
from ..extensions import db
from ..models import Project


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
