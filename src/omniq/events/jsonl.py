"""Event log as JSON Lines: one event per line, append-only, readable with any tool.

A local file is appended to in place; on other fsspec filesystems (object stores
cannot append) each batch is one more ``.jsonl`` object under the URL.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgspec

from .. import _fs
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

    ``path`` may also be an fsspec URL (``s3://bucket/events``, with
    ``storage_options``). Object stores cannot append, so there each batch is
    written as one object ``<path>/<time>-<writer>-<n>.jsonl`` (names sort in
    write order; batches of several writers never mix) and ``query`` reads them
    all in name order.
    """

    schemes = ("file", "jsonl", "s3")

    def __init__(
        self,
        path: str | os.PathLike[str] = "omniq_events.jsonl",
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        text = os.fspath(path)
        self.url: str | None = None if "://" not in text else text.rstrip("/")
        self.path = Path(text) if self.url is None else Path(text.partition("://")[2])
        self.storage_options = dict(storage_options or {})
        self._store: _fs.Store | None = None
        self._root = ""
        self._writer = f"{os.getpid():x}{time.time_ns() & 0xFFFFFF:06x}"
        self._batches = itertools.count()
        self._lock = threading.Lock()
        self._file: io.FileIO | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Event)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> JSONLEventStorage:
        """``file:///abs/path.jsonl``, ``file://relative.jsonl``, ``jsonl://path``, or any
        other fsspec URL (``s3://bucket/events``)."""
        if "://" in url and _fs.protocol_of(url) in _fs.EXCLUSIVE:
            return cls(url, **options)  # an object store, or fsspec's memory filesystem
        return cls(_path_from_url(url), **options)

    def _remote(self) -> _fs.Store:
        assert self.url is not None
        with self._lock:
            if self._store is None:
                fs, self._root = _fs.open_fs(self.url, self.storage_options)
                self._store = _fs.Store(fs, _fs.protocol_of(self.url))
            return self._store

    async def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        data = self._encoder.encode_lines(events)
        if self.url is not None:
            # A new object per batch: fixed-width time first, so names sort in write order.
            name = f"{time.time_ns():016x}-{self._writer}-{next(self._batches):08x}.jsonl"
            store = self._remote()
            await store.write(f"{self._root}/{name}", data)
            return
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
        if self.url is not None:
            store = self._remote()
            names = [n for n in await store.names(self._root) if n.endswith(".jsonl")]
            chunks = await store.gather(store.read(f"{self._root}/{n}") for n in names)
            lines = (line for chunk in chunks if chunk for line in chunk.splitlines())
            return select(self._decode(lines), task_id, type, since, until, limit)
        return await asyncio.to_thread(self._query, task_id, type, since, until, limit)

    async def close(self) -> None:
        with self._lock:
            file, self._file = self._file, None
            self._store = None
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
