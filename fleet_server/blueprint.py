"""The Blueprint every resource uses: 400 for bad input, and the API token check."""
import functools

import flask_smorest
from flask_smorest.utils import resolve_schema_instance
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from .auth import require_admin, require_token
from .json_rules import request_json


class Parser(FlaskParser):
    # AutoPi's API answers bad input with 400, not webargs' default 422.
    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        # The wire contract's JSON rules (json_rules.py) instead of json.loads, which lets NaN,
        # lone surrogates, huge integers and deep nesting through to a 500.
        return request_json(req) if is_json_request(req) else core.missing


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()

    def __init__(self, *args, public=False, admin_only: str | None = None, **kwargs):
        """`admin_only`: what the resource is for ("managing tokens"), named when a lesser token is refused."""
        super().__init__(*args, **kwargs)
        if admin_only:
            self.before_request(functools.partial(require_admin, admin_only))
        elif not public:
            self.before_request(require_token)

    def arguments(self, schema, *args, **kwargs):
        # Given a class, webargs would build a schema instance on every request (a tenth of a
        # millisecond each); schemas keep no state between loads, so one instance serves all.
        return super().arguments(resolve_schema_instance(schema), *args, **kwargs)
