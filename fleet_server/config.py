"""Server configuration, read from FLEET_* environment variables and checked at start-up."""
import os
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def mqtt_endpoint(url: str, setting: str = "FLEET_MQTT_URL") -> tuple[str, int, bool]:
    """Split `mqtt://host:port` (or `mqtts://`) into host, port and whether TLS is on."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"{setting}={url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"{setting}={url!r}: the port is not a number") from None
    return parts.hostname, port, tls


def _float(environ, name, default):
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None


def from_environment(environ=None) -> dict:
    environ = os.environ if environ is None else environ
    var_dir = Path(environ.get("FLEET_VAR_DIR", "var")).resolve()
    config = {
        "FLEET_ENV": environ.get("FLEET_ENV", "development"),
        "SQLALCHEMY_DATABASE_URI": environ.get("FLEET_DATABASE_URL", f"sqlite:///{var_dir / 'fleet.db'}"),
        "FLEET_MQTT_URL": environ.get("FLEET_MQTT_URL", "mqtt://127.0.0.1:1883"),
        "FLEET_MQTT_USERNAME": environ.get("FLEET_MQTT_USERNAME") or None,
        "FLEET_MQTT_PASSWORD": environ.get("FLEET_MQTT_PASSWORD") or None,
        "FLEET_MQTT_GROUP": environ.get("FLEET_MQTT_GROUP", "fleet-server"),
        "FLEET_PUBLISH_TIMEOUT": _float(environ, "FLEET_PUBLISH_TIMEOUT", 5.0),
        # A worker silent this long has its broker session drained by another (worker_sessions.py).
        "FLEET_WORKER_ADOPT_AFTER": _float(environ, "FLEET_WORKER_ADOPT_AFTER", 30.0),
        "FLEET_VAR_DIR": str(var_dir),
    }
    if config["FLEET_ENV"] not in ("development", "production", "testing"):
        raise ConfigError(f"FLEET_ENV={config['FLEET_ENV']!r}: expected development, production or testing")
    return config


def validate(config: dict) -> None:
    mqtt_endpoint(config["FLEET_MQTT_URL"])
    uri = config["SQLALCHEMY_DATABASE_URI"]
    if not uri.startswith(("sqlite:", "postgresql")):
        raise ConfigError(f"FLEET_DATABASE_URL={uri!r}: expected a sqlite:/// or postgresql+psycopg:// URL")
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
