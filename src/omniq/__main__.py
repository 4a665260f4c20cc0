"""``python -m omniq ...``: the same as the ``omniq`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
