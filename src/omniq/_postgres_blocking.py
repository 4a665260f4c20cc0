"""Running one prepared statement from synchronous code, on a plain socket of the caller's thread.

The sync facade's ``enqueue`` would otherwise run asyncpg on a private event
loop: the loop's turn, asyncpg's futures and its statement cache cost about as
much as the INSERT itself. ``BlockingStatement`` speaks the part of PostgreSQL's
frontend/backend protocol (version 3.0) that one prepared statement needs:
startup and login (trust, password, MD5, SCRAM-SHA-256), ``Parse`` once per
connection, then ``Bind``/``Execute``/``Sync`` in one write per call, with all
values in binary.

It is a fast path, not a second driver. Whatever it does not do is left to
asyncpg, which the caller then uses instead (``Unavailable``):

* a DSN it cannot read exactly as asyncpg would (several hosts, Unix sockets,
  query parameters other than ``sslmode``, ``connect_options``, a ``.pgpass``
  password);
* TLS: with ``sslmode`` ``disable``, ``allow`` or ``prefer`` it asks the server
  first and uses a plain socket only where the server has no TLS, as asyncpg
  would; ``require`` and stricter always go to asyncpg;
* a lost connection or a failed statement: asyncpg's path retries, reconnects
  and raises the proper exception.

Each thread gets its own connection, opened on first use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("omniq.postgres")

#: Type OIDs of the parameters this module sends (binary format).
TEXT, INT4, FLOAT8, BYTEA = 25, 23, 701, 17

_CONNECT_TIMEOUT = 10.0
_PROTOCOL_3_0 = 196608
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_SYNC = b"S\x00\x00\x00\x04"
_EXECUTE_SYNC = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00" + _SYNC  # unnamed portal, all rows
_STATEMENT = b"omniq\x00"
_PORTAL_AND_STATEMENT = b"\x00" + _STATEMENT  # the unnamed portal
_BINARY = b"\x00\x01\x00\x01"  # one format code, binary, for every value
_PLAIN_SSLMODES = ("disable", "allow", "prefer")
_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5 = 0, 3, 5
_AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = 10, 11, 12
_int32 = struct.Struct("!i")
_int16 = struct.Struct("!h")
_header = struct.Struct("!ci")


class Unavailable(Exception):
    """This call needs asyncpg: nothing was stored, or the outcome is unknown."""


@dataclass(frozen=True)
class Login:
    """Where and as whom to connect, resolved the way asyncpg resolves a DSN."""

    host: str
    port: int
    user: str
    password: str | None = field(repr=False)
    database: str
    sslmode: str


def login_for(dsn: str, connect_options: dict[str, Any]) -> Login | None:
    """The login for ``dsn``, or None where only asyncpg can connect as the caller meant."""
    if connect_options:
        return None
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or "," in parts.netloc:
        return None
    query = dict(parse_qsl(parts.query))
    if set(query) - {"sslmode"}:
        return None
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    host = host or os.environ.get("PGHOST")
    user = unquote(parts.username) if parts.username else os.environ.get("PGUSER")
    if not host or host.startswith("/") or "," in host or not user:
        return None
    sslmode = query.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer"
    if sslmode not in _PLAIN_SSLMODES:
        return None
    password = unquote(parts.password) if parts.password else os.environ.get("PGPASSWORD")
    database = unquote(parts.path.lstrip("/")) or os.environ.get("PGDATABASE") or user
    return Login(host, port or int(os.environ.get("PGPORT") or 5432), user, password,
                 database, sslmode)  # fmt: skip


class _Declined(Exception):
    """The server wants something this module does not do (TLS, a missing password…)."""


class _Lost(Exception):
    """The connection broke."""


class _Wire:
    """One thread's connection, with the statement prepared on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.pid = os.getpid()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- statements ---------------------------------------------------------------------
    def prepare(self, sql: str, param_types: Sequence[int]) -> None:
        # Named: the server caches a generic plan (an unnamed statement is planned per call).
        body = _STATEMENT + sql.encode() + b"\x00" + _int16.pack(len(param_types))
        body += b"".join(_int32.pack(oid) for oid in param_types)
        self.send(b"P" + _int32.pack(len(body) + 4) + body + _SYNC)
        _, failed = self.until_ready()
        if failed:
            raise Unavailable(failed)  # the schema may change: not a lasting refusal

    def fetchval(self, params: Sequence[bytes]) -> bytes | None:
        """Run the prepared statement; the first column of its first row (binary)."""
        parts = [_PORTAL_AND_STATEMENT, _BINARY, _int16.pack(len(params))]
        for value in params:
            parts += (_int32.pack(len(value)), value)
        parts.append(_BINARY)
        body = b"".join(parts)
        self.send(b"B" + _int32.pack(len(body) + 4) + body + _EXECUTE_SYNC)
        row, failed = self.until_ready()
        if failed:
            raise Unavailable(failed)
        return None if row is None else _first_column(row)

    def until_ready(self) -> tuple[bytes | None, str | None]:
        """Read up to ``ReadyForQuery``: the first data row, and the error if there was one."""
        row = failed = None
        while True:
            kind, body = self.message()
            if kind == b"Z":
                return row, failed
            if kind == b"D":
                row = row or body
            elif kind == b"E":
                failed = error_message(body)
            # BindComplete, ParseComplete, CommandComplete, notices, parameter status

    # -- bytes --------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Lost(exc) from exc

    def message(self) -> tuple[bytes, bytes]:
        buffer = self.buffer
        while len(buffer) < 5:
            buffer += self._recv()
        kind, length = _header.unpack_from(buffer)
        end = length + 1
        while len(buffer) < end:
            buffer += self._recv()
        self.buffer = buffer[end:]
        return kind, buffer[5:end]

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            raise _Lost(exc) from exc
        if not data:
            raise _Lost("the server closed the connection")
        return data


def _first_column(row: bytes) -> bytes | None:
    if _int16.unpack_from(row)[0] == 0:
        return None
    size = _int32.unpack_from(row, 2)[0]
    return None if size < 0 else row[6 : 6 + size]


def error_message(body: bytes) -> str:
    """The text of an ``ErrorResponse``: its SQLSTATE and message fields."""
    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\x00") if f}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"


class BlockingStatement:
    """``sql`` prepared on a plain socket per calling thread: ``fetchval(params)``.

    ``params`` are binary values of ``param_types`` (:data:`TEXT`, :data:`INT4`…).
    Raises :class:`Unavailable` where the caller should run the statement with
    asyncpg instead; after a refusal that will not change (TLS, a login method
    this module lacks) it does so at once, without trying again.
    """

    def __init__(self, login: Login, sql: str, param_types: Sequence[int]) -> None:
        self.login = login
        self.sql = sql
        self.param_types = tuple(param_types)
        self.declined: str | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._wires: list[_Wire] = []

    def fetchval(self, params: Sequence[bytes]) -> bytes | None:
        wire: _Wire | None = getattr(self._local, "wire", None)
        if wire is None or wire.pid != os.getpid():
            wire = self._connect()
        try:
            return wire.fetchval(params)
        except Unavailable:
            self._drop(wire)  # a failed statement: start afresh (it may be a changed schema)
            raise
        except _Lost as exc:
            self._drop(wire)
            raise Unavailable(str(exc)) from exc

    def close(self) -> None:
        """Close every thread's connection (a thread's next call opens a new one)."""
        with self._lock:
            wires, self._wires = self._wires, []
            self._local = threading.local()
        for wire in wires:
            wire.close()

    # -- connections --------------------------------------------------------------------
    def _connect(self) -> _Wire:
        if self.declined is not None:
            raise Unavailable(self.declined)
        try:
            sock = socket.create_connection((self.login.host, self.login.port), _CONNECT_TIMEOUT)
        except OSError as exc:
            raise Unavailable(str(exc)) from exc
        wire = _Wire(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished host
            self._log_in(wire)
            wire.prepare(self.sql, self.param_types)
            sock.settimeout(None)
        except Unavailable:
            wire.close()
            raise
        except _Declined as exc:
            wire.close()
            self.declined = str(exc)
            log.info("PostgreSQL: the sync enqueue goes through asyncpg (%s)", self.declined)
            raise Unavailable(self.declined) from exc
        except (_Lost, OSError) as exc:
            wire.close()
            raise Unavailable(str(exc)) from exc
        self._local.wire = wire
        with self._lock:
            self._wires.append(wire)
        return wire

    def _drop(self, wire: _Wire) -> None:
        self._local.wire = None
        with self._lock:
            self._wires = [w for w in self._wires if w is not wire]
        wire.close()

    def _log_in(self, wire: _Wire) -> None:
        login = self.login
        if login.sslmode != "disable":
            wire.send(_SSL_REQUEST)
            answer = wire.sock.recv(1)
            if answer == b"S":
                raise _Declined("the server offers TLS: asyncpg connects")
            if answer != b"N":
                raise _Lost(f"unexpected answer to the TLS request: {answer!r}")
        params = {
            "user": login.user,
            "database": login.database,
            "application_name": "omniq",
            "client_encoding": "UTF8",
        }
        body = _int32.pack(_PROTOCOL_3_0)
        body += b"".join(f"{k}\x00{v}\x00".encode() for k, v in params.items()) + b"\x00"
        wire.send(_int32.pack(len(body) + 4) + body)
        authentication = _Authentication(login)
        while True:
            kind, body = wire.message()
            if kind == b"R":
                reply = authentication.reply(_int32.unpack_from(body)[0], body[4:])
                if reply is not None:
                    wire.send(b"p" + _int32.pack(len(reply) + 4) + reply)
            elif kind == b"E":
                raise _Declined(error_message(body))
            elif kind == b"Z":
                return
            # ParameterStatus, BackendKeyData, NegotiateProtocolVersion, notices


class _Authentication:
    """The client's side of a login: ``reply(code, data)`` answers each ``Authentication*``
    message (None: nothing to send)."""

    def __init__(self, login: Login) -> None:
        self.login = login
        self.scram: _Scram | None = None

    def reply(self, code: int, data: bytes) -> bytes | None:
        if code == _AUTH_OK:
            return None
        if code == _AUTH_SASL_CONTINUE and self.scram is not None:
            return self.scram.final_message(data)
        if code == _AUTH_SASL_FINAL:
            if self.scram is None or not self.scram.verify(data):
                raise _Declined("the server's SCRAM signature does not match")
            return None
        password = self.login.password
        if password is None:
            raise _Declined("the server asks for a password: asyncpg looks it up")
        if code == _AUTH_CLEARTEXT:
            return password.encode() + b"\x00"
        if code == _AUTH_MD5:
            return _md5_password(self.login.user, password, data[:4])
        if code == _AUTH_SASL and b"SCRAM-SHA-256\x00" in data:
            self.scram = _Scram(password)
            first = self.scram.first_message()
            return b"SCRAM-SHA-256\x00" + _int32.pack(len(first)) + first
        raise _Declined(f"login method {code} is left to asyncpg")


def _md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\x00"


class _Scram:
    """SCRAM-SHA-256 without channel binding (RFC 5802, RFC 7677), as PostgreSQL uses it:
    the user name is the startup message's, so the exchange sends an empty one."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.client_first_bare = f"n=,r={self.nonce}"
        self.auth_message = b""
        self.salted = b""

    def first_message(self) -> bytes:
        return f"n,,{self.client_first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        if not fields["r"].startswith(self.nonce):
            raise _Declined("the server's SCRAM nonce does not extend ours")
        salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
        self.salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        without_proof = f"c=biws,r={fields['r']}"
        self.auth_message = (
            f"{self.client_first_bare},{server_first.decode()},{without_proof}".encode()
        )
        client_key = _hmac(self.salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), self.auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        fields = dict(item.split("=", 1) for item in server_final.decode().split(","))
        expected = _hmac(_hmac(self.salted, b"Server Key"), self.auth_message)
        return hmac.compare_digest(base64.b64decode(fields.get("v", "")), expected)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()
