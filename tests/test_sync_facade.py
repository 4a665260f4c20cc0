"""The sync ``OmniQ`` facade: from scripts, many threads, a running event loop and inside tasks.

Every test runs on the in-process queue (``memory://``) and on the embedded
default (no URL: ``./omniq.db``, the working directory being ``tmp_path``).
Task functions live at module level: in-process workers import them as
``tests.test_sync_facade:<name>``, the same module object the test uses.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omniq import OmniQ, TaskFailedError, TaskStatus

SRC = Path(__file__).resolve().parents[1] / "src"
WAIT = 30.0  # get_result timeout: a bound on "soon", never reached when things work
BACKENDS = ["memory", "sqlite"]
STATUSES = {status.value for status in TaskStatus}

MakeOmniQ = Callable[..., OmniQ]

# -- task functions -------------------------------------------------------------------

#: Instances the task functions below reach: "outer" runs them, "inner" is another one.
INSTANCES: dict[str, OmniQ] = {}


def add(a: int, b: int) -> int:
    return a + b


def explode(message: str) -> None:
    raise ValueError(message)


def enqueue_elsewhere(n: int) -> list[Any]:
    """A sync task (run in a worker thread) using a different instance's sync API."""
    inner = INSTANCES["inner"]
    task_id = inner.enqueue(add, n, 1)
    task = inner.get_task(task_id)
    assert task is not None
    return [task_id, task.status.value, inner.size()]


async def enqueue_elsewhere_async(n: int) -> list[Any]:
    """The same from a coroutine, i.e. on the running instance's bridge loop."""
    return enqueue_elsewhere(n)


def enqueue_on_own_instance(n: int) -> list[Any]:
    """A sync task using the sync API of the very instance whose worker runs it."""
    outer = INSTANCES["outer"]
    task_id = outer.enqueue(add, n, 2)
    task = outer.get_task(task_id)
    assert task is not None
    return [task_id, task.status.value]


async def size_of_own_instance_async() -> int:
    """A coroutine task calling its own instance's sync API: that would block its loop."""
    return INSTANCES["outer"].size()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_omniq(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MakeOmniQ]:
    """``make()`` is the backend's default instance; ``make("other.db")`` another store."""
    for var in ("OMNIQ_TASK_QUEUE_URL", "OMNIQ_RESULT_STORAGE_URL", "OMNIQ_EVENT_STORAGE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    made: list[OmniQ] = []

    def make(database: str | None = None) -> OmniQ:
        if backend == "memory":
            omniq = OmniQ(task_queue="memory://")
        elif database is None:
            omniq = OmniQ()  # the embedded default: ./omniq.db
        else:
            omniq = OmniQ(task_queue=f"sqlite:///{database}")
        made.append(omniq)
        return omniq

    yield make
    INSTANCES.clear()
    for omniq in made:
        omniq.close()


def _bridge_threads() -> int:
    return sum(thread.name == "omniq-bridge" for thread in threading.enumerate())


# -- (a) a plain script ----------------------------------------------------------------------

SCRIPT = """
    import sys

    from omniq import OmniQ


    def shout(text):
        return text.upper()


    with OmniQ(*sys.argv[1:]) as omniq:
        task_id = omniq.enqueue(shout, "hello")
        batch = omniq.enqueue_many(shout, [("a",), ("b",)])
        omniq.worker().run(burst=True)
        print(*(omniq.get_result(i, timeout=10) for i in [task_id, *batch]))
"""

UNCLOSED_SCRIPT = """
    import sys

    from omniq import OmniQ


    def shout(text):
        return text.upper()


    omniq = OmniQ(*sys.argv[1:])
    task_id = omniq.enqueue(shout, "never closed")
    omniq.worker().run(burst=True)
    print(omniq.get_result(task_id, timeout=10))
"""

PRODUCER_SCRIPT = """
    from omniq import OmniQ


    def shout(text):
        return text.upper()


    with OmniQ() as omniq:
        print(omniq.enqueue(shout, "from another process"))
"""

WORKER_SCRIPT = """
    from omniq import OmniQ

    with OmniQ() as omniq:
        worker = omniq.worker()
        worker.run(burst=True)
        print(worker.processed)
"""


def _run_script(directory: Path, name: str, source: str, *args: str) -> str:
    (directory / name).write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, name, *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


@pytest.mark.parametrize("script", [SCRIPT, UNCLOSED_SCRIPT], ids=["with", "unclosed"])
def test_plain_script(backend: str, tmp_path: Path, script: str) -> None:
    args = ["memory://"] if backend == "memory" else []
    out = _run_script(tmp_path, "app.py", script, *args)
    expected = "HELLO A B" if script is SCRIPT else "NEVER CLOSED"
    assert out.split("\n") == [expected, ""]
    assert (tmp_path / "omniq.db").exists() is (backend == "sqlite")


def test_script_tasks_run_by_a_worker_process(tmp_path: Path) -> None:
    """A function of a script with no main guard, run by another process: enqueued once."""
    task_id = _run_script(tmp_path, "producer.py", PRODUCER_SCRIPT).strip()
    assert _run_script(tmp_path, "worker.py", WORKER_SCRIPT).strip() == "1"
    with OmniQ(task_queue=f"sqlite:///{tmp_path / 'omniq.db'}") as omniq:
        assert omniq.get_result(task_id, timeout=WAIT) == "FROM ANOTHER PROCESS"
        assert omniq.size() == 0


# -- (b) many threads ------------------------------------------------------------------------

THREADS = 8
PER_THREAD = 200


def test_many_threads_enqueue_then_one_worker_drains(make_omniq: MakeOmniQ) -> None:
    omniq = make_omniq()
    assert omniq.size() == 0  # creates the file first: see test_first_use_from_many_threads
    start = threading.Barrier(THREADS)
    ids: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            start.wait()
            mine = [omniq.enqueue(add, t * 1000, i) for i in range(PER_THREAD // 2)]
            mine += omniq.enqueue_many(
                add, [(t * 1000, i) for i in range(PER_THREAD // 2, PER_THREAD)]
            )
            ids[t] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    all_ids = [task_id for t in range(THREADS) for task_id in ids[t]]
    assert len(set(all_ids)) == THREADS * PER_THREAD
    assert omniq.size() == THREADS * PER_THREAD

    worker = omniq.worker(concurrency=8)
    worker.run(burst=True)
    assert (worker.processed, worker.failed) == (THREADS * PER_THREAD, 0)
    assert omniq.size() == 0
    for t in range(THREADS):
        assert [omniq.get_result(i, timeout=WAIT) for i in ids[t]] == [
            t * 1000 + i for i in range(PER_THREAD)
        ]


def test_many_threads_enqueue_and_wait_while_a_worker_runs(make_omniq: MakeOmniQ) -> None:
    """Blocking calls from many threads at once share the one bridge loop."""
    omniq = make_omniq()
    assert omniq.size() == 0  # creates the file first: see test_first_use_from_many_threads
    start = threading.Barrier(THREADS)
    results: dict[int, list[int]] = {}
    ids: list[str] = []
    errors: list[BaseException] = []

    def round_trips(t: int) -> None:
        try:
            start.wait()
            got = []
            for i in range(25):
                task_id = omniq.enqueue(add, t, i)
                got.append(omniq.get_result(task_id, timeout=WAIT))
                task = omniq.get_task(task_id)
                assert task is not None and task.status in (
                    TaskStatus.RUNNING,
                    TaskStatus.SUCCEEDED,
                )
                ids.append(task_id)
            results[t] = got
        except BaseException as exc:
            errors.append(exc)

    with omniq.worker(concurrency=4):
        threads = [threading.Thread(target=round_trips, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert results == {t: [t + i for i in range(25)] for t in range(THREADS)}
    assert {omniq.get_task(task_id).status for task_id in ids} == {TaskStatus.SUCCEEDED}


FIRST_USE_TRIALS = 200


@pytest.mark.timeout(120)
def test_first_use_from_many_threads(tmp_path: Path) -> None:
    """Threads that all enqueue first on a brand-new SQLite file: none may fail.

    The race is narrow, so it is tried on many fresh files; it stops at the first failure.
    """
    for trial in range(FIRST_USE_TRIALS):
        database = tmp_path / f"fresh-{trial}.db"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def first_use(omniq: OmniQ, start: threading.Barrier, errors: list[BaseException]) -> None:
            start.wait()
            try:
                omniq.enqueue(add, 1, 2)
            except BaseException as exc:
                errors.append(exc)

        with OmniQ(task_queue=f"sqlite:///{database}") as omniq:
            threads = [
                threading.Thread(target=first_use, args=(omniq, start, errors)) for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == [], f"trial {trial}: {errors[0]!r}"
            assert omniq.size() == 4


def _open_files_under(directory: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(directory))
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_short_lived_threads_do_not_accumulate_sqlite_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with OmniQ() as omniq:
        omniq.enqueue(add, 0, 0)
        assert omniq.size() == 1  # the bridge thread's connection is open too: a live thread
        baseline = _open_files_under(tmp_path)
        for i in range(50):  # e.g. a threaded web server: one thread per request
            thread = threading.Thread(target=omniq.enqueue, args=(add, i, i))
            thread.start()
            thread.join()
        assert omniq.size() == 51
        # At most the last request thread's connection (db, -wal, -shm) is still open.
        assert _open_files_under(tmp_path) <= baseline + 3


def test_default_database_is_where_omniq_was_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("OMNIQ_TASK_QUEUE_URL", "OMNIQ_RESULT_STORAGE_URL", "OMNIQ_EVENT_STORAGE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "app").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    with OmniQ() as omniq:
        monkeypatch.chdir(tmp_path / "elsewhere")
        omniq.enqueue(add, 1, 2)
        omniq.worker().run(burst=True)
    assert (tmp_path / "app" / "omniq.db").exists()
    assert not (tmp_path / "elsewhere" / "omniq.db").exists()


# -- (c) inside a running event loop ---------------------------------------------------------


async def test_sync_api_from_a_coroutine(make_omniq: MakeOmniQ) -> None:
    """The caller's loop is blocked while a call runs, never deadlocked."""
    omniq = make_omniq()
    first = omniq.enqueue(add, 1, 2)
    with omniq.worker():
        assert omniq.get_result(first, timeout=WAIT) == 3
        second = omniq.enqueue(add, 3, 4)
        assert omniq.get_result(second, timeout=WAIT) == 7
    task = omniq.get_task(second)
    assert task is not None and task.status is TaskStatus.SUCCEEDED
    omniq.enqueue(add, 5, 6)
    omniq.worker().run(burst=True)
    assert omniq.size() == 0
    await asyncio.sleep(0)  # the test's own loop still runs


# -- (d) inside a task ------------------------------------------------------------------------


@pytest.mark.parametrize("func", [enqueue_elsewhere, enqueue_elsewhere_async])
def test_task_uses_another_instance(make_omniq: MakeOmniQ, func: Callable[..., Any]) -> None:
    """No deadlock: each instance has its own bridge, so a task may block on another's."""
    outer, inner = make_omniq(), make_omniq("inner.db")
    INSTANCES.update(outer=outer, inner=inner)
    task_id = outer.enqueue(func, 41)
    outer.worker().run(burst=True)
    inner_id, status, size = outer.get_result(task_id, timeout=WAIT)
    assert (status, size) == ("pending", 1)
    inner.worker().run(burst=True)
    assert inner.get_result(inner_id, timeout=WAIT) == 42


def test_sync_task_uses_its_own_instance(make_omniq: MakeOmniQ) -> None:
    """A sync task runs in a worker thread, so even its own instance's bridge is free."""
    outer = make_omniq()
    INSTANCES["outer"] = outer
    task_id = outer.enqueue(enqueue_on_own_instance, 40)
    outer.worker().run(burst=True)  # runs the child too: it is pending when the parent ends
    child_id, status = outer.get_result(task_id, timeout=WAIT)
    assert status in STATUSES
    assert outer.get_result(child_id, timeout=WAIT) == 42


def test_coroutine_task_calling_its_own_sync_api_fails_clearly(make_omniq: MakeOmniQ) -> None:
    """Found: refused with a RuntimeError pointing at AsyncOmniQ instead of deadlocking."""
    outer = make_omniq()
    INSTANCES["outer"] = outer
    task_id = outer.enqueue(size_of_own_instance_async)
    outer.worker().run(burst=True)
    with pytest.raises(TaskFailedError) as failure:
        outer.get_result(task_id, timeout=WAIT)
    assert failure.value.exc_type == "RuntimeError"
    assert "AsyncOmniQ" in failure.value.message


# -- (e) failures and timeouts ------------------------------------------------------------


def test_get_result_raises_the_remote_failure(make_omniq: MakeOmniQ) -> None:
    omniq = make_omniq()
    task_id = omniq.enqueue(explode, "bad input")
    worker = omniq.worker()
    worker.run(burst=True)
    assert (worker.processed, worker.failed) == (0, 1)
    with pytest.raises(TaskFailedError) as failure:
        omniq.get_result(task_id, timeout=WAIT)
    error = failure.value
    assert (error.task_id, error.exc_type, error.message) == (task_id, "ValueError", "bad input")
    assert error.traceback is not None
    assert error.traceback.startswith("Traceback (most recent call last):")
    assert "in explode" in error.traceback
    assert error.traceback.rstrip().endswith("ValueError: bad input")
    task = omniq.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert [t.id for t in omniq.failed_tasks()] == [task_id]


def test_get_result_of_an_unknown_task_times_out(make_omniq: MakeOmniQ) -> None:
    omniq = make_omniq()
    with pytest.raises(TimeoutError):
        omniq.get_result("no-such-task", timeout=0.1)
    assert omniq.get_task("no-such-task") is None


# -- (f) one bridge thread per instance -------------------------------------------------------


def test_one_bridge_thread_per_instance(make_omniq: MakeOmniQ) -> None:
    before = _bridge_threads()
    omniq = make_omniq()
    assert _bridge_threads() == before  # started on first use, not by the constructor
    assert omniq.size() == 0  # creates the file first: see test_first_use_from_many_threads
    assert _bridge_threads() == before + 1

    def calls() -> None:
        for i in range(20):
            task_id = omniq.enqueue(add, i, i)
            omniq.get_task(task_id)
            omniq.size()

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    omniq.worker().run(burst=True)
    with omniq.worker():
        assert omniq.get_result(omniq.enqueue(add, 1, 1), timeout=WAIT) == 2
    assert _bridge_threads() == before + 1

    other = make_omniq("other.db")
    other.size()
    assert _bridge_threads() == before + 2
    other.close()
    omniq.close()
    assert _bridge_threads() == before


def test_tasks_without_options_are_each_their_own() -> None:
    """``enqueue(f, *args)`` copies a template validated once per function and settings."""
    with OmniQ("memory://") as omniq:
        first, second = omniq.build_task(add, 1, 2), omniq.build_task(add, 3, 4)
        assert first.id != second.id and (first.args, second.args) == ((1, 2), (3, 4))
        assert first.kwargs is not second.kwargs
        assert second.enqueued_at >= first.enqueued_at and second.due_at == second.enqueued_at
        omniq.settings.max_retries = 7
        assert omniq.build_task(add, 5, 6).max_retries == 7
        assert omniq.build_task("tests.test_sync_facade:add", 1, 1).func == first.func
