"""Peers: the same workload on established task queues, each in its own virtualenv.

A peer is a module here, run inside its virtualenv, whose ``main()`` takes
``KIND ENGINE TARGET --count N --samples N --name NAME`` (TARGET: a path for SQLite
and files, the server's URL for a server engine; NAME: this measurement's own queue
or key prefix) like ``benchmarks.workload`` and prints JSON (``_common`` has the
shared parts), plus
an entry in ``PEERS``: its name, what its virtualenv installs and the engines it
runs on (each compared with OmniQ on that engine).
Virtualenvs live in ``.bench/venvs/<peer>`` and are created on first use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".bench" / "venvs"


@dataclass(frozen=True)
class Peer:
    name: str
    packages: list[str]
    engines: list[str]


#: In the order of the table. D settings: Huey one consumer, 8 threads; RQ one
#: ``SimpleWorker``; Dramatiq one process, 8 threads; Celery one worker, solo pool;
#: taskiq one worker process, async; arq one worker, ``max_jobs`` 100, ``poll_delay``
#: 10 ms; procrastinate one worker, concurrency 8; pgqueuer one ``PgQueuer.run()``,
#: batch 10 (see each module).
PEERS = {
    "huey_peer": Peer("Huey", ["huey", "redis"], ["redis", "sqlite", "file"]),
    "rq_peer": Peer("RQ", ["rq"], ["redis"]),
    "dramatiq_peer": Peer("Dramatiq", ["dramatiq[redis]"], ["redis"]),
    "celery_peer": Peer("Celery", ["celery[redis]"], ["redis"]),
    "taskiq_peer": Peer("taskiq", ["taskiq", "taskiq-redis", "taskiq-nats"], ["redis", "nats"]),
    "arq_peer": Peer("arq", ["arq"], ["redis"]),
    "procrastinate_peer": Peer("procrastinate", ["procrastinate"], ["postgres"]),
    "pgqueuer_peer": Peer("pgqueuer", ["pgqueuer", "asyncpg"], ["postgres"]),
}


def venv_python(peer: str, packages: list[str], log: Callable[[str], None]) -> str:
    venv = VENVS / peer
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    wanted = " ".join(packages)
    if not marker.exists() or marker.read_text() != wanted:
        log(f"creating virtualenv for {peer}: {wanted}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *packages],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        marker.write_text(wanted)
    return str(python)


def run_peers(
    args: argparse.Namespace, workdir: Path, engines: dict[str, str], log: Callable[[str], None]
) -> dict[str, Any]:
    """Each peer on each of its engines that OmniQ was measured on in this run.

    ``engines`` maps an engine to its server's URL (``""`` for SQLite and files).
    Every measurement gets its own queue / key prefix (``--name``), or its own path.
    """
    from .. import __main__ as bench

    results: dict[str, Any] = {}
    for peer, spec in PEERS.items():
        wanted = [engine for engine in spec.engines if engine in engines]
        if not wanted:
            continue
        python = venv_python(peer, spec.packages, log)
        for engine in wanted:
            figures = bench.Figures()
            for run in range(args.runs):
                log(f"{spec.name} on {engine}: run {run + 1}/{args.runs}")
                for kind in ("E", "D", "L"):
                    name = f"{peer}-{engine}-{run}-{kind}"
                    target = engines[engine] or str(workdir / name)
                    sizes = ["--samples", str(args.samples)] if kind == "L" else []
                    out = bench.child(
                        f"{__name__}.{peer}", kind, engine, target, "--name", name,
                        "--count", str(args.count), *sizes, python=python,
                    )  # fmt: skip
                    if kind == "L":
                        figures.add("p50", out["p50_ms"])
                        figures.add("p99", out["p99_ms"])
                    else:
                        figures.add(kind, out["rate"])
            results[f"{spec.name} ({engine})"] = (engine, figures)
    return results


def peer_table(peers: dict[str, Any], omniq: dict[str, Any]) -> str:
    from ..__main__ import Figures

    lines = [
        "| peer | E | OmniQ/peer E | D | OmniQ/peer D | latency p50 | OmniQ p50 | latency p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (engine, figures) in peers.items():
        ours: Figures | None = omniq.get(engine)

        def vs(key: str, ours: Figures | None = ours, figures: Figures = figures) -> str:
            mine, theirs = (ours.median(key) if ours else None), figures.median(key)
            return f"{mine / theirs:.1f}x" if mine and theirs else "-"

        ours_p50 = ours.cell("p50", "ms") if ours else "-"
        lines.append(
            f"| {name} | {figures.cell('E')} | {vs('E')} | {figures.cell('D')} | {vs('D')}"
            f" | {figures.cell('p50', 'ms')} | {ours_p50} | {figures.cell('p99', 'ms')} |"
        )
    return "\n".join(lines)
