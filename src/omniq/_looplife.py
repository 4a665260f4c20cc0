"""Per-loop resources (connections, pools) that close when their event loop shuts down.

A driver's connection belongs to the event loop that opened it, and OmniQ components
keep one per loop (the sync facade's bridge loop, a test's loop, ``asyncio.run`` in a
thread). A loop that ends without the component being closed would leave them open,
and too late to say goodbye once the loop is closed. ``asyncio.run`` and
``asyncio.Runner`` finalize async generators (``shutdown_asyncgens``) while the loop
can still run: a generator started on the loop, whose ``finally`` closes the resource,
is the cue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class ClosedWithLoop:
    """Subclasses implement ``_shutdown`` (idempotent) and call ``_close_with_loop``
    once, on their loop; ``close`` closes them earlier."""

    _lifetime: AsyncIterator[None] | None = None
    _lifetime_loop: asyncio.AbstractEventLoop | None = None

    async def _close_with_loop(self) -> None:
        lifetime = self._live()
        # The first step registers the generator with the running loop.
        await lifetime.__anext__()
        self._lifetime, self._lifetime_loop = lifetime, asyncio.get_running_loop()

    async def _live(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self._lifetime = None  # this generator is ending: close() must not aclose() it
            await self._shutdown()

    async def close(self) -> None:
        """Close now (the loop's shutdown then has nothing left to do)."""
        lifetime, self._lifetime = self._lifetime, None
        if lifetime is not None and _running_loop() is self._lifetime_loop:
            await lifetime.aclose()  # type: ignore[attr-defined]
        await self._shutdown()

    async def _shutdown(self) -> None:
        raise NotImplementedError


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
