"""Recording the statuses devices send: online or offline, when last seen, the agent's version."""
from datetime import datetime, timezone

import fleet_wire as wire

from ..extensions import db
from ..models import Device


_device = Device.__table__
# Built once: building a statement cost more than running it.
_STORE_STATUS = (
    db.update(_device)
    .where(_device.c.id == db.bindparam("device_id"))
    .values(online=db.bindparam("online"), last_seen_at=db.bindparam("seen"),
            # A status without the agent's version keeps the one known.
            agent_version=db.func.coalesce(db.bindparam("agent_version", type_=_device.c.agent_version.type),
                                           _device.c.agent_version))
)


def record_status(device, status: wire.Status):
    db.session.connection().execute(_STORE_STATUS, {
        "device_id": device.id, "online": status.state == "online", "seen": datetime.now(timezone.utc),
        "agent_version": status.agent_version or None,
    })
