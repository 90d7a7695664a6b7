"""Pytest plugin: the databases Fleet runs on, SQLite and a real PostgreSQL, each test on a fresh migrated one.

PostgreSQL is Debian's server binaries (the `postgresql` package): a throwaway cluster is
initialised in a temporary directory, started on a free loopback port for the session and
removed afterwards. Set FLEET_TEST_POSTGRES_URL (postgresql+psycopg://user:pw@host:port/db) to
use a server of your own instead.

Migrating is the slow part, so each database is migrated once per session into a template
(a file copied for SQLite, `CREATE DATABASE ... TEMPLATE` for PostgreSQL).
"""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support.infra import free_port

DATABASES = ("sqlite", "postgresql")
TEMPLATE_DB = "fleet_template"


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server reachable on loopback by a superuser URL."""

    admin_url: str  # postgresql+psycopg://USER:PW@127.0.0.1:PORT/postgres

    def url(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def execute(self, statement: str):
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: install the postgresql package (`make install`)")
    return found[-1]


def _as_postgres_user(args: list[str]) -> list[str]:
    # initdb and the server refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def run_postgres():
    """Initialise and start a throwaway cluster; stop and delete it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="fleet-test-pg-"))
    password = secrets.token_urlsafe(16)
    port = free_port()
    (root / "pwfile").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(root / "pwfile", "postgres", "postgres")
    log = root / "server.log"
    started = False
    try:
        subprocess.run(
            _as_postgres_user([_postgres_bin("initdb"), "-D", str(root / "data"), "-U", "fleet", "-A", "scram-sha-256",
                               "--pwfile", str(root / "pwfile"), "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True, timeout=120,
        )
        # Durability settings off: a test cluster is thrown away, speed matters more.
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(
            _as_postgres_user([_postgres_bin("pg_ctl"), "-D", str(root / "data"), "-l", str(log), "-o", options,
                               "-w", "-t", "60", "start"]),
            check=True, capture_output=True, timeout=90,
        )
        started = True
        yield PostgresServer(f"postgresql+psycopg://fleet:{password}@127.0.0.1:{port}/postgres")
    except subprocess.CalledProcessError as exc:
        detail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')}\n{detail}") from None
    finally:
        if started:
            subprocess.run(_as_postgres_user([_postgres_bin("pg_ctl"), "-D", str(root / "data"), "-m", "immediate",
                                              "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def migrate(database_url: str, var_dir: Path):
    """`fleet-server db upgrade heads`, in process."""
    from flask_migrate import upgrade

    from fleet_server.app import create_app
    from fleet_server.extensions import db

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "FLEET_VAR_DIR": str(var_dir)})
    with app.app_context():
        upgrade(directory=app.config["MIGRATIONS_DIR"], revision="heads")
        db.engine.dispose()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session (a throwaway cluster unless FLEET_TEST_POSTGRES_URL names one)."""
    configured = os.environ.get("FLEET_TEST_POSTGRES_URL")
    if configured:
        yield PostgresServer(make_url(configured).set(database="postgres").render_as_string(hide_password=False))
        return
    with run_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def _postgres_template(postgres_server, tmp_path_factory):
    name = f"{TEMPLATE_DB}_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f'CREATE DATABASE "{name}"')
    migrate(postgres_server.url(name), tmp_path_factory.mktemp("pg-template-var"))
    yield name
    postgres_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate(f"sqlite:///{path}", path.parent / "var")
    return path


def fresh_database(kind: str, request, tmp_path: Path):
    """A URL of a new, migrated database of the given kind, dropped when the test ends."""
    if kind == "sqlite":
        path = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    server = request.getfixturevalue("postgres_server")
    template = request.getfixturevalue("_postgres_template")
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    server.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    request.addfinalizer(lambda: server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return server.url(name)


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path) -> str:
    """A fresh migrated database; tests using it run once on SQLite and once on PostgreSQL."""
    return fresh_database(request.param, request, tmp_path)
