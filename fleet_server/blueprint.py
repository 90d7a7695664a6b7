"""The Blueprint every resource uses: 400 for bad input, and the API token check."""
import flask_smorest
from flask_smorest.utils import resolve_schema_instance
from webargs.flaskparser import FlaskParser

from .auth import require_admin, require_token


class Parser(FlaskParser):
    # The seed's API answers bad input with 400, not webargs' default 422.
    DEFAULT_VALIDATION_STATUS = 400


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()

    def __init__(self, *args, public=False, admin_only=False, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_only:
            self.before_request(require_admin)
        elif not public:
            self.before_request(require_token)

    def arguments(self, schema, *args, **kwargs):
        # Given a class, webargs would build a schema instance on every request (a tenth of a
        # millisecond each); schemas keep no state between loads, so one instance serves all.
        return super().arguments(resolve_schema_instance(schema), *args, **kwargs)
