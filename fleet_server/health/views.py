"""GET /health: is the process up and is its database reachable."""
from flask.views import MethodView
from ..blueprint import Blueprint
from marshmallow import Schema, fields

from ..extensions import db

blp = Blueprint("health", __name__, url_prefix="/health", description="Health check (no token needed).", public=True)


class HealthSchema(Schema):
    status = fields.String()
    database = fields.String()


@blp.route("")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    def get(self):
        """Report whether the server and its database answer"""
        db.session.execute(db.text("SELECT 1"))
        return {"status": "ok", "database": "ok"}
