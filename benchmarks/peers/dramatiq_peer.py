"""Dramatiq on Redis: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``dramatiq`` virtualenv. D runs one ``dramatiq`` worker process with
8 worker threads (``-p 1 -t 8``, its default prefetch) and times the first to the
last task inside it; L measures enqueue→start with an idle worker.
TARGET is the Redis URL; the broker's key namespace is ``--name``.
"""

from __future__ import annotations

import importlib
import os
import sys

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from benchmarks.peers import _common

broker = RedisBroker(
    url=os.environ.get(_common.TARGET, "redis://127.0.0.1:6379/0"),
    namespace=os.environ.get(_common.NAME, "dramatiq"),
)
dramatiq.set_broker(broker)
_clock = _common.DrainClock()


@dramatiq.actor(max_retries=0)
def noop() -> None:
    _clock.tick()  # runs in the worker: the first and the count-th task time the drain


@dramatiq.actor(max_retries=0)
def since(sent: float) -> None:
    _common.report_latency(sent)


def worker(env: dict[str, str]):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "dramatiq", "benchmarks.peers.dramatiq_peer"]
    return _common.spawn([*argv, "-p", "1", "-t", "8"], env)


def main() -> None:
    args = _common.parse(["redis"])
    # Import this module under its real name, with the broker the worker will use.
    app = importlib.import_module("benchmarks.peers.dramatiq_peer")
    _common.run_with_worker_process(args, app.noop.send, app.since.send, worker)


if __name__ == "__main__":
    main()
