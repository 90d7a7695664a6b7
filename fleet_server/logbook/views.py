"""HTTP endpoint for /logbook/storage/read/."""
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
        # The service (the database, for raw reads) writes the JSON exactly as LogbookEntrySchema
        # documents it; loading and dumping thousands of entries again would cost more than the query.
        return Response(service.read_series_json(args), mimetype="application/json")
