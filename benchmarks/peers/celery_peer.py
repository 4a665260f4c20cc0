"""Celery on Redis: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``celery`` virtualenv, with Redis as broker and result backend (so
results are stored, as OmniQ's are, and ``.delay()`` pays what it costs a user who
keeps results: each one also subscribes to its result's channel). D runs one
``celery worker`` process with the solo pool (tasks run in the consumer's own thread;
as fast here as ``-P threads -c 8``, faster than prefork with 1 or 2 children) and
times the first to the last task inside it; L measures enqueue→start with an idle
worker (it blocks on BRPOP). TARGET is the Redis URL; the queue and every broker key
carry ``--name``.
"""

from __future__ import annotations

import importlib
import os
import sys

from celery import Celery

from benchmarks.peers import _common

_url = os.environ.get(_common.TARGET, "redis://127.0.0.1:6379/0")
_name = os.environ.get(_common.NAME, "celery")
app = Celery("bench", broker=_url, backend=_url)
app.conf.update(
    task_default_queue=_name,
    # Every broker key under the name (queue, bindings, unacked messages and index),
    # like Dramatiq's namespace: nothing shared with another measurement's worker.
    broker_transport_options={"global_keyprefix": f"{_name}:"},
    # No control or event traffic (``--without-*`` below too): the broadcast exchanges
    # are shared by every worker on the server, and none of it is part of running a task.
    worker_enable_remote_control=False,
)
_clock = _common.DrainClock()


@app.task(name="noop")
def noop() -> None:
    _clock.tick()  # runs in the worker: the first and the count-th task time the drain


@app.task(name="since")
def since(sent: float) -> None:
    _common.report_latency(sent)


def worker(env: dict[str, str]):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "celery", "-A", "benchmarks.peers.celery_peer", "worker"]
    argv += ["-P", "solo", "-l", "WARNING", "--without-gossip", "--without-mingle"]
    return _common.spawn([*argv, "--without-heartbeat"], env)


def main() -> None:
    args = _common.parse(["redis"])
    # Import this module under its real name, with the app the worker will use.
    bench = importlib.import_module("benchmarks.peers.celery_peer")
    _common.run_with_worker_process(args, bench.noop.delay, bench.since.delay, worker)


if __name__ == "__main__":
    main()
