"""Connections to one Redis server, shared by the queue, result and event storages.

The driver (redis-py, with hiredis where installed) is imported when a component
is built, never when ``omniq`` is imported; without it, building one raises
``MissingDependencyError`` naming the extra to install.

asyncio connections belong to the event loop that opened them, and one OmniQ
component may be used from several loops: the sync facade's bridge loop, a
test's loop, ``asyncio.run`` in a thread. ``RedisConnector`` therefore keeps one
pooled client per loop, opened on that loop's first call. Each client is tied
to an async generator started on its loop, so ``asyncio.run`` and
``asyncio.Runner``, which finalize async generators before closing a loop,
close its connections too; ``close()`` closes them all earlier. Blocking calls
from plain threads (the sync facade's ``enqueue``) use a connection per thread.
Every call rides out a server restart: connection errors are retried with
backoff for ``retry_timeout`` seconds, and a script the server forgot
(``NOSCRIPT``) is loaded again.

The connector's parts live beside it: ``settings`` (where the server is),
``link`` (the pipelined asyncio connection) and ``blocking`` (a thread's
connection); ``scripts`` and ``doorbell`` build on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from ..._errors import certificate_rejected, import_driver
from ..._looplife import ClosedWithLoop
from .._wakeup import retrieve_exception
from .blocking import BlockingConnection, DriverConnection, SocketConnection
from .link import Link
from .scripts import Script
from .settings import RedisSettings

if TYPE_CHECKING:
    from .doorbell import Doorbell

log = logging.getLogger("omniq.redis")

T = TypeVar("T")
#: First and longest pause between attempts while the server is unreachable.
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
#: Bounds of one blocking wait on the server (seconds). The upper one stays well
#: under the socket timeout, which would otherwise cut a healthy wait short.
MIN_BLOCK, MAX_BLOCK = 0.05, 5.0
#: Idle links kept per loop for blocking commands (more are closed after use).
_IDLE_LINKS = 8

#: How many times this process's ancestry forked: a thread's blocking connection
#: belongs to the process that opened it. (Cheaper than ``os.getpid()``, a system
#: call, on every enqueue.)
_forks = [0]


def _count_fork() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_count_fork)


def driver() -> ModuleType:
    """redis-py, imported now; a clear error when it is missing."""
    return import_driver(
        "redis.asyncio", "redis.backoff", "redis.exceptions", "redis.retry", "redis.utils",
        needed_by="the Redis backend needs the redis-py driver", extra="redis",
    )  # fmt: skip


def _hiredis_packer(redis: ModuleType) -> Callable[[tuple[Any, ...]], bytes] | None:
    """``hiredis.pack_command`` where redis-py packs with hiredis, else None."""
    if not getattr(redis.utils, "HIREDIS_AVAILABLE", False):
        return None
    import hiredis

    pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
    return pack


def _error_parser(redis: ModuleType) -> Callable[[str], Exception]:
    """An error reply as redis-py's exception for it (NOSCRIPT, LOADING, WRONGPASS, ...)."""
    try:
        from redis._parsers import BaseParser
    except ImportError:  # pragma: no cover - redis-py moved it
        error: Callable[[str], Exception] = redis.exceptions.ResponseError
        return error
    parse: Callable[[str], Exception] = BaseParser.parse_error
    return parse


def raise_swallowed_cancel() -> None:
    """Re-raise a cancel of the current task that a driver call swallowed.

    redis-py sends with ``asyncio.wait_for``, which before Python 3.12 drops a
    cancel that lands as the send completes: the caller would go on (a worker
    stopping its fetch would wait on for work). A task still marked as being
    cancelled after the call returns was cancelled during it.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


# -- one loop's client ------------------------------------------------------------------------
class LoopClient(ClosedWithLoop):
    """A pooled asyncio client on one event loop, and the background tasks using it."""

    def __init__(self, client: Any) -> None:
        #: A ``redis.asyncio.Redis`` (typed Any: redis-py leaves ``execute_command`` untyped).
        self.client: Any = client
        self.closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.doorbells: dict[tuple[str, ...], Doorbell] = {}
        #: Writes sent from this loop and not answered yet.
        self.writing: set[asyncio.Future[None]] = set()
        #: This loop's pipelined connection for scripts (see ``Link``), once opened.
        self.link: Link | None = None
        self.linking = asyncio.Lock()
        #: Links for blocking commands (``RedisConnector.blocking``): all, and the idle.
        self.blocking_links: set[Link] = set()
        self.idle_links: list[Link] = []

    async def start(self) -> None:
        await self._close_with_loop()

    async def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        links = [self.link, *self.blocking_links, *(bell.link for bell in self.doorbells.values())]
        for link in links:
            if link is not None:
                link.close()
        await self.client.aclose()


class RedisConnector:
    """One server for one OmniQ component: a client per event loop, a connection per
    thread for blocking calls, retries across outages."""

    def __init__(self, settings: RedisSettings, *, retry_timeout: float = 30.0) -> None:
        self.settings = settings
        self.retry_timeout = retry_timeout
        self._redis = driver()
        errors = self._redis.exceptions
        #: Errors that a later attempt may not meet: the server restarts, loads
        #: its data (LOADING is a ConnectionError), or a connection was cut.
        self.retryable: tuple[type[Exception], ...] = (errors.ConnectionError, errors.TimeoutError)
        #: ConnectionErrors that waiting does not cure.
        self._fatal: tuple[type[Exception], ...] = (
            errors.AuthenticationError,
            errors.AuthorizationError,
        )
        self.error: type[Exception] = errors.RedisError
        self._noscript: type[Exception] = errors.NoScriptError
        self._parse_error = _error_parser(self._redis)
        self._lock = threading.Lock()
        self._loops: dict[asyncio.AbstractEventLoop, LoopClient] = {}
        self._idle: list[LoopClient] = []  # on loops not running at close(): theirs to finalize
        #: Blocking calls: a connection per thread, made by one redis-py pool.
        self._local = threading.local()
        self._pool: Any = None
        self._pool_pid = 0
        self._threads: list[tuple[threading.Thread, BlockingConnection]] = []
        #: hiredis's packer, where redis-py uses hiredis: blocking calls use it,
        #: and scripts then go through a ``Link`` (plain TCP; TLS stays with redis-py).
        self._pack: Callable[[tuple[Any, ...]], bytes] | None = _hiredis_packer(self._redis)
        self._linked = self._pack is not None and not settings.ssl

    # -- async ------------------------------------------------------------------------------
    async def client(self) -> LoopClient:
        """This loop's client, opened on first use."""
        entry = self._loops.get(asyncio.get_running_loop())
        if entry is None or entry.closed:
            entry = await self._open()
        return entry

    async def _link(self) -> Link:
        """This loop's pipelined connection, opened on first use."""
        entry = await self.client()
        link = entry.link
        if link is None or link.closed:
            link = await self._open_link(entry)
        return link

    async def _open(self) -> LoopClient:
        loop = asyncio.get_running_loop()
        retry = self._redis.asyncio.retry.Retry(self._redis.backoff.NoBackoff(), 0)
        client = self._redis.asyncio.Redis(**self.settings.client_options(), retry=retry)
        entry = LoopClient(client)
        await entry.start()
        with self._lock:
            for other in [lp for lp in self._loops if lp.is_closed()]:
                del self._loops[other]
            self._loops[loop] = entry
        return entry

    async def fence(self) -> None:
        """Wait until the writes this instance started on this loop are answered.

        Concurrent calls travel on different pooled connections, so the server
        may see them in another order than they were made. A read behind a
        fence sees every change the caller started before it, as it would on
        an embedded backend (a worker's failure handling, say, then its
        burst-mode check that the queue is empty).
        """
        entry = self._loops.get(asyncio.get_running_loop())
        if entry is not None and entry.writing:
            await asyncio.wait(list(entry.writing))

    async def command(self, *args: Any) -> Any:
        """One command, retried while the server is unreachable."""
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            entry = await self.client()
            try:
                reply = await entry.client.execute_command(*args)
            except self.retryable as exc:
                deadline, delay = await self._pause(exc, deadline, delay)
                continue
            raise_swallowed_cancel()
            return reply

    async def run(self, operation: Callable[[Any], Awaitable[T]]) -> T:
        """``operation(client)`` (a pipeline, say), retried while the server is unreachable."""
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            entry = await self.client()
            try:
                result = await operation(entry.client)
            except self.retryable as exc:
                deadline, delay = await self._pause(exc, deadline, delay)
                continue
            raise_swallowed_cancel()
            return result

    async def eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` with EVALSHA; loads it when the server does not know it."""
        if not script.writes:
            return await self._eval(script, keys, args)
        entry = await self.client()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.writing.add(done)
        try:
            return await self._eval(script, keys, args)
        finally:
            entry.writing.discard(done)
            done.set_result(None)

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._linked:
            return await self._eval_linked(script, keys, args)
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            entry = await self.client()
            client = entry.client
            try:
                try:
                    reply = await client.execute_command(
                        "EVALSHA", script.sha, len(keys), *keys, *args
                    )
                except self._noscript:
                    await client.execute_command("SCRIPT LOAD", script.source)
                    reply = await client.execute_command(
                        "EVALSHA", script.sha, len(keys), *keys, *args
                    )
            except self.retryable as exc:
                deadline, delay = await self._pause(exc, deadline, delay)
                continue
            raise_swallowed_cancel()
            return reply

    def pack_eval(self, script: Script, args: Sequence[Any]) -> bytes:
        """``EVALSHA`` of ``script`` with ``args``, packed for a ``Link``."""
        assert self._pack is not None
        return self._pack(("EVALSHA", script.sha, 0, *args))

    async def _eval_linked(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``_eval`` on this loop's ``Link``."""
        assert self._pack is not None
        command = self._pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            try:
                link = await self._link()
                try:
                    return await link.request(command)
                except self._noscript:
                    await link.request(self._pack(("SCRIPT", "LOAD", script.source)))
                    return await link.request(command)
            except self.retryable as exc:
                deadline, delay = await self._pause(exc, deadline, delay)

    async def pipeline(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Commands the server answers at once, sent together on this loop's ``Link``
        (one round trip; raw replies), retried while the server is unreachable.
        Without a ``Link``, one ``command`` after the other."""
        if not self._linked:
            return [await self.command(*command) for command in commands]
        assert self._pack is not None
        packed = [self._pack(command) for command in commands]
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            try:
                link = await self._link()
                futures = [link.request(command) for command in packed]
                try:
                    return [await future for future in futures]
                except BaseException:
                    for future in futures:
                        future.add_done_callback(retrieve_exception)
                    raise
            except self.retryable as exc:
                deadline, delay = await self._pause(exc, deadline, delay)

    async def blocking(self, *args: Any) -> Any:
        """One blocking command (BLMOVE), on an idle ``Link`` of this loop kept for
        blocking commands (a new one when none is idle), retried while the server is
        unreachable. A link whose command did not end normally is closed."""
        if not self._linked:
            return await self.command(*args)
        assert self._pack is not None
        packed = self._pack(args)
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            try:
                entry = await self.client()
                idle = entry.idle_links
                while idle and idle[-1].closed:
                    entry.blocking_links.discard(idle.pop())
                link = idle.pop() if idle else await self.connect_link()
                entry.blocking_links.add(link)
                try:
                    reply = await link.request(packed)
                except BaseException as exc:
                    if not isinstance(exc, self.error) or isinstance(exc, self.retryable):
                        entry.blocking_links.discard(link)
                        link.close()  # cancelled or cut mid-command: never reused
                    raise
                finally:
                    if not link.closed:
                        if len(idle) < _IDLE_LINKS:
                            idle.append(link)
                        else:
                            entry.blocking_links.discard(link)
                            link.close()
                return reply
            except self.retryable as exc:
                deadline, delay = await self._pause(exc, deadline, delay)

    async def _open_link(self, entry: LoopClient) -> Link:
        """This loop's ``Link``, connected on first use (and after it broke)."""
        async with entry.linking:
            if entry.link is None or entry.link.closed:
                entry.link = await self.connect_link()
            return entry.link

    async def connect_link(self) -> Link:
        """A new ``Link``: connected, authenticated, its database selected."""
        assert self._pack is not None
        s = self.settings
        link = Link(self)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(lambda: link, s.host, s.port),
                s.socket_connect_timeout,
            )
        except asyncio.TimeoutError as exc:
            raise self._redis.exceptions.TimeoutError(f"connecting to {s}: timed out") from exc
        except OSError as exc:
            raise self._redis.exceptions.ConnectionError(f"connecting to {s}: {exc}") from exc
        try:
            if s.password is not None:
                user = () if s.username is None else (s.username,)
                await link.request(self._pack(("AUTH", *user, s.password)))
            if s.db:
                await link.request(self._pack(("SELECT", s.db)))
        except BaseException:
            link.close()
            raise
        return link

    async def blocking_command(self, entry: LoopClient, link: Link | None, *args: Any) -> Any:
        """One blocking command (BLPOP) on ``link``, a ``Link`` of its caller's own that
        nothing else uses meanwhile, or on the pooled client without one. No retries."""
        if link is None:
            return await entry.client.execute_command(*args)
        assert self._pack is not None
        return await link.request(self._pack(args))

    async def _pause(
        self, exc: Exception, deadline: float | None, delay: float
    ) -> tuple[float, float]:
        deadline = self._check_deadline(exc, deadline)
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        return deadline, min(delay * 2, RETRY_MAX)

    def _check_deadline(self, exc: Exception, deadline: float | None) -> float:
        if isinstance(exc, self._fatal) or certificate_rejected(exc):
            raise exc
        now = time.monotonic()
        if deadline is None:
            log.warning(
                "Redis at %s: %s; retrying for up to %s s", self.settings, exc, self.retry_timeout
            )
            return now + self.retry_timeout
        if now >= deadline:
            raise exc
        return deadline

    # -- sync ----------------------------------------------------------------------------------
    def eval_blocking(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``eval`` in the caller's thread, on that thread's own connection."""
        return self.eval_packed_blocking(script, ("EVALSHA", script.sha, len(keys), *keys, *args))

    def eval_packed_blocking(self, script: Script, command: tuple[Any, ...] | bytes) -> Any:
        """``eval_blocking`` of ``script``'s ``EVALSHA`` as given: its arguments, or
        already in RESP (``omniq.enqueue``'s, which costs less built directly)."""
        local = self._local.__dict__
        conn = local.get("conn") if local.get("fork") == _forks[0] else None
        if conn is None:
            conn = self._thread_connection()
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            try:
                try:
                    return conn.call(command)
                except self._noscript:
                    conn.call(("SCRIPT", "LOAD", script.source))
            except self.retryable as exc:
                conn.disconnect()  # the next attempt reconnects
                deadline = self._check_deadline(exc, deadline)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, RETRY_MAX)
            except self.error:
                raise  # an error reply: read in full, the connection stays usable
            except BaseException:
                conn.disconnect()  # interrupted mid-reply: never reuse the socket
                raise

    def _thread_connection(self) -> BlockingConnection:
        """This thread's connection, made on first use. One per producer thread, used
        directly: no pool checkout per call (which costs a socket poll in redis-py)."""
        with self._lock:
            conn: BlockingConnection
            if self._linked:
                conn = SocketConnection(self)
            else:
                if self._pool is None or self._pool_pid != os.getpid():
                    retry = self._redis.retry.Retry(self._redis.backoff.NoBackoff(), 0)
                    client = self._redis.Redis(**self.settings.client_options(), retry=retry)
                    self._pool, self._pool_pid = client.connection_pool, os.getpid()
                    self._threads = []
                conn = DriverConnection(self._pool.make_connection())
            # Close connections of threads that ended (thread-per-request servers).
            alive = [(t, c) for t, c in self._threads if t.is_alive()]
            for _, dead in set(self._threads) - set(alive):
                dead.disconnect()
            self._threads = [*alive, (threading.current_thread(), conn)]
        self._local.conn, self._local.fork = conn, _forks[0]
        return conn

    # -- closing ----------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close every loop's client (this loop's now, running loops' soon) and the sync one."""
        with self._lock:
            entries, self._loops = self._loops, {}
            threads, self._threads = self._threads, []
            self._pool = None
            self._local = threading.local()
            self._idle = [e for e in self._idle if not e.closed]
        current = asyncio.get_running_loop()
        for loop, entry in entries.items():
            if loop is current:
                await entry.close()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(entry.close(), loop)
            elif not loop.is_closed():
                # Not running now (between run_until_complete calls): its shutdown
                # finalizes the client; keep it referenced until then.
                self._idle.append(entry)
        for _, conn in threads:
            conn.disconnect()
