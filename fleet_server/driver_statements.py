"""Core statements run straight on the DB-API connection, for the hottest reads and writes.

SQLAlchemy's execution path (an execution context, result processing, a Row per row)
costs more than running a short indexed query on SQLite: for a page of 100 devices it was
a third of the time spent reading them. A DriverStatement is an ordinary Core statement,
compiled once per dialect and run on the connection the session already holds (so in the
same transaction); its rows are the driver's own tuples, with the values as the driver
hands them: on SQLite text timestamps and JSON and 0/1 booleans, on PostgreSQL (psycopg)
datetimes, parsed JSON and booleans. The reader must take both.

A driver error comes out as SQLAlchemy's own exception (an OperationalError stays an
OperationalError, which callers take for an outage), and a connection the database dropped
is invalidated, as SQLAlchemy's execution would. `after_cursor_execute` listeners see the
statement (with no execution context).
"""
from datetime import datetime, timezone

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable


def utc_timestamp(value) -> datetime:
    """A models.UTCDateTime value as a driver hands it (SQLite: the stored text; psycopg: a naive datetime), as
    the aware datetime SQLAlchemy would give."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc)


class _Compiled:
    """A statement compiled for one dialect, with the bind processing of its typed parameters."""

    def __init__(self, statement: Executable, dialect, typed: bool):
        self.compiled = statement.compile(dialect=dialect)
        if "POSTCOMPILE" in self.compiled.string:
            # Expanding IN lists and literal-rendered parameters need SQLAlchemy to run the statement.
            raise ValueError(f"statement needs SQLAlchemy's execution to run: {self.compiled.string}")
        self.string = self.compiled.string
        self.processors = {}
        if typed:
            for bind, name in self.compiled.bind_names.items():
                processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if processor is not None:
                    self.processors[name] = processor

    def parameters(self, given: dict):
        values = self.compiled.construct_params(given)  # with the statement's own literals
        for name, processor in self.processors.items():
            values[name] = processor(values[name])
        if self.compiled.positional:
            return tuple(values[name] for name in self.compiled.positiontup)
        return values


class DriverStatement:
    """One Core statement: `rows(connection, parameters)` runs a query and returns the driver's tuples,
    `run(connection, parameters)` runs a write and returns how many rows it matched.

    Parameters are bound as given, without SQLAlchemy's bind processing: pass values every
    driver takes as they are (str, int, float, bool, None). With `typed=True` they go through
    the bind processing of their SQLAlchemy types first (timestamps, JSON, booleans), so the
    database stores what SQLAlchemy's execution of the same statement would store.
    """

    def __init__(self, statement: Executable, typed: bool = False):
        self.statement = statement
        self.typed = typed
        self._compiled = {}

    def _compile(self, dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _Compiled(self.statement, dialect, self.typed)
        return compiled

    def rows(self, connection: Connection, parameters: dict) -> list[tuple]:
        return self._execute(connection, parameters, lambda cursor: cursor.fetchall())

    def run(self, connection: Connection, parameters: dict) -> int:
        return self._execute(connection, parameters, lambda cursor: cursor.rowcount)

    def _execute(self, connection: Connection, parameters: dict, outcome):
        compiled = self._compile(connection.dialect)
        values = compiled.parameters(parameters)
        cursor = connection.connection.cursor()
        try:
            cursor.execute(compiled.string, values)
            # Listeners (tracing, tests counting statements) see it as they see SQLAlchemy's own; no execution context.
            connection.dispatch.after_cursor_execute(connection, cursor, compiled.string, values, None, False)
            return outcome(cursor)
        except connection.dialect.loaded_dbapi.Error as exc:
            dialect = connection.dialect
            dropped = dialect.is_disconnect(exc, connection.connection.dbapi_connection, cursor)
            if dropped:
                connection.invalidate(exc)
            raise DBAPIError.instance(compiled.string, values, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=dropped, dialect=dialect) from exc
        finally:
            cursor.close()
