"""Waking waiters on any event loop or thread when new work may be there."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class Interrupt(asyncio.Event):
    """An ``asyncio.Event`` that also calls back whoever registered with ``on_set``.

    A worker's wake-up event: ``dequeue_many(interrupt=...)`` stops its wait
    when it is set without a task of its own watching the event (each task
    costs loop turns between a wake-up and the claim that follows it).
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], object]] = []

    def set(self) -> None:
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` (once) at the next ``set``; returns what unregisters it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None


class Wakeup:
    """A thread-safe broadcast: ``await wait(timeout)`` returns when ``notify()`` is called.

    Waiters may sit on different event loops (the sync facade's bridge loop, a
    worker thread's loop, the user's loop); ``notify`` reaches each on its own
    loop. A notify with no waiters costs one uncontended lock, so producers can
    call it on every enqueue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        #: Counts notifies; a waiter passes the value it saw before looking for
        #: work, so a notify that came in between is not lost.
        self.generation = 0

    async def wait(self, timeout: float | None, since: int | None = None) -> bool:
        """Wait for a ``notify`` after generation ``since`` (default: from now on).

        True if notified, False on timeout.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if since is not None and since != self.generation:
                return True
            self._waiters.append(entry)
        # The future itself is awaited, and a timer resolves it on timeout: a
        # notify then resumes the waiter in one loop turn (asyncio.wait and
        # wait_for take more, and wait_for on 3.11 can swallow a cancel).
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            if not future.done():
                timed_out = True
                future.set_result(None)

        timer = None if timeout is None else loop.call_later(max(timeout, 0.0), time_out)
        try:
            await future
            return not timed_out
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def notify(self) -> None:
        with self._lock:
            self.generation += 1
            if not self._waiters:
                return
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if loop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                wake(future)
            else:
                try:
                    loop.call_soon_threadsafe(wake, future)
                except RuntimeError:  # the loop closed between the check and the call
                    pass


def wake(future: asyncio.Future[None]) -> None:
    """Resolve a waiter's future, unless it is already done (woken, cancelled, timed out)."""
    if not future.done():
        future.set_result(None)


def retrieve_exception(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (nobody awaits it any more)."""
    if not future.cancelled():
        future.exception()
