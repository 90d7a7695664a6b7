"""What a command may reach on the device: a narrow context handed to every command, never the agent itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..deploy import LABEL_PROJECT, LABEL_UNIT

if TYPE_CHECKING:
    import docker

    from ..logbuffer import RecentLogs
    from ..state import ReleaseQueue


@dataclass(frozen=True)
class ContainerScope:
    """Which containers commands may act on: Fleet's own, plus `names`, or every one with `any_container`."""

    any_container: bool = False
    names: frozenset = frozenset()

    def allows(self, unit_id: str, name: str, labels: dict | None) -> bool:
        labels = labels or {}
        managed = LABEL_PROJECT in labels and labels.get(LABEL_UNIT) in (None, unit_id)
        return managed or self.any_container or name in self.names


@dataclass(frozen=True)
class CommandContext:
    """The parts of the agent commands use."""

    unit_id: str
    # The Docker client, made on first use (an agent starts while the engine is down).
    docker: Callable[[], docker.DockerClient]
    recent_logs: RecentLogs | None = None  # the agent's own recent log lines
    releases: ReleaseQueue | None = None  # the releases queued and applied
    # Apply the queued releases now (`budget`: seconds after which no deploy starts); returns their outcomes.
    apply_queued: Callable[..., list] | None = None
    container_scope: ContainerScope = ContainerScope()
