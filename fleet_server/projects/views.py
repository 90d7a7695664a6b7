"""HTTP endpoints for /docker/projects/."""
from flask.views import MethodView
from ..blueprint import Blueprint


from ..pagination import paginate
from ..schemas import PaginationArgs
from . import service
from .schemas import ProjectPage, ProjectSchema

blp = Blueprint("projects", __name__, url_prefix="/docker/projects", description="Projects group releases.")


@blp.route("/")
class Projects(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, ProjectPage)
    def get(self, args):
        """List projects"""
        return paginate(service.projects_query(), **args)

    @blp.arguments(ProjectSchema)
    @blp.response(201, ProjectSchema)
    def post(self, data):
        """Create a project"""
        return service.create_project(data)


@blp.route("/<int:project_id>/")
class ProjectItem(MethodView):
    @blp.response(200, ProjectSchema)
    def get(self, project_id):
        """Retrieve a project"""
        return service.get_project(project_id)
