"""PostgreSQL plumbing shared by the queue, result and event storages.

Each component instance owns one :class:`Database`: its connections, its
schema and its LISTEN connections. Nothing connects before first use.

* **Connections** are asyncpg connections, opened on the event loop that uses
  them, in a small pool per loop (normally there is exactly one loop). The pool
  is a free list: taking a connection costs no await and no reset query, which
  matters when a statement itself takes ~100 µs. A loop's connections close with
  the instance, or with the loop when ``asyncio.run`` (or any runner) shuts it
  down, so nothing is left open on a dead loop.
* **Schema**: created and migrated on first use, in a transaction holding an
  advisory lock, from the ``schema_NNNN_*.sql`` files; ``schema_version`` records
  what was applied. Every name is qualified with the schema, so applications
  sharing a database each use their own.
* **SQL** lives in ``queue/sql/postgres/*.sql`` as ``-- name: x`` blocks, loaded
  by name (:func:`queries`).
* **Cancellation**: a caller that may stop waiting (a claim, the wait's look
  at the next due time) uses ``run_to_end``: its statement finishes anyway and
  the connection stays in the pool, since cancelling one costs the connection.
* **Outages**: once connected, an operation that loses its connection (server
  restart, failover) retries on a new one with backoff for ``reconnect_timeout``
  seconds before raising. A statement whose connection broke mid-flight may have
  committed: like any networked queue this is at-least-once.
* **LISTEN**: a :class:`Listener` keeps a dedicated connection listening on one
  channel, reconnects after losing it, and wakes the waiters whose filter
  accepts a notification's payload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from importlib import resources
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._errors import ConfigurationError, certificate_rejected, import_driver
from ._looplife import ClosedWithLoop

if TYPE_CHECKING:
    from asyncpg import Connection

    from ._bridge import LoopThread

log = logging.getLogger("omniq.postgres")

T = TypeVar("T")

DEFAULT_SCHEMA = "omniq"
DEFAULT_POOL_SIZE = 10
DEFAULT_RECONNECT_TIMEOUT = 60.0
#: Lowercase SQL identifiers only: no quoting anywhere, and room for the
#: ``.results`` suffix in a 63-byte channel name.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}\Z")
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0


def import_asyncpg() -> ModuleType:
    """The driver, or ``MissingDependencyError`` naming the extra to install."""
    return import_driver(
        "asyncpg", needed_by="the PostgreSQL backend needs the asyncpg driver", extra="postgres"
    )


def check_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"schema {schema!r} is not usable: use 1-48 lowercase letters, digits and "
            "underscores, not starting with a digit"
        )
    return schema


def split_dsn(dsn: str, schema: str | None) -> tuple[str, str]:
    """The DSN without OmniQ's own ``schema`` query parameter, and the schema.

    ``postgresql://host/db?schema=app1`` selects a schema from a URL (for
    ``OMNIQ_*`` variables); every other parameter is the driver's. An explicit
    ``schema`` argument must agree with the URL's.
    """
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigurationError(
            f"not a PostgreSQL DSN: {dsn!r}; write postgresql://user:password@host:port/database"
        )
    parts = urlsplit(dsn)
    params = parse_qsl(parts.query, keep_blank_values=True)
    in_url = [value for key, value in params if key == "schema"]
    if len(in_url) > 1 or (in_url and schema is not None and in_url[0] != schema):
        raise ConfigurationError(f"conflicting schema names in {dsn!r} and schema={schema!r}")
    chosen = schema if schema is not None else (in_url[0] if in_url else DEFAULT_SCHEMA)
    rest = urlencode([(key, value) for key, value in params if key != "schema"])
    return urlunsplit(parts._replace(query=rest)), check_schema(chosen)


def with_schema(dsn: str, schema: str) -> str:
    """``dsn`` naming ``schema`` in its query: a URL another component can be built from."""
    parts = urlsplit(dsn)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("schema", schema)])
    return urlunsplit(parts._replace(query=query))


# -- SQL files ---------------------------------------------------------------------------
def _sql_dir() -> Any:
    return resources.files("omniq.queue").joinpath("sql/postgres")


@cache
def _query_file(filename: str) -> dict[str, str]:
    """``-- name: x`` blocks of one file, each running until the next name."""
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in [*_sql_dir().joinpath(filename).read_text().splitlines(), "-- name: "]:
        if line.startswith("-- name:"):
            if name:
                blocks[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line.partition(":")[2].strip(), []
        elif name:
            lines.append(line)
    return blocks


def queries(filename: str, schema: str) -> dict[str, str]:
    """The named statements of ``queue/sql/postgres/<filename>`` for ``schema``."""
    return {name: sql.replace("{schema}", schema) for name, sql in _query_file(filename).items()}


@cache
def _migration_files() -> tuple[tuple[int, str], ...]:
    found = []
    for entry in _sql_dir().iterdir():
        match = re.fullmatch(r"schema_(\d{4})_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text()))
    return tuple(sorted(found))


def migrations(schema: str) -> list[tuple[int, str]]:
    return [(version, sql.replace("{schema}", schema)) for version, sql in _migration_files()]


LATEST_VERSION = max(version for version, _ in _migration_files())


async def migrate(conn: Connection, schema: str) -> None:
    """Bring ``schema`` to the latest version; safe to run from many processes at once."""
    asyncpg = import_asyncpg()
    sql = queries("migrate.sql", schema)
    try:
        if await conn.fetchval(sql["current_version"]) == LATEST_VERSION:
            return
    except asyncpg.UndefinedTableError:
        pass
    async with conn.transaction():
        await conn.execute(sql["lock"])
        await conn.execute(sql["create_version_table"])
        current = await conn.fetchval(sql["current_version"])
        for version, script in migrations(schema):
            if version > current:
                log.info("migrating PostgreSQL schema %s to version %d", schema, version)
                await conn.execute(script)
                await conn.execute(sql["record_version"], version)


# -- connections -------------------------------------------------------------------------
class Database:
    """One component's access to one schema of one PostgreSQL database.

    ``run(op)`` runs ``op(connection)`` on a pooled connection of the running
    loop; ``run_to_end(op)`` the same for a caller that may be cancelled;
    ``run_blocking(op)`` does the same from synchronous code without a thread
    hop (a private loop per calling thread). Constructing does no I/O.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        if pool_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.reconnect_timeout = reconnect_timeout
        self.connect_options = dict(connect_options or {})
        self.asyncpg = self._asyncpg = import_asyncpg()
        self._lock = threading.Lock()
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._thread_loops: list[tuple[threading.Thread, asyncio.AbstractEventLoop]] = []
        self._local = threading.local()
        self._helper: LoopThread | None = None
        self._pid = os.getpid()
        self._migrated = False
        self._connected_once = False

    # -- running statements ------------------------------------------------------------
    async def run(self, op: Callable[[Connection], Awaitable[T]]) -> T:
        """``op(connection)`` on a pooled connection, retrying transient connection loss."""
        state = await self._state()
        failed_since: float | None = None
        delay = _BACKOFF_FIRST
        while True:
            conn: Connection | None = None
            reuse = False
            try:
                conn = await state.acquire()
                if not self._migrated:
                    await migrate(conn, self.schema)
                    self._migrated = True
                result = await op(conn)
                reuse = True
                if failed_since is not None:
                    log.warning("PostgreSQL is reachable again (%s)", self.schema)
                return result
            except Exception as exc:
                reuse = conn is not None and not conn.is_closed() and self._is_sql_error(exc)
                if not self._transient(exc, conn):
                    raise
                now = time.monotonic()
                if failed_since is None:
                    failed_since = now
                    log.warning("lost the PostgreSQL connection (%s); reconnecting", exc)
                if now - failed_since >= self.reconnect_timeout:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            finally:
                if conn is not None:
                    state.release(conn, reuse)

    async def run_to_end(
        self,
        op: Callable[[Connection], Awaitable[T]],
        abandoned: Callable[[T], Awaitable[object]] | None = None,
    ) -> T:
        """``run(op)`` for a caller that may stop waiting: the statement is not interrupted.

        Cancelling a statement in flight costs its connection: asyncpg sends the
        server a cancel request on a new connection, and ``run`` closes the
        connection, so a later statement pays for a new server process (its
        catalog caches, the claim function compiled again: 4-10 ms). A caller
        cancelled here leaves the statement to finish in the background, its
        connection going back to the pool, and ``abandoned`` gets the result
        (to undo it). ``close`` waits for such leftovers.
        """
        state = await self._state()
        job = asyncio.ensure_future(self.run(op))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            state.adopt(_finish_abandoned(job, abandoned))
            raise

    def run_blocking(self, op: Callable[[Connection], Awaitable[T]]) -> T:
        """``run(op)`` from synchronous code, on this thread's private event loop.

        Cheaper than handing the call to another thread's loop. A thread that
        is already running an event loop cannot run a second one: its calls go
        to a helper loop thread instead.
        """
        if _running_loop() is not None:
            return self._helper_thread().run(self.run(op))
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
            self._local.loop = loop
            self._adopt_thread_loop(loop)
        return loop.run_until_complete(self.run(op))

    async def connect(self) -> Connection:
        """A new connection outside the pool (the caller closes it)."""
        options = dict(self.connect_options)
        options["server_settings"] = {
            "application_name": "omniq",
            **options.get("server_settings", {}),
        }
        conn: Connection = await self._asyncpg.connect(self.dsn, **options)
        self._connected_once = True
        return conn

    @property
    def migrated(self) -> bool:
        """Whether this instance has created or checked its schema."""
        return self._migrated

    async def ensure_schema(self) -> None:
        """Create or migrate the schema now (normally done by the first operation)."""
        if not self._migrated:
            await self.run(_noop)

    # -- LISTEN ---------------------------------------------------------------------------
    async def listener(self, channel: str) -> Listener:
        """The running loop's listener on ``channel`` (it connects on first wait)."""
        state = await self._state()
        found = state.listeners.get(channel)
        if found is None:
            found = state.listeners[channel] = Listener(self, channel)
        return found

    def listener_generation(self, channel: str) -> int:
        """The running loop's listener generation on ``channel``; 0 before it exists."""
        state = self._states.get(asyncio.get_running_loop())
        found = None if state is None else state.listeners.get(channel)
        return 0 if found is None else found.generation

    # -- lifecycle --------------------------------------------------------------------------
    async def close(self) -> None:
        """Close every connection of every loop; the instance may be used again."""
        current = asyncio.get_running_loop()
        mine = self._states.get(current)
        if mine is not None:  # before the states go: leftovers may still run statements
            await mine.wait_leftovers()
        with self._lock:
            states, self._states = list(self._states.values()), {}
            thread_loops, self._thread_loops = self._thread_loops, []
            helper, self._helper = self._helper, None
        for state in states:
            if state.loop is current:
                await state.close()
            elif state.loop.is_running():
                done = asyncio.run_coroutine_threadsafe(state.close(), state.loop)
                await asyncio.wait({asyncio.wrap_future(done)}, timeout=5.0)
            elif not state.loop.is_closed():
                await asyncio.to_thread(_run_to_close, state.loop, state)
        for _, loop in thread_loops:
            if not loop.is_running() and not loop.is_closed():
                loop.close()
        if helper is not None:
            await asyncio.to_thread(helper.close)

    async def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            with self._lock:
                if self._pid != os.getpid():  # a forked child: the parent's sockets are not ours
                    self._states, self._thread_loops, self._pid = {}, [], os.getpid()
                    self._helper, self._local = None, threading.local()
                state = self._states.get(loop)
                if state is None:
                    state = self._states[loop] = _LoopState(self, loop)
        if not state.started:
            await state.start()
        return state

    def _forget(self, state: _LoopState) -> None:
        with self._lock:
            if self._states.get(state.loop) is state:
                del self._states[state.loop]

    def _helper_thread(self) -> LoopThread:
        from ._bridge import LoopThread

        with self._lock:
            if self._helper is None:
                self._helper = LoopThread(name="omniq-postgres")
            return self._helper

    def _adopt_thread_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember a caller thread's loop; close those of threads that ended."""
        with self._lock:
            dead = [(t, lp) for t, lp in self._thread_loops if not t.is_alive()]
            self._thread_loops = [
                *[(t, lp) for t, lp in self._thread_loops if t.is_alive()],
                (threading.current_thread(), loop),
            ]
            dead_states = [self._states.pop(lp) for _, lp in dead if lp in self._states]
        for state in dead_states:
            _run_to_close(state.loop, state)
        for _, old in dead:
            if not old.is_closed():
                old.close()

    # -- error classes ----------------------------------------------------------------------
    def _transient(self, exc: BaseException, conn: Connection | None) -> bool:
        """A lost or refused connection, worth retrying once we have been connected."""
        if not self._connected_once:
            return False
        if certificate_rejected(exc):
            return False  # an OSError, but one that every retry meets again
        pg = self._asyncpg
        retry = (
            OSError,
            asyncio.TimeoutError,
            pg.PostgresConnectionError,
            pg.CannotConnectNowError,
            pg.AdminShutdownError,
            pg.CrashShutdownError,
            pg.TooManyConnectionsError,
        )
        if isinstance(exc, retry):
            return True
        if isinstance(exc, pg.InternalClientError):
            # The protocol is in a state it should not be: typically a connection
            # that received the server's FATAL goodbye but not yet its EOF.
            return True
        return isinstance(exc, pg.InterfaceError) and conn is not None and conn.is_closed()

    def _is_sql_error(self, exc: BaseException) -> bool:
        """An error the server reported about a statement: the connection is still fine."""
        pg = self._asyncpg
        lost = (pg.PostgresConnectionError, pg.OperatorInterventionError)
        return isinstance(exc, pg.PostgresError) and not isinstance(exc, lost)


async def _noop(conn: Connection) -> None:
    return None


async def _finish_abandoned(
    job: asyncio.Future[T], abandoned: Callable[[T], Awaitable[object]] | None
) -> None:
    """Let a statement whose caller was cancelled end, then hand its result to ``abandoned``."""
    try:
        result = await job
    except Exception:  # nobody waits for it any more, and run() logged a lost server
        log.debug("a statement whose caller stopped waiting failed", exc_info=True)
        return
    if abandoned is not None:
        try:
            await abandoned(result)
        except Exception:
            log.warning("could not undo a statement whose caller stopped waiting", exc_info=True)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _run_to_close(loop: asyncio.AbstractEventLoop, state: _LoopState) -> None:
    """Close a state whose loop is idle, by running that loop here for a moment."""
    try:
        loop.run_until_complete(state.close())
    except RuntimeError:  # it started running elsewhere meanwhile, or closed
        pass


class _LoopState(ClosedWithLoop):
    """What one Database holds on one event loop: a free list of connections and listeners."""

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        self.db = db
        self.loop = loop
        self.idle: list[Connection] = []
        self.size = 0  # connections open or opening, idle or in use
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.listeners: dict[str, Listener] = {}
        self.leftovers: set[asyncio.Future[None]] = set()  # see Database.run_to_end
        self.started = False
        self.closed = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self._close_with_loop()

    async def acquire(self) -> Connection:
        while True:
            if self.closed:
                raise RuntimeError("this PostgreSQL connection pool was closed")
            while self.idle:
                conn = self.idle.pop()
                if not conn.is_closed():
                    return conn
                self.size -= 1
            if self.size < self.db.pool_size:
                self.size += 1
                try:
                    return await self.db.connect()
                except BaseException:
                    self.size -= 1
                    self._wake_one()
                    raise
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)

    def release(self, conn: Connection, reuse: bool) -> None:
        if reuse and not self.closed and not conn.is_closed():
            self.idle.append(conn)  # LIFO: the warmest connection is used next
        else:
            self.size -= 1
            if not conn.is_closed():
                conn.terminate()
        self._wake_one()

    def adopt(self, leftover: Awaitable[None]) -> None:
        job = asyncio.ensure_future(leftover)
        self.leftovers.add(job)
        job.add_done_callback(self.leftovers.discard)

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait_leftovers(self) -> None:
        if self.leftovers and not self.closed and _running_loop() is self.loop:
            await asyncio.wait(set(self.leftovers), timeout=5.0)

    async def _shutdown(self) -> None:
        await self.wait_leftovers()
        if self.closed:
            return
        self.closed = True
        self.db._forget(self)
        listeners, self.listeners = list(self.listeners.values()), {}
        idle, self.idle = self.idle, []
        self.size -= len(idle)
        for listener in listeners:
            await listener.close()
        for conn in idle:
            await _close_quietly(conn)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # they find the pool closed


async def _close_quietly(conn: Connection) -> None:
    try:
        await conn.close(timeout=2.0)
    except Exception:
        conn.terminate()


# -- LISTEN --------------------------------------------------------------------------------
Accept = Callable[[str], bool]


class Listener:
    """A dedicated connection LISTENing on one channel, for the waiters of one loop.

    ``generation`` counts notifications and reconnections. A waiter reads it
    before looking for what it waits for and passes it to :meth:`wait`, which
    returns at once if it moved: nothing that arrived between the look and
    the wait is missed. After a reconnection every waiter wakes, since
    notifications sent while disconnected are lost.
    """

    def __init__(self, db: Database, channel: str) -> None:
        self.db = db
        self.channel = channel
        self.generation = 0
        self._conn: Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Accept, asyncio.Future[None]]] = []
        self._closed = False

    async def wait(self, timeout: float, since: int | None, accept: Accept) -> None:
        """Return after a notification ``accept`` takes, a reconnection, or ``timeout``."""
        if not await self._connected():
            # The server is unreachable: let the caller look again (and meet
            # the error or its retries) soon rather than sleep through the outage.
            await asyncio.sleep(min(timeout, _BACKOFF_MAX))
            return
        if since is not None and since != self.generation:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (accept, waiter)
        self._waiters.append(entry)
        try:
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancel
            # that lands as the future completes.
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def _connected(self) -> bool:
        if self._conn is not None and not self._conn.is_closed():
            return True
        if self._closed:
            return False
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            # shield: a waiter giving up must not abort the connection others wait for
            await asyncio.shield(self._connecting)
        except Exception as exc:
            if self.db._transient(exc, None):
                return False
            raise
        return True

    async def _connect(self) -> None:
        conn = await self.db.connect()
        try:
            await conn.add_listener(self.channel, self._on_notification)
            conn.add_termination_listener(self._on_termination)
        except BaseException:
            conn.terminate()
            raise
        if self._closed:
            await _close_quietly(conn)
            return
        self._conn = conn
        self._wake(lambda accept: True)  # something may have come before LISTEN took effect

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        text = str(payload)
        self._wake(lambda accept: accept(text))

    def _on_termination(self, conn: Any) -> None:
        if self._conn is conn:
            self._conn = None
            self._wake(lambda accept: True)

    def _wake(self, picks: Callable[[Accept], bool]) -> None:
        self.generation += 1
        for accept, waiter in self._waiters:
            if not waiter.done() and picks(accept):
                waiter.set_result(None)

    async def close(self) -> None:
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            try:
                await connecting
            except BaseException:
                pass
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)
        self._wake(lambda accept: True)


def accept_any(payload: str) -> bool:
    return True


def accept_queues(queues: Sequence[str]) -> Accept:
    """A notification of one of ``queues`` (or an empty payload: anything)."""
    names = frozenset(queues)
    return lambda payload: not payload or payload in names
