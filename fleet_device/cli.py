"""The `fleet-device` command: run the agent, or tell it the device is about to sleep."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import requests

import fleet_wire as wire


from . import __version__

log = logging.getLogger("fleet_device")


def _broker(url: str):
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{url!r}: the port is not a number") from None
    return parts.hostname, port, parts.scheme == "mqtts"


def _address(text: str):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _unit_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return value


SLEEP_EXIT_CODES = """\
exit codes:
  0  the device may sleep: every queued release was applied (succeeded, or failed and
     rolled back), or the budget ran out and the rest waits for the next sleep, or no
     agent answers (nothing can be applied)
  1  do not sleep yet: a deploy is still running after budget + grace, or a failed
     deploy could not be rolled back completely (the engine did not answer)
  2  bad command line
"""


def _sources(text: str) -> tuple:
    from .telemetry import BUILTIN_SOURCES

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in BUILTIN_SOURCES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown source {unknown[0]!r}; known: {', '.join(BUILTIN_SOURCES)}")
    return names


def _file_source(text: str):
    from .telemetry import parse_file_source

    try:
        return parse_file_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number ≥ 1")
    return number


def _yes_no(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected 1 or 0 (yes/no, true/false)")


def _bind_roots(text: str) -> tuple[str, ...]:
    from fleet_wire.release_policy import parse_bind_roots

    try:
        return parse_bind_roots(text, "FLEET_DEVICE_ALLOWED_BIND_ROOTS")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


# `fleet-device run` ends with this code when the broker refuses the device's credentials: the
# device was deleted or its credentials revoked, and restarting the agent cannot help.
EXIT_CREDENTIALS_REFUSED = 3


def _env(name, default=None):
    return os.environ.get(name, default)


def _env_list(name) -> list:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _env_flag(name) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _origin(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a web origin such as https://dash.local:8443")
    return text.strip().rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-device", description="Fleet device agent.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent (MQTT link, release queue, local API)")
    run.add_argument("--unit-id", type=_unit_id, default=_env("FLEET_UNIT_ID"), help="this device's unit id (FLEET_UNIT_ID)")
    run.add_argument("--broker", type=_broker, default=_env("FLEET_BROKER_URL"),
                     help="mqtt://HOST:PORT or mqtts://HOST:PORT (FLEET_BROKER_URL; default: the registered "
                          "broker, else mqtt://127.0.0.1:1883)")
    run.add_argument("--username", default=_env("FLEET_BROKER_USERNAME"), help="broker user (FLEET_BROKER_USERNAME)")
    run.add_argument("--password", default=_env("FLEET_BROKER_PASSWORD"), help="broker password (FLEET_BROKER_PASSWORD)")
    run.add_argument("--ca-file", default=_env("FLEET_BROKER_CA_FILE"), help="CA certificate for mqtts (FLEET_BROKER_CA_FILE)")
    run.add_argument("--state-dir", type=Path, default=Path(_env("FLEET_STATE_DIR", "/var/lib/fleet-device")),
                     help="where queued releases are kept (FLEET_STATE_DIR)")
    run.add_argument("--api", type=_address, default=_env("FLEET_LOCAL_API", "127.0.0.1:9000"),
                     help="local API address HOST:PORT (FLEET_LOCAL_API)")
    local_api = run.add_argument_group(
        "local API", "bound to loopback, it answers programs on the device only; bound to another address "
                     "(LAN mode) other machines may call it with the token in STATE_DIR/local-api.token "
                     "(see docs/security.md)")
    local_api.add_argument("--api-origin", type=_origin, action="append", default=_env_list("FLEET_LOCAL_API_ORIGINS"),
                           metavar="ORIGIN", help="LAN mode: a web origin (https://HOST[:PORT]) whose pages may call "
                                                  "the API; repeatable (FLEET_LOCAL_API_ORIGINS, comma-separated)")
    local_api.add_argument("--api-host-name", action="append", default=_env_list("FLEET_LOCAL_API_HOST_NAMES"),
                           metavar="NAME", help="LAN mode: a name other machines reach the device by, accepted in "
                                                "Host; repeatable (FLEET_LOCAL_API_HOST_NAMES, comma-separated)")
    commands_scope = run.add_argument_group(
        "containers commands may act on",
        "docker.* commands act only on containers Fleet deployed, unless allowed here")
    commands_scope.add_argument("--commands-container", action="append", default=_env_list("FLEET_COMMANDS_CONTAINERS"),
                                metavar="NAME", help="another container they may act on; repeatable "
                                                     "(FLEET_COMMANDS_CONTAINERS, comma-separated)")
    commands_scope.add_argument("--commands-any-container", action="store_true",
                                default=_env_flag("FLEET_COMMANDS_ANY_CONTAINER"),
                                help="let them act on every container on the engine (FLEET_COMMANDS_ANY_CONTAINER=1)")
    run.add_argument("--minion-id-file", type=Path, default=Path(_env("FLEET_MINION_ID_FILE", "/etc/salt/minion_id")),
                     help="file the unit id is written to (FLEET_MINION_ID_FILE)")
    run.add_argument("--settle", type=float, default=float(_env("FLEET_SETTLE_SECONDS", "10")),
                     help="seconds a new container must keep running to count as started (FLEET_SETTLE_SECONDS)")
    run.add_argument("--health-timeout", type=float, default=float(_env("FLEET_HEALTH_TIMEOUT", "60")),
                     help="seconds a container with a HEALTHCHECK has to become healthy (FLEET_HEALTH_TIMEOUT)")

    trust = run.add_argument_group("what releases may do on this device")
    trust.add_argument("--allow-privileged", nargs="?", const=True, type=_yes_no,
                       default=_env("FLEET_DEVICE_ALLOW_PRIVILEGED", "0"), metavar="yes|no",
                       help="accept releases with privileged mode, host or container: networking, binds anywhere "
                            "and removal of containers Fleet does not manage (FLEET_DEVICE_ALLOW_PRIVILEGED; "
                            "default no: such releases fail before anything is touched)")
    trust.add_argument("--allowed-bind-roots", type=_bind_roots, default=_env("FLEET_DEVICE_ALLOWED_BIND_ROOTS", ""),
                       metavar="PATH[:PATH...]",
                       help="host directories a release may bind, ':' or ','-separated (FLEET_DEVICE_ALLOWED_BIND_ROOTS; "
                            "default /var/lib/fleet-device/data and /var/lib/fleet-device/locks); "
                            "the engine's socket never")

    telemetry = run.add_argument_group("telemetry")
    telemetry.add_argument("--telemetry-interval", type=float, default=float(_env("FLEET_TELEMETRY_INTERVAL", "60")),
                           help="seconds between readings of the built-in sources (FLEET_TELEMETRY_INTERVAL)")
    telemetry.add_argument("--telemetry-sources", type=_sources, default=_env("FLEET_TELEMETRY_SOURCES", "uptime,cpu_temp"),
                           help="built-in sources, comma-separated, from: uptime, cpu_temp; empty for none "
                                "(FLEET_TELEMETRY_SOURCES)")
    telemetry.add_argument("--telemetry-file", type=_file_source, action="append", default=[], metavar="FIELD=PATH[*SCALE]",
                           help="read FIELD from a numeric file, e.g. a sysfs voltage; repeatable")
    telemetry.add_argument("--gpsd", type=_address, default=_env("FLEET_GPSD"),
                           help="HOST:PORT of a gpsd whose positions become track.pos.loc (FLEET_GPSD)")
    telemetry.add_argument("--telemetry-buffer", type=_positive, default=_env("FLEET_TELEMETRY_BUFFER", "100000"),
                           help="readings kept on disk while offline; the oldest go first (FLEET_TELEMETRY_BUFFER)")
    telemetry.add_argument("--telemetry-batch", type=_positive, default=_env("FLEET_TELEMETRY_BATCH", "500"),
                           help="largest number of readings per published batch (FLEET_TELEMETRY_BATCH)")

    run.add_argument("--reconnect-window", type=float, default=float(_env("FLEET_RECONNECT_WINDOW", "12")),
                     help="seconds over which the first reconnection after losing the broker is spread; "
                          "doubles per failed attempt (FLEET_RECONNECT_WINDOW)")
    run.add_argument("--report-resend-interval", type=_positive_seconds,
                     default=_env("FLEET_REPORT_RESEND_INTERVAL", "30"),
                     help="seconds after which a report the server has not confirmed is sent again "
                          "(FLEET_REPORT_RESEND_INTERVAL)")

    register = commands.add_parser("register", help="exchange a provisioning token for this device's identity")
    register.add_argument("--server", required=True, help="the Fleet server's URL, e.g. https://fleet.example.com")
    register.add_argument("--token", default=_env("FLEET_PROVISIONING_TOKEN"),
                          help="the one-time provisioning token (FLEET_PROVISIONING_TOKEN)")
    register.add_argument("--state-dir", type=Path, default=Path(_env("FLEET_STATE_DIR", "/var/lib/fleet-device")),
                          help="where the identity is kept (FLEET_STATE_DIR)")
    register.add_argument("--hardware-id", default=_env("FLEET_HARDWARE_ID"),
                          help="what tells this hardware apart (FLEET_HARDWARE_ID; default /etc/machine-id)")
    register.add_argument("--name", default="", help="a name for people")
    register.add_argument("--insecure-http", action="store_true",
                          help="allow a plain http:// server that is not on loopback (the answer carries the broker "
                               "password in clear text; for a trusted network only)")

    sleep = commands.add_parser(
        "sleep", help="the device is about to sleep: apply queued releases first",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SLEEP_EXIT_CODES,
    )
    sleep.add_argument("--api", type=_address, default=_env("FLEET_LOCAL_API", "127.0.0.1:9000"),
                       help="the agent's local API HOST:PORT (FLEET_LOCAL_API)")
    sleep.add_argument("--budget", type=_seconds, default=600.0,
                       help="seconds in which deploys may start (default 600); one under way is finished first")
    sleep.add_argument("--grace", type=_seconds, default=900.0,
                       help="seconds past the budget to wait for a deploy under way to finish (default 900)")
    return parser


def register(args) -> int:
    from .provisioning import InsecureServer, RegistrationError, register as exchange

    if not args.token:
        print("fleet-device register: --token (or FLEET_PROVISIONING_TOKEN) is required", file=sys.stderr)
        return 2
    try:
        identity = exchange(args.server, args.token, args.state_dir, hardware=args.hardware_id, name=args.name,
                            allow_plain_http=args.insecure_http)
    except InsecureServer as exc:
        print(f"fleet-device register: {exc}", file=sys.stderr)
        return 2
    except (RegistrationError, OSError) as exc:
        print(f"fleet-device register: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"id": identity.device_id, "unit_id": identity.unit_id, "broker": identity.broker_url,
                      "state_dir": str(args.state_dir)}))
    return 0


def _with_identity(args):
    """Fill what the command line left out from the identity `register` stored."""
    from .provisioning import load_identity

    identity = load_identity(args.state_dir)
    if identity is None:
        args.broker = args.broker or _broker("mqtt://127.0.0.1:1883")
        return
    args.unit_id = args.unit_id or identity.unit_id
    args.broker = args.broker or _broker(identity.broker_url)
    if args.username is None and identity.username:
        args.username, args.password = identity.username, identity.password
    args.ca_file = args.ca_file or identity.ca_file


def run(args) -> int:
    import ssl

    from .agent import Agent, AgentConfig
    from .commands import ContainerScope
    from .local_api import LocalApi, build_gate, is_loopback
    from .provisioning import check_broker_certificate
    from fleet_wire.release_policy import ReleasePolicy
    from .telemetry import TelemetryConfig

    try:
        _with_identity(args)
    except argparse.ArgumentTypeError as exc:
        print(f"fleet-device run: the stored identity's broker: {exc}", file=sys.stderr)
        return 2
    if not args.unit_id:
        print("fleet-device run: --unit-id (or FLEET_UNIT_ID, or `fleet-device register`) is required", file=sys.stderr)
        return 2
    try:
        # Those from the environment have not been through argparse's `type`.
        args.api_origin = [_origin(origin) for origin in args.api_origin]
    except argparse.ArgumentTypeError as exc:
        print(f"fleet-device run: FLEET_LOCAL_API_ORIGINS: {exc}", file=sys.stderr)
        return 2
    if (args.api_origin or args.api_host_name) and is_loopback(args.api[0]):
        print("fleet-device run: --api-origin and --api-host-name need LAN mode (an --api address other than "
              "loopback); on loopback the API answers programs on the device only", file=sys.stderr)
        return 2
    host, port, tls = args.broker
    if tls:
        try:
            check_broker_certificate(host, port, args.ca_file)
        except ssl.SSLCertVerificationError as exc:
            print(f"fleet-device run: the broker at {host}:{port} presented a certificate that "
                  f"{args.ca_file or 'the system CA store'} does not trust (certificate verify failed: {exc.verify_message or exc})", file=sys.stderr)
            return 1
    config = AgentConfig(
        unit_id=args.unit_id,
        broker_host=host,
        broker_port=port,
        broker_tls=tls,
        username=args.username,
        password=args.password,
        ca_file=args.ca_file,
        state_dir=args.state_dir,
        api_host=args.api[0],
        api_port=args.api[1],
        minion_id_file=args.minion_id_file,
        settle_seconds=args.settle,
        reconnect_window=args.reconnect_window,
        report_resend_interval=args.report_resend_interval,
        health_timeout=args.health_timeout,
        release_policy=ReleasePolicy(allow_privileged=args.allow_privileged, bind_roots=args.allowed_bind_roots),
        telemetry=TelemetryConfig(
            interval=args.telemetry_interval,
            sources=args.telemetry_sources,
            files=tuple(args.telemetry_file),
            gpsd=args.gpsd,
            capacity=args.telemetry_buffer,
            batch_size=min(args.telemetry_batch, wire.MAX_BATCH_READINGS),
        ),
        container_scope=ContainerScope(any_container=args.commands_any_container,
                                       names=frozenset(args.commands_container)),
    )
    try:
        agent = Agent(config)
    except Exception as exc:  # the engine socket is missing, the state dir is not writable...
        print(f"fleet-device run: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        gate = build_gate(config.api_host, config.state_dir, args.api_origin, args.api_host_name)
        api = LocalApi(agent, config.api_host, config.api_port, gate)
    except OSError as exc:
        print(f"fleet-device run: cannot listen on {config.api_host}:{config.api_port}: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    agent.start()
    api.start()
    log.info("agent %s up: broker %s:%s, local API %s:%s, state %s", config.unit_id, host, port, *api.address,
             config.state_dir)
    while not done.wait(0.5):
        if agent.credentials_refused.is_set():
            break
    api.stop()
    agent.stop()
    if agent.credentials_refused.is_set():
        return EXIT_CREDENTIALS_REFUSED
    return 0


def sleep(args) -> int:
    """Ask the agent to apply what is queued within the budget; the exit code says if the device may sleep."""
    base = f"http://{args.api[0]}:{args.api[1]}"
    try:
        unit_id = requests.get(base + "/", timeout=10).json()["unit_id"]
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        print(f"no agent answering at {base}: {exc}; nothing to apply", file=sys.stderr)
        return 0
    try:
        response = requests.post(
            f"{base}/dongle/{unit_id}/execute/",
            # The command's own timeout must not cut short what the budget and grace allow.
            json={"command": "state.sls", "arg": ["docker.release"], "kwarg": {"budget": args.budget},
                  "timeout": args.budget + args.grace},
            timeout=args.budget + args.grace,
        )
        result = response.json()
    except requests.Timeout:
        # The agent finishes the deploy under way on its own; ask again before sleeping.
        print(f"a deploy is still running after {args.budget + args.grace:.0f} s", file=sys.stderr)
        return 1
    except (requests.RequestException, ValueError) as exc:
        print(f"the agent at {base} did not answer the deploy request: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if not isinstance(result, dict) or result.get("state") != "succeeded":
        print(f"the agent could not apply the queue: {result}", file=sys.stderr)
        return 1
    unsettled = [o for o in result.get("return") or [] if isinstance(o, dict) and not o.get("settled", True)]
    if unsettled:
        print(f"rollback incomplete for project(s) {', '.join(str(o['project_id']) for o in unsettled)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    logging.basicConfig(
        level=os.environ.get("FLEET_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    args = build_parser().parse_args(argv)
    return {"run": run, "register": register, "sleep": sleep}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
