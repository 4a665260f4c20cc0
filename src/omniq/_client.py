"""``AsyncOmniQ`` and its sync twin ``OmniQ``: the application's entry point."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec

from . import _config
from ._bridge import LoopThread
from ._errors import ConfigurationError, TaskFailedError
from ._eventlog import EventLog
from ._events import Event, EventType
from ._funcs import func_path
from ._serialize import Serializer
from ._task import Task, TaskStatus, new_task_id
from .events.base import EventStorage
from .queue.base import TaskQueue
from .results.base import ResultStorage, TaskResult

if TYPE_CHECKING:  # the worker module imports this one
    from ._worker import AsyncWorker, Worker

DEFAULT_RESULT_TTL = 24 * 3600.0


class Settings:
    """Defaults applied to every task of an OmniQ instance (each can be overridden per task)."""

    def __init__(
        self,
        *,
        max_retries: int = 0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 600.0,
        timeout: float | None = None,
        result_ttl: float | None = DEFAULT_RESULT_TTL,
        store_results: bool = True,
    ) -> None:
        if max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.timeout = timeout
        self.result_ttl = result_ttl
        self.store_results = store_results


#: How many ``_plain_task`` templates an instance keeps (functions enqueued).
_PLAIN_TEMPLATES = 256


class _Base:
    """What both facades share and that does no I/O: building tasks and events."""

    def __init__(
        self,
        task_queue: TaskQueue | str | None = None,
        result_storage: ResultStorage | str | None = None,
        event_storage: EventStorage | str | None = None,
        *,
        serializer: Serializer | None = None,
        secret_key: bytes | str | None = None,
        **settings: Any,
    ) -> None:
        if serializer is not None and secret_key is not None:
            raise ConfigurationError("give serializer or secret_key, not both")
        if secret_key is not None:
            serializer = Serializer(secret_key)
        self.task_queue = _config.task_queue(task_queue)
        if serializer is not None:
            self.task_queue.serializer = serializer
        self.result_storage = _config.result_storage(result_storage, self.task_queue)
        storage = _config.event_storage(event_storage)
        self.event_log = EventLog(storage) if storage is not None else None
        self.settings = Settings(**settings)
        self.task_queue.observer = self._on_queue_transition
        #: Validated templates of ``enqueue(func, *args)`` calls without options.
        self._plain: dict[tuple[Any, ...], Task] = {}

    @property
    def serializer(self) -> Serializer:
        return self.task_queue.serializer

    def build_task(self, func: Callable[..., Any] | str, *args: Any, **options: Any) -> Task:
        """The ``Task`` that ``enqueue(func, *args, **options)`` would store, without storing it.

        For integrations that store tasks themselves (e.g. enqueue inside the
        application's own database transaction).
        """
        if not options:
            return self._plain_task(func, args)
        task_options = {k: v for k, v in options.items() if k in _ENQUEUE_OPTIONS}
        func_kwargs = {k: v for k, v in options.items() if k not in _ENQUEUE_OPTIONS}
        kwargs = _split_options(func_kwargs.pop("kwargs", None), func_kwargs)
        return self._build_task(func, args, kwargs, **task_options)

    def _build_task(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        task_id: str | None = None,
        **options: Any,
    ) -> Task:
        task = self._task_template(func, **options)
        task.id = task_id or new_task_id()
        task.args, task.kwargs = tuple(args), kwargs
        return task

    def _plain_task(self, func: Callable[..., Any] | str, args: tuple[Any, ...]) -> Task:
        """``build_task`` without options, the usual ``enqueue(f, *args)``: a copy of a
        template validated once per function (and settings)."""
        settings = self.settings
        key = (func, settings.max_retries, settings.timeout, settings.result_ttl)
        try:
            template = self._plain.get(key)
        except TypeError:  # an unhashable callable: no template
            return self._build_task(func, args, {})
        if template is None:
            if len(self._plain) >= _PLAIN_TEMPLATES:
                self._plain.clear()
            template = self._plain[key] = self._task_template(func)
        now = time.time()
        return msgspec.structs.replace(
            template, id=new_task_id(), args=args, kwargs={}, enqueued_at=now, due_at=now
        )

    def _build_tasks(
        self, func: Callable[..., Any] | str, calls: Iterable[Sequence[Any]], **options: Any
    ) -> list[Task]:
        """One task per call, sharing one validated template (a batch's hot path)."""
        template = self._task_template(func, **options)
        replace = msgspec.structs.replace
        return [replace(template, id=new_task_id(), args=_call_args(c)) for c in calls]

    def _task_template(
        self,
        func: Callable[..., Any] | str,
        *,
        queue_name: str = "default",
        priority: int = 0,
        eta: datetime | float | None = None,
        delay: timedelta | float | None = None,
        ttl: timedelta | float | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        result_ttl: float | None = None,
    ) -> Task:
        """A task with every option validated and applied, and no id or arguments yet."""
        if not isinstance(queue_name, str) or not queue_name:
            raise ConfigurationError("queue_name must be a non-empty string")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError(f"priority must be an int, not {priority!r}")
        now = time.time()
        return Task(
            id="",
            func=func_path(func),
            queue_name=queue_name,
            priority=priority,
            enqueued_at=now,
            due_at=_due_at(now, eta, delay),
            expires_at=None if ttl is None else now + _seconds(ttl, "ttl"),
            max_retries=self.settings.max_retries if max_retries is None else max_retries,
            timeout=self.settings.timeout if timeout is None else timeout,
            result_ttl=self.settings.result_ttl if result_ttl is None else result_ttl,
        )

    def _emit(self, type: EventType, task: Task, detail: str | None = None) -> None:
        if self.event_log is not None:
            self.event_log.emit(
                Event(
                    task_id=task.id,
                    type=type,
                    queue_name=task.queue_name,
                    func=task.func,
                    attempts=task.attempts,
                    detail=detail,
                )
            )

    def _on_queue_transition(self, task: Task, status: TaskStatus, reason: str) -> None:
        self._emit(
            EventType.EXPIRED if status is TaskStatus.EXPIRED else EventType.FAILED, task, reason
        )

    def _result_value(self, task_id: str, result: TaskResult) -> Any:
        if not result.succeeded:
            raise TaskFailedError(
                task_id, result.exc_type or "Error", result.message or "", result.traceback
            )
        return None if result.value is None else self.serializer.decode_value(result.value)


def _seconds(value: timedelta | float, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ConfigurationError(f"{name} must not be negative")
    return seconds


def _due_at(now: float, eta: datetime | float | None, delay: timedelta | float | None) -> float:
    if eta is not None and delay is not None:
        raise ConfigurationError("give eta or delay, not both")
    if delay is not None:
        return now + _seconds(delay, "delay")
    if eta is None:
        return now
    if isinstance(eta, datetime):
        if eta.tzinfo is None:
            eta = eta.astimezone(timezone.utc)  # naive means local time, as datetime.now() gives
        return eta.timestamp()
    return float(eta)


def _split_options(kwargs: dict[str, Any] | None, func_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the function: ``**func_kwargs`` merged with ``kwargs=``."""
    if kwargs is None:
        return func_kwargs
    return {**func_kwargs, **kwargs}


class AsyncOmniQ(_Base):
    """The async API. Use ``async with AsyncOmniQ(...) as omniq:``.

    ``task_queue``, ``result_storage`` and ``event_storage`` are instances or
    URLs (``sqlite:///omniq.db``, ``memory://``, ``redis://…``); unset ones come
    from ``OMNIQ_TASK_QUEUE_URL`` / ``OMNIQ_RESULT_STORAGE_URL`` /
    ``OMNIQ_EVENT_STORAGE_URL``; with nothing set, tasks and results live in
    ``omniq.db`` in the working directory and events are off. Other keyword
    arguments are task defaults (see :class:`Settings`), ``secret_key`` to
    sign payloads, and ``serializer`` (e.g. :class:`omniq.PickleSerializer`).
    """

    async def enqueue(
        self,
        func: Callable[..., Any] | str,
        *args: Any,
        queue_name: str = "default",
        priority: int = 0,
        eta: datetime | float | None = None,
        delay: timedelta | float | None = None,
        ttl: timedelta | float | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        result_ttl: float | None = None,
        task_id: str | None = None,
        kwargs: dict[str, Any] | None = None,
        **func_kwargs: Any,
    ) -> str:
        """Enqueue ``func(*args, **kwargs)``; returns the task id.

        ``task_id`` makes the call idempotent: enqueuing a known id adds nothing.
        """
        self._bind_loop()
        task = self._build_task(
            func, args, _split_options(kwargs, func_kwargs),
            queue_name=queue_name, priority=priority, eta=eta, delay=delay, ttl=ttl,
            max_retries=max_retries, timeout=timeout, result_ttl=result_ttl, task_id=task_id,
        )  # fmt: skip
        inserted = await self.task_queue.enqueue_many([task])
        if inserted[0]:
            self._emit(EventType.ENQUEUED, task)
        return task.id

    async def enqueue_many(
        self, func: Callable[..., Any] | str, calls: Iterable[Sequence[Any]], **options: Any
    ) -> list[str]:
        """Enqueue ``func(*call)`` for each tuple in ``calls``, in one round trip.

        ``options`` are those of :meth:`enqueue` (``task_id`` excepted) and apply to every task.
        """
        self._bind_loop()
        tasks = self._build_tasks(func, calls, **options)
        inserted = await self.task_queue.enqueue_many(tasks)
        for task, new in zip(tasks, inserted, strict=False):
            if new:
                self._emit(EventType.ENQUEUED, task)
        return [task.id for task in tasks]

    async def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the task's result and return it.

        Raises ``TaskFailedError`` if the task failed for good, and ``TimeoutError``
        if it did not finish within ``timeout`` seconds (None: wait as long as it takes).
        """
        result = await self.result_storage.wait(task_id, timeout)
        if result is None:
            raise TimeoutError(f"task {task_id} did not finish within {timeout} s")
        return self._result_value(task_id, result)

    async def get_task(self, task_id: str) -> Task | None:
        """The task with its current ``status``, or None if unknown (or pruned)."""
        return await self.task_queue.get_task(task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a pending task; False if it already started, finished or is unknown."""
        task = await self.task_queue.get_task(task_id)
        cancelled = await self.task_queue.cancel(task_id)
        if cancelled and task is not None:
            self._emit(EventType.CANCELLED, task)
        return cancelled

    async def failed_tasks(self, queue_name: str | None = None, limit: int = 100) -> list[Task]:
        """The dead letter: tasks that failed for good."""
        return await self.task_queue.failed_tasks(queue_name, limit)

    async def requeue(self, task_id: str) -> bool:
        """Run a failed, cancelled or expired task again (attempts start over)."""
        return await self.task_queue.requeue(task_id)

    async def size(self, queue_name: str = "default") -> int:
        return await self.task_queue.size(queue_name)

    async def events(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Stored events (after writing what is buffered); empty when events are off."""
        if self.event_log is None:
            return []
        await self.event_log.flush()
        return await self.event_log.storage.query(
            task_id=task_id, type=type, since=since, until=until, limit=limit
        )

    def worker(
        self,
        queues: Sequence[str] | str | None = None,
        concurrency: int | None = None,
        kind: str = "async",
        **options: Any,
    ) -> AsyncWorker:
        """A worker for this instance's queues; ``await worker.run()`` or ``async with``."""
        from ._worker import AsyncWorker

        return AsyncWorker(self, queues=queues, concurrency=concurrency, kind=kind, **options)

    def _bind_loop(self) -> None:
        if self.event_log is not None and self.event_log._loop is None:
            self.event_log.bind(asyncio.get_running_loop())

    async def close(self) -> None:
        if self.event_log is not None:
            await self.event_log.close()
            await self.event_log.storage.close()
        await self.result_storage.close()
        await self.task_queue.close()

    async def __aenter__(self) -> AsyncOmniQ:
        self._bind_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _call_args(call: Sequence[Any]) -> tuple[Any, ...]:
    if not isinstance(call, (tuple, list)):
        raise ConfigurationError(
            f"enqueue_many takes one tuple of positional arguments per task, got {call!r}"
        )
    return tuple(call)


class OmniQ:
    """The sync API, for scripts, web handlers and threads: ``with OmniQ() as omniq:``.

    Same arguments and method names as :class:`AsyncOmniQ`. Calls run on one
    private event loop thread per instance; embedded backends (SQLite, memory)
    enqueue directly in the caller's thread, which is faster than any hop.
    Safe to call from several threads and from code that runs its own loop.
    """

    def __init__(
        self,
        task_queue: TaskQueue | str | None = None,
        result_storage: ResultStorage | str | None = None,
        event_storage: EventStorage | str | None = None,
        **settings: Any,
    ) -> None:
        self._async = AsyncOmniQ(task_queue, result_storage, event_storage, **settings)
        self._bridge = LoopThread()

    @property
    def task_queue(self) -> TaskQueue:
        return self._async.task_queue

    @property
    def result_storage(self) -> ResultStorage:
        return self._async.result_storage

    @property
    def settings(self) -> Settings:
        return self._async.settings

    def enqueue(self, func: Callable[..., Any] | str, *args: Any, **options: Any) -> str:
        """Enqueue ``func(*args, **kwargs)``; see :meth:`AsyncOmniQ.enqueue`."""
        if options:
            task = self._async.build_task(func, *args, **options)
        else:  # the usual call, with one layer less: each costs on a cold cache
            task = self._async._plain_task(func, args)
        self._store([task])
        return task.id

    def enqueue_many(
        self, func: Callable[..., Any] | str, calls: Iterable[Sequence[Any]], **options: Any
    ) -> list[str]:
        """Enqueue ``func(*call)`` for each tuple in ``calls`` in one round trip."""
        tasks = self._async._build_tasks(func, calls, **options)
        self._store(tasks)
        return [task.id for task in tasks]

    def _store(self, tasks: Sequence[Task]) -> None:
        """Enqueue in this thread where the backend can (cheaper than a hop to the
        bridge loop and back), otherwise on the bridge loop."""
        queue = self._async.task_queue
        inserted = queue.enqueue_blocking(tasks) if queue.supports_blocking_put else None
        if inserted is None:
            inserted = self._bridge.run(queue.enqueue_many(tasks))
        log = self._async.event_log
        if log is None:
            return
        if log._loop is None:  # events are written on the bridge loop
            log.bind(self._bridge.loop)
        for task, new in zip(tasks, inserted, strict=False):
            if new:
                self._async._emit(EventType.ENQUEUED, task)

    def build_task(self, func: Callable[..., Any] | str, *args: Any, **options: Any) -> Task:
        """The task ``enqueue`` would store, not stored; see :meth:`AsyncOmniQ.build_task`."""
        return self._async.build_task(func, *args, **options)

    def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the task's result; see :meth:`AsyncOmniQ.get_result`."""
        return self._bridge.run(self._async.get_result(task_id, timeout))

    def get_task(self, task_id: str) -> Task | None:
        return self._bridge.run(self._async.get_task(task_id))

    def cancel(self, task_id: str) -> bool:
        return self._bridge.run(self._async.cancel(task_id))

    def failed_tasks(self, queue_name: str | None = None, limit: int = 100) -> list[Task]:
        return self._bridge.run(self._async.failed_tasks(queue_name, limit))

    def requeue(self, task_id: str) -> bool:
        return self._bridge.run(self._async.requeue(task_id))

    def size(self, queue_name: str = "default") -> int:
        return self._bridge.run(self._async.size(queue_name))

    def events(self, **filters: Any) -> list[Event]:
        return self._bridge.run(self._async.events(**filters))

    def worker(
        self,
        queues: Sequence[str] | str | None = None,
        concurrency: int | None = None,
        kind: str = "async",
        **options: Any,
    ) -> Worker:
        """A worker: ``with omniq.worker():`` runs it in the background, ``.run()`` blocks."""
        from ._worker import Worker

        return Worker(self._async.worker(queues, concurrency, kind, **options), self._bridge)

    def close(self) -> None:
        try:
            self._bridge.run(self._async.close())
        finally:
            self._bridge.close()

    def __enter__(self) -> OmniQ:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_ENQUEUE_OPTIONS = frozenset(
    {
        "queue_name",
        "priority",
        "eta",
        "delay",
        "ttl",
        "max_retries",
        "timeout",
        "result_ttl",
        "task_id",
    }
)
