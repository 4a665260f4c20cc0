"""Running sync functions in worker threads, cheaply.

A thread hand-off costs more than a no-op task, so the runner avoids one
event-loop wake-up per task: jobs reach the threads through a plain
``SimpleQueue`` (a backlog keeps threads busy while the loop writes results),
and finished jobs come back in batches, one ``call_soon_threadsafe`` for
however many completed meanwhile. An idle worker hands its next task over
(``ThreadRunner.hand_over``): the loop steps aside from the GIL until a thread
has the job, instead of making it wait out the loop's next claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Called on the loop thread with (ok, value-or-exception) when a job ends.
Callback = Callable[[bool, Any], None]


@dataclass(slots=True)
class Job:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    callback: Callback
    #: Called in the thread just before ``func`` runs.
    on_start: Callable[[], None] | None = None
    #: What the submitter wants back from ``drain`` if the job never starts.
    tag: Any = None


def is_async_callable(func: Callable[..., Any]) -> bool:
    """True for coroutine functions, including ``functools.partial`` and callables objects.

    Cached for plain functions (what tasks name): ``inspect`` costs microseconds,
    and workers ask once per task. Partials and bound methods are made afresh.
    """
    if not inspect.isfunction(func):
        return _is_async(func)
    known = _async_functions.get(func)
    if known is None:
        known = _async_functions[func] = _is_async(func)
    return known


def _is_async(func: Callable[..., Any]) -> bool:
    while hasattr(func, "func"):  # functools.partial
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


_async_functions: dict[Callable[..., Any], bool] = {}

#: Longest the loop parks in ``ThreadRunner.hand_over`` (seconds).
HAND_OVER = 0.0005


class ThreadRunner:
    """``size`` threads that run jobs and hand outcomes back to one event loop."""

    def __init__(self, size: int, name: str = "omniq-worker") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: list[tuple[Callback, bool, Any]] = []
        self._done_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        self._local = threading.local()
        #: Set while the loop parks in ``hand_over``; the thread taking a job releases it.
        self._gate: threading.Lock | None = None
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; its callback runs on the submitting loop when it ends."""
        self._loop = asyncio.get_running_loop()
        self._jobs.put(job)

    def hand_over(self) -> None:
        """Park the calling (loop) thread until a thread has taken a queued job, at
        most ``HAND_OVER`` seconds; for a worker that was idle, so its next task
        starts at once.

        A thread woken for a job needs the GIL, which the loop holds through
        its next few hundred microseconds of work (claiming again, writing);
        parked on a lock, the loop lets the thread have it. Not for a busy
        worker: parking on every dispatch costs a drain a fifth of its rate.
        """
        gate = threading.Lock()
        gate.acquire()
        self._gate = gate
        if not self._jobs.empty():  # else a thread took it already
            gate.acquire(timeout=HAND_OVER)
        self._gate = None

    def drain(self) -> list[Any]:
        """Take back the jobs no thread has started; returns their tags."""
        tags: list[Any] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return tags
            if job is not None:
                tags.append(job.tag)

    def close(self) -> None:
        """Let the threads finish their current job and exit (does not wait)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            gate = self._gate
            if gate is not None and gate.locked():
                with contextlib.suppress(RuntimeError):  # another thread was first
                    gate.release()
            if job.on_start is not None:
                job.on_start()
            try:
                outcome = (job.callback, True, self._call(job.func, job.args, job.kwargs))
            except BaseException as exc:  # handed to the loop, which decides what it means
                outcome = (job.callback, False, exc)
            with self._done_lock:
                self._done.append(outcome)
                first = len(self._done) == 1
            if first and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # loop closed during shutdown
                    pass
        loop = getattr(self._local, "loop", None)
        if loop is not None:
            loop.close()

    def _call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not is_async_callable(func):
            return func(*args, **kwargs)
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop.run_until_complete(func(*args, **kwargs))

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for callback, ok, value in done:
            callback(ok, value)
