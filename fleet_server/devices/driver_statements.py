"""Core statements run straight on the DB-API connection, for the device list and retrieve only.

It is the one bypass of SQLAlchemy's execution on the server: `devices/service.py` alone
uses it, and `tests/test_device_answers.py` checks that its answers equal the ORM's.
Everything else runs through SQLAlchemy (`connection.execute` or the ORM).

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
    """A statement compiled for one dialect."""

    def __init__(self, statement: Executable, dialect):
        self.compiled = statement.compile(dialect=dialect)
        if "POSTCOMPILE" in self.compiled.string:
            # Expanding IN lists and literal-rendered parameters need SQLAlchemy to run the statement.
            raise ValueError(f"statement needs SQLAlchemy's execution to run: {self.compiled.string}")
        self.string = self.compiled.string

    def parameters(self, given: dict):
        values = self.compiled.construct_params(given)  # with the statement's own literals
        if self.compiled.positional:
            return tuple(values[name] for name in self.compiled.positiontup)
        return values


class DriverStatement:
    """One Core query: `rows(connection, parameters)` runs it and returns the driver's tuples.

    Parameters are bound as given, without SQLAlchemy's bind processing: pass values every
    driver takes as they are (str, int, float, bool, None).
    """

    def __init__(self, statement: Executable):
        self.statement = statement
        self._compiled = {}

    def _compile(self, dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _Compiled(self.statement, dialect)
        return compiled

    def rows(self, connection: Connection, parameters: dict) -> list[tuple]:
        compiled = self._compile(connection.dialect)
        values = compiled.parameters(parameters)
        cursor = connection.connection.cursor()
        try:
            cursor.execute(compiled.string, values)
            # Listeners (tracing, tests counting statements) see it as they see SQLAlchemy's own; no execution context.
            connection.dispatch.after_cursor_execute(connection, cursor, compiled.string, values, None, False)
            return cursor.fetchall()
        except connection.dialect.loaded_dbapi.Error as exc:
            dialect = connection.dialect
            dropped = dialect.is_disconnect(exc, connection.connection.dbapi_connection, cursor)
            if dropped:
                connection.invalidate(exc)
            raise DBAPIError.instance(compiled.string, values, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=dropped, dialect=dialect) from exc
        finally:
            cursor.close()
