"""The OmniQ side of the workload (DESIGN §5), run in a child process per measurement.

Usage: ``python -m benchmarks.workload KIND URL [options]`` prints one JSON object.

E      N no-op tasks enqueued one ``enqueue`` call at a time (sync API)
M      the same through ``enqueue_many`` in batches of 1,000
D      one worker process (this one) draining N queued no-op tasks
L      enqueue→start latency with an idle worker in another process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from omniq import OmniQ

from .tasks import noop, since

BATCH = 1000


def enqueue_rate(url: str, count: int) -> float:
    with OmniQ(url) as omniq:
        omniq.enqueue(noop)  # connect and create the schema outside the timing
        start = time.perf_counter()
        for _ in range(count):
            omniq.enqueue(noop)
        return count / (time.perf_counter() - start)


def enqueue_many_rate(url: str, count: int) -> float:
    with OmniQ(url) as omniq:
        omniq.enqueue(noop)
        calls = [()] * BATCH
        start = time.perf_counter()
        for _ in range(count // BATCH):
            omniq.enqueue_many(noop, calls)
        return count / (time.perf_counter() - start)


def drain_rate(url: str, count: int, concurrency: int, kind: str) -> float:
    with OmniQ(url, store_results=True) as omniq:
        for _ in range(count // BATCH):
            omniq.enqueue_many(noop, [()] * BATCH)
        worker = omniq.worker(concurrency=concurrency, kind=kind)
        start = time.perf_counter()
        worker.run(burst=True)
        elapsed = time.perf_counter() - start
        assert worker.processed >= count, worker.processed
        return worker.processed / elapsed


def latency(url: str, samples: int, idle_pause: float, concurrency: int) -> dict[str, float]:
    """Latency of ``samples`` tasks, one at a time, with an idle worker in another process
    (in this process for ``memory://``, which does not cross processes)."""
    in_process = url.startswith("memory://")
    worker = None
    if not in_process:
        command = [sys.executable, "-m", "omniq", "worker", "--task-queue", url]
        command += ["-c", str(concurrency), "--import", "benchmarks.tasks"]
        worker = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        with OmniQ(url) as omniq, _maybe_worker(omniq, in_process, concurrency):
            omniq.get_result(omniq.enqueue(since, time.time()), timeout=60)  # worker is up
            values = []
            for _ in range(samples):
                values.append(omniq.get_result(omniq.enqueue(since, time.time()), timeout=60))
            idle = None
            if idle_pause:
                time.sleep(idle_pause)  # the point of the measurement: a worker idle this long
                idle = omniq.get_result(omniq.enqueue(since, time.time()), timeout=60)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
    values.sort()
    result = {
        "p50_ms": statistics.median(values) * 1000,
        "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))] * 1000,
    }
    if idle is not None:
        result["idle_ms"] = idle * 1000
    return result


def _maybe_worker(omniq: OmniQ, in_process: bool, concurrency: int) -> Any:
    return omniq.worker(concurrency=concurrency) if in_process else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["E", "M", "D", "L"])
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--worker-kind", default="async")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--idle", type=float, default=15.0)
    args = parser.parse_args()
    if args.kind == "E":
        out: object = {"rate": enqueue_rate(args.url, args.count)}
    elif args.kind == "M":
        out = {"rate": enqueue_many_rate(args.url, args.count)}
    elif args.kind == "D":
        out = {"rate": drain_rate(args.url, args.count, args.concurrency, args.worker_kind)}
    else:
        out = latency(args.url, args.samples, args.idle, args.concurrency)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
