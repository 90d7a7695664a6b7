"""DriverStatement runs a Core statement on the session's DB-API connection, on SQLite and on PostgreSQL."""
import pytest

from fleet_server.devices.driver_statements import DriverStatement
from fleet_server.extensions import db
from fleet_server.models import Device

_device = Device.__table__


@pytest.fixture
def devices(app):
    with app.app_context():
        db.session.add_all([Device(name="a", online=True), Device(name="b", tags=["x"]), Device(name="c", online=True)])
        db.session.commit()
        yield


def test_a_driver_statement_binds_its_parameters_and_its_own_literals_and_returns_the_driver_tuples(devices):
    # "c" is a literal of the statement: SQLAlchemy binds it as a parameter the caller does not give.
    statement = DriverStatement(
        db.select(_device.c.name, _device.c.online)
        .where(_device.c.online == db.bindparam("online"), _device.c.name != "c")
        .order_by(_device.c.name).limit(db.bindparam("limit"))
    )
    rows = statement.rows(db.session.connection(), {"online": True, "limit": 10})
    assert [(name, bool(online)) for name, online in rows] == [("a", True)]
    assert all(type(row) is tuple for row in rows)
    # Compiled once per dialect, run again with other values.
    assert [row[0] for row in statement.rows(db.session.connection(), {"online": False, "limit": 10})] == ["b"]


def test_a_driver_statement_reads_inside_the_session_transaction(devices):
    db.session.add(Device(name="not committed yet"))
    db.session.flush()
    statement = DriverStatement(db.select(db.func.count()).select_from(_device))
    assert statement.rows(db.session.connection(), {}) == [(4,)]
    db.session.rollback()
    assert statement.rows(db.session.connection(), {}) == [(3,)]


def test_a_statement_that_needs_sqlalchemy_to_expand_it_is_refused_with_the_reason(devices):
    statement = DriverStatement(db.select(_device.c.id).where(_device.c.name.in_(["a", "b"])))
    with pytest.raises(ValueError, match="needs SQLAlchemy's execution"):
        statement.rows(db.session.connection(), {})


def test_a_driver_error_is_raised_as_sqlalchemys_exception_so_an_outage_is_told_apart(devices):
    from sqlalchemy.exc import DBAPIError, OperationalError

    statement = DriverStatement(db.select(_device.c.name).where(_device.c.name == db.bindparam("name")))
    missing_table = DriverStatement(db.text("SELECT name FROM no_such_table"))
    with pytest.raises(DBAPIError, match="no_such_table") as raised:
        missing_table.rows(db.session.connection(), {})
    # SQLite calls a missing table an OperationalError, PostgreSQL a ProgrammingError: each as the driver says.
    sqlite = db.engine.dialect.name == "sqlite"
    assert isinstance(raised.value, OperationalError) is sqlite
    db.session.rollback()
    assert statement.rows(db.session.connection(), {"name": "a"}) == [("a",)]

