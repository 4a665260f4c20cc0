"""Connections to NATS, shared by the JetStream queue, result and event storages.

The driver (nats-py) is imported when a component is built, never when ``omniq``
is imported; without it, building one raises ``MissingDependencyError`` naming
the extra to install.

A nats-py connection belongs to the event loop that opened it, and one OmniQ
component may be used from several loops (the sync facade's bridge loop, a
test's loop, ``asyncio.run`` in a thread). ``Connector`` keeps one ``Link``
(a connection plus what a component keeps with it) per loop, opened on that
loop's first call. Each link is tied to an async generator started on its loop,
so ``asyncio.run`` and ``asyncio.Runner``, which finalize async generators
before closing a loop, close its connection too; ``close()`` closes them all
earlier.

JetStream is spoken directly, not through nats-py's JetStream context: a link
has one wildcard reply subscription, and every publish acknowledgement, batched
direct get and pull delivery comes back on it, routed by the second-to-last
tokens of the reply subject. A batch of publishes is one write and one wait
for all their acknowledgements, which is what makes ``enqueue_many``,
``ack_many`` and ``set_many`` one round trip each.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import itertools
import json
import logging
import math
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn
from urllib.parse import parse_qsl, unquote

import msgspec

from ._errors import ConfigurationError, OmniQError, certificate_rejected, import_driver
from ._looplife import ClosedWithLoop
from .queue._wakeup import Wakeup, wake

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

log = logging.getLogger("omniq.nats")

DEFAULT_SERVER = "nats://localhost:4222"
#: Longest wait for one JetStream answer while the connection is up.
ANSWER_TIMEOUT = 5.0
#: Error codes of the JetStream API that the backends act on.
WRONG_LAST_SEQUENCE = 10071
CONSUMER_EXISTS = 10148
CONSUMER_NOT_FOUND = 10014
STREAM_NOT_FOUND = 10059
NO_MESSAGE_FOUND = 10037

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def driver() -> ModuleType:
    """nats-py, imported now; a clear error when it is missing."""
    return import_driver(
        "nats", "nats.aio.client", "nats.errors",
        needed_by="the NATS backend needs the nats-py driver", extra="nats",
    )  # fmt: skip


def token(name: str) -> str:
    """``name`` as one subject token, consumer-name part and key-value key.

    Plain names (letters, digits, ``-``, ``_``; up to 64) stay as they are, so
    subjects read well in ``nats stream view``; anything else becomes ``=``
    and a URL-safe base64 of it, or ``==`` and a hash when that is long too.
    No plain name starts with ``=``, so two names never share a token.
    """
    if _SAFE_TOKEN.match(name):
        return name
    encoded = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
    if len(encoded) <= 96:
        return "=" + encoded
    return "==" + hashlib.sha256(name.encode()).hexdigest()[:40]


def stream_name(name: str, what: str) -> str:
    if not name or not _SAFE_TOKEN.match(name):
        raise ConfigurationError(
            f"{what} {name!r} is not a valid JetStream name: use letters, digits, - and _"
        )
    return name


def rfc3339(timestamp: float) -> str:
    """A Unix time as RFC 3339 in UTC, rounded *up* to the microsecond (never early)."""
    micros = math.ceil(timestamp * 1_000_000)
    if micros / 1_000_000 < timestamp:
        micros += 1
    seconds, micros = divmod(micros, 1_000_000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"


# -- settings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NATSSettings:
    """Where the servers are and how to log in; no I/O.

    ``creds`` is the path of a ``.creds`` file (JWT and NKey seed); ``tls`` an
    ``ssl.SSLContext``, or True for the system's default context (servers
    given as ``tls://…`` turn it on too).
    """

    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: ssl.SSLContext | bool | None = None
    name: str | None = None
    connect_timeout: float = 5.0
    #: How long an operation rides out a lost server before it raises.
    retry_timeout: float = 30.0

    def connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name or "omniq",
            "connect_timeout": self.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.1,
            "skip_subject_validation": True,
        }
        if self.user is not None:
            options["user"] = self.user
        if self.password is not None:
            options["password"] = self.password
        if self.token is not None:
            options["token"] = self.token
        if self.creds is not None:
            options["user_credentials"] = self.creds
        if isinstance(self.tls, ssl.SSLContext):
            options["tls"] = self.tls
        elif self.tls:
            options["tls"] = ssl.create_default_context()
        return options

    def __str__(self) -> str:
        """The servers, without credentials."""
        return ",".join(_without_userinfo(s) for s in self.servers)


def _without_userinfo(server: str) -> str:
    scheme, sep, rest = server.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else server.rpartition("@")[2]


def nats_settings(
    servers: str | Sequence[str],
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds: str | None = None,
    tls: ssl.SSLContext | bool | None = None,
    name: str | None = None,
    connect_timeout: float = 5.0,
    retry_timeout: float = 30.0,
) -> NATSSettings:
    listed = [servers] if isinstance(servers, str) else list(servers)
    if not listed:
        raise ConfigurationError("servers must name at least one NATS server")
    for server in listed:
        if not isinstance(server, str) or not server:
            raise ConfigurationError(f"not a NATS server address: {server!r}")
    if retry_timeout < 0 or connect_timeout <= 0:
        raise ConfigurationError("timeouts must be positive")
    return NATSSettings(
        tuple(listed), user, password, token, creds, tls, name, connect_timeout, retry_timeout
    )


def parse_url(url: str, options: Sequence[str]) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    """``nats://[user:password@|token@]host[:port][,host[:port]…][?option=value]``.

    Returns the server URLs, the credentials found in the URL (as keyword
    arguments) and the query options, which must be among ``options``.
    ``tls://`` URLs turn TLS on.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("nats", "tls"):
        raise ConfigurationError(f"not a nats:// URL: {url!r}")
    rest, _, fragment = rest.partition("#")
    location, _, query = rest.partition("?")
    location = location.rstrip("/")
    if "/" in location:
        raise ConfigurationError(f"{url!r}: a NATS URL has no path; options go in ?option=value")
    credentials: dict[str, Any] = {}
    userinfo, at, hosts = location.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if colon:
            credentials.update(user=unquote(user), password=unquote(password))
        else:
            credentials["token"] = unquote(user)
    if not hosts:
        raise ConfigurationError(f"{url!r} names no server")
    servers = []
    for host in hosts.split(","):
        if not host:
            raise ConfigurationError(f"{url!r}: empty server in the list")
        servers.append(f"{scheme}://{host}")
    if scheme == "tls":
        credentials["tls"] = True
    found = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(found) - set(options))
    if unknown or fragment:
        allowed = ", ".join(options) or "none"
        raise ConfigurationError(
            f"{url!r}: unknown option {', '.join(unknown) or '#' + fragment}; URLs take {allowed}"
        )
    return servers, credentials, found


# -- JetStream messages -----------------------------------------------------------------
class ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    """What JetStream answers to a publish: the stored sequence, or an error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None

    @property
    def conflict(self) -> bool:
        """An ``Expected-Last-Subject-Sequence`` check failed: someone wrote first."""
        return self.error is not None and self.error.err_code == WRONG_LAST_SEQUENCE


_pub_ack = msgspec.json.Decoder(PubAck)


def collect_acks(
    acks: list[PubAck | None], todo: list[int], replies: Sequence[bytes | None], *, retried: bool
) -> list[int]:
    """Decode into ``acks`` the replies to the messages ``todo``; the indexes still unanswered.

    On a retry, ``duplicate`` means our own earlier attempt stored the message.
    """
    missing = []
    for index, reply in zip(todo, replies, strict=True):
        if reply is None:
            missing.append(index)
            continue
        ack = _pub_ack.decode(reply)
        if retried and ack.duplicate:
            ack.duplicate = False
        acks[index] = ack
    return missing


def unacknowledged(count: int, settings: NATSSettings) -> TimeoutError:
    return TimeoutError(f"JetStream did not acknowledge {count} publishes ({settings})")


class JetStreamError(OmniQError):
    """The JetStream API answered an error (the stream or consumer is misconfigured, say)."""

    def __init__(self, what: str, error: dict[str, Any] | ApiError) -> None:
        if isinstance(error, ApiError):
            error = msgspec.structs.asdict(error)
        self.code = int(error.get("code", 0))
        self.err_code = int(error.get("err_code", 0))
        super().__init__(f"{what}: {error.get('description', error)} (code {self.err_code})")


class Stored(NamedTuple):
    """A message read back from a stream (direct get)."""

    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]


class Delivery(NamedTuple):
    """A message a subscription of ours received (a pull delivery, say)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None = None


def status_of(msg: Msg | Delivery) -> str | None:
    headers = msg.headers
    return headers.get("Status") if headers else None


def stored(msg: Msg) -> Stored:
    headers = msg.headers or {}
    return Stored(headers["Nats-Subject"], int(headers["Nats-Sequence"]), msg.data, headers)


class Outgoing(NamedTuple):
    """One message of a batch of publishes."""

    subject: str
    payload: bytes
    headers: dict[str, str] | None = None


# -- one loop's connection ----------------------------------------------------------------
class _Answers:
    """What a request waits for: ``finish()`` once every answer is in. ``future``
    wakes the waiter (``Link._await``), which may also wake it on a timeout."""

    __slots__ = ("finished", "future")

    def __init__(self) -> None:
        self.finished = False
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(self) -> None:
        self.finished = True
        wake(self.future)


class _Batch(_Answers):
    __slots__ = ("left", "replies")

    def __init__(self, size: int) -> None:
        super().__init__()
        self.replies: list[bytes | None] = [None] * size
        self.left = size


class _Collector(_Answers):
    __slots__ = ("end", "messages", "single")

    def __init__(self, single: bool) -> None:
        super().__init__()
        self.messages: list[Msg] = []
        self.end: dict[str, str] = {}
        self.single = single


def wire_message(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None, max_payload: int
) -> bytes:
    """One ``PUB`` (or ``HPUB``, with headers) command of the NATS protocol.

    Our subjects are valid tokens and our header names constants (nats-py would
    check every character of both on every publish, which costs more than the
    rest of a publish). A message over ``max_payload`` is refused here: the
    server would close the connection on it.
    """
    target = (f"{subject} {reply}" if reply else subject).encode()
    if not headers:
        if len(payload) > max_payload:
            _too_big(len(payload), max_payload)
        return b"PUB %s %d\r\n%s\r\n" % (target, len(payload), payload)
    head = "".join([f"{k}: {v}\r\n" for k, v in headers.items()]).encode()
    size = len(head) + 12  # "NATS/1.0\r\n" + head + "\r\n"
    if size + len(payload) > max_payload:
        _too_big(size + len(payload), max_payload)
    return b"HPUB %s %d %d\r\nNATS/1.0\r\n%s\r\n%s\r\n" % (
        target,
        size,
        size + len(payload),
        head,
        payload,
    )


def _too_big(size: int, max_payload: int) -> NoReturn:
    raise OmniQError(
        f"a message of {size} bytes exceeds the NATS server's max_payload ({max_payload})"
    )


def status_headers(raw: bytes) -> dict[str, str] | None:
    """The headers of a status message (``NATS/1.0 404 No Messages``), else None.

    Deliveries carry their message's own headers, which nothing of ours reads:
    only statuses (the end of a pull, a heartbeat) are parsed.
    """
    first, _, rest = raw.partition(b"\r\n")
    status = first[9:].strip()
    if not status:
        return None
    code, _, description = status.decode(errors="replace").partition(" ")
    headers = {"Status": code, "Description": description}
    for line in rest.split(b"\r\n"):
        key, colon, value = line.decode(errors="replace").partition(":")
        if colon:
            headers[key.strip()] = value.strip()
    return headers


#: nats-py's ``Client._process_msg`` parameters that ``_fast_path`` relies on.
_PROCESS_MSG_PARAMETERS = ["sid", "subject", "reply", "data", "headers"]


FastHandler = Callable[[str, str, bytes, "dict[str, str] | None"], None]


class _GiveUp(Exception):
    """Raised from nats-py's error callback to end its first connect (nats-py lets
    through what is neither an ``OSError`` nor one of its own errors)."""


#: How long closing a client whose first connect failed may take. nats-py's close
#: waits for its stream to close, which never happens after a failed TLS handshake
#: (asyncio's stream keeps the protocol that start_tls replaced).
_ABANDON_WAIT = 1.0


async def _abandon(nc: Any) -> None:
    """Close a client whose first connect failed or was cut short."""
    try:
        await asyncio.wait_for(nc.close(), _ABANDON_WAIT)
    except Exception as exc:  # already half torn down: nothing left to save
        log.debug("closing an unconnected NATS client: %r", exc)


def _fast_path(nc: Client) -> dict[int, tuple[FastHandler, bool]] | None:
    """Route the messages of our own subscriptions straight to their handlers.

    nats-py hands every message to a per-subscription queue and task, then awaits
    its callback, after parsing every header character by character: several loop
    steps, a ``Msg`` and ~30 µs per delivery, most of a worker's cost per task.
    On a client not yet connected, this puts ``FastParser`` in place of nats-py's
    parser (``_nats_parser``): a pull delivery (its headers parsed only for a
    status) or a header-less publish acknowledgement goes from the read to its
    handler at once. Messages that still reach ``nc._process_msg`` (those nats-py's
    own parser read) are routed the same way. ``handlers`` maps a subscription id
    to its handler and whether it takes messages with headers; other messages
    take nats-py's path. None (everything takes nats-py's path) when nats-py's
    method or parser is not the one this was written for.
    """
    from nats.protocol.parser import Parser

    from ._nats_parser import FastParser

    original = getattr(nc, "_process_msg", None)
    if original is None or type(getattr(nc, "_ps", None)) is not Parser:
        return None
    try:
        parameters = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return None
    if parameters != _PROCESS_MSG_PARAMETERS:
        return None
    handlers: dict[int, tuple[FastHandler, bool]] = {}

    def hand_over(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        found = handlers.get(sid)
        if found is None or (headers is not None and not found[1]):
            return False
        try:
            parsed = status_headers(headers) if headers is not None else None
            found[0](subject.decode(), reply.decode(), data, parsed)
        except Exception:  # never into nats-py's read loop, which would drop the connection
            log.exception("a NATS message handler failed")
        return True

    async def process_msg(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if not hand_over(sid, subject, reply, data, headers):
            await original(sid, subject, reply, data, headers)

    nc._process_msg = process_msg  # type: ignore[method-assign]
    nc._ps = FastParser(nc, hand_over)
    return handlers


class Link(ClosedWithLoop):
    """A connection on one event loop, with the replies it routes.

    ``generation`` counts events a waiter cares about (deliveries, reconnects,
    whatever a component ``ring``s for); ``changed`` waits for the next one.
    ``ext`` holds the component's own per-connection state.
    """

    def __init__(
        self,
        connector: Connector,
        nc: Client,
        fast: dict[int, tuple[FastHandler, bool]] | None = None,
    ) -> None:
        self.connector = connector
        self.nc = nc
        self.closed = False
        self.reconnects = 0
        self.ext: Any = None
        self.tasks: set[asyncio.Task[Any]] = set()
        #: Woken by ``ring``; its generation is ``generation``.
        self._bell = Wakeup()
        self._up = asyncio.Event()
        self._up.set()
        self._ids = itertools.count()
        self._batches: dict[str, _Batch] = {}
        self._collectors: dict[str, _Collector] = {}
        self.inbox = ""
        #: Handlers by subscription id, taking messages past nats-py (``_fast_path``).
        self._fast = fast
        self.on_reconnect: list[Callable[[], None]] = []

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        for kind in ("a", "g"):
            sub = await self.nc.subscribe(
                f"{self.inbox}.{kind}.>",
                cb=self._on_reply,
                pending_msgs_limit=-1,
                pending_bytes_limit=0,
            )
            if kind == "a" and self._fast is not None:
                self._fast[sub._id] = (self._on_ack, False)
        await self._close_with_loop()

    # -- connection state ---------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._bell.generation

    def ring(self) -> None:
        self._bell.notify()

    async def changed(self, since: int, timeout: float | None) -> None:
        """Return once ``generation`` differs from ``since``, or after ``timeout``."""
        if not self.closed:
            await self._bell.wait(timeout, since)

    def disconnected(self) -> None:
        self._up.clear()

    def reconnected(self) -> None:
        self.reconnects += 1
        self._up.set()
        for callback in self.on_reconnect:
            callback()
        self.ring()

    @property
    def up(self) -> bool:
        return self._up.is_set() and self.nc.is_connected

    async def until_up(self, timeout: float) -> bool:
        if self.up:
            return True
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return self.nc.is_connected

    # -- replies ----------------------------------------------------------------------------
    def reply_to(self, kind: str, *parts: object) -> str:
        return ".".join((self.inbox, kind, *map(str, parts)))

    async def listen(self, kind: str, handler: Callable[[Delivery], None]) -> Any:
        """Subscribe ``handler`` to ``reply_to(kind, …)``: deliveries of a consumer.

        JetStream delivers a consumer's messages with their own subject (only
        the subscription tells where they belong), so each delivery target
        gets a subscription of its own; statuses come on the reply subject.
        """

        async def deliver(msg: Msg) -> None:
            handler(Delivery(msg.subject, msg.reply, msg.data, msg.headers))

        sub = await self.nc.subscribe(
            f"{self.inbox}.{kind}.>", cb=deliver, pending_msgs_limit=-1, pending_bytes_limit=0
        )
        if self._fast is not None:
            self._fast[sub._id] = (lambda *message: handler(Delivery(*message)), True)
        return sub

    def _on_ack(self, subject: str, reply: str, data: bytes, headers: Any = None) -> None:
        """A publish acknowledgement (or request reply) to ``<inbox>.a.<batch>.<index>``."""
        _, batch_key, index = subject[len(self.inbox) + 1 :].split(".")
        batch = self._batches.get(batch_key)
        if batch is not None and batch.replies[int(index)] is None:
            batch.replies[int(index)] = data
            batch.left -= 1
            if batch.left == 0:
                batch.finish()

    async def _on_reply(self, msg: Msg) -> None:
        tokens = msg.subject[len(self.inbox) + 1 :].split(".")
        kind = tokens[0]
        if kind == "a":
            self._on_ack(msg.subject, msg.reply, msg.data)
        elif kind == "g":
            collector = self._collectors.get(tokens[1])
            if collector is not None:
                if status_of(msg) is None:
                    collector.messages.append(msg)
                    if collector.single:
                        collector.finish()
                elif not collector.finished:
                    collector.end = msg.headers or {}
                    collector.finish()

    # -- JetStream operations -----------------------------------------------------------------
    async def publish_many(
        self, messages: Sequence[Outgoing], *, retry: bool = True
    ) -> list[PubAck]:
        """Publish to JetStream and wait for every acknowledgement: one round trip.

        A message whose acknowledgement never comes (the server went away with
        it in flight) is published again once the connection is back, up to
        the settings' ``retry_timeout``; an answer that it is a duplicate
        (``Nats-Msg-Id``) then means it was stored by the first attempt.
        """
        if not messages:
            return []
        acks: list[PubAck | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        deadline = time.monotonic() + self.connector.settings.retry_timeout
        attempt = 0
        while True:
            replies = await self._send_batch([messages[i] for i in todo], deadline)
            todo = collect_acks(acks, todo, replies, retried=attempt > 0)
            if not todo:
                return [ack for ack in acks if ack is not None]
            if not retry or time.monotonic() >= deadline:
                raise unacknowledged(len(todo), self.connector.settings)
            attempt += 1

    async def request_many(self, messages: Sequence[Outgoing]) -> list[bytes | None]:
        """Send requests and wait (one round trip) for their replies; None where none came."""
        if not messages:
            return []
        deadline = time.monotonic() + self.connector.settings.retry_timeout
        return await self._send_batch(messages, deadline)

    async def _send_batch(
        self, messages: Sequence[Outgoing], deadline: float
    ) -> list[bytes | None]:
        key = str(next(self._ids))
        batch = _Batch(len(messages))
        self._batches[key] = batch
        prefix = f"{self.inbox}.a.{key}."
        try:
            await self.send(
                [
                    (subject, prefix + str(index), payload, headers)
                    for index, (subject, payload, headers) in enumerate(messages)
                ]
            )
            await self._await(batch, deadline)
            return batch.replies
        finally:
            del self._batches[key]

    async def send(self, messages: Sequence[tuple[str, str, bytes, dict[str, str] | None]]) -> None:
        """Publish ``(subject, reply, payload, headers)`` messages in one write.

        Without nats-py's per-message checks (see ``wire_message``). While
        connected, the write goes to the socket at once, behind whatever nats-py
        still holds: its flusher task would write it a loop turn later, and that
        turn is on the path of every claim. While (re)connecting, the messages
        wait in nats-py's pending buffer, which is kept across a reconnect.
        """
        nc = self.nc
        if not messages:
            return
        if nc.is_closed:
            raise ConnectionError(f"the NATS connection to {self.connector.settings} is closed")
        blob, max_payload = bytearray(), nc.max_payload
        for subject, reply, payload, headers in messages:
            blob += wire_message(subject, reply, payload, headers, max_payload)
        transport = nc._transport
        if nc.is_connected and transport is not None:
            pending, nc._pending, nc._pending_data_size = nc._pending, [], 0
            transport.writelines([*pending, bytes(blob)])
            return
        await nc._send_command(bytes(blob))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    async def _await(self, answers: _Answers, deadline: float) -> None:
        """Wait until ``answers`` are in: ``ANSWER_TIMEOUT`` while connected, longer
        across reconnects.

        The answers' own future is awaited, and a timer resolves it on timeout:
        the last answer then wakes this task directly, a loop turn sooner than
        through ``asyncio.wait``'s waiter (every claim waits here).
        """
        loop = asyncio.get_running_loop()
        while not answers.finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            reconnects = self.reconnects
            if answers.future.done():
                answers.future = loop.create_future()
            timer = loop.call_later(min(ANSWER_TIMEOUT, remaining), wake, answers.future)
            try:
                await answers.future
            finally:
                timer.cancel()
            if answers.finished:
                return
            if self.up and self.reconnects == reconnects:
                return  # connected all along: the answers are lost, not late
            await self.until_up(max(0.0, deadline - time.monotonic()))

    async def ensure_stream(self, config: dict[str, Any], what: str) -> dict[str, Any] | None:
        """Create the stream ``config`` names unless it exists; its existing config, or
        None when this call (or a racing one) created it. ``what`` names it in errors."""
        name = config["name"]
        answer = await self.api(f"STREAM.INFO.{name}", check=False)
        if "error" not in answer:
            found: dict[str, Any] = answer["config"]
            return found
        if answer["error"].get("err_code") != STREAM_NOT_FOUND:
            raise JetStreamError(what, answer["error"])
        answer = await self.api(f"STREAM.CREATE.{name}", config, check=False)
        if "error" in answer and "already in use" not in str(answer["error"]):
            raise JetStreamError(f"creating {what}", answer["error"])
        return None

    async def api(
        self, subject: str, body: dict[str, Any] | None = None, *, check: bool = True
    ) -> dict[str, Any]:
        """One JetStream API request (``$JS.API.<subject>``), retried across reconnects."""
        payload = json.dumps(body).encode() if body is not None else b""
        errors = self.connector.nats.errors
        deadline = time.monotonic() + self.connector.settings.retry_timeout
        while True:
            try:
                msg = await self.nc.request("$JS.API." + subject, payload, timeout=ANSWER_TIMEOUT)
            except (errors.TimeoutError, errors.NoRespondersError, asyncio.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"JetStream API {subject}: no answer ({exc!r})") from None
                await self.until_up(max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(0.05)
                continue
            answer: dict[str, Any] = json.loads(msg.data)
            if check and "error" in answer:
                raise JetStreamError(subject, answer["error"])
            return answer

    async def get_last(self, stream: str, subject: str) -> Stored | None:
        """The newest message on ``subject`` (wildcards allowed), or None."""
        found = await self.direct_get(stream, {"last_by_subj": subject}, single=True)
        return found[0] if found else None

    async def count(self, stream: str, subject: str) -> int:
        """How many messages are on ``subject`` (wildcards allowed), read from the stream itself."""
        request = {"seq": 1, "next_by_subj": subject, "batch": 1}
        found, end = await self._direct_get(stream, request, single=False)
        return len(found) + int(end.get("Nats-Num-Pending", 0)) if found else 0

    async def direct_get(
        self, stream: str, request: dict[str, Any], *, single: bool = False
    ) -> list[Stored]:
        """A direct get (``allow_direct``); batched requests return every message up to EOB."""
        return (await self._direct_get(stream, request, single=single))[0]

    async def _direct_get(
        self, stream: str, request: dict[str, Any], *, single: bool
    ) -> tuple[list[Stored], dict[str, str]]:
        payload = json.dumps(request).encode()
        deadline = time.monotonic() + self.connector.settings.retry_timeout
        while True:
            key = str(next(self._ids))
            collector = _Collector(single)
            self._collectors[key] = collector
            try:
                await self.nc.publish(
                    f"$JS.API.DIRECT.GET.{stream}", payload, reply=f"{self.inbox}.g.{key}"
                )
                await self._await(collector, deadline)
            finally:
                del self._collectors[key]
            if collector.finished:
                return [stored(m) for m in collector.messages], collector.end
            if time.monotonic() >= deadline:
                raise TimeoutError(f"direct get from {stream}: no answer")

    async def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ring()
        closing = self.connector.before_close
        if closing is not None:
            try:
                await closing(self)
            except Exception:  # the connection may be gone already
                log.debug("NATS link cleanup failed", exc_info=True)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.nc.close()
        except Exception:
            log.debug("closing the NATS connection failed", exc_info=True)


class Connector:
    """The NATS servers of one OmniQ component: a ``Link`` per event loop.

    ``setup(link)`` runs once per new link (subscriptions, streams); the
    component's ``before_close(link)`` runs before its connection closes.
    """

    def __init__(
        self,
        settings: NATSSettings,
        setup: Callable[[Link], Awaitable[None]] | None = None,
        before_close: Callable[[Link], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.nats = driver()
        self.setup = setup
        self.before_close = before_close
        self._lock = threading.Lock()
        self._links: dict[asyncio.AbstractEventLoop, Link] = {}
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Future[Link]] = {}
        self._idle: list[Link] = []

    def current(self) -> Link | None:
        """This loop's link if it is open (no I/O)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        link = self._links.get(loop)
        return None if link is None or link.closed else link

    async def link(self) -> Link:
        """This loop's link, opened (and set up) on first use."""
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is not None and not link.closed:
            return link
        opening = self._opening.get(loop)
        if opening is not None:
            return await asyncio.shield(opening)
        future: asyncio.Future[Link] = loop.create_future()
        self._opening[loop] = future
        try:
            link = await self._open(loop)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: only waiters that came meanwhile see it
            raise
        finally:
            del self._opening[loop]
        future.set_result(link)
        return link

    def _hopeless(self, exc: Exception) -> bool:
        """A connect error that every retry would meet again: a certificate that fails
        verification, credentials the server refuses (nats-py reports the server's
        "Authorization Violation" as a plain error)."""
        return (
            certificate_rejected(exc)
            or isinstance(exc, self.nats.errors.AuthorizationError)
            or "authorization violation" in str(exc).lower()
        )

    async def _open(self, loop: asyncio.AbstractEventLoop) -> Link:
        holder: list[Link] = []

        async def disconnected() -> None:
            if holder:
                holder[0].disconnected()

        async def reconnected() -> None:
            if holder:
                log.info("reconnected to NATS at %s", self.settings)
                holder[0].reconnected()

        # nats-py's first connect, told to reconnect forever, also retries forever:
        # it is bounded here, and given up at once where retrying cannot help.
        connecting, failures = True, list[Exception]()
        give_up_at = time.monotonic() + self.settings.retry_timeout

        async def error(exc: Exception) -> None:
            log.debug("NATS connection (%s): %r", self.settings, exc)
            if connecting:
                failures.append(exc)
                if self._hopeless(exc) or time.monotonic() >= give_up_at:
                    raise _GiveUp from exc  # raised from its error callback, it ends connect()

        nc = self.nats.NATS()
        fast = _fast_path(nc)  # before connecting: the parser is replaced before any read
        s = self.settings
        try:
            await asyncio.wait_for(
                nc.connect(
                    **s.connect_options(),
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                ),
                # The callback gives up after a failure past retry_timeout; this
                # bounds an attempt that neither fails nor succeeds.
                s.retry_timeout + s.connect_timeout,
            )
        except Exception as exc:
            await _abandon(nc)
            cause = failures[-1] if failures else exc  # what went wrong, not the time out
            raise ConnectionError(f"cannot connect to NATS at {s}: {cause}") from cause
        finally:
            connecting = False
        link = Link(self, nc, fast)
        holder.append(link)
        try:
            await link.start()
            if self.setup is not None:
                await self.setup(link)
        except BaseException:
            await link.close()
            raise
        with self._lock:
            for other in [lp for lp in self._links if lp.is_closed()]:
                del self._links[other]
            self._links[loop] = link
        return link

    async def close(self) -> None:
        """Close every loop's link: this loop's now, running loops' soon."""
        with self._lock:
            links, self._links = self._links, {}
            self._idle = [link for link in self._idle if not link.closed]
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, link in links.items():
            if loop is current:
                await link.close()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(link.close(), loop)
            elif not loop.is_closed():
                # Not running now: its shutdown finalizes the link; keep it referenced.
                self._idle.append(link)
