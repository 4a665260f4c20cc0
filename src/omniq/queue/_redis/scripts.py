"""The Lua scripts of this package, ready to send: ``load_script`` reads
``<name>.lua``, puts in front of it the prologue of ``schema.lua`` (the key
schema) and the helpers of ``schema.lua`` it uses, and names the result by its
SHA1 for EVALSHA. The schema is written once; each script carries only the
helpers it calls."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str
    #: Changes data: reads through ``fence()`` wait for it (see ``RedisConnector.eval``).
    writes: bool


_HELPERS = "-- Helpers."
_DEFINES = re.compile(r"^local (?:function )?(\w+)", re.MULTILINE)
_COMMENT = re.compile(r"--[^\n]*")


def load_script(name: str, *, header: bool = True, writes: bool = True) -> Script:
    """``<name>.lua`` from this package, after ``schema.lua`` (the key schema and helpers)."""
    folder = resources.files(__package__)
    source = folder.joinpath(f"{name}.lua").read_text()
    if header:
        source = _with_helpers(folder.joinpath("schema.lua").read_text(), source)
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest(), writes)


def _with_helpers(schema: str, body: str) -> str:
    """The schema's prologue, the helpers ``body`` uses (directly or through others), ``body``."""
    prologue, mark, rest = schema.partition(_HELPERS)
    intro, _, helpers = rest.partition("\n\n")
    blocks: list[tuple[str, str]] = []
    for block in helpers.strip().split("\n\n"):
        defined = _DEFINES.search(block)
        assert defined is not None, f"schema.lua: a helper block defines nothing: {block!r}"
        blocks.append((defined.group(1), block))
    used: set[str] = set()
    code = _COMMENT.sub("", body)
    while True:
        more = {n for n, b in blocks if n not in used and re.search(rf"\b{n}\b", code)}
        if not more:
            break
        used |= more
        code += "".join(_COMMENT.sub("", b) for n, b in blocks if n in more)
    kept = "".join(block + "\n\n" for n, block in blocks if n in used)
    return f"{prologue}{mark}{intro}\n\n{kept}{body}"
