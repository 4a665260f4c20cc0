"""Workers: take tasks, run them, record the outcome.

The life of one task, in named steps: claim (in batches, leased) → resolve the
function → run it (with its timeout) → record the result → ack, or retry with
backoff, or fail into the dead letter → emit events. Results and acks of
tasks that finish close together are written in one batch each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from ._bridge import LoopThread
from ._errors import ConfigurationError
from ._events import EventType
from ._funcs import resolve
from ._retry import backoff_delay
from ._runners import Job, ThreadRunner, is_async_callable
from ._task import Task
from .queue._wakeup import Interrupt
from .results.base import TaskResult

if TYPE_CHECKING:
    from ._client import AsyncOmniQ

log = logging.getLogger("omniq.worker")

KINDS = ("async", "thread")
DEFAULT_CONCURRENCY = 8
DEFAULT_SHUTDOWN_GRACE = 30.0
_FLUSH_WINDOW = 0.001
_FETCH_WAIT = 5.0  # longest single dequeue wait; stop() interrupts it anyway


class AsyncWorker:
    """Runs tasks from ``queues`` (strict order) on the current event loop.

    ``kind="async"`` awaits coroutine functions on the loop, ``concurrency``
    at a time, and runs sync functions in a pool of ``concurrency`` threads;
    ``kind="thread"`` runs every task in the thread pool (coroutines on a
    per-thread loop). ``prefetch`` tasks beyond ``concurrency`` are claimed
    ahead so a fast queue never waits on a round trip; they are given back
    unstarted on shutdown. Leases of everything held are renewed every third
    of the lease time.
    """

    def __init__(
        self,
        omniq: AsyncOmniQ,
        *,
        queues: Sequence[str] | str | None = None,
        concurrency: int | None = None,
        kind: str = "async",
        prefetch: int | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        name: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ConfigurationError(
                f"worker kind {kind!r} is not available; choose one of {', '.join(KINDS)}"
            )
        if isinstance(queues, str):
            queues = [q.strip() for q in queues.split(",") if q.strip()]
        self.omniq = omniq
        self.queue = omniq.task_queue
        self.queues = list(queues) if queues else list(self.queue.queues)
        self.concurrency = DEFAULT_CONCURRENCY if concurrency is None else concurrency
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        self.kind = kind
        # Like Celery's prefetch multiplier of 4: batches big enough to amortize a claim.
        self.prefetch = 4 * self.concurrency if prefetch is None else prefetch
        self.shutdown_grace = shutdown_grace
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        #: Tasks that succeeded, failed for good, and failed attempts retried.
        self.processed = 0
        self.failed = 0
        self.retried = 0
        self._stop_requested = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: Interrupt | None = None
        #: The main loop waits for held tasks to be done with (room to claim more),
        #: or for the end of a burst: what it waits for must wake it (``_wake``).
        self._waiting_for_room = False
        self._burst = False
        self._dispatch_due = False  # a _dispatch is scheduled on the loop
        self._held: dict[str, Task] = {}  # leased by us: running or waiting to start
        self._waiting: deque[Task] = deque()  # prefetched, not started
        self._active: dict[str, Task] = {}  # running now
        self._coroutines: dict[str, asyncio.Task[None]] = {}  # the async ones among them
        self._background: set[asyncio.Task[None]] = set()  # flushes, failure handling
        self._completions: list[tuple[Task, TaskResult | None]] = []
        self._flushing = False
        self._idle: asyncio.Event | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}  # timeouts of tasks in threads
        self._backoff = _Backoff()  # between failed claims
        self._runner: ThreadRunner | None = None

    # -- control ------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop taking work and finish what it runs (thread-safe)."""
        self._stop_requested.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    async def run(self, burst: bool = False) -> None:
        """Work until ``stop()`` (or, with ``burst``, until the queues are empty)."""
        self._loop = asyncio.get_running_loop()
        self._wake = Interrupt()  # ends a claim's wait without a task watching it
        self._runner = ThreadRunner(self.concurrency, name=f"omniq-{self.kind}")
        self.omniq._bind_loop()
        heartbeat = asyncio.ensure_future(self._heartbeat())
        try:
            await self._work(burst)
        finally:
            heartbeat.cancel()
            await self._shutdown()
            self._runner.close()
            self._runner = None

    async def __aenter__(self) -> AsyncWorker:
        self._run_task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        await self._run_task

    # -- the loop -----------------------------------------------------------------
    async def _work(self, burst: bool) -> None:
        self._burst = burst
        while not self._stop_requested.is_set():
            self._start_waiting()
            capacity = self.concurrency + self.prefetch
            room = capacity - len(self._held)
            if room <= 0 or (self._waiting and room < capacity // 2):
                # Claim in batches of at least half the capacity: one round trip
                # feeds many tasks, while enough are waiting to keep slots busy.
                await self._wait_for_change()
                continue
            try:
                tasks = await self._claim(room, burst)
            except Exception:
                # The engine is unreachable or failing: keep what we hold, retry.
                delay = self._backoff.next()
                log.exception("could not claim tasks; retrying in %.1f s", delay)
                await self._pause(delay)
                continue
            if tasks is None:
                return  # burst: the queues are empty
            self._backoff.reset()
            idle = not self._active
            for task in tasks:
                self._held[task.id] = task
                self._waiting.append(task)
            if idle and tasks and not self._stop_requested.is_set():
                # The worker waited for these: start them now, and let a thread
                # that runs one have the GIL before the loop claims again.
                self._start_waiting()
                if self._runner is not None:
                    self._runner.hand_over()

    async def _claim(self, room: int, burst: bool) -> list[Task] | None:
        """Up to ``room`` tasks (waiting for some); None when a burst is over."""
        tasks: list[Task] = []
        if burst and not self._held:
            # A claim first: it also takes back tasks whose lease expired
            # (a dead worker's), which size() does not count as waiting.
            tasks = await self.queue.dequeue_many(room, self.queues, 0)
            if not tasks and self._background:
                # Failures being recorded may put a task back for a retry.
                await asyncio.wait(set(self._background))
                return []
            if not tasks and not await self._has_pending():
                return None
        return tasks or await self._fetch(room)

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless stop is requested meanwhile."""
        assert self._wake is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _fetch(self, room: int) -> list[Task]:
        """Claim up to ``room`` tasks, waiting for work until a task of ours
        finishes (there may be room to start one) or stop is requested."""
        assert self._wake is not None
        tasks = await self.queue.dequeue_many(room, self.queues, _FETCH_WAIT, interrupt=self._wake)
        self._wake.clear()
        return tasks

    async def _has_pending(self) -> bool:
        """Burst mode: is a task still waiting (maybe due later: eta, retry) in our queues?"""
        for name in self.queues:
            if await self.queue.size(name):
                return True
        return False

    async def _wait_for_change(self) -> None:
        assert self._wake is not None
        self._waiting_for_room = True
        try:
            await self._wake.wait()
        finally:
            self._waiting_for_room = False
        self._wake.clear()

    # -- one task: start → run → done -------------------------------------------------
    def _start_waiting(self) -> None:
        # Up to 2x concurrency are dispatched: the extra ones wait in the thread
        # runner's queue, so threads stay busy while the loop records outcomes.
        while self._waiting and len(self._active) < 2 * self.concurrency:
            task = self._waiting[0]
            try:
                func = resolve(task.func)
            except ImportError as exc:
                self._waiting.popleft()
                self._held.pop(task.id, None)
                self._spawn(self._failed(task, exc))
                continue
            on_loop = self.kind == "async" and is_async_callable(func)
            if on_loop and len(self._coroutines) >= self.concurrency:
                return
            self._waiting.popleft()
            self._active[task.id] = task
            if on_loop:
                self.omniq._emit(EventType.STARTED, task)
                self._coroutines[task.id] = self._spawn(self._run_coroutine(task, func))
            else:
                self._submit(task, func)

    def _submit(self, task: Task, func: Any) -> None:
        """Sync work goes to the threads with a plain callback: no asyncio task or
        future per task, the cost that dominates short tasks."""
        assert self._runner is not None and self._loop is not None
        loop = self._loop

        def on_start() -> None:  # in the worker thread, as the task starts
            self.omniq._emit(EventType.STARTED, task)
            if task.timeout is not None:
                loop.call_soon_threadsafe(self._arm_timeout, task)

        def done(ok: bool, value: Any) -> None:
            timer = self._timers.pop(task.id, None)
            if timer is not None:
                timer.cancel()
            self._done(task, ok, value)

        self._runner.submit(Job(func, task.args, task.kwargs, done, on_start, tag=task))

    def _arm_timeout(self, task: Task) -> None:
        if self._active.get(task.id) is task and task.timeout is not None:
            assert self._loop is not None
            self._timers[task.id] = self._loop.call_later(task.timeout, self._timed_out, task)

    async def _run_coroutine(self, task: Task, func: Any) -> None:
        try:
            value = await asyncio.wait_for(func(*task.args, **task.kwargs), task.timeout)
        except asyncio.TimeoutError:
            self._done(task, False, _timeout_error(task))
        except Exception as exc:
            self._done(task, False, exc)
        else:
            self._done(task, True, value)
        finally:
            self._coroutines.pop(task.id, None)

    def _timed_out(self, task: Task) -> None:
        # The thread cannot be stopped; its late outcome is ignored (see _done).
        self._done(task, False, _timeout_error(task))

    def _done(self, task: Task, ok: bool, value: Any) -> None:
        if self._active.get(task.id) is not task:
            return  # already finished (timed out), or given up at shutdown
        del self._active[task.id]  # still held (leased) until its outcome is recorded
        if ok:
            self._succeeded(task, value)
        else:
            self._spawn(self._failed(task, value))
        if self._waiting and not self._dispatch_due:
            # A slot is free: the next prefetched tasks start after this batch of
            # outcomes (one dispatch for all; starting one per outcome wakes a
            # thread in the middle of the batch, which halves a drain's rate).
            self._dispatch_due = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        self._room_changed()
        if not self._active and self._idle is not None:
            self._idle.set()

    def _dispatch(self) -> None:
        self._dispatch_due = False
        if not self._stop_requested.is_set():
            self._start_waiting()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        job: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        return job

    # -- outcomes --------------------------------------------------------------------
    def _succeeded(self, task: Task, value: Any) -> None:
        result = None
        if self.omniq.settings.store_results:
            try:
                encoded = self.omniq.serializer.encode_value(value)
            except TypeError as exc:
                self._spawn(self._failed(task, exc))
                return
            result = TaskResult(
                task_id=task.id, succeeded=True, value=encoded, finished_at=time.time()
            )
        self.processed += 1
        self._completions.append((task, result))
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush_completions())

    async def _flush_completions(self) -> None:
        """Write results, then acks, for every task that finished since the last flush.

        A failed write is retried with backoff (the tasks stay held, so their
        leases are renewed meanwhile); at shutdown it is given up after the
        grace period and the tasks are delivered again once their leases end.
        """
        backoff, gave_up_at = _Backoff(), time.monotonic() + self.shutdown_grace
        try:
            while self._completions:
                if self._active and len(self._completions) < self.concurrency + self.prefetch:
                    # More tasks are about to finish: one write for all of them
                    # costs less than one each (at most 1 ms of result latency).
                    await asyncio.sleep(_FLUSH_WINDOW)
                batch, self._completions = self._completions, []
                try:
                    await self._record_successes(batch)
                except Exception:
                    self._completions = batch + self._completions
                    if self._stop_requested.is_set() and time.monotonic() > gave_up_at:
                        log.error("giving up recording %d results at shutdown", len(batch))
                        return
                    delay = backoff.next()
                    log.exception(
                        "could not record %d results; retrying in %.1f s", len(batch), delay
                    )
                    await asyncio.sleep(delay)
        finally:
            self._flushing = False

    async def _record_successes(self, batch: list[tuple[Task, TaskResult | None]]) -> None:
        results = [(r, t.result_ttl) for t, r in batch if r is not None]
        if results:
            await self.omniq.result_storage.set_many(results)
        acked = await self.queue.ack_many([t for t, _ in batch])
        for (task, _), ok in zip(batch, acked, strict=True):
            self._held.pop(task.id, None)
            self.omniq._emit(EventType.SUCCEEDED if ok else EventType.LEASE_LOST, task)
        self._room_changed()

    async def _failed(self, task: Task, exc: BaseException) -> None:
        try:
            await self._record_failure(task, exc)
        except Exception:
            # Its lease ends and it is delivered again: nothing is lost.
            log.exception("could not record the failure of task %s", task.id)
        finally:
            self._held.pop(task.id, None)
            self._room_changed()

    def _room_changed(self) -> None:
        """A task is done with: wake the main loop if it waits for that (room to claim,
        the end of a burst). A claim waiting for work is left alone: it has room
        already, and interrupting it would cost a claim round trip for nothing."""
        if self._wake is not None and (self._waiting_for_room or self._burst):
            self._wake.set()

    async def _record_failure(self, task: Task, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        retryable = not isinstance(exc, ImportError) and task.attempts <= task.max_retries
        if retryable:
            settings = self.omniq.settings
            delay = backoff_delay(task.attempts, settings.retry_backoff, settings.retry_backoff_max)
            if await self.queue.nack(task, error=error, retry_at=time.time() + delay):
                self.retried += 1
                self.omniq._emit(EventType.RETRYING, task, f"{error} (retry in {delay:.3g} s)")
            return
        self.failed += 1
        log.warning("task %s (%s) failed: %s", task.id, task.func, error)
        result = TaskResult(
            task_id=task.id,
            succeeded=False,
            exc_type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            finished_at=time.time(),
        )
        await self.omniq.result_storage.set_many([(result, task.result_ttl)])
        if await self.queue.nack(task, error=error):
            self.omniq._emit(EventType.FAILED, task, error)

    # -- leases and shutdown ---------------------------------------------------------
    async def _heartbeat(self) -> None:
        interval = self.queue.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._held.values())
            if not held:
                continue
            try:
                extended = await self.queue.extend_lease(held)
            except Exception:
                log.exception("lease heartbeat failed; will retry")
                continue
            for task, ok in zip(held, extended, strict=False):
                if not ok and task.id in self._held:
                    log.warning("lease of task %s was lost; another worker may run it", task.id)
                    self.omniq._emit(EventType.LEASE_LOST, task)

    async def _shutdown(self) -> None:
        """Give back unstarted tasks, let running ones finish within the grace period."""
        waiting, self._waiting = list(self._waiting), deque()
        if self._runner is not None:
            for task in self._runner.drain():  # dispatched to threads, never started
                self._active.pop(task.id, None)
                waiting.append(task)
        for task in waiting:
            self._held.pop(task.id, None)
        await self.queue.release(waiting)
        if self._active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), self.shutdown_grace)
            except asyncio.TimeoutError:
                log.warning(
                    "%d tasks still running after %s s; their leases will expire and they "
                    "will be delivered again",
                    len(self._active),
                    self.shutdown_grace,
                )
                for job in list(self._coroutines.values()):
                    job.cancel()
                self._active.clear()
        while self._background:  # failures being recorded, the last flush
            await asyncio.wait(set(self._background))
        if self.omniq.event_log is not None:
            await self.omniq.event_log.flush()


class Worker:
    """The sync face of a worker, running it on the ``OmniQ`` instance's bridge loop.

    ``with omniq.worker():`` works in the background for the block's duration;
    ``run()`` blocks (``burst=True`` returns once the queues are empty) and
    stops gracefully on SIGINT/SIGTERM when called from the main thread.
    """

    def __init__(self, worker: AsyncWorker, bridge: LoopThread) -> None:
        self._worker = worker
        self._bridge = bridge
        self._future: Any = None

    @property
    def queues(self) -> list[str]:
        return self._worker.queues

    @property
    def concurrency(self) -> int:
        return self._worker.concurrency

    @property
    def kind(self) -> str:
        return self._worker.kind

    @property
    def processed(self) -> int:
        """Tasks that succeeded."""
        return self._worker.processed

    @property
    def failed(self) -> int:
        """Tasks that failed for good (after their retries)."""
        return self._worker.failed

    @property
    def retried(self) -> int:
        """Failed attempts that were scheduled to run again."""
        return self._worker.retried

    def stop(self) -> None:
        self._worker.stop()

    def run(self, burst: bool = False) -> None:
        restore = _install_signal_handlers(self._worker.stop)
        try:
            future = self._bridge.submit(self._worker.run(burst))
            while True:
                try:
                    future.result(timeout=0.5)  # wake regularly so signal handlers run
                    return
                except concurrent.futures.TimeoutError:
                    continue
        finally:
            restore()

    def __enter__(self) -> Worker:
        self._future = self._bridge.submit(self._worker.run())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._worker.stop()
        self._future.result()


class _Backoff:
    """Delays between retries of a failing engine call: 0.1 s doubling up to 5 s."""

    def __init__(self) -> None:
        self._delay = 0.05

    def next(self) -> float:
        self._delay = min(self._delay * 2, 5.0)
        return self._delay

    def reset(self) -> None:
        self._delay = 0.05


def _timeout_error(task: Task) -> TimeoutError:
    return TimeoutError(f"task exceeded its timeout of {task.timeout} s")


def _install_signal_handlers(stop: Any) -> Any:
    """SIGINT/SIGTERM → graceful stop; a second signal stops at once. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    received = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        log.info("received %s: finishing running tasks", signal.Signals(signum).name)
        stop()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
