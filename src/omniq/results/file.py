"""Result storage as files: one name (or object) per result, with its expiry, over fsspec."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from .. import _doorbell, _fs
from .._fs import enc_id, time_key
from .base import ResultStorage, TaskResult

#: Expired results are invisible to ``get`` at once; deleting them is only about space,
#: done at most this often (seconds) per instance.
PRUNE_SECONDS = 60.0
#: Expiry markers on object stores are grouped by hour: a prune lists past hours only.
_BUCKET = 3600.0
#: The modification time of a local result that never expires (year 2242): prunes skip it.
_NEVER = float(2**33)

#: Files in ``results/.tmp`` this old were left by writers that died.
_LEFT_SECONDS = 3600.0
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
#: A pack: this, then a msgpack map of result name to its encoded entry.
_PACK = b"\0omniq-results1\n"

_Entry = tuple[float | None, TaskResult]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Entry).decode
_decode_pack = msgspec.msgpack.Decoder(dict[str, bytes]).decode


def _entry(data: bytes, name: str) -> _Entry | None:
    """The ``(expires_at, result)`` of result ``name`` in a file's ``data``; None if
    the file is not readable as one (or a pack without it)."""
    try:
        if data.startswith(_PACK):
            data = _decode_pack(memoryview(data)[len(_PACK) :]).get(name, b"")
        entry: _Entry = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return entry


def _write_file(path: str, data: bytes, stamp: float) -> None:
    """Create ``path`` (exclusively: a name left by a writer that died is replaced)
    holding ``data``, with modification time ``stamp`` (the expiry)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, _WRITE, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.utime(path, (stamp, stamp))


class FileResultStorage(ResultStorage):
    """Results under ``<base_dir>/results/<task id>``, each an msgpack ``(expires_at, result)``.

    ``base_dir`` is a local path, ``file://`` or any fsspec URL (``s3://bucket/prefix``;
    ``storage_options`` go to fsspec). Writes replace the whole file at once (a local
    rename or link, a single PUT), so a reader sees the old or the new result, never a
    torn one. Locally, the results of one ``set_many`` that expire together are one
    file linked under each of their names (one file created per batch).

    Expiry is checked on every read. Local files carry their expiry as modification
    time, so a prune (at most once a minute, in a thread) is one directory scan; on
    object stores an empty marker ``expiry/<hour>/<id>`` indexes each result with a
    ttl and a prune lists past hours only. ``wait`` sleeps on the directory's doorbell
    (inotify) locally and polls with a growing interval on object stores; results
    written in this process wake it at once either way.
    """

    schemes = ("file", "s3")

    def __init__(
        self,
        base_dir: str | os.PathLike[str] = "./omniq_results",
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        path = _fs.local_path(base_dir)
        self.base_dir = path if path is not None else os.fspath(base_dir).rstrip("/")
        self.is_local = path is not None
        self.storage_options = dict(storage_options or {})
        self._lock = threading.Lock()
        self._bell: _doorbell.Doorbell | None = None
        self._store: _fs.Store | None = None
        self._root = ""
        self._next_prune = 0.0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileResultStorage:
        return cls(url, **options)

    # -- where things are ----------------------------------------------------------
    def _dir(self) -> str:
        return os.path.join(self.base_dir, "results")

    def _local_bell(self) -> _doorbell.Doorbell:
        with self._lock:
            if self._bell is None:
                os.makedirs(os.path.join(self._dir(), ".tmp"), exist_ok=True)
                self._bell = _doorbell.acquire(Path(self._dir()) / ".doorbell")
            return self._bell

    def _remote(self) -> _fs.Store:
        with self._lock:
            if self._store is None:
                protocol = _fs.protocol_of(self.base_dir)
                fs, root = _fs.open_fs(self.base_dir, self.storage_options)
                self._store, self._root = _fs.Store(fs, protocol), f"{root}/results"
            return self._store

    def _wakeup(self) -> Any:
        if self.is_local:
            return self._local_bell().wakeup
        self._remote()
        return _fs.shared_wakeup(_fs.protocol_of(self.base_dir), self._root)

    # -- the contract -----------------------------------------------------------------
    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        if not results:
            return
        now = time.time()
        entries = [(enc_id(r.task_id), None if ttl is None else now + ttl, r) for r, ttl in results]
        if self.is_local:
            self._write_local(entries)
            self._local_bell().ring()
        else:
            await self._write_remote(entries)
            self._wakeup().notify()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_SECONDS
            await self._prune(now)

    def _write_local(self, entries: list[tuple[str, float | None, TaskResult]]) -> None:
        """Each result a file of its own, or the results of a batch that expire together
        one file (a pack) under as many names (hard links): one file created per batch."""
        directory = self._dir()
        self._local_bell()
        writer = f"{os.getpid()}.{threading.get_ident()}"
        groups: dict[float | None, dict[str, bytes]] = {}
        for name, expires, result in entries:
            groups.setdefault(expires, {})[name] = _encode((expires, result))
        for expires, group in groups.items():
            stamp = _NEVER if expires is None else expires
            if len(group) == 1:
                [(name, data)] = group.items()
                tmp = f"{directory}/.tmp/{name}.{writer}"
                _write_file(tmp, data, stamp)
                os.replace(tmp, f"{directory}/{name}")
                continue
            stage = f"{directory}/.tmp/pack.{writer}.{time.time_ns():x}"
            _write_file(stage, _PACK + _encode(group), stamp)
            try:
                for name in group:
                    try:
                        os.link(stage, f"{directory}/{name}")
                    except FileExistsError:  # a result written before: replaced whole
                        tmp = f"{directory}/.tmp/{name}.{writer}"
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp)
                        os.link(stage, tmp)
                        os.replace(tmp, f"{directory}/{name}")
            finally:
                os.unlink(stage)

    async def _write_remote(self, entries: list[tuple[str, float | None, TaskResult]]) -> None:
        store = self._remote()
        jobs = []
        for name, expires, result in entries:
            jobs.append(store.write(f"{self._root}/{name}", _encode((expires, result))))
            if expires is not None:
                bucket = time_key(expires // _BUCKET * _BUCKET)
                jobs.append(store.write(f"{self._root}/.expiry/{bucket}/{name}", b""))
        await store.gather(jobs)

    async def get(self, task_id: str) -> TaskResult | None:
        name = enc_id(task_id)
        if self.is_local:
            try:
                with open(os.path.join(self._dir(), name), "rb") as file:
                    data: bytes | None = file.read()
            except FileNotFoundError:
                data = None
        else:
            data = await self._remote().read(f"{self._root}/{name}")
        entry = None if data is None else _entry(data, name)
        if entry is None or (entry[0] is not None and entry[0] <= time.time()):
            return None
        found: TaskResult = entry[1]
        return found

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Look, then sleep until a result is written (here, or on the doorbell, or a
        growing poll on object stores) and look again, until found or timed out."""
        wakeup = self._wakeup()
        if self.is_local:  # start the doorbell watcher before the first look
            bell = self._local_bell()
            await bell.wait(0.0, wakeup.generation)
            return await self._wait_notified(task_id, timeout, lambda: wakeup.generation, bell.wait)
        interval = 0.005  # object stores: a growing poll, cut short by writers in this process

        async def sleep(seconds: float, since: int) -> None:
            nonlocal interval
            await wakeup.wait(min(seconds, interval), since)
            interval = min(interval * 2, 0.5)

        return await self._wait_notified(task_id, timeout, lambda: wakeup.generation, sleep)

    async def delete(self, task_id: str) -> None:
        name = enc_id(task_id)
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._dir(), name))
        else:
            await self._remote().delete([f"{self._root}/{name}"])

    # -- expiry ---------------------------------------------------------------------------
    async def _prune(self, now: float) -> None:
        if self.is_local:
            await asyncio.to_thread(self._prune_local, now)
            return
        store = self._remote()
        current = time_key(now // _BUCKET * _BUCKET)
        for bucket, _, is_dir in await store.listing(f"{self._root}/.expiry"):
            if not is_dir or bucket >= current:
                continue
            folder = f"{self._root}/.expiry/{bucket}"
            names = await store.names(folder)
            await store.gather(self._prune_one(store, folder, name, now) for name in names)

    async def _prune_one(self, store: _fs.Store, folder: str, name: str, now: float) -> None:
        data = await store.read(f"{self._root}/{name}")
        if data is not None:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                expires, _ = _decode(data)
                if expires is not None and expires <= now:
                    await store.delete([f"{self._root}/{name}"])
        await store.delete([f"{folder}/{name}"])

    def _prune_local(self, now: float) -> None:
        with os.scandir(os.path.join(self._dir(), ".tmp")) as entries:
            for entry in entries:  # left by writers that died (mtimes are expiries)
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_ctime < now - _LEFT_SECONDS:
                        os.unlink(entry.path)
        with os.scandir(self._dir()) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    # The mtime is the expiry (far in the future for results kept forever).
                    if entry.stat().st_mtime <= now and self._expired(entry.path, now):
                        os.unlink(entry.path)

    @staticmethod
    def _expired(path: str, now: float) -> bool:
        with open(path, "rb") as file:
            entry = _entry(file.read(), os.path.basename(path))
        return entry is not None and entry[0] is not None and entry[0] <= now

    async def close(self) -> None:
        with self._lock:
            bell, self._bell = self._bell, None
            self._store = None
        if bell is not None:
            bell.release()
