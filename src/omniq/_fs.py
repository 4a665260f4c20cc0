"""Names, URLs and fsspec for the File backend (queue, results and events).

* Names: every state of a task is one file or object whose *name* carries the fields
  the queue orders on, in fixed-width hex, so that a sorted listing is delivery order.
* URLs: which locations are local paths, and which fsspec filesystems can give
  exclusive claims at all (``EXCLUSIVE``); any other is refused.
* ``Store``: an fsspec filesystem as six awaitable operations.

The queue protocols that use these live beside it: ``omniq._diskqueue`` (local and
shared disks, by rename) and ``omniq._objectqueue`` (object stores, by
create-if-absent). fsspec is imported only when a non-local URL is used: local paths
never need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from ._errors import ConfigurationError, MissingDependencyError
from .queue._wakeup import Wakeup

T = TypeVar("T")

# -- names ---------------------------------------------------------------------------

_PRIORITY_MAX = (1 << 63) - 1
#: Longest encoded task id: a leased task's name holds it beside four 16-digit keys,
#: a lease id and an attempt count, within the 255 bytes most filesystems allow.
MAX_ID_CHARS = 120


def enc(text: str) -> str:
    """``text`` as one path component: percent-encoded, no ``/``, no ``.``, never empty.

    Without dots, a name's fields can be split on ``.``.
    """
    if text.isalnum() and text.isascii():  # generated ids: nothing to encode
        return text
    return quote(text, safe="").replace(".", "%2E").replace("~", "%7E") or "%"


def dec(part: str) -> str:
    return "" if part == "%" else unquote(part)


def enc_id(task_id: str) -> str:
    encoded = enc(task_id)
    if len(encoded) > MAX_ID_CHARS:
        raise ValueError(
            f"task id {task_id[:40]!r}... is too long for the file backend "
            f"({len(encoded)} characters encoded, at most {MAX_ID_CHARS})"
        )
    return encoded


def prio_key(priority: int) -> str:
    """16 hex digits that sort ascending as ``priority`` descends."""
    if not -_PRIORITY_MAX - 1 <= priority <= _PRIORITY_MAX:
        raise ValueError(f"priority {priority} does not fit in 64 bits")
    return f"{_PRIORITY_MAX - priority:016x}"


def time_key(seconds: float) -> str:
    """A Unix time as 16 hex digits of nanoseconds: names sort by it."""
    return f"{max(0, int(seconds * 1e9)):016x}"


def key_time(key: str) -> float:
    return int(key, 16) / 1e9


class _Sequence:
    """Enqueue order: wall-clock nanoseconds, strictly increasing within the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def __call__(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last

    def take(self, count: int = 1, avoid: Callable[[int], bool] | None = None) -> int:
        """The first of ``count`` consecutive values, after any value ``avoid`` refuses."""
        with self._lock:
            first = max(time.time_ns(), self._last + 1)
            while avoid is not None and avoid(first):
                first += 1
            self._last = first + count - 1
            return first


next_seq = _Sequence()


_shared_lock = threading.Lock()
_wakeups: dict[tuple[str, str], Wakeup] = {}


def shared_wakeup(protocol: str, root: str) -> Wakeup:
    """One in-process ``Wakeup`` per remote location, shared by its instances."""
    with _shared_lock:
        return _wakeups.setdefault((protocol, root), Wakeup())


# -- URLs ---------------------------------------------------------------------------------


def local_path(location: str | os.PathLike[str]) -> str | None:
    """The absolute local path ``location`` names, or None for any other filesystem.

    Plain paths and ``file://`` URLs are local (``file:///abs``; ``file://rel`` is read
    as a relative path, as the JSONL event storage does).
    """
    text = os.fspath(location)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return os.path.abspath(os.path.expanduser(text))
    if scheme.lower() not in ("file", "local"):
        return None
    if "?" in rest or "#" in rest:
        raise ConfigurationError(f"{text!r}: pass options as keyword arguments, not in the URL")
    if not rest:
        raise ConfigurationError(f"{text!r} names no directory")
    return os.path.abspath(os.path.expanduser(unquote(rest)))


def protocol_of(url: str) -> str:
    return url.partition("://")[0].lower()


#: How each filesystem gives exclusive claims. Any other is refused: without an atomic
#: rename or a create-if-absent write, two workers could run the same task.
EXCLUSIVE = {
    "memory": "create-if-absent under a process-wide lock (the store is in-process)",
    "s3": "create-if-absent: PutObject with If-None-Match: * (s3fs mode='create')",
    "s3a": "create-if-absent: PutObject with If-None-Match: * (s3fs mode='create')",
    "gs": "create-if-absent: ifGenerationMatch=0 (gcsfs mode='create')",
    "gcs": "create-if-absent: ifGenerationMatch=0 (gcsfs mode='create')",
    "abfs": "create-if-absent: If-None-Match: * (adlfs mode='create')",
    "abfss": "create-if-absent: If-None-Match: * (adlfs mode='create')",
    "az": "create-if-absent: If-None-Match: * (adlfs mode='create')",
}


def check_exclusive(url: str, what: str = "FileTaskQueue") -> str:
    """The protocol of ``url`` if it can give exclusive claims; ConfigurationError if not."""
    protocol = protocol_of(url)
    if "::" in url or protocol not in EXCLUSIVE:
        supported = ", ".join(["local paths", "file://", *(f"{p}://" for p in EXCLUSIVE)])
        raise ConfigurationError(
            f"{what} cannot claim tasks exclusively on {url!r}: that filesystem offers "
            "neither an atomic rename nor a create-if-absent write, so two workers could "
            f"run the same task. Supported: {supported}."
        )
    return protocol


def import_fsspec(protocol: str) -> Any:
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError as exc:
        extra = "s3" if protocol in ("s3", "s3a") else "file"
        raise MissingDependencyError(
            f"{protocol}:// needs fsspec: pip install 'omniq[{extra}]'"
        ) from exc
    return fsspec


def open_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(filesystem, root path)`` for an fsspec URL; a missing driver names its extra."""
    protocol = protocol_of(url)
    fsspec = import_fsspec(protocol)
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        raise MissingDependencyError(
            f"{protocol}:// needs its fsspec driver ({exc}); for S3: pip install 'omniq[s3]'"
        ) from exc
    return fs, str(root).rstrip("/")


# -- the store: the operations the object-store protocol needs ---------------------------

#: Serializes create-if-absent on fsspec's memory filesystem, whose check-then-write
#: is otherwise not atomic across threads. Its store lives in this process only.
_MEMORY_LOCK = threading.Lock()


class Store:
    """An fsspec filesystem seen through six awaitable operations.

    Async filesystems (s3fs, gcsfs, adlfs) run their coroutines on fsspec's own loop
    and are awaited from any loop; the in-process memory filesystem is called inline.
    """

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.is_async = bool(getattr(fs, "async_impl", False))
        self._lock = _MEMORY_LOCK if protocol == "memory" else None
        self._probed = False

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if not self.is_async:
            return getattr(self.fs, name)(*args, **kwargs)
        coro = getattr(self.fs, "_" + name)(*args, **kwargs)
        loop = self.fs.loop
        if asyncio.get_running_loop() is loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def run_blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` from a thread without a loop (the sync facade's enqueue)."""
        if self.is_async:
            fsspec = import_fsspec(self.protocol)
            result: T = fsspec.asyn.sync(self.fs.loop, lambda: coro)
            return result
        # Inline operations never suspend: step the coroutine to its end.
        try:
            coro.send(None)
        except StopIteration as stop:
            value: T = stop.value
            return value
        coro.close()
        raise RuntimeError("an inline store operation suspended")

    async def gather(self, jobs: Iterable[Awaitable[T]]) -> list[T]:
        """Concurrent on remote stores (one round trip for many requests); in order inline."""
        if self.is_async:
            return list(await asyncio.gather(*jobs))
        return [await job for job in jobs]

    async def listing(self, path: str) -> list[tuple[str, float | None, bool]]:
        """``(name, age in seconds or None, is_dir)`` of a directory's entries, sorted."""
        try:
            entries = await self._call("ls", path, detail=True, **self._fresh())
        except FileNotFoundError:
            return []
        now = time.time()
        found = []
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            found.append((name, _age(entry, now), entry.get("type") == "directory"))
        found.sort()
        return found

    async def tree(self, path: str) -> dict[str, list[tuple[str, float | None]]]:
        """Every file below ``path`` in one listing: ``{subdirectory: [(name, age)]}``, sorted."""
        try:
            found = await self._call("find", path, detail=True, **self._fresh())
        except FileNotFoundError:
            return {}
        now, prefix = time.time(), path.rstrip("/") + "/"
        tree: dict[str, list[tuple[str, float | None]]] = {}
        for full, entry in found.items():
            folder, _, name = str(full).removeprefix(prefix).rpartition("/")
            tree.setdefault(folder, []).append((name, _age(entry, now)))
        for entries in tree.values():
            entries.sort()
        return tree

    async def names(self, path: str) -> list[str]:
        return [name for name, _, is_dir in await self.listing(path) if not is_dir]

    async def read(self, path: str) -> bytes | None:
        try:
            data: bytes = await self._call("cat_file", path)
        except FileNotFoundError:
            return None
        return data

    async def write(self, path: str, data: bytes) -> None:
        await self._call("pipe_file", path, data)

    async def create(self, path: str, data: bytes) -> bool:
        """Write ``path`` only if it does not exist; False if it did (someone else won)."""
        try:
            if self._lock is not None:
                with self._lock:
                    await self._call("pipe_file", path, data, mode="create")
            else:
                await self._call("pipe_file", path, data, mode="create")
        except FileExistsError:
            return False
        return True

    async def delete(self, paths: Iterable[str]) -> None:
        """Remove ``paths`` (concurrently on remote stores); ones already gone are fine."""
        await self.gather(self._delete_one(path) for path in paths)

    async def _delete_one(self, path: str) -> None:
        try:
            await self._call("rm_file", path)
        except FileNotFoundError:
            pass

    def _fresh(self) -> dict[str, Any]:
        # Listings must never come from fsspec's directory cache: other processes write.
        return {"refresh": True} if self.is_async else {}

    async def probe(self, root: str) -> None:
        """Check once that create-if-absent really refuses an existing object.

        An S3-compatible server that ignores ``If-None-Match`` would let two workers
        claim the same task; it is refused here, before any task is stored.
        """
        if self._probed or self._lock is not None:
            return
        path = f"{root}/.omniq/probe-{os.getpid()}-{time.time_ns():x}"
        try:
            first = await self.create(path, b"1")
            second = await self.create(path, b"2")
        except (TypeError, NotImplementedError, OSError) as exc:
            raise ConfigurationError(
                f"{self.protocol}:// at {root!r} cannot write create-if-absent ({exc!r}); "
                "the File backend needs it for exclusive claims"
            ) from exc
        finally:
            try:
                await self.delete([path])
            except OSError:
                pass
        if not (first and not second):
            raise ConfigurationError(
                f"{self.protocol}:// at {root!r} ignored a create-if-absent write (the "
                "server does not support conditional writes such as If-None-Match), so two "
                "workers could run the same task. Use a server that supports them."
            )
        self._probed = True


def _age(entry: dict[str, Any], now: float) -> float | None:
    for key in ("LastModified", "last_modified", "mtime", "created"):
        value = entry.get(key)
        if isinstance(value, datetime):
            stamp = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
            return now - stamp.timestamp()
        if isinstance(value, (int, float)):
            return now - float(value)
    return None


def listdir(path: str) -> list[str]:
    """The names in a local directory; none if it does not exist (yet, or any more)."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def unlink_quietly(path: str) -> None:
    """Remove a local file that another process may have removed already."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
