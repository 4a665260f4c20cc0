"""Run the benchmark and print a markdown table: ``python -m benchmarks [--quick] [--peers]``.

Every figure is the median of ``--runs`` child processes (min-max beside it), each on
a fresh store; ratios are to the engine's floor measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ALL_BACKENDS = ["memory", "sqlite", "file", "redis", "postgres", "nats"]

#: Worker settings tried for D; the best is reported with its setting.
DRAIN_SETTINGS = [("async", 8), ("async", 16), ("async", 64), ("thread", 8)]


@dataclass
class Figures:
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def cell(self, key: str, unit: str = "/s") -> str:
        values = self.samples.get(key)
        if not values:
            return "-"
        if unit == "/s":
            return f"{_k(statistics.median(values))}/s ({_k(min(values))}-{_k(max(values))})"
        return f"{statistics.median(values):.2f} ms ({min(values):.2f}-{max(values):.2f})"


def _k(rate: float) -> str:
    return f"{rate / 1000:.1f}k"


def child(
    module: str, *args: str, python: str = sys.executable, timeout: float = 600
) -> dict[str, float]:
    """Run ``python -m module args`` from the repository root; parse its last JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [python, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@dataclass
class Backend:
    name: str
    floor_engine: str
    #: A fresh URL (a new store) for each measurement.
    url: Callable[[], str]
    floor_target: Callable[[], str] = lambda: ""


def backends(workdir: Path, servers: contextlib.ExitStack) -> dict[str, Callable[[], Backend]]:
    """Each backend's recipe; calling one starts its server (as the test suite does)."""
    counter = iter(range(1_000_000))

    def fresh(name: str) -> str:
        return f"{name}{next(counter)}"

    def redis() -> Backend:
        from tests.servers.redis import start_redis_server

        server = start_redis_server(workdir / "redis")
        servers.callback(server.stop)
        return Backend(
            "redis", "redis", lambda: f"{server.url}?prefix={fresh('b')}", lambda: server.url
        )

    def postgres() -> Backend:
        from tests.servers.postgres import discard, launch

        server = launch()
        servers.callback(discard, server)
        dsn = server.dsn()
        return Backend(
            "postgres", "postgres", lambda: f"{dsn}?schema={fresh('bench')}", lambda: dsn
        )

    def nats() -> Backend:
        from tests.servers.nats import start_nats_server

        server = start_nats_server(workdir / "nats")
        servers.callback(server.stop)
        return Backend(
            "nats", "nats", lambda: f"{server.url}?stream={fresh('B')}", lambda: server.url
        )

    return {
        "memory": lambda: Backend("memory", "memory", lambda: "memory://"),
        "sqlite": lambda: Backend(
            "sqlite",
            "sqlite",
            lambda: f"sqlite:///{workdir}/{fresh('bench')}.db",
            lambda: f"{workdir}/{fresh('floor')}.db",
        ),
        "file": lambda: Backend(
            "file",
            "file",
            lambda: f"file://{workdir}/{fresh('files')}",
            lambda: f"{workdir}/{fresh('floorfiles')}",
        ),
        "redis": redis,
        "postgres": postgres,
        "nats": nats,
    }


def measure(backend: Backend, args: argparse.Namespace, log: Callable[[str], None]) -> Figures:
    figures = Figures()
    count = str(args.count)
    settings = DRAIN_SETTINGS[1:2] if args.quick else DRAIN_SETTINGS
    for run in range(args.runs):
        log(f"{backend.name}: run {run + 1}/{args.runs}")
        floor = child(
            "benchmarks.floor", backend.floor_engine, backend.floor_target(), "--count", count
        )
        figures.add("floor_insert", floor["insert"])
        figures.add("floor_claim", floor["claim"])
        figures.add("E", child("benchmarks.workload", "E", backend.url(), "--count", count)["rate"])
        figures.add("M", child("benchmarks.workload", "M", backend.url(), "--count", count)["rate"])
        for kind, concurrency in settings:
            rate = child(
                "benchmarks.workload", "D", backend.url(), "--count", count,
                "--worker-kind", kind, "--concurrency", str(concurrency),
            )["rate"]  # fmt: skip
            figures.add(f"D {kind} c={concurrency}", rate)
        latency = child(
            "benchmarks.workload", "L", backend.url(), "--samples", str(args.samples),
            "--idle", str(args.idle if run == 0 else 0),
        )  # fmt: skip
        figures.add("p50", latency["p50_ms"])
        figures.add("p99", latency["p99_ms"])
        if "idle_ms" in latency:
            figures.add("idle", latency["idle_ms"])
    best = max(
        (key for key in figures.samples if key.startswith("D ")),
        key=lambda key: figures.median(key) or 0.0,
    )
    figures.samples["D"] = figures.samples[best]
    figures.notes["D"] = best[2:]
    return figures


def ratio(figures: Figures, key: str, floor_key: str) -> str:
    """The median of each run's ratio: a run measures its floor seconds before the
    figure, so pairing them cancels the machine's drift between runs; min-max beside."""
    values, floors = figures.samples.get(key, []), figures.samples.get(floor_key, [])
    ratios = [value / floor for value, floor in zip(values, floors, strict=False) if floor]
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def table(results: dict[str, Figures]) -> str:
    lines = [
        "| backend | E (one call) | E / floor insert | enqueue_many | D (one worker) | D setting"
        " | D / floor claim | latency p50 | latency p99 | first task after idle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in results.items():
        lines.append(
            f"| {name} | {f.cell('E')} | {ratio(f, 'E', 'floor_insert')} | {f.cell('M')}"
            f" | {f.cell('D')} | {f.notes.get('D', '')} | {ratio(f, 'D', 'floor_claim')}"
            f" | {f.cell('p50', 'ms')} | {f.cell('p99', 'ms')} | {f.cell('idle', 'ms')} |"
        )
    lines += ["", "| backend | floor: insert per call | floor: claim + remove per call |"]
    lines.append("| --- | --- | --- |")
    for name, f in results.items():
        lines.append(f"| {name} | {f.cell('floor_insert')} | {f.cell('floor_claim')} |")
    return "\n".join(lines)


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tasks and runs (< 3 min)")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma list")
    parser.add_argument("--peers", action="store_true", help="also run the peer queues")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.count = 5_000 if args.quick else 20_000
    args.samples = 100 if args.quick else 300
    args.idle = 3.0 if args.quick else 15.0

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="omniq-bench-"))
    sys.path.insert(0, str(ROOT))  # tests.servers: the servers start as the tests start them
    try:
        with contextlib.ExitStack() as servers:
            known = backends(workdir, servers)
            results = {}
            #: Each measured engine's base: a server URL, or "" for an embedded engine.
            engines: dict[str, str] = {}
            for name in args.backends.split(","):
                try:
                    backend = known[name]()
                except BaseException as exc:  # pytest's skip outside pytest, or a start failure
                    log(f"{name}: skipped, its server did not start: {exc}")
                    continue
                results[name] = measure(backend, args, log)
                server = name in ("redis", "postgres", "nats")
                engines[backend.floor_engine] = backend.floor_target() if server else ""
            peer_results = {}
            if args.peers:
                from .peers import run_peers

                peer_results = run_peers(args, workdir, engines, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nOmniQ benchmark: {args.count:,} tasks, {args.runs} runs, {describe_machine()}\n")
    print(table(results))
    if peer_results:
        from .peers import peer_table

        print()
        print(peer_table(peer_results, results))


if __name__ == "__main__":
    main()
