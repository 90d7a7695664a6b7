"""HTTP endpoints for /dongle/devices/."""
from flask import current_app
from flask.views import MethodView

from ..blueprint import Blueprint
from ..links import CREATED_ID, created_links, links_to
from . import service
from .schemas import DeviceListArgs, DevicePage, DevicePatchSchema, DeviceSchema, DeviceUpdateSchema


def _json_answer(body: bytes):
    """What jsonify would send for the value `body` encodes (Flask's JSON provider ends it with a newline)."""
    return current_app.response_class(body + b"\n", mimetype=current_app.json.mimetype)


blp = Blueprint("devices", __name__, url_prefix="/dongle/devices", description="Devices of the fleet.")


@blp.route("/")
class Devices(MethodView):
    @blp.arguments(DeviceListArgs, location="query")
    @blp.response(200, DevicePage)
    def get(self, args):
        """List devices, optionally filtered by unit_id, name or online"""
        # A Response goes out as it is: the service built the answer DevicePage documents.
        return _json_answer(service.device_page_json(**args))

    @blp.arguments(DeviceSchema, example={"name": "van-12", "tags": ["north"], "description": "Van 12"})
    @blp.response(201, DeviceSchema)
    @blp.doc(**created_links(
        links_to("Device", "/dongle/devices/{device_id}/", "get put patch delete", device_id=CREATED_ID),
        links_to("Commands", "/dongle/devices/{device_pk}/execute/", "get post", device_pk=CREATED_ID),
        links_to("DeviceDeployments", "/dongle/devices/{device_id}/deployments/", "get", device_id=CREATED_ID),
    ))
    def post(self, data):
        """Register a device; the answer carries its id and unit_id"""
        return service.create_device(data)


@blp.route("/<uuid:device_id>/")
class DeviceItem(MethodView):
    @blp.response(200, DeviceSchema)
    def get(self, device_id):
        """Retrieve a device"""
        return _json_answer(service.device_answer_json(str(device_id)))

    @blp.arguments(DeviceUpdateSchema)
    @blp.response(200, DeviceSchema)
    def put(self, data, device_id):
        """Replace a device's name, tags and description"""
        return service.update_device(service.get_device(str(device_id)), data)

    @blp.arguments(DevicePatchSchema(partial=True))
    @blp.response(200, DeviceSchema)
    def patch(self, data, device_id):
        """Change a device's name, tags or description"""
        return service.update_device(service.get_device(str(device_id)), data)

    @blp.response(204)
    def delete(self, device_id):
        """Delete a device; its retained release topics on the broker are cleared"""
        service.delete_device(service.get_device(str(device_id)))
