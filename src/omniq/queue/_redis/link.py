"""``Link``: one pipelined asyncio connection to the server, an ``asyncio.Protocol``
fed by a hiredis reader. The connector sends scripts and other commands the
server answers at once through it (and blocking ones on links of their own),
at a third of the CPU per call of redis-py's asyncio client. Used only for
plain TCP with hiredis installed; TLS stays with redis-py."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import RedisConnector


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
