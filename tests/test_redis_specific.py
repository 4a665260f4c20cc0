"""What only the Redis backend has: Lua scripts and their key schema, round trips per
batch, blocking waits, a server restart under a running worker, URLs, the missing
driver, and events on a Stream. The contract itself runs in ``test_contract.py``."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from omniq import AsyncOmniQ, ConfigurationError, MissingDependencyError, OmniQ, TaskStatus
from omniq.events import Event, EventType
from omniq.events.redis import RedisEventStorage
from omniq.queue._redis import RedisConnector, Script, load_script
from omniq.queue.redis import RedisTaskQueue
from omniq.results.base import TaskResult
from omniq.results.redis import RedisResultStorage
from omniq.testing.contract import DEADLINE, MakeQueue, echo, make_task

from . import test_event_storages as event_contract
from .backends import redis as backend
from .servers._common import unavailable
from .servers.redis import RedisServer, start_redis_server
from .servers.tls_proxy import start_tls_proxy


def redis_py() -> Any:
    """The redis-py module, to look at the server directly (fails in CI when missing)."""
    try:
        import redis
    except ImportError:
        unavailable("redis-py is not installed: pip install -e '.[test]'")
    return redis


@pytest.fixture
def redis_url(redis_server: str) -> str:
    return redis_server


@pytest.fixture
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    return backend.queue_factory(request, tmp_path)


@pytest.fixture
async def queue(make_queue: MakeQueue) -> AsyncIterator[RedisTaskQueue]:
    q = make_queue()
    assert isinstance(q, RedisTaskQueue)
    yield q
    await q.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    """A plain redis-py client to look at the server directly."""
    with redis_py().Redis.from_url(redis_url) as c:
        yield c


def count_scripts(monkeypatch: pytest.MonkeyPatch, connector: RedisConnector) -> list[str]:
    """Names of the scripts ``connector`` runs from now on, one entry per round trip."""
    calls: list[str] = []
    original = connector._eval

    async def counting(script: Script, keys: Any, args: Any) -> Any:
        calls.append(script.name)
        return await original(script, keys, args)

    monkeypatch.setattr(connector, "_eval", counting)
    return calls


# -- scripts and key schema ----------------------------------------------------------------


def test_every_queue_script_starts_with_the_key_schema() -> None:
    header = load_script("put").source.split("local K = ARGV[1]")[0]
    assert "K:t:<id>" in header and "K:q:<queue>" in header and "K:leases" in header
    scripts = ("put", "put_one", "claim", "finish", "retry", "release", "extend", "cancel")
    for name in (*scripts, "requeue"):
        assert load_script(name).source.startswith(header), name


async def test_keys_on_the_server_are_the_documented_ones(
    queue: RedisTaskQueue, client: Any
) -> None:
    low, high = make_task(priority=1), make_task(priority=5)
    later = make_task(due_at=time.time() + 3600)
    await queue.enqueue_many([low, high, later])
    k = "{" + queue.prefix + "}"
    ready = client.zrange(f"{k}:q:default", 0, -1, withscores=True)
    assert [(m[16:].decode(), score) for m, score in ready] == [(high.id, -5.0), (low.id, -1.0)]
    assert client.zscore(f"{k}:sched", later.id) == pytest.approx(later.due_at)
    fields = client.hgetall(f"{k}:t:{low.id}")
    assert {f.decode() for f in fields} == {"q", "p", "n", "d", "s"}
    assert fields[b"s"] == b"ready" and fields[b"q"] == b"default"
    assert client.object("encoding", f"{k}:t:{low.id}") in (b"ziplist", b"listpack")  # compact
    assert client.get(f"{k}:b:{low.id}") == queue.serializer.encode_task(low)

    [task] = await queue.dequeue_many(1)
    assert client.zscore(f"{k}:leases", task.id) is not None
    assert client.hget(f"{k}:t:{task.id}", "l") == task.lease_id.encode()  # type: ignore[union-attr]
    await queue.nack(task, error="ValueError: x")
    assert client.zscore(f"{k}:failed", task.id) is not None

    header = load_script("put").source.split("local K = ARGV[1]")[0]
    documented = {
        re.sub(r"<[a-z]+>", "*", name) for name in re.findall(r"K:[a-z]+(?::<[a-z]+>)?", header)
    }
    for key in client.scan_iter(match=f"{k}:*"):
        shape = re.sub(r"^\{[^}]+\}", "K", key.decode())
        assert any(re.fullmatch(pattern.replace("*", ".+"), shape) for pattern in documented), shape


async def test_scripts_run_by_sha_and_reload_after_script_flush(
    queue: RedisTaskQueue, client: Any, redis_url: str
) -> None:
    await queue.enqueue(make_task())
    put = load_script("put")
    assert client.script_exists(put.sha) == [True]
    client.script_flush()  # what a restarted server forgets
    assert client.script_exists(put.sha) == [False]
    await queue.enqueue(make_task())  # NOSCRIPT, then loaded again
    client.script_flush()
    assert queue.enqueue_blocking([make_task()]) == [True]  # the sync path too
    client.script_flush()
    tasks = await queue.dequeue_many(10)
    assert len(tasks) == 3
    client.script_flush()
    assert await queue.ack_many(tasks) == [True, True, True]
    async with RedisResultStorage(url=redis_url, prefix=queue.prefix) as results:
        client.script_flush()
        await results.set_many([(TaskResult(task_id="r", succeeded=True), None)])
        assert await results.get("r") is not None


async def test_batches_are_one_round_trip(
    queue: RedisTaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_scripts(monkeypatch, queue._conn)
    assert all(await queue.enqueue_many([make_task(priority=i % 3) for i in range(500)]))
    tasks = await queue.dequeue_many(200)
    assert len(tasks) == 200
    assert all(await queue.ack_many(tasks))
    assert all(await queue.extend_lease(await queue.dequeue_many(50)))
    assert calls == ["put", "claim", "finish", "claim", "extend"]


async def test_one_task_is_put_with_flat_arguments_and_lands_like_a_batch(
    queue: RedisTaskQueue, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_scripts(monkeypatch, queue._conn)
    one, other = make_task(priority=3), make_task(priority=3)
    later = make_task(due_at=time.time() + 3600)
    await queue.enqueue(one)
    assert queue.enqueue_blocking([other]) == [True]  # the sync facade's path
    assert queue.enqueue_blocking([other]) == [False]  # idempotent
    await queue.enqueue(later)
    await queue.enqueue_many([make_task(), make_task()])
    assert calls == ["put_one", "put_one", "put"]  # enqueue_blocking bypasses _eval
    k = "{" + queue.prefix + "}"
    fields = client.hgetall(f"{k}:t:{one.id}")
    assert {f.decode() for f in fields} == {"q", "p", "n", "d", "s"}
    assert float(fields[b"d"]) == one.due_at and float(fields[b"p"]) == 3
    assert client.object("encoding", f"{k}:t:{one.id}") in (b"ziplist", b"listpack")
    assert client.hget(f"{k}:t:{later.id}", "s") == b"scheduled"
    assert client.zscore(f"{k}:sched", later.id) == pytest.approx(later.due_at)
    assert await queue.size("default") == 5
    got = await queue.dequeue_many(10)
    assert [t.id for t in got[:2]] == [one.id, other.id]  # priority, then FIFO


@pytest.mark.parametrize("driver", ["socket", "redis-py"])
async def test_the_sync_enqueue_stores_any_task_as_the_async_one_does(
    queue: RedisTaskQueue, client: Any, driver: str
) -> None:
    """``enqueue_blocking`` builds put_one's command itself, on a bare socket (plain
    TCP with hiredis) or on redis-py's connection (TLS, or no hiredis)."""
    if driver == "redis-py":
        queue._conn._linked = False
    odd = [
        make_task(id="tâche-ü-1", queue_name="fïle", priority=77),
        make_task(id="t-2", queue_name="fïle", priority=-(2**40)),
        make_task(id="t-3", queue_name="fïle", due_at=time.time() + 3600),
        make_task(id="t-4\r\n$5", queue_name="fïle"),
    ]
    blocking = {task.id: queue.enqueue_blocking([task]) for task in odd}
    assert blocking == {task.id: [True] for task in odd}
    assert [queue.enqueue_blocking([task]) for task in odd] == [[False]] * 4  # idempotent
    twins = [msgspec.structs.replace(task, id=task.id + "-async") for task in odd]
    for twin in twins:
        await queue.enqueue(twin)
    k = "{" + queue.prefix + "}"
    for task, twin in zip(odd, twins, strict=True):
        fields = client.hgetall(f"{k}:t:{task.id}")
        twin_fields = client.hgetall(f"{k}:t:{twin.id}")
        assert {f: v for f, v in fields.items() if f != b"n"} == {
            f: v for f, v in twin_fields.items() if f != b"n"
        }
        stored = await queue.get_task(task.id)
        assert stored is not None and stored.queue_name == "fïle"
        assert (stored.priority, stored.due_at) == (task.priority, task.due_at)
    got = await queue.dequeue_many(10, ["fïle"])
    assert [t.id for t in got] == [
        "tâche-ü-1", "tâche-ü-1-async", "t-4\r\n$5", "t-4\r\n$5-async", "t-2", "t-2-async"
    ]  # fmt: skip


async def test_a_broken_connection_is_made_again(queue: RedisTaskQueue, client: Any) -> None:
    await queue.enqueue(make_task())
    assert queue.enqueue_blocking([make_task()]) == [True]
    client.client_kill_filter(_type="normal", skipme=True)  # cuts every other client
    await queue.enqueue(make_task())  # the loop's pipelined connection, again
    assert queue.enqueue_blocking([make_task()]) == [True]  # the thread's socket, again
    assert await queue.size("default") == 4


async def test_a_cancelled_call_leaves_the_pipelined_connection_in_step(
    queue: RedisTaskQueue, client: Any
) -> None:
    k = "{" + queue.prefix + "}"
    client.set(f"{k}:r:a", b"A")
    client.set(f"{k}:r:b", b"B")
    await queue._conn.pipeline(("PING",))
    first = asyncio.ensure_future(queue._conn.pipeline(("GET", f"{k}:r:a")))
    await asyncio.sleep(0)  # sent; its reply is on its way
    first.cancel()
    assert await queue._conn.pipeline(("GET", f"{k}:r:b")) == [b"B"]  # not A's reply
    assert first.cancelled()


async def test_huge_enqueue_many_is_split_but_keeps_order(queue: RedisTaskQueue) -> None:
    tasks = [make_task() for _ in range(2500)]
    assert await queue.enqueue_many(tasks) == [True] * 2500
    got = await queue.dequeue_many(2500)
    assert [t.id for t in got] == [t.id for t in tasks]


async def test_finished_tasks_are_pruned_after_retention(make_queue: MakeQueue) -> None:
    queue = make_queue(retention_seconds=0.001)
    try:
        await queue.enqueue(make_task())
        task = await queue.dequeue()
        assert task is not None and await queue.ack(task)
        finished = time.time()
        while time.time() <= finished + 0.001:
            await asyncio.sleep(0.001)
        queue._next_prune = 0.0  # type: ignore[attr-defined]  # as if a second had passed
        assert await queue.dequeue() is None  # a claim prunes what is past retention
        assert await queue.get_task(task.id) is None
    finally:
        await queue.close()


async def test_listing_tasks_in_any_state(queue: RedisTaskQueue) -> None:
    first, second = make_task("a", priority=1), make_task("b", due_at=time.time() + 3600)
    third, fourth = make_task("c"), make_task("a")
    await queue.enqueue_many([first, second, third, fourth])
    pending = await queue._list(TaskStatus.PENDING, None, 10)
    assert [r.id for r in pending] == [first.id, second.id, third.id, fourth.id]  # enqueue order
    assert [r.id for r in await queue._list(TaskStatus.PENDING, "a", 1)] == [first.id]
    [running] = await queue.dequeue_many(1, ["c"])
    assert [r.id for r in await queue._list(TaskStatus.RUNNING, None, 10)] == [third.id]
    await queue.ack(running)
    [done] = await queue._list(TaskStatus.SUCCEEDED, "c", 10)
    assert done.id == third.id and done.payload == queue.serializer.encode_task(third)
    assert await queue._list(TaskStatus.CANCELLED, None, 10) == []


async def test_a_host_with_a_fast_clock_cannot_take_a_live_lease(
    make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, other = make_queue(), make_queue()
    try:
        await owner.enqueue(make_task())
        task = await owner.dequeue()
        assert task is not None
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # an hour ahead
        assert await other.dequeue() is None  # leases run on the server's clock
        monkeypatch.undo()
        assert await owner.ack(task)
    finally:
        await owner.close()
        await other.close()


# -- waiting without polling ------------------------------------------------------------


async def test_idle_dequeue_blocks_on_the_server_instead_of_polling(
    queue: RedisTaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_scripts(monkeypatch, queue._conn)
    assert await queue.dequeue(timeout=0.5) is None
    # The first look, one at the timeout, at most one after a stale token: not a poll loop.
    assert calls.count("claim") <= 3


async def waiting_dequeue(consumer: RedisTaskQueue | Any) -> asyncio.Future[Any]:
    """``consumer.dequeue`` started, once it waits (it looked and found nothing)."""
    looked = asyncio.Event()
    original = consumer._wait

    async def signalling_wait(*args: Any) -> None:
        looked.set()
        await original(*args)

    consumer._wait = signalling_wait  # type: ignore[method-assign]
    waiter = asyncio.ensure_future(consumer.dequeue(timeout=DEADLINE))
    await looked.wait()
    return waiter


async def test_a_waiting_dequeue_is_woken_by_another_instance(make_queue: MakeQueue) -> None:
    consumer, producer = make_queue(), make_queue()
    try:
        waiter = await waiting_dequeue(consumer)
        task = make_task()
        await producer.enqueue(task)
        got = await asyncio.wait_for(waiter, DEADLINE)
        assert got is not None and got.id == task.id
    finally:
        await consumer.close()
        await producer.close()


async def test_a_wake_up_brings_the_task_without_another_claim(
    make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, producer = make_queue(), make_queue()
    assert isinstance(consumer, RedisTaskQueue)
    try:
        calls = count_scripts(monkeypatch, consumer._conn)
        waiter = await waiting_dequeue(consumer)
        task = make_task()
        await producer.enqueue(task)
        got = await asyncio.wait_for(waiter, DEADLINE)
        assert got is not None and got.id == task.id and got.attempts == 1
        # The first look, then nothing: the claim rode on the wake-up.
        assert calls == ["claim"]
        assert await consumer.ack(got)
    finally:
        await consumer.close()
        await producer.close()


async def test_tasks_a_wake_up_claimed_for_a_waiter_that_left_are_released(
    make_queue: MakeQueue,
) -> None:
    consumer, producer, other = make_queue(), make_queue(), make_queue()
    try:
        waiter = await waiting_dequeue(consumer)
        waiter.cancel()  # the waiter leaves; its wake-up (BLMOVE + claim) stays queued
        with pytest.raises(asyncio.CancelledError):
            await waiter
        task = make_task()
        await producer.enqueue(task)  # the consumer's wake-up claims it, for nobody
        # Released soon (not after the lease), with its attempt given back.
        got = await other.dequeue(timeout=DEADLINE)
        assert got is not None and got.id == task.id and got.attempts == 1
    finally:
        for q in (consumer, producer, other):
            await q.close()


async def test_a_claim_cancelled_in_flight_gives_its_tasks_back(
    queue: RedisTaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    await queue.enqueue(make_task())
    claimed, reply_may_go = asyncio.Event(), asyncio.Event()
    original = queue._conn._eval

    async def slow_reply(script: Script, keys: Any, args: Any) -> Any:
        reply = await original(script, keys, args)
        if script.name == "claim" and len(reply) > 1:
            claimed.set()  # the server has leased the task; its reply is on its way
            await reply_may_go.wait()
        return reply

    monkeypatch.setattr(queue._conn, "_eval", slow_reply)
    fetch = asyncio.ensure_future(queue.dequeue())
    await claimed.wait()
    fetch.cancel()  # what a worker does to its fetch when a slot frees up
    reply_may_go.set()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    again = await queue.dequeue()  # given back at once, not after the lease
    assert again is not None and again.attempts == 1


async def test_each_event_loop_gets_a_pool_closed_with_that_loop(queue: RedisTaskQueue) -> None:
    await queue.enqueue(make_task())
    assert await asyncio.to_thread(asyncio.run, queue.size("default")) == 1
    others = [e for loop, e in queue._conn._loops.items() if loop is not asyncio.get_running_loop()]
    assert others and all(entry.closed for entry in others)  # closed by asyncio.run's shutdown
    assert await queue.size("default") == 1


# -- faults --------------------------------------------------------------------------------

GATE = threading.Event()
STARTED: list[int] = []
TWO_STARTED = threading.Event()


def gated(value: int) -> int:
    """A task that runs until the test opens the gate."""
    STARTED.append(value)
    if len(STARTED) == 2:
        TWO_STARTED.set()
    assert GATE.wait(DEADLINE * 3)
    return value


class _Retrying(logging.Handler):
    """Sets ``seen`` when the connector logs that it retries against a down server."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.seen.set()


@pytest.mark.timeout(120)
async def test_worker_survives_a_restart_with_aof(redis_aof_server: RedisServer) -> None:
    server = redis_aof_server
    GATE.clear()
    STARTED.clear()
    TWO_STARTED.clear()
    retrying = _Retrying()
    logging.getLogger("omniq.redis").addHandler(retrying)
    queue = RedisTaskQueue(url=server.url, prefix="restart", retry_timeout=60)
    try:
        async with AsyncOmniQ(queue) as omniq:  # results on the same server, by default
            ids = await omniq.enqueue_many(gated, [(i,) for i in range(10)])
            async with omniq.worker(concurrency=2, prefetch=0):
                assert await asyncio.to_thread(TWO_STARTED.wait, DEADLINE)
                # Two tasks run, eight wait in Redis. Kill the server (no shutdown
                # save: only the AOF, fsynced at every write, has them) ...
                await asyncio.to_thread(server.stop, kill=True)
                GATE.set()  # ... let the two finish: their result and ack must wait
                assert await asyncio.to_thread(retrying.seen.wait, DEADLINE)
                await asyncio.to_thread(server.start)
                values = [await omniq.get_result(i, timeout=DEADLINE * 3) for i in ids]
                assert values == list(range(10))
                # The idle worker blocks on a new connection and is woken as before.
                assert await omniq.get_result(await omniq.enqueue(echo, "after"), DEADLINE) == (
                    "after"
                )
            for task_id in ids:
                task = await omniq.get_task(task_id)
                assert task is not None and task.status is TaskStatus.SUCCEEDED
                assert task.attempts == 1  # nothing ran twice
            assert sorted(STARTED) == list(range(10))
    finally:
        logging.getLogger("omniq.redis").removeHandler(retrying)
        GATE.set()


# -- URLs, settings, the driver ----------------------------------------------------------


def test_url_parsing() -> None:
    queue = RedisTaskQueue.from_url("rediss://alice:p%40ss@cache.example:6380/3?prefix=app")
    s = queue.settings
    assert (s.host, s.port, s.db, s.username, s.password, s.ssl) == (
        "cache.example", 6380, 3, "alice", "p@ss", True,
    )  # fmt: skip
    assert queue.prefix == "app" and queue._k == "{app}"
    assert "p@ss" not in repr(queue)
    options = s.client_options()
    assert options["ssl"] is True and options["ssl_cert_reqs"] == "required"

    plain = RedisTaskQueue.from_url("redis://:secret@localhost").settings
    assert (plain.port, plain.db, plain.username, plain.password, plain.ssl) == (
        6379, 0, None, "secret", False,
    )  # fmt: skip
    assert "ssl" not in plain.client_options()
    assert RedisTaskQueue.from_url("redis://h/?db=5").settings.db == 5
    tls = RedisTaskQueue.from_url("rediss://h?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem").settings
    assert (tls.ssl_cert_reqs, tls.ssl_ca_certs) == ("none", "/ca.pem")
    keywords = RedisTaskQueue(host="h", port=1234, db=2, password="pw", ssl=True)
    assert (keywords.settings.host, keywords.settings.port, keywords.settings.ssl) == (
        "h",
        1234,
        True,
    )
    assert keywords.prefix == "omniq"


@pytest.mark.parametrize(
    "url",
    ["mysql://h", "redis://h/x", "redis://h:port", "redis://h/1?db=2", "redis://h?bogus=1"],
)
def test_bad_urls_are_clear(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisTaskQueue.from_url(url)


def test_urls_choose_redis_components_without_io() -> None:
    omniq = OmniQ("redis://127.0.0.1:1/0", event_storage="redis://127.0.0.1:1/0?prefix=ev")
    try:
        assert isinstance(omniq.task_queue, RedisTaskQueue)
        assert isinstance(omniq.result_storage, RedisResultStorage)  # the queue's server
        assert omniq.result_storage.prefix == "omniq"
        assert isinstance(omniq._async.event_log.storage, RedisEventStorage)  # type: ignore[union-attr]
    finally:
        omniq._bridge.close()  # nothing was opened: port 1 was never dialled
    assert isinstance(RedisResultStorage.from_url("rediss://h/1"), RedisResultStorage)


async def test_password_and_db_reach_the_server(tmp_path: Path) -> None:
    server = start_redis_server(tmp_path, extra=["--requirepass", "s3cr#t"])
    try:
        url = f"redis://:s3cr%23t@127.0.0.1:{server.port}/3"
        async with RedisTaskQueue.from_url(url, prefix="p") as queue:
            task = make_task()
            await queue.enqueue(task)
        redis = redis_py()
        with redis.Redis(port=server.port, password="s3cr#t", db=3) as direct:
            assert direct.exists(f"{{p}}:t:{task.id}") == 1
        async with RedisTaskQueue.from_url(f"redis://127.0.0.1:{server.port}/3") as anonymous:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await anonymous.size()
    finally:
        server.stop()


def test_tls_urls_reach_the_server_through_a_tls_front(
    redis_url: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """``rediss://``: queue (the sync enqueue's own connection and the worker's),
    results and events, all through a real TLS handshake checked against the CA."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = start_tls_proxy(port, tmp_path)
    request.addfinalizer(proxy.stop)
    prefix = backend.unique_prefix(request, redis_url)
    tls = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={proxy.ca_file}&prefix={prefix}"
    with OmniQ(tls, event_storage=tls) as omniq:
        assert omniq.task_queue.settings.ssl
        task_id = omniq.enqueue(echo, "sealed")
        assert omniq.enqueue_many(echo, [(1,), (2,)]) != []
        assert omniq.size() == 3
        omniq.worker(concurrency=2).run(burst=True)
        assert omniq.get_result(task_id, timeout=DEADLINE) == "sealed"
        assert EventType.SUCCEEDED in {e.type for e in omniq.events(task_id=task_id)}
    with redis_py().Redis.from_url(redis_url) as plain:
        assert plain.exists(f"{{{prefix}}}:t:{task_id}") == 1  # the same server behind it
    untrusted = f"rediss://127.0.0.1:{proxy.port}/0?prefix={prefix}"  # the system's CAs
    with OmniQ(untrusted) as omniq:
        for call in (lambda: omniq.enqueue(echo, 1), omniq.size):  # sync socket, then a loop's
            with pytest.raises(redis_py().exceptions.ConnectionError, match="CERTIFICATE"):
                call()
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # raised at once


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    hint = re.escape("pip install 'omniq[redis]'")
    builders: list[Callable[[], object]] = [
        RedisTaskQueue,
        lambda: RedisTaskQueue.from_url("redis://localhost"),
        RedisResultStorage,
        RedisEventStorage,
        lambda: OmniQ("redis://localhost"),
    ]
    for build in builders:
        with pytest.raises(MissingDependencyError, match=hint):
            build()


# -- the sync facade ------------------------------------------------------------------------


def test_sync_facade_end_to_end(redis_url: str, request: pytest.FixtureRequest) -> None:
    prefix = backend.unique_prefix(request, redis_url)
    with OmniQ(f"{redis_url}?prefix={prefix}") as omniq:
        queue = omniq.task_queue
        assert queue.supports_blocking_put
        task_id = omniq.enqueue(echo, {"x": 1})
        ids = omniq.enqueue_many(echo, [(i,) for i in range(5)], priority=3)
        assert omniq._async.task_queue._conn._loops == {}  # type: ignore[attr-defined]
        assert omniq.size() == 6
        omniq.worker(concurrency=4).run(burst=True)
        assert omniq.get_result(task_id, timeout=DEADLINE) == {"x": 1}
        assert [omniq.get_result(i, timeout=DEADLINE) for i in ids] == list(range(5))


# -- results --------------------------------------------------------------------------------


async def test_many_waiters_on_one_result_all_wake(
    redis_url: str, request: pytest.FixtureRequest
) -> None:
    prefix = backend.unique_prefix(request, redis_url)
    async with RedisResultStorage(url=redis_url, prefix=prefix) as store:
        all_looked = asyncio.Event()
        misses = 0
        get = store.get

        async def counting_get(task_id: str) -> TaskResult | None:
            nonlocal misses
            result = await get(task_id)
            misses += result is None
            if misses == 5:
                all_looked.set()  # every waiter looked, and blocks next
            return result

        store.get = counting_get  # type: ignore[method-assign]
        waiters = [asyncio.ensure_future(store.wait("t", DEADLINE)) for _ in range(5)]
        await all_looked.wait()
        await store.set_many([(TaskResult(task_id="t", succeeded=True, value=b"v"), 60.0)])
        got = await asyncio.wait_for(asyncio.gather(*waiters), DEADLINE)
        assert [r.value if r else None for r in got] == [b"v"] * 5


# -- events on a stream ---------------------------------------------------------------------


@pytest.fixture
def make_storage(request: pytest.FixtureRequest, redis_url: str) -> Callable[[], RedisEventStorage]:
    prefix = backend.unique_prefix(request, redis_url)
    return lambda: RedisEventStorage(url=redis_url, prefix=prefix)


@pytest.fixture
async def storage(
    make_storage: Callable[[], RedisEventStorage],
) -> AsyncIterator[RedisEventStorage]:
    s = make_storage()
    yield s
    await s.close()


# The event storage contract of test_event_storages, on a Redis Stream.
test_events_round_trip = event_contract.test_round_trip_preserves_order_and_fields
test_events_empty = event_contract.test_empty_storage_and_empty_batch
test_events_by_task_id = event_contract.test_filter_by_task_id
test_events_by_type = event_contract.test_filter_by_type
test_events_since_until = event_contract.test_since_is_inclusive_and_until_exclusive
test_events_limit = event_contract.test_limit_returns_the_oldest_matches
test_events_filters_combine = event_contract.test_filters_combine
test_events_close_then_use_again = event_contract.test_close_then_use_again
test_events_context_manager = event_contract.test_async_context_manager_closes
test_events_from_threads = event_contract.test_concurrent_appends_from_threads


async def test_events_stream_is_trimmed_to_maxlen(
    redis_url: str, request: pytest.FixtureRequest, client: Any
) -> None:
    prefix = backend.unique_prefix(request, redis_url)
    async with RedisEventStorage(url=redis_url, prefix=prefix, maxlen=50) as s:
        events = [Event(task_id=str(i), type=EventType.ENQUEUED, at=float(i)) for i in range(1000)]
        for start in range(0, 1000, 100):
            await s.append(events[start : start + 100])
        length = client.xlen(s.key)
        # MAXLEN ~ trims whole stream nodes (100 entries by default): about maxlen stay.
        assert 50 <= length <= 50 + 100
        got = await s.query()
        assert got == events[-length:]  # the newest, in order


async def test_events_older_than_retention_are_trimmed(
    redis_url: str, request: pytest.FixtureRequest, client: Any
) -> None:
    prefix = backend.unique_prefix(request, redis_url)
    async with RedisEventStorage(
        url=redis_url, prefix=prefix, maxlen=None, retention_seconds=60
    ) as s:
        old_ms = int((time.time() - 3600) * 1000)
        for i in range(300):  # entries an hour old, as if appended then
            client.xadd(
                s.key, {"task_id": "old", "type": "enqueued", "at": "0"}, id=f"{old_ms}-{i}"
            )
        new = [Event(task_id="new", type=EventType.STARTED, at=time.time())]
        await s.append(new)
        assert client.xlen(s.key) < 301  # MINID ~ dropped the old nodes
        assert (await s.query(task_id="new")) == new


def test_event_storage_rejects_useless_bounds() -> None:
    with pytest.raises(ValueError):
        RedisEventStorage(maxlen=0)
    with pytest.raises(ValueError):
        RedisEventStorage(retention_seconds=0)
