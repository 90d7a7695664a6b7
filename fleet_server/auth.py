"""API token authentication: `Authorization: APIToken <token>` on every endpoint but health."""
from flask import g, request

from .errors import Unauthorized
from .tokens import service as tokens

SCHEME = "APIToken"


def require_token():
    """before_request hook for the API blueprints."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme != SCHEME or not value.strip():
        raise Unauthorized(f"missing credentials: send 'Authorization: {SCHEME} <token>'")
    token = tokens.authenticate(value.strip())
    if token is None:
        raise Unauthorized("the API token is invalid, expired or revoked")
    g.api_token = token



