"""Server configuration, read from FLEET_* environment variables and checked at start-up."""
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from fleet_wire.release_policy import parse_bind_roots

log = logging.getLogger(__name__)

SECRET_KEY_FILE = "secret-key"
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


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


def _count(environ, name, default):
    raw = environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r}: expected a whole number of at least 1")
    return int(raw)


def client_timeout(environ) -> float:
    """FLEET_CLIENT_TIMEOUT: seconds the API waits on a client's socket before closing it (gunicorn_conf.py)."""
    seconds = _float(environ, "FLEET_CLIENT_TIMEOUT", 10.0)
    if not 0 < seconds <= 3600:
        raise ConfigError(f"FLEET_CLIENT_TIMEOUT={seconds!r}: expected seconds between 0 and 3600")
    return seconds


def public_url(environ) -> str | None:
    """FLEET_PUBLIC_URL: where clients reach the API (`https://fleet.example.com`), without a trailing slash."""
    raw = environ.get("FLEET_PUBLIC_URL") or None
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"FLEET_PUBLIC_URL={raw!r}: expected http(s)://HOST[:PORT][/PATH]")
    return raw.rstrip("/")


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
        "FLEET_SECRET_KEY": environ.get("FLEET_SECRET_KEY") or None,
        # Security: TLS to the broker, the dynsec admin account that manages device
        # accounts, what registering devices are told, and the origins CORS lets in.
        "FLEET_MQTT_CA_FILE": environ.get("FLEET_MQTT_CA_FILE") or None,
        "FLEET_DYNSEC_USERNAME": environ.get("FLEET_DYNSEC_USERNAME") or None,
        "FLEET_DYNSEC_PASSWORD": environ.get("FLEET_DYNSEC_PASSWORD") or None,
        "FLEET_DEVICE_BROKER_URL": environ.get("FLEET_DEVICE_BROKER_URL") or None,
        "FLEET_DEVICE_BROKER_CA_FILE": environ.get("FLEET_DEVICE_BROKER_CA_FILE") or None,
        "FLEET_CORS_ORIGINS": environ.get("FLEET_CORS_ORIGINS", ""),
        # Host paths an operator's release may bind; anything else is an admin's decision.
        "FLEET_ALLOWED_BIND_ROOTS": environ.get("FLEET_ALLOWED_BIND_ROOTS") or None,
        # Reports the worker could not store are kept as dead letters, the newest this many.
        "FLEET_DEAD_LETTERS_KEPT": _count(environ, "FLEET_DEAD_LETTERS_KEPT", 10000),
        # Hostile input: the largest request body accepted (bigger gets 413), and the base of
        # the links the API writes (pagination), never taken from the request's Host header.
        "FLEET_MAX_REQUEST_BYTES": _count(environ, "FLEET_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
        "FLEET_PUBLIC_URL": public_url(environ),
    }
    if config["FLEET_ENV"] not in ("development", "production", "testing"):
        raise ConfigError(f"FLEET_ENV={config['FLEET_ENV']!r}: expected development, production or testing")
    return config


def validate(config: dict) -> None:
    mqtt_endpoint(config["FLEET_MQTT_URL"])
    if config.get("FLEET_DEVICE_BROKER_URL"):
        mqtt_endpoint(config["FLEET_DEVICE_BROKER_URL"], "FLEET_DEVICE_BROKER_URL")
    for name in ("FLEET_MQTT_CA_FILE", "FLEET_DEVICE_BROKER_CA_FILE"):
        if config.get(name) and not Path(config[name]).is_file():
            raise ConfigError(f"{name}={config[name]!r}: no such file")
    if config.get("FLEET_DYNSEC_USERNAME") and not config.get("FLEET_DYNSEC_PASSWORD"):
        raise ConfigError("FLEET_DYNSEC_USERNAME is set but FLEET_DYNSEC_PASSWORD is not")
    uri = config["SQLALCHEMY_DATABASE_URI"]
    if not uri.startswith(("sqlite:", "postgresql")):
        raise ConfigError(f"FLEET_DATABASE_URL={uri!r}: expected a sqlite:/// or postgresql+psycopg:// URL")
    if Path(config["FLEET_VAR_DIR"]).is_dir():
        # Tightened when it exists; made (0700) only when something is written into it.
        private_dir(Path(config["FLEET_VAR_DIR"]))
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        _private_database_file(Path(uri.removeprefix("sqlite:///")))
    config["FLEET_SECRET_KEY"] = secret_keys(config)
    config["FLEET_ALLOWED_BIND_ROOTS"] = allowed_bind_roots(config)


def allowed_bind_roots(config: dict) -> tuple[str, ...]:
    """The setting as normalised paths (already parsed when the config is validated twice)."""
    value = config.get("FLEET_ALLOWED_BIND_ROOTS")
    if isinstance(value, (tuple, list)):
        value = ",".join(value)
    try:
        return parse_bind_roots(value, "FLEET_ALLOWED_BIND_ROOTS")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def private_dir(path: Path) -> Path:
    """Create `path` readable by this user only (0700), or tighten it when this user owns it already.

    The var dir holds the database, the secret key and logs with command results (container
    environments): nobody else on the host has business reading them.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        os.chmod(path, 0o700)
    return path


def _private_database_file(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (it would follow the umask); its -wal and -shm files copy the mode."""
    if not path.parent.exists():
        private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    elif path.stat().st_uid == os.getuid():
        os.chmod(path, 0o600)


def secret_keys(config: dict) -> str:
    """The Fernet key(s) that encrypt secrets at rest, checked; comma-separated, newest first.

    Production must be given one: a key generated on the spot would make every stored
    secret unreadable on the next host or replica. Development and tests generate one
    once into the var directory.
    """
    keys = config.get("FLEET_SECRET_KEY")
    if not keys:
        if config["FLEET_ENV"] == "production":
            raise ConfigError(
                "FLEET_SECRET_KEY is not set: production needs a key to encrypt registry passwords "
                "(make one with: python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
            )
        keys = _generated_key(Path(config["FLEET_VAR_DIR"]) / SECRET_KEY_FILE)
    for position, key in enumerate(keys.split(","), 1):
        try:
            Fernet(key.strip())
        except (ValueError, TypeError):
            raise ConfigError(
                f"FLEET_SECRET_KEY: key {position} is not a Fernet key (32 bytes, url-safe base64)"
            ) from None
    return keys


def _generated_key(path: Path) -> str:
    """Read the development key, creating it first if needed (safe when many processes start at once)."""
    if not path.exists():
        private_dir(path.parent)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(Fernet.generate_key().decode() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link() fails if another process won the race; its key is the one to use.
            os.link(staging, path)
            log.warning("generated a development secret key in %s; set FLEET_SECRET_KEY in production", path)
        except FileExistsError:
            pass
        finally:
            os.unlink(staging)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret key file {path}: {exc.strerror}") from None
