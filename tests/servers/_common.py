"""Helpers for the server fixtures: free ports, readiness, skip-or-fail."""

from __future__ import annotations

import os
import socket
import time
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(what: str) -> NoReturn:
    """Fail in CI, skip elsewhere: a missing server never passes CI silently."""
    if in_ci():
        pytest.fail(f"{what} (CI must run every backend)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False
