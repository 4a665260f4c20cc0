"""Child processes for the reliability tests: real interpreters, never outliving a test.

Scripts and task modules are written into the test's ``tmp_path``, which is
the children's working directory and is on their ``PYTHONPATH``, so a task
stored as ``"rtasks:record"`` imports in every worker. Their output goes to
files (never pipes, which can fill and block a child) and is shown when an
assertion fails. Whatever is still running at teardown is killed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
DEADLINE = 60.0  # bound for things that happen "soon"; only reached when something is broken


class Child:
    """One started script: its process and where its output went."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.name = name
        self.popen = popen
        self.out = out
        self.err = err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def describe(self) -> str:
        return (
            f"--- {self.name} (pid {self.pid}, exit {self.popen.poll()})\n"
            f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"
        )

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout} s\n{self.describe()}")

    def terminate(self) -> int:
        """SIGTERM (a worker's graceful stop) and wait for the exit."""
        self.popen.send_signal(signal.SIGTERM)
        return self.wait()


class Processes:
    """Writes scripts into ``directory`` and runs them there with ``sys.executable``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[Child] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
        path = [str(directory), str(SRC), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        self.env = env

    def write(self, name: str, source: str) -> Path:
        path = self.directory / name
        path.write_text(textwrap.dedent(source))
        return path

    def start(self, script: str, *args: object, name: str | None = None) -> Child:
        name = name or f"{Path(script).stem}-{len(self.children)}"
        out, err = self.directory / f"{name}.stdout", self.directory / f"{name}.stderr"
        with open(out, "wb") as out_file, open(err, "wb") as err_file:
            popen = subprocess.Popen(
                [sys.executable, script, *map(str, args)],
                cwd=self.directory,
                env=self.env,
                stdout=out_file,
                stderr=err_file,
            )
        child = Child(name, popen, out, err)
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.kill()
            child.popen.wait()


def wait_until(
    predicate: Callable[[], bool],
    what: str,
    *,
    alive: tuple[Child, ...] = (),
    timeout: float = DEADLINE,
) -> None:
    """Poll ``predicate`` until true; fail at the deadline or if a child in ``alive`` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for child in alive:
            if child.popen.poll() is not None:
                pytest.fail(f"{child.name} exited while waiting for {what}\n{child.describe()}")
        if time.monotonic() > deadline:
            details = "\n".join(child.describe() for child in alive)
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{details}")
        time.sleep(0.02)


def query(database: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """A read-only look at the queue's tables, for polling and state checks."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def read_lines(directory: Path, pattern: str) -> list[str]:
    lines: list[str] = []
    for path in sorted(directory.glob(pattern)):
        lines += path.read_text().splitlines()
    return lines
