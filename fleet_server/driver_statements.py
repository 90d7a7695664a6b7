"""Core statements run straight on the DB-API connection, for the API's hottest reads.

SQLAlchemy's execution path (an execution context, result processing, a Row per row)
costs more than running a short indexed query on SQLite: for a page of 100 devices it was
a third of the time spent reading them. A DriverStatement is an ordinary Core statement,
compiled once per dialect and run on the connection the session already holds (so in the
same transaction); its rows are the driver's own tuples, with the values as the driver
hands them: on SQLite text timestamps and JSON and 0/1 booleans, on PostgreSQL (psycopg)
datetimes, parsed JSON and booleans. The reader must take both.
"""
from datetime import datetime, timezone

from sqlalchemy import Connection
from sqlalchemy.sql import Executable


def utc_timestamp(value) -> datetime:
    """A models.UTCDateTime value as a driver hands it (SQLite: the stored text; psycopg: a naive datetime), as
    the aware datetime SQLAlchemy would give."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc)


class DriverStatement:
    """One Core statement; `rows(connection, parameters)` runs it and returns the driver's tuples.

    Parameters are bound as given, without SQLAlchemy's bind processing: pass values every
    driver takes as they are (str, int, float, bool, None).
    """

    def __init__(self, statement: Executable):
        self.statement = statement
        self._compiled = {}

    def _compile(self, dialect):
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self.statement.compile(dialect=dialect)
            if "POSTCOMPILE" in compiled.string:
                # Expanding IN lists and literal-rendered parameters need SQLAlchemy to run the statement.
                raise ValueError(f"statement needs SQLAlchemy's execution to run: {compiled.string}")
            self._compiled[dialect.name] = compiled
        return compiled

    def rows(self, connection: Connection, parameters: dict) -> list[tuple]:
        compiled = self._compile(connection.dialect)
        values = compiled.construct_params(parameters)  # with the statement's own literals
        if compiled.positional:
            values = tuple(values[name] for name in compiled.positiontup)
        cursor = connection.connection.cursor()
        try:
            cursor.execute(compiled.string, values)
            return cursor.fetchall()
        finally:
            cursor.close()
