"""Exceptions raised by OmniQ's public API."""

from __future__ import annotations

import importlib
import ssl
from types import ModuleType


class OmniQError(Exception):
    """Base class of every error OmniQ raises on purpose."""


class ConfigurationError(OmniQError, ValueError):
    """A setting, URL or component given to OmniQ is not usable."""


class MissingDependencyError(OmniQError, ImportError):
    """A backend was used whose optional driver is not installed.

    The message names the extra to install, e.g. ``pip install 'omniq[redis]'``.
    """


def import_driver(*modules: str, needed_by: str, extra: str) -> ModuleType:
    """Import an optional driver's ``modules`` now and return the first one's package;
    ``MissingDependencyError`` naming ``pip install 'omniq[<extra>]'`` if one is missing."""
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{needed_by}: pip install 'omniq[{extra}]'") from exc
    return importlib.import_module(modules[0].partition(".")[0])


def certificate_rejected(exc: BaseException) -> bool:
    """Whether a connect error is a TLS certificate that failed verification, raised
    as is or wrapped by a driver (redis-py's ``ConnectionError``). Every retry
    would fail the same way: connections raise it at once instead of retrying."""
    wrapped = exc.__cause__ or exc.__context__
    return isinstance(exc, ssl.SSLCertVerificationError) or isinstance(
        wrapped, ssl.SSLCertVerificationError
    )


class SerializationError(OmniQError, TypeError):
    """A task argument or result cannot be encoded by the configured serializer.

    Raised by ``enqueue`` before anything is stored.
    """


class TaskFailedError(OmniQError):
    """The task raised an exception in the worker (or failed for good).

    Carries what the worker saw: the remote exception's type name, its message
    and the formatted traceback, since the exception object itself cannot
    travel through the result storage.
    """

    def __init__(
        self, task_id: str, exc_type: str, message: str, traceback: str | None = None
    ) -> None:
        super().__init__(f"task {task_id} failed: {exc_type}: {message}")
        self.task_id = task_id
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback


class TaskNotFoundError(OmniQError, LookupError):
    """No task with this id is known to the queue or the result storage."""
