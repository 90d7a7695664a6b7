"""HTTP endpoints for /docker/projects/{project_pk}/releases/."""
from flask.views import MethodView
from ..blueprint import Blueprint


from ..pagination import paginate
from ..projects.service import get_project
from ..schemas import PaginationArgs
from . import service
from .schemas import ReleasePage, ReleaseSchema

blp = Blueprint(
    "releases",
    __name__,
    url_prefix="/docker/projects/<int:project_pk>/releases",
    description="Releases: the containers a project's devices must run.",
)


@blp.route("/")
class Releases(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, ReleasePage)
    def get(self, args, project_pk):
        """List a project's releases"""
        get_project(project_pk)
        return paginate(service.releases_query(project_pk), **args)

    @blp.arguments(ReleaseSchema)
    @blp.response(201, ReleaseSchema)
    def post(self, data, project_pk):
        """Create a release; every targeted device receives it"""
        return service.create_release(get_project(project_pk), data)


@blp.route("/<int:release_id>/")
class ReleaseItem(MethodView):
    @blp.response(200, ReleaseSchema)
    def get(self, project_pk, release_id):
        """Retrieve a release"""
        return service.get_release(project_pk, release_id)
