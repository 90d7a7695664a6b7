"""The wire contract's JSON rules over HTTP: a hostile request body is a 400 naming the value; NaN never leaves."""
from flask.json.provider import DefaultJSONProvider
from webargs import core

import fleet_wire as wire

from .errors import ValidationError

# The errors key of a body that is refused as a whole (not JSON, too deep), as webargs names it.
WHOLE_BODY = "json"


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON with Fleet's rules: `loads` is wire.load_json; `dumps` refuses NaN and Infinity.

    A NaN in an answer would be a bug, and strict clients reject the whole answer for it.
    """

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)

    def loads(self, s, **kwargs):
        return wire.load_json(s)


def request_json(request):
    """The request's JSON body by wire.load_json's rules; ValidationError (400) names what it refuses.

    An empty body is no body (webargs' `missing`), so required fields are reported as missing.
    """
    body = request.get_data(cache=True)
    if not body:
        return core.missing
    try:
        return wire.load_json(body)
    except wire.UnstorableJSON as exc:
        raise ValidationError(exc.path or WHOLE_BODY, exc.reason) from None
