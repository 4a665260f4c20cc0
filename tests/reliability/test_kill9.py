"""kill -9 a SQLite worker mid-task: its lease runs out and another worker finishes the task.

The blocking task writes a "started" marker and then waits on an event nobody
sets, so only SIGKILL ends that first run; run again (the marker exists) it
returns at once. Every run appends ``pid start-time`` to a log, so the tests
count executions outside the queue.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from omniq import OmniQ, TaskStatus
from omniq.queue import SQLiteTaskQueue

from ._procs import Child, Processes, query, read_lines, wait_until

LEASE = 1.0

KTASKS = '''
    """Task functions of the kill -9 tests (imported by worker processes as ``ktasks``)."""

    import os
    import threading
    import time
    from pathlib import Path


    def _note(log):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {time.time()!r}\\n")


    def block_once(marker, log):
        """First run: mark "started" and block until killed. Any later run: return."""
        _note(log)
        if os.path.exists(marker):
            return "completed"
        Path(marker).write_text(str(os.getpid()))
        threading.Event().wait()  # never set


    def echo(value, log):
        _note(log)
        return value
'''

WORKER = """
    import signal
    import sys

    from omniq import OmniQ
    from omniq.queue import SQLiteTaskQueue

    database, lease, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    with OmniQ(task_queue=SQLiteTaskQueue(database, lease_seconds=lease)) as omniq:
        worker = omniq.worker(concurrency=1, prefetch=1)
        signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop())
        print("ready", flush=True)
        worker.run(burst=mode == "burst")
        print(f"processed={worker.processed} failed={worker.failed}", flush=True)
"""


def _runs(log: Path) -> list[tuple[int, float]]:
    if not log.exists():
        return []
    return [
        (int(pid), float(at))
        for pid, at in (line.split() for line in read_lines(log.parent, log.name))
    ]


def _kill_mid_task(
    procs: Processes, omniq: OmniQ, database: Path
) -> tuple[str, str, Child, Path, Path]:
    """Enqueue a blocking task and a bystander, start a worker, kill -9 it mid-task.

    The worker (concurrency 1, prefetch 1) claims both in one batch: it runs the
    blocking task (higher priority) and holds the bystander unstarted.
    """
    procs.write("ktasks.py", KTASKS)
    procs.write("worker.py", WORKER)
    marker, block_log, echo_log = (
        database.parent / "started",
        database.parent / "block.log",
        database.parent / "echo.log",
    )
    blocked = omniq.enqueue("ktasks:block_once", str(marker), str(block_log), priority=1)
    bystander = omniq.enqueue("ktasks:echo", "still here", str(echo_log))

    first = procs.start("worker.py", database, LEASE, "continuous", name="worker-killed")
    wait_until(marker.exists, "the task to start", alive=(first,))
    wait_until(
        lambda: omniq.get_task(bystander).status is TaskStatus.RUNNING,
        "the worker to hold the bystander",
        alive=(first,),
    )
    task = omniq.get_task(blocked)
    assert task is not None
    assert (task.status, task.attempts) == (TaskStatus.RUNNING, 1)

    os.kill(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    return blocked, bystander, first, block_log, echo_log


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_worker_task_is_delivered_again_and_completes(
    procs: Processes, tmp_path: Path
) -> None:
    database = tmp_path / "tasks.db"
    with OmniQ(task_queue=SQLiteTaskQueue(database, lease_seconds=LEASE)) as omniq:
        blocked, bystander, first, block_log, echo_log = _kill_mid_task(procs, omniq, database)

        # Nobody renews the dead worker's leases; nothing moved yet.
        for task_id in (blocked, bystander):
            task = omniq.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.RUNNING
        (lease_end,) = query(database, "SELECT max(lease_until) FROM omniq_tasks")[0]
        assert isinstance(lease_end, float)

        # A second worker, started at once: it gets the tasks when the lease runs out.
        second = procs.start("worker.py", database, LEASE, "continuous", name="worker-second")
        assert omniq.get_result(blocked, timeout=30) == "completed"
        assert omniq.get_result(bystander, timeout=30) == "still here"

        # The worker stores a result before it acks the task: wait for the ack too.
        for task_id in (blocked, bystander):
            wait_until(
                lambda t=task_id: omniq.get_task(t).status is not TaskStatus.RUNNING,
                "the ack",
                alive=(second,),
            )
            task = omniq.get_task(task_id)
            assert task is not None
            assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 2), task
        assert omniq.size() == 0
        assert omniq.failed_tasks() == []

        assert second.terminate() == 0, second.describe()
        assert second.stderr() == "", second.describe()
        assert "processed=2 failed=0" in second.stdout(), second.describe()

    # Executions: the blocking task twice (killed, then completed by the second
    # worker only after the dead one's lease ended); the bystander, never started
    # by the killed worker, exactly once.
    block_runs = _runs(block_log)
    assert [pid for pid, _ in block_runs] == [first.pid, second.pid]
    assert block_runs[1][1] >= lease_end, "run again while the first lease was still alive"
    echo_runs = _runs(echo_log)
    assert [pid for pid, _ in echo_runs] == [second.pid]
    assert echo_runs[0][1] >= lease_end


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_burst_worker_recovers_expired_lease(procs: Processes, tmp_path: Path) -> None:
    """A burst worker started after a dead worker's lease ran out must run its tasks."""
    database = tmp_path / "tasks.db"
    with OmniQ(task_queue=SQLiteTaskQueue(database, lease_seconds=LEASE)) as omniq:
        blocked, bystander, _, _, _ = _kill_mid_task(procs, omniq, database)
        (lease_end,) = query(database, "SELECT max(lease_until) FROM omniq_tasks")[0]
        assert isinstance(lease_end, float)
        wait_until(lambda: time.time() > lease_end, "the dead worker's lease to run out")

        second = procs.start("worker.py", database, LEASE, "burst", name="worker-burst")
        assert second.wait() == 0, second.describe()
        for task_id in (blocked, bystander):
            task = omniq.get_task(task_id)
            assert task is not None
            assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 2), task
        assert omniq.get_result(blocked, timeout=0) == "completed"
