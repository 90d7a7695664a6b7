"""HTTP endpoints for /docker/projects/."""
from flask.views import MethodView

from ..blueprint import Blueprint
from ..links import CREATED_ID, created_links, links_to
from ..pagination import paginate
from ..schemas import ErrorSchema, PaginationArgs
from . import service
from .schemas import ProjectDeleteArgs, ProjectPage, ProjectPatchSchema, ProjectSchema

blp = Blueprint("projects", __name__, url_prefix="/docker/projects", description="Projects group releases.")


@blp.route("/")
class Projects(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, ProjectPage)
    def get(self, args):
        """List projects"""
        return paginate(service.projects_query(), **args)

    @blp.arguments(ProjectSchema, example={"name": "deployment", "description": "Curveball and RavenDB"})
    @blp.response(201, ProjectSchema)
    @blp.doc(**created_links(
        links_to("Project", "/docker/projects/{project_id}/", "get put patch delete", project_id=CREATED_ID),
        links_to("Releases", "/docker/projects/{project_pk}/releases/", "get post", project_pk=CREATED_ID),
    ))
    def post(self, data):
        """Create a project"""
        return service.create_project(data)


@blp.route("/<int(max=2147483647):project_id>/")
class ProjectItem(MethodView):
    @blp.response(200, ProjectSchema)
    def get(self, project_id):
        """Retrieve a project"""
        return service.get_project(project_id)

    @blp.arguments(ProjectSchema)
    @blp.response(200, ProjectSchema)
    def put(self, data, project_id):
        """Replace a project's name and description"""
        return service.update_project(service.get_project(project_id), data)

    @blp.arguments(ProjectPatchSchema(partial=True))
    @blp.response(200, ProjectSchema)
    def patch(self, data, project_id):
        """Change some fields of a project"""
        return service.update_project(service.get_project(project_id), data)

    @blp.arguments(ProjectDeleteArgs, location="query")
    @blp.response(204)
    @blp.alt_response(409, schema=ErrorSchema, description="The project has releases and force was not given.")
    def delete(self, args, project_id):
        """Delete a project; one with releases needs ?force=true, which retracts them from devices"""
        service.delete_project(service.get_project(project_id), args["force"])
