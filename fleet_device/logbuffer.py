"""The agent's most recent log lines, kept in a bounded in-memory ring for `minionutil.last_logs`."""
from __future__ import annotations

import collections
import logging
import threading

DEFAULT_CAPACITY = 2000
FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RecentLogs(logging.Handler):
    """A logging handler that keeps the last `capacity` records, formatted, with their levels."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        super().__init__(logging.NOTSET)
        self.capacity = capacity
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=capacity)
        self._lines_lock = threading.Lock()
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord):
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._lines_lock:
            self._lines.append((record.levelno, line))

    def lines(self, num: int, level: int = logging.NOTSET) -> list[str]:
        """The last `num` lines at `level` or above, oldest first."""
        with self._lines_lock:
            kept = [line for levelno, line in self._lines if levelno >= level]
        return kept[-num:]


def install(capacity: int = DEFAULT_CAPACITY) -> RecentLogs:
    """Attach one ring to the root logger (once per process) and return it."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, RecentLogs):
            return handler
    handler = RecentLogs(capacity)
    root.addHandler(handler)
    return handler
