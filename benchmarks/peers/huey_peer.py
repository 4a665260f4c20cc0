"""Huey on SQLite and on files: the same E / D / L workload as ``benchmarks.workload``.

Runs inside the ``huey`` virtualenv. D runs ``huey_consumer`` (one process, 8 thread
workers) and times the first to the last task inside it; L measures enqueue→start
with an idle consumer (Huey polls its storage, backing off while idle).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def make_huey(engine: str, target: str):  # type: ignore[no-untyped-def]
    from huey import FileHuey, SqliteHuey

    if engine == "sqlite":
        return SqliteHuey("bench", filename=target + ".db")
    return FileHuey("bench", path=target)


_engine = os.environ.get("BENCH_HUEY_ENGINE", "sqlite")
_target = os.environ.get("BENCH_HUEY_TARGET", "/tmp/huey-bench")
huey = make_huey(_engine, _target)
_count = int(os.environ.get("BENCH_HUEY_COUNT", "0"))
_seen = {"n": 0, "t0": 0.0}


_lock = threading.Lock()


@huey.task()
def noop() -> None:
    # Runs in the consumer: the first and the count-th task time the drain.
    with _lock:
        _seen["n"] += 1
        if _seen["n"] == 1:
            _seen["t0"] = time.perf_counter()
        elif _seen["n"] == _count:
            rate = (_count - 1) / (time.perf_counter() - _seen["t0"])
            Path(_target + ".rate").write_text(str(rate))


@huey.task()
def since(sent: float) -> float:
    return time.time() - sent


def consumer(engine: str, target: str, count: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BENCH_HUEY_ENGINE": engine,
        "BENCH_HUEY_TARGET": target,
        "BENCH_HUEY_COUNT": str(count),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            "benchmarks.peers.huey_peer.huey",
            "-w",
            "8",
            "-k",
            "thread",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["E", "D", "L"])
    parser.add_argument("engine", choices=["sqlite", "file"])
    parser.add_argument("target")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    # Import this module under its real name, configured like the consumer's, so
    # task names match between producer and consumer.
    os.environ.update(BENCH_HUEY_ENGINE=args.engine, BENCH_HUEY_TARGET=args.target)
    app = importlib.import_module("benchmarks.peers.huey_peer")
    if args.kind == "E":
        start = time.perf_counter()
        for _ in range(args.count):
            app.noop()
        print(json.dumps({"rate": args.count / (time.perf_counter() - start)}))
    elif args.kind == "D":
        for _ in range(args.count):
            app.noop()
        print(json.dumps({"rate": drain(args)}))
    else:
        print(json.dumps(latency(app, args)))


def drain(args: argparse.Namespace) -> float:
    proc = consumer(args.engine, args.target, args.count)
    rate_file = Path(args.target + ".rate")
    try:
        while not rate_file.exists():  # the consumer writes it when done
            time.sleep(0.05)
            if proc.poll() is not None:
                raise SystemExit("huey consumer exited early")
    finally:
        proc.terminate()
        proc.wait(30)
    return float(rate_file.read_text())


def latency(app, args: argparse.Namespace) -> dict[str, float]:  # type: ignore[no-untyped-def]
    proc = consumer(args.engine, args.target, 0)
    try:
        app.since(time.time()).get(blocking=True, timeout=60)
        values = sorted(
            app.since(time.time()).get(blocking=True, timeout=60) for _ in range(args.samples)
        )
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "p50_ms": statistics.median(values) * 1000,
        "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))] * 1000,
    }


if __name__ == "__main__":
    main()
