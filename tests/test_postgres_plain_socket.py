"""The sync facade's enqueue on PostgreSQL: one prepared statement on a plain socket.

``omniq._postgres_blocking`` runs ``put_one`` without asyncpg. Everything it
does not do (TLS, unusual DSNs, a lost connection, a failed statement) goes to
asyncpg: these tests check both that the plain socket carries the common case
and that the hand-over loses nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from typing import Any

import asyncpg
import pytest

from omniq import OmniQ, TaskStatus
from omniq._postgres_blocking import TEXT, BlockingStatement, Login, Unavailable, login_for
from omniq.queue import PostgreSQLTaskQueue
from omniq.testing.contract import echo

from .servers.postgres import PostgresServer

DEADLINE = 10.0
_schemas = itertools.count()


def plain_socket(omniq: OmniQ) -> BlockingStatement:
    queue = omniq.task_queue
    assert isinstance(queue, PostgreSQLTaskQueue)
    statement = queue._blocking_put
    assert statement is not None, "this DSN should take the plain socket"
    return statement


def without_asyncpg_enqueue(omniq: OmniQ, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on an enqueue through asyncpg fails the test."""

    def refuse(op: Any) -> Any:
        raise AssertionError("the enqueue went through asyncpg")

    queue = omniq.task_queue
    assert isinstance(queue, PostgreSQLTaskQueue)
    monkeypatch.setattr(queue._db, "run_blocking", refuse)


def test_enqueue_after_the_first_takes_the_plain_socket(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OmniQ(postgres_dsn) as omniq:
        first = omniq.enqueue(echo, 0)  # asyncpg: creates the schema
        without_asyncpg_enqueue(omniq, monkeypatch)
        low = omniq.enqueue(echo, "low", priority=-5)
        high = omniq.enqueue(echo, "high", priority=5)
        later = omniq.enqueue(echo, "later", delay=3600)
        assert omniq.enqueue(echo, "again", task_id=high) == high  # known id: nothing added
        assert len(plain_socket(omniq)._wires) == 1

        assert omniq.size() == 4
        task = omniq.get_task(later)
        assert task is not None and task.status is TaskStatus.PENDING
        assert task.due_at > time.time() + 3000
        assert omniq.cancel(later)  # a burst would wait for it
        omniq.worker(concurrency=1).run(burst=True)
        assert omniq.get_result(high, timeout=DEADLINE) == "high"  # the first id's value
        assert omniq.get_result(low, timeout=DEADLINE) == "low"
        assert omniq.get_result(first, timeout=DEADLINE) == 0


def test_each_thread_has_its_own_connection(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OmniQ(postgres_dsn) as omniq:
        omniq.enqueue(echo, 0)
        without_asyncpg_enqueue(omniq, monkeypatch)
        threads = [
            threading.Thread(target=lambda: [omniq.enqueue(echo, i) for i in range(20)])
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert omniq.size() == 61
        assert len(plain_socket(omniq)._wires) == 3
    assert plain_socket(omniq)._wires == []  # closed with the instance


def test_a_worker_waiting_for_work_is_woken_by_a_plain_socket_enqueue(postgres_dsn: str) -> None:
    with OmniQ(postgres_dsn) as omniq:
        omniq.enqueue(echo, 0)
        with omniq.worker(concurrency=1):
            assert omniq.get_result(omniq.enqueue(echo, 1), timeout=DEADLINE) == 1
            assert omniq.size() == 0  # the worker has claimed (and run) everything
            task_id = omniq.enqueue(echo, 2)  # the worker is idle, LISTENing
            assert plain_socket(omniq)._wires
            assert omniq.get_result(task_id, timeout=DEADLINE) == 2


# -- hand-overs to asyncpg -------------------------------------------------------------------
def test_enqueue_goes_on_across_a_server_restart(own_postgres_server: PostgresServer) -> None:
    with OmniQ(f"{own_postgres_server.dsn()}?schema=plain_restart") as omniq:
        before = [omniq.enqueue(echo, i) for i in range(3)]
        statement = plain_socket(omniq)
        wire = statement._wires[0]
        own_postgres_server.restart("fast")
        after = [omniq.enqueue(echo, i) for i in range(3)]  # the first one through asyncpg
        assert statement._wires and statement._wires[0] is not wire  # a new connection
        assert omniq.size() == 6
        omniq.worker(concurrency=2).run(burst=True)
        for i, task_id in enumerate(before + after):
            assert omniq.get_result(task_id, timeout=DEADLINE) == i % 3


def test_a_failed_statement_is_left_to_asyncpg(postgres_dsn: str) -> None:
    """A statement the server rejects is run again by asyncpg, which raises properly."""
    with OmniQ(postgres_dsn) as omniq:
        omniq.enqueue(echo, 0)
        queue = omniq.task_queue
        assert isinstance(queue, PostgreSQLTaskQueue)

        async def drop_table() -> None:
            conn = await asyncpg.connect(queue.dsn)
            await conn.execute(f"DROP TABLE {queue.schema}.tasks")
            await conn.close()

        asyncio.run(drop_table())
        with pytest.raises(asyncpg.UndefinedTableError):
            omniq.enqueue(echo, 1)
        assert plain_socket(omniq).declined is None  # the next call tries the socket again


# -- logins ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def password_roles(postgres_server: PostgresServer) -> dict[str, str]:
    """A role per login method, each allowed in only by its method; name by method."""
    roles = {method: f"omniq_{method.replace('-', '_')}" for method in METHODS}

    async def create() -> None:
        conn = await asyncpg.connect(postgres_server.dsn())
        for method, role in roles.items():
            stored = "md5" if method == "md5" else "scram-sha-256"
            await conn.execute(f"SET password_encryption = '{stored}'")
            await conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'sec ret'")
        hba = postgres_server.data / "pg_hba.conf"
        rules = "".join(f"host all {roles[m]} 127.0.0.1/32 {m}\n" for m in METHODS)
        hba.write_text(rules + hba.read_text())
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
        deadline = time.monotonic() + DEADLINE
        for role in roles.values():  # until the new rules are in force
            while True:
                try:
                    await (await asyncpg.connect(postgres_server.dsn(), user=role)).close()
                except (asyncpg.PostgresError, asyncpg.InterfaceError):
                    break  # a password is wanted now
                assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
                await asyncio.sleep(0.02)

    asyncio.run(create())
    return roles


METHODS = ("password", "md5", "scram-sha-256")


@pytest.mark.parametrize("method", METHODS)
def test_password_logins(
    postgres_server: PostgresServer,
    password_roles: dict[str, str],
    method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    role = password_roles[method]
    dsn = f"postgresql://{role}:sec%20ret@127.0.0.1:{postgres_server.port}/postgres"
    with OmniQ(f"{dsn}?schema=login_{next(_schemas)}") as omniq:
        omniq.enqueue(echo, 0)
        without_asyncpg_enqueue(omniq, monkeypatch)
        omniq.enqueue(echo, 1)
        assert omniq.size() == 2

    wrong = login_for(dsn.replace("sec%20ret", "wrong"), {})
    assert wrong is not None
    statement = BlockingStatement(wrong, "SELECT $1::text", (TEXT,))
    with pytest.raises(Unavailable, match="password"):
        statement.fetchval((b"x",))
    assert statement.declined  # not tried again on every call


def test_a_server_offering_tls_is_left_to_asyncpg() -> None:
    """``sslmode=prefer`` (asyncpg's default) encrypts where the server can: so must we."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn.recv(8))  # the SSLRequest
        conn.sendall(b"S")
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    port = listener.getsockname()[1]
    statement = BlockingStatement(
        Login("127.0.0.1", port, "u", None, "db", "prefer"), "SELECT 1", ()
    )
    with pytest.raises(Unavailable, match="TLS"):
        statement.fetchval(())
    thread.join(DEADLINE)
    listener.close()
    with pytest.raises(Unavailable, match="TLS"):
        statement.fetchval(())  # at once: the server is not asked again
    assert len(accepted) == 1 and accepted[0][4:] == (80877103).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("dsn", "options"),
    [
        ("postgresql://u@h:5432/db?sslmode=require", {}),
        ("postgresql://u@h:5432/db?sslmode=verify-full", {}),
        ("postgresql://u@h1:5432,h2:5432/db", {}),
        ("postgresql://u@/db?host=/var/run/postgresql", {}),
        ("postgresql://u@h/db?target_session_attrs=read-write", {}),
        ("postgresql://u@h/db", {"ssl": True}),
    ],
)
def test_dsns_only_asyncpg_reads_exactly_are_left_to_it(dsn: str, options: Any) -> None:
    assert login_for(dsn, options) is None


def test_dsn_defaults_are_asyncpg_s(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE"):
        monkeypatch.delenv(name, raising=False)
    login = login_for("postgresql://u:p%40ss@h/", {})
    assert login == Login("h", 5432, "u", "p@ss", "u", "prefer")
    assert "p@ss" not in repr(login)  # logs and tracebacks show no password
    monkeypatch.setenv("PGPASSWORD", "env")
    monkeypatch.setenv("PGSSLMODE", "disable")
    assert login_for("postgres://u@h:7/db", {}) == Login("h", 7, "u", "env", "db", "disable")
    monkeypatch.setenv("PGSSLMODE", "require")
    assert login_for("postgres://u@h:7/db", {}) is None
