"""The result storage contract, run against every in-repo backend."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from omniq.results import (
    MemoryResultStorage,
    ResultStorage,
    SQLiteResultStorage,
    TaskResult,
)

SRC = Path(__file__).resolve().parents[1] / "src"
DEADLINE = 10.0  # generous bound for things that should happen "soon"


def ok(task_id: str, value: bytes = b"\x01") -> TaskResult:
    return TaskResult(task_id=task_id, succeeded=True, value=value, finished_at=time.time())


def failed(task_id: str) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        succeeded=False,
        exc_type="ValueError",
        message="bad input",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad input\n",
        finished_at=time.time(),
    )


@pytest.fixture
async def storage(result_storage_factory: ResultStorage) -> AsyncIterator[ResultStorage]:
    async with result_storage_factory as store:
        yield store


async def eventually_none(store: ResultStorage, task_id: str) -> None:
    """Poll until ``task_id`` reads as missing, failing after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while await store.get(task_id) is not None:
        assert time.monotonic() < deadline, f"{task_id} never expired"
        await asyncio.sleep(0.01)


def signal_first_miss(store: ResultStorage, task_id: str, on_miss: Callable[[], None]) -> None:
    """Call ``on_miss`` once, the first time ``store.get(task_id)`` finds nothing.

    ``wait`` looks with ``get`` before it sleeps, so a test can act once the
    waiter has looked and is (about to be) asleep, without sleeping itself.
    """
    original: Callable[[str], Awaitable[TaskResult | None]] = store.get
    fired = False

    async def get(wanted: str) -> TaskResult | None:
        nonlocal fired
        result = await original(wanted)
        if result is None and wanted == task_id and not fired:
            fired = True
            on_miss()
        return result

    store.get = get  # type: ignore[method-assign, assignment]


# -- basic contract ------------------------------------------------------------------------


async def test_round_trip_success_and_failure(storage: ResultStorage) -> None:
    good, bad = ok("t-ok", b"\x93\x01\x02\x03"), failed("t-bad")
    await storage.set_many([(good, None), (bad, 60.0)])
    assert await storage.get("t-ok") == good
    assert await storage.get("t-bad") == bad


async def test_missing_is_none(storage: ResultStorage) -> None:
    assert await storage.get("nope") is None
    await storage.set_many([])
    assert await storage.get("nope") is None


async def test_overwrite_replaces(storage: ResultStorage) -> None:
    await storage.set_many([(ok("t", b"a"), None)])
    await storage.set_many([(ok("t", b"b"), None)])
    got = await storage.get("t")
    assert got is not None and got.value == b"b"


async def test_stored_copy_is_independent(storage: ResultStorage) -> None:
    result = ok("t", b"a")
    await storage.set_many([(result, None)])
    result.value = b"changed"
    got = await storage.get("t")
    assert got is not None and got.value == b"a"
    got.value = b"changed again"
    again = await storage.get("t")
    assert again is not None and again.value == b"a"


async def test_delete(storage: ResultStorage) -> None:
    await storage.set_many([(ok("a"), None), (ok("b"), 60.0)])
    await storage.delete("a")
    await storage.delete("b")
    await storage.delete("never-stored")
    assert await storage.get("a") is None
    assert await storage.get("b") is None


async def test_ttl_expiry(storage: ResultStorage) -> None:
    await storage.set_many([(ok("short"), 0.05), (ok("kept"), None)])
    await eventually_none(storage, "short")
    assert await storage.get("kept") is not None


async def test_rewrite_with_longer_ttl_outlives_first(storage: ResultStorage) -> None:
    await storage.set_many([(ok("t"), 0.05)])
    await storage.set_many([(ok("t"), None)])
    await storage.set_many([(ok("probe"), 0.05)])
    await eventually_none(storage, "probe")
    await storage.set_many([(ok("other"), None)])  # lets lazy pruning run
    assert await storage.get("t") is not None


# -- wait ------------------------------------------------------------------------------------


async def test_wait_returns_existing_result(storage: ResultStorage) -> None:
    await storage.set_many([(ok("t"), None)])
    assert await storage.wait("t", 0) == await storage.get("t")


async def test_wait_times_out_with_none(storage: ResultStorage) -> None:
    assert await storage.wait("nope", 0.05) is None
    assert await storage.wait("nope", 0) is None


@pytest.mark.parametrize("timeout", [DEADLINE, None])
async def test_wait_woken_by_another_task(storage: ResultStorage, timeout: float | None) -> None:
    looked = asyncio.Event()
    signal_first_miss(storage, "t", looked.set)
    waiter = asyncio.create_task(storage.wait("t", timeout))
    await looked.wait()
    await storage.set_many([(ok("t"), None)])
    result = await asyncio.wait_for(waiter, DEADLINE)
    assert result is not None and result.task_id == "t"


async def test_wait_woken_by_another_thread(storage: ResultStorage) -> None:
    looked = threading.Event()
    signal_first_miss(storage, "t", looked.set)

    def setter() -> None:
        assert looked.wait(DEADLINE)
        asyncio.run(storage.set_many([(ok("t"), None)]))

    thread = threading.Thread(target=setter)
    thread.start()
    try:
        result = await asyncio.wait_for(storage.wait("t", None), DEADLINE)
    finally:
        thread.join(DEADLINE)
    assert result is not None and result.task_id == "t"


async def test_waiter_on_another_threads_loop(storage: ResultStorage) -> None:
    looked = threading.Event()
    signal_first_miss(storage, "t", looked.set)
    found: list[TaskResult | None] = []
    thread = threading.Thread(target=lambda: found.append(asyncio.run(storage.wait("t", DEADLINE))))
    thread.start()
    try:
        assert await asyncio.to_thread(looked.wait, DEADLINE)
        await storage.set_many([(ok("t"), None)])
    finally:
        await asyncio.to_thread(thread.join, DEADLINE)
    assert found and found[0] is not None and found[0].task_id == "t"


async def test_wait_ignores_other_results(storage: ResultStorage) -> None:
    looked = asyncio.Event()
    signal_first_miss(storage, "t", looked.set)
    waiter = asyncio.create_task(storage.wait("t", DEADLINE))
    await looked.wait()
    await storage.set_many([(ok("other"), None)])
    await storage.set_many([(ok("t"), None)])
    result = await asyncio.wait_for(waiter, DEADLINE)
    assert result is not None and result.task_id == "t"


# -- from_url ------------------------------------------------------------------------------


def test_memory_from_url() -> None:
    assert isinstance(MemoryResultStorage.from_url("memory://"), MemoryResultStorage)


def test_sqlite_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = SQLiteResultStorage.from_url(f"sqlite:///{tmp_path}/abs.db")
    assert absolute.database_path == tmp_path / "abs.db"
    monkeypatch.chdir(tmp_path)
    relative = SQLiteResultStorage.from_url("sqlite:///sub/rel.db")
    assert relative.database_path == tmp_path / "sub" / "rel.db"
    with pytest.raises(ValueError):
        SQLiteResultStorage.from_url("sqlite://")


# -- memory specifics -----------------------------------------------------------------------


async def test_memory_prunes_expired_entries() -> None:
    store = MemoryResultStorage()
    await store.set_many([(ok(f"t{i}"), 0.01) for i in range(200)])
    await store.set_many([(ok("kept"), None)])
    for i in range(200):
        await eventually_none(store, f"t{i}")
    await store.set_many([(ok("trigger"), None)])
    assert set(store._results) == {"kept", "trigger"}
    assert store._expiry == []


async def test_memory_expiry_heap_stays_bounded_under_rewrites() -> None:
    store = MemoryResultStorage()
    for _ in range(1000):
        await store.set_many([(ok("t"), 3600.0)])
    assert len(store._expiry) <= 100


# -- SQLite specifics ----------------------------------------------------------------------

SET_FROM_OTHER_PROCESS = """
import asyncio, sys, time
from omniq.results import SQLiteResultStorage, TaskResult

async def main() -> None:
    async with SQLiteResultStorage(sys.argv[1]) as store:
        await store.set_many([(TaskResult(task_id=sys.argv[2], succeeded=True, value=b"x"), None)])

asyncio.run(main())
"""


def set_in_subprocess(path: Path, task_id: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run(
        [sys.executable, "-c", SET_FROM_OTHER_PROCESS, str(path), task_id],
        env=env,
        check=True,
        timeout=DEADLINE * 3,
    )


@pytest.mark.parametrize("watcher", ["inotify", "polling"])
async def test_sqlite_wait_woken_by_other_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watcher: str
) -> None:
    if watcher == "polling":
        monkeypatch.setenv("OMNIQ_SQLITE_POLL", "1")
    path = tmp_path / "omniq.db"
    async with SQLiteResultStorage(path) as store:
        looked = asyncio.Event()
        signal_first_miss(store, "t", looked.set)
        waiter = asyncio.create_task(store.wait("t", None))
        await looked.wait()
        await asyncio.to_thread(set_in_subprocess, path, "t")
        result = await asyncio.wait_for(waiter, DEADLINE)
    assert result is not None and result.value == b"x"


async def test_sqlite_other_process_write_before_first_sleep_is_not_lost(tmp_path: Path) -> None:
    """A commit landing after the waiter's first look but before it sleeps still wakes it."""
    path = tmp_path / "omniq.db"
    async with SQLiteResultStorage(path) as store:
        # The other process commits inside the waiter's first look, after the
        # row was found missing, i.e. before any change watcher could exist.
        signal_first_miss(store, "t", lambda: set_in_subprocess(path, "t"))
        result = await asyncio.wait_for(store.wait("t", None), DEADLINE)
    assert result is not None and result.value == b"x"


async def test_sqlite_two_instances_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "omniq.db"
    async with SQLiteResultStorage(path) as writer, SQLiteResultStorage(path) as reader:
        await writer.set_many([(ok("a"), None)])
        assert await reader.get("a") == await writer.get("a")

        looked = asyncio.Event()
        signal_first_miss(reader, "b", looked.set)
        waiter = asyncio.create_task(reader.wait("b", DEADLINE))
        await looked.wait()
        await writer.set_many([(failed("b"), None)])
        result = await asyncio.wait_for(waiter, DEADLINE)
        assert result is not None and not result.succeeded

        await reader.delete("a")
        assert await writer.get("a") is None


async def test_sqlite_close_then_reuse(tmp_path: Path) -> None:
    store = SQLiteResultStorage(tmp_path / "omniq.db")
    await store.close()  # closing before first use is fine
    await store.set_many([(ok("a"), None)])
    await store.close()
    await store.close()
    assert await store.get("a") is not None  # reopened, and the data persisted
    await store.set_many([(ok("b"), None)])
    assert await store.wait("b", 0) is not None
    await store.close()


async def test_sqlite_constructor_does_no_io(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "omniq.db"
    store = SQLiteResultStorage(path)
    assert not path.parent.exists()
    await store.close()


async def test_sqlite_prunes_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "omniq.db"
    store = SQLiteResultStorage(path)
    async with store:
        await store.set_many([(ok("short"), 0.01), (ok("kept"), None)])
        await eventually_none(store, "short")
        store._next_prune = 0.0  # pretend the prune interval has passed
        await store.set_many([(ok("trigger"), None)])
        with sqlite3.connect(path) as conn:
            ids = {row[0] for row in conn.execute("SELECT task_id FROM omniq_results")}
        conn.close()
    assert ids == {"kept", "trigger"}
