"""Files a secured Mosquitto needs, made on this machine without network: TLS keys, dynsec store, config.

Used by `make run` (devstack) and the test fixtures, so both run the broker the same way:
anonymous access off, the dynamic security plugin holding every account, a loopback plain
listener for development and a TLS listener whose certificate the set-up signs with its own CA.
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent
SECURED_TEMPLATE = REPO / "broker" / "mosquitto.conf"
DYNSEC_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
)
ADMIN_USERNAME = "fleet-admin"
SERVER_USERNAME = "fleet-server"


class BrokerSetupError(Exception):
    """The broker's files cannot be made; the message says which and why."""


@dataclass(frozen=True)
class BrokerFiles:
    """Where a secured broker's files live in its directory."""

    directory: Path

    @property
    def ca_certificate(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_certificate(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def dynsec(self) -> Path:
        return self.directory / "dynsec.json"

    @property
    def config(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def admin_password(self) -> Path:
        return self.directory / "admin-password"

    @property
    def server_password(self) -> Path:
        return self.directory / "server-password"


def write_secret(path: Path, data: bytes | str) -> None:
    """Create or replace a file readable by its owner only (mode 0600 from the first byte)."""
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def read_or_create_secret(path: Path) -> str:
    """A password kept in `path` (0600), generated on first use."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = secrets.token_urlsafe(24)
    write_secret(path, value + "\n")
    return value


def dynsec_plugin() -> str:
    for candidate in DYNSEC_PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise BrokerSetupError(
        "the Mosquitto dynamic security plugin (mosquitto_dynamic_security.so) is not installed; "
        "install the mosquitto package (`make install`)"
    )


# --- TLS ----------------------------------------------------------------------

def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_names(hostnames) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys(hostnames):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def make_certificate_authority(common_name: str = "Fleet broker CA", days: int = 3650):
    """A fresh self-signed CA: (key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def make_server_certificate(ca_key, ca_certificate, hostnames, days: int = 825):
    """A broker certificate for `hostnames` (DNS names or IP addresses), signed by the CA."""
    hostnames = list(hostnames)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def default_hostnames() -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def ensure_tls(files: BrokerFiles, hostnames=None) -> None:
    """Create the CA and the broker's certificate unless both exist already."""
    if files.ca_certificate.exists() and files.server_certificate.exists() and files.server_key.exists():
        return
    ca_key, ca_certificate = make_certificate_authority()
    key, certificate = make_server_certificate(ca_key, ca_certificate, hostnames or default_hostnames())
    write_secret(files.ca_key, _pem_key(ca_key))
    write_secret(files.server_key, _pem_key(key))
    files.ca_certificate.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    log.info("made a broker CA and certificate in %s", files.directory)


# --- dynamic security and configuration ---------------------------------------

def ensure_dynsec(files: BrokerFiles, admin_password: str) -> None:
    """Write the dynsec store with its one admin account, unless it exists (it then holds every account)."""
    if files.dynsec.exists():
        return
    tool = shutil.which("mosquitto_ctrl")
    if tool is None:
        raise BrokerSetupError("mosquitto_ctrl is not installed; install mosquitto-clients (`make install`)")
    result = subprocess.run(
        [tool, "dynsec", "init", str(files.dynsec), ADMIN_USERNAME, admin_password],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise BrokerSetupError(f"mosquitto_ctrl dynsec init failed: {result.stderr.strip() or result.stdout.strip()}")
    os.chmod(files.dynsec, 0o600)


def render_config(files: BrokerFiles, *, port: int, tls_port: int, template: Path = SECURED_TEMPLATE) -> str:
    text = template.read_text()
    for key, value in {
        "@PORT@": str(port),
        "@TLS_PORT@": str(tls_port),
        "@DATA_DIR@": str(files.data) + "/",
        "@PLUGIN@": dynsec_plugin(),
        "@DYNSEC_FILE@": str(files.dynsec),
        "@CERT_FILE@": str(files.server_certificate),
        "@KEY_FILE@": str(files.server_key),
    }.items():
        text = text.replace(key, value)
    return text


def prepare(directory: Path, *, port: int, tls_port: int, hostnames=None) -> BrokerFiles:
    """Everything `mosquitto -c <directory>/mosquitto.conf` needs; existing keys and accounts are kept."""
    files = BrokerFiles(Path(directory).resolve())
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)
    files.data.mkdir(exist_ok=True)
    admin_password = read_or_create_secret(files.admin_password)
    read_or_create_secret(files.server_password)
    ensure_tls(files, hostnames)
    ensure_dynsec(files, admin_password)
    files.config.write_text(render_config(files, port=port, tls_port=tls_port))
    return files
