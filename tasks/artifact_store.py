"""Kept importable for existing callers: the artifact store lives in `tasks.storage`."""
from tasks.storage import *  # noqa: F403
from tasks.storage import __all__  # noqa: F401
