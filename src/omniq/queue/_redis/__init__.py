"""What the Redis queue, result and event storages share: settings and URLs
(``settings``), one connector per instance (``connection``: a pooled client per
event loop, a sync client for blocking calls, retries across outages, built on
``link`` and ``blocking``), the Lua scripts and their key schema (``scripts``,
``schema.lua``), and the doorbell that idle consumers block on (``doorbell``)."""

from __future__ import annotations

from .connection import MAX_BLOCK, LoopClient, RedisConnector
from .doorbell import Ahead, Doorbell
from .scripts import Script, load_script
from .settings import RedisSettings, redis_settings

__all__ = [
    "MAX_BLOCK",
    "Ahead",
    "Doorbell",
    "LoopClient",
    "RedisConnector",
    "RedisSettings",
    "Script",
    "load_script",
    "redis_settings",
]
