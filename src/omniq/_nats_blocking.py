"""Publishing to JetStream from synchronous code, on a plain socket of the caller's thread.

The sync facade's ``enqueue`` would otherwise hand each call to its bridge loop's
thread and back: two thread hops cost more than the publish round trip itself,
and nats-py's own per-message work comes on top. ``BlockingPublisher`` speaks the
few lines of the NATS client protocol a publish needs (``INFO``, ``CONNECT``,
``PING``/``PONG``, ``SUB``, ``HPUB``, ``MSG``/``HMSG``) on a blocking socket: a
batch is one write and one wait for all its acknowledgements.

Each thread gets its own connection, opened on first use. A publish whose
acknowledgement does not come is sent again, on a new connection if need be,
until the settings' ``retry_timeout``; ``Nats-Msg-Id`` makes that safe (the
server answers ``duplicate`` for what the first attempt stored).
Credentials files need an NKey signature, which this module does not do:
``can_log_in(settings)`` is False for them and callers use nats-py instead.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from . import __version__
from ._errors import OmniQError
from ._nats import (
    ANSWER_TIMEOUT,
    JetStreamError,
    NATSSettings,
    Outgoing,
    PubAck,
    collect_acks,
    unacknowledged,
    wire_message,
)

#: Pause between attempts to reach a server that went away.
_RECONNECT_WAIT = 0.1


class ServerRefused(OmniQError):
    """The server refused the connection or a publish (``-ERR``): retrying will not help."""


def can_log_in(settings: NATSSettings) -> bool:
    """Whether ``BlockingPublisher`` can log in with these settings."""
    return settings.creds is None


class _Lost(Exception):
    """The connection broke or an answer did not come in time."""


class _Wire:
    """One thread's connection: a socket, its read buffer and its reply inbox."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.max_payload = 1 << 20
        self.buffer = bytearray()
        self.inbox = "_INBOX." + secrets.token_hex(11)
        self.calls = 0
        self.pid = os.getpid()

    def subscribe(self) -> None:
        """Take the replies to this connection's inbox (the server keeps the order: the
        subscription is in place before any publish that follows)."""
        self._send(f"SUB {self.inbox}.> 1\r\n".encode())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- publishing -------------------------------------------------------------------
    def request_many(self, messages: Sequence[Outgoing], deadline: float) -> list[bytes | None]:
        """Send ``messages``, replies to this call's inbox; the replies, None where none came."""
        self.calls += 1
        prefix = f"{self.inbox}.{self.calls}."
        out = bytearray()
        for index, (subject, payload, headers) in enumerate(messages):
            out += wire_message(subject, f"{prefix}{index}", payload, headers, self.max_payload)
        try:
            self.sock.sendall(out)
        except OSError as exc:
            raise _Lost(exc) from exc
        replies: list[bytes | None] = [None] * len(messages)
        left = len(messages)
        while left:
            subject, data, status = self._next_message(deadline)
            if not subject.startswith(prefix):
                continue  # the late answer of an earlier, abandoned call
            index = int(subject[len(prefix) :])
            if status == "503":
                raise JetStreamError(
                    f"publish to {messages[index].subject}",
                    {"code": 503, "description": "no stream takes this subject (no responders)"},
                )
            if replies[index] is None:
                replies[index] = data
                left -= 1
        return replies

    # -- reading ------------------------------------------------------------------------
    def _next_message(self, deadline: float) -> tuple[str, bytes, str | None]:
        """The next ``MSG``/``HMSG`` as (subject, payload, status); answers pings meanwhile."""
        while True:
            line = self.line(deadline)
            if line.startswith(b"MSG "):
                parts = line.split()
                size = int(parts[-1])
                return parts[1].decode(), self._exactly(size + 2, deadline)[:-2], None
            if line.startswith(b"HMSG "):
                parts = line.split()
                head_size, size = int(parts[-2]), int(parts[-1])
                blob = self._exactly(size + 2, deadline)
                status_line = bytes(blob[: blob.find(b"\r\n")]).split()
                status = status_line[1].decode() if len(status_line) > 1 else None
                return parts[1].decode(), bytes(blob[head_size:size]), status
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                error = line[5:].decode(errors="replace")
                if "stale connection" in error.lower():
                    raise _Lost(error)  # missed pings while idle: a new connection will do
                raise ServerRefused(f"the NATS server refused: {error}")
            # +OK, PONG and INFO (cluster updates) need nothing

    def line(self, deadline: float) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            self._fill(deadline)

    def _exactly(self, size: int, deadline: float) -> bytes:
        while len(self.buffer) < size:
            self._fill(deadline)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Lost("no answer in time")
        try:
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
        except (OSError, ssl.SSLError) as exc:  # socket.timeout is an OSError
            raise _Lost(exc) from exc
        if not chunk:
            raise _Lost("the server closed the connection")
        self.buffer += chunk

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Lost(exc) from exc


class BlockingPublisher:
    """JetStream publishes from synchronous code: a socket per calling thread, no event loop.

    ``publish_many`` has the contract of ``Link.publish_many``: every message is
    acknowledged (retried across a lost server until ``retry_timeout``) or it raises.
    """

    def __init__(self, settings: NATSSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._wires: list[tuple[threading.Thread, _Wire]] = []
        self._next_server = 0

    def publish_many(self, messages: Sequence[Outgoing]) -> list[PubAck]:
        if not messages:
            return []
        acks: list[PubAck | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        deadline = time.monotonic() + self.settings.retry_timeout
        attempt = 0
        while True:
            try:
                wire = self._wire(deadline)
                replies = wire.request_many(
                    [messages[i] for i in todo], min(deadline, time.monotonic() + ANSWER_TIMEOUT)
                )
            except _Lost:
                self._drop()
                replies = [None] * len(todo)
            todo = collect_acks(acks, todo, replies, retried=attempt > 0)
            if not todo:
                return [ack for ack in acks if ack is not None]
            if time.monotonic() >= deadline:
                raise unacknowledged(len(todo), self.settings)
            attempt += 1

    def close(self) -> None:
        """Close every thread's connection (a thread's next publish opens a new one)."""
        with self._lock:
            wires, self._wires = self._wires, []
            self._local = threading.local()
        for _, wire in wires:
            wire.close()

    # -- connections --------------------------------------------------------------------
    def _wire(self, deadline: float) -> _Wire:
        wire: _Wire | None = getattr(self._local, "wire", None)
        if wire is not None and wire.pid == os.getpid():
            return wire
        while True:
            try:
                wire = self._connect()
                break
            except _Lost:
                if time.monotonic() + _RECONNECT_WAIT >= deadline:
                    raise
                time.sleep(_RECONNECT_WAIT)  # the server is restarting: wait, then try the next
        self._local.wire = wire
        with self._lock:
            dead = [w for t, w in self._wires if not t.is_alive()]
            self._wires = [(t, w) for t, w in self._wires if t.is_alive()]
            self._wires.append((threading.current_thread(), wire))
        for old in dead:
            old.close()
        return wire

    def _drop(self) -> None:
        wire: _Wire | None = getattr(self._local, "wire", None)
        self._local.wire = None
        if wire is not None:
            with self._lock:
                self._wires = [(t, w) for t, w in self._wires if w is not wire]
            wire.close()

    def _connect(self) -> _Wire:
        """Log in to the next server of the list (one round trip: ``CONNECT`` + ``PING``)."""
        servers = self.settings.servers
        server = servers[self._next_server % len(servers)]
        self._next_server += 1
        url = urlsplit(server if "://" in server else "nats://" + server)
        host, port = url.hostname or "localhost", url.port or 4222
        deadline = time.monotonic() + self.settings.connect_timeout
        try:
            sock = socket.create_connection((host, port), timeout=self.settings.connect_timeout)
        except OSError as exc:
            raise _Lost(exc) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wire = _Wire(sock)
            info = wire.line(deadline)
            if not info.startswith(b"INFO "):
                raise _Lost(f"not a NATS server at {host}:{port}")
            details: dict[str, Any] = json.loads(info[5:])
            tls = bool(self.settings.tls) or url.scheme == "tls" or details.get("tls_required")
            if tls:
                context = (
                    self.settings.tls
                    if isinstance(self.settings.tls, ssl.SSLContext)
                    else ssl.create_default_context()
                )
                sock = wire.sock = context.wrap_socket(sock, server_hostname=host)
            options = self._connect_options(url, bool(tls))
            wire._send(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
            while True:
                line = wire.line(deadline)
                if line == b"PONG":
                    break
                if line.startswith(b"-ERR"):
                    raise ServerRefused(
                        f"NATS at {host}:{port} refused the connection: "
                        f"{line[5:].decode(errors='replace')}"
                    )
            wire.max_payload = int(details.get("max_payload", wire.max_payload))
            wire.subscribe()
            return wire
        except BaseException:
            sock.close()
            raise

    def _connect_options(self, url: Any, tls: bool) -> dict[str, Any]:
        settings = self.settings
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "tls_required": tls,
            "name": settings.name or "omniq",
            "lang": "python",
            "version": __version__,
            "protocol": 1,
            "headers": True,
            "no_responders": True,
        }
        user = settings.user if settings.user is not None else url.username
        password = settings.password if settings.password is not None else url.password
        if settings.token is not None:
            options["auth_token"] = settings.token
        elif user is not None and password is None:
            options["auth_token"] = unquote(user)  # nats://token@host
        elif user is not None:
            options["user"], options["pass"] = unquote(user), unquote(password or "")
        return options
