"""Worker behaviour beyond the contract: leases while running, shutdown, kinds, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from omniq import (
    AsyncOmniQ,
    ConfigurationError,
    EventType,
    TaskFailedError,
    TaskStatus,
    _eventlog,
    _runners,
)
from omniq._runners import Job, ThreadRunner
from omniq.events import MemoryEventStorage
from omniq.queue import MemoryTaskQueue
from omniq.results.memory import MemoryResultStorage

DEADLINE = 10.0
gate = threading.Event()
running_now = 0
running_peak = 0
_count_lock = threading.Lock()


def wait_for_gate(value: Any = None) -> Any:
    gate.wait(DEADLINE)
    return value


def count_concurrency() -> None:
    global running_now, running_peak
    with _count_lock:
        running_now += 1
        running_peak = max(running_peak, running_now)
    time.sleep(0.01)  # overlap with the others: the point is to observe concurrency
    with _count_lock:
        running_now -= 1


def sleepy_sync(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


async def thread_name() -> str:
    return threading.current_thread().name


@pytest.fixture(autouse=True)
def reset() -> None:
    global running_now, running_peak
    gate.clear()
    running_now = running_peak = 0


async def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_heartbeat_keeps_a_long_task_leased() -> None:
    queue = MemoryTaskQueue(lease_seconds=0.3)
    async with AsyncOmniQ(queue, "memory://") as omniq:
        task_id = await omniq.enqueue(sleepy_sync, 1.0)  # three leases long
        await omniq.worker(concurrency=2).run(burst=True)
        assert await omniq.get_result(task_id, timeout=DEADLINE) == "done"
        task = await omniq.get_task(task_id)
        assert task is not None and task.attempts == 1  # never redelivered


async def test_shutdown_finishes_running_and_releases_prefetched() -> None:
    async with AsyncOmniQ("memory://", "memory://") as omniq:
        first = await omniq.enqueue(wait_for_gate, "first")
        rest = [await omniq.enqueue(wait_for_gate, i) for i in range(5)]
        worker = omniq.worker(concurrency=1, prefetch=5)
        async with worker:
            await until(lambda: worker._held and len(worker._held) == 6, "the prefetch")
            worker.stop()
            gate.set()  # the running task may now finish, within the grace period
        assert await omniq.get_result(first, timeout=DEADLINE) == "first"
        pending = [await omniq.get_task(task_id) for task_id in rest]
        # One more may have started before stop(); the others were given back unstarted.
        given_back = [t for t in pending if t is not None and t.status is TaskStatus.PENDING]
        assert len(given_back) >= 4
        assert all(t.attempts == 0 for t in given_back)


async def test_concurrency_is_a_limit() -> None:
    async with AsyncOmniQ("memory://", "memory://") as omniq:
        await omniq.enqueue_many(count_concurrency, [()] * 40)
        await omniq.worker(concurrency=3).run(burst=True)
        assert running_peak <= 3
        assert running_peak >= 2  # and it is used


async def test_sync_task_timeout_fails_it() -> None:
    async with AsyncOmniQ("memory://", "memory://") as omniq:
        task_id = await omniq.enqueue(wait_for_gate, timeout=0.05)
        await omniq.worker().run(burst=True)
        gate.set()
        with pytest.raises(TaskFailedError) as failure:
            await omniq.get_result(task_id, timeout=DEADLINE)
        assert failure.value.exc_type == "TimeoutError"


async def test_thread_kind_runs_coroutines_in_threads() -> None:
    async with AsyncOmniQ("memory://", "memory://") as omniq:
        task_id = await omniq.enqueue(thread_name)
        await omniq.worker(kind="thread").run(burst=True)
        assert (await omniq.get_result(task_id, timeout=DEADLINE)).startswith("omniq-thread")


async def test_async_kind_runs_coroutines_on_the_loop() -> None:
    async with AsyncOmniQ("memory://", "memory://") as omniq:
        task_id = await omniq.enqueue(thread_name)
        await omniq.worker(kind="async").run(burst=True)
        assert await omniq.get_result(task_id, timeout=DEADLINE) == threading.current_thread().name


async def test_unknown_kind_and_bad_concurrency_are_refused() -> None:
    async with AsyncOmniQ("memory://", "memory://") as omniq:
        with pytest.raises(ConfigurationError, match="process"):
            omniq.worker(kind="process")
        with pytest.raises(ConfigurationError, match="concurrency"):
            omniq.worker(concurrency=0)


async def test_lost_lease_is_reported() -> None:
    queue = MemoryTaskQueue(lease_seconds=0.2)
    async with AsyncOmniQ(queue, "memory://", "memory://") as omniq:
        task_id = await omniq.enqueue(wait_for_gate)
        worker = omniq.worker(concurrency=1)
        async with worker:
            await until(lambda: bool(worker._active), "the task to start")
            # Another consumer takes the task over as if our heartbeat had stopped.
            stolen = None
            while stolen is None:
                queue._tasks[task_id].lease_until = 0.0
                stolen = await queue.dequeue()
            gate.set()
            worker.stop()
        types = [e.type for e in await omniq.events(task_id=task_id)]
        assert EventType.LEASE_LOST in types
        assert await queue.ack(stolen)


class FlakyQueue(MemoryTaskQueue):
    """Claims fail the first ``failures`` times, as during an engine outage."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def _claim(self, *args: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("engine unreachable")
        return await super()._claim(*args)


class FlakyResults(MemoryResultStorage):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def set_many(self, results: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("engine unreachable")
        await super().set_many(results)


async def test_worker_rides_out_failing_claims_and_result_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = FlakyQueue(failures=0)
    async with AsyncOmniQ(queue, FlakyResults(failures=2)) as omniq:
        ids = [await omniq.enqueue("omniq.testing.contract:echo", i) for i in range(5)]
        queue.failures = 3
        await omniq.worker().run(burst=True)
        assert [await omniq.get_result(i, timeout=DEADLINE) for i in ids] == list(range(5))
        for task_id in ids:
            task = await omniq.get_task(task_id)
            assert task is not None and task.status is TaskStatus.SUCCEEDED
            assert task.attempts == 1  # held and renewed meanwhile, never redelivered
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not claim" in m for m in messages)
    assert any("could not record" in m for m in messages)


# -- the hand-over of a task to a thread ----------------------------------------------------
def ignore(ok: bool, value: Any) -> None:
    pass


@pytest.mark.timeout(20)
async def test_hand_over_parks_until_a_thread_took_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runners, "HAND_OVER", 3600.0)  # only the pick-up can end the park
    runner = ThreadRunner(1)
    try:
        runner.submit(Job(wait_for_gate, (), {}, ignore))
        runner.hand_over()
        assert runner._jobs.empty()
    finally:
        gate.set()
        runner.close()


async def test_hand_over_is_bounded_when_every_thread_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_runners, "HAND_OVER", 0.01)
    runner = ThreadRunner(1)
    started = threading.Event()
    try:
        runner.submit(Job(wait_for_gate, (), {}, ignore, on_start=started.set))
        assert started.wait(DEADLINE)
        runner.submit(Job(wait_for_gate, (), {}, ignore))
        runner.hand_over()  # nobody can take it: the park ends by its bound
        assert not runner._jobs.empty()
    finally:
        gate.set()
        runner.close()


async def test_an_idle_worker_hands_a_claimed_task_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that waited for work parks for the task that came; one with a
    task running does not (parking on every dispatch would slow a drain)."""
    parks: list[int] = []
    original = ThreadRunner.hand_over

    def counted(self: ThreadRunner) -> None:
        parks.append(self._jobs.qsize())
        original(self)

    monkeypatch.setattr(ThreadRunner, "hand_over", counted)
    async with AsyncOmniQ("memory://") as omniq, omniq.worker(concurrency=2):
        blocking = await omniq.enqueue(wait_for_gate, "first")
        await until(lambda: len(parks) == 1, "the first task's hand-over")
        second = await omniq.enqueue(sleepy_sync, 0)
        assert await omniq.get_result(second, timeout=DEADLINE) == "done"
        assert len(parks) == 1  # the first one was still running
        gate.set()
        assert await omniq.get_result(blocking, timeout=DEADLINE) == "first"


# -- events at close -------------------------------------------------------------------------
class RecordingEvents(MemoryEventStorage):
    """Counts writes, and whether one came after close."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.late_writes = 0

    async def append(self, events: Any) -> None:
        if self.closed:
            self.late_writes += 1
        await super().append(events)

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def test_close_leaves_no_event_write_scheduled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing right after an event was emitted writes it, and leaves no write
    scheduled for later (a task the loop would end with, pending)."""
    monkeypatch.setattr(_eventlog, "_BATCH_DELAY", 0.0)  # the scheduled write is due at once
    events = RecordingEvents()
    omniq = AsyncOmniQ("memory://", event_storage=events)
    async with omniq:
        await omniq.enqueue(sleepy_sync, 0)  # emits ENQUEUED: a write is scheduled
    assert len(await events.query()) == 1  # written by close
    for _ in range(5):  # the loop turns in which a scheduled write would start and run
        await asyncio.sleep(0)
        writes = [t for t in asyncio.all_tasks() if "EventLog.flush" in repr(t.get_coro())]
        assert writes == []
    assert events.late_writes == 0
