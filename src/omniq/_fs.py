"""fsspec and the object-store claim protocol of the File backend (``omniq.queue.file``).

* Names: every state of a task is one file or object whose *name* carries the fields
  the queue orders on, in fixed-width hex, so that a sorted listing is delivery order.
* ``Store``: an fsspec filesystem as six awaitable operations, opened only after
  checking that the filesystem can give exclusive claims at all (``EXCLUSIVE``).
* ``ObjectQueue``: the queue protocol on object stores (S3, GCS, Azure) and fsspec's
  memory filesystem: versioned task records, each change a create-if-absent.

fsspec is imported only when a non-local URL is used: local paths never need it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import msgspec

from ._errors import ConfigurationError, MissingDependencyError
from ._task import TaskStatus
from .queue._wakeup import Wakeup
from .queue.base import LeaseRef, NewRow, StoredRow

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


next_seq = _Sequence()


_shared_lock = threading.Lock()
_wakeups: dict[tuple[str, str], Wakeup] = {}


def shared_wakeup(protocol: str, root: str) -> Wakeup:
    """One in-process ``Wakeup`` per remote location, shared by its instances."""
    with _shared_lock:
        return _wakeups.setdefault((protocol, root), Wakeup())


_taken: dict[tuple[str, str], set[str]] = {}


def _taken_markers(protocol: str, root: str) -> set[str]:
    with _shared_lock:
        return _taken.setdefault((protocol, root), set())


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


# -- the object-store protocol --------------------------------------------------------------

PENDING, RUNNING = "pending", "running"
#: A marker whose record version does not exist (its writer died before the
#: create-if-absent that would have made it real) is removed after this long.
STALE_SECONDS = 120.0
PRUNE_SECONDS = 60.0
MIN_POLL = 0.02


class Record(msgspec.Struct, array_like=True, omit_defaults=True):
    """One version of a task: immutable once written."""

    q: str
    p: int
    seq: int
    st: str
    a: int
    due: float
    payload: bytes
    lid: str | None = None
    until: float = 0.0
    err: str | None = None
    fin: float = 0.0

    def row(self, task_id: str) -> StoredRow:
        status = TaskStatus(self.st)
        return StoredRow(task_id, self.payload, status, self.a, self.due, self.lid, self.err)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Record).decode
_replace = msgspec.structs.replace


class ObjectQueue:
    """The queue protocol on an object store: versioned records and create-if-absent.

    ``tasks/<id>/<v>`` is version ``v`` of a task, written once. A state change from
    version ``v`` is the create-if-absent of ``v + 1``: of several workers trying the
    same change (two claims, a claim and a cancel, a recovery and a heartbeat) exactly
    one creates it, the others get "exists" and step back. Empty *markers* index the
    versions so that one listing gives the order: ``q/<queue>/ready/<prio>.<seq>.<id>.<v>``,
    ``q/<queue>/sched/<due>.…``, ``q/<queue>/leased/<until>.<id>.<v>`` and
    ``done/<status>/<queue>/<finished>.<seq>.<id>.<v>``. A marker is written *before*
    the version it names, so a crash never leaves a version nobody can find; markers
    are hints, checked against the record, and stale ones are removed by whoever finds
    them. See docs/backends/file.md for the whole protocol.
    """

    def __init__(
        self, store: Store, root: str, *, retention_seconds: float, max_poll_seconds: float
    ) -> None:
        self.store = store
        self.root = root
        self.retention_seconds = retention_seconds
        self.max_poll_seconds = max_poll_seconds
        self.wakeup = shared_wakeup(store.protocol, root)
        #: Ready markers this process saw claimed (by any of its instances): skipped.
        self._taken = _taken_markers(store.protocol, root)
        self._held: dict[str, tuple[int, Record]] = {}
        self._next_due: dict[str, float] = {}
        self._poll = MIN_POLL
        # The first prune waits a minute: a short-lived producer never pays for one.
        self._next_prune = time.time() + PRUNE_SECONDS

    # -- keys --------------------------------------------------------------------
    def _record_key(self, task_id: str, version: int) -> str:
        return f"{self.root}/tasks/{enc(task_id)}/{version:010d}"

    def _dir(self, queue: str, kind: str) -> str:
        return f"{self.root}/q/{enc(queue)}/{kind}"

    def _markers(self, task_id: str, version: int, rec: Record) -> list[str]:
        """Where the marker of ``(version, rec)`` is: ready or scheduled for pending ones."""
        tail = f"{enc(task_id)}.{version}"
        if rec.st == PENDING:
            key = f"{prio_key(rec.p)}.{rec.seq:016x}.{tail}"
            sched = f"{self._dir(rec.q, 'sched')}/{time_key(rec.due)}.{key}"
            return [f"{self._dir(rec.q, 'ready')}/{key}", sched]
        if rec.st == RUNNING:
            return [f"{self._dir(rec.q, 'leased')}/{time_key(rec.until)}.{tail}"]
        name = f"{time_key(rec.fin)}.{rec.seq:016x}.{tail}"
        return [f"{self.root}/done/{rec.st}/{enc(rec.q)}/{name}"]

    def _marker(self, task_id: str, version: int, rec: Record, now: float) -> str:
        markers = self._markers(task_id, version, rec)
        return markers[1] if rec.st == PENDING and rec.due > now else markers[0]

    # -- records -----------------------------------------------------------------
    async def _read(self, task_id: str, version: int, queue: str = "") -> Record | None:
        data = await self.store.read(self._record_key(task_id, version))
        if data is None:
            return None
        try:
            return _decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # Deliver it so the queue moves it to failed with the reason.
            return Record(q=queue, p=0, seq=0, st=PENDING, a=0, due=0.0, payload=data)

    async def _latest(self, task_id: str) -> tuple[int, Record] | None:
        names = await self.store.names(f"{self.root}/tasks/{enc(task_id)}")
        versions = [int(name) for name in names if name.isdigit()]
        while versions:
            version = max(versions)
            rec = await self._read(task_id, version)
            if rec is not None:
                return version, rec
            versions.remove(version)
        return None

    async def _move(
        self, task_id: str, version: int, old: Record, new: Record, announced: bool = False
    ) -> bool:
        """Change a task from ``version`` (``old``) to ``version + 1`` (``new``) if nobody did.

        Marker first (unless ``announced``: written already), then the create-if-absent;
        the loser takes back a marker that is not the winner's, and either way the
        markers of ``version`` are stale after.
        """
        now = time.time()
        marker = self._marker(task_id, version + 1, new, now)
        if not announced:
            await self.store.write(marker, b"")
        won = await self.store.create(self._record_key(task_id, version + 1), _encode(new))
        if not won:
            winner = await self._read(task_id, version + 1)
            if winner is None or marker not in self._markers(task_id, version + 1, winner):
                await self.store.delete([marker])
        await self.store.delete(self._markers(task_id, version, old))
        return won

    # -- enqueue -----------------------------------------------------------------------
    async def put(self, rows: Sequence[NewRow]) -> list[bool]:
        await self.store.probe(self.root)
        now = time.time()
        recs = [
            Record(q=r.queue, p=r.priority, seq=next_seq(), st=PENDING, a=0, due=r.due_at,
                   payload=r.payload)
            for r in rows
        ]  # fmt: skip
        markers = [self._marker(r.id, 0, rec, now) for r, rec in zip(rows, recs, strict=True)]
        await self.store.gather(self.store.write(m, b"") for m in markers)
        created = await self.store.gather(
            self.store.create(self._record_key(r.id, 0), _encode(rec))
            for r, rec in zip(rows, recs, strict=True)
        )
        lost = [(r.id, m) for r, m, won in zip(rows, markers, created, strict=True) if not won]
        await self.store.gather(self._drop_duplicate(task_id, m) for task_id, m in lost)
        for r, rec, won in zip(rows, recs, created, strict=True):
            if won and rec.due > now:
                self._next_due[r.queue] = min(self._next_due.get(r.queue, rec.due), rec.due)
        if any(created):
            self.wakeup.notify()
        return created

    async def _drop_duplicate(self, task_id: str, marker: str) -> None:
        first = await self._read(task_id, 0)
        if first is None or marker not in self._markers(task_id, 0, first):
            await self.store.delete([marker])

    # -- claim -------------------------------------------------------------------------
    async def claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        """Lease up to ``limit`` tasks; each lease runs from its own claim's write, since
        the listings before it can take a while on a remote store."""
        await self._prune(now)
        lease = lease_until - now
        claimed: list[StoredRow] = []
        for queue in queues:
            # One listing of the queue's markers (ready, scheduled, leased) per claim.
            tree = await self.store.tree(f"{self.root}/q/{enc(queue)}")
            made = await self.store.gather(
                [self._recover(queue, now, tree.get("leased", [])),
                 self._promote(queue, now, tree.get("sched", []))]
            )  # fmt: skip
            entries = sorted([*tree.get("ready", []), *((n, 0.0) for n in made[0] + made[1])])
            taken = self._taken
            entries = [(name, age) for name, age in entries if name not in taken]
            while entries and len(claimed) < limit:
                batch, entries = entries[: limit - len(claimed)], entries[limit - len(claimed) :]
                rows = await self.store.gather(
                    self._claim_one(queue, name, age, lease, lease_id) for name, age in batch
                )
                claimed += [row for row in rows if row is not None]
            if len(claimed) >= limit:
                break
        if claimed:
            self._poll = MIN_POLL
        return claimed

    async def _claim_one(
        self, queue: str, name: str, age: float | None, lease: float, lease_id: str
    ) -> StoredRow | None:
        parts = name.split(".")
        if len(parts) != 4 or not parts[3].isdigit():
            return None
        if name in self._taken:
            return None  # another claim of this process has it (a name is one version)
        if len(self._taken) > 10_000:
            self._taken.clear()
        self._taken.add(name)
        try:
            return await self._try_claim(queue, name, age, lease, lease_id)
        except BaseException:
            self._taken.discard(name)
            raise

    async def _try_claim(
        self, queue: str, name: str, age: float | None, lease: float, lease_id: str
    ) -> StoredRow | None:
        parts = name.split(".")
        task_id, version = dec(parts[2]), int(parts[3])
        marker = f"{self._dir(queue, 'ready')}/{name}"
        until = time.time() + lease
        # The lease marker goes out with the read (one round trip), before the claim.
        leased = f"{self._dir(queue, 'leased')}/{time_key(until)}.{parts[2]}.{version + 1}"
        rec, _ = await self.store.gather(
            [self._read(task_id, version, queue), self._announce(leased)]
        )
        if rec is None or rec.st != PENDING:
            stale = rec is not None or (age is not None and age > STALE_SECONDS)
            await self.store.delete([leased, marker] if stale else [leased])
            if rec is None:
                self._taken.discard(name)  # its version may still be on its way: look again
            return None
        new = _replace(rec, st=RUNNING, a=rec.a + 1, lid=lease_id, until=until)
        won = await self._move(task_id, version, rec, new, announced=True)
        if not won:
            return None
        self._held[task_id] = (version + 1, new)
        self._lower_due(queue, until)
        return new.row(task_id)

    async def _announce(self, marker: str) -> None:
        await self.store.write(marker, b"")

    def _lower_due(self, queue: str, when: float) -> None:
        self._next_due[queue] = min(self._next_due.get(queue, when), when)

    async def _recover(
        self, queue: str, now: float, leased: list[tuple[str, float | None]]
    ) -> list[str]:
        """Running tasks whose lease ended become pending again (attempts stay raised).

        Returns the ready markers it wrote.
        """
        jobs = []
        next_end = None
        for name, age in leased:
            parts = name.split(".")
            if len(parts) != 3:
                continue
            if key_time(parts[0]) > now:
                next_end = key_time(parts[0])
                break
            jobs.append(self._recover_one(queue, name, dec(parts[1]), int(parts[2]), age))
        made = await self.store.gather(jobs)
        self._next_due.pop(queue, None)
        if next_end is not None:
            self._lower_due(queue, next_end)
        return [name for name in made if name]

    async def _recover_one(
        self, queue: str, name: str, task_id: str, version: int, age: float | None
    ) -> str:
        marker = f"{self._dir(queue, 'leased')}/{name}"
        rec = await self._read(task_id, version, queue)
        if rec is None:
            if age is not None and age > STALE_SECONDS:
                await self.store.delete([marker])
            return ""
        if rec.st != RUNNING or marker not in self._markers(task_id, version, rec):
            await self.store.delete([marker])
            return ""
        new = _replace(rec, st=PENDING, lid=None, until=0.0)
        if not await self._move(task_id, version, rec, new):
            return ""
        return self._marker(task_id, version + 1, new, time.time()).rsplit("/", 1)[-1]

    async def _promote(
        self, queue: str, now: float, sched: list[tuple[str, float | None]]
    ) -> list[str]:
        """Scheduled markers whose time came get a ready marker (same version); returns those."""
        folder, ready = self._dir(queue, "sched"), self._dir(queue, "ready")
        keys = []
        for name, _ in sched:
            due, _, key = name.partition(".")
            if key_time(due) > now:
                self._lower_due(queue, key_time(due))
                break
            keys.append((name, key))
        await self.store.gather(
            self._promote_one(f"{folder}/{name}", f"{ready}/{key}") for name, key in keys
        )
        return [key for _, key in keys]

    async def _promote_one(self, scheduled: str, ready: str) -> None:
        await self.store.write(ready, b"")
        await self.store.delete([scheduled])

    # -- waiting -------------------------------------------------------------------------
    def generation(self) -> int:
        return self.wakeup.generation

    async def wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        """In-process work wakes at once; other writers are seen by an adaptive poll."""
        dues = [self._next_due[q] for q in queues if q in self._next_due]
        if dues:
            timeout = min(timeout, max(0.0, min(dues) - time.time()))
        timeout = min(timeout, self._poll)
        self._poll = min(self._poll * 2, self.max_poll_seconds)
        await self.wakeup.wait(timeout, since)

    # -- leased tasks ----------------------------------------------------------------------
    async def _leased(self, ref: LeaseRef, fresh: bool) -> tuple[int, Record] | None:
        held = None if fresh else self._held.get(ref.id)
        if held is None:
            held = await self._latest(ref.id)
        if held is None:
            return None
        rec = held[1]
        if rec.st != RUNNING or (ref.lease_id is not None and rec.lid != ref.lease_id):
            return None
        return held

    async def _apply(self, ref: LeaseRef, change: Callable[[Record], Record]) -> Record | None:
        """Apply ``change`` to a task still leased under ``ref``; the new record, or None."""
        for fresh in (False, True):
            found = await self._leased(ref, fresh)
            if found is None:
                break
            version, rec = found
            new = change(rec)
            if await self._move(ref.id, version, rec, new):
                if new.st == RUNNING:
                    self._held[ref.id] = (version + 1, new)
                else:
                    self._held.pop(ref.id, None)
                return new
        self._held.pop(ref.id, None)
        return None

    async def _apply_all(
        self, refs: Sequence[LeaseRef], change: Callable[[Record], Record]
    ) -> list[bool]:
        done = await self.store.gather(self._apply(ref, change) for ref in refs)
        return [new is not None for new in done]

    async def finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        now = time.time()

        def change(rec: Record) -> Record:
            return _replace(rec, st=status.value, err=error, lid=None, until=0.0, fin=now)

        return await self._apply_all(refs, change)

    async def retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        def change(rec: Record) -> Record:
            return _replace(rec, st=PENDING, due=due_at, err=error, lid=None, until=0.0)

        new = await self._apply(ref, change)
        if new is None:
            return False
        self._lower_due(new.q, due_at)
        self.wakeup.notify()
        return True

    async def release(self, refs: Sequence[LeaseRef]) -> None:
        def change(rec: Record) -> Record:
            return _replace(rec, st=PENDING, a=rec.a - 1, lid=None, until=0.0)

        await self._apply_all(refs, change)
        self.wakeup.notify()

    async def extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        def change(rec: Record) -> Record:
            return _replace(rec, until=lease_until)

        return await self._apply_all(refs, change)

    # -- by id -----------------------------------------------------------------------------
    async def cancel(self, task_id: str) -> bool:
        for _ in range(3):
            found = await self._latest(task_id)
            if found is None or found[1].st != PENDING:
                return False
            version, rec = found
            now = time.time()
            if await self._move(task_id, version, rec, _replace(rec, st="cancelled", fin=now)):
                return True
        return False

    async def get(self, task_id: str) -> StoredRow | None:
        found = await self._latest(task_id)
        return None if found is None else found[1].row(task_id)

    async def requeue(self, task_id: str, now: float) -> bool:
        found = await self._latest(task_id)
        if found is None or found[1].st not in ("failed", "cancelled", "expired"):
            return False
        version, rec = found
        new = _replace(rec, st=PENDING, a=0, err=None, due=now, fin=0.0, lid=None, until=0.0)
        done = await self._move(task_id, version, rec, new)
        if done:
            self.wakeup.notify()
        return done

    async def count(self, queue: str) -> int:
        ids = set()
        for kind, field in (("ready", 2), ("sched", 3)):
            for name in await self.store.names(self._dir(queue, kind)):
                parts = name.split(".")
                if len(parts) > field:
                    ids.add(parts[field])
        return len(ids)

    async def list_rows(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        found: list[tuple[str, int]] = []
        for directory in await self._status_dirs(status, queue):
            for name in await self.store.names(directory):
                parts = name.split(".")
                if len(parts) >= 3 and parts[-1].isdigit():
                    found.append((dec(parts[-2]), int(parts[-1])))
        recs = await self.store.gather(self._read(task_id, v) for task_id, v in found)
        rows = [
            (rec.seq, rec.row(task_id))
            for (task_id, _), rec in zip(found, recs, strict=True)
            if rec is not None and rec.st == status.value
        ]
        rows.sort(key=lambda item: item[0])
        unique = list({row.id: row for _, row in reversed(rows)}.values())[::-1]
        return unique[:limit]

    async def _status_dirs(self, status: TaskStatus, queue: str | None) -> list[str]:
        if status is TaskStatus.PENDING or status is TaskStatus.RUNNING:
            kinds = ("ready", "sched") if status is TaskStatus.PENDING else ("leased",)
            queues = [queue] if queue is not None else await self._queue_names()
            return [self._dir(q, kind) for q in queues for kind in kinds]
        base = f"{self.root}/done/{status.value}"
        if queue is not None:
            return [f"{base}/{enc(queue)}"]
        return [f"{base}/{name}" for name, _, is_dir in await self.store.listing(base) if is_dir]

    async def _queue_names(self) -> list[str]:
        entries = await self.store.listing(f"{self.root}/q")
        return [dec(name) for name, _, is_dir in entries if is_dir]

    # -- retention -------------------------------------------------------------------------
    async def _prune(self, now: float) -> None:
        """Forget succeeded, cancelled and expired tasks older than ``retention_seconds``."""
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_SECONDS
        cutoff = time_key(now - self.retention_seconds)
        for status in ("succeeded", "cancelled", "expired"):
            for directory in await self._status_dirs(TaskStatus(status), None):
                old = [n for n in await self.store.names(directory) if n < cutoff]
                await self.store.gather(self._prune_one(directory, name) for name in old)

    async def _prune_one(self, directory: str, name: str) -> None:
        parts = name.split(".")
        if len(parts) == 4:
            task_id, version = dec(parts[2]), int(parts[3])
            latest = await self._latest(task_id)
            if latest is not None and latest[0] == version:
                folder = f"{self.root}/tasks/{enc(task_id)}"
                keys = [f"{folder}/{n}" for n in await self.store.names(folder)]
                await self.store.delete(keys)
        await self.store.delete([f"{directory}/{name}"])

    async def close(self) -> None:
        self._held.clear()
