"""Flask extensions, created unbound here and bound to an app in `init_app`."""
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData

from .schemas import ErrorSchema

# Named constraints keep Alembic migrations portable between SQLite and PostgreSQL.
_naming = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class FleetApi(Api):
    # Documents the shape errors.py really produces as every operation's default response.
    ERROR_SCHEMA = ErrorSchema


db = SQLAlchemy(metadata=MetaData(naming_convention=_naming))
migrate = Migrate()
api = FleetApi()


def init_app(app):
    db.init_app(app)
    migrate.init_app(app, db, directory=app.config["MIGRATIONS_DIR"], render_as_batch=True)
    api.init_app(app)
