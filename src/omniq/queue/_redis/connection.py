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
import threading
import time
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
_URL_OPTIONS = ("db", "prefix", "ssl_cert_reqs", "ssl_ca_certs", "socket_timeout")


def driver() -> ModuleType:
    """redis-py, imported now; a clear error when it is missing."""
    try:
        import redis.asyncio
        import redis.backoff
        import redis.exceptions
        import redis.retry
    except ImportError as exc:
        raise MissingDependencyError(
            f"the Redis backend needs the redis-py driver: {INSTALL_HINT}"
        ) from exc
    return redis


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
        self._lock = threading.Lock()
        self._loops: dict[asyncio.AbstractEventLoop, LoopClient] = {}
        self._idle: list[LoopClient] = []  # on loops not running at close(): theirs to finalize
        #: Blocking calls: a connection per thread, made by one redis-py pool.
        self._local = threading.local()
        self._pool: Any = None
        self._pool_pid = 0
        self._threads: list[tuple[threading.Thread, Any]] = []

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
        conn = local.get("conn") if local.get("pid") == os.getpid() else None
        if conn is None:
            conn = self._thread_connection()
        deadline: float | None = None
        delay = RETRY_FIRST
        while True:
            try:
                try:
                    conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    return conn.read_response()
                except self._noscript:
                    conn.send_command("SCRIPT", "LOAD", script.source)
                    conn.read_response()
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

    def _thread_connection(self) -> Any:
        """This thread's connection, made on first use. One per producer thread, used
        directly: no pool checkout per call (which costs a socket poll in redis-py)."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                retry = self._redis.retry.Retry(self._redis.backoff.NoBackoff(), 0)
                client = self._redis.Redis(**self.settings.client_options(), retry=retry)
                self._pool, self._pool_pid = client.connection_pool, os.getpid()
                self._threads = []
            conn = self._pool.make_connection()
            # Close connections of threads that ended (thread-per-request servers).
            alive = [(t, c) for t, c in self._threads if t.is_alive()]
            for _, dead in set(self._threads) - set(alive):
                dead.disconnect()
            self._threads = [*alive, (threading.current_thread(), conn)]
        self._local.conn, self._local.pid = conn, os.getpid()
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


class Doorbell:
    """Blocking on wake-up lists (BLPOP), shared by every waiter on one loop.

    One BLPOP at a time per list of keys and loop, however many coroutines
    wait. A waiter that gives up (timeout, cancel) never cancels the Redis call,
    since cancelling a blocking command costs its connection; a token that
    arrives when nobody waits any more is pushed back for other consumers.
    A connection error wakes every waiter: their next claim retries with
    backoff until the server is back.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self._waiters: dict[asyncio.Future[None], float] = {}
        self._task: asyncio.Task[None] | None = None

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
        client = entry.client
        try:
            while self._waiters:
                block = max(self._waiters.values()) - loop.time()
                block = min(max(block, MIN_BLOCK), MAX_BLOCK)
                try:
                    reply = await client.execute_command("BLPOP", *self.keys, block)
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
                    await self._hand_back(client, connector, reply)
        finally:
            self._task = None
            self._ring()  # nobody sleeps on a listener that is gone
            task = asyncio.current_task()
            if task is not None:
                entry.tasks.discard(task)

    async def _hand_back(
        self, client: Any, connector: RedisConnector, reply: Sequence[Any]
    ) -> None:
        try:
            await client.execute_command("LPUSH", reply[0], reply[1])
        except connector.error as exc:
            log.debug("could not hand a wake-up token back: %s", exc)
