"""Reading the NATS protocol on OmniQ's connections, message lines first.

nats-py's parser tries a regular expression per protocol line (two for a
message with headers), keeps its state in a dict and deletes each message from
the front of its buffer, which moves everything behind it: with a read of many
small messages (a worker's deliveries and publish acknowledgements) that is a
few microseconds per message, and the whole read is moved once per message.
``FastParser`` reads ``MSG``/``HMSG`` lines by offset within each read, hands
the messages of OmniQ's own subscriptions to their handlers without a coroutine
(``hand_over``), and gives every other line (``PING``, ``PONG``, ``INFO``,
``+OK``, ``-ERR``) and everything after it in that read to nats-py's parser,
whose state it shares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

#: Takes a message of one of OmniQ's subscriptions: True if it did, False for
#: nats-py's own path (``Client._process_msg``).
HandOver = Callable[[int, bytes, bytes, bytes, "bytes | None"], bool]


class FastParser(Parser):
    """nats-py's ``Parser`` with a fast path for message lines (see the module)."""

    def __init__(self, nc: Any, hand_over: HandOver) -> None:
        super().__init__(nc)
        self.hand_over = hand_over
        #: Bytes the message at the start of ``buf`` needs before it can be read.
        self.want = 0

    def reset(self) -> None:
        super().reset()
        self.want = 0

    async def parse(self, data: bytes = b"") -> None:
        if self.state != AWAITING_CONTROL_LINE:  # inside a message nats-py started
            await super().parse(data)
            return
        buf = self.buf
        if buf:
            buf.extend(data)
            if len(buf) < self.want:
                return  # a large message arriving in several reads
            data = bytes(buf)
            buf.clear()
        self.want = 0
        pos, size = 0, len(data)
        while pos < size:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            line = _message_line(data, pos, eol)
            if line is None:  # another operation, or malformed: nats-py reads on from here
                buf.extend(data[pos:])
                await super().parse()
                return
            subject, sid, reply, header_size, payload_size = line
            start = eol + 2
            end = start + payload_size
            if end + 2 > size:
                self.want = end + 2 - pos
                break
            headers = data[start : start + header_size] if header_size else None
            payload = data[start + header_size : end]
            pos = end + 2
            if not self.hand_over(sid, subject, reply, payload, headers):
                await self.nc._process_msg(sid, subject, reply, payload, headers)
        if pos < size:
            buf.extend(data[pos:])


def _message_line(data: bytes, pos: int, eol: int) -> tuple[bytes, int, bytes, int, int] | None:
    """``MSG subject sid [reply] size`` or ``HMSG subject sid [reply] header-size size``
    at ``pos``, as (subject, sid, reply, header size, size); None for anything else."""
    if data.startswith(b"MSG ", pos):
        args, header_size = data[pos + 4 : eol].split(), b"0"
    elif data.startswith(b"HMSG ", pos):
        args = data[pos + 5 : eol].split()
        header_size = args.pop(-2) if len(args) >= 4 else b""
    else:
        return None
    if not 3 <= len(args) <= 4 or not (header_size.isdigit() and args[1].isdigit()):
        return None
    if not args[-1].isdigit():
        return None
    reply = args[2] if len(args) == 4 else b""
    return args[0], int(args[1]), reply, int(header_size), int(args[-1])
