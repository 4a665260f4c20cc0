"""taskiq on Redis (taskiq-redis) and NATS (taskiq-nats): the workload of ``benchmarks.workload``.

Runs inside the ``taskiq`` virtualenv. On Redis the broker is ``ListQueueBroker``
(LPUSH / BRPOP on the list ``--name``); on NATS ``PullBasedJetStreamBroker`` (a
JetStream stream and durable consumer named ``--name``: core NATS keeps no message
for a worker that is not there yet, so D needs JetStream). E awaits one ``kiq()`` at
a time. D runs one ``taskiq worker`` process (``-w 1``, async tasks, its default
``--max-async-tasks`` 100) and times the first to the last task inside it; L
measures enqueue→start with an idle worker. TARGET is the server's URL.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

from benchmarks.peers import _common


def make_broker(engine: str, target: str, name: str):  # type: ignore[no-untyped-def]
    if engine == "nats":
        from taskiq_nats import PullBasedJetStreamBroker

        return PullBasedJetStreamBroker(
            target, subject=f"{name}.tasks", stream_name=name, durable=name
        )
    from taskiq_redis import ListQueueBroker

    return ListQueueBroker(target, queue_name=name)


broker = make_broker(
    os.environ.get("BENCH_TASKIQ_ENGINE", "redis"),
    os.environ.get(_common.TARGET, "redis://127.0.0.1:6379/0"),
    os.environ.get(_common.NAME, "taskiq"),
)
_clock = _common.DrainClock()


@broker.task
async def noop() -> None:
    _clock.tick()  # runs in the worker: the first and the count-th task time the drain


@broker.task
async def since(sent: float) -> None:
    _common.report_latency(sent)


def worker(env: dict[str, str]):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "taskiq", "worker", "benchmarks.peers.taskiq_peer:broker"]
    return _common.spawn([*argv, "-w", "1", "--log-level", "WARNING"], env)


async def produce(app, args) -> None:  # type: ignore[no-untyped-def]
    await app.broker.startup()
    try:
        await _common.drive(args, app.noop.kiq, app.since.kiq, worker)
    finally:
        await app.broker.shutdown()


def main() -> None:
    args = _common.parse(["redis", "nats"])
    os.environ["BENCH_TASKIQ_ENGINE"] = args.engine
    # Import this module under its real name, with the broker the worker will use.
    app = importlib.import_module("benchmarks.peers.taskiq_peer")
    asyncio.run(produce(app, args))


if __name__ == "__main__":
    main()
