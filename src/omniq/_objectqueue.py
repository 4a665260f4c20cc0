"""The queue protocol on object stores (S3, GCS, Azure) and fsspec's memory filesystem.

Object stores have no rename; what they have is a write that fails if the object
exists. So every task is a series of versioned records, each change the
create-if-absent of the next version, and empty *markers* whose names carry the fields
the queue orders on index them. ``omniq.queue.file.FileTaskQueue`` uses this for any
fsspec URL that is not a local path; local and shared disks use the rename protocol of
``omniq._diskqueue``. The names and the fsspec ``Store`` are in ``omniq._fs``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import msgspec

from ._fs import Store, dec, enc, key_time, next_seq, prio_key, shared_wakeup, time_key
from ._task import TaskStatus
from .queue.base import LeaseRef, NewRow, StoredRow

_taken_lock = threading.Lock()
_taken: dict[tuple[str, str], set[str]] = {}


def _taken_markers(protocol: str, root: str) -> set[str]:
    """Ready markers this process saw claimed, per location (shared by its instances)."""
    with _taken_lock:
        return _taken.setdefault((protocol, root), set())


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
