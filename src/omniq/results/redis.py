"""Result storage on Redis: one key per result with its ttl, waited for with a blocking read."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from ..queue._redis import MAX_BLOCK, RedisConnector, RedisSettings, load_script, redis_settings
from .base import ResultStorage, TaskResult

_SET = load_script("results_set", header=False)
#: How long a waiter's mark (``K:rw:<id>``) lives; renewed on every blocking
#: round, so it outlives any waiter that still blocks.
_WAITING_MS = int(4 * MAX_BLOCK * 1000)
#: How long a result stays in its hand-over list (``K:rl:<id>``) for waiters.
_LATCH_MS = 60_000

_decoder = msgspec.msgpack.Decoder(TaskResult)
_pack = msgspec.msgpack.encode


class RedisResultStorage(ResultStorage):
    """Results as msgpack strings under ``{prefix}:r:<task id>``, expiring with their ttl.

    Same arguments as :class:`omniq.queue.redis.RedisTaskQueue`: ``host``,
    ``port``, ``db``, ``password``, ``ssl`` or ``url``, and ``prefix``. By
    default ``OmniQ("redis://…")`` keeps results on the queue's server.

    ``wait`` does not poll. A waiter marks that it waits, looks, and then
    blocks on the server (``BLMOVE`` of a list onto itself); ``set_many``, in
    the same script that stores a result, puts it in that list when someone is
    marked as waiting, which releases every blocked waiter at once.
    """

    schemes = ("redis", "rediss")

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        *,
        db: int = 0,
        password: str | None = None,
        ssl: bool = False,
        url: str | None = None,
        prefix: str = "omniq",
        username: str | None = None,
        retry_timeout: float = 30.0,
    ) -> None:
        settings, url_prefix = redis_settings(
            host, port, db=db, username=username, password=password, ssl=ssl, url=url
        )
        self._setup(settings, url_prefix or prefix, retry_timeout)

    def _setup(self, settings: RedisSettings, prefix: str, retry_timeout: float) -> None:
        self.prefix = prefix
        self._conn = RedisConnector(settings, retry_timeout=retry_timeout)
        self._k = "{" + prefix + "}"

    @classmethod
    def _for(cls, settings: RedisSettings, prefix: str, retry_timeout: float) -> RedisResultStorage:
        storage = cls.__new__(cls)
        storage._setup(settings, prefix, retry_timeout)
        return storage

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisResultStorage:
        return cls(url=url, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._conn.settings)!r}, prefix={self.prefix!r})"

    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        if not results:
            return
        meta = _pack(
            [(r.task_id, -1 if ttl is None else max(1, int(ttl * 1000))) for r, ttl in results]
        )
        args = [self._k, _LATCH_MS, meta, *(_pack(result) for result, _ in results)]
        await self._conn.eval(_SET, (), args)

    async def get(self, task_id: str) -> TaskResult | None:
        [payload] = await self._conn.pipeline(("GET", f"{self._k}:r:{task_id}"))
        return None if payload is None else _decoder.decode(payload)

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Mark, look, then block until ``set_many`` hands the result over (or ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting, latch = f"{self._k}:rw:{task_id}", f"{self._k}:rl:{task_id}"
        while True:
            await self._conn.pipeline(("SET", waiting, 1, "PX", _WAITING_MS))
            # The mark is set before this look: a result stored after the look
            # finds it and fills the latch, so the block below cannot miss it.
            result = await self.get(task_id)
            if result is not None:
                return result
            remaining = MAX_BLOCK if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Redis reads a timeout that rounds to 0 ms as "block forever".
            block = min(max(remaining, 0.01), MAX_BLOCK)
            payload = await self._conn.blocking("BLMOVE", latch, latch, "LEFT", "LEFT", block)
            if payload is not None:
                return _decoder.decode(payload)

    async def delete(self, task_id: str) -> None:
        await self._conn.pipeline(("DEL", f"{self._k}:r:{task_id}", f"{self._k}:rl:{task_id}"))

    async def close(self) -> None:
        await self._conn.close()
