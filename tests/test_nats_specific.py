"""What only the NATS JetStream backend promises: restarts, dedup, schedules, TTLs, retention.

The contract suite (``test_contract.py``) and the result storage tests already
run on NATS; so do the event storage tests, re-run here on it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from omniq import (
    AsyncOmniQ,
    ConfigurationError,
    MissingDependencyError,
    OmniQ,
    OmniQError,
    TaskStatus,
)
from omniq._nats import Outgoing, nats_settings, status_headers, token, wire_message
from omniq._nats_blocking import BlockingPublisher, ServerRefused
from omniq.events import Event, EventStorage, EventType
from omniq.events.nats import NATSEventStorage
from omniq.queue import NATSTaskQueue
from omniq.queue._nats_bands import ack_consumer, ack_info
from omniq.results import TaskResult
from omniq.results.nats import NATSResultStorage
from omniq.testing.contract import async_double, echo, make_task

from .servers._common import free_port
from .servers._tls import make_certificates
from .servers.nats import NATSServer, delete_streams, start_nats_server

# The event storage contract, on NATS (the module's fixtures are overridden below).
from .test_event_storages import (  # noqa: F401
    Factory,
    test_async_context_manager_closes,
    test_close_then_use_again,
    test_concurrent_appends_from_threads,
    test_empty_storage_and_empty_batch,
    test_filter_by_task_id,
    test_filter_by_type,
    test_filters_combine,
    test_limit_returns_the_oldest_matches,
    test_round_trip_preserves_order_and_fields,
    test_since_is_inclusive_and_until_exclusive,
)

DEADLINE = 10.0


@pytest.fixture
def fresh(nats_server: str, request: pytest.FixtureRequest) -> Callable[[], str]:
    """Fresh stream names; every stream made from them is deleted when the test ends."""
    made: list[str] = []

    def name() -> str:
        made.append(f"T{uuid.uuid4().hex[:12]}")
        return made[-1]

    def cleanup() -> None:
        streams = [s for n in made for s in (n, f"KV_{n}", f"KV_{n}_RESULTS")]
        if streams:
            delete_streams(nats_server, *streams)

    request.addfinalizer(cleanup)
    return name


@pytest.fixture
def make_storage(nats_server: str, fresh: Callable[[], str]) -> Factory:
    stream = fresh()
    return lambda: NATSEventStorage(nats_server, stream=stream)


@pytest.fixture
async def storage(make_storage: Factory) -> AsyncIterator[EventStorage]:
    s = make_storage()
    yield s
    await s.close()


@pytest.fixture
async def queue(nats_server: str, fresh: Callable[[], str]) -> AsyncIterator[NATSTaskQueue]:
    q = NATSTaskQueue(nats_server, stream=fresh())
    yield q
    await q.close()


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def passed(moment: float) -> None:
    """Until the clock reaches ``moment`` (a time condition, not synchronisation)."""

    async def reached() -> bool:
        return time.time() >= moment

    await until(reached, "the time to come")


async def subjects(queue: NATSTaskQueue) -> dict[str, int]:
    link = await queue._link()
    info = await link.api(f"STREAM.INFO.{queue.stream}", {"subjects_filter": ">"})
    found: dict[str, int] = info["state"].get("subjects") or {}
    return found


# -- a running worker rides out a server restart -------------------------------------------
async def slow_echo(value: Any) -> Any:
    await asyncio.sleep(0.005)
    return value


@pytest.mark.parametrize("kill", [False, True], ids=["terminate", "kill-9"])
async def test_running_worker_survives_a_server_restart(
    own_nats_server: NATSServer, fresh: Callable[[], str], kill: bool
) -> None:
    url = f"{own_nats_server.url}?stream={fresh()}"
    async with AsyncOmniQ(url) as omniq:  # results in the server's key-value store too
        assert isinstance(omniq.result_storage, NATSResultStorage)
        before = await omniq.enqueue_many(slow_echo, [(i,) for i in range(40)])
        async with omniq.worker(concurrency=4):
            assert await omniq.get_result(before[0], timeout=DEADLINE) == 0
            # Restart while tasks run, are claimed and acked, and pulls wait.
            await asyncio.to_thread(own_nats_server.restart, kill=kill)
            after = [await omniq.enqueue(async_double, i) for i in range(5)]
            for i, task_id in enumerate(before):
                assert await omniq.get_result(task_id, timeout=3 * DEADLINE) == i
            for i, task_id in enumerate(after):
                assert await omniq.get_result(task_id, timeout=3 * DEADLINE) == 2 * i
        assert await omniq.size() == 0


async def test_tasks_persist_across_a_server_restart(
    own_nats_server: NATSServer, fresh: Callable[[], str]
) -> None:
    stream = fresh()
    first = NATSTaskQueue(own_nats_server.url, stream=stream)
    await first.enqueue(make_task(id="kept"))
    await first.close()
    await asyncio.to_thread(own_nats_server.restart, kill=True)
    second = NATSTaskQueue(own_nats_server.url, stream=stream)
    try:
        task = await second.dequeue()
        assert task is not None and task.id == "kept"
    finally:
        await second.close()


# -- idempotent enqueue -------------------------------------------------------------------
async def test_dedup_outlives_the_duplicate_window(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    queue = NATSTaskQueue(nats_server, stream=fresh(), duplicate_window=0.2)
    try:
        assert await queue.enqueue_many([make_task(id="order-1")]) == [True]
        await passed(time.time() + 0.3)
        # Past Nats-Msg-Id's window the subject check still knows the task,
        # pending, running or finished.
        assert await queue.enqueue_many([make_task(id="order-1")]) == [False]
        task = await queue.dequeue()
        assert task is not None
        assert await queue.enqueue_many([make_task(id="order-1")]) == [False]
        assert await queue.ack(task)
        assert await queue.enqueue_many([make_task(id="order-1")]) == [False]
        assert await queue.size("default") == 0
    finally:
        await queue.close()


async def test_duplicates_within_one_batch_and_across_queues(queue: NATSTaskQueue) -> None:
    batch = [make_task("a", id="x"), make_task("b", id="x"), make_task("a", priority=3, id="x")]
    assert await queue.enqueue_many(batch) == [True, False, False]
    assert await queue.size("a") == 1 and await queue.size("b") == 0


async def test_finished_tasks_expire_by_message_ttl(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    queue = NATSTaskQueue(nats_server, stream=fresh(), retention_seconds=1, duplicate_window=0.2)
    try:
        await queue.enqueue(make_task(id="short-lived"))
        task = await queue.dequeue()
        assert task is not None and await queue.ack(task)
        stored = await queue.get_task("short-lived")
        assert stored is not None and stored.status is TaskStatus.SUCCEEDED

        async def gone() -> bool:
            return await queue.get_task("short-lived") is None

        await until(gone, "the server to drop the finished task")
        assert await queue.enqueue(make_task(id="short-lived")) == "short-lived"
        assert await queue.size() == 1  # a pruned id is new again (past Nats-Msg-Id's window)
    finally:
        await queue.close()


# -- the storage layout ---------------------------------------------------------------------
async def test_subjects_on_the_server_are_the_documented_ones(queue: NATSTaskQueue) -> None:
    s = queue.stream
    await queue.enqueue(make_task("jobs", 5, id="a"))
    await queue.enqueue(make_task("jobs", id="b", due_at=time.time() + 3600))
    assert await subjects(queue) == {f"{s}.r.jobs.5.a": 1, f"{s}.s.jobs.0.b": 1}
    task = await queue.dequeue(["jobs"])
    assert task is not None
    assert set(await subjects(queue)) == {f"{s}.r.jobs.5.a", f"{s}.t.jobs.5.a", f"{s}.s.jobs.0.b"}
    assert await queue.nack(task, error="boom")
    assert set(await subjects(queue)) == {f"{s}.f.jobs.5.a", f"{s}.s.jobs.0.b"}
    link = await queue._link()
    consumers = await link.api(f"CONSUMER.NAMES.{s}", {})
    assert sorted(consumers["consumers"]) == ["r~jobs~0", "r~jobs~5"]


async def test_names_that_are_not_subject_tokens_round_trip(queue: NATSTaskQueue) -> None:
    odd = ["emails.high", "a b", "ünïcode", "*", ">", "x" * 200]
    for name in odd:
        await queue.enqueue(make_task(name, id=f"id of {name}"))
    for name in odd:
        assert await queue.size(name) == 1
        task = await queue.dequeue([name])
        assert task is not None and task.queue_name == name and task.id == f"id of {name}"
        assert await queue.ack(task)
    assert len({token(n) for n in odd}) == len(odd)


async def test_arbitrary_priorities_are_exact_across_many_bands(queue: NATSTaskQueue) -> None:
    priorities = [7, -100, 3, 10**9, 0, -1, 3, 42, -(10**9), 7]
    tasks = [make_task(priority=p) for p in priorities]
    await queue.enqueue_many(tasks)
    got = []
    while len(got) < len(tasks):
        batch = await queue.dequeue_many(3)
        assert batch
        got += batch
    expected = sorted(range(len(tasks)), key=lambda i: (-tasks[i].priority, i))
    assert [t.id for t in got] == [tasks[i].id for i in expected]


# -- eta and cancel use server-side schedules ------------------------------------------------
async def test_a_cancelled_schedule_never_fires(queue: NATSTaskQueue) -> None:
    due = time.time() + 0.3
    await queue.enqueue(make_task(id="later", due_at=due))
    assert await queue.size() == 1
    assert await queue.cancel("later")
    assert await queue.size() == 0
    past_due = time.time() + 0.3 - due + 0.5  # the schedule's time, then some
    assert await queue.dequeue(timeout=past_due) is None
    assert set(await subjects(queue)) == {f"{queue.stream}.t.default.0.later"}


async def test_waiting_worker_takes_a_task_due_later(queue: NATSTaskQueue) -> None:
    due = time.time() + 0.2
    waiter = asyncio.ensure_future(queue.dequeue(timeout=DEADLINE))
    await queue.enqueue(make_task(id="eta", due_at=due))
    task = await waiter
    assert task is not None and task.id == "eta" and time.time() >= due


async def test_a_stale_lease_cannot_ack_or_extend(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    queue = NATSTaskQueue(nats_server, stream=fresh(), lease_seconds=0.2)
    try:
        await queue.enqueue(make_task())
        first = await queue.dequeue()
        second = await queue.dequeue(timeout=DEADLINE)
        assert first is not None and second is not None and second.attempts == 2
        assert await queue.extend_lease([first, second]) == [False, True]
        assert not await queue.ack(first)  # JetStream alone would have accepted this ack
        assert await queue.ack(second)
    finally:
        await queue.close()


# -- results: a key-value bucket with per-message TTL ----------------------------------------
async def test_result_ttl_is_a_server_side_message_ttl(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    bucket = fresh()
    store = NATSResultStorage(nats_server, bucket=bucket)
    try:
        result = TaskResult(task_id="t", succeeded=True, value=b"\x01")
        await store.set_many([(result, 0.5), (TaskResult(task_id="kept", succeeded=True), None)])
        link = await store._connector.link()
        raw = await link.get_last(f"KV_{bucket}", f"$KV.{bucket}.t")
        assert raw is not None and raw.headers["Nats-TTL"] == "1"

        async def gone_from_the_server() -> bool:
            return await link.get_last(f"KV_{bucket}", f"$KV.{bucket}.t") is None

        await until(gone_from_the_server, "the server to drop the expired result")
        assert await store.get("t") is None
        assert await store.get("kept") is not None
    finally:
        await store.close()


async def test_result_wait_watches_the_key(nats_server: str, fresh: Callable[[], str]) -> None:
    bucket = fresh()
    store = NATSResultStorage(nats_server, bucket=bucket)
    writer = NATSResultStorage(nats_server, bucket=bucket)
    try:
        waiter = asyncio.ensure_future(store.wait("w", DEADLINE))
        link = await store._connector.link()

        async def watching() -> bool:
            info = await link.api(f"STREAM.INFO.KV_{bucket}")
            return int(info["state"]["consumer_count"]) == 1

        await until(watching, "the watch to start")
        await writer.set_many([(TaskResult(task_id="w", succeeded=True), None)])
        result = await waiter
        assert result is not None and result.task_id == "w"
    finally:
        await store.close()
        await writer.close()


# -- events: a stream with a retention limit ---------------------------------------------------
async def test_events_keep_at_most_max_msgs(nats_server: str, fresh: Callable[[], str]) -> None:
    store = NATSEventStorage(nats_server, stream=fresh(), max_msgs=5)
    try:
        events = [Event(task_id=f"t{i}", type=EventType.ENQUEUED, at=float(i)) for i in range(8)]
        await store.append(events)
        assert await store.query() == events[-5:]
    finally:
        await store.close()


async def test_events_older_than_max_age_are_dropped(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    store = NATSEventStorage(nats_server, stream=fresh(), max_age=1.0)
    try:
        await store.append([Event(task_id="old", type=EventType.ENQUEUED)])
        assert len(await store.query()) == 1

        async def dropped() -> bool:
            return await store.query() == []

        await until(dropped, "the server to drop old events")
    finally:
        await store.close()


# -- configuration ---------------------------------------------------------------------------
def test_constructors_do_no_io() -> None:
    queue = NATSTaskQueue(servers=["nats://localhost:4222"])  # the seed's constructor
    assert queue.stream == "OMNIQ" and queue.settings.servers == ("nats://localhost:4222",)
    NATSResultStorage("nats://nowhere.invalid:4222")
    NATSEventStorage("nats://nowhere.invalid:4222")


def test_from_url_reads_servers_credentials_and_options() -> None:
    queue = NATSTaskQueue.from_url("nats://me:s%40cret@h1:4222,h2:5222?stream=JOBS")
    assert queue.settings.servers == ("nats://h1:4222", "nats://h2:5222")
    assert (queue.settings.user, queue.settings.password) == ("me", "s@cret")
    assert queue.stream == "JOBS"
    assert "s@cret" not in repr(queue)
    assert NATSTaskQueue.from_url("nats://tok@h").settings.token == "tok"
    assert NATSTaskQueue.from_url("tls://h:4443").settings.tls is True
    results = NATSResultStorage.from_url("nats://h?bucket=R")
    assert results.bucket == "R"
    for bad in ("nats://h/path", "nats://h?nope=1", "redis://h", "nats://", "nats://h?stream=a.b"):
        with pytest.raises(ConfigurationError):
            NATSTaskQueue.from_url(bad)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "nats", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'omniq\[nats\]'"):
        NATSTaskQueue()


def test_urls_choose_nats_for_every_component(nats_server: str, fresh: Callable[[], str]) -> None:
    stream = fresh()
    url = f"{nats_server}?stream={stream}"
    with OmniQ(url, event_storage=f"{nats_server}?stream={fresh()}") as omniq:
        assert isinstance(omniq.task_queue, NATSTaskQueue)
        assert isinstance(omniq.result_storage, NATSResultStorage)
        assert omniq.result_storage.bucket == f"{stream}_RESULTS"
        task_id = omniq.enqueue(echo, "hello")
        omniq.worker().run(burst=True)
        assert omniq.get_result(task_id, timeout=DEADLINE) == "hello"
        assert [e.type for e in omniq.events(task_id=task_id)] == [
            EventType.ENQUEUED, EventType.STARTED, EventType.SUCCEEDED,
        ]  # fmt: skip


def test_sync_facade_enqueues_from_many_threads(nats_server: str, fresh: Callable[[], str]) -> None:
    import threading

    with OmniQ(f"{nats_server}?stream={fresh()}") as omniq:
        ids: list[str] = []

        def produce() -> None:
            for i in range(25):
                ids.append(omniq.enqueue(echo, i))

        threads = [threading.Thread(target=produce) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert omniq.size() == 100 == len(set(ids))


# -- the sync facade publishes on a plain socket of the caller's thread -------------------
def blocking_threads(omniq: OmniQ) -> list[Any]:
    queue = omniq.task_queue
    assert isinstance(queue, NATSTaskQueue) and queue._blocking is not None
    return [thread for thread, _ in queue._blocking._wires]


def test_sync_enqueue_skips_the_event_loop_once_the_band_exists(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    import threading

    events = f"{nats_server}?stream={fresh()}"
    with OmniQ(f"{nats_server}?stream={fresh()}", event_storage=events) as omniq:
        first = omniq.enqueue(echo, 0)  # creates the stream and the band's consumer
        assert blocking_threads(omniq) == []
        second = omniq.enqueue(echo, 1)
        assert blocking_threads(omniq) == [threading.current_thread()]
        again = omniq.enqueue(echo, 2, task_id=second)  # idempotent on this path too
        urgent = omniq.enqueue(echo, 3, priority=5)  # a new band: through the loop again
        later = omniq.enqueue(echo, 4, priority=5)
        assert again == second and omniq.size() == 4
        omniq.worker().run(burst=True)
        results = [omniq.get_result(t, timeout=DEADLINE) for t in (first, second, urgent, later)]
        assert results == [0, 1, 3, 4]
        enqueued = [e for e in omniq.events(task_id=second) if e.type is EventType.ENQUEUED]
        assert len(enqueued) == 1


def test_sync_enqueue_rides_out_a_server_restart(
    own_nats_server: NATSServer, fresh: Callable[[], str]
) -> None:
    with OmniQ(f"{own_nats_server.url}?stream={fresh()}") as omniq:
        omniq.enqueue(echo, 0)
        omniq.enqueue(echo, 1)
        assert blocking_threads(omniq)
        own_nats_server.restart(kill=True)
        omniq.enqueue(echo, 2)  # the old socket is dead: a new one, and the publish again
        omniq.enqueue_many(echo, [(3,), (4,)])
        assert omniq.size() == 5


def test_tls_reaches_the_server_and_checks_its_certificate(
    tmp_path: Path, fresh: Callable[[], str]
) -> None:
    """nats-server with TLS required: the sync enqueue's own socket, the driver's
    connection (worker, results) and a client that does not trust the certificate."""
    certificates = make_certificates(tmp_path / "tls")
    server = start_nats_server(
        tmp_path / "nats",
        "--tls", "--tlscert", str(certificates.cert_file), "--tlskey", str(certificates.key_file),
    )  # fmt: skip
    try:
        trusted = NATSTaskQueue(server.url, stream=fresh(), tls=certificates.client_context())
        with OmniQ(trusted) as omniq:
            omniq.enqueue(echo, 0)  # makes the band, through the driver
            task_id = omniq.enqueue(echo, "sealed")
            assert blocking_threads(omniq)  # went through the sync enqueue's socket
            omniq.enqueue_many(echo, [(1,), (2,)])
            omniq.worker(concurrency=2).run(burst=True)
            assert omniq.get_result(task_id, timeout=DEADLINE) == "sealed"
        untrusted = NATSTaskQueue(server.url, stream=fresh(), tls=True)  # the system's CAs
        with OmniQ(untrusted) as omniq, pytest.raises(ConnectionError) as raised:
            omniq.enqueue(echo, 1)  # at once: no retrying for retry_timeout, or forever
        assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)
    finally:
        server.stop()


async def test_a_first_connect_that_cannot_succeed_raises(
    tmp_path: Path, fresh: Callable[[], str]
) -> None:
    """nats-py, told to reconnect forever, retries a first connect forever too: a
    server that never answers gives up after ``retry_timeout``, refused credentials
    at once."""
    nowhere = NATSTaskQueue(f"nats://127.0.0.1:{free_port()}", stream=fresh(), retry_timeout=0.3)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await nowhere.size()
    await nowhere.close()
    server = start_nats_server(tmp_path / "nats", "--user", "me", "--pass", "s3cret")
    try:
        refused = NATSTaskQueue(f"nats://me:wrong@127.0.0.1:{server.port}", stream=fresh())
        with pytest.raises(ConnectionError, match="cannot connect") as raised:
            await refused.size()
        assert "authorization" in str(raised.value.__cause__).lower()
        await refused.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("options", "credentials"),
    [(("--user", "me", "--pass", "s3cret"), "me:s3cret"), (("--auth", "t0ken"), "t0ken")],
    ids=["user-password", "token"],
)
def test_sync_enqueue_logs_in_like_the_driver(
    tmp_path: Any, fresh: Callable[[], str], options: tuple[str, ...], credentials: str
) -> None:
    server = start_nats_server(tmp_path / "nats", *options)
    try:
        with OmniQ(f"nats://{credentials}@127.0.0.1:{server.port}?stream={fresh()}") as omniq:
            omniq.enqueue(echo, 0)
            omniq.enqueue(echo, 1)
            assert blocking_threads(omniq) and omniq.size() == 2
        wrong = BlockingPublisher(nats_settings(f"nats://nobody:wrong@127.0.0.1:{server.port}"))
        with pytest.raises(ServerRefused, match=r"[Aa]uthorization"):
            wrong.publish_many([Outgoing("x.y", b"{}")])
        wrong.close()
    finally:
        server.stop()


def test_sync_enqueue_refuses_a_message_over_max_payload(
    nats_server: str, fresh: Callable[[], str]
) -> None:
    with OmniQ(f"{nats_server}?stream={fresh()}") as omniq:
        omniq.enqueue(echo, 0)
        with pytest.raises(OmniQError, match="max_payload"):
            omniq.enqueue(echo, "x" * (2 << 20))
        omniq.enqueue(echo, 1)  # the connection is still good
        assert omniq.size() == 2


# -- the protocol lines we write and read past nats-py -------------------------------------
def test_wire_messages_are_the_protocol_nats_py_writes() -> None:
    from nats.protocol.command import hpub_cmd

    assert wire_message("S.r.q.0.t1", "", b"+ACK", None, 1024) == b"PUB S.r.q.0.t1 4\r\n+ACK\r\n"
    head = b"NATS/1.0\r\nNats-Msg-Id: t1\r\nNats-TTL: 60\r\n\r\n"
    assert wire_message(
        "S.r.q.0.t1", "_INBOX.x.a.1.0", b"body", {"Nats-Msg-Id": "t1", "Nats-TTL": "60"}, 1024
    ) == hpub_cmd("S.r.q.0.t1", "_INBOX.x.a.1.0", head, b"body")
    # What the server would refuse (closing the connection) is refused here, headers counted.
    assert wire_message("s", "", b"x" * 1024, None, 1024)
    with pytest.raises(OmniQError, match="1025 bytes exceeds"):
        wire_message("s", "", b"x" * 1025, None, 1024)
    with pytest.raises(OmniQError, match="1052 bytes exceeds"):  # + "Nats-Msg-Id: t\r\n" + 12
        wire_message("s", "", b"x" * 1024, {"Nats-Msg-Id": "t"}, 1024)


class _Recorder:
    """What a parser hands to nats-py's client, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:  # fmt: skip
        self.events.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, message: str) -> None:
        self.events.append(("err", message))


_STREAM = b"".join([
    b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    b"MSG a.b 1 5\r\nhello\r\n",
    b"MSG a.b 1 _INBOX.r.1 12\r\nwith\r\nMSG in\r\n",
    b"PING\r\n",
    b"HMSG a.c 2 _INBOX.r.2 30 35\r\nNATS/1.0\r\nNats-Msg-Id: abc\r\n\r\nbody!\r\n",
    b"HMSG a.c 1 16 16\r\nNATS/1.0 404\r\n\r\n\r\n",
    b"+OK\r\nPONG\r\n",
    b"MSG big 3 100000\r\n" + bytes(range(256)) * 390 + b"x" * 160 + b"\r\n",
    b"-ERR 'Stale Connection'\r\n",
    b"MSG a.b 1 0\r\n\r\n",
])  # fmt: skip


async def _parse_in_pieces(parser: Any, cuts: list[int]) -> None:
    for start, end in zip([0, *cuts], [*cuts, len(_STREAM)], strict=True):
        await parser.parse(_STREAM[start:end])


@pytest.mark.parametrize("seed", range(12))
async def test_fast_parser_reads_what_nats_py_reads(seed: int) -> None:
    import random

    from nats.protocol.parser import Parser

    from omniq._nats_parser import FastParser

    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(_STREAM)), rng.choice([1, 5, 50, 400])))
    if seed == 0:
        cuts = list(range(1, len(_STREAM)))  # one byte at a time
    expected, got = _Recorder(), _Recorder()
    await _parse_in_pieces(Parser(expected), cuts)

    def hand_over(sid: int, subject: bytes, reply: bytes, data: bytes,
                  headers: bytes | None) -> bool:  # fmt: skip
        if sid != 1:
            return False  # nats-py's path: _process_msg
        got.events.append(("msg", sid, subject, reply, data, headers))
        return True

    parser = FastParser(got, hand_over)
    await _parse_in_pieces(parser, cuts)
    assert got.events == expected.events
    assert len(got.events) == 10 and not parser.buf


def test_only_status_headers_are_parsed() -> None:
    assert status_headers(b"NATS/1.0\r\nNats-Msg-Id: t1\r\n\r\n") is None
    assert status_headers(b"NATS/1.0 404 No Messages\r\n\r\n") == {
        "Status": "404", "Description": "No Messages",
    }  # fmt: skip
    found = status_headers(b"NATS/1.0 409 Consumer Deleted\r\nNats-Pending-Messages: 3\r\n\r\n")
    assert found == {
        "Status": "409", "Description": "Consumer Deleted", "Nats-Pending-Messages": "3",
    }  # fmt: skip


async def test_deliveries_and_acknowledgements_bypass_the_driver(queue: NATSTaskQueue) -> None:
    """The installed nats-py still calls ``_process_msg`` as the fast path expects;
    were it to change, everything would still work, only slower: this says so."""
    link = await queue._link()
    assert link._fast is not None
    await queue.enqueue(make_task(id="fast"))
    task = await queue.dequeue()  # a delivery, then the running record's acknowledgement
    assert task is not None and task.id == "fast"
    assert await queue.ack(task)


async def test_direct_writes_keep_their_place_behind_the_driver_buffer(
    queue: NATSTaskQueue,
) -> None:
    """``Link.send`` writes to the socket at once; what nats-py's ``publish`` put in
    its buffer before (not yet written by its flusher task) still goes first."""
    link = await queue._link()
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def collect(msg: Any) -> None:
        got.append(msg.data)
        if len(got) == 3:
            arrived.set()

    subject = f"{link.inbox}.order"
    sub = await link.nc.subscribe(subject, cb=collect)
    await link.nc.flush()
    await link.nc.publish(subject, b"1")  # buffered: the flusher writes it a loop turn later
    assert link.nc._pending, "nats-py no longer buffers publish: this test checks nothing"
    await link.send([(subject, "", b"2", None), (subject, "", b"3", None)])
    assert not link.nc._pending  # written along with ours
    await asyncio.wait_for(arrived.wait(), DEADLINE)
    assert got == [b"1", b"2", b"3"]
    await sub.unsubscribe()


async def test_a_task_stored_as_one_wait_ends_and_the_next_begins_is_taken(
    queue: NATSTaskQueue,
) -> None:
    """A worker's wait ends every few seconds and the next begins at once. The
    first wait's pull must not end with no other pull out: a task stored then
    would wait for the end of the next wait (5 s in a worker)."""
    await queue.enqueue(make_task(id="warm-up"))  # the band's consumer exists from here
    task = await queue.dequeue()
    assert task is not None and await queue.ack(task)
    link = await queue._link()
    [band] = await queue._bands.of_queues(link, ["default"])

    assert await queue.dequeue_many(1, timeout=0.2) == []  # ends; its wait pull lives on
    first_pull = band.wait_pull
    assert first_pull is not None
    second = asyncio.ensure_future(queue.dequeue_many(1, timeout=120))

    async def first_pull_over() -> bool:
        return first_pull not in band.pulls  # the server ended it

    await until(first_pull_over, "the first wait's pull to end")
    assert not second.done()
    await queue.enqueue(make_task(id="between"))
    [got] = await asyncio.wait_for(second, DEADLINE)
    assert got.id == "between"


async def test_acks_are_processed_when_ack_many_returns(queue: NATSTaskQueue) -> None:
    """The work messages of acknowledged tasks are gone once ``ack_many`` returns:
    ``size()`` must not count them (a burst worker would wait for them) and the
    band consumer has nothing pending. (Unconfirmed, most rounds left some.)"""
    link = await queue._link()
    for round_ in range(5):
        await queue.enqueue_many(
            [make_task(id=f"r{round_}-{i}", priority=i % 2) for i in range(20)]
        )
        tasks = await queue.dequeue_many(20)
        assert len(tasks) == 20
        assert all(await queue.ack_many(tasks))
        for band in await queue._bands.of_queues(link, ["default"]):
            info = await link.api(f"CONSUMER.INFO.{queue.stream}.{band.name}")
            assert info["num_ack_pending"] == 0, (round_, band.name)
        assert await queue.size() == 0


@pytest.mark.parametrize(
    ("reply", "consumer", "info"),
    [
        ("$JS.ACK.S.C.2.17.9.1764290000.3", "S.C", (2, 17, 3)),
        ("$JS.ACK.dom.acc.S.C.2.17.9.1764290000.3", "dom.acc.S.C", (2, 17, 3)),
        ("$JS.ACK.dom.acc.S.C.2.17.9.1764290000.3.x1", "dom.acc.S.C", (2, 17, 3)),
    ],
    ids=["v1", "v2", "v2-token"],
)
def test_ack_subjects_name_their_consumer_and_delivery(
    reply: str, consumer: str, info: tuple[int, int, int]
) -> None:
    """Acks are confirmed once per consumer (``_ack_all``): both subject formats."""
    assert ack_consumer(reply) == consumer
    assert ack_info(reply) == info
