"""HTTP endpoints for /auth/tokens/ (admin tokens only)."""
from flask.views import MethodView

from ..blueprint import Blueprint
from ..errors import NotFound
from ..pagination import paginate
from ..schemas import PaginationArgs
from . import service
from .schemas import CreatedTokenSchema, TokenPage, TokenSchema

blp = Blueprint(
    "tokens", __name__, url_prefix="/auth/tokens", admin_only="managing tokens",
    description="API tokens: the value is shown once at creation and stored only as a hash. Needs an admin token.",
)


@blp.route("/")
class Tokens(MethodView):
    @blp.arguments(PaginationArgs, location="query")
    @blp.response(200, TokenPage)
    def get(self, args):
        """List tokens (never their values)"""
        return paginate(service.tokens_query(), **args)

    @blp.arguments(TokenSchema, example={"name": "ci", "role": "operator", "expires": "2027-01-01T00:00:00Z"})
    @blp.response(201, CreatedTokenSchema)
    def post(self, data):
        """Create a token; its value is in this answer and nowhere else"""
        token, value = service.create(data["name"], data["expires_at"], data["role"])
        token.token = value  # only on this instance, only in this answer
        return token


@blp.route("/<int(max=2147483647):token_id>/")
class TokenItem(MethodView):
    @blp.response(200, TokenSchema)
    def get(self, token_id):
        """Retrieve a token (never its value)"""
        return _token(token_id)

    @blp.response(204)
    def delete(self, token_id):
        """Revoke a token at once"""
        service.revoke(_token(token_id).id)


def _token(token_id):
    token = service.get_token(token_id)
    if token is None:
        raise NotFound(f"token {token_id} does not exist")
    return token
