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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["memory", "sqlite"])
    parser.add_argument("target", nargs="?", default="")
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    if args.engine == "memory":
        out = memory_floor(args.count)
    else:
        out = sqlite_floor(args.target, args.count)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
