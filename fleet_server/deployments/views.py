"""HTTP endpoints for deployment progress, per release and per device."""
from flask.views import MethodView

from ..blueprint import Blueprint
from ..schemas import PaginationArgs
from . import service
from .schemas import DeviceDeploymentPage, ReleaseDeploymentPage

blp = Blueprint("deployments", __name__, description="Deployment progress reported by the devices.")


@blp.route("/docker/projects/<int(max=2147483647):project_pk>/releases/<int(max=2147483647):release_id>/deployments/")
class ReleaseDeployments(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, ReleaseDeploymentPage)
    def get(self, args, project_pk, release_id):
        """How far the release got on each device it targets"""
        return service.release_deployments(project_pk, release_id, **args)


@blp.route("/dongle/devices/<uuid:device_id>/deployments/")
class DeviceDeployments(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, DeviceDeploymentPage)
    def get(self, args, device_id):
        """How far each release that targets the device got there"""
        return service.device_deployments(str(device_id), **args)
