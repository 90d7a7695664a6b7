"""The database schema the migrations build matches the models, on both databases; configuration is checked at start-up."""
import os
import stat
import subprocess

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.fernet import Fernet

from fleet_server.config import ConfigError, from_environment, validate
from tests.support.stack import _command


def test_the_migrations_build_exactly_the_models_schema(app):
    from fleet_server.extensions import db

    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, db.metadata)
    assert differences == [], differences


def _config(tmp_path, **environ):
    return from_environment({"FLEET_VAR_DIR": str(tmp_path), **environ})


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    with pytest.raises(ConfigError, match="FLEET_SECRET_KEY is not set"):
        validate(_config(tmp_path, FLEET_ENV="production"))


def test_a_malformed_secret_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="FLEET_SECRET_KEY: key 1 is not a Fernet key"):
        validate(_config(tmp_path, FLEET_SECRET_KEY="too-short"))


def test_development_generates_a_private_key_once_and_keeps_it(tmp_path):
    first = _config(tmp_path)
    validate(first)
    key_file = tmp_path / "secret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = _config(tmp_path)
    validate(second)
    assert first["FLEET_SECRET_KEY"] == second["FLEET_SECRET_KEY"] == key_file.read_text().strip()


def test_keys_rotate_new_first_old_still_decrypting(tmp_path):
    from fleet_server.app import create_app
    from fleet_server.encryption import decrypt, encrypt

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    base = {"SQLALCHEMY_DATABASE_URI": "sqlite:///:memory:", "FLEET_VAR_DIR": str(tmp_path)}
    with create_app({**base, "FLEET_SECRET_KEY": old}).app_context():
        stored = encrypt("registry-password")
    with create_app({**base, "FLEET_SECRET_KEY": f"{new},{old}"}).app_context():
        assert decrypt(stored) == "registry-password"


def test_the_server_command_stops_with_one_clear_line_in_production_without_a_key(tmp_path):
    env = {**os.environ, "FLEET_ENV": "production", "FLEET_VAR_DIR": str(tmp_path)}
    env.pop("FLEET_SECRET_KEY", None)
    result = subprocess.run(_command("fleet-server") + ["tokens", "list"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "FLEET_SECRET_KEY is not set" in result.stderr and "Traceback" not in result.stderr
