"""Device operations, callable without HTTP."""
import functools
import logging

from .. import broker_accounts
from .driver_statements import DriverStatement
from ..errors import Conflict, NotFound
from ..extensions import db
from ..messaging import outbox
from ..models import Deployment, Device, Release, release_devices
from ..pagination import page_envelope
from .schemas import DOCUMENT_COLUMNS, DevicePageAnswer, device_answer, encode_answer

log = logging.getLogger(__name__)


def create_device(data) -> Device:
    unit_id = data.pop("unit_id", None)
    device = Device(**data)
    if unit_id is not None:
        device.unit_id = str(unit_id)
        if db.session.scalar(db.select(Device).filter_by(unit_id=device.unit_id)) is not None:
            raise Conflict(f"a device with unit_id {device.unit_id} exists", {"unit_id": ["already registered"]})
    db.session.add(device)
    db.session.commit()
    _prepare_broker_role(device)
    return device


def _prepare_broker_role(device: Device):
    # The account itself is made when the device registers; the role can wait for that too.
    try:
        broker_accounts.prepare_device_role(device.unit_id)
    except broker_accounts.BrokerAccountError as exc:
        log.warning("broker role for unit_id=%s not made yet (made at registration): %s", device.unit_id, exc)


def get_device(device_id: str) -> Device:
    device = db.session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id} does not exist")
    return device


def device_by_unit_id(unit_id: str) -> Device | None:
    return db.session.scalar(db.select(Device).filter_by(unit_id=unit_id))


# The list and retrieve answers are the API's hottest reads. They are read with Core
# statements built once and run on the driver (DriverStatement: building a statement,
# loading ORM entities or SQLAlchemy's result processing cost more than running the query),
# and encoded from schemas.DeviceAnswer, built straight from the driver's values (converting
# timestamps and tags to Python values only to write them out again cost more than the query).
_device = Device.__table__
_deployment = Deployment.__table__
_document_columns = [_device.c[name] for name in DOCUMENT_COLUMNS]
_running = _deployment.c.state == "succeeded"
_COLUMN_COUNT = len(DOCUMENT_COLUMNS)

_DEVICE_WITH_RUNNING_RELEASES = DriverStatement(
    db.select(*_document_columns, _deployment.c.release_id)
    .outerjoin(_deployment, (_deployment.c.device_id == _device.c.id) & _running)
    .where(_device.c.id == db.bindparam("device_id"))
    .order_by(_deployment.c.release_id)
)
_FILTERS = {
    "unit_id": _device.c.unit_id == db.bindparam("unit_id"),
    "name": _device.c.name == db.bindparam("name"),
    "online": _device.c.online == db.bindparam("online"),
}


@functools.cache
def _page_statements(filters: tuple[str, ...]):
    """For one combination of filters: the page, its running releases, and the count for an empty page.

    The page statement reads each device with the number of devices matching (an
    uncorrelated subquery, which the database counts once): one statement fewer, and the
    count agrees with the page. Joining the running releases in as well was slower on
    SQLite than asking for them apart (the page then goes through a temporary table).
    """
    conditions = [_FILTERS[name] for name in filters]
    count = db.select(db.func.count()).select_from(_device).where(*conditions)

    def page(*columns):
        return (db.select(*columns).where(*conditions).order_by(_device.c.created_at, _device.c.id)
                .limit(db.bindparam("limit")).offset(db.bindparam("offset")))

    # The page's ids again as a subquery: cheaper than binding a hundred ids.
    running = (
        db.select(_deployment.c.device_id, _deployment.c.release_id)
        .where(_running, _deployment.c.device_id.in_(page(_device.c.id).scalar_subquery()))
        .order_by(_deployment.c.release_id)
    )
    return (DriverStatement(page(*_document_columns, count.scalar_subquery().label("total"))),
            DriverStatement(running), DriverStatement(count))


def device_answer_json(device_id: str) -> bytes:
    """The retrieve answer as JSON: the device as DeviceSchema dumps it, read in one query."""
    rows = _DEVICE_WITH_RUNNING_RELEASES.rows(db.session.connection(), {"device_id": device_id})
    if not rows:
        raise NotFound(f"device {device_id} does not exist")
    return encode_answer(device_answer(rows[0][:_COLUMN_COUNT], [row[-1] for row in rows if row[-1] is not None]))


def _page_answer(total: int, limit: int, offset: int, results: list) -> bytes:
    return encode_answer(DevicePageAnswer(**page_envelope(total, limit, offset, results)))


def device_page_json(limit: int, offset: int, unit_id=None, name=None, online=None) -> bytes:
    """The list answer `{count, next, previous, results}` as JSON: what DevicePage dumps for the page
    of devices in creation order, filtered by whichever of unit_id, name and online is given."""
    filters = {name: value for name, value in (("unit_id", None if unit_id is None else str(unit_id)),
                                                ("name", name), ("online", online)) if value is not None}
    page_statement, running_statement, count_statement = _page_statements(tuple(filters))
    connection = db.session.connection()
    parameters = {**filters, "limit": limit, "offset": offset}
    devices = page_statement.rows(connection, parameters)
    if not devices:  # past the last device, or none matches
        return _page_answer(count_statement.rows(connection, filters)[0][0], limit, offset, [])
    running = {}  # device id -> ids of the releases it runs; a device another request added in between is not read
    for device_id, release_id in running_statement.rows(connection, parameters):
        running.setdefault(device_id, []).append(release_id)
    return _page_answer(devices[0][_COLUMN_COUNT], limit, offset,
                        [device_answer(device[:_COLUMN_COUNT], running.get(device[0], ())) for device in devices])


def update_device(device: Device, data) -> Device:
    for field, value in data.items():
        setattr(device, field, value)
    db.session.commit()
    return device


def delete_device(device: Device):
    """Delete a device and clear its retained release topics, so nothing waits on the broker for it."""
    project_ids = db.session.scalars(
        db.select(Release.project_id)
        .join(release_devices, release_devices.c.release_id == Release.id)
        .where(release_devices.c.device_id == device.id)
        .distinct()
    )
    # Flushed after the device is gone, these rows publish empty retained payloads.
    outbox.enqueue_pairs((device.unit_id, project_id) for project_id in project_ids)
    db.session.delete(device)
    db.session.commit()
    log.info("device=%s unit_id=%s deleted", device.id, device.unit_id)
    try:
        broker_accounts.remove_device_account(device.unit_id)
    except broker_accounts.BrokerAccountError as exc:
        log.error("broker account of unit_id=%s not removed: %s; remove it by hand", device.unit_id, exc)
    outbox.flush_after_commit()
