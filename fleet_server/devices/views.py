"""HTTP endpoints for /dongle/devices/."""
from flask.views import MethodView
from ..blueprint import Blueprint


from ..pagination import paginate
from ..schemas import PaginationArgs
from . import service
from .schemas import DevicePage, DeviceSchema

blp = Blueprint("devices", __name__, url_prefix="/dongle/devices", description="Devices of the fleet.")


@blp.route("/")
class Devices(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, DevicePage)
    def get(self, args):
        """List devices"""
        return paginate(service.devices_query(), **args)

    @blp.arguments(DeviceSchema)
    @blp.response(201, DeviceSchema)
    def post(self, data):
        """Register a device"""
        return service.create_device(data)


@blp.route("/<uuid:device_id>/")
class DeviceItem(MethodView):
    @blp.response(200, DeviceSchema)
    def get(self, device_id):
        """Retrieve a device"""
        return service.get_device(str(device_id))
