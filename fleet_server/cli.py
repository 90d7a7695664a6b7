"""The `fleet-server` command: serve the API, run the ingest worker, manage tokens and devices."""
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import click
from flask import current_app
from flask.cli import FlaskGroup, with_appcontext

from .config import ConfigError


def _create_app():
    from .app import create_app

    try:
        return create_app()
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


@click.group(cls=FlaskGroup, create_app=_create_app, add_version_option=False, load_dotenv=False)
def main():
    """Fleet server: REST API, MQTT ingest worker and administration.

    Configuration comes from FLEET_* environment variables (FLEET_DATABASE_URL,
    FLEET_MQTT_URL, FLEET_MQTT_USERNAME, FLEET_MQTT_PASSWORD, FLEET_VAR_DIR).
    """
    logging.basicConfig(level=os.environ.get("FLEET_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _iso8601(ctx, param, value):
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class InvalidOption(click.ClickException):
    """A usage mistake told in one line (`Error: ...`), with the exit code of click's usage errors."""

    exit_code = 2


@main.group()
def tokens():
    """Create, list and revoke API tokens."""


@tokens.command("create")
@click.option("--name", required=True, help="What the token is for.")
@click.option("--expires", callback=_iso8601, help="ISO 8601 expiry, e.g. 2027-01-01T00:00:00Z.")
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), default="admin", show_default=True)
@with_appcontext
def tokens_create(name, expires, role):
    """Create a token and print its value (shown only this once)."""
    from .tokens import service

    if expires is not None and expires <= datetime.now(timezone.utc):
        raise InvalidOption(f"--expires {expires.isoformat()} is in the past: give a future date-time")
    _token, value = service.create(name, expires, role)
    click.echo(value)


@tokens.command("list")
@with_appcontext
def tokens_list():
    """List tokens (never their values)."""
    from .tokens import service

    for token in service.list_tokens():
        state = "revoked" if token.revoked_at else "active"
        expires = token.expires_at.isoformat() if token.expires_at else "never"
        click.echo(f"{token.id}\t{token.name}\t{token.role}\t{state}\texpires={expires}")


@tokens.command("revoke")
@click.argument("token_id", type=int)
@with_appcontext
def tokens_revoke(token_id):
    """Revoke a token at once."""
    from .tokens import service

    if service.revoke(token_id) is None:
        raise click.ClickException(f"token {token_id} does not exist")
    click.echo(f"revoked token {token_id}")


@main.group()
def devices():
    """Register devices from the command line."""


@devices.command("create")
@click.option("--name", default="", help="A name for people.")
@click.option("--unit-id", default=None, help="The unit id the agent uses (a UUID); generated when omitted.")
@click.option("--if-missing", is_flag=True, help="Succeed quietly when the unit id is already registered.")
@with_appcontext
def devices_create(name, unit_id, if_missing):
    """Register a device and print `id unit_id`."""
    import uuid

    from .devices import service
    from .errors import Conflict

    try:
        unit = uuid.UUID(unit_id) if unit_id else None
    except ValueError:
        raise click.BadParameter(f"{unit_id!r} is not a UUID", param_hint="--unit-id") from None
    try:
        device = service.create_device({"name": name, "unit_id": unit})
    except Conflict:
        if not if_missing:
            raise click.ClickException(f"unit id {unit_id} is already registered") from None
        device = service.device_by_unit_id(str(unit))
    click.echo(f"{device.id} {device.unit_id}")


@main.group()
def releases():
    """Maintenance of the release documents devices receive."""


@releases.command("bump-seq")
@click.option("--to", "floor", type=click.IntRange(min=0), default=0,
              help="Move the sequence to at least this value (the highest seq known to be issued before).")
@click.option("--skip-broker", is_flag=True, help="Do not read the broker's release seq marker.")
@with_appcontext
def releases_bump_seq(floor, skip_broker):
    """After restoring the database: move the release seq past anything issued before, and republish.

    The sequence moves to the highest of --to, the broker's retained marker and the current time
    in milliseconds; every release topic ever published is then queued again, so devices get the
    restored state with seqs above anything they have seen. Prints the seq the sequence stands at.
    """
    from .extensions import db
    from .messaging import outbox

    marker = None
    if not skip_broker:
        try:
            marker = outbox.read_marker(current_app.config)
        except outbox.BrokerUnavailable as exc:
            raise click.ClickException(f"{exc}; run again when the broker is up, or pass --skip-broker") from None
    outbox.lock_outbox()
    seq = outbox.move_seq_past(max(floor, marker or 0, outbox.seq_floor_now()))
    count = outbox.republish_everything()
    db.session.commit()
    click.echo(f"release seq at {seq}; {count} release topic(s) queued for the worker to publish again")


@main.group("provisioning-tokens")
def provisioning_tokens():
    """One-time tokens that let a device register itself (`fleet-device register`)."""


@provisioning_tokens.command("create")
@click.option("--name", default="", help="What or whom the token is for.")
@click.option("--expires-in", default=3600, show_default=True, type=click.IntRange(60, 30 * 24 * 3600),
              help="Seconds until the token expires.")
@with_appcontext
def provisioning_tokens_create(name, expires_in):
    """Create a provisioning token and print its value (shown only this once)."""
    from .provisioning import service

    _token, value = service.create_token(name, expires_in)
    click.echo(value)


@main.command()
@click.option("--worker-id", default=None, help="Stable id of this worker (keeps its broker session).")
@click.option("--heartbeat-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File touched after every outbox sweep, for a container healthcheck.")
@with_appcontext
def worker(worker_id, heartbeat_file):
    """Consume device reports and publish pending releases."""
    from .messaging.worker import run_worker

    run_worker(current_app._get_current_object(), worker_id, heartbeat_file)


@main.command()
@click.option("--bind", default="127.0.0.1:8000", show_default=True)
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Threads per worker (gunicorn's gthread workers): how many requests one worker serves at once.")
def serve(bind, workers, threads):
    """Serve the REST API with gunicorn (settings in fleet_server/gunicorn_conf.py)."""
    from .config import client_timeout

    try:
        client_timeout(os.environ)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    os.execvp(
        sys.executable,
        [sys.executable, "-m", "gunicorn", "--config", "python:fleet_server.gunicorn_conf", "--bind", bind,
         "--workers", str(workers), "--threads", str(threads), "--access-logfile", "-",
         "fleet_server.app:create_app()"],
    )


@main.command()
def devstack():
    """Run the whole product on this machine: broker, server, worker and a local device agent."""
    from .devstack import run

    sys.exit(run())
