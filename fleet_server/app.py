"""The Flask application factory."""
from pathlib import Path

from flask import Blueprint, Flask
from sqlalchemy import event

from . import __version__, config as fleet_config, extensions
from . import all_models  # noqa: F401  (every model, so the metadata holds every table)
from .commands.service import record_result
from .deployments.reports import DeploymentReports
from .devices.status import record_status
from .errors import register_error_handlers
from .http_security import register_security_headers
from .json_rules import StrictJSONProvider
from .logbook.service import record_telemetry
from .messaging import ingest, outbox
from .releases.service import release_contents
from .request_limits import limit_request_bodies

API_DESCRIPTION = """\
Fleet runs Docker containers on fleets of small Linux devices.

Every endpoint but `/health` needs `Authorization: APIToken <token>`. Tokens have a role:
`viewer` reads, `operator` also writes, `admin` also manages tokens. Lists take `limit` and
`offset` and answer `{count, next, previous, results}`. Every error has the shape
`{code, status, message, errors: {field: [reasons]}}`.
"""


def create_app(config=None) -> Flask:
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.config.update(
        API_TITLE="Fleet",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        # The docs page loads Swagger UI from this server (swagger-ui-bundle's files), never from a CDN:
        # many servers that run Fleet have no internet access.
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/docs/assets/",
        OPENAPI_SWAGGER_UI_CONFIG={"persistAuthorization": True},
        MIGRATIONS_DIR=str(Path(__file__).parent / "migrations"),
        JSON_SORT_KEYS=False,
        API_SPEC_OPTIONS={
            "info": {"description": API_DESCRIPTION},
            "components": {
                "securitySchemes": {
                    "APIToken": {
                        "type": "apiKey", "in": "header", "name": "Authorization",
                        "description": "`APIToken <token>`; create tokens with `fleet-server tokens create`.",
                    }
                }
            },
            "security": [{"APIToken": []}],
        },
    )
    app.config.update(fleet_config.from_environment())
    app.config.update(config or {})
    fleet_config.validate(app.config)
    limit_request_bodies(app)
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # A database server may drop idle connections (restart, failover): test each one as it
        # is taken from the pool. A SQLite file cannot, and the test would cost every request.
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": True, **app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {})}

    extensions.init_app(app)
    _configure_sqlite(app)
    register_report_handlers()
    outbox.init_app(app, release_contents=release_contents)
    register_blueprints(app)
    register_docs_assets(app)
    register_error_handlers(app)
    register_security_headers(app)
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


def register_report_handlers():
    """Hand the ingest dispatcher each feature's recorder of device reports."""
    ingest.register_batch("deployments", DeploymentReports)
    ingest.register("status", record_status)
    ingest.register("telemetry", record_telemetry)
    ingest.register("results", record_result)


def register_blueprints(app):
    from .commands.views import blp as commands
    from .deadletters.views import blp as dead_letters
    from .deployments.views import blp as deployments
    from .devices.views import blp as devices
    from .health.views import blp as health
    from .logbook.views import blp as logbook
    from .projects.views import blp as projects
    from .provisioning.views import blp as provisioning, register_blp as register
    from .registries.views import blp as registries
    from .releases.views import blp as releases
    from .tokens.views import blp as tokens

    for blueprint in (health, registries, projects, releases, devices, deployments, commands, logbook, tokens,
                      provisioning, register, dead_letters):
        extensions.api.register_blueprint(blueprint)


def register_docs_assets(app):
    """Serve Swagger UI's files for /docs from the swagger-ui-bundle package."""
    import swagger_ui_bundle

    app.register_blueprint(
        Blueprint("docs_assets", __name__, static_folder=swagger_ui_bundle.swagger_ui_path, static_url_path="/docs/assets")
    )
