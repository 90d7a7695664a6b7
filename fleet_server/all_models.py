"""Every model of the server, core and features alike: imported by the app so its metadata (and Alembic) holds every table.

The core models (fleet_server/models.py) know nothing of the features built on them; this
module, above both, gathers them.
"""
from . import models  # noqa: F401
from .commands import models as command_models  # noqa: F401
from .logbook import models as logbook_models  # noqa: F401
from .messaging import worker_sessions  # noqa: F401  (the ingest workers' broker sessions)
from .provisioning import models as provisioning_models  # noqa: F401
