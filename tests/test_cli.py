"""The ``omniq`` command line, run as a user runs it: ``python -m omniq ...`` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omniq import ConfigurationError, OmniQ, TaskFailedError, TaskStatus, __version__
from omniq.cli import describe_error, main

pytestmark = pytest.mark.timeout(60)

RUN_TIMEOUT = 45.0  # seconds for one command; a hang fails the test instead of blocking

SEED_EXAMPLE = """\
from omniq import OmniQ

def my_task(data):
    print(f"Processing: {data}")

with OmniQ() as omniq:
    # Enqueue to default queue
    task_id_default = omniq.enqueue(my_task, "Hello from default queue!")

    # Enqueue to a named queue
    task_id_priority = omniq.enqueue(my_task, "High priority task", queue_name="priority_queue")

    print(f"Task ID (default): {task_id_default}")
    print(f"Task ID (priority): {task_id_priority}")
"""

ENV_NAMES = (
    "OMNIQ_TASK_QUEUE_URL",
    "OMNIQ_RESULT_STORAGE_URL",
    "OMNIQ_EVENT_STORAGE_URL",
    "OMNIQ_QUEUES",
    "OMNIQ_CONCURRENCY",
    "OMNIQ_WORKER_KIND",
    "OMNIQ_BURST",
    "OMNIQ_IMPORT",
    "OMNIQ_LOG_LEVEL",
)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200")
    env.update(extra or {})
    return env


def omniq_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omniq", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def python(cwd: Path, script: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def _database_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"  # an absolute path gives the four-slash form


# -- omniq demo -------------------------------------------------------------------------
def test_demo_runs_the_main_job_and_summarises(tmp_path: Path) -> None:
    for _ in range(2):  # the database is recreated, so a second run reports the same
        result = omniq_cli(tmp_path, "demo", "--tasks", "200")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "200/200 done" in out
        for queue_name in ("emails", "webhooks", "reports", "thumbnails"):
            assert f"  {queue_name} " in out
        assert "  total              200        198       2" in out
        assert "retries: 2 failed attempts were retried" in out
        assert "dead letter: 2 tasks failed for good" in out
        assert "daily digest sent to" in out  # the delayed task ran
        assert "Traceback" not in result.stderr
    assert (tmp_path / "omniq_demo.db").is_file()


def test_demo_with_thread_worker_and_custom_database(tmp_path: Path) -> None:
    result = omniq_cli(
        tmp_path, "demo", "--tasks", "50", "--kind", "thread", "--database", "data/demo.db"
    )
    assert result.returncode == 0, result.stderr
    assert "50/50 done" in result.stdout
    assert "dead letter: 1 tasks failed for good" in result.stdout
    assert (tmp_path / "data" / "demo.db").is_file()


# -- omniq worker: the user's script ---------------------------------------------------
def test_seed_example_then_worker_runs_its_tasks_once(tmp_path: Path) -> None:
    (tmp_path / "seed_example.py").write_text(SEED_EXAMPLE)
    enqueued = python(tmp_path, "seed_example.py")
    assert "Task ID (default): " in enqueued.stdout
    assert "Task ID (priority): " in enqueued.stdout

    first = omniq_cli(tmp_path, "worker", "--burst", "-q", "default,priority_queue")
    assert first.returncode == 0, first.stderr
    assert "Processing: Hello from default queue!" in first.stdout
    assert "Processing: High priority task" in first.stdout
    assert "processed 2, failed 0" in first.stdout

    # Loading the script ran only its definitions: its `with OmniQ()` block enqueued nothing.
    again = omniq_cli(tmp_path, "worker", "--burst", "-q", "default,priority_queue")
    assert again.returncode == 0, again.stderr
    assert "Processing:" not in again.stdout
    assert "processed 0, failed 0" in again.stdout


def test_script_in_a_subdirectory_of_the_worker_directory_runs(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "seed_example.py").write_text(SEED_EXAMPLE)
    python(tmp_path, Path("jobs") / "seed_example.py")
    result = omniq_cli(tmp_path, "worker", "--burst", "-q", "default,priority_queue")
    assert result.returncode == 0, result.stderr
    assert "Processing: High priority task" in result.stdout


def test_script_outside_the_worker_directory_fails_its_task_clearly(tmp_path: Path) -> None:
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    (elsewhere / "job.py").write_text(
        textwrap.dedent("""\
            from omniq import OmniQ

            def my_task(data):
                print(f"Processing: {data}")

            with OmniQ() as omniq:
                print(omniq.enqueue(my_task, "from elsewhere"))
        """)
    )
    task_id = python(app, elsewhere / "job.py").stdout.strip()

    result = omniq_cli(app, "worker", "--burst")
    assert result.returncode == 0, result.stderr
    assert "Processing:" not in result.stdout
    assert "processed 0, failed 1" in result.stdout
    assert "outside this worker's directory" in result.stderr

    with OmniQ(_database_url(app / "omniq.db")) as omniq:
        task = omniq.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.FAILED
        with pytest.raises(TaskFailedError) as failure:
            omniq.get_result(task_id, timeout=5)
    assert failure.value.exc_type == "ImportError"
    assert "start the worker in the script's directory" in failure.value.message


# -- omniq worker: options and environment ---------------------------------------------
def test_worker_help_names_every_env_variable(tmp_path: Path) -> None:
    result = omniq_cli(tmp_path, "worker", "--help")
    assert result.returncode == 0
    for name in ENV_NAMES:
        assert f"(env: {name}" in result.stdout


def test_env_fallbacks_choose_queues_and_burst(tmp_path: Path) -> None:
    (tmp_path / "seed_example.py").write_text(SEED_EXAMPLE)
    python(tmp_path, "seed_example.py")

    only_priority = omniq_cli(tmp_path, "worker", "--burst", env={"OMNIQ_QUEUES": "priority_queue"})
    assert only_priority.returncode == 0, only_priority.stderr
    assert "Processing: High priority task" in only_priority.stdout
    assert "Hello from default queue!" not in only_priority.stdout
    assert "processed 1, failed 0 (queues: priority_queue)" in only_priority.stdout

    # No --burst flag: OMNIQ_BURST makes it return once the queue is empty.
    rest = omniq_cli(
        tmp_path,
        "worker",
        env={"OMNIQ_BURST": "1", "OMNIQ_QUEUES": "default", "OMNIQ_LOG_LEVEL": "warning"},
    )
    assert rest.returncode == 0, rest.stderr
    assert "Processing: Hello from default queue!" in rest.stdout
    assert "worker started" not in rest.stderr  # INFO is below the level from the env


def test_flags_override_env(tmp_path: Path) -> None:
    (tmp_path / "seed_example.py").write_text(SEED_EXAMPLE)
    python(tmp_path, "seed_example.py")
    result = omniq_cli(
        tmp_path,
        "worker",
        "-q",
        "default",
        "-c",
        "2",
        "--kind",
        "thread",
        env={"OMNIQ_QUEUES": "priority_queue", "OMNIQ_BURST": "yes", "OMNIQ_CONCURRENCY": "x"},
    )
    assert result.returncode == 0, result.stderr
    assert "processed 1, failed 0 (queues: default)" in result.stdout
    assert "thread kind, concurrency 2" in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_import_option_imports_modules_from_the_working_directory(tmp_path: Path, how: str) -> None:
    (tmp_path / "tasks.py").write_text(
        'print("tasks module imported")\n\ndef double(x):\n    return 2 * x\n'
    )
    with OmniQ(_database_url(tmp_path / "omniq.db")) as omniq:
        task_id = omniq.enqueue("tasks:double", 21)
    args = ["--import", "tasks"] if how == "flag" else []
    env = {"OMNIQ_IMPORT": "tasks"} if how == "env" else {}
    result = omniq_cli(tmp_path, "worker", "--burst", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tasks module imported\n")
    with OmniQ(_database_url(tmp_path / "omniq.db")) as omniq:
        assert omniq.get_result(task_id, timeout=5) == 42


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_worker_stops_gracefully_on_sigint(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text('def hello():\n    print("task ran", flush=True)\n')
    with OmniQ(_database_url(tmp_path / "omniq.db")) as omniq:
        omniq.enqueue("tasks:hello")
    worker = subprocess.Popen(
        [sys.executable, "-m", "omniq", "worker", "--import", "tasks"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "task ran\n"  # the worker is running its loop
        worker.send_signal(signal.SIGINT)
        out, err = worker.communicate(timeout=RUN_TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "processed 1, failed 0" in out
    assert "Traceback" not in err


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--task-queue", "bogus://nowhere"], {}, "unsupported task queue URL 'bogus://nowhere'"),
        ([], {"OMNIQ_TASK_QUEUE_URL": "bogus://env"}, "'bogus://env'"),
        (["--import", "no_such_module_xyz"], {}, "No module named 'no_such_module_xyz'"),
        (["--log-level", "loud"], {}, "log level 'loud' is unknown"),
        ([], {"OMNIQ_BURST": "maybe"}, "OMNIQ_BURST='maybe' is not a boolean"),
    ],
)
def test_errors_are_one_line_with_exit_code_1(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    result = omniq_cli(tmp_path, "worker", "--burst", *args, env=env)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("omniq: error: ")
    assert expected in lines[0]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = omniq_cli(tmp_path, "worker", "-c", "0")
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr


# -- in process --------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"omniq {__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_describe_error_follows_the_cause_chain() -> None:
    try:
        try:
            raise OSError("disk full")
        except OSError as exc:
            raise ConfigurationError("cannot open\nthe queue") from exc
    except ConfigurationError as exc:
        error = exc
    assert describe_error(error) == "cannot open the queue (caused by OSError: disk full)"
    assert describe_error(ImportError("no luck")) == "ImportError: no luck"
