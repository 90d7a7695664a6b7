"""HTTP endpoint for /logbook/storage/read/."""
import json

from flask import Response
from flask.views import MethodView
from marshmallow import RAISE

from ..blueprint import Blueprint
from . import service
from .schemas import LogbookEntrySchema, StorageReadArgs

blp = Blueprint("logbook", __name__, url_prefix="/logbook", description="Device telemetry, raw or aggregated.")


@blp.route("/storage/read/")
class StorageRead(MethodView):
    # A misspelt parameter (`aggregaton=avg`) must not silently turn into a raw read.
    @blp.arguments(StorageReadArgs, location="query", unknown=RAISE)
    @blp.response(200, LogbookEntrySchema(many=True))
    def get(self, args):
        """Read one field of one device over a time range, optionally aggregated per interval"""
        # The service shapes each entry exactly as LogbookEntrySchema documents it; dumping
        # thousands of them through marshmallow again would cost more than the query.
        return Response(json.dumps(service.read_series(args), separators=(",", ":")), mimetype="application/json")
