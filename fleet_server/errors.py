"""The project's exceptions and the one JSON shape every error response takes."""
import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES

log = logging.getLogger(__name__)


class FleetError(Exception):
    """Base of the errors the API turns into a 4xx response."""

    status = 400

    def __init__(self, message, errors=None):
        super().__init__(message)
        self.message = message
        self.errors = errors or {}


class ValidationError(FleetError):
    status = 400

    def __init__(self, field, reason):
        super().__init__(f"{field}: {reason}", {field: [reason]})


class NotFound(FleetError):
    status = 404


class Conflict(FleetError):
    status = 409


class Unauthorized(FleetError):
    status = 401


class Forbidden(FleetError):
    status = 403


def _flatten(messages):
    """webargs keys its messages by location ({"json": {...}}); clients want the fields."""
    if isinstance(messages, dict) and len(messages) == 1:
        (location, inner), = messages.items()
        if location in ("json", "query", "path", "form") and isinstance(inner, dict):
            return inner
    return messages


def _summary(errors):
    parts = []
    for field, reasons in errors.items():
        if isinstance(reasons, list) and all(isinstance(r, str) for r in reasons):
            parts.append(f"{field}: {' '.join(reasons)}")
        else:
            parts.append(f"{field}: invalid")
    return "; ".join(parts)


def error_response(status, name, message, errors=None, headers=None):
    body = {"code": status, "status": name, "message": message, "errors": errors or {}}
    response = jsonify(body)
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app):
    @app.errorhandler(FleetError)
    def handle_fleet_error(error):
        name = HTTP_STATUS_CODES.get(error.status, "Error")
        return error_response(error.status, name, error.message, error.errors)

    @app.errorhandler(RequestEntityTooLarge)
    def handle_too_large(error):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return error_response(413, error.name, f"the request body is larger than {limit} bytes, "
                                               "the most this server accepts (FLEET_MAX_REQUEST_BYTES)")

    @app.errorhandler(HTTPException)
    def handle_http_error(error):
        data = getattr(error, "data", None) or {}
        errors = _flatten(data.get("messages", {}))
        message = data.get("message") or (_summary(errors) if errors else error.description)
        return error_response(error.code, error.name, message, errors, data.get("headers"))

    @app.errorhandler(Exception)
    def handle_unexpected(error):
        log.exception("unhandled error")
        return error_response(500, HTTP_STATUS_CODES[500], "internal error; see the server log")
