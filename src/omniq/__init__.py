"""OmniQ: a Python task queue with one API over memory, files, SQLite, PostgreSQL, Redis and NATS.

.. code-block:: python

    from omniq import OmniQ

    def my_task(data):
        print(f"Processing: {data}")

    with OmniQ() as omniq:  # tasks and results in ./omniq.db
        omniq.enqueue(my_task, "Hello")
"""

from __future__ import annotations

from ._client import AsyncOmniQ, OmniQ, Settings
from ._errors import (
    ConfigurationError,
    MissingDependencyError,
    OmniQError,
    SerializationError,
    TaskFailedError,
)
from ._events import Event, EventType
from ._serialize import PickleSerializer, Serializer
from ._task import Task, TaskStatus
from ._worker import AsyncWorker, Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncOmniQ",
    "AsyncWorker",
    "ConfigurationError",
    "Event",
    "EventType",
    "MissingDependencyError",
    "OmniQ",
    "OmniQError",
    "PickleSerializer",
    "SerializationError",
    "Serializer",
    "Settings",
    "Task",
    "TaskFailedError",
    "TaskStatus",
    "Worker",
]
