"""Result storage in a NATS JetStream key-value bucket, each result expiring by message TTL."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .._errors import ConfigurationError
from .._nats import (
    Connector,
    JetStreamError,
    Link,
    NATSSettings,
    Outgoing,
    nats_settings,
    parse_url,
    status_of,
    stream_name,
    token,
)
from .base import ResultStorage, TaskResult

if TYPE_CHECKING:
    import ssl

    from nats.aio.msg import Msg

_decoder = msgspec.msgpack.Decoder(TaskResult)
_encode = msgspec.msgpack.Encoder().encode
_NS = 1_000_000_000
#: The exact expiry (Unix time); the server's TTL, in whole seconds, only cleans up.
_EXPIRES = "Omniq-Expires"
_GONE = ("DEL", "PURGE")
#: A watch consumer the server deletes once its waiter is gone this long.
_WATCH_IDLE = 30 * _NS


class NATSResultStorage(ResultStorage):
    """Results in the key-value bucket ``bucket`` (stream ``KV_<bucket>``), one key per task.

    Same connection arguments as :class:`omniq.queue.nats.NATSTaskQueue`. A
    result with a ttl carries a per-message TTL (``Nats-TTL``, whole seconds,
    rounded up), so the server drops it, and its exact expiry, which ``get``
    honours. ``wait`` watches the key (an ephemeral consumer on its subject,
    delivering the last value and then each new one): no polling.
    The bucket is a standard one: ``nats kv get <bucket> <key>`` reads it.
    """

    schemes = ("nats",)

    def __init__(
        self,
        servers: str | Sequence[str] = ("nats://localhost:4222",),
        *,
        bucket: str = "OMNIQ_RESULTS",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        name: str | None = None,
        replicas: int = 1,
        retry_timeout: float = 30.0,
    ) -> None:
        settings = nats_settings(
            servers, user=user, password=password, token=token, creds=creds, tls=tls,
            name=name, retry_timeout=retry_timeout,
        )  # fmt: skip
        if replicas < 1:
            raise ConfigurationError("replicas must be at least 1")
        self._setup_storage(settings, bucket, replicas)

    def _setup_storage(self, settings: NATSSettings, bucket: str, replicas: int) -> None:
        self.settings = settings
        self.bucket = stream_name(bucket, "bucket")
        self.replicas = replicas
        self._stream = f"KV_{self.bucket}"
        self._connector = Connector(settings, self._ensure_bucket)

    @classmethod
    def _for(cls, settings: NATSSettings, bucket: str) -> NATSResultStorage:
        storage = cls.__new__(cls)
        storage._setup_storage(settings, bucket, 1)
        return storage

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NATSResultStorage:
        servers, credentials, query = parse_url(url, ("bucket",))
        return cls(servers, **{**credentials, **query, **options})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.settings)!r}, bucket={self.bucket!r})"

    def _key(self, task_id: str) -> str:
        return f"$KV.{self.bucket}.{token(task_id)}"

    async def _ensure_bucket(self, link: Link) -> None:
        config = {
            "name": self._stream,
            "subjects": [f"$KV.{self.bucket}.>"],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas,
            "max_msgs_per_subject": 1,
            "discard": "new",
            "allow_direct": True,
            "allow_rollup_hdrs": True,
            "deny_delete": True,
            "allow_msg_ttl": True,
            "duplicate_window": 120 * _NS,
        }
        await link.ensure_stream(config, f"bucket {self.bucket}")

    # -- the contract -----------------------------------------------------------------------
    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        if not results:
            return
        link = await self._connector.link()
        now = time.time()
        outgoing = []
        for result, ttl in results:
            headers = None
            if ttl is not None:
                headers = {
                    "Nats-TTL": str(max(1, math.ceil(ttl))),
                    _EXPIRES: repr(now + ttl),
                }
            outgoing.append(Outgoing(self._key(result.task_id), _encode(result), headers))
        for ack in await link.publish_many(outgoing):
            if ack.error is not None:
                raise JetStreamError(f"storing results in {self.bucket}", ack.error)

    async def get(self, task_id: str) -> TaskResult | None:
        link = await self._connector.link()
        found = await link.get_last(self._stream, self._key(task_id))
        return None if found is None else _value(found.data, found.headers)

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        result = await self.get(task_id)
        if result is not None or (timeout is not None and timeout <= 0):
            return result
        link = await self._connector.link()
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future[TaskResult] = loop.create_future()

        async def on_value(msg: Msg) -> None:
            if status_of(msg) is None and not arrived.done():
                value = _value(msg.data, msg.headers or {})
                if value is not None:
                    arrived.set_result(value)

        inbox = link.nc.new_inbox()
        subscription = await link.nc.subscribe(inbox, cb=on_value)
        name = ""
        try:
            answer = await link.api(
                f"CONSUMER.CREATE.{self._stream}",
                {
                    "stream_name": self._stream,
                    "config": {
                        "deliver_subject": inbox,
                        "filter_subject": self._key(task_id),
                        "deliver_policy": "last_per_subject",
                        "ack_policy": "none",
                        "mem_storage": True,
                        "num_replicas": 1,
                        "inactive_threshold": _WATCH_IDLE,
                    },
                },
            )
            name = answer["name"]
            done, _ = await asyncio.wait({arrived}, timeout=timeout)
            return arrived.result() if done else None
        finally:
            if not link.closed:
                await subscription.unsubscribe()
            if name and not link.closed:
                await link.nc.publish(f"$JS.API.CONSUMER.DELETE.{self._stream}.{name}", b"")

    async def delete(self, task_id: str) -> None:
        link = await self._connector.link()
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": "1"}
        [ack] = await link.publish_many([Outgoing(self._key(task_id), b"", headers)])
        if ack.error is not None:
            raise JetStreamError(f"deleting a result in {self.bucket}", ack.error)

    async def close(self) -> None:
        await self._connector.close()


def _value(data: bytes, headers: dict[str, str]) -> TaskResult | None:
    """A stored value, or None for a delete marker or an expired result."""
    if headers.get("KV-Operation") in _GONE:
        return None
    expires = headers.get(_EXPIRES)
    if expires is not None and float(expires) <= time.time():
        return None
    return _decoder.decode(data)
