"""Broker accounts: the server's and every device's, kept in Mosquitto's dynamic security plugin.

A device's username is its unit_id, bound to the client id its agent uses, and its role
allows exactly its own topics (see `device_role_acls`). The server manages the accounts at
run time through the dynsec control topic, as the dynsec admin account
(FLEET_DYNSEC_USERNAME / FLEET_DYNSEC_PASSWORD); without those settings account
management is off and the functions here do nothing (an anonymous development broker).
"""
from __future__ import annotations

import logging
import secrets

from flask import current_app, has_app_context

import fleet_wire as wire

from ..config import mqtt_endpoint
from .control import BrokerAccountError, CommandFailed, DynSecControl

log = logging.getLogger(__name__)

__all__ = [
    "BrokerAccountError", "CommandFailed", "DynSecControl", "accounts_enabled", "device_client_id",
    "device_role_acls", "ensure_server_account", "issue_device_credentials", "prepare_device_role",
    "remove_device_account", "server_role_acls", "update_roles",
]

SERVER_ROLE = "fleet-server"
# The one place a device topic is added: the device's and the server's roles are built from
# these, and every worker start brings existing roles up to date (`update_roles`), so devices
# registered under older rules follow.
DEVICE_KINDS_IN = ("releases/#", "commands", "confirmations")
DEVICE_KINDS_OUT = ("results", "deployments", "telemetry", "status")


def device_client_id(unit_id: str) -> str:
    """The MQTT client id a device's agent connects with; its account cannot use any other."""
    return f"fleet-device-{unit_id}"


def device_role(unit_id: str) -> str:
    return f"device-{unit_id}"


def _acl(acltype: str, topic: str) -> dict:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def device_role_acls(unit_id: str) -> list[dict]:
    """Subscribe to its releases, commands and confirmations; publish its results, deployments, telemetry, status.

    Everything else falls to the store's defaults: publishing and subscribing denied.
    """
    root = f"{wire.TOPIC_ROOT}/{unit_id}"
    return [_acl("subscribePattern", f"{root}/{kind}") for kind in DEVICE_KINDS_IN] + [
        _acl("publishClientSend", f"{root}/{kind}") for kind in DEVICE_KINDS_OUT
    ]


def server_role_acls() -> list[dict]:
    """Publish what devices receive; subscribe to what devices report; keep the release seq marker."""
    devices = f"{wire.TOPIC_ROOT}/+"
    return [
        *(_acl("publishClientSend", f"{devices}/{kind}") for kind in DEVICE_KINDS_IN),
        *(_acl("subscribePattern", f"{devices}/{kind}") for kind in DEVICE_KINDS_OUT),
        # Mosquitto 2.0 checks a shared subscription's whole filter, $share/<group>/ included.
        *(_acl("subscribePattern", f"$share/+/{devices}/{kind}") for kind in DEVICE_KINDS_OUT),
        # Outside the devices' tree: no device role reaches it.
        _acl("publishClientSend", wire.RELEASE_SEQ_MARKER_TOPIC),
        _acl("subscribePattern", wire.RELEASE_SEQ_MARKER_TOPIC),
    ]


def ensure_server_account(control: DynSecControl, username: str, password: str) -> None:
    """Create (or bring up to date) the server's role and account."""
    _ensure_role(control, SERVER_ROLE, server_role_acls())
    _create_or_update_client(control, username, password, SERVER_ROLE)


def _create_or_update_client(control, username, password, rolename, clientid=None):
    command = {"command": "createClient", "username": username, "password": password,
               "roles": [{"rolename": rolename}]}
    if clientid:
        command["clientid"] = clientid
    if not control.run(command, ignore=("already exists",))[0].get("error"):
        return
    # The account exists (a re-registration, a restarted set-up): same role, new password.
    # The plugin answers addClientRole for a role the client has with an error, so it goes first.
    control.run({"command": "removeClientRole", "username": username, "rolename": rolename}, ignore=("",))
    control.run({"command": "addClientRole", "username": username, "rolename": rolename})
    if clientid:
        control.run({"command": "setClientId", "username": username, "clientid": clientid})
    control.run({"command": "setClientPassword", "username": username, "password": password})


def _ensure_role(control: DynSecControl, rolename: str, acls: list[dict]) -> None:
    """Create the role with these ACLs, or reset an existing role's ACLs to them."""
    created = control.run({"command": "createRole", "rolename": rolename, "acls": acls}, ignore=("already exists",))
    if not created[0].get("error"):
        return
    # The plugin refuses to add an ACL that exists, so each is removed first (absent ones are fine).
    control.run(*({"command": "removeRoleACL", "rolename": rolename, "acltype": acl["acltype"], "topic": acl["topic"]}
                  for acl in acls), ignore=("",))
    control.run(*({"command": "addRoleACL", "rolename": rolename, **acl} for acl in acls))


def _acl_key(acl: dict) -> tuple:
    return acl["acltype"], acl["topic"], bool(acl.get("allow", True))


def _roles_acls(control: DynSecControl, page: int = 500) -> dict[str, set]:
    """Every role on the broker with its ACLs, read a page at a time."""
    roles, offset = {}, 0
    while True:
        answer = control.run({"command": "listRoles", "verbose": True, "count": page, "offset": offset})[0]
        data = answer.get("data", {})
        for role in data.get("roles", []):
            roles[role["rolename"]] = {_acl_key(acl) for acl in role.get("acls", [])}
        offset += page
        if offset >= data.get("totalCount", 0):
            return roles


def _missing_acls(current: set, wanted: list[dict]) -> list[dict]:
    return [acl for acl in wanted if _acl_key(acl) not in current]


def update_roles_with(control: DynSecControl, unit_ids, batch: int = 200) -> int:
    """Add to the server's role and each existing device role what today's ACL lists hold; how many device roles changed.

    Only adds: an ACL a role has keeps working throughout (no remove-then-add on a live role).
    A device without a role on this broker (no account made by this server) is left alone.
    Idempotent: a role already up to date costs nothing but its share of one listing.
    """
    roles = _roles_acls(control)
    if SERVER_ROLE in roles:
        missing = _missing_acls(roles[SERVER_ROLE], server_role_acls())
        if missing:
            control.run(*({"command": "addRoleACL", "rolename": SERVER_ROLE, **acl} for acl in missing))
            log.info("server role: added %d ACL(s)", len(missing))
    commands, changed = [], 0
    for unit_id in unit_ids:
        rolename = device_role(unit_id)
        if rolename not in roles:
            continue
        missing = _missing_acls(roles[rolename], device_role_acls(unit_id))
        if missing:
            changed += 1
            commands += [{"command": "addRoleACL", "rolename": rolename, **acl} for acl in missing]
    for start in range(0, len(commands), batch):
        control.run(*commands[start:start + batch])
    return changed


# --- the app's control connection ----------------------------------------------

def accounts_enabled(config=None) -> bool:
    config = config if config is not None else current_app.config
    return bool(config.get("FLEET_DYNSEC_USERNAME"))


def _control() -> DynSecControl | None:
    if not has_app_context() or not accounts_enabled():
        return None
    app = current_app._get_current_object()
    control = app.extensions.get("fleet_dynsec")
    if control is None:
        host, port, tls = mqtt_endpoint(app.config["FLEET_MQTT_URL"])
        control = app.extensions["fleet_dynsec"] = DynSecControl(
            host, port, app.config["FLEET_DYNSEC_USERNAME"], app.config.get("FLEET_DYNSEC_PASSWORD") or "",
            tls=tls, ca_file=app.config.get("FLEET_MQTT_CA_FILE"), timeout=app.config["FLEET_PUBLISH_TIMEOUT"],
        )
    return control


def prepare_device_role(unit_id: str) -> bool:
    """Create the device's role (its ACLs). False when account management is off."""
    control = _control()
    if control is None:
        return False
    _ensure_role(control, device_role(unit_id), device_role_acls(unit_id))
    return True


def issue_device_credentials(unit_id: str) -> tuple[str, str] | None:
    """Give the device an account with a fresh password: (username, password); None when management is off.

    Issuing again replaces the password, which disconnects whoever used the old one.
    """
    if not prepare_device_role(unit_id):
        return None
    control = _control()
    username, password = unit_id, secrets.token_urlsafe(32)
    _create_or_update_client(control, username, password, device_role(unit_id), device_client_id(unit_id))
    log.info("issued broker credentials unit_id=%s", unit_id)
    return username, password


def update_roles(unit_ids) -> int | None:
    """Bring the server's and these devices' roles up to today's ACL lists (see update_roles_with); None when off."""
    control = _control()
    if control is None:
        return None
    return update_roles_with(control, unit_ids)


def remove_device_account(unit_id: str) -> bool:
    """Delete the device's account and role; its open connection is dropped at once. False when off."""
    control = _control()
    if control is None:
        return False
    control.run({"command": "deleteClient", "username": unit_id}, ignore=("not found",))
    control.run({"command": "deleteRole", "rolename": device_role(unit_id)}, ignore=("not found",))
    log.info("removed broker account unit_id=%s", unit_id)
    return True
