"""What every peer module shares: the command line, the drain clock, the latency probe.

Imported inside the peers' virtualenvs, so it uses the standard library only (and
the PostgreSQL driver the peer installs, to create its database).

D: the consumer counts the no-op tasks it runs in-process (first task starts the
clock, the N-th stops it) and writes the rate to ``$BENCH_RATE_FILE``; the producer
waits for that file. L: the probe task sends ``time.time() - sent`` (enqueue→start)
over UDP to the producer, which sends the next probe when it has the last one's
(Huey uses its own result store instead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

RATE_FILE = "BENCH_RATE_FILE"
COUNT = "BENCH_COUNT"
NAME = "BENCH_NAME"
TARGET = "BENCH_TARGET"


def parse(engines: Sequence[str]) -> argparse.Namespace:
    """``KIND ENGINE TARGET [--count N] [--samples N] [--name NAME]``.

    TARGET is a path for file engines, a server URL for server engines; NAME (fresh
    by default) names the queue / key prefix, so each measurement has its own.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["E", "D", "L"])
    parser.add_argument("engine", choices=list(engines))
    parser.add_argument("target")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--name", default=f"bench-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()
    os.environ[NAME] = args.name
    os.environ[TARGET] = args.target
    os.environ.setdefault(RATE_FILE, "")
    os.environ.setdefault(COUNT, "0")
    return args


def emit(result: dict[str, float]) -> None:
    print(json.dumps(result), flush=True)


def timed(count: int, call: Callable[[], object]) -> float:
    """E: ``count`` calls, one at a time; calls per second."""
    start = time.perf_counter()
    for _ in range(count):
        call()
    return count / (time.perf_counter() - start)


class DrainClock:
    """Counts tasks in the consumer; the count-th writes the first→last rate."""

    def __init__(self) -> None:
        self.count = int(os.environ.get(COUNT, "0") or 0)
        self.path = os.environ.get(RATE_FILE, "")
        self.seen = 0
        self.t0 = 0.0
        self.lock = threading.Lock()

    def tick(self) -> None:
        with self.lock:
            self.seen += 1
            if self.seen == 1:
                self.t0 = time.perf_counter()
            elif self.seen == self.count and self.path:
                rate = (self.count - 1) / (time.perf_counter() - self.t0)
                Path(self.path).write_text(str(rate))


def consumer_env(count: int) -> tuple[dict[str, str], Path]:
    """The environment for a consumer that times a drain of ``count`` tasks."""
    rate_file = Path(tempfile.mkdtemp(prefix="bench-peer-")) / "rate"
    env = {**os.environ, COUNT: str(count), RATE_FILE: str(rate_file)}
    return env, rate_file


def spawn(argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_rate(proc: subprocess.Popen[bytes], rate_file: Path, timeout: float = 600) -> float:
    """Wait for the consumer to write its rate; stop it either way."""
    deadline = time.monotonic() + timeout
    try:
        while not rate_file.exists():
            time.sleep(0.05)
            if proc.poll() is not None:
                raise SystemExit(f"consumer exited early ({proc.returncode})")
            if time.monotonic() > deadline:
                raise SystemExit("consumer did not finish the drain")
        time.sleep(0.05)  # the write is not atomic
        return float(rate_file.read_text())
    finally:
        stop(proc)
        shutil.rmtree(rate_file.parent, ignore_errors=True)


def run_with_worker_process(
    args: argparse.Namespace,
    send_noop: Callable[[], object],
    send_since: Callable[[float], object],
    worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    """E, D or L (``args.kind``) for a peer whose worker is a process of its own,
    started by ``worker(env)``; prints the figures."""
    if args.kind == "E":
        emit({"rate": timed(args.count, send_noop)})
    elif args.kind == "D":
        for _ in range(args.count):
            send_noop()
        env, rate_file = consumer_env(args.count)
        emit({"rate": wait_rate(worker(env), rate_file)})
    else:
        sock = probe_socket()
        proc = worker(dict(os.environ))
        try:
            emit(udp_latency(sock, args.samples, send_since))
        finally:
            stop(proc)


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_ms": statistics.median(values) * 1000,
        "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))] * 1000,
    }


# -- latency over UDP ---------------------------------------------------------------
PROBE_PORT = "BENCH_PROBE_PORT"


def report_latency(sent: float) -> None:
    """In the probe task: send enqueue→start (seconds) to the producer's UDP port."""
    import socket

    delay = time.time() - sent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(repr(delay).encode(), ("127.0.0.1", int(os.environ[PROBE_PORT])))


def probe_socket():  # type: ignore[no-untyped-def]
    """The producer's probe socket; sets ``$BENCH_PROBE_PORT`` for the worker it spawns."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(60)
    os.environ[PROBE_PORT] = str(sock.getsockname()[1])
    return sock


def udp_latency(sock, samples: int, send: Callable[[float], object]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """L: one probe at a time (after a warm-up one), each awaited before the next."""

    def one() -> float:
        send(time.time())
        return float(sock.recv(64))

    one()
    values = [one() for _ in range(samples)]
    sock.close()
    return percentiles(values)


async def drive(
    args: argparse.Namespace,
    enqueue_noop: Callable[[], Awaitable[object]],
    enqueue_since: Callable[[float], Awaitable[object]],
    worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    """E, D or L (``args.kind``) for a peer whose client is async; prints the result.

    ``enqueue_since(sent)`` enqueues the latency probe task; ``worker(env)`` starts
    the peer's worker process with ``env``.
    """
    loop = asyncio.get_running_loop()
    if args.kind == "E":
        start = loop.time()
        for _ in range(args.count):
            await enqueue_noop()
        emit({"rate": args.count / (loop.time() - start)})
    elif args.kind == "D":
        for _ in range(args.count):
            await enqueue_noop()
        env, rate_file = consumer_env(args.count)
        proc = worker(env)
        emit({"rate": await asyncio.to_thread(wait_rate, proc, rate_file)})
    else:
        sock = probe_socket()
        proc = worker(dict(os.environ))
        try:

            def send(sent: float) -> object:
                return asyncio.run_coroutine_threadsafe(enqueue_since(sent), loop).result()  # type: ignore[arg-type]

            emit(await asyncio.to_thread(udp_latency, sock, args.samples, send))
        finally:
            stop(proc)


# -- a fresh PostgreSQL database per measurement --------------------------------------
def fresh_database(dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``dsn``; return its DSN."""
    from urllib.parse import urlsplit, urlunsplit

    statement = f'CREATE DATABASE "{name}"'
    try:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]
    except ImportError:
        import asyncio

        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(create())
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))
