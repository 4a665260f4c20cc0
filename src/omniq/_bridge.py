"""The sync facade's bridge: one event loop in one daemon thread, per ``OmniQ`` instance."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """Runs coroutines on a private event loop from any thread, blocking the caller.

    Started on first use and kept for the instance's life, so connections
    opened by backends stay on one loop (never ``asyncio.run`` per call). A
    caller that has its own running loop is only blocked, not deadlocked: the
    work happens on this thread's loop.
    """

    def __init__(self, name: str = "omniq-bridge") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            with self._lock:
                if self._loop is None:
                    self._start()
                loop = self._loop
        assert loop is not None
        return loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name=self._name, daemon=True)
        self._thread.start()
        started.wait()
        self._loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the bridge loop and return its result in this thread."""
        loop = self.loop
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "the sync OmniQ API was called from a coroutine running on its own event loop; "
                "use AsyncOmniQ (await its methods) inside async tasks"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the bridge loop without waiting; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Stop the loop after pending callbacks and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
