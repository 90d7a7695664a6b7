"""Commands the agent runs for the server or the local API: the registry, the built-ins, the runner, its journal."""
from .registry import *  # noqa: F401,F403
