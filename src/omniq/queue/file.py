"""File queue over fsspec: local and shared disks by atomic rename, object stores by
create-if-absent.

``FileTaskQueue`` picks the protocol from its location and passes every primitive on:

* a local path or ``file://`` URL: ``omniq._diskqueue.LocalQueue``, where each state
  change is one ``rename(2)`` of a task's state name (only one of several renamers of
  a name succeeds), the records kept in packs (``omniq._packs``);
* ``s3://``, ``gs://``, ``abfs://``, ``memory://``: ``omniq._objectqueue.ObjectQueue``,
  where each change is the create-if-absent of a task's next version.

The layouts, the protocols and what each filesystem guarantees are in
``docs/backends/file.md``; names, URLs and the fsspec store are in ``omniq._fs``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import _fs
from .._diskqueue import LocalQueue
from .._objectqueue import ObjectQueue
from .._task import TaskStatus
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

if TYPE_CHECKING:
    from ..results.file import FileResultStorage


class FileTaskQueue(TaskQueue):
    """Tasks as files under ``base_dir``: a local path, ``file://``, or any fsspec URL
    that can give exclusive claims (``s3://bucket/prefix``, ``gs://``, ``abfs://``,
    ``memory://``), with ``storage_options`` passed to fsspec.

    ``fsync=True`` makes an enqueue durable across power loss on local disks (the
    record and the directories are synced before it returns). ``retention_seconds``:
    how long succeeded, cancelled and expired tasks stay visible to ``get_task``.
    ``max_poll_seconds``: the longest an idle worker sleeps before it looks again,
    for changes no notification reports (other hosts of a shared disk; object stores).
    A filesystem that cannot give exclusive claims is refused here, before any I/O.
    """

    schemes = ("file", "s3", "gs", "gcs", "abfs", "az")
    supports_blocking_put = True

    def __init__(
        self,
        base_dir: str | os.PathLike[str] = "./omniq_tasks",
        *,
        storage_options: dict[str, Any] | None = None,
        fsync: bool = False,
        retention_seconds: float = 3600.0,
        max_poll_seconds: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        path = _fs.local_path(base_dir)
        # Absolute now: a later chdir must not split one queue across two directories.
        self.base_dir = path if path is not None else os.fspath(base_dir).rstrip("/")
        self.is_local = path is not None
        if not self.is_local:
            _fs.check_exclusive(self.base_dir)
        self.storage_options = dict(storage_options or {})
        self.fsync = fsync
        self.retention_seconds = retention_seconds
        self.max_poll_seconds = max_poll_seconds
        self._local: LocalQueue | None = None
        self._objects: ObjectQueue | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileTaskQueue:
        """``file:///abs/dir``, ``file://relative/dir``, ``s3://bucket/prefix``, ``gs://…``."""
        return cls(url, **options)

    def default_result_storage(self) -> FileResultStorage:
        """Results beside the tasks, in ``<base_dir>/results``: what ``OmniQ`` uses by default."""
        from ..results.file import FileResultStorage

        return FileResultStorage(self.base_dir, storage_options=self.storage_options)

    def _disk(self) -> LocalQueue | None:
        if not self.is_local:
            return None
        with self._lock:
            if self._local is None:
                self._local = LocalQueue(
                    self.base_dir, fsync=self.fsync, retention_seconds=self.retention_seconds,
                    max_poll_seconds=self.max_poll_seconds,
                )  # fmt: skip
            return self._local

    def _store(self) -> ObjectQueue:
        with self._lock:
            if self._objects is None:
                protocol = _fs.check_exclusive(self.base_dir)
                fs, root = _fs.open_fs(self.base_dir, self.storage_options)
                self._objects = ObjectQueue(
                    _fs.Store(fs, protocol), root, retention_seconds=self.retention_seconds,
                    max_poll_seconds=self.max_poll_seconds,
                )  # fmt: skip
            return self._objects

    # -- primitives -------------------------------------------------------------------
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        disk = self._disk()
        return disk.put(rows) if disk else await self._store().put(rows)

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool]:
        disk = self._disk()
        if disk is not None:
            return disk.put(rows)
        objects = self._store()
        return objects.store.run_blocking(objects.put(rows))

    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        disk = self._disk()
        if disk is not None:
            return disk.claim(queues, limit, now, lease_until, lease_id)
        return await self._store().claim(queues, limit, now, lease_until, lease_id)

    def _wake_generation(self) -> int:
        disk = self._disk()
        return disk.bell.wakeup.generation if disk else self._store().generation()

    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        disk = self._disk()
        await (disk.wait if disk else self._store().wait)(queues, timeout, since)

    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        disk = self._disk()
        return disk.finish(refs, status, error) if disk else await self._store().finish(
            refs, status, error)  # fmt: skip

    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        disk = self._disk()
        return disk.retry(ref, due_at, error) if disk else await self._store().retry(
            ref, due_at, error)  # fmt: skip

    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        disk = self._disk()
        if disk is not None:
            disk.release(refs)
        else:
            await self._store().release(refs)

    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        disk = self._disk()
        return disk.extend(refs, lease_until) if disk else await self._store().extend(
            refs, lease_until)  # fmt: skip

    async def _cancel(self, task_id: str) -> bool:
        disk = self._disk()
        return disk.cancel(task_id) if disk else await self._store().cancel(task_id)

    async def _get(self, task_id: str) -> StoredRow | None:
        disk = self._disk()
        return disk.get(task_id) if disk else await self._store().get(task_id)

    async def _count(self, queue: str) -> int:
        disk = self._disk()
        return disk.count(queue) if disk else await self._store().count(queue)

    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        disk = self._disk()
        return disk.list_rows(status, queue, limit) if disk else await self._store().list_rows(
            status, queue, limit)  # fmt: skip

    async def _requeue(self, task_id: str, now: float) -> bool:
        disk = self._disk()
        return disk.requeue(task_id, now) if disk else await self._store().requeue(task_id, now)

    async def _close(self) -> None:
        with self._lock:
            local, self._local = self._local, None
            objects, self._objects = self._objects, None
        if local is not None:
            local.close()
        if objects is not None:
            await objects.close()
