"""Buffering events between the core and the event storage.

``emit`` only appends to a buffer (any thread); a background task on the
owner's event loop writes batches, so a slow or remote storage never adds
latency to a task. ``flush`` drains the buffer (on shutdown, and in tests).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ._events import Event
from .events.base import EventStorage

log = logging.getLogger("omniq.events")

_BATCH_DELAY = 0.05  # gather events for up to 50 ms before a write
_MAX_BUFFER = 100_000  # beyond this, drop the oldest rather than grow without bound


class EventLog:
    def __init__(self, storage: EventStorage) -> None:
        self.storage = storage
        self._buffer: list[Event] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._writing = asyncio.Lock()
        self._tasks: set[asyncio.Future[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that writes batches (the owner's loop)."""
        self._loop = loop

    def emit(self, event: Event) -> None:
        with self._lock:
            self._buffer.append(event)
            if len(self._buffer) > _MAX_BUFFER:
                del self._buffer[: len(self._buffer) - _MAX_BUFFER]
            if self._flush_scheduled or self._loop is None:
                return
            self._flush_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._schedule_flush)
        except RuntimeError:  # loop closed: the final flush in close() writes the rest
            pass

    def _schedule_flush(self) -> None:
        if self._loop is None:  # closed meanwhile; close() wrote the buffer
            with self._lock:
                self._flush_scheduled = False
            return
        self._timer = self._loop.call_later(_BATCH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._tasks.add(task)  # keep a reference until done (the loop holds only weak ones)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        async with self._writing:
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._flush_scheduled = False
            if not batch:
                return
            try:
                await self.storage.append(batch)
            except Exception:
                log.exception("could not write %d events; they are dropped", len(batch))

    async def close(self) -> None:
        """Write what is buffered, after the writes already started, and stop
        scheduling: no write is left pending when the owner's loop ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        self._loop = None  # a later emit buffers until the owner binds a loop again
