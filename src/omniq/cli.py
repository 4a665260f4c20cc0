"""The ``omniq`` command line: ``omniq worker``, ``omniq demo`` and ``omniq --version``.

Every ``worker`` option falls back to an ``OMNIQ_*`` environment variable, named
in its help. Errors OmniQ raises on purpose (and import errors) end the command
with one line on stderr, ``omniq: error: ...``, and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from ._client import OmniQ
from ._errors import ConfigurationError, OmniQError, TaskFailedError
from ._funcs import import_modules
from ._task import Task
from ._worker import KINDS, Worker

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

_STORAGE_OPTIONS = (  # None falls back to the env variable in omniq._config
    ("--task-queue", "OMNIQ_TASK_QUEUE_URL", "task queue URL; default sqlite:///omniq.db"),
    ("--result-storage", "OMNIQ_RESULT_STORAGE_URL", "result storage URL; default: with the tasks"),
    ("--event-storage", "OMNIQ_EVENT_STORAGE_URL", "event storage URL; default: events off"),
)

Command = Callable[[argparse.Namespace], int]


# -- helpers for options ----------------------------------------------------------------
def _env_help(text: str, env: str) -> str:
    return f"{text} (env: {env})"


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={value!r} is not a boolean; use 1/0, true/false, yes/no")


def _comma_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r} names no queue; write e.g. high,default")
    return names


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigurationError(
            f"log level {value!r} is unknown; use one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=_log_level(level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- omniq worker -------------------------------------------------------------------------
def configure_worker_parser(subparsers: Any) -> None:
    env = os.environ.get
    parser = subparsers.add_parser(
        "worker",
        help="run a worker that executes tasks",
        description="Take tasks from the queues, run them and record their results.",
    )
    for flag, env_name, text in _STORAGE_OPTIONS:
        parser.add_argument(flag, metavar="URL", default=None, help=_env_help(text, env_name))
    parser.add_argument(
        "-q",
        "--queues",
        metavar="A,B",
        type=_comma_list,
        default=env("OMNIQ_QUEUES"),
        help=_env_help(
            "queues to serve, comma separated, strict order; default: default", "OMNIQ_QUEUES"
        ),
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=env("OMNIQ_CONCURRENCY"),
        help=_env_help("tasks run at once; default 8", "OMNIQ_CONCURRENCY"),
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default=env("OMNIQ_WORKER_KIND") or "async",
        help=_env_help("how tasks run; default async", "OMNIQ_WORKER_KIND"),
    )
    parser.add_argument(
        "--burst",
        action=argparse.BooleanOptionalAction,
        default=_env_flag("OMNIQ_BURST"),
        help=_env_help("exit once the queues are empty", "OMNIQ_BURST"),
    )
    parser.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=None,
        help=_env_help(
            "import MODULE first (repeatable; the working directory is importable)",
            "OMNIQ_IMPORT, comma separated",
        ),
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=env("OMNIQ_LOG_LEVEL") or "INFO",
        help=_env_help(f"one of {', '.join(LOG_LEVELS)}; default INFO", "OMNIQ_LOG_LEVEL"),
    )
    parser.set_defaults(command=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """``omniq worker``: run until stopped (SIGINT/SIGTERM), or until empty with ``--burst``."""
    _setup_logging(args.log_level)
    imports = args.imports
    if imports is None:
        imports = [m.strip() for m in os.environ.get("OMNIQ_IMPORT", "").split(",") if m.strip()]
    import_modules(imports)
    with OmniQ(args.task_queue, args.result_storage, args.event_storage) as omniq:
        worker = omniq.worker(queues=args.queues, concurrency=args.concurrency, kind=args.kind)
        queues = ", ".join(worker.queues)
        logging.getLogger("omniq.worker").info(
            "worker started: queues %s, %s kind, concurrency %d%s",
            queues,
            args.kind,
            worker.concurrency,
            ", burst" if args.burst else "",
        )
        worker.run(burst=args.burst)
    sys.stdout.flush()  # what tasks printed comes before the summary
    print(f"omniq worker: processed {worker.processed}, failed {worker.failed} (queues: {queues})")
    sys.stdout.flush()
    return 0


# -- omniq demo ---------------------------------------------------------------------------
DEMO_QUEUES = ("emails", "webhooks", "reports", "thumbnails")
DEMO_RETRY_BACKOFF = 0.2
DEMO_DELAY = 0.5
_REGIONS = ("north", "south", "east", "west", "central")
_SUBJECTS = ("Your invoice", "Welcome aboard", "Weekly newsletter", "Order shipped")


def configure_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="enqueue a realistic batch on a local SQLite file, run a worker, show a summary",
        description=(
            "Enqueue a batch of emails, webhooks, reports and thumbnails on a fresh SQLite "
            "file, run a worker in the background, show progress and a summary of results."
        ),
    )
    parser.add_argument(
        "--database",
        metavar="PATH",
        default="omniq_demo.db",
        help="SQLite file, deleted and recreated at start (default: %(default)s)",
    )
    parser.add_argument(
        "--tasks",
        metavar="N",
        type=_positive_int,
        default=2000,
        help="how many tasks to enqueue, at least 10 (default: %(default)s)",
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="tasks run at once (default: %(default)s)",
    )
    parser.add_argument(
        "--kind", choices=KINDS, default="async", help="worker kind (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=120.0,
        help="give up if the batch is not done by then (default: %(default)s)",
    )
    parser.set_defaults(command=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """``omniq demo``: the main job, end to end, on the embedded default."""
    if args.tasks < 10:
        raise ConfigurationError("omniq demo needs --tasks of at least 10")
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    path = _fresh_database(Path(args.database))
    from .queue.sqlite import SQLiteTaskQueue
    from .results.sqlite import SQLiteResultStorage

    queue = SQLiteTaskQueue(path, queues=list(DEMO_QUEUES))
    results = SQLiteResultStorage(path)
    print(
        f"omniq demo: {args.tasks} tasks on {path} ({args.kind} worker, concurrency "
        f"{args.concurrency})"
    )
    with OmniQ(queue, results, retry_backoff=DEMO_RETRY_BACKOFF) as omniq:
        started = time.monotonic()
        batch = _enqueue_batch(omniq, args.tasks)
        enqueued = time.monotonic() - started
        print(f"enqueued {args.tasks} tasks across {len(DEMO_QUEUES)} queues in {enqueued:.2f} s")
        progress = _Progress(args.tasks, sys.stdout)
        with omniq.worker(
            queues=list(DEMO_QUEUES), concurrency=args.concurrency, kind=args.kind
        ) as worker:
            outcomes = _wait_for_all(omniq, list(batch), progress, args.timeout)
            elapsed = progress.finish(len(outcomes))
        dead = omniq.failed_tasks(limit=args.tasks)
        _print_summary(batch, outcomes, worker, dead, elapsed)
    return 0


def _fresh_database(path: Path) -> Path:
    """Delete the demo database (and SQLite's side files) so every run starts clean."""
    path = path.resolve()
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _enqueue_batch(omniq: OmniQ, total: int) -> dict[str, str]:
    """Enqueue ``total`` tasks; returns task id -> queue name, in enqueue order."""
    from . import _demo

    rng = random.Random(42)
    failing = max(1, total // 100)
    rest = total - 2 - failing  # two single enqueues below
    emails, reports = rest * 3 // 10, rest // 5
    thumbnails = rest - emails - reports
    batch: dict[str, str] = {}

    def add(queue_name: str, ids: Sequence[str]) -> None:
        batch.update(dict.fromkeys(ids, queue_name))

    reset = omniq.enqueue(
        _demo.send_email, "admin@example.com", "Password reset", queue_name="emails", priority=20
    )
    add("emails", [reset])
    calls = [(f"user{i}@example.com", _SUBJECTS[i % len(_SUBJECTS)]) for i in range(emails)]
    add("emails", omniq.enqueue_many(_demo.send_email, calls, queue_name="emails", priority=10))
    hooks = [(f"https://hooks.example.com/{i}",) for i in range(failing)]
    add(
        "webhooks",
        omniq.enqueue_many(
            _demo.call_webhook, hooks, queue_name="webhooks", priority=5, max_retries=1
        ),
    )
    figures = [
        (_REGIONS[i % len(_REGIONS)], [round(rng.uniform(10, 5000), 2) for _ in range(50)])
        for i in range(reports)
    ]
    add(
        "reports", omniq.enqueue_many(_demo.build_report, figures, queue_name="reports", priority=5)
    )
    digest = omniq.enqueue(_demo.daily_digest, emails, queue_name="reports", delay=DEMO_DELAY)
    add("reports", [digest])
    images = [(i, rng.choice((64, 128, 256))) for i in range(thumbnails)]
    add("thumbnails", omniq.enqueue_many(_demo.make_thumbnail, images, queue_name="thumbnails"))
    return batch


class _Progress:
    """done/total and rate: one ``\\r``-rewritten line on a TTY, a line a second otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.1 if self.tty else 1.0
        self.started = time.monotonic()
        self._last = self.started
        self._width = 0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        filled = 30 * done // self.total
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} done "
            f"({100 * done // self.total}%), {rate:,.0f} tasks/s, {elapsed:.1f} s"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, done: int) -> float:
        """Show the final state; returns the seconds since the start."""
        self.update(done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return time.monotonic() - self.started


def _wait_for_all(
    omniq: OmniQ, task_ids: list[str], progress: _Progress, timeout: float
) -> dict[str, Any]:
    """Wait for every task's outcome: its value, or the ``TaskFailedError`` it ended with.

    A task not done yet goes to the back of the line (it may be delayed or retrying).
    """
    deadline = time.monotonic() + timeout
    pending = deque(task_ids)
    outcomes: dict[str, Any] = {}
    while pending:
        task_id = pending[0]
        try:
            outcomes[task_id] = omniq.get_result(task_id, timeout=0.05)
        except TaskFailedError as exc:
            outcomes[task_id] = exc
        except TimeoutError:
            if time.monotonic() > deadline:
                raise OmniQError(
                    f"the demo did not finish within {timeout:g} s: {len(pending)} tasks "
                    "still pending"
                ) from None
            pending.rotate(-1)
            progress.update(len(outcomes))
            continue
        pending.popleft()
        progress.update(len(outcomes))
    return outcomes


def _print_summary(
    batch: dict[str, str],
    outcomes: dict[str, Any],
    worker: Worker,
    dead: list[Task],
    elapsed: float,
) -> None:
    print("\nSummary")
    print(f"  {'queue':<12}{'enqueued':>10}{'succeeded':>11}{'failed':>8}")
    totals = [0, 0, 0]
    for queue_name in DEMO_QUEUES:
        ids = [task_id for task_id, name in batch.items() if name == queue_name]
        failed = sum(isinstance(outcomes[task_id], TaskFailedError) for task_id in ids)
        row = [len(ids), len(ids) - failed, failed]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        print(f"  {queue_name:<12}{row[0]:>10}{row[1]:>11}{row[2]:>8}")
    print(f"  {'total':<12}{totals[0]:>10}{totals[1]:>11}{totals[2]:>8}")
    print(f"  retries: {worker.retried} failed attempts were retried")
    print(f"  dead letter: {len(dead)} tasks failed for good (omniq.failed_tasks())")
    rate = len(outcomes) / elapsed if elapsed > 0 else 0.0
    print(f"  throughput: {len(outcomes)} tasks in {elapsed:.2f} s = {rate:,.0f} tasks/s")
    _print_samples(batch, outcomes, dead)
    sys.stdout.flush()


def _print_samples(batch: dict[str, str], outcomes: dict[str, Any], dead: list[Task]) -> None:
    """The first result of each queue, the delayed task's, and one dead-letter task."""
    print("\nSample results (omniq.get_result)")
    samples: dict[str, str] = {}
    for task_id, queue_name in batch.items():
        if not isinstance(outcomes[task_id], TaskFailedError):
            samples.setdefault(queue_name, task_id)
    samples["delayed"] = next(reversed([t for t, q in batch.items() if q == "reports"]))
    for label, task_id in samples.items():
        print(f"  {label:<11} {_shorten(repr(outcomes[task_id]))}")
    if dead:
        task = dead[0]
        print("\nDead letter sample (omniq.failed_tasks())")
        print(f"  {task.func} {task.args!r}, {task.attempts} attempts")
        print(f"  {_shorten(task.error or '')}")


def _shorten(text: str, width: int = 88) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- entry point --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniq", description="OmniQ: a Python task queue with one API over many backends."
    )
    parser.add_argument("--version", action="version", version=f"omniq {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    configure_worker_parser(subparsers)
    configure_demo_parser(subparsers)
    return parser


def describe_error(exc: BaseException) -> str:
    """One line: the error's message and its cause chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current) or type(current).__name__
        if current is not exc or not isinstance(current, OmniQError):
            text = f"{type(current).__name__}: {current}" if str(current) else text
        parts.append(" ".join(text.split()))
        cause = current.__cause__
        if cause is None and not current.__suppress_context__:
            cause = current.__context__
        current = cause
    return " (caused by ".join(parts) + ")" * (len(parts) - 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``omniq`` command line; returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command: Command = args.command
        return command(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (OmniQError, ImportError) as exc:
        sys.stdout.flush()
        print(f"omniq: error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("omniq: interrupted", file=sys.stderr)
        return 130
