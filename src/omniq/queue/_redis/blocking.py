"""The connection one thread uses for blocking calls (the sync facade's
``enqueue``, through ``RedisConnector.eval_blocking``): a redis-py connection
(``DriverConnection``) or, for plain TCP with hiredis, a bare socket
(``SocketConnection``). Either is used directly, with no pool checkout per call."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import RedisConnector


class BlockingConnection:
    """One thread's connection for blocking calls: ``call`` sends a command (a
    tuple of arguments, or bytes already in RESP) and returns its reply (an error
    reply raises); ``disconnect`` drops the socket, and the next call connects again."""

    def call(self, command: tuple[Any, ...] | bytes) -> Any:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError


class DriverConnection(BlockingConnection):
    """A redis-py connection (TLS, or no hiredis)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def call(self, command: tuple[Any, ...] | bytes) -> Any:
        if isinstance(command, bytes):
            self._conn.send_packed_command([command], check_health=False)  # chunks
        else:
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

    def call(self, command: tuple[Any, ...] | bytes) -> Any:
        sock = self._sock or self._connect()
        reader, buffer = self._reader, self._buffer
        try:
            sock.sendall(command if isinstance(command, bytes) else self._pack(command))
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
