"""Event storage on a NATS JetStream stream with a retention limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .._errors import ConfigurationError
from .._events import Event, EventType
from .._nats import (
    Connector,
    JetStreamError,
    Link,
    Outgoing,
    nats_settings,
    parse_url,
    rfc3339,
    stream_name,
    token,
)
from .base import EventStorage

if TYPE_CHECKING:
    import ssl

_NS = 1_000_000_000
_PAGE = 512
_decoder = msgspec.msgpack.Decoder(Event)
_encode = msgspec.msgpack.Encoder().encode
#: Events reach the server after they happen; a query starts this much before
#: ``since`` in server time, so a client clock ahead of the server's loses none.
_CLOCK_SLACK = 300.0


class NATSEventStorage(EventStorage):
    """Events as messages on ``<stream>.<task id>.<type>`` in a limits stream.

    The stream keeps events for ``max_age`` seconds (default a week), and at
    most ``max_msgs`` events and ``max_bytes`` bytes when those are given: the
    server drops the oldest beyond them. Queries by task id or type read only
    the matching subjects (batched direct gets); ``since`` starts the read at
    that time. Connection arguments as for :class:`omniq.queue.nats.NATSTaskQueue`.
    """

    schemes = ("nats",)

    def __init__(
        self,
        servers: str | Sequence[str] = ("nats://localhost:4222",),
        *,
        stream: str = "OMNIQ_EVENTS",
        max_age: float | None = 7 * 24 * 3600.0,
        max_msgs: int | None = None,
        max_bytes: int | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        name: str | None = None,
        replicas: int = 1,
        retry_timeout: float = 30.0,
    ) -> None:
        self.settings = nats_settings(
            servers, user=user, password=password, token=token, creds=creds, tls=tls,
            name=name, retry_timeout=retry_timeout,
        )  # fmt: skip
        self.stream = stream_name(stream, "stream")
        for limit, what in ((max_age, "max_age"), (max_msgs, "max_msgs"), (max_bytes, "max_bytes")):
            if limit is not None and limit <= 0:
                raise ConfigurationError(f"{what} must be positive (or None for no limit)")
        self.max_age, self.max_msgs, self.max_bytes = max_age, max_msgs, max_bytes
        self.replicas = replicas
        self._connector = Connector(self.settings, self._ensure_stream)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NATSEventStorage:
        servers, credentials, query = parse_url(url, ("stream",))
        return cls(servers, **{**credentials, **query, **options})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.settings)!r}, stream={self.stream!r})"

    async def _ensure_stream(self, link: Link) -> None:
        config = {
            "name": self.stream,
            "subjects": [f"{self.stream}.>"],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas,
            "discard": "old",
            "allow_direct": True,
            "max_age": int((self.max_age or 0) * _NS),
            "max_msgs": self.max_msgs or -1,
            "max_bytes": self.max_bytes or -1,
        }
        found = await link.ensure_stream(config, f"stream {self.stream}")
        if found is None:
            return
        if any(found.get(k) != config[k] for k in ("max_age", "max_msgs", "max_bytes")):
            # The retention asked for now wins: it is this deployment's setting.
            await link.api(f"STREAM.UPDATE.{self.stream}", {**found, **config})

    async def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        link = await self._connector.link()
        outgoing = [
            Outgoing(f"{self.stream}.{token(e.task_id)}.{e.type.value}", _encode(e)) for e in events
        ]
        for ack in await link.publish_many(outgoing):
            if ack.error is not None:
                raise JetStreamError(f"appending events to {self.stream}", ack.error)

    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        if limit is not None and limit <= 0:
            return []
        link = await self._connector.link()
        task = "*" if task_id is None else token(task_id)
        subject = f"{self.stream}.{task}.{'*' if type is None else type.value}"
        request: dict[str, Any] = {"next_by_subj": subject, "batch": _PAGE}
        if since is not None:
            request["start_time"] = rfc3339(max(0.0, since - _CLOCK_SLACK))
        else:
            request["seq"] = 1
        found: list[Event] = []
        while True:
            page = await link.direct_get(self.stream, request)
            for message in page:
                event = _decoder.decode(message.data)
                if (since is None or event.at >= since) and (until is None or event.at < until):
                    found.append(event)
                    if limit is not None and len(found) >= limit:
                        return found
            if not page:
                return found
            request = {"seq": page[-1].seq + 1, "next_by_subj": subject, "batch": _PAGE}

    async def close(self) -> None:
        await self._connector.close()
