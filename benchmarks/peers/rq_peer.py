"""RQ on Redis: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``rq`` virtualenv. D runs one ``rq worker`` process with
``SimpleWorker`` (jobs run in the worker process; RQ's default worker forks a child
per job, which is several times slower) and times the first to the last task inside
it; L measures enqueue→start with an idle worker (it blocks on BLPOP).
TARGET is the Redis URL; the queue is named ``--name``.
"""

from __future__ import annotations

import sys

from benchmarks.peers import _common

_clock = _common.DrainClock()


def noop() -> None:
    _clock.tick()  # runs in the worker: the first and the count-th task time the drain


def since(sent: float) -> None:
    _common.report_latency(sent)


def worker(url: str, name: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "rq.cli", "worker", "--url", url, "--worker-class"]
    argv += ["rq.worker.SimpleWorker", "--quiet", name]
    return _common.spawn(argv, env)


def main() -> None:
    from redis import Redis
    from rq import Queue

    args = _common.parse(["redis"])
    queue = Queue(args.name, connection=Redis.from_url(args.target))
    task, probe = "benchmarks.peers.rq_peer.noop", "benchmarks.peers.rq_peer.since"
    _common.run_with_worker_process(
        args,
        lambda: queue.enqueue(task),
        lambda sent: queue.enqueue(probe, sent),
        lambda env: worker(args.target, args.name, env),
    )


if __name__ == "__main__":
    main()
