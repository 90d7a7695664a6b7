"""HTTP endpoints for /docker/projects/{project_pk}/releases/."""
from flask import g
from flask.views import MethodView

from ..blueprint import Blueprint
from ..links import CREATED_ID, created_links, links_to
from ..pagination import paginate
from ..projects.service import get_project
from ..schemas import ErrorSchema
from . import service
from .schemas import SEED_EXAMPLE, ReleaseListArgs, ReleasePage, ReleasePatchSchema, ReleaseSchema

ADMIN_ONLY = ("The token's role may not give a release this power: privileged mode, host or container: "
              "networking, binds outside FLEET_ALLOWED_BIND_ROOTS and removing containers Fleet does not manage "
              "need the admin role. `errors` names each field.")

blp = Blueprint(
    "releases",
    __name__,
    url_prefix="/docker/projects/<int(max=2147483647):project_pk>/releases",
    description="Releases: the containers a project's devices must run. Every change is published to the "
    "affected devices at once (retained), or queued until the broker is back.",
)


@blp.route("/")
class Releases(MethodView):
    @blp.arguments(ReleaseListArgs, location="query")
    @blp.response(200, ReleasePage)
    def get(self, args, project_pk):
        """List a project's releases, optionally filtered by version, version_hash or device"""
        get_project(project_pk)
        limit, offset = args.pop("limit"), args.pop("offset")
        return paginate(service.releases_query(project_pk, **args), limit, offset)

    @blp.arguments(ReleaseSchema, example=SEED_EXAMPLE)
    @blp.response(201, ReleaseSchema)
    @blp.alt_response(403, schema=ErrorSchema, description=ADMIN_ONLY)
    @blp.doc(**created_links(
        links_to("Release", "/docker/projects/{project_pk}/releases/{release_id}/", "get put patch delete",
                 project_pk="$request.path.project_pk", release_id=CREATED_ID),
        links_to("ReleaseByHash", "/docker/projects/{project_pk}/releases/hash/{version_hash}/", "get",
                 project_pk="$request.path.project_pk", version_hash="$response.body#/version_hash"),
        links_to("ReleaseDeployments", "/docker/projects/{project_pk}/releases/{release_id}/deployments/", "get",
                 project_pk="$request.path.project_pk", release_id=CREATED_ID),
    ))
    def post(self, data, project_pk):
        """Create a release; every targeted device receives it

        The example is privileged, uses host networking and binds a path under /home:
        only an admin token may create it (see the 403 answer).
        """
        return service.create_release(get_project(project_pk), data, role=g.api_token.role)


@blp.route("/<int(max=2147483647):release_id>/")
class ReleaseItem(MethodView):
    @blp.response(200, ReleaseSchema)
    def get(self, project_pk, release_id):
        """Retrieve a release by id"""
        return service.get_release(project_pk, release_id)

    @blp.arguments(ReleaseSchema, example=SEED_EXAMPLE)
    @blp.response(200, ReleaseSchema)
    @blp.alt_response(403, schema=ErrorSchema, description=ADMIN_ONLY)
    def put(self, data, project_pk, release_id):
        """Replace a release; old and new devices receive their active release again"""
        return service.update_release(service.get_release(project_pk, release_id), data, role=g.api_token.role)

    @blp.arguments(ReleasePatchSchema)
    @blp.response(200, ReleaseSchema)
    @blp.alt_response(403, schema=ErrorSchema, description=ADMIN_ONLY)
    def patch(self, data, project_pk, release_id):
        """Change some fields of a release; old and new devices receive their active release again"""
        return service.update_release(service.get_release(project_pk, release_id), data, role=g.api_token.role)

    @blp.response(204)
    def delete(self, project_pk, release_id):
        """Delete a release; its devices fall back to their previous release of the project, or a tombstone"""
        service.delete_release(service.get_release(project_pk, release_id))


@blp.route("/hash/<string:version_hash>/")
class ReleaseByHash(MethodView):
    @blp.response(200, ReleaseSchema)
    def get(self, project_pk, version_hash):
        """Retrieve the newest release with this version_hash"""
        return service.release_by_hash(project_pk, version_hash)
