"""HTTP endpoints for /ingest/dead-letters/ (admin tokens only)."""
from flask.views import MethodView

from ..blueprint import Blueprint
from ..errors import NotFound
from ..pagination import paginate
from . import service
from .schemas import DeadLetterArgs, DeadLetterPage, DeadLetterSchema

blp = Blueprint(
    "dead_letters", __name__, url_prefix="/ingest/dead-letters", admin_only="reading dead letters",
    description="Device reports the ingest worker could not store (malformed, or refused by the database), "
                "newest first; the newest FLEET_DEAD_LETTERS_KEPT are kept. Needs an admin token.",
)


@blp.route("/")
class DeadLetters(MethodView):
    @blp.arguments(DeadLetterArgs, location="query")
    @blp.response(200, DeadLetterPage)
    def get(self, args):
        """List dead letters, newest first (without their payloads)"""
        return paginate(service.letters_query(args.pop("unit_id"), args.pop("kind")), **args)


@blp.route("/<int(max=2147483647):letter_id>/")
class DeadLetterItem(MethodView):
    @blp.response(200, DeadLetterSchema)
    def get(self, letter_id):
        """Retrieve a dead letter with the payload kept of it"""
        letter = service.get_letter(letter_id)
        if letter is None:
            raise NotFound(f"dead letter {letter_id} does not exist")
        return letter
