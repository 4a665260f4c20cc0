"""Peers: the same workload on established task queues, each in its own virtualenv.

A peer is a module here, run inside its virtualenv, whose ``main()`` takes
``KIND ENGINE TARGET --count N`` like ``benchmarks.workload`` and prints JSON, plus
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


PEERS = {"huey_peer": Peer("Huey", ["huey"], ["sqlite", "file"])}


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
    args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    from .. import __main__ as bench

    results: dict[str, Any] = {}
    for peer, spec in PEERS.items():
        python = venv_python(peer, spec.packages, log)
        for engine in spec.engines:
            figures = bench.Figures()
            for run in range(args.runs):
                log(f"{spec.name} on {engine}: run {run + 1}/{args.runs}")
                target = str(workdir / f"{peer}-{engine}-{run}")
                for kind in ("E", "D"):
                    out = bench.child(
                        f"{__name__}.{peer}", kind, engine, f"{target}-{kind}",
                        "--count", str(args.count), python=python,
                    )  # fmt: skip
                    figures.add(kind, out["rate"])
                latency = bench.child(
                    f"{__name__}.{peer}", "L", engine, f"{target}-L",
                    "--samples", str(args.samples), python=python,
                )  # fmt: skip
                figures.add("p50", latency["p50_ms"])
                figures.add("p99", latency["p99_ms"])
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
