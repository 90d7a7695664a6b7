"""The request-size cap, also for bodies sent without a Content-Length (chunked), which Werkzeug alone would truncate.

Werkzeug refuses a body whose Content-Length exceeds MAX_CONTENT_LENGTH before reading it, but
a chunked body it reads up to the cap and hands over cut short: the client would get "invalid
JSON" instead of 413. The middleware below reads such a body itself, at most one byte past the
cap, so the application sees either the whole body with its length, or a length over the cap,
which Werkzeug then refuses with 413 like an announced one.
"""
import io


class ChunkedBodyLimit:
    """WSGI middleware: a chunked body is buffered up to the cap and given a Content-Length."""

    def __init__(self, wsgi_app, limit: int):
        self.wsgi_app = wsgi_app
        self.limit = limit

    def __call__(self, environ, start_response):
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower() and not environ.get("CONTENT_LENGTH"):
            # Past the cap only its first bytes are kept: the answer is 413 whatever they hold.
            body = environ["wsgi.input"].read(self.limit + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            # Now a body of known length: Werkzeug ignores Content-Length while chunked is announced.
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
        return self.wsgi_app(environ, start_response)


def limit_request_bodies(app):
    """Cap every request body at FLEET_MAX_REQUEST_BYTES (Flask's MAX_CONTENT_LENGTH): 413 beyond, chunked or not."""
    limit = app.config["FLEET_MAX_REQUEST_BYTES"]
    app.config["MAX_CONTENT_LENGTH"] = limit
    app.wsgi_app = ChunkedBodyLimit(app.wsgi_app, limit)
