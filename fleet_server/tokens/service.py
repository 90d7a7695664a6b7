"""Creating, checking and revoking API tokens."""
import hashlib
import hmac
import secrets
from datetime import datetime

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


def authenticate(value: str) -> ApiToken | None:
    digest = _digest(value)
    token = db.session.scalar(db.select(ApiToken).filter_by(token_hash=digest))
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    now = utcnow()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
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
