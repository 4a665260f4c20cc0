"""Backends that are specified but not built yet: importable, and clear when used."""

from __future__ import annotations

from typing import Any, NoReturn

from .._errors import ConfigurationError
from .base import TaskQueue


def planned_backend(name: str, engine: str) -> type[TaskQueue]:
    """A stand-in class that names the missing backend when constructed."""

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise ConfigurationError(
            f"{name} ({engine}) is not available yet in this version of OmniQ; "
            "use SQLiteTaskQueue (the embedded default) or MemoryTaskQueue meanwhile"
        )

    return type(
        name,
        (),
        {
            "__init__": refuse,
            "from_url": classmethod(refuse),
            "__doc__": f"{engine} backend: not available yet.",
        },
    )
