"""Event log in a PostgreSQL table, next to the queue's tables or in any database."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .. import _postgres
from .._events import Event, EventType
from .base import EventStorage, event_from_row

#: Pruning is a range delete on the ``at`` index; once a minute keeps it off the append path.
PRUNE_INTERVAL_SECONDS = 60.0
_PRUNE_BATCH = 10_000


class PostgreSQLEventStorage(EventStorage):
    """Events in ``<schema>.events``, in append order (``seq``).

    ``retention_seconds`` (None: keep everything) deletes events older than
    that, checked at most once a minute during ``append``. Other options as
    for :class:`~omniq.queue.PostgreSQLTaskQueue`.
    """

    schemes = ("postgresql", "postgres")

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        retention_seconds: float | None = None,
        pool_size: int = _postgres.DEFAULT_POOL_SIZE,
        reconnect_timeout: float = _postgres.DEFAULT_RECONNECT_TIMEOUT,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        if retention_seconds is not None and retention_seconds <= 0:
            raise ValueError(f"retention_seconds must be positive or None, not {retention_seconds}")
        self.dsn, self.schema = _postgres.split_dsn(dsn, schema)
        self.retention_seconds = retention_seconds
        self._db = _postgres.Database(
            self.dsn,
            self.schema,
            pool_size=pool_size,
            reconnect_timeout=reconnect_timeout,
            connect_options=connect_options,
        )
        self._sql = _postgres.queries("events.sql", self.schema)
        self._next_prune = 0.0  # time.monotonic()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgreSQLEventStorage:
        return cls(url, **options)

    async def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        columns = (
            [e.task_id for e in events],
            [EventType(e.type).value for e in events],
            [e.at for e in events],
            [e.queue_name for e in events],
            [e.func for e in events],
            [e.attempts for e in events],
            [e.worker for e in events],
            [e.detail for e in events],
        )
        sql = self._sql["append"]
        await self._db.run(lambda conn: conn.execute(sql, *columns))
        if self.retention_seconds is not None and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
            prune, cutoff = self._sql["prune"], time.time() - self.retention_seconds
            await self._db.run(lambda conn: conn.execute(prune, cutoff, _PRUNE_BATCH))

    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        clauses: list[str] = []
        params: list[Any] = []
        for condition, value in (
            ("task_id = ${}", task_id),
            ("type = ${}", None if type is None else EventType(type).value),
            ("at >= ${}", since),
            ("at < ${}", until),
        ):
            if value is not None:
                params.append(value)
                clauses.append(condition.format(len(params)))
        sql = self._sql["select"]
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY seq"
        if limit is not None:
            params.append(max(limit, 0))
            sql += f" LIMIT ${len(params)}"
        records = await self._db.run(lambda conn: conn.fetch(sql, *params))
        return [event_from_row(record) for record in records]

    async def close(self) -> None:
        await self._db.close()
