"""Deployment payloads: one release's progress on one device."""
from marshmallow import Schema, fields

from ..pagination import page_schema

STATE_HELP = ("pending (targeted, nothing reported yet), queued, started, pulling, stopping, starting, verifying, "
              "succeeded, failed, rolled_back, or superseded (a newer release of the project replaced it); "
              "a state a newer agent reports is shown as it sent it")


class _Progress(Schema):
    class Meta:
        ordered = True

    state = fields.String(metadata={"description": STATE_HELP})
    step = fields.String(allow_none=True, metadata={"description": "the deploy step the state refers to"})
    detail = fields.String(metadata={"description": "what happened; the reason when it failed"})
    reported_at = fields.DateTime(allow_none=True, metadata={"description": "when the device reported it"})
    updated_at = fields.DateTime(allow_none=True, metadata={"description": "when the server recorded it"})


class ReleaseDeploymentSchema(_Progress):
    """A release on one of the devices it targets."""

    device = fields.String()
    unit_id = fields.String()
    name = fields.String()


class DeviceDeploymentSchema(_Progress):
    """One of the releases that target a device."""

    release = fields.Integer()
    project = fields.Integer()
    version = fields.String()
    version_hash = fields.String()


ReleaseDeploymentPage = page_schema(ReleaseDeploymentSchema, "ReleaseDeploymentPage")
DeviceDeploymentPage = page_schema(DeviceDeploymentSchema, "DeviceDeploymentPage")
