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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from ..._errors import ConfigurationError, MissingDependencyError

log = logging.getLogger("omniq.redis")

T = TypeVar("T")
INSTALL_HINT = "pip install 'omniq[redis]'"
DEFAULT_PORT = 6379
#: First and longest pause between attempts while the server is unreachable.
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
#: Bounds of one blocking wait on the server (seconds). The upper one stays well
#: under the socket timeout, which would otherwise cut a healthy wait short.
MIN_BLOCK, MAX_BLOCK = 0.05, 5.0
#: Idle links kept per loop for blocking commands (more are closed after use).
_IDLE_LINKS = 8
_URL_OPTIONS = ("db", "prefix", "ssl_cert_reqs", "ssl_ca_certs", "socket_timeout")

#: How many times this process's ancestry forked: a thread's blocking connection
#: belongs to the process that opened it. (Cheaper than ``os.getpid()``, a system
#: call, on every enqueue.)
_forks = [0]


def _count_fork() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_count_fork)


def driver() -> ModuleType:
    """redis-py, imported now; a clear error when it is missing."""
    try:
        import redis.asyncio
        import redis.backoff
        import redis.exceptions
        import redis.retry
        import redis.utils
    except ImportError as exc:
        raise MissingDependencyError(
            f"the Redis backend needs the redis-py driver: {INSTALL_HINT}"
        ) from exc
    return redis


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


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (nobody awaits it any more)."""
    if not future.cancelled():
        future.exception()


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


# -- settings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RedisSettings:
    """Where the server is and how to reach it; no I/O."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None
    socket_timeout: float | None = 30.0
    socket_connect_timeout: float = 5.0

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_keepalive": True,
        }
        if self.ssl:
            options.update(
                ssl=True, ssl_cert_reqs=self.ssl_cert_reqs, ssl_ca_certs=self.ssl_ca_certs
            )
        return options

    def __str__(self) -> str:
        """The server as a URL, without the password."""
        scheme = "rediss" if self.ssl else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def redis_settings(
    host: str,
    port: int,
    *,
    db: int,
    username: str | None,
    password: str | None,
    ssl: bool,
    url: str | None,
) -> tuple[RedisSettings, str | None]:
    """Settings from keyword arguments, or from ``url`` when one is given.

    Returns them with the key prefix the URL names (``?prefix=``), if any.
    """
    if url is None:
        return RedisSettings(host, int(port), int(db), username, password, bool(ssl)), None
    return _parse_url(url)


def _parse_url(url: str) -> tuple[RedisSettings, str | None]:
    """``redis://[[user]:password@]host[:port][/db][?option=value&...]``, ``rediss://`` for TLS."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"not a redis:// or rediss:// URL: {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigurationError(f"{url!r}: bad port ({exc})") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"{url!r}: unknown option {', '.join(unknown)}; URLs take {', '.join(_URL_OPTIONS)}"
        )
    path = parts.path.strip("/")
    db_text = query.get("db", path or "0")
    if path and "db" in query and path != query["db"]:
        raise ConfigurationError(f"{url!r} names two databases")
    if not db_text.isdigit():
        raise ConfigurationError(f"{url!r}: the database must be a number, not {db_text!r}")
    options: dict[str, Any] = {}
    if "ssl_cert_reqs" in query:
        options["ssl_cert_reqs"] = query["ssl_cert_reqs"]
    if "ssl_ca_certs" in query:
        options["ssl_ca_certs"] = query["ssl_ca_certs"]
    if "socket_timeout" in query:
        options["socket_timeout"] = float(query["socket_timeout"])
    settings = RedisSettings(
        host=unquote(parts.hostname or "localhost"),
        port=port,
        db=int(db_text),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        ssl=parts.scheme == "rediss",
        **options,
    )
    return settings, query.get("prefix") or None


# -- scripts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str
    #: Changes data: reads through ``fence()`` wait for it (see ``RedisConnector.eval``).
    writes: bool


_HELPERS = "-- Helpers."
_DEFINES = re.compile(r"^local (?:function )?(\w+)", re.MULTILINE)
_COMMENT = re.compile(r"--[^\n]*")


def load_script(name: str, *, header: bool = True, writes: bool = True) -> Script:
    """``<name>.lua`` from this package, after ``schema.lua`` (the key schema and helpers)."""
    folder = resources.files(__package__)
    source = folder.joinpath(f"{name}.lua").read_text()
    if header:
        source = _with_helpers(folder.joinpath("schema.lua").read_text(), source)
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest(), writes)


def _with_helpers(schema: str, body: str) -> str:
    """The schema's prologue, the helpers ``body`` uses (directly or through others), ``body``."""
    prologue, mark, rest = schema.partition(_HELPERS)
    intro, _, helpers = rest.partition("\n\n")
    blocks: list[tuple[str, str]] = []
    for block in helpers.strip().split("\n\n"):
        defined = _DEFINES.search(block)
        assert defined is not None, f"schema.lua: a helper block defines nothing: {block!r}"
        blocks.append((defined.group(1), block))
    used: set[str] = set()
    code = _COMMENT.sub("", body)
    while True:
        more = {n for n, b in blocks if n not in used and re.search(rf"\b{n}\b", code)}
        if not more:
            break
        used |= more
        code += "".join(_COMMENT.sub("", b) for n, b in blocks if n in more)
    kept = "".join(block + "\n\n" for n, block in blocks if n in used)
    return f"{prologue}{mark}{intro}\n\n{kept}{body}"


# -- one loop's client ------------------------------------------------------------------------
class LoopClient:
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
        self._lifetime: AsyncIterator[None] | None = None

    async def start(self) -> None:
        lifetime = self._live()
        # The first step registers the generator with the running loop, whose
        # shutdown (asyncio.run, asyncio.Runner) then finalizes it: see _live.
        await lifetime.__anext__()
        self._lifetime = lifetime

    async def _live(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self._shutdown()

    async def close(self) -> None:
        lifetime, self._lifetime = self._lifetime, None
        if lifetime is not None:
            await lifetime.aclose()  # type: ignore[attr-defined]
        await self._shutdown()

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


class Link(asyncio.Protocol):
    """One pipelined connection of a loop, for commands the server answers at once.

    Each request is written as it is made and its reply resolves its future, in
    order: concurrent calls share one socket with no pool checkout, lock or
    per-call bookkeeping in the driver (a third of the CPU of redis-py's
    asyncio client per call), and the server runs them in the order they were
    made. A caller cancelled while waiting leaves its reply to be read and
    dropped: the connection stays usable. Blocking commands never go here, as
    every reply behind them would wait too.
    """

    def __init__(self, connector: RedisConnector) -> None:
        import hiredis

        self._errors = connector._redis.exceptions
        self._reader = hiredis.Reader(replyError=connector._parse_error)
        self._timeout = connector.settings.socket_timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._sent: deque[float] = deque()  # when each pending request was written
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def request(self, packed: bytes) -> asyncio.Future[Any]:
        """Send one packed command; the future gets its reply (an error reply raises)."""
        if self.closed or self._transport is None:
            raise self._errors.ConnectionError("the connection to Redis was closed")
        future = self._loop.create_future()
        self._pending.append(future)
        if self._timeout is not None:
            self._sent.append(self._loop.time())
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(self._sent[0] + self._timeout, self._expire)
        self._transport.write(packed)
        return future

    def data_received(self, data: bytes) -> None:
        reader, pending, sent = self._reader, self._pending, self._sent
        reader.feed(data)
        while pending:
            try:
                reply = reader.gets()
            except Exception as exc:  # a protocol error: nothing after it can be trusted
                self._abort(self._errors.ConnectionError(f"bad reply from Redis: {exc}"))
                return
            if reply is False:
                return
            future = pending.popleft()
            if sent:
                sent.popleft()
            if future.done():
                continue  # its caller was cancelled
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _expire(self) -> None:
        """No reply within the socket timeout: the connection is dead or the server hangs."""
        self._watchdog = None
        if not self._sent or self._timeout is None:
            return
        if self._loop.time() - self._sent[0] >= self._timeout:
            self._abort(self._errors.TimeoutError("Timeout reading from Redis"))
        else:
            self._watchdog = self._loop.call_at(self._sent[0] + self._timeout, self._expire)

    def _abort(self, error: Exception) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(self._errors.ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, deque()
        self._sent.clear()
        for future in pending:
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self._fail(self._errors.ConnectionError("the connection to Redis was closed"))
        if self._transport is not None:
            self._transport.close()


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
            entry = self._loops.get(asyncio.get_running_loop())
            if entry is None or entry.closed:
                entry = await self._open()
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
            entry = self._loops.get(asyncio.get_running_loop())
            if entry is None or entry.closed:
                entry = await self._open()
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
            entry = self._loops.get(asyncio.get_running_loop())
            try:
                if entry is None or entry.closed:
                    entry = await self._open()
                link = entry.link
                if link is None or link.closed:
                    link = await self._open_link(entry)
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
            entry = self._loops.get(asyncio.get_running_loop())
            try:
                if entry is None or entry.closed:
                    entry = await self._open()
                link = entry.link
                if link is None or link.closed:
                    link = await self._open_link(entry)
                futures = [link.request(command) for command in packed]
                try:
                    return [await future for future in futures]
                except BaseException:
                    for future in futures:
                        future.add_done_callback(_retrieve)
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
            entry = self._loops.get(asyncio.get_running_loop())
            try:
                if entry is None or entry.closed:
                    entry = await self._open()
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
        if isinstance(exc, self._fatal):
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
        local = self._local.__dict__
        conn = local.get("conn") if local.get("fork") == _forks[0] else None
        if conn is None:
            conn = self._thread_connection()
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
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


class BlockingConnection:
    """One thread's connection for blocking calls: ``call`` sends a command and
    returns its reply (an error reply raises); ``disconnect`` drops the socket,
    and the next call connects again."""

    def call(self, command: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError


class DriverConnection(BlockingConnection):
    """A redis-py connection (TLS, or no hiredis)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def call(self, command: tuple[Any, ...]) -> Any:
        self._conn.send_command(*command, check_health=False)
        return self._conn.read_response()

    def disconnect(self) -> None:
        self._conn.disconnect()


class SocketConnection(BlockingConnection):
    """A plain socket and a hiredis reader: the sync ``enqueue``'s round trip with
    nothing around the two system calls (the blocking twin of ``Link``)."""

    def __init__(self, connector: RedisConnector) -> None:
        import hiredis

        assert connector._pack is not None
        self._pack = connector._pack
        self._settings = connector.settings
        self._errors = connector._redis.exceptions
        self._parse_error = connector._parse_error
        self._reader = hiredis.Reader(replyError=self._parse_error)
        self._sock: socket.socket | None = None
        self._buffer = bytearray(65536)

    def _connect(self) -> socket.socket:
        s = self._settings
        try:
            sock = socket.create_connection((s.host, s.port), s.socket_connect_timeout)
        except TimeoutError as exc:
            raise self._errors.TimeoutError(f"connecting to {s}: timed out") from exc
        except OSError as exc:
            raise self._errors.ConnectionError(f"connecting to {s}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(s.socket_timeout)
        import hiredis

        self._sock, self._reader = sock, hiredis.Reader(replyError=self._parse_error)
        try:
            if s.password is not None:
                user = () if s.username is None else (s.username,)
                self.call(("AUTH", *user, s.password))
            if s.db:
                self.call(("SELECT", s.db))
        except BaseException:
            self.disconnect()
            raise
        return sock

    def call(self, command: tuple[Any, ...]) -> Any:
        sock = self._sock or self._connect()
        reader, buffer = self._reader, self._buffer
        try:
            sock.sendall(self._pack(command))
            reply = reader.gets()
            while reply is False:
                size = sock.recv_into(buffer)
                if not size:
                    raise self._errors.ConnectionError("Redis closed the connection")
                reader.feed(buffer, 0, size)  # type: ignore[arg-type]  # any buffer will do
                reply = reader.gets()
        except TimeoutError as exc:
            self.disconnect()
            raise self._errors.TimeoutError("Timeout talking to Redis") from exc
        except OSError as exc:
            self.disconnect()
            raise self._errors.ConnectionError(f"Error talking to Redis: {exc}") from exc
        if isinstance(reply, Exception):
            raise reply
        return reply

    def disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


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
        try:
            await asyncio.wait({future}, timeout=timeout)
        finally:
            self._waiters.pop(future, None)
        if future.done():
            future.result()  # raises what the listener met

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
            claimed.add_done_callback(_retrieve)  # fails or lands with the connection
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
