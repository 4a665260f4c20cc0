"""Encoding tasks and results to bytes: msgspec MessagePack, optionally signed.

One encode per task: the whole ``Task`` is encoded once at enqueue and stored
as an opaque payload; backends keep the few fields they order on (queue,
priority, due time) and the mutable state (status, attempts, lease) beside it.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

import msgspec

from ._errors import SerializationError
from ._task import Task

_MAC_SIZE = 32


class TamperedPayloadError(ValueError):
    """A signed payload whose signature does not match: written by someone without the key."""


class Serializer:
    """Encodes tasks and result values with msgspec MessagePack.

    Supported argument types are MessagePack/JSON types plus datetimes, dates,
    UUIDs, Decimals, bytes, enums, msgspec Structs and dataclasses. Anything
    else is refused at ``enqueue`` with :class:`SerializationError`, so nothing
    half-usable is ever stored.

    With ``secret_key`` every payload carries an HMAC-SHA256, and a payload
    whose signature does not match is refused when read (the task is moved to
    failed with that reason instead of being run).
    """

    def __init__(self, secret_key: bytes | str | None = None) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._task_decoder = msgspec.msgpack.Decoder(Task)
        self._value_decoder = msgspec.msgpack.Decoder()
        if isinstance(secret_key, str):
            secret_key = secret_key.encode()
        self._key = secret_key

    # -- tasks ---------------------------------------------------------------
    def encode_task(self, task: Task) -> bytes:
        try:
            body = self._encoder.encode(task)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"cannot enqueue {task.func}: an argument is not serializable ({exc}). "
                "Pass MessagePack/JSON types, datetimes, UUIDs, Decimals, bytes, "
                "msgspec Structs or dataclasses."
            ) from exc
        return self._sign(body)

    def decode_task(self, payload: bytes) -> Task:
        """Decode a stored payload; raises ``ValueError`` when it is corrupt or tampered."""
        body = self._verify(payload)
        try:
            return self._task_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"undecodable task payload: {exc}") from exc

    # -- result values ---------------------------------------------------------
    def encode_value(self, value: Any) -> bytes:
        try:
            return self._sign(self._encoder.encode(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"result is not serializable: {exc}") from exc

    def decode_value(self, payload: bytes) -> Any:
        return self._value_decoder.decode(self._verify(payload))

    # -- signing -----------------------------------------------------------------
    def _sign(self, body: bytes) -> bytes:
        if self._key is None:
            return body
        return hmac.new(self._key, body, hashlib.sha256).digest() + body

    def _verify(self, payload: bytes) -> bytes:
        if self._key is None:
            return payload
        mac, body = payload[:_MAC_SIZE], payload[_MAC_SIZE:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise TamperedPayloadError("payload signature does not match the secret key")
        return body


DEFAULT_SERIALIZER = Serializer()


class PickleSerializer(Serializer):
    """Pickle instead of msgspec, for arguments and results of any picklable type.

    An explicit opt-in: unpickling runs code chosen by whoever wrote the payload,
    so use it only when everyone who can write to the queue is trusted, and
    preferably with ``secret_key`` so a worker refuses payloads it did not sign.
    Functions are still referenced by import path.
    """

    def encode_task(self, task: Task) -> bytes:
        try:
            return self._sign(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"cannot enqueue {task.func}: {exc}") from exc

    def decode_task(self, payload: bytes) -> Task:
        body = self._verify(payload)
        try:
            task = pickle.loads(body)
        except Exception as exc:
            raise ValueError(f"undecodable task payload: {exc}") from exc
        if not isinstance(task, Task):
            raise ValueError(f"payload is a {type(task).__name__}, not a Task")
        return task

    def encode_value(self, value: Any) -> bytes:
        try:
            return self._sign(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"result is not picklable: {exc}") from exc

    def decode_value(self, payload: bytes) -> Any:
        return pickle.loads(self._verify(payload))
