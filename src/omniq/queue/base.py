"""The task queue contract: one async base class, small storage primitives below it.

``TaskQueue`` implements the public, task-level API once (encode, decode,
expiry, corrupt payloads, leases) over a handful of record-level primitives
that each backend provides. Backends store an opaque payload plus the fields
they order and filter on; they never see msgspec, HMAC or retry arithmetic.
The docstrings of the primitives are the specification a backend implements;
``omniq.testing`` is the suite that checks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from .._serialize import DEFAULT_SERIALIZER, Serializer
from .._task import Task, TaskStatus, new_task_id
from ._wakeup import Interrupt, retrieve_exception, wake

if TYPE_CHECKING:
    from ..results.base import ResultStorage

log = logging.getLogger("omniq.queue")

DEFAULT_LEASE_SECONDS = 30.0


class NewRow(NamedTuple):
    """A task as a backend stores it at enqueue."""

    id: str
    queue: str
    priority: int
    due_at: float
    payload: bytes


class StoredRow(NamedTuple):
    """A task as a backend returns it: the payload plus its mutable state."""

    id: str
    payload: bytes
    status: TaskStatus
    attempts: int
    due_at: float
    lease_id: str | None
    error: str | None


class LeaseRef(NamedTuple):
    """Which delivery of a task an operation is about: stale leases are refused."""

    id: str
    lease_id: str | None


#: Called by the queue for transitions only it sees: ``(task, status, reason)``
#: with status EXPIRED (dropped at claim time) or FAILED (undecodable payload).
Observer = Callable[[Task, TaskStatus, str], None]


class TaskQueue(ABC):
    """Async task queue. Constructors do no I/O; connections open on first use.

    Parameters common to every backend:

    ``queues``
        The queues ``dequeue()`` reads when none are given, in strict order.
    ``lease_seconds``
        The visibility timeout: a dequeued task not acked, nacked or extended
        within it is delivered again, with ``attempts`` raised.
    ``serializer``
        How payloads are encoded and signed (see :class:`omniq.Serializer`).
    """

    #: URL schemes that ``omniq`` maps to this class.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Tasks outlive the process that enqueued them.
    persistent: ClassVar[bool] = True
    #: ``_put_blocking`` is implemented: the sync facade may enqueue in the
    #: caller's thread (an embedded insert, or one round trip on a blocking
    #: socket, costs less than a hop to the facade's loop thread and back).
    supports_blocking_put: ClassVar[bool] = False

    def __init__(
        self,
        *,
        queues: Sequence[str] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        serializer: Serializer | None = None,
    ) -> None:
        self.queues: list[str] = list(queues) if queues else ["default"]
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.lease_seconds = lease_seconds
        self.serializer = serializer or DEFAULT_SERIALIZER
        self.observer: Observer | None = None

    # -- public API ------------------------------------------------------------
    async def enqueue(self, task: Task) -> str:
        """Store ``task``; idempotent by ``task.id`` (a known id adds nothing)."""
        await self._put([self._new_row(task)])
        return task.id

    async def enqueue_many(self, tasks: Sequence[Task]) -> list[bool]:
        """Store a batch in one round trip; True for each task that was new."""
        return await self._put([self._new_row(t) for t in tasks])

    def enqueue_blocking(self, tasks: Sequence[Task]) -> list[bool] | None:
        """``enqueue_many`` in the caller's thread; only when ``supports_blocking_put``.

        None when this call needs the event loop after all (nothing was stored):
        the caller then awaits ``enqueue_many`` instead.
        """
        return self._put_blocking([self._new_row(t) for t in tasks])

    async def dequeue(
        self, queues: Sequence[str] | None = None, timeout: float | None = None
    ) -> Task | None:
        """Lease the next due task from the first non-empty queue of ``queues``.

        Waits up to ``timeout`` seconds for one (None or 0: do not wait) and
        returns None when there is none.
        """
        tasks = await self.dequeue_many(1, queues, timeout)
        return tasks[0] if tasks else None

    async def dequeue_many(
        self,
        limit: int,
        queues: Sequence[str] | None = None,
        timeout: float | None = None,
        *,
        interrupt: asyncio.Event | None = None,
    ) -> list[Task]:
        """Lease up to ``limit`` tasks in one round trip, in delivery order.

        ``interrupt`` ends a wait early (returning ``[]``) when set; it never
        interrupts a claim, so no task is leased and then dropped.
        """
        names = list(queues) if queues else self.queues
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            since = self._wake_generation()
            lease_id = new_task_id()
            now = time.time()
            rows = await self._claim(names, limit, now, now + self.lease_seconds, lease_id)
            tasks = await self._usable(rows, now)
            if tasks:
                return tasks
            remaining = deadline - time.monotonic()
            if rows:
                continue  # everything claimed was expired or corrupt: look again at once
            if remaining <= 0 or (interrupt is not None and interrupt.is_set()):
                return []
            if interrupt is None:
                await self._wait(names, remaining, since)
            elif not await self._wait_unless(interrupt, names, remaining, since):
                return []

    async def _wait_unless(
        self, interrupt: asyncio.Event, names: Sequence[str], timeout: float, since: int
    ) -> bool:
        """``_wait`` unless ``interrupt`` is set first; False if interrupted."""
        if not isinstance(interrupt, Interrupt):
            waiting = asyncio.ensure_future(self._wait(names, timeout, since))
            interrupted = asyncio.ensure_future(interrupt.wait())
            await asyncio.wait({waiting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            for future in (waiting, interrupted):
                future.cancel()
            await asyncio.gather(waiting, interrupted, return_exceptions=True)
            return not interrupt.is_set()
        # One future woken by whichever comes first: no task watching the event, no
        # gather, so a wake-up reaches the claim after it in fewer loop turns.
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def wait_then_wake() -> None:
            # Waking ``first`` from the wait's own last step, not from a done
            # callback: that would cost one more loop turn.
            try:
                await self._wait(names, timeout, since)
            finally:
                wake(first)

        waiting = asyncio.ensure_future(wait_then_wake())
        forget = interrupt.on_set(lambda: wake(first))
        if interrupt.is_set():
            wake(first)
        try:
            await first
        finally:
            forget()
            if not waiting.done():
                waiting.cancel()  # it ends on its own; nothing it holds is lost by that
                waiting.add_done_callback(retrieve_exception)
        if not waiting.cancelled() and waiting.done():
            waiting.result()  # raises what the wait met (the engine is unreachable…)
        return not interrupt.is_set()

    async def ack(self, task: Task) -> bool:
        """Mark a leased task succeeded; False if its lease was lost meanwhile."""
        return (await self.ack_many([task]))[0]

    async def ack_many(self, tasks: Sequence[Task]) -> list[bool]:
        refs = [LeaseRef(t.id, t.lease_id) for t in tasks]
        return await self._finish(refs, TaskStatus.SUCCEEDED, None)

    async def nack(
        self, task: Task, *, error: str | None = None, retry_at: float | None = None
    ) -> bool:
        """Give a leased task back after a failure.

        With ``retry_at`` (a Unix time) it becomes due again then; without, it
        is kept as failed (dead letter), inspectable and re-queueable.
        """
        ref = LeaseRef(task.id, task.lease_id)
        if retry_at is None:
            return (await self._finish([ref], TaskStatus.FAILED, error))[0]
        return await self._retry(ref, retry_at, error)

    async def release(self, tasks: Sequence[Task]) -> None:
        """Return leased tasks that were never started; their attempt does not count."""
        if tasks:
            await self._release([LeaseRef(t.id, t.lease_id) for t in tasks])

    async def extend_lease(self, tasks: Sequence[Task]) -> list[bool]:
        """Heartbeat: renew leases for another ``lease_seconds``; False where lost."""
        if not tasks:
            return []
        refs = [LeaseRef(t.id, t.lease_id) for t in tasks]
        return await self._extend(refs, time.time() + self.lease_seconds)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a pending task so it never runs; False if it is not pending."""
        return await self._cancel(task_id)

    async def get_task(self, task_id: str) -> Task | None:
        row = await self._get(task_id)
        return None if row is None else self._decode(row)

    async def size(self, queue_name: str = "default") -> int:
        """Tasks waiting in ``queue_name``: due now or later, not running."""
        return await self._count(queue_name)

    async def failed_tasks(self, queue_name: str | None = None, limit: int = 100) -> list[Task]:
        """The dead letter: tasks that failed for good, oldest first."""
        rows = await self._list(TaskStatus.FAILED, queue_name, limit)
        return [self._decode(row) for row in rows]

    async def requeue(self, task_id: str) -> bool:
        """Put a failed, cancelled or expired task back as pending with attempts reset."""
        return await self._requeue(task_id, time.time())

    def default_result_storage(self) -> ResultStorage | None:
        """Where results go when none is configured: the queue's own engine if it
        has one (same file or server), else None (then results stay in memory)."""
        return None

    async def close(self) -> None:
        await self._close()

    async def __aenter__(self) -> TaskQueue:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- shared helpers ----------------------------------------------------------
    def _new_row(self, task: Task) -> NewRow:
        payload = self.serializer.encode_task(task)
        return NewRow(task.id, task.queue_name, task.priority, task.due_at, payload)

    def _decode_row(self, row: StoredRow) -> Task:
        """The stored task with its current state; ``ValueError`` if the payload is corrupt."""
        task = self.serializer.decode_task(row.payload)
        task.status, task.attempts, task.due_at = row.status, row.attempts, row.due_at
        task.lease_id, task.error = row.lease_id, row.error
        return task

    def _decode(self, row: StoredRow) -> Task:
        """Like ``_decode_row``, but a corrupt payload reads as a task with just its state."""
        try:
            return self._decode_row(row)
        except ValueError as exc:
            return Task(id=row.id, func="", status=row.status, error=row.error or str(exc))

    async def _usable(self, rows: Sequence[StoredRow], now: float) -> list[Task]:
        """Decode claimed rows; expired and corrupt ones are finished, not delivered."""
        tasks: list[Task] = []
        for row in rows:
            ref = LeaseRef(row.id, row.lease_id)
            try:
                task = self._decode_row(row)
            except ValueError as exc:
                reason = f"corrupt payload: {exc}"
                log.error("task %s moved to failed: %s", row.id, reason)
                await self._finish([ref], TaskStatus.FAILED, reason)
                self._observe(Task(id=row.id, func=""), TaskStatus.FAILED, reason)
                continue
            if task.expires_at is not None and task.expires_at <= now:
                await self._finish([ref], TaskStatus.EXPIRED, None)
                self._observe(task, TaskStatus.EXPIRED, "ttl passed before the task started")
                continue
            tasks.append(task)
        return tasks

    def _observe(self, task: Task, status: TaskStatus, reason: str) -> None:
        if self.observer is not None:
            self.observer(task, status, reason)

    # -- primitives each backend implements ----------------------------------------
    @abstractmethod
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        """Insert rows as pending, skipping ids that exist (in any state); True where inserted.

        All rows in one round trip; wakes waiting consumers of their queues.
        """

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool] | None:
        """``_put`` without an event loop, for backends with ``supports_blocking_put``;
        None, having stored nothing, where this call needs ``_put`` instead."""
        raise NotImplementedError

    @abstractmethod
    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        """Atomically lease up to ``limit`` due tasks, in delivery order.

        Order: ``queues`` strictly in list order; within a queue, higher
        priority first, then enqueue order. Before choosing, running tasks whose
        lease ended before ``now`` become pending again. Each claimed row gets
        status RUNNING, ``attempts + 1``, ``lease_id`` and ``lease_until``, and
        is returned with those values.
        """

    def _wake_generation(self) -> int:
        """A token taken before a claim; ``_wait`` returns at once if work arrived since."""
        return 0

    @abstractmethod
    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        """Return when work may be claimable in ``queues``, or after ``timeout``.

        Spurious returns are allowed; a missed wake-up is not: a task made due
        by enqueue, retry, eta or lease expiry after ``since`` (a
        ``_wake_generation`` token) must end the wait by its time.
        """

    @abstractmethod
    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        """Set a final status on tasks whose lease matches (``lease_id`` None: any state)."""

    @abstractmethod
    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        """Make a leased task pending again, due at ``due_at``, keeping its attempts."""

    @abstractmethod
    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        """Make leased tasks pending again with the claim's attempt taken back."""

    @abstractmethod
    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        """Move the lease end of tasks still leased under ``lease_id``."""

    @abstractmethod
    async def _cancel(self, task_id: str) -> bool:
        """Pending → cancelled; False for any other state or unknown id."""

    @abstractmethod
    async def _get(self, task_id: str) -> StoredRow | None: ...

    @abstractmethod
    async def _count(self, queue: str) -> int:
        """Pending tasks in ``queue``, due or not."""

    @abstractmethod
    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        """Tasks in ``status`` (optionally of one queue), oldest first."""

    @abstractmethod
    async def _requeue(self, task_id: str, now: float) -> bool:
        """A final, non-succeeded task → pending, due ``now``, attempts 0, error cleared."""

    async def _close(self) -> None:
        """Release connections; the instance may be used again (it reconnects)."""
