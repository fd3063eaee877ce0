"""TLS for every listener and client of the deployment: one policy, and checks of certificate files at start.

The policy is the non-downgrading BCP 195 profile (DICOM PS3.15 Annex B): TLS 1.2 and 1.3 only, and at
TLS 1.2 only forward-secret AEAD suites (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305). Python's default
list also offers CBC suites, so the list is set explicitly. TLS 1.3 suites are all AEAD and left as they are.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import requests

#: OpenSSL cipher string of the TLS 1.2 suites allowed (TLS 1.3 suites are set apart by OpenSSL).
TLS12_CIPHERS = "ECDHE+AESGCM:DHE+AESGCM:ECDHE+CHACHA20:DHE+CHACHA20"


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot serve: the message names the setting and the file."""


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """Restrict ``context`` to the policy: TLS 1.2+, AEAD forward-secret suites, no compression or renegotiation."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


@dataclass(frozen=True)
class TLSFiles:
    """A certificate, its key and the CA that peers' certificates must come from; each with its setting's name."""

    cert: Path
    key: Path
    ca: Path | None
    cert_setting: str
    key_setting: str
    ca_setting: str

    def check(self, now: datetime.datetime | None = None) -> None:
        """Refuse files that cannot serve: missing, unreadable, not PEM, a key not matching the certificate,
        an expired or not yet valid certificate, a CA file without a certificate."""
        from cryptography import x509  # here: the test tool imports this module without it

        cert_bytes = _read(self.cert, self.cert_setting)
        _read(self.key, self.key_setting)
        try:
            certificate = x509.load_pem_x509_certificate(cert_bytes)
        except ValueError as exc:
            raise TLSConfigError(f"{self.cert_setting}: {self.cert} is not a PEM certificate ({exc})") from None
        now = now or datetime.datetime.now(datetime.UTC)
        if certificate.not_valid_after_utc < now:
            raise TLSConfigError(f"{self.cert_setting}: the certificate in {self.cert} expired on "
                                 f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
        if certificate.not_valid_before_utc > now:
            raise TLSConfigError(f"{self.cert_setting}: the certificate in {self.cert} is not valid before "
                                 f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"{self.key_setting}: {self.key} is not the private key of the certificate in "
                                 f"{self.cert} ({self.cert_setting}): {exc.reason or exc}") from None
        if self.ca is not None:
            check_ca(self.ca, self.ca_setting)

    def stamp(self) -> tuple[tuple[int, int] | None, ...]:
        """The files' modification times and sizes (None: gone), to notice a replaced certificate."""
        stamps: list[tuple[int, int] | None] = []
        for path in (self.cert, self.key, self.ca):
            try:
                info = path.stat() if path is not None else None
            except OSError:
                info = None
            stamps.append(None if info is None else (info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def server_context(self, context_class: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
        """A listener's context: this certificate, and when a CA is named, client certificates from it required."""
        context = harden(context_class(ssl.PROTOCOL_TLS_SERVER))
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.load_verify_locations(cafile=str(self.ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client's context: servers verified against the CA (the system's when none is named), this
        certificate presented when a server asks."""
        context = harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                    cafile=None if self.ca is None else str(self.ca)))
        context.load_cert_chain(self.cert, self.key)
        return context

    def https_session(self) -> requests.Session:
        """A requests session verifying https:// servers against the CA and presenting this certificate."""
        return https_session(self.ca, self.cert, self.key)


class _Session(requests.Session):
    """requests' session whose own ``verify`` (a CA file) wins over REQUESTS_CA_BUNDLE in the environment
    (requests lets the environment override a session's ``verify``)."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        return super().merge_environment_settings(url, proxies, stream, self.verify if verify is None else verify,
                                                  cert)


def https_session(ca_file: Path | None, cert: Path | None, key: Path | None) -> requests.Session:
    """A session verifying https:// servers against ``ca_file`` (the system's CAs when None) and presenting
    ``cert`` (with ``key``; None when the key is in ``cert``) to servers that require a client certificate."""
    session = _Session()
    if ca_file is not None:
        session.verify = str(ca_file)
    if cert is not None:
        session.cert = (str(cert), str(key)) if key is not None else str(cert)
    return session


def check_ca(path: Path, setting: str) -> None:
    """Refuse a CA file that is missing, unreadable or holds no PEM certificate, naming ``setting``."""
    _read(path, setting)
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{setting}: {path} holds no PEM CA certificate ({exc.reason or exc})") from None


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{setting}: {path} does not exist") from None
    except OSError as exc:
        raise TLSConfigError(f"{setting}: {path} cannot be read ({exc.strerror})") from None


def tls_files(cert: Path | None, key: Path | None, ca: Path | None, prefix: str) -> TLSFiles | None:
    """The files of one TLS setting group (``<prefix>_CERT``, ``_KEY``, ``_CA``/``_CLIENT_CA``), checked;
    None when neither certificate nor key is set. A certificate without its key (or the reverse) is an error."""
    cert_setting, key_setting = f"{prefix}_CERT", f"{prefix}_KEY"
    ca_setting = f"{prefix}_CLIENT_CA" if prefix == "INFERENCE_TLS" else f"{prefix}_CA"
    if cert is None and key is None:
        if ca is not None:
            raise TLSConfigError(f"{ca_setting} is set but {cert_setting} and {key_setting} are not: "
                                 "set both to turn TLS on")
        return None
    if cert is None or key is None:
        missing = cert_setting if cert is None else key_setting
        given = key_setting if cert is None else cert_setting
        raise TLSConfigError(f"{given} is set but {missing} is not: TLS needs both the certificate and its key")
    files = TLSFiles(cert, key, ca, cert_setting, key_setting, ca_setting)
    files.check()
    return files
