"""Throwaway certificates for TLS tests: a CA made by ``trustme`` and a server
certificate it signed for 127.0.0.1 and localhost, written as PEM files."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import unavailable


@dataclass(frozen=True)
class Certificates:
    """PEM files: ``ca_file`` for clients, ``cert_file`` and ``key_file`` for the server."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certificates(directory: Path) -> Certificates:
    try:
        import trustme
    except ImportError:
        unavailable("trustme is not installed: pip install -e '.[test]'")
    ca: Any = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    directory.mkdir(parents=True, exist_ok=True)
    made = Certificates(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(made.ca_file))
    server.cert_chain_pems[0].write_to_path(str(made.cert_file))
    server.private_key_pem.write_to_path(str(made.key_file))
    return made
