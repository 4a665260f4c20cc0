"""procrastinate on PostgreSQL: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``procrastinate`` virtualenv (psycopg 3). E awaits one
``defer_async()`` at a time. D runs one ``procrastinate worker`` process
(``--concurrency 8``, LISTEN/NOTIFY, jobs kept as succeeded, its default) and times
the first to the last task inside it; L measures enqueue→start with an idle worker
woken by NOTIFY. TARGET is the server's DSN; each measurement gets its own database
(``--name``) with procrastinate's schema applied.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

from procrastinate import App, PsycopgConnector

from benchmarks.peers import _common

app = App(
    connector=PsycopgConnector(
        conninfo=os.environ.get(_common.TARGET, "postgresql://postgres@127.0.0.1/postgres")
    )
)
_clock = _common.DrainClock()


@app.task(name="noop")
async def noop() -> None:
    _clock.tick()  # runs in the worker: the first and the count-th task time the drain


@app.task(name="since")
async def since(sent: float) -> None:
    _common.report_latency(sent)


def worker(env: dict[str, str]):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "procrastinate", "--app=benchmarks.peers.procrastinate_peer.app"]
    return _common.spawn([*argv, "worker", "--concurrency", "8"], env)


async def produce(module, args) -> None:  # type: ignore[no-untyped-def]
    async with module.app.open_async():
        await module.app.schema_manager.apply_schema_async()
        await _common.drive(
            args, module.noop.defer_async, lambda sent: module.since.defer_async(sent=sent), worker
        )


def main() -> None:
    args = _common.parse(["postgres"])
    os.environ[_common.TARGET] = _common.fresh_database(args.target, args.name)
    # Import this module under its real name, on the database the worker will use.
    module = importlib.import_module("benchmarks.peers.procrastinate_peer")
    asyncio.run(produce(module, args))


if __name__ == "__main__":
    main()
