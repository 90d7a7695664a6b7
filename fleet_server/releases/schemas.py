"""Release payloads, with the checks that keep a bad release from reaching a device."""
import re
import shlex

from marshmallow import ValidationError, fields, validate, validates

from fleet_wire import (NETWORK_MODE_PATTERN, RESTART_POLICY_PATTERN, WireError, check_bind, check_environment_key,
                        check_network_mode, check_restart_policy, parse_environment)

from ..pagination import page_schema
from ..schemas import PaginationArgs, StrictSchema, wire_rule

# Docker's reference grammar: an optional registry host[:port], then lower-case path components.
_IMAGE = re.compile(
    r"^(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Docker's container name rule; kept short so the derived fully_qualified_name stays readable.
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,99}$")

SEED_EXAMPLE = {
    "version": "1.0.0",
    "devices": ["734c361a-ba56-472a-a891-ee2af1a80570"],
    "containers": [
        {
            "name": "curveball",
            "image": "curveball",
            "tag": "delta-base-r0.0.0.1",
            "required_tags": ["base"],
            "startup_parameters": {
                "environment": "REQUESTS_CA_BUNDLE='/usr/local/share/ca-certificates/AdamCA.crt'",
                "binds": ["/home/balenaEngine/data:/opt/RavenDB/Server/RavenData"],
                "network_mode": "host",
                "restart_policy": "always",
                "privileged": True,
            },
            "purge_data": False,
            "registry": 1,
        },
        {
            "name": "ravendb",
            "image": "ravendb",
            "tag": "base",
            "required_tags": [],
            "startup_parameters": {
                "environment": "RAVEN_ARGS='--config-path /opt/RavenDB/Server/RavenData/settings.json'",
                "binds": ["/home/balenaEngine/data:/opt/RavenDB/Server/RavenData"],
                "network_mode": "host",
                "restart_policy": "always",
                "privileged": True,
            },
            "purge_data": False,
            "registry": 1,
        },
    ],
    "remove_containers": ["curveball", "ravendb"],
}


def _unique(what):
    def check(values):
        if len(set(values)) != len(values):
            raise ValidationError(f"{what} listed twice")

    return check


class Environment(fields.Field):
    """AutoPi's shell-style string (`KEY='v' K2=v2`), or an object {KEY: value}; stored as the string."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            try:
                parse_environment(value)
            except WireError as exc:
                raise ValidationError(str(exc)) from None
            return value
        if isinstance(value, dict):
            words = []
            for key, item in value.items():
                try:
                    check_environment_key(key)
                except WireError as exc:
                    raise ValidationError(str(exc)) from None
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise ValidationError(f"{key}: the value must be a string or a number")
                if "\x00" in str(item):
                    raise ValidationError(f"{key}: the value contains a NUL byte")
                words.append(f"{key}={shlex.quote(str(item))}")
            return " ".join(words)
        raise ValidationError("expected a string (KEY='value' OTHER=x) or an object of strings")

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class StartupParametersSchema(StrictSchema):
    """The API's form of wire.StartupParameters (the structure a device receives), with the same checks."""

    environment = Environment(
        load_default="",
        metadata={
            "description": "Shell-style `KEY='value' OTHER=x`, or an object {KEY: value}; always returned as the string.",
            "oneOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}],
            "example": "KEY='some value' OTHER=x",
        },
    )
    binds = fields.List(
        fields.String(validate=wire_rule(check_bind), metadata={"example": "/srv/data:/data:rw"}),
        load_default=list,
        validate=validate.Length(max=100),
    )
    network_mode = fields.String(
        load_default=None, allow_none=True,
        validate=wire_rule(check_network_mode), metadata={"pattern": NETWORK_MODE_PATTERN},
    )
    restart_policy = fields.String(
        load_default=None,
        allow_none=True,
        validate=wire_rule(check_restart_policy), metadata={"pattern": RESTART_POLICY_PATTERN},
    )
    privileged = fields.Boolean(load_default=False)


class ContainerSchema(StrictSchema):
    name = fields.String(required=True, validate=validate.Regexp(_CONTAINER_NAME, error="not a valid container name"))
    image = fields.String(
        required=True,
        validate=[validate.Length(max=255), validate.Regexp(_IMAGE, error="not a valid image reference")],
        metadata={"description": "Repository, optionally with a registry host and path: host:5000/team/app."},
    )
    tag = fields.String(required=True, validate=validate.Regexp(_TAG, error="not a valid tag"))
    required_tags = fields.List(
        fields.String(validate=validate.Regexp(_TAG, error="not a valid tag")),
        load_default=list,
        validate=[validate.Length(max=20), _unique("a tag is")],
        metadata={"description": "Other tags of the image that must be present (pulled first, never pruned)."},
    )
    startup_parameters = fields.Nested(StartupParametersSchema, load_default=lambda: StartupParametersSchema().load({}))
    purge_data = fields.Boolean(load_default=False)
    registry = fields.Integer(
        load_default=None, allow_none=True, strict=True, attribute="registry_id", data_key="registry",
        validate=validate.Range(min=1, max=2**31 - 1), metadata={"description": "Id of the registry to pull through."},
    )
    fully_qualified_name = fields.String(
        dump_only=True, metadata={"description": "Derived from project and name; stable across releases."}
    )


def _unique_names(containers):
    names = [c["name"] for c in containers]
    if len(set(names)) != len(names):
        raise ValidationError("container names must be unique within a release")


class ReleaseSchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    version = fields.String(required=True, validate=validate.Length(min=1, max=100))
    version_hash = fields.String(dump_only=True, metadata={"description": "8-hex digest of the release content."})
    devices = fields.List(
        fields.String(validate=validate.Length(max=36)),
        required=True,
        attribute="device_ids",
        validate=validate.Length(max=10000),
        metadata={"description": "Ids of the devices the release targets."},
    )
    containers = fields.List(
        fields.Nested(ContainerSchema), required=True, validate=[validate.Length(min=1, max=50), _unique_names]
    )
    successful_deployments = fields.List(
        fields.String(), dump_only=True, metadata={"description": "Devices that report the release deployed."}
    )
    remove_containers = fields.List(
        fields.String(validate=validate.Regexp(_CONTAINER_NAME, error="not a valid container name")),
        load_default=list,
        validate=[validate.Length(max=50), _unique("a container is")],
        metadata={"description": "Names of pre-existing containers to stop, and remove once the release runs."},
    )
    project = fields.Integer(dump_only=True, attribute="project_id")
    created_at = fields.DateTime(dump_only=True)

    @validates("devices")
    def _devices(self, value, **kwargs):
        if len(set(value)) != len(value):
            raise ValidationError("a device is listed twice")


class ReleasePatchSchema(ReleaseSchema):
    """The same fields, each optional: a container given whole gets the same defaults as in a full release."""

    def __init__(self, **kwargs):
        # partial=True would reach into the nested containers and skip their defaults (a missing
        # `registry` would then be missing from the stored release); naming the fields does not.
        super().__init__(partial=("version", "devices", "containers", "remove_containers"), **kwargs)


class ReleaseListArgs(PaginationArgs):
    version = fields.String(validate=validate.Length(max=100), metadata={"description": "Only this version."})
    version_hash = fields.String(validate=validate.Length(max=8), metadata={"description": "Only this version_hash."})
    device = fields.String(validate=validate.Length(max=36), metadata={"description": "Only releases targeting this device id."})


ReleasePage = page_schema(ReleaseSchema, "ReleasePage")
