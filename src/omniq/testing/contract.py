"""The task queue contract (DESIGN §3) as tests, run against every backend.

A backend is done when it passes all of this. Subclass ``TaskQueueContract``
and provide a ``make_queue`` fixture: a factory ``make_queue(**options)``
whose calls within one test return instances on the *same* storage (a new
connection to the same database, bucket or server namespace), isolated from
other tests. Capability flags on the queue class (``persistent``) decide
which tests apply, never the backend's name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from .. import AsyncOmniQ, EventType, Serializer, Task, TaskFailedError, TaskStatus
from .._errors import SerializationError
from .._task import new_task_id
from ..queue._wakeup import Interrupt
from ..queue.base import TaskQueue

MakeQueue = Callable[..., TaskQueue]
DEADLINE = 10.0


def make_task(queue_name: str = "default", priority: int = 0, **fields: Any) -> Task:
    now = time.time()
    fields.setdefault("due_at", now)
    return Task(
        id=fields.pop("id", new_task_id()),
        func=fields.pop("func", "omniq.testing.contract:echo"),
        args=fields.pop("args", ()),
        queue_name=queue_name,
        priority=priority,
        enqueued_at=now,
        **fields,
    )


# -- task functions the worker tests run (importable by path) ----------------------
def echo(value: Any = None) -> Any:
    return value


def boom(message: str = "boom") -> None:
    raise ValueError(message)


async def async_double(value: int) -> int:
    await asyncio.sleep(0)
    return value * 2


async def until_deadline(predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class TaskQueueContract:
    """Semantics every queue backend guarantees. Override ``make_queue``."""

    @pytest.fixture
    def make_queue(self) -> MakeQueue:
        raise NotImplementedError("provide a make_queue fixture for your backend")

    @pytest.fixture
    async def queue(self, make_queue: MakeQueue) -> Any:
        queue = make_queue()
        yield queue
        await queue.close()

    # 1. named queues and strict queue-list order ---------------------------------------
    async def test_named_queues_are_isolated(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task("a"))
        assert await queue.dequeue(["b"]) is None
        assert await queue.size("a") == 1
        assert await queue.size("b") == 0
        task = await queue.dequeue(["a"])
        assert task is not None and task.queue_name == "a"

    async def test_queue_list_order_is_strict(self, queue: TaskQueue) -> None:
        low = [make_task("low", priority=100) for _ in range(2)]
        high = [make_task("high") for _ in range(2)]
        await queue.enqueue_many(low + high)
        order = [await queue.dequeue(["high", "low"]) for _ in range(4)]
        assert [t.id for t in order if t] == [t.id for t in high + low]

    async def test_dequeue_defaults_to_the_instance_queues(self, make_queue: MakeQueue) -> None:
        queue = make_queue(queues=["x", "y"])
        try:
            await queue.enqueue(make_task("y"))
            task = await queue.dequeue()
            assert task is not None and task.queue_name == "y"
        finally:
            await queue.close()

    # 2. priority, then FIFO --------------------------------------------------------------
    async def test_priority_then_fifo(self, queue: TaskQueue) -> None:
        tasks = [make_task(priority=p) for p in (0, 5, 0, 10, 5, -3, 10)]
        for task in tasks:
            await queue.enqueue(task)
        expected = sorted(range(len(tasks)), key=lambda i: (-tasks[i].priority, i))
        got = await queue.dequeue_many(len(tasks))
        assert [t.id for t in got] == [tasks[i].id for i in expected]

    async def test_batch_claims_respect_order_across_queues(self, queue: TaskQueue) -> None:
        a = [make_task("a", priority=p) for p in (1, 3)]
        b = [make_task("b", priority=9)]
        await queue.enqueue_many(b + a)
        got = await queue.dequeue_many(10, ["a", "b"])
        assert [t.id for t in got] == [a[1].id, a[0].id, b[0].id]

    # 3. due time -----------------------------------------------------------------------
    async def test_eta_is_not_delivered_before_it(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task(due_at=time.time() + 3600))
        assert await queue.dequeue() is None
        assert await queue.size("default") == 1

    async def test_eta_is_delivered_once_due_without_polling_by_caller(
        self, queue: TaskQueue
    ) -> None:
        due = time.time() + 0.3
        await queue.enqueue(make_task(due_at=due))
        task = await queue.dequeue(timeout=DEADLINE)
        assert task is not None
        assert time.time() >= due
        assert task.eta is not None

    async def test_waiting_dequeue_wakes_for_new_task(self, queue: TaskQueue) -> None:
        waiter = asyncio.ensure_future(queue.dequeue(timeout=DEADLINE))
        await asyncio.sleep(0.05)  # let the waiter block first (order only, not timing)
        task = make_task()
        await queue.enqueue(task)
        got = await waiter
        assert got is not None and got.id == task.id

    @pytest.mark.parametrize("event", [Interrupt, asyncio.Event])
    async def test_an_interrupted_wait_returns_nothing_and_loses_nothing(
        self, queue: TaskQueue, event: Callable[[], asyncio.Event]
    ) -> None:
        # A worker interrupts its claim's wait whenever a task of its own ends.
        interrupt = event()
        waiter = asyncio.ensure_future(queue.dequeue_many(5, timeout=60, interrupt=interrupt))
        await asyncio.sleep(0.05)  # let the waiter block first (order only, not timing)
        interrupt.set()
        assert await asyncio.wait_for(waiter, DEADLINE) == []
        task = make_task()
        await queue.enqueue(task)
        got = await queue.dequeue_many(5, timeout=DEADLINE, interrupt=event())
        assert [t.id for t in got] == [task.id]

    # 4. leases, ack, redelivery ----------------------------------------------------------
    async def test_a_task_goes_to_exactly_one_consumer(self, make_queue: MakeQueue) -> None:
        first, second = make_queue(), make_queue()
        try:
            tasks = [make_task() for _ in range(20)]
            await first.enqueue_many(tasks)
            got = await asyncio.gather(*(q.dequeue_many(3) for q in (first, second) * 4))
            ids = [t.id for batch in got for t in batch]
            assert len(ids) == len(set(ids)) == 20
            assert await first.dequeue() is None and await second.dequeue() is None
        finally:
            await first.close()
            await second.close()

    async def test_ack_completes(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task())
        task = await queue.dequeue()
        assert task is not None and task.status is TaskStatus.RUNNING and task.attempts == 1
        assert await queue.ack(task)
        stored = await queue.get_task(task.id)
        assert stored is not None and stored.status is TaskStatus.SUCCEEDED
        assert await queue.dequeue() is None
        assert not await queue.ack(task)  # only once

    async def test_expired_lease_is_redelivered_with_attempts_raised(
        self, make_queue: MakeQueue
    ) -> None:
        queue = make_queue(lease_seconds=0.2)
        try:
            await queue.enqueue(make_task())
            first = await queue.dequeue()
            assert first is not None
            assert await queue.dequeue() is None  # leased: not delivered twice
            again = await queue.dequeue(timeout=DEADLINE)
            assert again is not None and again.id == first.id
            assert again.attempts == 2
            assert not await queue.ack(first)  # the stale lease cannot complete it
            assert await queue.ack(again)
        finally:
            await queue.close()

    async def test_heartbeat_keeps_the_lease(self, make_queue: MakeQueue) -> None:
        queue = make_queue(lease_seconds=0.3)
        try:
            await queue.enqueue(make_task())
            task = await queue.dequeue()
            assert task is not None
            for _ in range(4):  # outlive the original lease several times over
                assert await queue.extend_lease([task]) == [True]
                assert await queue.dequeue(timeout=0.1) is None
            assert await queue.ack(task)
        finally:
            await queue.close()

    async def test_release_gives_back_without_counting_an_attempt(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task())
        task = await queue.dequeue()
        assert task is not None
        await queue.release([task])
        again = await queue.dequeue()
        assert again is not None and again.id == task.id and again.attempts == 1

    async def test_nack_with_retry_at_redelivers_later(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task())
        task = await queue.dequeue()
        assert task is not None
        retry_at = time.time() + 0.2
        assert await queue.nack(task, error="ValueError: x", retry_at=retry_at)
        assert await queue.dequeue() is None
        again = await queue.dequeue(timeout=DEADLINE)
        assert again is not None and again.attempts == 2 and time.time() >= retry_at
        assert again.error == "ValueError: x"

    async def test_nack_without_retry_is_dead_letter(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task())
        task = await queue.dequeue()
        assert task is not None
        assert await queue.nack(task, error="ValueError: bad")
        [failed] = await queue.failed_tasks()
        assert failed.id == task.id and failed.status is TaskStatus.FAILED
        assert failed.error == "ValueError: bad"
        assert await queue.requeue(task.id)
        again = await queue.dequeue()
        assert again is not None and again.id == task.id and again.attempts == 1

    # 6. TTL ------------------------------------------------------------------------------
    async def test_expired_task_is_dropped_not_delivered(self, queue: TaskQueue) -> None:
        seen: list[tuple[str, TaskStatus]] = []
        queue.observer = lambda task, status, reason: seen.append((task.id, status))
        task = make_task(expires_at=time.time() + 0.05)
        await queue.enqueue(task)
        ttl_end = time.time() + 0.06
        await until_deadline(_async(lambda: time.time() > ttl_end), "the ttl to pass")
        assert await queue.dequeue() is None
        stored = await queue.get_task(task.id)
        assert stored is not None and stored.status is TaskStatus.EXPIRED
        assert seen == [(task.id, TaskStatus.EXPIRED)]

    # 7. cancel ---------------------------------------------------------------------------
    async def test_cancelled_task_never_runs(self, queue: TaskQueue) -> None:
        task = make_task()
        await queue.enqueue(task)
        assert await queue.cancel(task.id)
        assert await queue.dequeue() is None
        stored = await queue.get_task(task.id)
        assert stored is not None and stored.status is TaskStatus.CANCELLED
        assert not await queue.cancel(task.id)

    async def test_running_task_cannot_be_cancelled(self, queue: TaskQueue) -> None:
        await queue.enqueue(make_task())
        task = await queue.dequeue()
        assert task is not None
        assert not await queue.cancel(task.id)
        assert not await queue.cancel("no-such-task")

    # idempotency and batches ---------------------------------------------------------------
    async def test_enqueue_is_idempotent_by_id(self, queue: TaskQueue) -> None:
        task = make_task()
        assert await queue.enqueue(task) == task.id
        assert await queue.enqueue(make_task(id=task.id, args=("other",))) == task.id
        assert await queue.size("default") == 1
        got = await queue.dequeue()
        assert got is not None and got.args == ()

    async def test_enqueue_many_reports_new_and_known_ids(self, queue: TaskQueue) -> None:
        known = make_task()
        await queue.enqueue(known)
        batch = [make_task(), make_task(id=known.id), make_task()]
        assert await queue.enqueue_many(batch) == [True, False, True]
        assert await queue.size("default") == 3

    async def test_task_round_trips_every_field(self, queue: TaskQueue) -> None:
        task = make_task(
            "q1", 7, args=(1, "two", [3.0], {"k": None}, b"\x00"), kwargs={"x": 1},
            max_retries=3, timeout=2.5, result_ttl=60.0,
        )  # fmt: skip
        await queue.enqueue(task)
        got = await queue.dequeue(["q1"])
        assert got is not None
        for field in ("id", "func", "args", "kwargs", "queue_name", "priority", "max_retries"):
            assert getattr(got, field) == getattr(task, field), field
        assert (got.timeout, got.result_ttl) == (2.5, 60.0)

    # 8. persistence ------------------------------------------------------------------------
    async def test_tasks_survive_the_instance(self, make_queue: MakeQueue) -> None:
        first = make_queue()
        if not first.persistent:
            pytest.skip("backend is not persistent by design")
        task = make_task()
        await first.enqueue(task)
        await first.close()
        second = make_queue()
        try:
            got = await second.dequeue()
            assert got is not None and got.id == task.id
        finally:
            await second.close()

    # 9. bad input -----------------------------------------------------------------------------
    async def test_unencodable_argument_is_refused_and_nothing_stored(
        self, queue: TaskQueue
    ) -> None:
        with pytest.raises(SerializationError, match="not serializable"):
            await queue.enqueue(make_task(args=(object(),)))
        assert await queue.size("default") == 0

    async def test_corrupt_task_moves_to_failed_with_reason(self, queue: TaskQueue) -> None:
        queue.serializer = Serializer(secret_key="writer-key")
        bad = make_task()
        await queue.enqueue(bad)
        queue.serializer = Serializer(secret_key="reader-key")  # every payload now fails to verify
        good = make_task()
        await queue.enqueue(good)
        got = await queue.dequeue()
        assert got is not None and got.id == good.id
        [failed] = await queue.failed_tasks()
        assert failed.id == bad.id and failed.error and "signature" in failed.error


def _async(predicate: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return predicate()

    return check


class OmniQContract:
    """Worker-level semantics (retries, results, events, bad functions) on each backend."""

    @pytest.fixture
    def make_queue(self) -> MakeQueue:
        raise NotImplementedError("provide a make_queue fixture for your backend")

    @pytest.fixture
    async def omniq(self, make_queue: MakeQueue) -> Any:
        async with AsyncOmniQ(
            make_queue(), "memory://", "memory://", retry_backoff=0.01, retry_backoff_max=0.05
        ) as omniq:
            yield omniq

    async def test_results_of_sync_and_async_functions(self, omniq: AsyncOmniQ) -> None:
        sync_id = await omniq.enqueue(echo, {"a": [1, 2]})
        async_id = await omniq.enqueue(async_double, 21)
        await omniq.worker(concurrency=2).run(burst=True)
        assert await omniq.get_result(sync_id, timeout=DEADLINE) == {"a": [1, 2]}
        assert await omniq.get_result(async_id, timeout=DEADLINE) == 42
        task = await omniq.get_task(sync_id)
        assert task is not None and task.status is TaskStatus.SUCCEEDED

    async def test_retries_with_backoff_then_dead_letter(self, omniq: AsyncOmniQ) -> None:
        task_id = await omniq.enqueue(boom, "always", max_retries=2)
        await omniq.worker().run(burst=True)
        with pytest.raises(TaskFailedError) as failure:
            await omniq.get_result(task_id, timeout=DEADLINE)
        assert failure.value.exc_type == "ValueError"
        assert failure.value.message == "always"
        assert failure.value.traceback and "boom" in failure.value.traceback
        task = await omniq.get_task(task_id)
        assert task is not None and task.status is TaskStatus.FAILED and task.attempts == 3
        assert [t.id for t in await omniq.failed_tasks()] == [task_id]
        types = [e.type for e in await omniq.events(task_id=task_id)]
        assert types.count(EventType.RETRYING) == 2 and types[-1] is EventType.FAILED

    async def test_requeued_dead_letter_runs_again(self, omniq: AsyncOmniQ) -> None:
        task_id = await omniq.enqueue(boom)
        await omniq.worker().run(burst=True)
        assert await omniq.requeue(task_id)
        task = await omniq.get_task(task_id)
        assert task is not None and task.status is TaskStatus.PENDING and task.attempts == 0

    async def test_unresolvable_function_fails_that_task_only(self, omniq: AsyncOmniQ) -> None:
        bad_id = await omniq.enqueue("no_such_module_xyz:func", max_retries=5)
        good_id = await omniq.enqueue(echo, "fine")
        await omniq.worker().run(burst=True)
        assert await omniq.get_result(good_id, timeout=DEADLINE) == "fine"
        with pytest.raises(TaskFailedError) as failure:
            await omniq.get_result(bad_id, timeout=DEADLINE)
        assert failure.value.exc_type == "ModuleNotFoundError"
        task = await omniq.get_task(bad_id)
        assert task is not None and task.attempts == 1  # an import error is not retried

    async def test_lifecycle_events(self, omniq: AsyncOmniQ) -> None:
        done = await omniq.enqueue(echo, 1)
        cancelled = await omniq.enqueue(echo, 2, delay=3600)
        expired = await omniq.enqueue(echo, 3, ttl=0.01, queue_name="late")
        ttl_end = time.time() + 0.01
        assert await omniq.cancel(cancelled)
        await until_deadline(_async(lambda: time.time() > ttl_end), "the ttl to pass")
        await omniq.worker(queues=["default", "late"]).run(burst=True)
        kinds = {
            tid: [e.type for e in await omniq.events(task_id=tid)]
            for tid in (done, cancelled, expired)
        }
        assert kinds[done] == [EventType.ENQUEUED, EventType.STARTED, EventType.SUCCEEDED]
        assert kinds[cancelled] == [EventType.ENQUEUED, EventType.CANCELLED]
        assert kinds[expired] == [EventType.ENQUEUED, EventType.EXPIRED]
        expired_task = await omniq.get_task(expired)
        assert expired_task is not None and expired_task.status is TaskStatus.EXPIRED

    async def test_timeout_fails_a_slow_task(self, omniq: AsyncOmniQ) -> None:
        task_id = await omniq.enqueue(asyncio_sleep_forever, timeout=0.05)
        await omniq.worker().run(burst=True)
        with pytest.raises(TaskFailedError) as failure:
            await omniq.get_result(task_id, timeout=DEADLINE)
        assert failure.value.exc_type == "TimeoutError"


async def asyncio_sleep_forever() -> None:
    await asyncio.Event().wait()
