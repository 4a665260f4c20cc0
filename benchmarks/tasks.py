"""Task functions the benchmark's workers import by path."""

from __future__ import annotations

import time


def noop() -> None:
    return None


def since(sent: float) -> float:
    """Enqueue→start latency: the worker calls this as the task starts."""
    return time.time() - sent
