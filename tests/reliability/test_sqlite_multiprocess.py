"""Many producer and worker processes on one SQLite file: every task runs exactly once.

Producers enqueue (single calls and batches, mixed priorities) while, or
before, three worker processes drain the same file. Each task run appends its
key to a log file of the process that ran it, so executions are counted
outside the queue; the queue's own record (status, attempts, result) must
agree with that count.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from omniq import OmniQ, TaskStatus

from ._procs import Child, Processes, query, read_lines, wait_until

PRODUCERS = 2
TASKS_PER_PRODUCER = 2600  # half via enqueue_many, half one enqueue at a time
BATCH = 100
WORKERS = 3
WORKER_CONCURRENCY = 4
TOTAL = PRODUCERS * TASKS_PER_PRODUCER

RTASKS = '''
    """Task functions of the reliability tests (imported by worker processes as ``rtasks``)."""

    import os
    import threading

    _lock = threading.Lock()
    _RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")


    def record(key):
        """Note this execution in this process's log, then return the key."""
        path = os.path.join(_RUNS, f"{os.getpid()}.log")
        with _lock, open(path, "a") as log:
            log.write(key + "\\n")
        return key
'''

PRODUCER = """
    import sys
    from pathlib import Path

    import rtasks
    from omniq import OmniQ

    database, name, total, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    lines = []
    with OmniQ(task_queue=f"sqlite:///{database}") as omniq:
        n = 0
        while n < total:
            keys = [f"{name}-{i}" for i in range(n, min(n + batch, total))]
            if (n // batch) % 2 == 0:
                ids = omniq.enqueue_many(rtasks.record, [(key,) for key in keys])
            else:
                ids = [omniq.enqueue(rtasks.record, k, priority=i % 3) for i, k in enumerate(keys)]
            lines += [f"{key} {task_id}" for key, task_id in zip(keys, ids)]
            n += len(keys)
    Path(f"{name}.ids").write_text("\\n".join(lines) + "\\n")
"""

WORKER = """
    import signal
    import sys

    from omniq import OmniQ

    database, mode, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with OmniQ(task_queue=f"sqlite:///{database}") as omniq:
        worker = omniq.worker(concurrency=concurrency)
        # Graceful stop even if SIGTERM comes before run() installs its own handler.
        signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop())
        print("ready", flush=True)
        worker.run(burst=mode == "burst")
        print(f"processed={worker.processed} failed={worker.failed}", flush=True)
"""


def _write_scripts(procs: Processes) -> None:
    procs.write("rtasks.py", RTASKS)
    procs.write("producer.py", PRODUCER)
    procs.write("worker.py", WORKER)
    (procs.directory / "runs").mkdir()


def _start_producers(procs: Processes, database: Path) -> list[Child]:
    return [
        procs.start(
            "producer.py", database, f"p{i}", TASKS_PER_PRODUCER, BATCH, name=f"producer-{i}"
        )
        for i in range(PRODUCERS)
    ]


def _start_workers(procs: Processes, database: Path, mode: str) -> list[Child]:
    workers = [
        procs.start("worker.py", database, mode, WORKER_CONCURRENCY, name=f"worker-{i}")
        for i in range(WORKERS)
    ]
    for worker in workers:
        wait_until(
            lambda w=worker: "ready" in w.stdout(), f"{worker.name} to start", alive=(worker,)
        )
    return workers


def _assert_clean_exit(child: Child, returncode: int) -> None:
    assert returncode == 0, child.describe()
    assert child.stderr() == "", child.describe()


def _succeeded(database: Path) -> int:
    return int(query(database, "SELECT count(*) FROM omniq_tasks WHERE state = 'succeeded'")[0][0])


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["continuous", "burst"])
def test_producers_and_workers_run_every_task_exactly_once(
    procs: Processes, tmp_path: Path, mode: str
) -> None:
    database = tmp_path / "shared.db"
    _write_scripts(procs)
    # Create the file (schema, WAL) before the children race to: a fresh file opened by
    # several connections at once can fail (see test_sync_facade's first-use test).
    with OmniQ(task_queue=f"sqlite:///{database}") as omniq:
        assert omniq.size() == 0

    if mode == "continuous":
        # Workers wait on the empty file; producers write while they drain.
        workers = _start_workers(procs, database, mode)
        for producer in _start_producers(procs, database):
            _assert_clean_exit(producer, producer.wait())
        wait_until(
            lambda: _succeeded(database) == TOTAL, "every task to succeed", alive=tuple(workers)
        )
        exits = [worker.terminate() for worker in workers]
    else:
        # Producers fill the file first; burst workers return once it is empty.
        for producer in _start_producers(procs, database):
            _assert_clean_exit(producer, producer.wait())
        workers = _start_workers(procs, database, mode)
        exits = [worker.wait() for worker in workers]
    for worker, returncode in zip(workers, exits, strict=True):
        _assert_clean_exit(worker, returncode)

    enqueued = dict(line.split() for line in read_lines(tmp_path, "*.ids"))
    assert len(enqueued) == TOTAL
    assert len(set(enqueued.values())) == TOTAL, "two tasks were given the same id"

    # Executions, counted outside the queue: each key exactly once.
    runs = Counter(read_lines(tmp_path / "runs", "*.log"))
    assert {key: n for key, n in runs.items() if n != 1} == {}, "tasks ran more than once"
    assert set(enqueued) - set(runs) == set(), "tasks never ran"
    assert set(runs) == set(enqueued)
    processed = sum(int(w.stdout().split("processed=")[1].split()[0]) for w in workers)
    assert processed == TOTAL
    ran_in = list((tmp_path / "runs").glob("*.log"))
    assert len(ran_in) >= 2, "the work was not shared between worker processes"

    # The queue's own record agrees: nothing lost, nothing left, nothing redelivered.
    assert dict(query(database, "SELECT state, count(*) FROM omniq_tasks GROUP BY state")) == {
        "succeeded": TOTAL
    }
    with OmniQ(task_queue=f"sqlite:///{database}") as omniq:
        assert omniq.size() == 0
        assert omniq.failed_tasks() == []
        for key, task_id in enqueued.items():
            task = omniq.get_task(task_id)
            assert task is not None, f"task {task_id} ({key}) is unknown to the queue"
            assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1), (key, task)
            assert omniq.get_result(task_id, timeout=5) == key
