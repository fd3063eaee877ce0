"""Throwaway certificate authorities for the TLS tests (trustme, RSA keys as the BCP 195 suites need)."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Pki:
    """A site CA with a server and a client certificate, and a foreign CA's client certificate, as files."""

    folder: Path
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_cert: Path
    foreign_key: Path

    def issue(self, name: str, *identities: str, ca: trustme.CA | None = None,
              not_after: datetime.datetime | None = None) -> tuple[Path, Path]:
        """A new certificate (chain) and key from ``ca`` (the site CA) for ``identities``, written as ``name``."""
        kwargs = {"not_after": not_after} if not_after is not None else {}
        issued = (ca or self.ca).issue_cert(*(identities or ("127.0.0.1", "localhost")),
                                            key_type=trustme.KeyType.RSA, **kwargs)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        return cert, key

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the site CA, presenting the site client certificate (or ``cert``)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(cert or self.client_cert, key or self.client_key)
        return context


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pki = Pki(folder, ca, ca_file, *([Path()] * 6))
    pki.server_cert, pki.server_key = pki.issue("server")
    pki.client_cert, pki.client_key = pki.issue("client", "client.test")
    pki.foreign_cert, pki.foreign_key = pki.issue("foreign", "client.test",
                                                  ca=trustme.CA(key_type=trustme.KeyType.RSA))
    return pki


def tls11_context(pki: Pki) -> ssl.SSLContext:
    """A client that offers only TLS 1.1 (security level 0, so OpenSSL lets it), with the site client certificate."""
    context = pki.client_context()
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


def ssl_refused(address: tuple[str, int], context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> str:
    """Connect with ``context`` and try one exchange; the reason the server refused, '' when it did not."""
    import socket

    try:
        with socket.create_connection(address, timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            # TLS 1.3 reports a refused client certificate only on the first read after the handshake
            tls.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if not tls.recv(64):
                return "closed"
    except (ssl.SSLError, ConnectionError) as exc:
        return str(exc) or type(exc).__name__
    return ""
