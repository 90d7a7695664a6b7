"""HTTP endpoints for /dongle/provisioning-tokens/ (operators) and /dongle/register/ (devices, no API token)."""
from flask import g
from flask.views import MethodView

from ..blueprint import Blueprint
from ..errors import Forbidden
from ..pagination import page_schema, paginate
from ..schemas import PaginationArgs
from . import service
from .schemas import ProvisioningTokenCreate, ProvisioningTokenCreated, ProvisioningTokenRead, Registration, RegistrationRequest

blp = Blueprint("provisioning", __name__, url_prefix="/dongle/provisioning-tokens",
                description="One-time tokens that let a device register itself.")
register_blp = Blueprint("register", __name__, url_prefix="/dongle/register", public=True,
                         description="A device exchanges a provisioning token for its identity (no API token).")

ProvisioningTokenPage = page_schema(ProvisioningTokenRead, "ProvisioningTokenPage")


def _require_writer():
    # Viewers read; only operators and admins may let new devices in.
    if getattr(g, "api_token", None) is not None and g.api_token.role == "viewer":
        raise Forbidden("a viewer token cannot create provisioning tokens")


@blp.route("/")
class ProvisioningTokens(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, ProvisioningTokenPage)
    def get(self, args):
        """List provisioning tokens (never their values)"""
        return paginate(service.tokens_query(), **args)

    @blp.arguments(ProvisioningTokenCreate)
    @blp.response(201, ProvisioningTokenCreated)
    def post(self, data):
        """Create a one-time provisioning token; its value is shown only here"""
        _require_writer()
        token, value = service.create_token(**data)
        fields = ("id", "name", "created_at", "expires_at", "used_at", "device_id")
        return {"token": value, **{name: getattr(token, name) for name in fields}}


@register_blp.route("/")
class Register(MethodView):
    @register_blp.arguments(RegistrationRequest)
    @register_blp.response(201, Registration)
    @register_blp.alt_response(200, schema=Registration, description="The same hardware registered again")
    def post(self, data):
        """Exchange a provisioning token for the device's id, unit_id and broker account"""
        document, created = service.register(data["token"], data["hardware_id"], data["name"])
        return document, 201 if created else 200
