"""Where the Redis server is and how to reach it: ``RedisSettings``, built from
keyword arguments or parsed from a ``redis://`` URL. No I/O and no driver: a
bad URL is a ``ConfigurationError`` when a storage is built, and the queue,
result and event storages all read their settings the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..._errors import ConfigurationError

DEFAULT_PORT = 6379
_URL_OPTIONS = ("db", "prefix", "ssl_cert_reqs", "ssl_ca_certs", "socket_timeout")


@dataclass(frozen=True)
class RedisSettings:
    """Where the server is and how to reach it; no I/O."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None
    socket_timeout: float | None = 30.0
    socket_connect_timeout: float = 5.0

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_keepalive": True,
        }
        if self.ssl:
            options.update(
                ssl=True, ssl_cert_reqs=self.ssl_cert_reqs, ssl_ca_certs=self.ssl_ca_certs
            )
        return options

    def __str__(self) -> str:
        """The server as a URL, without the password."""
        scheme = "rediss" if self.ssl else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def redis_settings(
    host: str,
    port: int,
    *,
    db: int,
    username: str | None,
    password: str | None,
    ssl: bool,
    url: str | None,
) -> tuple[RedisSettings, str | None]:
    """Settings from keyword arguments, or from ``url`` when one is given.

    Returns them with the key prefix the URL names (``?prefix=``), if any.
    """
    if url is None:
        return RedisSettings(host, int(port), int(db), username, password, bool(ssl)), None
    return _parse_url(url)


def _parse_url(url: str) -> tuple[RedisSettings, str | None]:
    """``redis://[[user]:password@]host[:port][/db][?option=value&...]``, ``rediss://`` for TLS."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"not a redis:// or rediss:// URL: {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigurationError(f"{url!r}: bad port ({exc})") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"{url!r}: unknown option {', '.join(unknown)}; URLs take {', '.join(_URL_OPTIONS)}"
        )
    path = parts.path.strip("/")
    db_text = query.get("db", path or "0")
    if path and "db" in query and path != query["db"]:
        raise ConfigurationError(f"{url!r} names two databases")
    if not db_text.isdigit():
        raise ConfigurationError(f"{url!r}: the database must be a number, not {db_text!r}")
    options: dict[str, Any] = {}
    if "ssl_cert_reqs" in query:
        options["ssl_cert_reqs"] = query["ssl_cert_reqs"]
    if "ssl_ca_certs" in query:
        options["ssl_ca_certs"] = query["ssl_ca_certs"]
    if "socket_timeout" in query:
        options["socket_timeout"] = float(query["socket_timeout"])
    settings = RedisSettings(
        host=unquote(parts.hostname or "localhost"),
        port=port,
        db=int(db_text),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        ssl=parts.scheme == "rediss",
        **options,
    )
    return settings, query.get("prefix") or None
