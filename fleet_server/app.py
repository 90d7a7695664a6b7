"""The Flask application factory."""
import logging
from pathlib import Path

from flask import Flask
from sqlalchemy import event

from . import __version__, config as fleet_config, extensions
from .errors import register_error_handlers


def create_app(config=None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        API_TITLE="Fleet",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH=None,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True},
        MIGRATIONS_DIR=str(Path(__file__).parent / "migrations"),
        JSON_SORT_KEYS=False,
        API_SPEC_OPTIONS={
            "components": {
                "securitySchemes": {"APIToken": {"type": "apiKey", "in": "header", "name": "Authorization"}}
            },
            "security": [{"APIToken": []}],
        },
    )
    app.config.update(fleet_config.from_environment())
    app.config.update(config or {})
    fleet_config.validate(app.config)

    extensions.init_app(app)
    _configure_sqlite(app)
    register_blueprints(app)
    register_error_handlers(app)
    return app


def _sqlite_pragmas(connection, record):
    cursor = connection.cursor()
    # Several processes (web workers, ingest workers) share the file: WAL lets readers go on
    # while one writes, and the busy timeout waits for the lock instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _configure_sqlite(app):
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        with app.app_context():
            event.listen(extensions.db.engine, "connect", _sqlite_pragmas)


def register_blueprints(app):
    from .commands.views import blp as commands
    from .devices.views import blp as devices
    from .health.views import blp as health
    from .projects.views import blp as projects
    from .releases.views import blp as releases

    for blueprint in (health, projects, releases, devices, commands):
        extensions.api.register_blueprint(blueprint)
