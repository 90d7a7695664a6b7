"""HTTP endpoints for /dongle/devices/{device_pk}/execute/: run a command, poll for its result."""
from flask.views import MethodView

from ..blueprint import Blueprint
from ..links import CREATED_ID, created_links, links_to
from ..pagination import paginate
from ..schemas import PaginationArgs
from . import service
from .schemas import CommandCreateSchema, CommandPage, CommandSchema

blp = Blueprint(
    "commands",
    __name__,
    url_prefix="/dongle/devices/<string:device_pk>/execute",
    description="Remote commands: run a command on a device asynchronously, then poll for its result.",
)


@blp.route("/")
class Commands(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, CommandPage)
    def get(self, args, device_pk):
        """List a device's recent commands, newest first"""
        return paginate(service.commands_query(device_pk), **args)

    @blp.arguments(CommandCreateSchema)
    @blp.response(201, CommandSchema)
    @blp.doc(**created_links(
        links_to("Command", "/dongle/devices/{device_pk}/execute/{command_id}/", "get",
                 device_pk="$request.path.device_pk", command_id=CREATED_ID),
        links_to("Commands", "/dongle/devices/{device_pk}/execute/", "get", device_pk="$request.path.device_pk"),
    ))
    def post(self, data, device_pk):
        """Execute a command on the device; returns at once with the command `queued`"""
        return service.create_command(device_pk, data)


@blp.route("/<string:command_id>/")
class CommandItem(MethodView):
    @blp.response(200, CommandSchema)
    def get(self, device_pk, command_id):
        """Retrieve a command's state and result"""
        return service.get_command(device_pk, command_id)
