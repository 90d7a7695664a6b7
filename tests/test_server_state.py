"""The server's own state and answers: private files, no expired-at-birth tokens, links not taken from Host."""
import os
import stat
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from fleet_server.app import create_app
from fleet_server.config import ConfigError, from_environment
from tests.support.stack import _command, close_app, make_app


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_var_dir_database_and_secret_key_are_this_user_s_only(tmp_path, monkeypatch):
    var = tmp_path / "var"
    monkeypatch.setenv("FLEET_VAR_DIR", str(var))
    monkeypatch.delenv("FLEET_DATABASE_URL", raising=False)
    monkeypatch.delenv("FLEET_SECRET_KEY", raising=False)
    os.umask(0o022)
    app = create_app({"TESTING": True})
    try:
        from fleet_server.extensions import db

        with app.app_context():
            db.session.execute(db.text("CREATE TABLE probe (x INTEGER)"))
            db.session.commit()
        assert _mode(var) == 0o700
        assert _mode(var / "fleet.db") == 0o600
        assert _mode(var / "secret-key") == 0o600
        for companion in ("fleet.db-wal", "fleet.db-shm"):
            if (var / companion).exists():
                assert _mode(var / companion) == 0o600, companion
    finally:
        close_app(app)


def test_a_var_dir_left_readable_by_others_is_tightened_at_start_up(tmp_path, monkeypatch):
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    os.chmod(var, 0o755)
    (var / "fleet.db").touch()
    os.chmod(var / "fleet.db", 0o644)
    monkeypatch.setenv("FLEET_VAR_DIR", str(var))
    monkeypatch.delenv("FLEET_DATABASE_URL", raising=False)
    close_app(create_app({"TESTING": True}))
    assert _mode(var) == 0o700 and _mode(var / "fleet.db") == 0o600


# --- tokens created from the command line ------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path, _sqlite_template):
    import shutil

    database = tmp_path / "fleet.db"
    shutil.copyfile(_sqlite_template, database)
    return {**os.environ, "FLEET_VAR_DIR": str(tmp_path / "var"), "FLEET_DATABASE_URL": f"sqlite:///{database}"}


def _fleet_server(env, *args):
    return subprocess.run(_command("fleet-server") + list(args), env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("expires", ["2020-01-01", "2020-01-01T00:00:00Z"])
def test_tokens_create_refuses_an_expiry_in_the_past_in_one_line(cli_env, expires):
    created = _fleet_server(cli_env, "tokens", "create", "--name", "late", "--expires", expires)
    assert created.returncode == 2
    # One line of its own after any log records: no usage text, no traceback.
    (error,) = [line for line in created.stderr.splitlines() if not line.startswith(("20", "INFO", "WARNI"))]
    assert error.startswith("Error: --expires") and "past" in error
    assert created.stdout == ""
    assert "late" not in _fleet_server(cli_env, "tokens", "list").stdout


def test_tokens_create_accepts_a_future_expiry(cli_env):
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    created = _fleet_server(cli_env, "tokens", "create", "--name", "soon", "--expires", tomorrow)
    assert created.returncode == 0, created.stderr
    listed = _fleet_server(cli_env, "tokens", "list").stdout
    assert "soon" in listed and "active" in listed


# --- pagination links ---------------------------------------------------------------------------------


def _projects_page(app, auth_headers, **headers):
    from fleet_server.tokens import service

    with app.app_context():
        token = service.create("tests")[1]
    client = app.test_client()
    for name in ("a", "b", "c"):
        client.post("/docker/projects/", json={"name": name}, headers={"Authorization": f"APIToken {token}"})
    return client.get("/docker/projects/?limit=1&offset=1",
                      headers={"Authorization": f"APIToken {token}", **headers}).get_json()


def test_pagination_links_ignore_a_forged_host_header(app):
    page = _projects_page(app, None, Host="evil.example")
    for link in (page["next"], page["previous"]):
        assert "evil.example" not in link
        assert link.startswith("/docker/projects/?")
    assert "offset=2" in page["next"] and "offset=0" in page["previous"]


def test_pagination_links_are_built_on_fleet_public_url(database_url, tmp_path):
    app = make_app(database_url, tmp_path)
    app.config["FLEET_PUBLIC_URL"] = "https://fleet.example.com"
    try:
        page = _projects_page(app, None, Host="evil.example")
    finally:
        close_app(app)
    assert page["next"].startswith("https://fleet.example.com/docker/projects/?")
    assert page["previous"].startswith("https://fleet.example.com/docker/projects/?")


@pytest.mark.parametrize("value", ["fleet.example.com", "ftp://fleet.example.com", "https://fleet.example.com/?a=1"])
def test_a_malformed_fleet_public_url_stops_start_up_naming_it(value):
    with pytest.raises(ConfigError, match="FLEET_PUBLIC_URL"):
        from_environment({"FLEET_PUBLIC_URL": value})
