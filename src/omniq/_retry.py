"""Retry delays: exponential backoff with jitter."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before delivery number ``attempt + 1``.

    Exponential (``base * 2**(attempt-1)``, capped at ``cap``) with "equal
    jitter": half the delay is kept and half is random, so retries of tasks that
    failed together spread out without ever retrying immediately.
    """
    delay: float = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)
