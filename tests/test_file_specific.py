"""The File backend beyond the contract: processes on one disk, names, refusal, fsync, S3.

The contract suite (``tests/test_contract.py``) runs on local disk (``file``), fsspec's
memory filesystem (``file_memory``) and S3 through s3fs on moto (``s3``); these tests
cover what only this backend has.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from omniq import AsyncOmniQ, ConfigurationError, OmniQ, TaskStatus, _fs, _objectqueue, _packs
from omniq.events import Event, EventType, JSONLEventStorage
from omniq.queue import FileTaskQueue
from omniq.results.base import TaskResult
from omniq.results.file import FileResultStorage
from omniq.testing.contract import DEADLINE, make_task

from .reliability._procs import Processes, read_lines, wait_until

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()


# -- several worker processes on one directory ---------------------------------------

FTASKS = '''
    """Task functions run by the worker processes (imported as ``ftasks``)."""

    import os
    import threading
    import time
    from pathlib import Path

    _lock = threading.Lock()
    _RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")


    def record(key):
        with _lock, open(os.path.join(_RUNS, f"{os.getpid()}.log"), "a") as log:
            log.write(key + "\\n")
        return key


    def block_once(marker):
        """First run: mark "started" and block until killed. Any later run: return."""
        record("block")
        if os.path.exists(marker):
            return "completed"
        Path(marker).write_text(str(os.getpid()))
        threading.Event().wait()
'''

WORKER = """
    import signal
    import sys

    from omniq import OmniQ
    from omniq.queue import FileTaskQueue

    base, lease, concurrency = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    with OmniQ(FileTaskQueue(base, lease_seconds=lease)) as omniq:
        worker = omniq.worker(concurrency=concurrency)
        signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop())
        print("ready", flush=True)
        worker.run()
        print(f"processed={worker.processed}", flush=True)
"""

PRODUCER = """
    import sys

    import ftasks
    from omniq import OmniQ

    base, name, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with OmniQ(f"file://{base}") as omniq:
        for i in range(0, total, 50):
            keys = [f"{name}-{j}" for j in range(i, min(i + 50, total))]
            if i % 100:
                omniq.enqueue_many(ftasks.record, [(k,) for k in keys])
            else:
                for j, key in enumerate(keys):
                    omniq.enqueue(ftasks.record, key, priority=j % 3)
"""


def _scripts(procs: Processes) -> None:
    procs.write("ftasks.py", FTASKS)
    procs.write("worker.py", WORKER)
    procs.write("producer.py", PRODUCER)
    (procs.directory / "runs").mkdir()


def _done(base: Path) -> int:
    folder = base / "done" / "succeeded" / "default"
    return len(os.listdir(folder)) if folder.exists() else 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_worker_processes_run_every_task_once(procs: Processes, tmp_path: Path) -> None:
    _scripts(procs)
    base = tmp_path / "queue"
    per_producer, producers = 600, 2
    workers = [procs.start("worker.py", base, 30, 4, name=f"worker-{i}") for i in range(3)]
    started = [procs.start("producer.py", base, f"p{i}", per_producer) for i in range(producers)]
    for producer in started:
        assert producer.wait() == 0, producer.describe()
    total = per_producer * producers
    wait_until(lambda: _done(base) >= total, "every task to succeed", alive=tuple(workers))
    for worker in workers:
        assert worker.terminate() == 0, worker.describe()
    runs = Counter(read_lines(procs.directory / "runs", "*.log"))
    assert len(runs) == total
    assert max(runs.values()) == 1, [key for key, n in runs.items() if n > 1][:10]
    ran_in = [p.name for p in (procs.directory / "runs").iterdir()]
    assert len(ran_in) > 1  # the work was shared, not done by one worker alone
    assert os.listdir(base / "q" / "default" / "ready") == []
    assert os.listdir(base / "q" / "default" / "leased") == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killed_worker_task_is_redelivered_after_its_lease(
    procs: Processes, tmp_path: Path
) -> None:
    _scripts(procs)
    base, marker = tmp_path / "queue", tmp_path / "started"
    with OmniQ(FileTaskQueue(base)) as omniq:
        task_id = omniq.enqueue("ftasks:block_once", str(marker))
    first = procs.start("worker.py", base, 1.0, 1, name="first")
    wait_until(marker.exists, "the task to start", alive=(first,))
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    second = procs.start("worker.py", base, 1.0, 1, name="second")
    with OmniQ(FileTaskQueue(base)) as omniq:
        assert omniq.get_result(task_id, timeout=DEADLINE * 3) == "completed"

        def acked() -> bool:  # the result is written before the ack
            task = omniq.get_task(task_id)
            return task is not None and task.status is TaskStatus.SUCCEEDED

        wait_until(acked, "the ack", alive=(second,))
        task = omniq.get_task(task_id)
        assert task is not None and task.attempts == 2
    second.terminate()
    assert read_lines(procs.directory / "runs", "*.log") == ["block", "block"]


WAKER = """
    import sys

    from omniq.queue import FileTaskQueue
    from omniq.testing.contract import make_task
    import asyncio

    async def main() -> None:
        async with FileTaskQueue(sys.argv[1]) as queue:
            await queue.enqueue(make_task(id=sys.argv[2]))

    asyncio.run(main())
"""


async def test_waiting_dequeue_wakes_for_another_process(procs: Processes, tmp_path: Path) -> None:
    """The doorbell: a producer in another process ends a long wait (no poll interval)."""
    procs.write("waker.py", WAKER)
    base = tmp_path / "queue"
    async with FileTaskQueue(base, max_poll_seconds=3600) as queue:
        await queue.dequeue(timeout=0.01)  # the watcher is running from here on
        waiter = asyncio.ensure_future(queue.dequeue(timeout=DEADLINE * 3))
        await asyncio.sleep(0.05)  # let the waiter block first (order only, not timing)
        child = procs.start("waker.py", base, "from-child")
        got = await waiter
        assert got is not None and got.id == "from-child"
        assert await asyncio.to_thread(child.wait) == 0


# -- names give the order -------------------------------------------------------------


async def test_one_sorted_listing_is_the_delivery_order(tmp_path: Path) -> None:
    async with FileTaskQueue(tmp_path) as queue:
        tasks = [make_task(priority=p) for p in (0, 5, -2, 10, 5, 0, 2**62, -(2**62))]
        for task in tasks:
            await queue.enqueue(task)
        expected = [t.id for t in sorted(tasks, key=lambda t: -t.priority)]  # stable: FIFO
        names = sorted(os.listdir(tmp_path / "q" / "default" / "ready"))
        assert [_fs.dec(name.split(".")[2]) for name in names] == expected
        got = await queue.dequeue_many(len(tasks))
        assert [t.id for t in got] == expected


async def test_scheduled_names_sort_by_due_time(tmp_path: Path) -> None:
    now = time.time()
    async with FileTaskQueue(tmp_path) as queue:
        late, soon = make_task(due_at=now + 7200), make_task(due_at=now + 3600)
        await queue.enqueue_many([late, soon])
        names = sorted(os.listdir(tmp_path / "q" / "default" / "sched"))
        assert [_fs.dec(name.split(".")[3]) for name in names] == [soon.id, late.id]
        assert await queue.size() == 2


async def test_queue_names_and_ids_with_any_characters(tmp_path: Path) -> None:
    async with FileTaskQueue(tmp_path) as queue:
        task = make_task("a/b.c ~%", id="order/42.é")
        assert await queue.enqueue(task) == task.id
        got = await queue.dequeue(["a/b.c ~%"])
        assert got is not None and got.id == "order/42.é"
        assert await queue.ack(got)
        stored = await queue.get_task("order/42.é")
        assert stored is not None and stored.status is TaskStatus.SUCCEEDED
        with pytest.raises(ValueError, match="too long"):
            await queue.enqueue(make_task(id="x" * 500))


# -- exclusive claims: what is refused --------------------------------------------------


@pytest.mark.parametrize(
    "url", ["ftp://host/tasks", "http://host/tasks", "simplecache::s3://b/p", "nolock://x"]
)
def test_a_filesystem_without_exclusive_claims_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot claim tasks exclusively"):
        FileTaskQueue(url)
    with pytest.raises(ConfigurationError, match="cannot claim tasks exclusively"):
        FileTaskQueue.from_url(url)


class _IgnoresConditions:
    """An S3-compatible server that ignores If-None-Match: every write overwrites."""

    async_impl = False

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def pipe_file(self, path: str, data: bytes, mode: str = "overwrite") -> None:
        self.objects[path] = data

    def rm_file(self, path: str) -> None:
        self.objects.pop(path, None)


async def test_a_server_that_ignores_conditional_writes_is_refused() -> None:
    store = _fs.Store(_IgnoresConditions(), "s3")
    with pytest.raises(ConfigurationError, match="ignored a create-if-absent write"):
        await store.probe("bucket/prefix")


# -- local specifics ----------------------------------------------------------------------


async def test_constructor_does_no_io(tmp_path: Path) -> None:
    FileTaskQueue(tmp_path / "sub")
    FileResultStorage(tmp_path / "results")
    FileTaskQueue("s3://bucket/prefix", storage_options={"anon": True})
    assert list(tmp_path.iterdir()) == []


async def test_fsync_syncs_the_record_and_the_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    async with FileTaskQueue(tmp_path, fsync=True) as durable:
        await durable.enqueue(make_task())
        assert len(synced) == 3  # the record, its ready directory, the ids directory
        task = await durable.dequeue()
        assert task is not None and await durable.ack(task)
        synced.clear()
        await durable.enqueue_many([make_task(), make_task(), make_task(due_at=time.time() + 60)])
        assert len(synced) == 4  # the pack, the ready and sched directories, the ids directory
    synced.clear()
    async with FileTaskQueue(tmp_path / "fast") as fast:
        await fast.enqueue(make_task())
    assert synced == []


async def test_an_enqueue_that_died_halfway_is_replaced(tmp_path: Path) -> None:
    """A record no state name links to (the enqueue died between its two steps)."""
    async with FileTaskQueue(tmp_path) as queue:
        await queue.enqueue(make_task())  # lay out the directories
        orphan = tmp_path / "ids" / "order-7"
        orphan.write_bytes(b"default 0 0000000000000000\n")  # no payload, no state name
        old = time.time() - 3600
        os.utime(orphan, (old, old))
        assert await queue.enqueue_many([make_task(id="order-7")]) == [True]
        got = await queue.dequeue_many(2)
        assert "order-7" in [t.id for t in got]
        young = tmp_path / "ids" / "order-8"
        young.write_bytes(b"")  # an enqueue in progress right now: the id is taken
        assert await queue.enqueue_many([make_task(id="order-8")]) == [False]


# -- packs: many tasks in one file, two names each ------------------------------------------


async def test_a_batch_is_one_file_with_two_names_per_task(tmp_path: Path) -> None:
    async with FileTaskQueue(tmp_path) as queue:
        tasks = [make_task(args=(i,), priority=i % 2) for i in range(5)]
        assert await queue.enqueue_many(tasks) == [True] * 5
        records = [os.stat(tmp_path / "ids" / task.id) for task in tasks]
        assert len({record.st_ino for record in records}) == 1
        assert records[0].st_nlink == 10  # an id and a state name per task
        assert os.listdir(tmp_path / "tmp") == []  # its stage name is gone: complete
        got = await queue.dequeue_many(5)
        assert [task.args for task in got] == [(1,), (3,), (0,), (2,), (4,)]
        stored = await queue.get_task(tasks[2].id)
        assert stored is not None and stored.args == (2,)
        assert await queue.enqueue_many(tasks[:2]) == [False, False]


async def test_single_enqueues_append_to_one_open_pack(tmp_path: Path) -> None:
    queue = FileTaskQueue(tmp_path)
    for i in range(3):
        await queue.enqueue(make_task(id=f"t{i}", args=(i,)))
    assert len({os.stat(tmp_path / "ids" / f"t{i}").st_ino for i in range(3)}) == 1
    assert len(os.listdir(tmp_path / "tmp")) == 1  # the open pack's stage name
    assert [task.args for task in await queue.dequeue_many(3)] == [(0,), (1,), (2,)]
    await queue.close()
    assert os.listdir(tmp_path / "tmp") == []


KILLED_BATCH = """
    import asyncio
    import os
    import signal
    import sys

    from omniq.queue import FileTaskQueue
    from omniq.testing.contract import make_task

    base, links, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    real_link, calls = os.link, []


    def link(source, target, **dir_fds):
        calls.append(target)
        if len(calls) > links:
            os.kill(os.getpid(), signal.SIGKILL)
        real_link(source, target, **dir_fds)


    async def main():
        tasks = [make_task(id=f"b{i}", args=(i,)) for i in range(total)]
        if total > 6:  # a duplicate id, refused: the pack holds it twice
            tasks[total // 4] = make_task(id="b0", args=(-1,))
        async with FileTaskQueue(base) as queue:
            os.link = link
            await queue.enqueue_many(tasks)


    asyncio.run(main())
"""


@pytest.mark.parametrize("repair_by", ["enqueue of its id", "worker's prune"])
async def test_an_enqueue_many_killed_halfway_is_completed(
    procs: Processes, tmp_path: Path, repair_by: str
) -> None:
    """kill -9 between a task's id and its state name: a repair links the state name."""
    procs.write("killed.py", KILLED_BATCH)
    base = tmp_path / "queue"
    child = procs.start("killed.py", base, 5, 6)  # ids b0, ready b0, ids b1, ready b1, ids b2
    assert child.wait() == -signal.SIGKILL, child.describe()
    [stage] = os.listdir(base / "tmp")
    assert os.stat(base / "tmp" / stage).st_nlink == 6
    async with FileTaskQueue(base) as queue:
        assert [t.id for t in await queue.dequeue_many(10)] == ["b0", "b1"]
        assert await queue.enqueue(make_task(id="b2")) == "b2"  # young: maybe in progress
        assert await queue.dequeue_many(10) == []
        old = time.time() - 3600
        os.utime(base / "tmp" / stage, (old, old))
        if repair_by == "enqueue of its id":
            assert await queue.enqueue_many([make_task(id="b2"), make_task(id="b3")]) == [
                False, True]  # fmt: skip
            expected = [("b2", (2,)), ("b3", ())]
        else:
            async with FileTaskQueue(base) as worker:  # its first claim prunes
                got = await worker.dequeue_many(10)
                assert [(t.id, t.args) for t in got] == [("b2", (2,))]
            assert await queue.enqueue_many([make_task(id=f"b{i}") for i in range(5)]) == [
                False, False, False, True, True]  # fmt: skip
            expected = [("b3", ()), ("b4", ())]
        assert [(t.id, t.args) for t in await queue.dequeue_many(10)] == expected
        assert [name for name in os.listdir(base / "tmp") if name == stage] == []
    assert os.listdir(base / "tmp") == []


@pytest.mark.parametrize("links", [1, 300, 777])
async def test_a_big_enqueue_many_killed_halfway_runs_each_task_with_an_id_once(
    procs: Processes, tmp_path: Path, links: int
) -> None:
    """A big batch links ids in a helper thread ahead of the state names: a kill -9
    leaves many ids without one, and the repair links them all (once each, a duplicate
    id in the batch included)."""
    procs.write("killed.py", KILLED_BATCH)
    base, total = tmp_path / "queue", 600
    child = procs.start("killed.py", base, links, total)
    assert child.wait() == -signal.SIGKILL, child.describe()
    [stage] = os.listdir(base / "tmp")
    with_id = {f"b{i}" for i in range(total) if (base / "ids" / f"b{i}").exists()}
    assert 0 < len(with_id) < total
    old = time.time() - 3600
    os.utime(base / "tmp" / stage, (old, old))
    async with FileTaskQueue(base) as queue:
        got = await queue.dequeue_many(total)
        assert sorted(t.id for t in got) == sorted(with_id)
        assert all(t.args == (int(t.id[1:]),) for t in got)
        assert f"b{total // 4}" not in with_id
        again = await queue.enqueue_many([make_task(id=f"b{i}") for i in range(total)])
        assert [f"b{i}" for i in range(total) if not again[i]] == sorted(
            with_id, key=lambda key: int(key[1:]))  # fmt: skip
    assert os.listdir(base / "tmp") == []


async def test_a_big_enqueue_many_that_fails_halfway_takes_back_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link, states = os.link, []

    def link(source: Any, target: Any, **dir_fds: Any) -> None:
        if "." in str(target):  # a state name (ids here have no dot)
            states.append(target)
            if len(states) == 400:
                raise OSError(errno.EIO, "disk error")
        real_link(source, target, **dir_fds)

    async with FileTaskQueue(tmp_path) as queue:
        tasks = [make_task(id=f"c{i}") for i in range(600)]
        monkeypatch.setattr(os, "link", link)
        with pytest.raises(OSError, match="disk error"):
            await queue.enqueue_many(tasks)
        monkeypatch.setattr(os, "link", real_link)
        assert sorted(os.listdir(tmp_path / "ids")) == sorted(f"c{i}" for i in range(399))
        got = await queue.dequeue_many(600)
        assert [t.id for t in got] == [f"c{i}" for i in range(399)]
        assert await queue.enqueue_many(tasks) == [False] * 399 + [True] * 201
        assert len(await queue.dequeue_many(600)) == 201


@pytest.mark.parametrize("keep_open", [True, False], ids=["local disk", "shared disk"])
async def test_an_idle_pack_taken_by_a_repair_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_open: bool
) -> None:
    """A producer idle for over a minute finds its open pack repaired away: a new one."""
    monkeypatch.setattr(_packs, "is_local_disk", lambda path: keep_open)
    async with FileTaskQueue(tmp_path) as producer, FileTaskQueue(tmp_path) as worker:
        await producer.enqueue(make_task(id="one"))
        [stage] = os.listdir(tmp_path / "tmp")
        old = time.time() - 3600
        os.utime(tmp_path / "tmp" / stage, (old, old))
        got = await worker.dequeue()  # its first claim prunes: the pack looks abandoned
        assert got is not None and got.id == "one"
        assert os.listdir(tmp_path / "tmp") == []
        await producer.enqueue(make_task(id="two", args=(2,)))
        got = await worker.dequeue()
        assert got is not None and (got.id, got.args) == ("two", (2,))
        assert len(os.listdir(tmp_path / "tmp")) == 1


async def test_a_damaged_pack_fails_its_tasks_and_the_queue_goes_on(tmp_path: Path) -> None:
    async with FileTaskQueue(tmp_path) as queue:
        tasks = [make_task() for _ in range(3)]
        await queue.enqueue_many(tasks)
        os.truncate(tmp_path / "ids" / tasks[0].id, 30)  # within its header
        await queue.enqueue(make_task(id="fine"))
        assert [t.id for t in await queue.dequeue_many(10)] == ["fine"]
        failed = await queue.failed_tasks()
        assert sorted(t.id for t in failed) == sorted(t.id for t in tasks)
        assert all("corrupt payload" in (t.error or "") for t in failed)
        assert await queue.get_task(tasks[0].id) is None  # its record cannot be read
        assert await queue.enqueue(make_task(id="after")) == "after"
        assert [t.id for t in await queue.dequeue_many(10)] == ["after"]


async def test_url_configuration_uses_files_for_tasks_and_results(tmp_path: Path) -> None:
    async with AsyncOmniQ(f"file://{tmp_path}/q") as omniq:
        assert isinstance(omniq.task_queue, FileTaskQueue)
        assert isinstance(omniq.result_storage, FileResultStorage)
        task_id = await omniq.enqueue("omniq.testing.contract:echo", 5)
        await omniq.worker().run(burst=True)
        assert await omniq.get_result(task_id, timeout=DEADLINE) == 5
    assert (tmp_path / "q" / "results" / task_id).exists()


SET_RESULT = """
import asyncio, sys
from omniq.results.file import FileResultStorage
from omniq.results.base import TaskResult

async def main() -> None:
    async with FileResultStorage(sys.argv[1]) as store:
        await store.set_many([(TaskResult(task_id=sys.argv[2], succeeded=True, value=b"x"), 60)])

asyncio.run(main())
"""


async def test_result_wait_is_woken_by_another_process(tmp_path: Path) -> None:
    async with FileResultStorage(tmp_path) as store:
        waiter = asyncio.ensure_future(store.wait("t", None))
        await asyncio.sleep(0.05)  # let the waiter block first (order only, not timing)
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        command = [sys.executable, "-c", SET_RESULT, str(tmp_path), "t"]
        await asyncio.to_thread(subprocess.run, command, env=env, check=True, timeout=60)
        result = await asyncio.wait_for(waiter, DEADLINE)
        assert result is not None and result.value == b"x"


async def test_local_results_prune_expired_files(tmp_path: Path) -> None:
    async with FileResultStorage(tmp_path) as store:
        short = TaskResult(task_id="short", succeeded=True)
        await store.set_many([(short, 0.01), (TaskResult(task_id="kept", succeeded=True), None)])
        ttl_end = time.time() + 0.01
        while time.time() <= ttl_end:
            await asyncio.sleep(0.005)
        store._next_prune = 0.0
        await store.set_many([(TaskResult(task_id="trigger", succeeded=True), 60.0)])
    files = (tmp_path / "results").iterdir()
    assert sorted(p.name for p in files if p.is_file() and p.name[0] != ".") == [
        "kept", "trigger",
    ]  # fmt: skip


async def test_local_results_of_a_batch_share_one_file(tmp_path: Path) -> None:
    """Results that expire together are one file under many names; each is replaced
    or deleted on its own."""
    folder = tmp_path / "results"

    def result(task_id: str, value: bytes) -> TaskResult:
        return TaskResult(task_id=task_id, succeeded=True, value=value)

    async with FileResultStorage(tmp_path) as store:
        batch = [(result(f"r{i}", b"%d" % i), 60.0) for i in range(3)]
        await store.set_many([*batch, (result("kept", b"k"), None)])
        stats = [os.stat(folder / f"r{i}") for i in range(3)]
        assert len({st.st_ino for st in stats}) == 1 and stats[0].st_nlink == 3
        assert stats[0].st_mtime > time.time() + 50  # the modification time is the expiry
        assert os.stat(folder / "kept").st_ino != stats[0].st_ino
        assert os.listdir(folder / ".tmp") == []
        await store.set_many([(result("r1", b"new"), 60.0), (result("r5", b"5"), 60.0)])
        await store.delete("r0")
        values = {key: await store.get(key) for key in ("r0", "r1", "r2", "r5", "kept")}
        assert {key: found and found.value for key, found in values.items()} == {
            "r0": None, "r1": b"new", "r2": b"2", "r5": b"5", "kept": b"k"}  # fmt: skip


# -- object stores ------------------------------------------------------------------------


async def test_stale_markers_are_cleaned_and_tasks_still_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A marker whose version never came (its writer died) is dropped once stale."""
    import fsspec

    root = f"omniq-test-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    try:
        async with FileTaskQueue(f"memory://{root}") as queue:
            dead = f"/{root}/q/default/ready/{'0' * 16}.{'0' * 16}.ghost.0"
            fs.pipe_file(dead, b"")
            task = make_task()
            await queue.enqueue(task)
            got = await queue.dequeue()
            assert got is not None and got.id == task.id
            assert fs.exists(dead)  # too young to call stale: it may be a write in flight
            monkeypatch.setattr(_objectqueue, "STALE_SECONDS", -1.0)
            assert await queue.dequeue() is None
            assert not fs.exists(dead)
    finally:
        fs.rm(f"/{root}", recursive=True)


def _events() -> list[Event]:
    return [
        Event(task_id="a", type=EventType.ENQUEUED, at=1.0),
        Event(task_id="a", type=EventType.STARTED, at=2.0, worker="w"),
        Event(task_id="b", type=EventType.ENQUEUED, at=3.0),
    ]


@pytest.mark.parametrize("where", ["memory", "s3"])
async def test_jsonl_events_on_fsspec(where: str, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        url, options = f"s3://{server.new_bucket()}/events", server.storage_options
    else:
        url, options = f"memory://omniq-test-{uuid.uuid4().hex[:8]}/events", {}
    events = _events()
    first = JSONLEventStorage.from_url(url, storage_options=options)
    await first.append(events[:2])
    other = JSONLEventStorage(url, storage_options=options)  # a second writer
    await other.append(events[2:])
    assert await first.query() == events
    assert await other.query(task_id="a", type=EventType.STARTED) == [events[1]]
    await first.close()
    await other.close()


async def test_s3_queue_shared_by_two_instances(request: pytest.FixtureRequest) -> None:
    """Two instances on one bucket prefix (as two processes would be) split the work."""
    server = request.getfixturevalue("s3_server")
    base = f"s3://{server.new_bucket()}/work"
    one = FileTaskQueue(base, storage_options=server.storage_options)
    two = FileTaskQueue(base, storage_options=server.storage_options)
    try:
        tasks = [make_task(priority=i % 3) for i in range(12)]
        assert await one.enqueue_many(tasks) == [True] * 12
        got = await asyncio.gather(*(q.dequeue_many(4) for q in (one, two, one, two)))
        ids = [t.id for batch in got for t in batch]
        assert sorted(ids) == sorted(t.id for t in tasks)
        assert await two.ack_many([t for batch in got for t in batch]) == [True] * 12
        assert await one.size() == 0
    finally:
        await one.close()
        await two.close()
