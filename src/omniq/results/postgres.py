"""Result storage in PostgreSQL: one row per task, woken by LISTEN/NOTIFY."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .. import _postgres
from .base import ResultStorage, TaskResult

if TYPE_CHECKING:
    from asyncpg import Connection

#: Expired rows are invisible to ``get`` already; deleting them only bounds the
#: table, so it is done at most this often (seconds) per instance.
_PRUNE_EVERY = 60.0
_PRUNE_BATCH = 10_000
#: A notification's payload must stay under 8000 bytes.
_NOTIFY_MAX = 7900

_decoder = msgspec.msgpack.Decoder(TaskResult)


class PostgreSQLResultStorage(ResultStorage):
    """Results as msgpack in ``<schema>.results``, keyed by task id.

    ``set_many`` is one statement that also notifies ``<schema>.results`` with
    the task ids, so ``wait`` (and ``get_result``) sleeps on a LISTEN
    connection until its result arrives instead of polling. Expiry uses the
    server's clock. Options as for :class:`~omniq.queue.PostgreSQLTaskQueue`.
    """

    schemes = ("postgresql", "postgres")

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        pool_size: int = _postgres.DEFAULT_POOL_SIZE,
        reconnect_timeout: float = _postgres.DEFAULT_RECONNECT_TIMEOUT,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        self.dsn, self.schema = _postgres.split_dsn(dsn, schema)
        self._db = _postgres.Database(
            self.dsn,
            self.schema,
            pool_size=pool_size,
            reconnect_timeout=reconnect_timeout,
            connect_options=connect_options,
        )
        self._sql = _postgres.queries("results.sql", self.schema)
        self._channel = f"{self.schema}.results"
        self._next_prune = 0.0  # time.monotonic()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgreSQLResultStorage:
        return cls(url, **options)

    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        if not results:
            return
        latest = {result.task_id: (result, ttl) for result, ttl in results}  # last one wins
        ids = list(latest)
        payloads = [msgspec.msgpack.encode(result) for result, _ in latest.values()]
        ttls = [ttl for _, ttl in latest.values()]
        joined = ",".join(ids)
        names = joined if len(joined) <= _NOTIFY_MAX else ""  # "": look again, all of you
        insert, upsert = self._sql["insert_many"], self._sql["set_many"]
        exists = self._db.asyncpg.UniqueViolationError

        async def store(conn: Connection) -> None:
            try:
                await conn.fetchval(insert, ids, payloads, ttls, names)
            except exists:  # a result is there already (a task run again): replace it
                await conn.fetchval(upsert, ids, payloads, ttls)

        await self._db.run(store)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + _PRUNE_EVERY
            prune = self._sql["prune"]
            await self._db.run(lambda conn: conn.execute(prune, _PRUNE_BATCH))

    async def get(self, task_id: str) -> TaskResult | None:
        sql = self._sql["get"]
        payload = await self._db.run(lambda conn: conn.fetchval(sql, task_id))
        return None if payload is None else _decoder.decode(payload)

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Look, then sleep until a notification names ``task_id``, until found or timed out."""
        listener = await self._db.listener(self._channel)

        def names_it(payload: str) -> bool:
            return not payload or task_id in payload.split(",")

        async def sleep(seconds: float, since: int) -> None:
            await listener.wait(seconds, since, names_it)

        return await self._wait_notified(task_id, timeout, lambda: listener.generation, sleep)

    async def delete(self, task_id: str) -> None:
        sql = self._sql["delete"]
        await self._db.run(lambda conn: conn.execute(sql, task_id))

    async def close(self) -> None:
        await self._db.close()
