"""Task records on a local disk: packs, files that hold many tasks, reached by hard links.

Creating a file costs a disk filesystem far more than giving an existing file one more
name (on ext4 an inode, its bitmap and table block, a journal entry: several times a
``link(2)``, and more when the disk is busy). So the rename protocol
(``omniq._diskqueue``) stores tasks in *packs*: one file holds the records of up to
1,024 tasks of one queue, and each task is reached through two hard links to it, its id
``ids/<id>`` and its state name ``q/<queue>/ready/…`` (docs/backends/file.md). A batch
(``enqueue_many``) is one pack written at once; single enqueues append to a pack the
process keeps open for its queue.

A pack::

    b"\\0omniq-pack1\\n", then <K, len(queue), len(stage)> (uint32, uint16, uint16), queue, stage
    K entries of <seq, offset, length> (uint64, uint64, uint32): a task's entry is at
        index seq % K (a batch's seqs are consecutive; appends pick a free one)
    one record per task: b"<ready|sched> <state name>\\n" + payload

A claimer holds a state name, whose ``<seq>`` leads to the entry: three small reads.
Records of earlier versions, one task per file (``"<queue> <priority> <seq>\\n" +
payload``), are still read.

Crash safety. A pack is created under a *stage name*, ``tmp/pack-…``; then each task
is linked as ``ids/<id>`` (``link(2)`` fails if the name exists: the id index, which
makes enqueue idempotent), then under its state name, in ``seq`` order for both (a big
batch links its ids a chunk ahead, in a helper thread); last the stage name is removed.
So the tasks with a state name are always the first ones with an id, and a writer that
dies leaves the stage name and some tasks with an id but no state name: the last ones
it linked. Once the pack is a minute old, a repairer (a later enqueue of one of its
ids, or a worker's prune) renames the stage name aside (one repairer wins, and a
writer still alive can link nothing more), counts the names, ``st_nlink`` = 1 + ids +
state names, and links the state names of the tasks with an id beyond that count: the
pack is completed, and no task of it is lost or delivered twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

from ._fs import dec, listdir, next_seq, unlink_quietly

log = logging.getLogger("omniq.queue")

MAGIC = b"\0omniq-pack1\n"
_HEAD = struct.Struct("<IHH")  # entries K, len(queue), len(stage name)
_ENTRY = struct.Struct("<QQI")  # seq, offset, length
#: Tasks per pack at most: a pack has twice as many names (ids and state names).
PACK_SLOTS = 1024
#: A batch this big links its ids in a helper thread, a chunk ahead of its state names.
PIPELINE_TASKS = 256
LINK_CHUNK = 64
#: An open pack takes appends while at most half its entries are used (short probes).
APPEND_SLOTS = 1024
APPEND_BYTES = 64 << 20
#: An open pack not appended to for this long is closed before the next append, well
#: before a repairer would take it for the pack of a dead writer.
IDLE_SECONDS = 30.0
#: A stage name (or an id no state name links to) this old belongs to a dead enqueue.
ORPHAN_SECONDS = 60.0
_CHUNK = 4096
_MAX_RECORD = 1 << 30  # a longer one is a damaged entry, not a task
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_LINK_AT = os.link in os.supports_dir_fd


class Slot(NamedTuple):
    """A task to store: its encoded id, the keys of its state name, and its payload."""

    idenc: str
    prio: str
    due: str
    scheduled: bool
    payload: bytes


def state_name(slot: Slot, seq: int) -> tuple[str, str]:
    """``(kind, name)`` of a new task's state name: ``ready`` or ``sched``."""
    if slot.scheduled:
        return "sched", f"{slot.due}.{slot.prio}.{seq:016x}.{slot.idenc}.0"
    return "ready", f"{slot.prio}.{seq:016x}.{slot.idenc}.0.{slot.due}"


# -- reading ----------------------------------------------------------------------------


def read_payload(path: str, seq: int) -> bytes:
    """The payload of task ``seq`` in the record file ``path``; b"" if the file is damaged
    (the queue then moves the task to failed). FileNotFoundError if it is gone."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        head = os.pread(fd, _CHUNK, 0)
        if not head.startswith(MAGIC):  # one task per file
            data = head if len(head) < _CHUNK else head + _read_rest(fd, len(head))
            return data.partition(b"\n")[2] if b"\n" in data else data
        record = _record(fd, head, seq)
        return b"" if record is None else record.partition(b"\n")[2]
    finally:
        os.close(fd)


def read_queue(path: str) -> str | None:
    """The queue of the task(s) the record file ``path`` holds; None if it is gone or
    too damaged to tell."""
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        head = os.pread(fd, _CHUNK, 0)
        if head.startswith(MAGIC):
            return dec(_header(head, fd)[1])
        return dec(head.split(b" ", 1)[0].split(b"\n", 1)[0].decode(errors="replace"))
    except (ValueError, UnicodeDecodeError, struct.error):
        return None
    finally:
        os.close(fd)


def _read_rest(fd: int, offset: int) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _header(head: bytes, fd: int | None = None) -> tuple[int, str, str, int]:
    """``(entries, queue, stage name, table offset)`` of a pack whose first bytes are
    ``head`` (more are read from ``fd`` if needed); ValueError if it is damaged."""
    at = len(MAGIC) + _HEAD.size
    if len(head) < at:
        raise ValueError("truncated pack header")
    slots, qlen, slen = _HEAD.unpack_from(head, len(MAGIC))
    names = head[at : at + qlen + slen]
    if len(names) < qlen + slen and fd is not None:
        names = os.pread(fd, qlen + slen, at)
    if slots == 0 or len(names) < qlen + slen:
        raise ValueError("damaged pack header")
    return slots, names[:qlen].decode(), names[qlen:].decode(), at + qlen + slen


def _record(fd: int, head: bytes, seq: int) -> bytes | None:
    """The record of task ``seq`` in a pack, or None if the pack does not hold it whole."""
    try:
        slots, _, _, table = _header(head, fd)
    except (ValueError, UnicodeDecodeError):
        return None
    at = table + _ENTRY.size * (seq % slots)
    entry = head[at : at + _ENTRY.size]
    if len(entry) < _ENTRY.size:
        entry = os.pread(fd, _ENTRY.size, at)
        if len(entry) < _ENTRY.size:
            return None
    found, offset, length = _ENTRY.unpack(entry)
    if found != seq or length > _MAX_RECORD:
        return None
    end = offset + length
    record = head[offset:end] if end <= len(head) else os.pread(fd, length, offset)
    return record if len(record) == length else None


def _tasks(path: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """``(queue, {id: (kind, state name)})`` of a whole pack, in seq order; ValueError if
    it is damaged. An id written twice counts once, where it was written first: a
    writer stops using a pack once a task's state name fails, so a later copy of an id
    was refused (the id existed) or taken back."""
    with open(path, "rb") as file:
        data = file.read()
    if not data.startswith(MAGIC):
        raise ValueError("not a pack")
    slots, qenc, _, table = _header(data)
    found = []
    for index in range(slots):
        seq, offset, length = _ENTRY.unpack_from(data, table + _ENTRY.size * index)
        if seq:
            line = data[offset : offset + length].split(b"\n", 1)[0].decode()
            kind, _, name = line.partition(" ")
            found.append((seq, kind, name))
    found.sort()
    tasks: dict[str, tuple[str, str]] = {}
    for _, kind, name in found:
        parts = name.split(".")
        if kind not in ("ready", "sched") or len(parts) != 5 or "/" in name:
            raise ValueError(f"damaged record line {kind} {name}")
        tasks.setdefault(parts[2 if kind == "ready" else 3], (kind, name))
    if not qenc or "/" in qenc or "." in qenc:
        raise ValueError(f"damaged queue name {qenc!r}")
    return qenc, tasks


# -- writing ----------------------------------------------------------------------------


_LOCAL_TYPES = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "jfs", "reiserfs"}
    | {"tmpfs", "ramfs", "overlay"}
)


def is_local_disk(path: str) -> bool:
    """True if ``path`` is on a filesystem of this host alone (from /proc/self/mountinfo);
    False on network filesystems (NFS, Lustre, GPFS, CephFS, …) and where it cannot be
    told. Another host reads what this one wrote only after it reached the server: a
    ``close`` (close-to-open consistency) does that, a write through an open file not."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
            mounts = file.read().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    best, fstype = "", ""
    for line in mounts:
        fields = line.split(" ")
        if "-" not in fields[5:]:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[fields.index("-", 5) + 1]
    return fstype in _LOCAL_TYPES


_pid = os.getpid()


_helpers: dict[int, ThreadPoolExecutor] = {}
_helpers_lock = threading.Lock()


def _forked() -> None:
    global _pid, _helpers_lock
    _pid, _helpers_lock = os.getpid(), threading.Lock()


os.register_at_fork(after_in_child=_forked)


def _helper() -> ThreadPoolExecutor:
    """The process's thread that links the ids of big batches (idle, it costs nothing)."""
    with _helpers_lock:
        if _pid not in _helpers:
            _helpers[_pid] = ThreadPoolExecutor(1, thread_name_prefix="omniq-links")
        return _helpers[_pid]


@dataclass
class _Open:
    """A pack this process appends single enqueues to (``fd`` open on local disks)."""

    path: str
    fd: int | None
    slots: int
    table: int
    size: int
    last: float
    pid: int = field(default_factory=lambda: _pid)
    used: set[int] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def taken(self, seq: int) -> bool:
        return seq % self.slots in self.used


class _Torn(Exception):
    """A task has an id but no state name, and its id could not be taken back."""


class _Taken(Exception):
    """A repairer took the pack: the writer stalled past ``ORPHAN_SECONDS``."""


class Packs:
    """Writes tasks into packs under ``base`` and completes the packs of dead writers.

    ``link`` is the only call that publishes anything; everything before it is private
    to the writer (a pack under its stage name), so a task is enqueued once its state
    name exists, exactly as with one file per task.
    """

    def __init__(self, base: str, *, fsync: bool) -> None:
        self.base = base
        self.fsync = fsync
        self.ids = os.path.join(base, "ids")
        self.tmp = os.path.join(base, "tmp")
        #: Packs completed by this instance: new work, so the caller rings the doorbell.
        self.repaired = 0
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._keep_open: bool | None = None  # file kept open between appends: local disks
        self._dirs: dict[str, int] = {}  # open directories, for link(2) relative to them

    # -- enqueue ---------------------------------------------------------------------
    def write(self, qenc: str, qdir: str, slots: Sequence[Slot]) -> list[bool]:
        """Store a batch of queue ``qenc`` (directory ``qdir``) in packs of its own;
        True for each new id."""
        if len(slots) == 1:
            return [self.append(qenc, qdir, slots[0])]
        inserted: list[bool] = []
        for start in range(0, len(slots), PACK_SLOTS):
            inserted += self._write(qenc, qdir, slots[start : start + PACK_SLOTS])
        return inserted

    def append(self, qenc: str, qdir: str, slot: Slot) -> bool:
        """Store one task in the open pack of queue ``qenc``; True if its id is new."""
        with self._lock:
            return self._append(qenc, qdir, slot)

    def _write(self, qenc: str, qdir: str, slots: Sequence[Slot]) -> list[bool]:
        """A batch in one pack: its tasks' seqs are consecutive, so each has an entry of
        its own at ``seq % count``."""
        count = len(slots)
        seqs = range(first := next_seq.take(count), first + count)
        stage = self._stage_path()
        head = _pack_header(count, qenc, stage)
        states = [state_name(slot, seq) for slot, seq in zip(slots, seqs, strict=True)]
        records = [
            f"{kind} {name}\n".encode() + slot.payload
            for (kind, name), slot in zip(states, slots, strict=True)
        ]
        sizes = [len(record) for record in records]
        offsets = accumulate(sizes[:-1], initial=len(head) + _ENTRY.size * count)
        entries = list(map(_ENTRY.pack, seqs, offsets, sizes))
        turn = count - first % count  # entries[i] belongs at index (first + i) % count
        table = entries[turn:] + entries[:turn]
        fd = os.open(stage, _CREATE, 0o644)
        try:
            _write_all(fd, b"".join([head, *table, *records]))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        linked: set[str] = set()
        try:
            if count >= PIPELINE_TASKS:
                inserted = self._link_pipelined(stage, qdir, slots, states, linked)
            else:
                inserted = [
                    self._link(stage, slot.idenc, f"{qdir}/{kind}", name, linked)
                    for slot, (kind, name) in zip(slots, states, strict=True)
                ]
        except _Taken:
            raise OSError(
                f"enqueue_many stalled for over {ORPHAN_SECONDS:.0f} s and a repair took "
                f"its batch over: {len(linked)} of its tasks are enqueued, the rest not"
            ) from None
        except _Torn as torn:  # the stage name stays: a repair ends it
            raise (torn.__cause__ or torn) from None
        unlink_quietly(stage)
        return inserted

    def _append(self, qenc: str, qdir: str, slot: Slot) -> bool:
        """One task, appended to this process's open pack of ``qenc``."""
        for _ in range(3):
            pack = self._pack(qenc)
            seq = next_seq.take(1, pack.taken)
            kind, name = state_name(slot, seq)
            record = b"%s %s\n%s" % (kind.encode(), name.encode(), slot.payload)
            index = seq % pack.slots
            try:
                fd = os.open(pack.path, os.O_WRONLY | _CLOEXEC) if pack.fd is None else pack.fd
            except FileNotFoundError:  # a repairer took it (this process was idle)
                self._retire(qenc)
                continue
            try:
                _write_all(fd, record, pack.size)
                entry = _ENTRY.pack(seq, pack.size, len(record))
                os.pwrite(fd, entry, pack.table + _ENTRY.size * index)
                if self.fsync:
                    os.fsync(fd)
            finally:
                if pack.fd is None:
                    os.close(fd)  # before the links: on NFS, the data reaches the server
            pack.size += len(record)
            pack.used.add(index)
            try:
                return self._link(pack.path, slot.idenc, f"{qdir}/{kind}", name, pack.ids)
            except _Taken:
                self._retire(qenc)
            except BaseException as exc:
                # Its links may be in any state: its stage name stays, a repair ends it.
                self._retire(qenc)
                if isinstance(exc, _Torn) and exc.__cause__ is not None:
                    raise exc.__cause__ from None
                raise
        raise OSError(f"could not append to a pack in {self.tmp}: each was taken by a repair")

    def _pack(self, qenc: str) -> _Open:
        """The open pack of ``qenc``, after closing one that is full, idle or inherited."""
        now = time.monotonic()
        pack = self._open.get(qenc)
        if pack is not None:
            if pack.pid != _pid:  # forked: the parent appends to that one
                self._open.pop(qenc)
                if pack.fd is not None:
                    os.close(pack.fd)
                pack = None
            elif (
                len(pack.used) * 2 >= pack.slots
                or pack.size > APPEND_BYTES
                or now - pack.last > IDLE_SECONDS
            ):
                self._retire(qenc, finished=True)
                pack = None
            else:
                pack.last = now
        if pack is None:
            if self._keep_open is None:
                self._keep_open = is_local_disk(self.tmp)
            path = self._stage_path()
            head = _pack_header(APPEND_SLOTS, qenc, path)
            fd = os.open(path, _CREATE, 0o644)
            try:
                _write_all(fd, head + bytes(_ENTRY.size * APPEND_SLOTS))
            except BaseException:
                os.close(fd)
                raise
            if not self._keep_open:
                os.close(fd)
            size = len(head) + _ENTRY.size * APPEND_SLOTS
            pack = _Open(path, fd if self._keep_open else None, APPEND_SLOTS, len(head), size, now)
            self._open[qenc] = pack
        return pack

    def _retire(self, qenc: str, finished: bool = False) -> None:
        """Stop appending to the open pack of ``qenc``; ``finished``: all its tasks are
        linked, so its stage name goes (else it stays for a repair to look at)."""
        pack = self._open.pop(qenc, None)
        if pack is None:
            return
        if pack.fd is not None:
            os.close(pack.fd)
        if finished:
            unlink_quietly(pack.path)

    def _link(self, stage: str, idenc: str, directory: str, name: str, linked: set[str]) -> bool:
        """Give a task its id, then its state name ``directory/name``; False if the id
        exists. ``linked``: the ids linked to this pack so far."""
        if not self._link_id(stage, idenc, linked):
            return False
        self._link_state(stage, idenc, directory, name, linked)
        return True

    def _link_id(self, stage: str, idenc: str, linked: set[str]) -> bool:
        """Link ``ids/<idenc>`` to the pack ``stage``; False if the id exists (a
        duplicate in ``linked`` too). ``_Taken`` if a repairer took the pack."""
        record = f"{self.ids}/{idenc}"
        try:
            self._link_at(stage, self.ids, idenc)
        except FileExistsError:
            if idenc not in linked and _same_file(stage, record):
                pass  # our own link, its reply lost and the request sent again (NFS)
            elif not self.drop_orphan(record):
                return False
            else:
                try:
                    os.link(stage, record)
                except FileExistsError:
                    return False  # another enqueue of the id won
        except FileNotFoundError:
            if not os.path.exists(stage):
                raise _Taken from None
            raise
        linked.add(idenc)
        return True

    def _link_state(
        self, stage: str, idenc: str, directory: str, name: str, linked: set[str]
    ) -> None:
        """Link the state name of a task whose id is linked. If that fails the id is
        taken back, and if that fails too, ``_Torn`` (the error as its cause)."""
        try:
            self._link_at(stage, directory, name)
        except FileExistsError:
            pass  # state names are unique: ours (NFS, as above) or a repairer's
        except BaseException as exc:
            if isinstance(exc, FileNotFoundError) and not os.path.exists(stage):
                return  # a repairer took the pack after the id: it links this task
            try:
                os.unlink(f"{self.ids}/{idenc}")
            except BaseException:
                raise _Torn from exc
            linked.discard(idenc)
            raise

    def _link_pipelined(
        self,
        stage: str,
        qdir: str,
        slots: Sequence[Slot],
        states: list[tuple[str, str]],
        linked: set[str],
    ) -> list[bool]:
        """``_link`` for a big batch: a helper thread links the ids of a chunk of tasks
        while this one links the state names of the chunk before (``link(2)`` waits on
        the filesystem, not on the GIL). Each state name still follows its id, in seq
        order, so the tasks with a state name are always the first ones with an id."""
        count = len(slots)
        chunks = [range(i, min(i + LINK_CHUNK, count)) for i in range(0, count, LINK_CHUNK)]
        ids = [slot.idenc for slot in slots]
        helper = _helper()
        ahead = helper.submit(self._link_ids, stage, [ids[i] for i in chunks[0]], linked)
        inserted: list[bool] = []
        stated: set[str] = set()
        touched = time.monotonic()
        for k, chunk in enumerate(chunks):
            done, error = ahead.result()
            if error is None and k + 1 < len(chunks):
                ahead = helper.submit(
                    self._link_ids, stage, [ids[i] for i in chunks[k + 1]], linked
                )
            try:
                for i, new in zip(chunk, done, strict=False):
                    if new:
                        self._link_state(
                            stage, ids[i], f"{qdir}/{states[i][0]}", states[i][1], linked
                        )
                        stated.add(ids[i])
                    inserted.append(new)
            except BaseException:
                ahead.result()  # done, or the chunk being linked now: wait for it
                for idenc in linked - stated:  # ids with no state name: taken back,
                    with contextlib.suppress(OSError):  # or left for a repair to complete
                        os.unlink(f"{self.ids}/{idenc}")
                        linked.discard(idenc)
                raise
            if error is not None:
                raise error
            if time.monotonic() - touched > IDLE_SECONDS:  # a slow disk: still alive
                os.utime(stage)
                touched = time.monotonic()
        return inserted

    def _link_ids(
        self, stage: str, ids: list[str], linked: set[str]
    ) -> tuple[list[bool], BaseException | None]:
        """``_link_id`` for each of ``ids`` in order, in the helper thread: the results
        so far, and the error that stopped it (raised in the caller's thread)."""
        done: list[bool] = []
        try:
            for idenc in ids:
                done.append(self._link_id(stage, idenc, linked))
        except BaseException as exc:
            return done, exc
        return done, None

    def _link_at(self, stage: str, directory: str, name: str) -> None:
        """``link(stage, directory/name)``, both looked up from open directories: a
        path lookup less each (about a microsecond)."""
        if not _LINK_AT:
            os.link(stage, f"{directory}/{name}")
            return
        source = stage.rpartition("/")[2]
        os.link(source, name, src_dir_fd=self._dir_fd(self.tmp), dst_dir_fd=self._dir_fd(directory))

    def _dir_fd(self, path: str) -> int:
        fd = self._dirs.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
            if self._dirs.setdefault(path, fd) != fd:  # another thread was first
                os.close(fd)
            fd = self._dirs[path]
        return fd

    def _stage_path(self) -> str:
        tag = f"{os.getpid()}-{time.time_ns():x}-{random.getrandbits(32):08x}"
        return f"{self.tmp}/pack-{tag}"

    def close(self) -> None:
        """Close the open packs (their tasks are all linked): remove their stage names."""
        with self._lock:
            for qenc, pack in list(self._open.items()):
                self._retire(qenc, finished=pack.pid == _pid)
            dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    # -- repair ----------------------------------------------------------------------
    def drop_orphan(self, record: str) -> bool:
        """Free the id ``record`` if its enqueue died before giving it a state name.

        True if the id is free now. An id of a pack whose writer died is kept and its
        pack completed instead (the task is enqueued after all).
        """
        try:
            stat = os.stat(record)
        except FileNotFoundError:
            return True
        if time.time() - stat.st_mtime < ORPHAN_SECONDS:
            return False  # an enqueue may be in progress
        if stat.st_nlink == 1:  # no state name links to it
            aside = self._stage_path().replace("/pack-", "/orphan-")
            try:
                os.rename(record, aside)  # one of several repairers wins
            except FileNotFoundError:
                return False
            os.unlink(aside)
            return True
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            fd = os.open(record, os.O_RDONLY | _CLOEXEC)
            try:
                head = os.pread(fd, _CHUNK, 0)
                stage = _header(head, fd)[2] if head.startswith(MAGIC) else ""
            finally:
                os.close(fd)
            if stage.startswith("pack-") and "/" not in stage:
                self.repair(f"{self.tmp}/{stage}")
        return False

    def repair_stale(self) -> bool:
        """Complete the packs of writers that died (stage names over a minute old)."""
        with self._lock:
            mine = {pack.path for pack in self._open.values()}
        repaired = False
        now = time.time()
        for name in listdir(self.tmp):
            path = f"{self.tmp}/{name}"
            if not name.startswith("pack-") or path in mine:
                continue
            try:
                if now - os.stat(path).st_mtime >= ORPHAN_SECONDS:
                    repaired |= self.repair(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # left under a pack- name: the next prune tries again
                log.warning("could not repair the pack %s: %s", path, exc)
        return repaired

    def repair(self, stage: str) -> bool:
        """Complete the pack left under ``stage``; True if it gave a task its state name."""
        aside = self._stage_path()
        try:
            os.rename(stage, aside)  # one repairer wins; the writer can link no more
        except FileNotFoundError:
            return False  # finished, or another repairer has it
        # The count before the ids: a prune meanwhile (ids first) errs towards no link.
        stat = os.stat(aside)
        try:
            qenc, tasks = _tasks(aside)
        except (ValueError, UnicodeDecodeError, struct.error):
            os.unlink(aside)  # damaged: nothing in it can be told apart
            return False
        linked = []
        for idenc, (kind, name) in tasks.items():
            with contextlib.suppress(FileNotFoundError):
                found = os.stat(f"{self.ids}/{idenc}")
                if (found.st_ino, found.st_dev) == (stat.st_ino, stat.st_dev):
                    linked.append((kind, name))
        # 1 (aside) + ids + state names, and the state names are the first tasks' with ids.
        named = stat.st_nlink - 1 - len(linked)
        completed = False
        for kind, name in linked[named:] if 0 <= named < len(linked) else []:
            with contextlib.suppress(FileExistsError):
                os.link(aside, f"{self.base}/q/{qenc}/{kind}/{name}")
                completed = True
        self.repaired += completed
        os.unlink(aside)
        return completed


def _pack_header(slots: int, qenc: str, stage: str) -> bytes:
    queue, name = qenc.encode(), os.path.basename(stage).encode()
    return MAGIC + _HEAD.pack(slots, len(queue), len(name)) + queue + name


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    if offset is not None:  # one call nearly always does
        written = os.pwrite(fd, data, offset)
        if written == len(data):
            return
        data, offset = data[written:], offset + written
    view = memoryview(data)
    while view:
        if offset is None:
            view = view[os.write(fd, view) :]
        else:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written


def _same_file(one: str, other: str) -> bool:
    try:
        first, second = os.stat(one), os.stat(other)
    except FileNotFoundError:
        return False
    return (first.st_ino, first.st_dev) == (second.st_ino, second.st_dev)
