"""Creating, checking and revoking API tokens."""
import hashlib
import hmac
import secrets
from datetime import datetime
from typing import NamedTuple

from ..extensions import db
from ..models import ApiToken, utcnow

ROLES = ("admin", "operator", "viewer")
PREFIX = "fleet_"


def _digest(value: str) -> str:
    # Tokens carry 256 bits of randomness, so a plain SHA-256 is as strong as a slow hash here.
    return hashlib.sha256(value.encode()).hexdigest()


def create(name: str, expires_at: datetime | None = None, role: str = "admin") -> tuple[ApiToken, str]:
    """Store a new token and return it with its secret value, which is never stored."""
    value = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, token_hash=_digest(value), expires_at=expires_at, role=role)
    db.session.add(token)
    db.session.commit()
    return token, value


class AuthenticatedToken(NamedTuple):
    """The columns of a valid token that a request needs."""

    id: int
    role: str
    token_hash: str
    expires_at: datetime | None
    revoked_at: datetime | None


# Read on every authenticated request: a Core statement on the table's columns, built once,
# skips the ORM's entity loading.
_api_token = ApiToken.__table__
_TOKEN_BY_HASH = db.select(
    _api_token.c.id, _api_token.c.role, _api_token.c.token_hash, _api_token.c.expires_at, _api_token.c.revoked_at
).where(_api_token.c.token_hash == db.bindparam("token_hash"))


def authenticate(value: str) -> AuthenticatedToken | None:
    """The token (`id`, `role`, ...) if `value` is a valid token, else None.

    Read from the database on every call, never cached: a revocation or an expiry takes
    effect on the very next request, in every server process.
    """
    digest = _digest(value)
    row = db.session.connection().execute(_TOKEN_BY_HASH, {"token_hash": digest}).first()
    if row is None:
        return None
    token = AuthenticatedToken._make(row)
    if not hmac.compare_digest(token.token_hash, digest):
        return None
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= utcnow()):
        return None
    return token


def tokens_query():
    return db.select(ApiToken).order_by(ApiToken.id)


def list_tokens() -> list[ApiToken]:
    return list(db.session.scalars(tokens_query()))


def get_token(token_id: int) -> ApiToken | None:
    return db.session.get(ApiToken, token_id)


def revoke(token_id: int) -> ApiToken | None:
    token = db.session.get(ApiToken, token_id)
    if token is not None and token.revoked_at is None:
        token.revoked_at = utcnow()
        db.session.commit()
    return token
