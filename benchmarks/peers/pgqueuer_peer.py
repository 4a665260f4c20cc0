"""pgqueuer on PostgreSQL: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``pgqueuer`` virtualenv (asyncpg). E awaits one ``Queries.enqueue``
at a time. D runs one worker process, ``PgQueuer.run()`` with its defaults (``--batch-size`` 10,
async entrypoints, LISTEN/NOTIFY) and times the first to the last task inside it;
L measures enqueue→start with an idle worker woken by NOTIFY. TARGET is the server's
DSN; each measurement gets its own database (``--name``) with pgqueuer's schema.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries

from benchmarks.peers import _common

_clock = _common.DrainClock()


async def create() -> PgQueuer:
    """The worker's factory (``pgq run benchmarks.peers.pgqueuer_peer:create``)."""
    pgq = PgQueuer(AsyncpgDriver(await asyncpg.connect(os.environ[_common.TARGET])))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        _clock.tick()  # the first and the count-th task time the drain

    @pgq.entrypoint("since")
    async def since(job: Job) -> None:
        _common.report_latency(float(job.payload or b"0"))

    return pgq


async def run_worker() -> None:
    """The worker process: ``PgQueuer.run()`` with its defaults (what ``pgq run`` does)."""
    await (await create()).run()


def worker(env: dict[str, str]):  # type: ignore[no-untyped-def]
    # Not ``pgq run``: its CLI fails to set up logging in pgqueuer 1.6.
    return _common.spawn([sys.executable, "-m", "benchmarks.peers.pgqueuer_peer", "worker"], env)


async def produce(args) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(os.environ[_common.TARGET])
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    try:
        await _common.drive(
            args,
            lambda: queries.enqueue("noop", None),
            lambda sent: queries.enqueue("since", repr(sent).encode()),
            worker,
        )
    finally:
        await conn.close()


def main() -> None:
    if sys.argv[1:] == ["worker"]:
        asyncio.run(run_worker())
        return
    args = _common.parse(["postgres"])
    os.environ[_common.TARGET] = _common.fresh_database(args.target, args.name)
    asyncio.run(produce(args))


if __name__ == "__main__":
    main()
