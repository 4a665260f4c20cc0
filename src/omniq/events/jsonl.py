"""Event log in a local JSON Lines file: one event per line, append-only, readable with any tool."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgspec

from .._events import Event, EventType
from .base import EventStorage
from .memory import select


class JSONLEventStorage(EventStorage):
    """Appends each batch of events to ``path`` as JSON lines, in one ``write``.

    The file is opened on the first append, in append mode and unbuffered, and
    kept open: each batch is a single ``write`` of all its lines, so it reaches
    the operating system (is flushed) before ``append`` returns, and with
    ``O_APPEND`` batches from several threads or processes never interleave
    within a line. A crash mid-write can leave a torn last line; ``query``
    skips lines that do not decode, and the next writer to open the file starts
    on a fresh line so the torn fragment does not swallow its first event.

    ``query`` scans the whole file, in a worker thread so a large file does
    not stall the event loop. Fine for a log that is rotated or kept small;
    use SQLite when queries must be fast.
    """

    schemes = ("file", "jsonl")

    def __init__(self, path: str | os.PathLike[str] = "omniq_events.jsonl") -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: io.FileIO | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Event)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> JSONLEventStorage:
        """``file:///abs/path.jsonl``, ``file://relative.jsonl`` or ``jsonl://path``."""
        return cls(_path_from_url(url), **options)

    async def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        data = self._encoder.encode_lines(events)
        with self._lock:
            if self._file is None:
                self._file = self._open()
            _write_all(self._file, data)

    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        return await asyncio.to_thread(self._query, task_id, type, since, until, limit)

    async def close(self) -> None:
        with self._lock:
            file, self._file = self._file, None
        if file is not None:
            file.close()

    def _open(self) -> io.FileIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_without_newline(self.path)
        file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open until close()
        if torn:
            _write_all(file, b"\n")
        return file

    def _query(
        self,
        task_id: str | None,
        type: EventType | None,
        since: float | None,
        until: float | None,
        limit: int | None,
    ) -> list[Event]:
        try:
            file = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return []
        with file:
            return select(self._decode(file), task_id, type, since, until, limit)

    def _decode(self, lines: Iterable[bytes]) -> Iterator[Event]:
        for line in lines:
            try:
                yield self._decoder.decode(line)
            except msgspec.DecodeError:  # a torn line, or one this version cannot read
                continue


def _write_all(file: io.FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view) :]


def _ends_without_newline(path: Path) -> bool:
    """True if ``path`` exists, is not empty, and its last line is unterminated."""
    try:
        with open(path, "rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _path_from_url(url: str) -> str:
    """The path after ``scheme://``: ``file:///a`` is ``/a``, ``file://a`` is ``a``.

    ``file://relative`` is not RFC 8089 (it would name a host), but it is how
    people write a relative path, and omniq only opens local files.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in JSONLEventStorage.schemes:
        raise ValueError(f"not a file:// or jsonl:// URL: {url!r}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"{url!r}: pass options as keyword arguments, not in the URL")
    path = unquote(rest)
    if not path:
        raise ValueError(f"{url!r} names no file")
    return path
