"""PostgreSQL queue: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, transactional enqueue.

Tasks are rows of ``<schema>.tasks`` (``sql/postgres/schema_0001_initial.sql``
documents the layout); every operation is one statement, one round trip. A
claim is a call of the ``claim()`` function: it takes back expired leases,
makes due scheduled tasks ready and leases up to N tasks with ``FOR UPDATE
SKIP LOCKED``, walking one partial index in delivery order. Statements that
make work available notify ``<schema>.tasks``; an idle consumer LISTENs on a
dedicated connection and otherwise sleeps until the next due time or lease end.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .. import _postgres
from .._errors import ConfigurationError
from .._postgres_blocking import BYTEA, FLOAT8, INT4, TEXT, BlockingStatement, login_for
from .._postgres_blocking import Unavailable as BlockingUnavailable
from .._task import Task, TaskStatus
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

if TYPE_CHECKING:
    from asyncpg import Connection, Record

    from .._client import AsyncOmniQ, OmniQ
    from ..results.postgres import PostgreSQLResultStorage

T = TypeVar("T")

_STATUS = {
    "ready": TaskStatus.PENDING,
    "scheduled": TaskStatus.PENDING,
    "running": TaskStatus.RUNNING,
    "succeeded": TaskStatus.SUCCEEDED,
    "failed": TaskStatus.FAILED,
    "cancelled": TaskStatus.CANCELLED,
    "expired": TaskStatus.EXPIRED,
}
_STATES = {
    status: [state for state, public in _STATUS.items() if public is status]
    for status in TaskStatus
}
#: Retention runs at most this often (seconds) per instance, from claims.
_PRUNE_EVERY = 60.0
_PRUNE_BATCH = 1000
#: Batches from this size try a plain INSERT before one with ON CONFLICT.
_PLAIN_INSERT_FROM = 10
_PUT_ONE_TYPES = (TEXT, TEXT, INT4, FLOAT8, BYTEA)
_int4, _float8 = struct.Struct("!i"), struct.Struct("!d")
_NONE_INSERTED = bytes(8)  # put_one's count(), a binary int8


class PostgreSQLTaskQueue(TaskQueue):
    """Tasks in a PostgreSQL database, shared by every producer and worker that uses it.

    ``dsn``
        ``postgresql://user:password@host:port/database`` (asyncpg's DSN; a
        ``?schema=name`` parameter is read as ``schema``).
    ``schema``
        Where OmniQ's tables live (default ``omniq``), created on first use:
        applications sharing a database use different schemas.
    ``retention_seconds``
        How long succeeded, cancelled and expired tasks stay visible to
        ``get_task`` before they are deleted; failed tasks (the dead letter)
        stay until re-queued.
    ``pool_size``
        Connections per event loop (a LISTEN connection comes on top).
    ``reconnect_timeout``
        How long an operation retries after losing the server before it raises.
    ``connect_options``
        Extra keyword arguments for ``asyncpg.connect`` (``ssl``, ``timeout``…).

    Plus the options of every queue (``queues``, ``lease_seconds``, ``serializer``).
    """

    schemes = ("postgresql", "postgres")
    supports_blocking_put = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        retention_seconds: float = 3600.0,
        pool_size: int = _postgres.DEFAULT_POOL_SIZE,
        reconnect_timeout: float = _postgres.DEFAULT_RECONNECT_TIMEOUT,
        connect_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.dsn, self.schema = _postgres.split_dsn(dsn, schema)
        self.retention_seconds = retention_seconds
        self._db = _postgres.Database(
            self.dsn,
            self.schema,
            pool_size=pool_size,
            reconnect_timeout=reconnect_timeout,
            connect_options=connect_options,
        )
        self._sql = _postgres.queries("tasks.sql", self.schema)
        # The sync facade's single enqueue, on a plain socket (asyncpg where it cannot).
        login = login_for(self.dsn, self._db.connect_options)
        self._blocking_put = (
            BlockingStatement(login, self._sql["put_one"], _PUT_ONE_TYPES) if login else None
        )
        self._channel = f"{self.schema}.tasks"
        self._next_prune = 0.0  # time.monotonic()
        self._writes: dict[asyncio.AbstractEventLoop, set[asyncio.Future[Any]]] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgreSQLTaskQueue:
        return cls(url, **options)

    def default_result_storage(self) -> PostgreSQLResultStorage:
        """Results next to the tasks: same database and schema (``OmniQ``'s default)."""
        from ..results.postgres import PostgreSQLResultStorage

        db = self._db
        return PostgreSQLResultStorage(
            self.dsn,
            schema=self.schema,
            pool_size=db.pool_size,
            reconnect_timeout=db.reconnect_timeout,
            connect_options=db.connect_options,
        )

    # -- transactional enqueue -----------------------------------------------------------
    async def enqueue(self, task: Task, *, connection: Any = None) -> str:
        """Store ``task``; with ``connection``, inside that connection's open transaction."""
        await self.enqueue_many([task], connection=connection)
        return task.id

    async def enqueue_many(self, tasks: Sequence[Task], *, connection: Any = None) -> list[bool]:
        """Store a batch in one round trip; True for each task that was new.

        ``connection``: the application's own asyncpg connection (or a SQLAlchemy
        ``AsyncConnection`` on the asyncpg dialect) with a transaction open. The
        tasks then commit or roll back with the application's own writes, and
        workers are notified at commit.
        """
        if connection is None:
            return await super().enqueue_many(tasks)
        rows = [self._new_row(task) for task in tasks]
        conn = await _transaction_connection(connection)
        await self._db.ensure_schema()  # on our own connection: DDL stays out of theirs
        return await self._put_op(rows)(conn)

    # -- primitives ----------------------------------------------------------------------
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        return await self._db.run(self._put_op(rows))

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool]:
        # The plain socket once this process has migrated the schema (asyncpg does that).
        if len(rows) == 1 and self._blocking_put is not None and self._db.migrated:
            row = rows[0]
            params = (row.id.encode(), row.queue.encode(), _int4.pack(row.priority),
                      _float8.pack(row.due_at), row.payload)  # fmt: skip
            try:
                return [self._blocking_put.fetchval(params) != _NONE_INSERTED]
            except BlockingUnavailable:
                pass  # asyncpg retries, reconnects or raises the proper error
        return self._db.run_blocking(self._put_op(rows))

    def _put_op(self, rows: Sequence[NewRow]) -> Callable[[Connection], Awaitable[list[bool]]]:
        if len(rows) == 1:  # the common case, ~15% faster without the arrays
            sql_one, row = self._sql["put_one"], rows[0]

            async def put_one(conn: Connection) -> list[bool]:
                return [bool(await conn.fetchval(sql_one, *row))]

            return put_one
        columns = (
            [r.id for r in rows],
            [r.queue for r in rows],
            [r.priority for r in rows],
            [r.due_at for r in rows],
            [r.payload for r in rows],
        )
        queues = sorted({row.queue for row in rows})
        plain_first = len(rows) >= _PLAIN_INSERT_FROM and len(set(columns[0])) == len(rows)
        sql_new, sql = self._sql["put_new"], self._sql["put"]
        known = self._db.asyncpg.UniqueViolationError

        async def put(conn: Connection) -> list[bool]:
            # In the application's transaction a failed statement would abort it.
            if plain_first and not conn.is_in_transaction():
                try:
                    await conn.fetchval(sql_new, *columns, queues)
                    return [True] * len(rows)
                except known:
                    pass  # some id is known: insert the others
            record = await conn.fetchrow(sql, *columns)
            inserted = set(record["inserted"] or ()) if record is not None else set()
            flags = []
            for row in rows:  # a repeated id within the batch is new only once
                flags.append(row.id in inserted)
                inserted.discard(row.id)
            return flags

        return put

    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        if time.monotonic() >= self._next_prune:
            await self._prune()
        sql, args = self._sql["claim"], (list(queues), limit, lease_until - now, lease_id)

        async def give_back(records: list[Record]) -> None:
            # A caller that stopped waiting must not lose rows the server leased to it.
            if records:
                await self._release([LeaseRef(record[0], lease_id) for record in records])

        records = await self._db.run_to_end(lambda conn: conn.fetch(sql, *args), give_back)
        status = TaskStatus.RUNNING
        return [StoredRow(r[0], r[1], status, r[2], r[3], lease_id, r[4]) for r in records]

    async def _prune(self) -> None:
        """Retention: delete old finished tasks, a batch per claim until caught up."""
        sql = self._sql["prune"]
        status = await self._db.run(
            lambda conn: conn.execute(sql, self.retention_seconds, _PRUNE_BATCH)
        )
        deleted = int(status.rpartition(" ")[2] or 0)
        self._next_prune = time.monotonic() + (0.0 if deleted >= _PRUNE_BATCH else _PRUNE_EVERY)

    def _wake_generation(self) -> int:
        return self._db.listener_generation(self._channel)

    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        listener = await self._db.listener(self._channel)
        sql = self._sql["next_wake"]
        # A worker interrupts this wait when a task of its own ends, often while
        # this statement runs: it must not be cancelled (see run_to_end).
        next_wake = await self._db.run_to_end(lambda conn: conn.fetchval(sql))
        if next_wake is not None:
            timeout = min(timeout, max(0.0, next_wake))
        await listener.wait(timeout, since, _postgres.accept_queues(queues))

    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        sql, state = self._sql["finish"], _STATES[status][0]
        ids, leases = _ref_columns(refs)
        records = await self._db.run(lambda conn: conn.fetch(sql, ids, leases, state, error))
        return _changed(refs, records)

    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        sql = self._sql["retry"]
        count = await self._pending_write(
            lambda conn: conn.fetchval(sql, ref.id, ref.lease_id, due_at, error)
        )
        return bool(count)

    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        sql = self._sql["release"]
        ids, leases = _ref_columns(refs)
        await self._pending_write(lambda conn: conn.fetchval(sql, ids, leases))

    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        sql = self._sql["extend"]
        ids, leases = _ref_columns(refs)
        seconds = lease_until - time.time()
        records = await self._db.run(lambda conn: conn.fetch(sql, ids, leases, seconds))
        return _changed(refs, records)

    async def _cancel(self, task_id: str) -> bool:
        sql = self._sql["cancel"]
        return await self._db.run(lambda conn: conn.fetchval(sql, task_id)) is not None

    async def _get(self, task_id: str) -> StoredRow | None:
        sql = self._sql["get"]
        record = await self._db.run(lambda conn: conn.fetchrow(sql, task_id))
        return None if record is None else _stored(record)

    async def _count(self, queue: str) -> int:
        # Read-your-writes: a retry or release this instance issued, on this loop,
        # counts once it is issued, not only once its caller saw it complete (a
        # burst worker asks for the size while its nack may still be in flight).
        writes = self._writes.get(asyncio.get_running_loop())
        if writes:
            await asyncio.wait(set(writes))
        sql = self._sql["count"]
        return int(await self._db.run(lambda conn: conn.fetchval(sql, queue)))

    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        if status is TaskStatus.FAILED:
            sql = self._sql["list_failed"]
            records = await self._db.run(lambda conn: conn.fetch(sql, queue, limit))
        else:
            sql, states = self._sql["list"], _STATES[status]
            records = await self._db.run(lambda conn: conn.fetch(sql, states, queue, limit))
        return [_stored(record) for record in records]

    async def _requeue(self, task_id: str, now: float) -> bool:
        sql = self._sql["requeue"]
        return bool(await self._pending_write(lambda conn: conn.fetchval(sql, task_id, now)))

    async def _pending_write(self, op: Callable[[Connection], Awaitable[T]]) -> T:
        """``op``, tracked while in flight: it makes tasks pending, which ``_count`` waits for."""
        writes = self._writes.setdefault(asyncio.get_running_loop(), set())
        job = asyncio.ensure_future(self._db.run(op))
        writes.add(job)
        job.add_done_callback(writes.discard)
        return await job

    async def _close(self) -> None:
        self._writes.clear()
        if self._blocking_put is not None:
            self._blocking_put.close()
        await self._db.close()


def _ref_columns(refs: Sequence[LeaseRef]) -> tuple[list[str], list[str | None]]:
    return [ref.id for ref in refs], [ref.lease_id for ref in refs]


def _changed(refs: Sequence[LeaseRef], records: Sequence[Record]) -> list[bool]:
    changed = {record[0] for record in records}
    return [ref.id in changed for ref in refs]


def _stored(record: Record) -> StoredRow:
    task_id, payload, state, attempts, due_at, lease_id, error = record
    return StoredRow(task_id, payload, _STATUS[state], attempts, due_at, lease_id, error)


async def _transaction_connection(connection: Any) -> Connection:
    """The asyncpg connection behind ``connection``, which must be in a transaction."""
    asyncpg = _postgres.import_asyncpg()
    raw = connection
    if hasattr(raw, "get_raw_connection"):  # a SQLAlchemy AsyncConnection
        raw = await raw.get_raw_connection()
    raw = getattr(raw, "driver_connection", raw)  # SQLAlchemy's pooled connection
    if not isinstance(raw, asyncpg.Connection):
        raise ConfigurationError(
            "connection= takes an asyncpg connection (or a SQLAlchemy AsyncConnection on the "
            f"postgresql+asyncpg dialect), not {type(connection).__name__}"
        )
    if not raw.is_in_transaction():
        raise ConfigurationError(
            "connection= is for enqueueing inside the application's transaction, and this "
            "connection has none open (start one: `async with conn.transaction():`; "
            "SQLAlchemy opens it at the transaction's first statement)"
        )
    return cast("Connection", raw)


async def enqueue_in_transaction(
    connection: Any,
    omniq: AsyncOmniQ | OmniQ,
    func: Callable[..., Any] | str,
    *args: Any,
    **options: Any,
) -> str:
    """``omniq.enqueue(func, *args, **options)`` inside the application's own transaction.

    ``connection`` is an asyncpg connection with a transaction open (or a
    SQLAlchemy ``AsyncConnection`` on the asyncpg dialect). The task becomes
    visible to workers when that transaction commits, and never exists if it
    rolls back. ``omniq``'s task queue must be a :class:`PostgreSQLTaskQueue`
    on the same database. Returns the task id. No ``enqueued`` event is
    recorded, since the transaction may yet roll back.
    """
    from .._client import OmniQ

    client = omniq._async if isinstance(omniq, OmniQ) else omniq
    queue = client.task_queue
    if not isinstance(queue, PostgreSQLTaskQueue):
        raise ConfigurationError(
            "enqueue_in_transaction needs an OmniQ whose task queue is a PostgreSQLTaskQueue, "
            f"not {type(queue).__name__}"
        )
    task = client.build_task(func, *args, **options)
    return await queue.enqueue(task, connection=connection)
