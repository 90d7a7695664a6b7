"""HTTP endpoints for /docker/registries/."""
from flask.views import MethodView

from ..blueprint import Blueprint
from ..links import CREATED_ID, created_links, links_to
from ..pagination import paginate
from ..schemas import ErrorSchema, PaginationArgs
from . import service
from .schemas import RegistryPage, RegistryPatchSchema, RegistrySchema

blp = Blueprint(
    "registries", __name__, url_prefix="/docker/registries",
    description="Private Docker registries devices log in to. Passwords are write-only and encrypted at rest.",
)

EXAMPLE = {"name": "private", "url": "registry.example.com:5000", "username": "deploy", "password": "s3cret"}


@blp.route("/")
class Registries(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, RegistryPage)
    def get(self, args):
        """List registries"""
        return paginate(service.registries_query(), **args)

    @blp.arguments(RegistrySchema, example=EXAMPLE)
    @blp.response(201, RegistrySchema)
    @blp.doc(**created_links(
        links_to("Registry", "/docker/registries/{registry_id}/", "get put patch delete", registry_id=CREATED_ID),
    ))
    def post(self, data):
        """Create a registry"""
        return service.create_registry(data)


@blp.route("/<int(max=2147483647):registry_id>/")
class RegistryItem(MethodView):
    @blp.response(200, RegistrySchema)
    def get(self, registry_id):
        """Retrieve a registry (never its password)"""
        return service.get_registry(registry_id)

    @blp.arguments(RegistrySchema, example=EXAMPLE)
    @blp.response(200, RegistrySchema)
    def put(self, data, registry_id):
        """Replace a registry; an omitted password keeps the stored one"""
        return service.update_registry(service.get_registry(registry_id), data)

    @blp.arguments(RegistryPatchSchema(partial=True))
    @blp.response(200, RegistrySchema)
    def patch(self, data, registry_id):
        """Change some fields of a registry"""
        return service.update_registry(service.get_registry(registry_id), data)

    @blp.response(204)
    @blp.alt_response(409, schema=ErrorSchema, description="The registry is used by releases, which the error names.")
    def delete(self, registry_id):
        """Delete a registry that no release uses"""
        service.delete_registry(service.get_registry(registry_id))
