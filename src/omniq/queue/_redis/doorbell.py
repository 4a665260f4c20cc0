"""The doorbell idle consumers wait on: one BLPOP per list of wake-up keys and
event loop, however many coroutines wait, so that the idle consumers of one
loop cost the server one blocked connection. A wake-up may carry the claim of
the tasks it announces (``Ahead``), saving a round trip."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._wakeup import retrieve_exception, wake
from .connection import MAX_BLOCK, MIN_BLOCK, raise_swallowed_cancel

if TYPE_CHECKING:
    from .connection import LoopClient, RedisConnector
    from .link import Link

log = logging.getLogger("omniq.redis")

#: Builds the claim a wake-up carries (see ``Doorbell.ahead``).
Ahead = Callable[[], tuple[bytes, Callable[[Any], None]]]


class Doorbell:
    """Blocking on wake-up lists (BLPOP), shared by every waiter on one loop.

    One BLPOP at a time per list of keys and loop, however many coroutines
    wait. A waiter that gives up (timeout, cancel) never cancels the Redis call,
    since cancelling a blocking command costs its connection; a token that
    arrives when nobody waits any more is pushed back for other consumers.
    A connection error wakes every waiter: their next claim retries with
    backoff until the server is back.

    With ``ahead`` set (one list, and a ``Link``), a wake-up carries a claim:
    the bell moves the token into its own list (``token_key``) with BLMOVE and
    sends the claim right behind it, which the server runs as soon as the token
    arrives; ``ahead``'s second half takes the claimed tasks before the waiters
    wake. No round trip between the wake-up and the claim.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self._waiters: dict[asyncio.Future[None], float] = {}
        self._task: asyncio.Task[None] | None = None
        #: The bell's own connection for its BLPOP (with ``Link`` support).
        self.link: Link | None = None
        #: Returns the packed claim to send behind a wake-up, and what takes its reply.
        self.ahead: Ahead | None = None
        #: This consumer's token list, ``K:wt:<consumer>``, where a wake-up moves its token.
        self.token_key: str | None = None

    async def wait(self, entry: LoopClient, connector: RedisConnector, timeout: float) -> None:
        """Until a token arrives (or an error), at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters[future] = loop.time() + timeout
        if self._task is None:
            self._task = loop.create_task(self._listen(entry, connector))
            entry.tasks.add(self._task)
        # A timer rather than asyncio.wait: a ring reaches this coroutine in one loop turn.
        timer = loop.call_later(timeout, wake, future)
        try:
            await future  # raises what the listener met
        finally:
            timer.cancel()
            self._waiters.pop(future, None)

    def _ring(self, error: BaseException | None = None) -> None:
        """Wake every waiter; they stop counting as waiting at once."""
        waiters, self._waiters = self._waiters, {}
        for future in waiters:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def _listen(self, entry: LoopClient, connector: RedisConnector) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                block = max(self._waiters.values()) - loop.time()
                block = min(max(block, MIN_BLOCK), MAX_BLOCK)
                try:
                    # BLPOP on a connection of the bell's own: with a Link, a wake-up
                    # costs a third of the CPU it costs through redis-py's pool.
                    link = self.link
                    if connector._linked and (link is None or link.closed):
                        link = self.link = await connector.connect_link()
                    if link is not None and self.ahead is not None and len(self.keys) == 1:
                        reply = await self._wake_and_claim(connector, link, block)
                        if reply is not None and not self._waiters:
                            continue  # the claim took the token: nothing to hand back
                    else:
                        command = ("BLPOP", *self.keys, block)
                        reply = await connector.blocking_command(entry, link, *command)
                except connector.retryable:
                    self._ring()
                    return
                except connector.error as exc:
                    self._ring(exc)
                    return
                raise_swallowed_cancel()
                if reply is None:
                    continue
                if self._waiters:
                    self._ring()
                else:
                    await self._hand_back(entry, connector, reply)
        finally:
            self._task = None
            self._ring()  # nobody sleeps on a listener that is gone
            task = asyncio.current_task()
            if task is not None:
                entry.tasks.discard(task)
            if entry.closed and self.link is not None:
                self.link.close()  # in case the shutdown closed the others before

    async def _wake_and_claim(self, connector: RedisConnector, link: Link, block: float) -> Any:
        """BLMOVE a token into our list, and the claim right behind it; the token
        (None: timed out). The claim's reply goes to ``ahead``'s taker."""
        assert self.ahead is not None and self.token_key is not None and connector._pack
        claim, take = self.ahead()
        wait = ("BLMOVE", self.keys[0], self.token_key, "LEFT", "LEFT", block)
        moved = link.request(connector._pack(wait))
        claimed = link.request(claim)
        try:
            token = await moved
        except BaseException:
            claimed.add_done_callback(retrieve_exception)  # fails or lands with the connection
            raise
        try:
            take(await claimed)
        except connector.retryable:
            raise
        except connector.error as exc:  # NOSCRIPT after a restart: the waiters claim
            log.debug("the claim of a wake-up failed: %s", exc)
            if token is not None:  # give the token back to the queue's list
                back = ("LMOVE", self.token_key, self.keys[0], "LEFT", "LEFT")
                await link.request(connector._pack(back))
        return token

    async def _hand_back(
        self, entry: LoopClient, connector: RedisConnector, reply: Sequence[Any]
    ) -> None:
        try:
            await connector.blocking_command(entry, self.link, "LPUSH", reply[0], reply[1])
        except connector.error as exc:
            log.debug("could not hand a wake-up token back: %s", exc)
