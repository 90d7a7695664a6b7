"""Commands the agent runs for the server or the local API: the registry, the built-ins, the runner and its journal.

Importing the package registers the built-in commands.
"""
from . import builtins  # noqa: F401  (registers the built-in commands)
from .context import CommandContext, ContainerScope  # noqa: F401
from .journal import CommandJournal  # noqa: F401
from .registry import (  # noqa: F401
    COMMANDS, DEFAULT_TIMEOUT, Command, CommandError, check_arguments, command, execute, is_instant, is_read_only,
    timeout_of,
)
from .runner import CommandRunner, cap_output  # noqa: F401
