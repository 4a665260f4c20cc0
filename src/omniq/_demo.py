"""Task functions for ``omniq demo``: small, quick, but real work.

They live in a module (not in the CLI's ``__main__``) so a worker imports them
as ``omniq._demo:<name>``, exactly as it would a user's ``tasks.py``.
"""

from __future__ import annotations

import hashlib
import statistics
from typing import Any


def send_email(to: str, subject: str) -> dict[str, str]:
    """Render an email and give it a message id derived from its content."""
    body = f"To: {to}\nSubject: {subject}\n\nHello {to.split('@')[0].title()},\n"
    message_id = hashlib.sha256(body.encode()).hexdigest()[:16]
    return {"to": to, "subject": subject, "message_id": f"<{message_id}@omniq.demo>"}


def build_report(region: str, values: list[float]) -> dict[str, Any]:
    """Summarise a region's figures."""
    return {
        "region": region,
        "count": len(values),
        "total": round(sum(values), 2),
        "mean": round(statistics.fmean(values), 2) if values else 0.0,
        "line": f"{region:<8} n={len(values):>3} total={sum(values):>10,.2f}",
    }


def make_thumbnail(image_id: int, size: int) -> dict[str, Any]:
    """Stand-in for resizing: digest a deterministic "image" of ``size`` x ``size`` bytes."""
    row = bytes((image_id + i) % 256 for i in range(size))
    digest = hashlib.blake2b(digest_size=12)
    for _ in range(size):
        digest.update(row)
    return {"image_id": image_id, "size": f"{size}x{size}", "digest": digest.hexdigest()}


def call_webhook(url: str) -> str:
    """Always fails, on purpose: shows retries and the dead letter in the summary."""
    raise ConnectionError(f"webhook {url} refused the connection (deliberate demo failure)")


def daily_digest(recipients: int) -> str:
    """Enqueued with a delay: runs once it is due."""
    return f"daily digest sent to {recipients} recipients"
