"""Release payloads, with the checks that keep a bad release from reaching a device."""
import re

from marshmallow import ValidationError, fields, validate, validates

from fleet_device.wire import WireError, parse_environment

from ..pagination import page_schema
from ..schemas import StrictSchema

# Docker's reference grammar, simplified: lower-case path components, optional registry host.
_IMAGE = re.compile(
    r"^(?:(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,99}$")
_RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:[0-9]+)?)$")
_NETWORK = re.compile(r"^(bridge|host|none|container:[a-zA-Z0-9][a-zA-Z0-9_.-]*|[a-zA-Z0-9][a-zA-Z0-9_.-]*)$")


def _check_bind(bind: str):
    parts = bind.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ValidationError(f"{bind!r} is not host:container[:ro|rw]")
    for path in parts[:2]:
        if not path.startswith("/") or "\x00" in path:
            raise ValidationError(f"{bind!r}: {path!r} is not an absolute path")
        if ".." in path.split("/"):
            raise ValidationError(f"{bind!r}: {path!r} climbs out with '..'")


class StartupParametersSchema(StrictSchema):
    environment = fields.String(load_default="", metadata={"example": "KEY='some value' OTHER=x"})
    binds = fields.List(fields.String(validate=_check_bind), load_default=list)
    network_mode = fields.String(load_default=None, allow_none=True, validate=validate.Regexp(_NETWORK))
    restart_policy = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Regexp(_RESTART, error="expected no, always, unless-stopped or on-failure[:N]"),
    )
    privileged = fields.Boolean(load_default=False)

    @validates("environment")
    def _environment(self, value, **kwargs):
        try:
            parse_environment(value)
        except WireError as exc:
            raise ValidationError(str(exc)) from None


class ContainerSchema(StrictSchema):
    name = fields.String(required=True, validate=validate.Regexp(_CONTAINER_NAME, error="not a valid container name"))
    image = fields.String(required=True, validate=validate.Regexp(_IMAGE, error="not a valid image reference"))
    tag = fields.String(required=True, validate=validate.Regexp(_TAG, error="not a valid tag"))
    required_tags = fields.List(fields.String(validate=validate.Regexp(_TAG, error="not a valid tag")), load_default=list)
    startup_parameters = fields.Nested(StartupParametersSchema, load_default=lambda: StartupParametersSchema().load({}))
    purge_data = fields.Boolean(load_default=False)
    registry = fields.Integer(load_default=None, allow_none=True, strict=True, attribute="registry_id", data_key="registry")
    fully_qualified_name = fields.String(dump_only=True)


def _unique_names(containers):
    names = [c["name"] for c in containers]
    if len(set(names)) != len(names):
        raise ValidationError("container names must be unique within a release")


class ReleaseSchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    version = fields.String(required=True, validate=validate.Length(min=1, max=100))
    version_hash = fields.String(dump_only=True)
    devices = fields.List(fields.String(), required=True, attribute="device_ids", metadata={"description": "Device ids"})
    containers = fields.List(
        fields.Nested(ContainerSchema), required=True, validate=[validate.Length(min=1), _unique_names]
    )
    successful_deployments = fields.List(fields.String(), dump_only=True)
    remove_containers = fields.List(
        fields.String(validate=validate.Regexp(_CONTAINER_NAME, error="not a valid container name")), load_default=list
    )
    project = fields.Integer(dump_only=True, attribute="project_id")
    created_at = fields.DateTime(dump_only=True)

    @validates("devices")
    def _devices(self, value, **kwargs):
        if len(set(value)) != len(value):
            raise ValidationError("a device is listed twice")


ReleasePage = page_schema(ReleaseSchema, "ReleasePage")
