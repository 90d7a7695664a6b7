"""gunicorn's settings for `fleet-server serve`: threaded workers that a slow or silent client cannot hold.

gunicorn's sync workers serve one connection each: two clients that send half a request and
wait hold two workers until the arbiter kills them (`timeout`, 30 s). The threaded (gthread)
worker only hands a connection to a thread once bytes arrive, and the worker below also gives
each socket operation a deadline, so a client that stops sending mid-request loses its thread
after FLEET_CLIENT_TIMEOUT seconds. A reverse proxy in front (docker-compose.yml) buffers
whole requests and is the first line against many slow clients; these settings are the second.
"""
import logging
import os

from gunicorn.workers.gthread import ThreadWorker

from fleet_server.config import ConfigError, client_timeout

try:
    CLIENT_TIMEOUT = client_timeout(os.environ)
except ConfigError as exc:
    raise SystemExit(f"configuration: {exc}") from None


class StalledClientRecord(logging.Filter):
    """gunicorn logs a client's timeout as a socket error with a traceback: one plain line is enough."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "closed a connection whose client stalled for %s s", (CLIENT_TIMEOUT,), None, None)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class ClientTimeoutWorker(ThreadWorker):
    """gunicorn's gthread worker with a deadline on every read and write of a client's socket."""

    def init_process(self):
        self.log.error_log.addFilter(StalledClientRecord())
        super().init_process()

    def handle(self, conn):
        # In the thread, before the first read: conn.init() left the socket blocking with no
        # deadline. A timeout ends the request with an OSError the worker answers by closing.
        conn.sock.settimeout(CLIENT_TIMEOUT)
        return super().handle(conn)


worker_class = "fleet_server.gunicorn_conf.ClientTimeoutWorker"
# Idle keep-alive connections wait in the worker's poller, not in a thread; this bounds how long.
keepalive = 5
# The arbiter restarts a worker silent this long (a request stuck in the application itself).
timeout = 60
graceful_timeout = 30
# Request line and headers beyond these sizes are refused by gunicorn before Flask sees them.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
