"""Huey on Redis, SQLite and files: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``huey`` virtualenv. D runs ``huey_consumer`` (one process, 8 thread
workers) and times the first to the last task inside it; L measures enqueue→start
with an idle consumer through Huey's result store (on Redis the consumer blocks on
BRPOP; on SQLite and files it polls its storage, backing off while idle).
TARGET is the Redis URL for ``redis`` (queue named ``--name``), else a path.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from benchmarks.peers import _common

ENGINES = ["redis", "sqlite", "file"]


def make_huey(engine: str, target: str, name: str):  # type: ignore[no-untyped-def]
    from huey import FileHuey, RedisHuey, SqliteHuey

    if engine == "redis":
        return RedisHuey(name, url=target)
    if engine == "sqlite":
        return SqliteHuey("bench", filename=target + ".db")
    return FileHuey("bench", path=target)


huey = make_huey(
    os.environ.get("BENCH_HUEY_ENGINE", "sqlite"),
    os.environ.get(_common.TARGET, "/tmp/huey-bench"),
    os.environ.get(_common.NAME, "bench"),
)
_clock = _common.DrainClock()


@huey.task()
def noop() -> None:
    _clock.tick()  # runs in the consumer: the first and the count-th task time the drain


@huey.task()
def since(sent: float) -> float:
    return time.time() - sent


def consumer(env: dict[str, str]):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks.peers.huey_peer.huey"]
    workers = os.environ.get("BENCH_HUEY_WORKERS", "8")
    return _common.spawn([*argv, "-w", workers, "-k", "thread"], env)


def main() -> None:
    args = _common.parse(ENGINES)
    # Import this module under its real name, configured like the consumer's, so
    # task names match between producer and consumer.
    os.environ["BENCH_HUEY_ENGINE"] = args.engine
    app = importlib.import_module("benchmarks.peers.huey_peer")
    if args.kind == "E":
        _common.emit({"rate": _common.timed(args.count, app.noop)})
    elif args.kind == "D":
        for _ in range(args.count):
            app.noop()
        env, rate_file = _common.consumer_env(args.count)
        _common.emit({"rate": _common.wait_rate(consumer(env), rate_file)})
    else:
        proc = consumer(dict(os.environ))
        try:
            app.since(time.time()).get(blocking=True, timeout=60)
            values = [
                app.since(time.time()).get(blocking=True, timeout=60) for _ in range(args.samples)
            ]
        finally:
            _common.stop(proc)
        _common.emit(_common.percentiles(values))


if __name__ == "__main__":
    main()
