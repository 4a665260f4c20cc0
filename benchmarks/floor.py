"""The floor: raw engine operations from Python that a queue on the engine cannot beat.

Usage: ``python -m benchmarks.floor ENGINE PATH_OR_URL --count N`` prints JSON with
``insert`` (one write per call, as E does) and ``claim`` (take one and remove it,
as a drain must) rates, per second.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sqlite3
import time
from collections.abc import Callable

PAYLOAD = b"x" * 120  # about the size of an encoded no-op task


def memory_floor(count: int) -> dict[str, float]:
    jobs: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    start = time.perf_counter()
    for _ in range(count):
        jobs.put(PAYLOAD)
    insert = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(count):
        jobs.get_nowait()
    return {"insert": insert, "claim": count / (time.perf_counter() - start)}


def sqlite_floor(path: str, count: int) -> dict[str, float]:
    """Autocommit INSERT per call, and a BEGIN IMMEDIATE / SELECT / DELETE / COMMIT claim."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    start = time.perf_counter()
    for _ in range(count):
        conn.execute("INSERT INTO jobs (payload) VALUES (?)", (PAYLOAD,))
    insert = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(count):
        conn.execute("BEGIN IMMEDIATE")
        (job_id, _payload) = conn.execute(
            "SELECT id, payload FROM jobs ORDER BY id LIMIT 1"
        ).fetchone()
        conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        conn.execute("COMMIT")
    claim = count / (time.perf_counter() - start)
    conn.close()
    return {"insert": insert, "claim": claim}


# -- servers --------------------------------------------------------------------------
def redis_floor(url: str, count: int) -> dict[str, float]:
    """One LPUSH per call, and one RPOP per call (the claim a list queue cannot beat)."""
    import redis

    client = redis.Redis.from_url(url)
    client.delete("floor")
    start = time.perf_counter()
    for _ in range(count):
        client.lpush("floor", PAYLOAD)
    insert = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(count):
        client.rpop("floor")
    claim = count / (time.perf_counter() - start)
    client.close()
    return {"insert": insert, "claim": claim}


def postgres_floor(dsn: str, count: int) -> dict[str, float]:
    """One INSERT per statement, and a one-row ``FOR UPDATE SKIP LOCKED`` claim + delete."""
    import asyncio

    import asyncpg

    async def run() -> dict[str, float]:
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "DROP TABLE IF EXISTS floor;"
            " CREATE TABLE floor (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " payload bytea NOT NULL)"
        )
        insert_sql = "INSERT INTO floor (payload) VALUES ($1)"
        start = time.perf_counter()
        for _ in range(count):
            await conn.execute(insert_sql, PAYLOAD)
        insert = count / (time.perf_counter() - start)
        claim_sql = (
            "DELETE FROM floor WHERE id = (SELECT id FROM floor ORDER BY id"
            " FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING payload"
        )
        start = time.perf_counter()
        for _ in range(count):
            await conn.fetchval(claim_sql)
        claim = count / (time.perf_counter() - start)
        await conn.execute("DROP TABLE floor")
        await conn.close()
        return {"insert": insert, "claim": claim}

    return asyncio.run(run())


def nats_floor(url: str, count: int) -> dict[str, float]:
    """``js.publish`` awaiting each ack, and a pull ``fetch(100)`` + ack of each message."""
    import asyncio

    import nats

    async def run() -> dict[str, float]:
        client = await nats.connect(url)
        js = client.jetstream()
        await js.add_stream(name="FLOOR", subjects=["floor"])
        start = time.perf_counter()
        for _ in range(count):
            await js.publish("floor", PAYLOAD)
        insert = count / (time.perf_counter() - start)
        sub = await js.pull_subscribe("floor", durable="floor")
        start, taken = time.perf_counter(), 0
        while taken < count:
            for message in await sub.fetch(min(100, count - taken), timeout=5):
                await message.ack()
                taken += 1
        claim = count / (time.perf_counter() - start)
        await js.delete_stream("FLOOR")
        await client.close()
        return {"insert": insert, "claim": claim}

    return asyncio.run(run())


def file_floor(directory: str, count: int) -> dict[str, float]:
    """Create a file per call (exclusive, written, closed), and claim one by rename."""
    os.makedirs(os.path.join(directory, "ready"), exist_ok=True)
    os.makedirs(os.path.join(directory, "taken"), exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(
            os.path.join(directory, "ready", f"{i:012d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL
        )
        os.write(fd, PAYLOAD)
        os.close(fd)
    insert = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for name in sorted(os.listdir(os.path.join(directory, "ready"))):
        os.rename(os.path.join(directory, "ready", name), os.path.join(directory, "taken", name))
    claim = count / (time.perf_counter() - start)
    return {"insert": insert, "claim": claim}


FLOORS: dict[str, Callable[[str, int], dict[str, float]]] = {
    "memory": lambda target, count: memory_floor(count),
    "sqlite": sqlite_floor,
    "redis": redis_floor,
    "postgres": postgres_floor,
    "nats": nats_floor,
    "file": file_floor,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=sorted(FLOORS))
    parser.add_argument("target", nargs="?", default="")
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    print(json.dumps(FLOORS[args.engine](args.target, args.count)))


if __name__ == "__main__":
    main()
