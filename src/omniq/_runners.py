"""Where task functions run: on the event loop, or in worker threads.

Thread hand-offs are the cost that dominates a no-op task, so the thread
runner avoids one loop wake-up per task: jobs go to the threads through a
plain ``SimpleQueue``, and finished jobs are handed back in batches (one
``call_soon_threadsafe`` for however many completed meanwhile).
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


def is_async_callable(func: Callable[..., Any]) -> bool:
    """True for coroutine functions, including ``functools.partial`` and callables objects."""
    while hasattr(func, "func"):  # functools.partial
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


class ThreadRunner:
    """``size`` threads that run functions and hand results back to one event loop."""

    def __init__(self, size: int, name: str = "omniq-worker") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._done_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        self._local = threading.local()
        for thread in self._threads:
            thread.start()

    def run(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> asyncio.Future[Any]:
        """Queue a call; the returned future completes on the calling loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((func, args, kwargs, future))
        return future

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                loop = getattr(self._local, "loop", None)
                if loop is not None:
                    loop.close()
                return
            func, args, kwargs, future = job
            try:
                outcome: tuple[bool, Any] = (True, self._call(func, args, kwargs))
            except BaseException as exc:  # handed to the loop, which decides what it means
                outcome = (False, exc)
            with self._done_lock:
                self._done.append((future, *outcome))
                first = len(self._done) == 1
            if first and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # loop closed during shutdown
                    pass

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
        for future, ok, value in done:
            if future.done():
                continue  # cancelled by a timeout meanwhile
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def close(self) -> None:
        """Let the threads finish their current job and exit (does not wait)."""
        for _ in self._threads:
            self._jobs.put(None)
