"""The public surface of DESIGN §2: names, URLs, environment variables, defaults."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import omniq
from omniq import AsyncOmniQ, ConfigurationError, OmniQ, TaskStatus
from omniq._task import new_task_id
from omniq.queue import MemoryTaskQueue, SQLiteTaskQueue


def test_exported_names_are_pinned() -> None:
    assert sorted(omniq.__all__) == [
        "AsyncOmniQ", "AsyncWorker", "ConfigurationError", "Event", "EventType",
        "MissingDependencyError", "OmniQ", "OmniQError", "PickleSerializer", "SerializationError",
        "Serializer",
        "Settings", "Task", "TaskFailedError", "TaskStatus", "Worker",
    ]  # fmt: skip


def test_import_needs_no_optional_driver() -> None:
    code = (
        "import sys, omniq\n"
        "from omniq.queue import (RedisTaskQueue, PostgreSQLTaskQueue,\n"
        "    NATSTaskQueue, FileTaskQueue)\n"
        "loaded = {'redis', 'asyncpg', 'nats', 's3fs', 'fsspec', 'psycopg'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_seed_constructors_do_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(MemoryTaskQueue(), MemoryTaskQueue)
    queue = SQLiteTaskQueue(database_path="tasks.db")
    assert queue.database_path == str(tmp_path / "tasks.db")
    assert list(tmp_path.iterdir()) == []  # nothing is created before first use


def test_default_is_one_sqlite_file_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("OMNIQ_TASK_QUEUE_URL", "OMNIQ_RESULT_STORAGE_URL", "OMNIQ_EVENT_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    with OmniQ() as omniq:
        task_id = omniq.enqueue("omniq.testing.contract:echo", 1)
        assert isinstance(omniq.task_queue, SQLiteTaskQueue)
        assert omniq.get_task(task_id) is not None
    assert (tmp_path / "omniq.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("omniq.db")) == []


def test_environment_variables_choose_components(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNIQ_TASK_QUEUE_URL", "memory://")
    monkeypatch.setenv("OMNIQ_RESULT_STORAGE_URL", f"sqlite:///{tmp_path}/results.db")
    monkeypatch.setenv("OMNIQ_EVENT_STORAGE_URL", f"file://{tmp_path}/events.jsonl")
    with OmniQ() as omniq:
        task_id = omniq.enqueue("omniq.testing.contract:echo", "x")
        omniq.worker().run(burst=True)
        assert omniq.get_result(task_id, timeout=10) == "x"
        assert [e.type.value for e in omniq.events(task_id=task_id)] == [
            "enqueued", "started", "succeeded",
        ]  # fmt: skip
    assert (tmp_path / "results.db").exists() and (tmp_path / "events.jsonl").exists()


@pytest.mark.parametrize("url", ["mysql://x", "nonsense", "sqlite://no-slash.db"])
def test_bad_urls_are_clear(url: str) -> None:
    with pytest.raises((ConfigurationError, ValueError)):
        OmniQ(url)


def test_enqueue_options_and_kwargs_that_clash(tmp_path: Path) -> None:
    with OmniQ("memory://") as omniq:
        task_id = omniq.enqueue(
            "omniq.testing.contract:echo", priority=3, kwargs={"value": {"priority": "mine"}}
        )
        task = omniq.get_task(task_id)
        assert task is not None
        assert task.priority == 3 and task.kwargs == {"value": {"priority": "mine"}}
        assert task.status is TaskStatus.PENDING
        with pytest.raises(ConfigurationError, match="eta or delay"):
            omniq.enqueue("omniq.testing.contract:echo", eta=1.0, delay=1.0)
        with pytest.raises(ConfigurationError, match="lambda"):
            omniq.enqueue(lambda: None)


def test_idempotent_enqueue_through_the_facade() -> None:
    with OmniQ("memory://") as omniq:
        first = omniq.enqueue("omniq.testing.contract:echo", 1, task_id="order-42")
        again = omniq.enqueue("omniq.testing.contract:echo", 2, task_id="order-42")
        assert first == again == "order-42"
        assert omniq.size() == 1


async def test_async_twin_has_the_same_method_names() -> None:
    async with AsyncOmniQ("memory://") as aq:
        sync_names = {n for n in dir(OmniQ) if not n.startswith("_")}
        assert sync_names <= {n for n in dir(aq) if not n.startswith("_")}
        task_id = await aq.enqueue("omniq.testing.contract:echo", 5)
        await aq.worker().run(burst=True)
        assert await aq.get_result(task_id, timeout=10) == 5


def test_signed_payloads_reject_tampering() -> None:
    queue = MemoryTaskQueue()
    with OmniQ(queue, secret_key="k1") as omniq:
        task_id = omniq.enqueue("omniq.testing.contract:echo", 1)
    with OmniQ(queue, secret_key="k2") as other:
        other.worker().run(burst=True)
        task = other.get_task(task_id)
        assert task is not None and task.status is TaskStatus.FAILED
        assert task.error is not None and "signature" in task.error


class Point:  # not msgspec-encodable: needs the pickle opt-in
    def __init__(self, x: int) -> None:
        self.x = x


def point_x(point: Point) -> Point:
    return Point(point.x * 2)


def test_pickle_is_an_explicit_opt_in_and_signed() -> None:
    with OmniQ("memory://") as plain, pytest.raises(omniq.SerializationError):
        plain.enqueue(point_x, Point(1))
    queue = MemoryTaskQueue()
    trusted = omniq.PickleSerializer(secret_key="k")
    with OmniQ(queue, "memory://", serializer=trusted) as app:
        task_id = app.enqueue(point_x, Point(21))
        app.worker().run(burst=True)
        assert app.get_result(task_id, timeout=10).x == 42
        signed_by_k = app.enqueue(point_x, Point(1))
    with OmniQ(queue, serializer=omniq.PickleSerializer(secret_key="other")) as other:
        other.worker().run(burst=True)
        task = other.get_task(signed_by_k)
        assert task is not None and task.status is TaskStatus.FAILED  # never unpickled


def test_task_ids_are_32_hex_digits_in_creation_order() -> None:
    ids = [new_task_id() for _ in range(1000)]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    times = [i[:16] for i in ids]
    assert times == sorted(times)  # time first: new rows land at the end of an index
    assert int(ids[0][:16], 16) <= time.time_ns() < int(ids[0][:16], 16) + 60 * 10**9
