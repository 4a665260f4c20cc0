"""The event storages: one contract (append, filtered query, close and reuse) on every backend."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from omniq import _sqlite
from omniq._urls import sqlite_path_from_url
from omniq.events import (
    Event,
    EventStorage,
    EventType,
    JSONLEventStorage,
    MemoryEventStorage,
    SQLiteEventStorage,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
T0 = 1_700_000_000.0

Factory = Callable[[], EventStorage]


@pytest.fixture(params=["memory", "jsonl", "sqlite"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Makes storages on one shared place: the same file, or the same memory instance."""
    return _factory(request.param, tmp_path)


@pytest.fixture
async def storage(make_storage: Factory) -> AsyncIterator[EventStorage]:
    s = make_storage()
    yield s
    await s.close()


def _factory(kind: str, tmp_path: Path) -> Factory:
    if kind == "memory":
        shared = MemoryEventStorage()
        return lambda: shared
    if kind == "jsonl":
        return lambda: JSONLEventStorage(tmp_path / "events.jsonl")
    return lambda: SQLiteEventStorage(tmp_path / "omniq.db")


def _sample() -> list[Event]:
    """Every field set somewhere, defaults elsewhere, and ties in ``at`` to pin append order."""
    return [
        Event(task_id="a", type=EventType.ENQUEUED, at=T0, queue_name="q1", func="m:f"),
        Event(task_id="b", type=EventType.ENQUEUED, at=T0),
        Event(task_id="a", type=EventType.STARTED, at=T0 + 1, attempts=1, worker="w-1"),
        Event(
            task_id="a",
            type=EventType.FAILED,
            at=T0 + 2,
            queue_name="q1",
            func="m:f",
            attempts=1,
            worker="w-1",
            detail='ValueError: "bad"\nline two \u00e9',
        ),
        Event(task_id="b", type=EventType.STARTED, at=T0 + 2, attempts=1, worker="w-2"),
        Event(task_id="a", type=EventType.RETRYING, at=T0 + 3, detail="retry in 1.5s"),
        Event(task_id="b", type=EventType.SUCCEEDED, at=T0 + 4, attempts=1, worker="w-2"),
        Event(task_id="c", type=EventType.EXPIRED, at=T0 + 5, detail="ttl"),
    ]


# -- the contract, on every backend -----------------------------------------------


async def test_round_trip_preserves_order_and_fields(storage: EventStorage) -> None:
    events = _sample()
    await storage.append(events[:3])
    await storage.append(events[3:])
    got = await storage.query()
    assert got == events
    assert all(type(e.type) is EventType for e in got)


async def test_empty_storage_and_empty_batch(storage: EventStorage) -> None:
    assert await storage.query() == []
    await storage.append([])
    assert await storage.query() == []


async def test_filter_by_task_id(storage: EventStorage) -> None:
    events = _sample()
    await storage.append(events)
    assert await storage.query(task_id="a") == [e for e in events if e.task_id == "a"]
    assert await storage.query(task_id="missing") == []


async def test_filter_by_type(storage: EventStorage) -> None:
    events = _sample()
    await storage.append(events)
    started = await storage.query(type=EventType.STARTED)
    assert [e.task_id for e in started] == ["a", "b"]
    assert await storage.query(type=EventType.CANCELLED) == []


async def test_since_is_inclusive_and_until_exclusive(storage: EventStorage) -> None:
    events = _sample()
    await storage.append(events)
    got = await storage.query(since=T0 + 2, until=T0 + 4)
    assert got == [e for e in events if T0 + 2 <= e.at < T0 + 4]
    assert [e.at for e in got] == [T0 + 2, T0 + 2, T0 + 3]
    assert await storage.query(since=T0 + 5) == events[-1:]
    assert await storage.query(until=T0) == []
    assert await storage.query(until=T0 + 1) == events[:2]


async def test_limit_returns_the_oldest_matches(storage: EventStorage) -> None:
    events = _sample()
    await storage.append(events)
    assert await storage.query(limit=3) == events[:3]
    assert await storage.query(task_id="a", limit=2) == [events[0], events[2]]
    assert await storage.query(limit=100) == events
    assert await storage.query(limit=0) == []


async def test_filters_combine(storage: EventStorage) -> None:
    events = _sample()
    await storage.append(events)
    got = await storage.query(task_id="b", type=EventType.STARTED, since=T0 + 1, until=T0 + 3)
    assert got == [events[4]]
    assert await storage.query(task_id="b", type=EventType.FAILED) == []


async def test_close_then_use_again(make_storage: Factory) -> None:
    events = _sample()
    s = make_storage()
    await s.append(events[:4])
    await s.close()
    await s.append(events[4:])
    assert await s.query() == events
    await s.close()
    assert await s.query() == events
    await s.close()
    await s.close()  # closing twice is harmless


async def test_async_context_manager_closes(make_storage: Factory) -> None:
    events = _sample()
    async with make_storage() as s:
        await s.append(events)
    async with make_storage() as s:
        assert await s.query() == events


async def test_concurrent_appends_from_threads(make_storage: Factory) -> None:
    s = make_storage()
    threads, batches, size = 4, 25, 4

    def produce(n: int) -> None:
        async def run() -> None:
            for b in range(batches):
                batch = [
                    Event(task_id=f"t{n}", type=EventType.STARTED, at=T0, attempts=b * size + i)
                    for i in range(size)
                ]
                await s.append(batch)

        asyncio.run(run())

    workers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    try:
        got = await s.query()
        assert len(got) == threads * batches * size
        for n in range(threads):
            mine = [e.attempts for e in got if e.task_id == f"t{n}"]
            assert mine == list(range(batches * size))
    finally:
        await s.close()


# -- memory -----------------------------------------------------------------------


async def test_memory_max_events_drops_the_oldest() -> None:
    s = MemoryEventStorage(max_events=3)
    events = [Event(task_id=str(i), type=EventType.ENQUEUED, at=T0 + i) for i in range(5)]
    await s.append(events[:2])
    assert await s.query() == events[:2]
    await s.append(events[2:])
    assert await s.query() == events[2:]
    await s.append(events[:1])
    assert await s.query() == [*events[3:], events[0]]


def test_memory_rejects_a_useless_bound() -> None:
    with pytest.raises(ValueError):
        MemoryEventStorage(max_events=0)


async def test_memory_from_url_passes_options() -> None:
    s = MemoryEventStorage.from_url("memory://", max_events=2)
    assert s.max_events == 2
    assert MemoryEventStorage.from_url("memory://").max_events == 100_000


async def test_memory_instances_are_independent() -> None:
    a, b = MemoryEventStorage(), MemoryEventStorage()
    await a.append(_sample())
    assert await b.query() == []


# -- JSONL ------------------------------------------------------------------------


async def test_jsonl_writes_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    events = _sample()
    async with JSONLEventStorage(path) as s:
        await s.append(events)
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(events)
    assert [msgspec.json.decode(line, type=Event) for line in lines] == events


async def test_jsonl_appends_are_visible_before_close(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    s = JSONLEventStorage(path)
    try:
        await s.append(_sample()[:2])
        assert len(path.read_bytes().splitlines()) == 2  # flushed, not buffered
    finally:
        await s.close()


async def test_jsonl_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = _sample()
    async with JSONLEventStorage(path) as s:
        await s.append(events[:3])
    whole = msgspec.json.encode(events[3])
    with open(path, "ab") as f:  # a crash halfway through writing a line
        f.write(whole[: len(whole) // 2])

    async with JSONLEventStorage(path) as s:
        assert await s.query() == events[:3]
        # The next writer starts a fresh line: the fragment does not eat its first event.
        await s.append(events[3:])
        assert await s.query() == events
    assert len(path.read_bytes().splitlines()) == len(events) + 1


async def test_jsonl_skips_undecodable_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = _sample()
    good = [msgspec.json.encode(e) for e in events[:2]]
    junk = b'\n\nnot json\n{"task_id": "x", "type": "no-such-type"}\n'
    path.write_bytes(good[0] + junk + good[1] + b"\n")
    async with JSONLEventStorage(path) as s:
        assert await s.query() == events[:2]


async def test_jsonl_two_instances_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = _sample()
    a, b = JSONLEventStorage(path), JSONLEventStorage(path)
    try:
        await a.append(events[:2])
        await b.append(events[2:5])
        await a.append(events[5:])
        assert await b.query() == events
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("url", "relative"),
    [
        ("file://events.jsonl", "events.jsonl"),
        ("file://logs/events.jsonl", "logs/events.jsonl"),
        ("jsonl://events.jsonl", "events.jsonl"),
        ("jsonl://my%20events.jsonl", "my events.jsonl"),
    ],
)
async def test_jsonl_from_url_relative(
    url: str, relative: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = JSONLEventStorage.from_url(url)
    assert s.path == Path(relative)
    async with s:
        await s.append(_sample()[:1])
    assert (tmp_path / relative).read_bytes().count(b"\n") == 1


@pytest.mark.parametrize("scheme", ["file", "jsonl"])
async def test_jsonl_from_url_absolute(scheme: str, tmp_path: Path) -> None:
    path = tmp_path / "abs.jsonl"
    assert path.is_absolute()
    s = JSONLEventStorage.from_url(f"{scheme}://{path.as_posix()}")
    assert s.path == path
    async with s:
        await s.append(_sample()[:1])
    assert path.exists()


@pytest.mark.parametrize("url", ["events.jsonl", "sqlite:///x.db", "file://", "file://x.jsonl?a=1"])
def test_jsonl_from_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        JSONLEventStorage.from_url(url)


# -- SQLite -----------------------------------------------------------------------


async def test_sqlite_two_instances_on_one_file(tmp_path: Path) -> None:
    events = _sample()
    a = SQLiteEventStorage(tmp_path / "omniq.db")
    b = SQLiteEventStorage(tmp_path / "omniq.db")
    try:
        await a.append(events[:3])
        assert await b.query() == events[:3]
        await b.append(events[3:])
        assert await a.query() == events
    finally:
        await a.close()
        await b.close()


async def test_sqlite_sees_another_process(tmp_path: Path) -> None:
    db = tmp_path / "omniq.db"
    events = _sample()
    s = SQLiteEventStorage(db)
    try:
        await s.append(events[:2])
        assert await s.query() == events[:2]  # our connection is open from here on
        script = (
            "import asyncio, sys\n"
            "from omniq.events import Event, EventType, SQLiteEventStorage\n"
            "async def main():\n"
            "    async with SQLiteEventStorage(sys.argv[1]) as s:\n"
            "        await s.append([Event(task_id='child', type=EventType.SUCCEEDED,"
            " at=float(sys.argv[2]), worker='child')])\n"
            "asyncio.run(main())\n"
        )
        paths = [SRC, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        subprocess.run(
            [sys.executable, "-c", script, str(db), str(T0 + 10)],
            env=env,
            check=True,
            timeout=30,
        )
        child = Event(task_id="child", type=EventType.SUCCEEDED, at=T0 + 10, worker="child")
        assert await s.query() == [*events[:2], child]
        assert await s.query(task_id="child") == [child]
    finally:
        await s.close()


async def test_sqlite_schema(tmp_path: Path) -> None:
    db = tmp_path / "omniq.db"
    async with SQLiteEventStorage(db) as s:
        await s.append(_sample()[:1])
    conn = sqlite3.connect(db)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(omniq_events)")]
        indexes = {
            tuple(col[2] for col in conn.execute(f"PRAGMA index_info({name!r})"))
            for _, name, *_ in conn.execute("PRAGMA index_list(omniq_events)")
        }
    finally:
        conn.close()
    assert columns == [
        "seq",
        "task_id",
        "type",
        "at",
        "queue_name",
        "func",
        "attempts",
        "worker",
        "detail",
    ]
    assert indexes == {("task_id",), ("type", "at"), ("at",)}


async def test_sqlite_opens_lazily_and_releases_on_close(tmp_path: Path) -> None:
    db = tmp_path / "omniq.db"
    s = SQLiteEventStorage(db)
    assert not db.exists()  # constructors do no I/O
    await s.append(_sample()[:1])
    assert db.resolve() in _sqlite._files
    await s.close()
    assert db.resolve() not in _sqlite._files
    assert await s.query() == _sample()[:1]  # usable again after close
    await s.close()
    assert db.resolve() not in _sqlite._files


async def test_sqlite_retention_prunes_at_most_once_a_minute(tmp_path: Path) -> None:
    db = tmp_path / "omniq.db"
    now = time.time()
    old = [Event(task_id=f"old{i}", type=EventType.SUCCEEDED, at=now - 3600) for i in range(3)]
    fresh = Event(task_id="fresh", type=EventType.ENQUEUED, at=now)
    async with SQLiteEventStorage(db) as keep_all:
        await keep_all.append(old[:2])
        assert len(await keep_all.query()) == 2

    s = SQLiteEventStorage(db, retention_seconds=60)
    try:
        await s.append([fresh])
        assert await s.query() == [fresh]  # the first append prunes
        await s.append(old[2:])
        assert await s.query() == [fresh, old[2]]  # not again within the minute
    finally:
        await s.close()


async def test_sqlite_retention_prunes_again_after_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniq.events import sqlite as sqlite_events

    monkeypatch.setattr(sqlite_events, "PRUNE_INTERVAL_SECONDS", 0.0)
    now = time.time()
    old = Event(task_id="old", type=EventType.SUCCEEDED, at=now - 3600)
    fresh = Event(task_id="fresh", type=EventType.ENQUEUED, at=now)
    async with SQLiteEventStorage(tmp_path / "omniq.db", retention_seconds=60) as s:
        await s.append([old])
        await s.append([fresh])
        assert await s.query() == [fresh]


def test_sqlite_rejects_bad_retention() -> None:
    with pytest.raises(ValueError):
        SQLiteEventStorage(retention_seconds=0)


async def test_sqlite_from_url_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = SQLiteEventStorage.from_url("sqlite:///events.db", retention_seconds=5)
    assert s.retention_seconds == 5
    async with s:
        await s.append(_sample()[:1])
    assert (tmp_path / "events.db").exists()


async def test_sqlite_from_url_absolute(tmp_path: Path) -> None:
    db = tmp_path / "abs.db"
    async with SQLiteEventStorage.from_url(f"sqlite:///{db.as_posix()}") as s:
        await s.append(_sample()[:1])
    assert db.exists()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///omniq.db", "omniq.db"),
        ("sqlite:///data/omniq.db", "data/omniq.db"),
        ("sqlite:////var/lib/omniq.db", "/var/lib/omniq.db"),
        ("sqlite:///my%20db.sqlite", "my db.sqlite"),
        ("SQLite:///omniq.db", "omniq.db"),
    ],
)
def test_sqlite_path_from_url(url: str, path: str) -> None:
    assert sqlite_path_from_url(url) == path


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://omniq.db",  # the name would be a host
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite:///omniq.db?timeout=5",
        "postgres:///omniq.db",
        "omniq.db",
    ],
)
def test_sqlite_path_from_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        sqlite_path_from_url(url)
