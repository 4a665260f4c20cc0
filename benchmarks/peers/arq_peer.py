"""arq on Redis: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``arq`` virtualenv. E awaits one ``enqueue_job`` at a time. D runs
one ``arq`` worker process with its defaults (``max_jobs`` 10, ``poll_delay`` 0.5 s,
results kept) and times the first to the last task inside it; L measures
enqueue→start with an idle worker, which polls its queue every ``poll_delay``.
TARGET is the Redis URL; the queue is named ``--name``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings

from benchmarks.peers import _common

_clock = _common.DrainClock()


async def noop(ctx: dict[str, Any]) -> None:
    _clock.tick()  # runs in the worker: the first and the count-th task time the drain


async def since(ctx: dict[str, Any], sent: float) -> None:
    _common.report_latency(sent)


class WorkerSettings:
    functions = [noop, since]
    redis_settings = RedisSettings.from_dsn(os.environ.get(_common.TARGET, "redis://"))
    queue_name = os.environ.get(_common.NAME, "arq:queue")
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "100"))
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.01"))


def worker(env: dict[str, str]):  # type: ignore[no-untyped-def]
    arq = str(Path(sys.executable).parent / "arq")
    return _common.spawn([arq, "benchmarks.peers.arq_peer.WorkerSettings"], env)


async def produce(args) -> None:  # type: ignore[no-untyped-def]
    pool = await create_pool(RedisSettings.from_dsn(args.target), default_queue_name=args.name)
    try:
        await _common.drive(
            args,
            lambda: pool.enqueue_job("noop"),
            lambda sent: pool.enqueue_job("since", sent),
            worker,
        )
    finally:
        await pool.aclose()


def main() -> None:
    asyncio.run(produce(_common.parse(["redis"])))


if __name__ == "__main__":
    main()
