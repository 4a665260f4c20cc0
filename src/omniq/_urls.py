"""Turning storage URLs into the paths the backends open."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ._errors import ConfigurationError


def sqlite_path_from_url(url: str) -> str:
    """The database path in a ``sqlite://`` URL, spelled as SQLAlchemy does.

    ``sqlite:///relative.db`` (three slashes) is relative to the working
    directory, ``sqlite:////abs/path.db`` (four) is absolute; percent escapes
    are decoded. ``sqlite://name.db`` is refused rather than guessed at: the
    name sits where a host would. ``:memory:`` is refused too, because omniq
    opens one connection per thread and each would see its own empty database.
    Query strings are refused so that a typo'd option never becomes part of a
    file name; options are keyword arguments.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {url!r}")
    if parts.netloc or not parts.path.startswith("/"):
        raise ConfigurationError(
            f"{url!r} has no path: write sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{url!r}: pass options as keyword arguments, not in the URL")
    path = unquote(parts.path[1:])
    if not path:
        raise ConfigurationError(f"{url!r} names no database file")
    if path == ":memory:":
        raise ConfigurationError(
            "sqlite:///:memory: is unsupported: each thread would get its own database"
        )
    return path
