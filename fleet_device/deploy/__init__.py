"""The device's deploy engine: the pure plan, typed steps, a table of actions, the journal, the Deployer."""
from .docker_engine import LABEL_CONTAINER, LABEL_HASH, LABEL_PROJECT, LABEL_RELEASE, LABEL_UNIT  # noqa: F401
from .engine import Deployer, Recovery  # noqa: F401
from .errors import DeployError  # noqa: F401
from .executor import backup_path  # noqa: F401
from .plan import (  # noqa: F401
    OLD_SUFFIX, DeviceState, Running, image_reference, plan, purge_paths, registry_host, release_image_refs,
)
from .steps import (  # noqa: F401
    CHANGE, COMMIT, PREPARE, VERIFY, DropBackup, Login, Prune, Pull, Purge, Remove, Start, Step, Stop, Verify,
)
