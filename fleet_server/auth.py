"""API token authentication (`Authorization: APIToken <token>`) and the roles that limit what a token may do.

- viewer: read only (GET/HEAD/OPTIONS); any write gets 403.
- operator: reads and writes every fleet resource, but cannot manage API tokens.
- admin: everything, including /auth/tokens/.
"""
from flask import g, request

from .errors import Forbidden, Unauthorized
from .tokens import service as tokens

SCHEME = "APIToken"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def authenticate():
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme != SCHEME or not value.strip():
        raise Unauthorized(f"missing credentials: send 'Authorization: {SCHEME} <token>'")
    token = tokens.authenticate(value.strip())
    if token is None:
        raise Unauthorized("the API token is invalid, expired or revoked")
    g.api_token = token
    return token


def require_token():
    """before_request hook of the fleet resources: any valid token reads, viewers may not write."""
    token = authenticate()
    if token.role == "viewer" and request.method not in READ_METHODS:
        raise Forbidden(f"token {token.id} has the viewer role, which may only read")


def require_admin(purpose: str):
    """before_request hook of the admin-only resources; `purpose` names what needs admin in the refusal."""
    token = authenticate()
    if token.role != "admin":
        raise Forbidden(f"token {token.id} has the {token.role} role; {purpose} needs admin")
