"""An S3-compatible server for the suite: moto's, on a free loopback port.

moto's in-memory S3 checks ``If-None-Match`` and then stores, without a lock, and its
server handles requests on threads: two concurrent conditional PUTs could both pass
the check. Real S3 decides them atomically, so the fixture runs moto's WSGI app with
requests handled one at a time (connections stay concurrent). Locally a missing
``moto[server]`` skips the S3 tests; in CI it fails them (``unavailable``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ._common import free_port, unavailable, wait_for_port

START_TIMEOUT = 30.0

SERVE = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def serialized(environ, start_response):
    with lock:
        return list(app(environ, start_response))

run_simple("127.0.0.1", int(sys.argv[1]), serialized, threaded=True)
"""


@dataclass
class S3Server:
    """A running moto server: its endpoint and the fsspec options that reach it."""

    endpoint: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def new_bucket(self) -> str:
        """A fresh, empty bucket (moto forgets everything when the session ends)."""
        import s3fs

        bucket = f"omniq-{uuid.uuid4().hex[:16]}"
        s3fs.S3FileSystem(**self.storage_options).call_s3("create_bucket", Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    missing = [m for m in ("moto", "s3fs", "flask") if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"the S3 tests need {', '.join(missing)}: pip install -e '.[test]'")
    port = free_port()
    log = Path(tmp_path_factory.mktemp("moto")) / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        if not wait_for_port(port, START_TIMEOUT) or process.poll() is not None:
            unavailable(f"moto's S3 server did not start:\n{log.read_text()[-2000:]}")
        endpoint = f"http://127.0.0.1:{port}"
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        yield S3Server(endpoint, options)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
