"""Event log on a Redis Stream, trimmed to a bound as it grows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .._events import Event, EventType
from ..queue._redis import RedisConnector, redis_settings
from .base import EventStorage

#: Entries read per XRANGE while answering a query.
_PAGE = 1000


class RedisEventStorage(EventStorage):
    """Events in the stream ``{prefix}:events``, in append order.

    Same connection arguments as :class:`omniq.queue.redis.RedisTaskQueue`
    (``host``, ``port``, ``db``, ``password``, ``ssl`` or ``url``, ``prefix``).
    Each event is one entry whose fields are the event's (``task_id``,
    ``type``, ``at``, …), readable with ``XRANGE`` from ``redis-cli``.

    Retention: ``maxlen`` (default 100,000; None for no bound) keeps about
    that many of the newest entries (``XADD … MAXLEN ~``: Redis trims whole
    stream nodes, so a few more may stay), and ``retention_seconds`` drops
    entries older than that (``MINID ~``, on the server's clock). A batch is
    one pipelined round trip. Queries read the stream in pages and filter
    here: they cost a scan of what the bound keeps.
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
        maxlen: int | None = 100_000,
        retention_seconds: float | None = None,
        retry_timeout: float = 30.0,
    ) -> None:
        if maxlen is not None and maxlen <= 0:
            raise ValueError(f"maxlen must be positive or None, not {maxlen}")
        if retention_seconds is not None and retention_seconds <= 0:
            raise ValueError(f"retention_seconds must be positive or None, not {retention_seconds}")
        settings, url_prefix = redis_settings(
            host, port, db=db, username=username, password=password, ssl=ssl, url=url
        )
        self.prefix = url_prefix or prefix
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        self.key = "{" + self.prefix + "}:events"
        self._conn = RedisConnector(settings, retry_timeout=retry_timeout)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisEventStorage:
        return cls(url=url, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._conn.settings)!r}, prefix={self.prefix!r})"

    async def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        trim: list[Any] = [] if self.maxlen is None else ["MAXLEN", "~", self.maxlen]
        entries = [_fields(event) for event in events]

        async def write(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for fields in entries:
                    pipe.execute_command("XADD", self.key, *trim, "*", *fields)
                if self.retention_seconds is not None:
                    cutoff_ms = int((time.time() - self.retention_seconds) * 1000)
                    pipe.execute_command("XTRIM", self.key, "MINID", "~", cutoff_ms)
                await pipe.execute()

        await self._conn.run(write)

    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        if limit is not None and limit <= 0:
            return []
        wanted = None if type is None else EventType(type)
        found: list[Event] = []
        start = "-"
        while True:
            page = await self._conn.command("XRANGE", self.key, start, "+", "COUNT", _PAGE)
            for _, raw in page:
                event = _event(raw)
                if (
                    (task_id is None or event.task_id == task_id)
                    and (wanted is None or event.type is wanted)
                    and (since is None or event.at >= since)
                    and (until is None or event.at < until)
                ):
                    found.append(event)
                    if limit is not None and len(found) >= limit:
                        return found
            if len(page) < _PAGE:
                return found
            start = "(" + page[-1][0].decode()

    async def close(self) -> None:
        await self._conn.close()


def _fields(event: Event) -> list[Any]:
    fields: list[Any] = [
        "task_id", event.task_id,
        "type", EventType(event.type).value,
        "at", repr(event.at),
        "queue_name", event.queue_name,
        "func", event.func,
        "attempts", event.attempts,
    ]  # fmt: skip
    if event.worker is not None:
        fields += ("worker", event.worker)
    if event.detail is not None:
        fields += ("detail", event.detail)
    return fields


def _event(raw: dict[bytes, bytes]) -> Event:
    get = raw.get
    worker, detail = get(b"worker"), get(b"detail")
    return Event(
        task_id=get(b"task_id", b"").decode(),
        type=EventType(get(b"type", b"").decode()),
        at=float(get(b"at", b"0")),
        queue_name=get(b"queue_name", b"default").decode(),
        func=get(b"func", b"").decode(),
        attempts=int(get(b"attempts", b"0")),
        worker=None if worker is None else worker.decode(),
        detail=None if detail is None else detail.decode(),
    )
